"""Judging conditions, pure: windows, verdicts, per-device scores, evidence, alert states."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from pydantic import ValidationError

from server.alerts.conditions import (
    Action,
    DeviceScores,
    DeviceSeen,
    ProfileLatency,
    Verdict,
    Window,
    WindowJudgement,
    combine,
    device_scores,
    evaluate_windows,
    judge_accuracy,
    judge_drift,
    judge_error_rate,
    judge_latency,
    judge_offline,
    recent_windows,
    transition,
)
from server.alerts.rules import (
    MAX_LOOKBACK_HOURS,
    AccuracyCondition,
    DriftCondition,
    ErrorRateCondition,
    LatencyCondition,
    OfflineCondition,
    parse_condition,
)
from shared.drift import DriftReference, js_distance, psi

NOW = datetime(2026, 11, 2, 5, 20, tzinfo=UTC)
HOUR = timedelta(hours=1)
WINDOW = Window(datetime(2026, 11, 2, 5, tzinfo=UTC), datetime(2026, 11, 2, 6, tzinfo=UTC))


def judged(window: Window, verdict: Verdict) -> WindowJudgement:
    return WindowJudgement(window, verdict, None, 0.0, verdict.value)


# ----------------------------------------------------------------------------- windows


def test_recent_windows_are_whole_hours_back_to_back_newest_first() -> None:
    current = recent_windows(NOW, window_hours=1, count=3, include_current=True)
    assert [w.start.hour for w in current] == [5, 4, 3]
    assert all(w.end - w.start == HOUR for w in current)
    assert current[0].end == datetime(2026, 11, 2, 6, tzinfo=UTC)
    complete = recent_windows(NOW, window_hours=2, count=2, include_current=False)
    assert [(w.start.hour, w.end.hour) for w in complete] == [(3, 5), (1, 3)]
    on_the_hour = datetime(2026, 11, 2, 5, tzinfo=UTC)
    assert recent_windows(on_the_hour, window_hours=1, count=1, include_current=True)[0] == Window(
        on_the_hour, on_the_hour + HOUR
    )
    with pytest.raises(ValueError, match="at least 1"):
        recent_windows(NOW, window_hours=0, count=1, include_current=True)


def test_the_hour_in_progress_counts_only_once_it_can_be_judged() -> None:
    condition = ErrorRateCondition(max_error_rate=0.1, windows=2)
    asked: list[Window] = []

    def judge_nothing_yet(window: Window) -> WindowJudgement:
        asked.append(window)
        fresh = window.start.hour == 5
        return judged(window, Verdict.INSUFFICIENT if fresh else Verdict.FIRING)

    result = evaluate_windows(NOW, condition, judge_nothing_yet)
    assert result.verdict is Verdict.FIRING
    assert [j.window.start.hour for j in result.judgements] == [4, 3]  # complete hours only
    assert asked[0].start.hour == 5

    result = evaluate_windows(NOW, condition, lambda w: judged(w, Verdict.FIRING))
    assert [j.window.start.hour for j in result.judgements] == [5, 4]


def test_one_ok_window_clears_and_stops_the_judging() -> None:
    condition = DriftCondition(windows=3)
    asked: list[int] = []

    def judge(window: Window) -> WindowJudgement:
        asked.append(window.start.hour)
        return judged(window, Verdict.OK if window.start.hour == 4 else Verdict.FIRING)

    result = evaluate_windows(NOW, condition, judge)
    assert result.verdict is Verdict.OK
    assert asked == [5, 4]
    assert result.deciding is not None and result.deciding.window.start.hour == 4


@pytest.mark.parametrize(
    ("verdicts", "combined"),
    [
        ([Verdict.FIRING, Verdict.FIRING], Verdict.FIRING),
        ([Verdict.FIRING, Verdict.OK], Verdict.OK),
        ([Verdict.FIRING, Verdict.INSUFFICIENT], Verdict.INSUFFICIENT),
        ([Verdict.INSUFFICIENT, Verdict.OK], Verdict.OK),
        ([], Verdict.INSUFFICIENT),
    ],
)
def test_combine(verdicts: list[Verdict], combined: Verdict) -> None:
    assert combine(judged(WINDOW, v) for v in verdicts) is combined


# ----------------------------------------------------------------------------- drift


def reference() -> DriftReference:
    rng = np.random.default_rng(1)
    return DriftReference.from_data(
        rng.normal(size=(3000, 3)), feature_names=["a", "b", "c"], n_bins=6
    )


def test_device_scores_equal_the_shared_distances_on_each_devices_counts() -> None:
    ref = reference()
    slots = [len(f.counts) for f in ref.features]
    offsets = np.concatenate([[0], np.cumsum(slots)])
    slices = [slice(int(offsets[j]), int(offsets[j + 1])) for j in range(len(slots))]
    rng = np.random.default_rng(7)
    counts = rng.integers(0, 50, size=(4, int(offsets[-1])))
    counts[2, slices[1]] = 0  # a device without values on one feature
    counts[3, slices[0]] = [0] * (slots[0] - 1) + [900]  # all in the overflow slot
    for metric, distance in (("psi", psi), ("js", js_distance)):
        scores = device_scores(ref, slices, ["d0", "d1", "d2", "d3"], counts, metric)
        assert scores.features == ["a", "b", "c"]
        for i in range(4):
            for j, feature in enumerate(ref.features):
                live = counts[i, slices[j]]
                assert scores.n[i, j] == live.sum()
                if live.sum() == 0:
                    assert scores.values[i, j] == 0.0
                else:
                    assert scores.values[i, j] == pytest.approx(
                        distance(feature.counts, live), rel=1e-9, abs=1e-12
                    )


def scores(values: list[list[float]], n: int | list[list[int]] = 1000) -> DeviceScores:
    array = np.asarray(values, dtype=float)
    counts = np.full(array.shape, n) if isinstance(n, int) else np.asarray(n)
    return DeviceScores([f"dev-{i}" for i in range(len(values))], ["f0", "f1"], array, counts)


def test_drift_fires_on_the_share_of_evaluated_devices() -> None:
    condition = DriftCondition(threshold=0.25, min_device_share=0.5, min_samples=500)
    found = judge_drift(
        scores([[0.9, 0.0], [0.3, 0.1], [0.0, 0.1], [2.0, 2.0]], [[1000] * 2] * 3 + [[10] * 2]),
        condition,
        WINDOW,
        in_scope=5,
    )
    # dev-3 saw too few values: not evaluated, so 2 of 3 devices drifted
    assert found.verdict is Verdict.FIRING
    assert found.value == pytest.approx(2 / 3)
    assert found.evidence["evaluated"] == 3 and found.evidence["drifted"] == 2
    assert found.evidence["in_scope"] == 5 and found.evidence["with_data"] == 4
    assert [d["device_id"] for d in found.evidence["devices"]] == ["dev-0", "dev-1"]
    assert found.evidence["devices"][0] == {
        "device_id": "dev-0",
        "feature": "f0",
        "value": 0.9,
        "features_over": 1,
    }
    assert found.evidence["features"] == [
        {"feature": "f0", "devices": 2, "share": pytest.approx(2 / 3), "max": 0.9}
    ]
    assert "2 of 3 device(s) (67%) at PSI >= 0.25 (f0)" in found.summary

    below = judge_drift(scores([[0.9, 0.0], [0.0, 0.0], [0.1, 0.0]]), condition, WINDOW, in_scope=3)
    assert below.verdict is Verdict.OK and below.value == pytest.approx(1 / 3)


def test_drift_watches_only_the_named_features_and_needs_enough_devices() -> None:
    only_f1 = DriftCondition(features=["f1", "nope"], min_device_share=0.5)
    found = judge_drift(scores([[0.9, 0.0], [0.9, 0.0]]), only_f1, WINDOW, in_scope=None)
    assert found.verdict is Verdict.OK and found.evidence["unknown_features"] == ["nope"]
    needs_three = DriftCondition(min_devices=3)
    few = judge_drift(scores([[0.9, 0.9], [0.9, 0.9]]), needs_three, WINDOW, in_scope=None)
    assert few.verdict is Verdict.INSUFFICIENT and few.value is None
    assert "2 device(s)" in few.summary and "3 needed" in few.summary
    empty = judge_drift(DeviceScores.empty(["f0"]), DriftCondition(), WINDOW, in_scope=0)
    assert empty.verdict is Verdict.INSUFFICIENT


def test_js_distance_has_its_own_default_threshold() -> None:
    condition = DriftCondition(metric="js")
    assert condition.limit == 0.1 and DriftCondition().limit == 0.25
    found = judge_drift(scores([[0.15, 0.0]]), condition, WINDOW, in_scope=1)
    assert found.verdict is Verdict.FIRING and "JS distance >= 0.1" in found.summary


# ----------------------------------------------------------------------------- SLA


def test_latency_is_judged_per_profile_against_its_own_sla() -> None:
    profiles = [
        ProfileLatency("fast", devices=2, inferences=500, p95_ms=12.0, sla_ms=10.0),
        ProfileLatency("slow", devices=1, inferences=500, p95_ms=80.0, sla_ms=100.0),
        ProfileLatency("quiet", devices=1, inferences=5, p95_ms=900.0, sla_ms=10.0),
        ProfileLatency("unknown", devices=1, inferences=500, p95_ms=900.0, sla_ms=None),
    ]
    found = judge_latency(profiles, LatencyCondition(), WINDOW)
    assert found.verdict is Verdict.FIRING
    assert (found.value, found.threshold) == (12.0, 10.0)
    assert found.summary == "p95 12 ms on fast (2 device(s)) above the limit of 10 ms"
    judged_profiles = {p["profile"]: p["judged"] for p in found.evidence["profiles"]}
    assert judged_profiles == {"fast": True, "slow": True, "quiet": False, "unknown": False}

    relaxed = judge_latency(profiles, LatencyCondition(sla_ratio=1.5), WINDOW)
    assert relaxed.verdict is Verdict.OK
    fixed = judge_latency(profiles, LatencyCondition(sla_ms=50.0), WINDOW)
    assert fixed.verdict is Verdict.FIRING and fixed.value == 900.0  # 'unknown' is judged now
    nothing = judge_latency(profiles[2:3], LatencyCondition(), WINDOW)
    assert nothing.verdict is Verdict.INSUFFICIENT


def test_a_p95_beyond_the_largest_bucket_fires_and_stays_json_ready() -> None:
    over = [ProfileLatency("p", devices=1, inferences=200, p95_ms=math.inf, sla_ms=10.0)]
    found = judge_latency(over, LatencyCondition(), WINDOW)
    assert found.verdict is Verdict.FIRING and "over the largest bucket" in found.summary
    row = found.as_json()
    assert row["value"] is None and row["profiles"][0]["p95_over_largest_bucket"] is True


def test_error_rate_and_accuracy_boundaries() -> None:
    condition = ErrorRateCondition(max_error_rate=0.05, min_requests=100)
    assert judge_error_rate(95, 5, condition, WINDOW).verdict is Verdict.OK  # 5 % is not above
    above = judge_error_rate(94, 6, condition, WINDOW)
    assert above.verdict is Verdict.FIRING and above.value == pytest.approx(0.06)
    assert judge_error_rate(50, 49, condition, WINDOW).verdict is Verdict.INSUFFICIENT

    accuracy = AccuracyCondition(min_accuracy=0.9, min_labels=10)
    assert judge_accuracy(9, 10, accuracy, WINDOW).verdict is Verdict.OK
    below = judge_accuracy(8, 10, accuracy, WINDOW)
    assert below.verdict is Verdict.FIRING and below.evidence == {"correct": 8, "labelled": 10}
    assert judge_accuracy(0, 9, accuracy, WINDOW).verdict is Verdict.INSUFFICIENT


# ----------------------------------------------------------------------------- presence


def test_offline_counts_devices_silent_for_longer_than_the_limit() -> None:
    joined = NOW - timedelta(days=3)
    devices = [
        DeviceSeen("a", online=False, last_seen=NOW - timedelta(hours=2), known_since=joined),
        DeviceSeen("b", online=False, last_seen=NOW - timedelta(minutes=5), known_since=joined),
        DeviceSeen("c", online=True, last_seen=NOW - timedelta(days=2), known_since=joined),
        DeviceSeen("never", online=False, last_seen=None, known_since=joined),
    ]
    condition = OfflineCondition(offline_for=timedelta(minutes=30))
    verdict, value, summary, evidence = judge_offline(devices, condition, NOW)
    assert verdict is Verdict.FIRING and value == 2.0
    assert [d["device_id"] for d in evidence["devices"]] == ["never", "a"]  # longest first
    assert evidence["devices"][1]["offline_seconds"] == 7200
    assert summary == "2 of 4 device(s) offline for more than 30 min"
    three = OfflineCondition(offline_for=timedelta(minutes=30), min_devices=3)
    assert judge_offline(devices, three, NOW)[0] is Verdict.OK


@pytest.mark.parametrize(
    ("is_open", "verdict", "action"),
    [
        (False, Verdict.FIRING, Action.OPEN),
        (False, Verdict.OK, Action.NONE),
        (False, Verdict.INSUFFICIENT, Action.NONE),
        (False, None, Action.NONE),
        (True, Verdict.FIRING, Action.UPDATE),
        (True, Verdict.INSUFFICIENT, Action.UPDATE),  # too little data is no all-clear
        (True, Verdict.OK, Action.RESOLVE),
        (True, None, Action.RESOLVE),
    ],
)
def test_transition(is_open: bool, verdict: Verdict | None, action: Action) -> None:
    assert transition(is_open, verdict) is action


# ----------------------------------------------------------------------------- rules


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ({"kind": "drift", "windows": 48, "window_hours": 4}, f"at most {MAX_LOOKBACK_HOURS}"),
        ({"kind": "drift", "metric": "js", "threshold": 1.5}, "threshold must be <= 1"),
        ({"kind": "drift", "features": []}, "name at least one"),
        ({"kind": "drift", "min_device_share": 0}, "greater than 0"),
        ({"kind": "error_rate"}, "max_error_rate"),
        ({"kind": "error_rate", "max_error_rate": 0.1, "metric": "psi"}, "Extra inputs"),
        ({"kind": "offline", "offline_for": 10}, "between one minute and a year"),
        ({"kind": "accuracy", "min_accuracy": 1.5}, "less than or equal to 1"),
        ({"kind": "nope"}, "does not match any of the expected tags"),
    ],
)
def test_conditions_that_cannot_work_are_refused(
    condition: dict[str, object], message: str
) -> None:
    import json

    with pytest.raises(ValidationError, match=message):
        parse_condition(json.dumps(condition))


def test_conditions_round_trip_with_their_defaults() -> None:
    drift = parse_condition('{"kind": "drift"}')
    assert isinstance(drift, DriftCondition)
    assert (drift.windows, drift.window_hours, drift.min_device_share) == (3, 1, 0.3)
    assert parse_condition(drift.model_dump_json()) == drift
    offline = parse_condition('{"kind": "offline", "offline_for": "PT30M"}')
    assert isinstance(offline, OfflineCondition) and offline.offline_for == timedelta(minutes=30)
    assert parse_condition('{"kind": "accuracy", "min_accuracy": 0.9}').window_hours == 24  # type: ignore[union-attr]
