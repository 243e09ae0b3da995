"""Judging conditions: pure functions of figures, windows and ``now``.

The database side (:mod:`server.alerts.signals`) reads the figures of one window -- per
device drift counts, latency histograms per profile, error counts, labelled feedback,
devices' presence -- and these functions say whether the condition holds there, with
the evidence that shows it. No clock is read and nothing is stored here.

What always holds:

- Every judgement is :class:`Verdict` ``firing`` (the condition holds), ``ok`` (it does
  not), or ``insufficient`` (too little data to say either: fewer inferences, devices
  or labels than the condition's minimums). Too little data never counts as ``ok``.
- Windows are whole hours, UTC, newest first, back to back (:func:`recent_windows`).
  The hour in progress is the newest window only once it can be judged, so a fresh hour
  with few reports neither fires nor clears a condition (:func:`evaluate_windows`).
- A windowed condition fires only if *every* one of its ``windows`` consecutive windows
  fires; one ``ok`` window clears it; otherwise it is ``insufficient``.
- Per-device PSI and JS distance equal :func:`shared.drift.psi` and
  :func:`shared.drift.js_distance` on that device's own counts (tested).
- Evidence is JSON-ready: finite numbers, ISO times, bounded lists
  (:data:`MAX_EVIDENCE_ITEMS` devices or features per list).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt

from server.alerts.rules import (
    AccuracyCondition,
    DriftCondition,
    ErrorRateCondition,
    LatencyCondition,
    OfflineCondition,
    WindowedCondition,
)
from server.drift.timerange import Period, ceil_to, floor_to
from shared.drift import PSI_EPSILON, DriftReference

__all__ = [
    "MAX_EVIDENCE_ITEMS",
    "Action",
    "DeviceScores",
    "DeviceSeen",
    "ProfileLatency",
    "Verdict",
    "Window",
    "WindowJudgement",
    "WindowedVerdict",
    "combine",
    "device_scores",
    "evaluate_windows",
    "judge_accuracy",
    "judge_drift",
    "judge_error_rate",
    "judge_latency",
    "judge_offline",
    "recent_windows",
    "transition",
]

MAX_EVIDENCE_ITEMS = 50
"""Devices (or features) listed in one piece of evidence; counts always cover all of them."""

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class Verdict(StrEnum):
    FIRING = "firing"
    OK = "ok"
    INSUFFICIENT = "insufficient"


@dataclass(frozen=True, slots=True)
class Window:
    """``[start, end)``, whole hours, aware UTC."""

    start: datetime
    end: datetime

    def as_json(self) -> dict[str, str]:
        return {"start": self.start.isoformat(), "end": self.end.isoformat()}


@dataclass(frozen=True)
class WindowJudgement:
    window: Window
    verdict: Verdict
    value: float | None
    """The figure compared with ``threshold`` (None: not judged)."""
    threshold: float
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            **self.window.as_json(),
            "verdict": self.verdict.value,
            "value": _finite(self.value),
            "threshold": _finite(self.threshold),
            "summary": self.summary,
            **self.evidence,
        }


@dataclass(frozen=True)
class WindowedVerdict:
    verdict: Verdict
    judgements: list[WindowJudgement]
    """Newest first; the judging stops at the first ``ok`` window (it decides)."""

    @property
    def deciding(self) -> WindowJudgement | None:
        """The judgement that speaks for the verdict: the clearing window, else the newest."""
        for judgement in self.judgements:
            if judgement.verdict is Verdict.OK:
                return judgement
        return self.judgements[0] if self.judgements else None


def _finite(value: float | None, digits: int = 6) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


# ----------------------------------------------------------------------------- windows


def recent_windows(
    now: datetime, *, window_hours: int, count: int, include_current: bool
) -> list[Window]:
    """``count`` back-to-back windows, newest first, ending at the hour in progress's end
    (``include_current``) or at its start."""
    if window_hours < 1 or count < 1:
        raise ValueError("window_hours and count must be at least 1")
    end = ceil_to(now, Period.HOUR) if include_current else floor_to(now, Period.HOUR)
    if include_current and end == floor_to(now, Period.HOUR):
        end += Period.HOUR.length  # exactly on the hour: the hour that just began
    length = timedelta(hours=window_hours)
    return [Window(end - (k + 1) * length, end - k * length) for k in range(count)]


def combine(judgements: Iterable[WindowJudgement]) -> Verdict:
    """Firing if every window fires, ok if any window is ok, else insufficient."""
    verdicts = [j.verdict for j in judgements]
    if not verdicts:
        return Verdict.INSUFFICIENT
    if Verdict.OK in verdicts:
        return Verdict.OK
    if all(v is Verdict.FIRING for v in verdicts):
        return Verdict.FIRING
    return Verdict.INSUFFICIENT


def evaluate_windows(
    now: datetime, condition: WindowedCondition, judge: Callable[[Window], WindowJudgement]
) -> WindowedVerdict:
    """Judge the condition's windows, newest first, and combine them.

    The newest window is the one holding the hour in progress when ``judge`` can judge
    it already; otherwise the windows end at the start of that hour (all complete).
    Judging stops at the first ``ok`` window: it decides the verdict.
    """
    current = recent_windows(
        now, window_hours=condition.window_hours, count=condition.windows, include_current=True
    )
    first = judge(current[0])
    if first.verdict is Verdict.INSUFFICIENT:
        windows = recent_windows(
            now,
            window_hours=condition.window_hours,
            count=condition.windows,
            include_current=False,
        )
        judgements: list[WindowJudgement] = []
    else:
        windows, judgements = current[1:], [first]
    for window in windows:
        if judgements and judgements[-1].verdict is Verdict.OK:
            break
        judgements.append(judge(window))
    return WindowedVerdict(combine(judgements), judgements)


# ----------------------------------------------------------------------------- drift


@dataclass(frozen=True)
class DeviceScores:
    """Per device and feature: the metric against the reference, and the values counted."""

    device_ids: list[str]
    features: list[str]
    values: FloatArray
    """(devices, features)"""
    n: IntArray
    """(devices, features)"""

    @classmethod
    def empty(cls, features: Sequence[str]) -> DeviceScores:
        return cls(
            [], list(features), np.zeros((0, len(features))), np.zeros((0, len(features)), int)
        )


def device_scores(
    reference: DriftReference,
    feature_slices: Sequence[slice],
    device_ids: list[str],
    counts: IntArray,
    metric: str,
) -> DeviceScores:
    """PSI (floored as :func:`shared.drift.psi`) or JS distance (base 2) of every device's
    counts on every feature of ``reference``; ``feature_slices[j]`` is where feature ``j``
    sits in a row of ``counts`` (devices, slots)."""
    names = [f.name for f in reference.features]
    if len(feature_slices) != len(names):
        raise ValueError("one slice per reference feature")
    n_devices = counts.shape[0]
    values = np.zeros((n_devices, len(names)))
    totals = np.zeros((n_devices, len(names)), dtype=np.int64)
    for j, (feature, part) in enumerate(zip(reference.features, feature_slices, strict=True)):
        live = counts[:, part].astype(np.float64)
        n = live.sum(axis=1)
        totals[:, j] = n.astype(np.int64)
        expected = np.asarray(feature.counts, dtype=np.float64)
        if expected.shape[0] != live.shape[1] or expected.sum() <= 0 or n_devices == 0:
            continue
        e = expected / expected.sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            a = live / np.where(n > 0, n, 1.0)[:, None]
            if metric == "psi":
                ef = np.maximum(e, PSI_EPSILON)[None, :]
                af = np.maximum(a, PSI_EPSILON)
                score = np.sum((af - ef) * np.log(af / ef), axis=1)
            else:
                m = 0.5 * (e[None, :] + a)
                kl_e = np.where(e[None, :] > 0, e[None, :] * np.log2(e[None, :] / m), 0.0)
                kl_a = np.where(a > 0, a * np.log2(a / m), 0.0)
                divergence = 0.5 * kl_e.sum(axis=1) + 0.5 * kl_a.sum(axis=1)
                score = np.sqrt(np.clip(divergence, 0.0, 1.0))
        values[:, j] = np.where(n > 0, score, 0.0)
    return DeviceScores(list(device_ids), names, values, totals)


def judge_drift(
    scores: DeviceScores,
    condition: DriftCondition,
    window: Window,
    *,
    in_scope: int | None,
) -> WindowJudgement:
    """Share of evaluated devices at or above the threshold on any watched feature."""
    limit = condition.limit
    metric = condition.metric
    wanted = condition.features or scores.features
    unknown = sorted(set(wanted) - set(scores.features))
    columns = [scores.features.index(f) for f in wanted if f in scores.features]
    names = [scores.features[j] for j in columns]
    values = scores.values[:, columns] if columns else np.zeros((len(scores.device_ids), 0))
    n = scores.n[:, columns] if columns else np.zeros((len(scores.device_ids), 0), int)
    enough = n >= condition.min_samples
    evaluated = enough.any(axis=1) if enough.size else np.zeros(len(scores.device_ids), bool)
    over = enough & (values >= limit)
    drifted = evaluated & over.any(axis=1) if over.size else np.zeros_like(evaluated)
    n_evaluated, n_drifted = int(evaluated.sum()), int(drifted.sum())
    evidence: dict[str, Any] = {
        "metric": metric,
        "in_scope": in_scope,
        "with_data": int((scores.n.sum(axis=1) > 0).sum()) if scores.n.size else 0,
        "evaluated": n_evaluated,
        "drifted": n_drifted,
    }
    if unknown:
        evidence["unknown_features"] = unknown
    if n_evaluated < condition.min_devices:
        return WindowJudgement(
            window,
            Verdict.INSUFFICIENT,
            None,
            condition.min_device_share,
            f"{n_evaluated} device(s) with at least {condition.min_samples} values on a "
            f"feature; {condition.min_devices} needed",
            evidence,
        )
    share = n_drifted / n_evaluated
    masked = np.where(enough, values, -np.inf)
    worst = masked.max(axis=1)
    order = sorted(np.flatnonzero(drifted), key=lambda i: (-worst[i], scores.device_ids[i]))
    evidence["share"] = _finite(share)
    evidence["devices"] = [
        {
            "device_id": scores.device_ids[i],
            "feature": names[int(np.argmax(masked[i]))],
            "value": _finite(float(worst[i])),
            "features_over": int(over[i].sum()),
        }
        for i in order[:MAX_EVIDENCE_ITEMS]
    ]
    judged = enough.sum(axis=0)
    feature_rows: list[dict[str, Any]] = []
    for k, name in enumerate(names):
        count = int(over[:, k].sum())
        if count:
            feature_rows.append(
                {
                    "feature": name,
                    "devices": count,
                    "share": _finite(count / judged[k]) if judged[k] else None,
                    "max": _finite(float(values[enough[:, k], k].max())),
                }
            )
    feature_rows.sort(key=lambda r: (-r["devices"], -(r["max"] or 0.0), r["feature"]))
    evidence["features"] = feature_rows[:MAX_EVIDENCE_ITEMS]
    firing = share >= condition.min_device_share
    label = "PSI" if metric == "psi" else "JS distance"
    top = ", ".join(r["feature"] for r in feature_rows[:3]) or "no feature"
    summary = (
        f"{n_drifted} of {n_evaluated} device(s) ({share:.0%}) at {label} >= {limit:g} "
        f"({top}); {condition.min_device_share:.0%} fires it"
    )
    return WindowJudgement(
        window,
        Verdict.FIRING if firing else Verdict.OK,
        share,
        condition.min_device_share,
        summary,
        evidence,
    )


# ----------------------------------------------------------------------------- SLA


@dataclass(frozen=True)
class ProfileLatency:
    """One device profile's latency in a window."""

    profile: str
    devices: int
    inferences: int
    p95_ms: float | None
    """Upper bound of the bucket holding the p95 (``inf``: beyond the largest bucket)."""
    sla_ms: float | None
    """The profile's SLA (None: an unknown profile)."""


def judge_latency(
    profiles: Sequence[ProfileLatency], condition: LatencyCondition, window: Window
) -> WindowJudgement:
    """Fires when any judged profile's p95 is above its limit; value: the worst p95."""
    rows, worst = [], None
    for p in sorted(profiles, key=lambda p: p.profile):
        base = condition.sla_ms if condition.sla_ms is not None else p.sla_ms
        limit = None if base is None else base * condition.sla_ratio
        judged = limit is not None and p.p95_ms is not None
        judged = judged and p.inferences >= condition.min_inferences
        rows.append(
            {
                "profile": p.profile,
                "devices": p.devices,
                "inferences": p.inferences,
                "p95_ms": _finite(p.p95_ms),
                "p95_over_largest_bucket": p.p95_ms is not None and math.isinf(p.p95_ms),
                "limit_ms": _finite(limit),
                "judged": judged,
            }
        )
        if judged:
            assert limit is not None and p.p95_ms is not None
            ratio = p.p95_ms / limit
            if worst is None or ratio > worst[0]:
                worst = (ratio, p, limit)
    evidence: dict[str, Any] = {"profiles": rows}
    if worst is None:
        return WindowJudgement(
            window,
            Verdict.INSUFFICIENT,
            None,
            condition.sla_ms or 0.0,
            f"no profile with {condition.min_inferences} inferences and a latency SLA",
            evidence,
        )
    ratio, profile, limit = worst
    shown = (
        "over the largest bucket" if math.isinf(profile.p95_ms or 0) else f"{profile.p95_ms:g} ms"
    )
    firing = ratio > 1.0
    summary = (
        f"p95 {shown} on {profile.profile} ({profile.devices} device(s)) "
        f"{'above' if firing else 'within'} the limit of {limit:g} ms"
    )
    return WindowJudgement(
        window,
        Verdict.FIRING if firing else Verdict.OK,
        profile.p95_ms,
        limit,
        summary,
        evidence,
    )


def judge_error_rate(
    inferences: int, errors: int, condition: ErrorRateCondition, window: Window
) -> WindowJudgement:
    requests = inferences + errors
    evidence = {"inferences": inferences, "errors": errors}
    if requests < condition.min_requests:
        return WindowJudgement(
            window,
            Verdict.INSUFFICIENT,
            None,
            condition.max_error_rate,
            f"{requests} request(s); {condition.min_requests} needed",
            evidence,
        )
    rate = errors / requests
    firing = rate > condition.max_error_rate
    return WindowJudgement(
        window,
        Verdict.FIRING if firing else Verdict.OK,
        rate,
        condition.max_error_rate,
        f"error rate {rate:.2%} ({errors} of {requests}) "
        f"{'above' if firing else 'within'} {condition.max_error_rate:.2%}",
        evidence,
    )


def judge_accuracy(
    correct: int, total: int, condition: AccuracyCondition, window: Window
) -> WindowJudgement:
    evidence = {"correct": correct, "labelled": total}
    if total < condition.min_labels:
        return WindowJudgement(
            window,
            Verdict.INSUFFICIENT,
            None,
            condition.min_accuracy,
            f"{total} labelled prediction(s); {condition.min_labels} needed",
            evidence,
        )
    accuracy = correct / total
    firing = accuracy < condition.min_accuracy
    return WindowJudgement(
        window,
        Verdict.FIRING if firing else Verdict.OK,
        accuracy,
        condition.min_accuracy,
        f"accuracy {accuracy:.2%} ({correct} of {total} labelled) "
        f"{'below' if firing else 'at or above'} {condition.min_accuracy:.2%}",
        evidence,
    )


# ----------------------------------------------------------------------------- presence


@dataclass(frozen=True)
class DeviceSeen:
    device_id: str
    online: bool
    last_seen: datetime | None
    """When it was last heard from (None: never)."""
    known_since: datetime
    """When it joined the fleet: the clock of a device never heard from starts there."""


def judge_offline(
    devices: Sequence[DeviceSeen], condition: OfflineCondition, now: datetime
) -> tuple[Verdict, float, str, dict[str, Any]]:
    """(verdict, offline devices, summary, evidence): never ``insufficient``."""
    cutoff = now - condition.offline_for
    offline = []
    for d in devices:
        since = d.last_seen or d.known_since
        if not d.online and since <= cutoff:
            offline.append((since, d))
    offline.sort(key=lambda pair: (pair[0], pair[1].device_id))
    count = len(offline)
    firing = count >= condition.min_devices
    minutes = condition.offline_for.total_seconds() / 60
    evidence = {
        "devices_in_scope": len(devices),
        "offline": count,
        "devices": [
            {
                "device_id": d.device_id,
                "last_seen": None if d.last_seen is None else d.last_seen.isoformat(),
                "offline_seconds": round((now - since).total_seconds()),
            }
            for since, d in offline[:MAX_EVIDENCE_ITEMS]
        ],
    }
    summary = f"{count} of {len(devices)} device(s) offline for more than {minutes:g} min" + (
        f"; {condition.min_devices} fire it" if condition.min_devices > 1 else ""
    )
    return (Verdict.FIRING if firing else Verdict.OK), float(count), summary, evidence


# ----------------------------------------------------------------------------- alert state


class Action(StrEnum):
    OPEN = "open"
    UPDATE = "update"
    RESOLVE = "resolve"
    NONE = "none"


def transition(is_open: bool, verdict: Verdict | None) -> Action:
    """What an evaluation does to a subject's alert; ``verdict`` None: the subject reported
    nothing at all in the windows looked at (a version no longer served there).

    An open alert stays open while the data is insufficient: too little data does not
    show that the problem is gone.
    """
    if is_open:
        if verdict is None or verdict is Verdict.OK:
            return Action.RESOLVE
        return Action.UPDATE
    return Action.OPEN if verdict is Verdict.FIRING else Action.NONE
