"""Rollups on a real database: what the fleet query answers from them equals the pooled
computation over the raw sketches, across hour and day boundaries, with each report
counted once however often it arrives."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.drift.layout import Layout, unpack_counts
from server.drift.models import DriftFleetRollup, DriftRollup
from server.drift.report import DriftReport, Thresholds
from server.drift.rollups import WindowInput, add_windows
from server.drift.service import Scope, drift_report, timeseries_report
from server.drift.timerange import Period, floor_to
from server.ingest.models import IngestDrop
from server.ingest.telemetry import store_reports
from shared.drift import DriftSketch, compare, merge_sketches, psi
from shared.messages import TelemetryReport
from tests.server.drift.conftest import MODEL, T0, make_reference, report, sketch_of

pytestmark = pytest.mark.database

REFERENCE = make_reference()
LAYOUT = Layout.of_reference(REFERENCE)
THRESHOLDS = Thresholds(min_samples=200)


def store(engine: Engine, batches: list[list[TelemetryReport]], *, shards: int = 1) -> int:
    """Store the batches in turn; batch ``i`` goes to the fleet rows of shard ``i % shards``,
    as if that many ingestion workers shared the stream."""
    stored = 0
    for index, batch in enumerate(batches):
        with Session(engine) as session:
            stored += store_reports(session, batch, shard=index % shards)
            session.commit()
    return stored


def query(
    engine: Engine,
    since: datetime,
    until: datetime,
    devices: list[str] | None = None,
    *,
    model: str = MODEL,
) -> DriftReport:
    with Session(engine) as session:
        return drift_report(
            session,
            reference=REFERENCE,
            model_name=model,
            model_version=1,
            scope=Scope(None, devices),
            since=since,
            until=until,
            thresholds=THRESHOLDS,
        )


def assert_pooled(result: DriftReport, sketches: list[DriftSketch]) -> None:
    """Scope-wide figures equal shared.compare on the pooled sketches."""
    pooled = compare(REFERENCE, merge_sketches(sketches))
    assert [f.name for f in result.features] == [d.name for d in pooled]
    for ours, theirs in zip(result.features, pooled, strict=True):
        assert ours.n == theirs.n
        assert ours.psi == theirs.psi
        assert ours.js_distance == theirs.js_distance
        assert ours.ks == theirs.ks
        assert (ours.chi_squared, ours.degrees_of_freedom) == (
            theirs.chi_squared,
            theirs.degrees_of_freedom,
        )
        assert ours.nan_share == theirs.nan_share
        assert ours.mean_shift == pytest.approx(theirs.mean_shift, rel=1e-9, abs=1e-9)


def assert_devices(result: DriftReport, by_device: dict[str, list[DriftSketch]]) -> None:
    """Each device's PSI is its own pooled sketches' PSI."""
    expected = {}
    for device_id, sketches in by_device.items():
        merged = merge_sketches(sketches)
        judged = [
            (psi(ref.counts, live.counts), ref.name)
            for ref, live in zip(REFERENCE.features, merged.features, strict=True)
            if sum(live.counts) >= THRESHOLDS.min_samples
        ]
        if judged:
            expected[device_id] = max(judged)
    ranked = {d.device_id: (d.psi, d.feature) for d in result.top_devices}
    assert ranked.keys() == expected.keys()
    for device_id, (value, feature) in expected.items():
        assert ranked[device_id][0] == pytest.approx(value, rel=1e-12)
        assert ranked[device_id][1] == feature
    assert result.devices.evaluated == len(expected)


@pytest.mark.parametrize("shards", [1, 3], ids=["one-writer", "three-workers"])
def test_merged_rollups_equal_the_pooled_sketches_across_boundaries(
    engine: Engine, shards: int
) -> None:
    rng = np.random.default_rng(7)
    reports, sketches = [], {}
    # 20-minute windows from Sunday 22:00 to Tuesday 02:00: hour and day boundaries inside
    # windows too (a window belongs to the hour in which it starts).
    for device in range(5):
        device_id = f"dev-{device}"
        start = T0 - timedelta(hours=2) + timedelta(minutes=7 * device)
        for seq in range(84):
            shift = {"f2": 1.5} if device == 4 and seq >= 40 else None
            sketch = sketch_of(REFERENCE, rng, int(rng.integers(0, 80)), shift)
            reports.append(
                report(device_id, seq, start, sketch, minutes=20, errors=seq % 3, inferences=50)
            )
            sketches[(device_id, seq)] = (start, sketch)
            start += timedelta(minutes=20)
    order = rng.permutation(len(reports))
    shuffled = [reports[i] for i in order]
    # three batches, plus an outbox replaying some, plus a duplicate within a batch
    batches = [shuffled[:150], shuffled[150:300] + shuffled[10:40], shuffled[300:] + shuffled[:5]]
    batches[2].append(batches[2][0])
    assert store(engine, batches, shards=shards) == len(reports)
    assert store(engine, [reports[:50]]) == 0  # redelivered: nothing changes
    with Session(engine) as session:
        written = set(session.execute(select(DriftFleetRollup.shard)).scalars())
    assert written == set(range(shards))  # every worker has fleet rows of its own

    for since, until in (
        (T0 - timedelta(hours=2), T0 + timedelta(hours=26)),  # hours + a day + hours
        (T0, T0 + timedelta(days=1)),  # one day row per device
        (T0 + timedelta(hours=3), T0 + timedelta(hours=5)),  # hours only
        (T0 + timedelta(hours=23), T0 + timedelta(hours=25)),  # over midnight
        # rolling 24 h: device counts are Monday's day row minus its first hour, plus
        # Tuesday 00:00 (count_plan); the rest as in every other range
        (T0 + timedelta(hours=1), T0 + timedelta(hours=25)),
        (T0 - timedelta(hours=2), T0 + timedelta(hours=22)),  # Monday minus its last 2 h
        (T0 + timedelta(hours=12), T0 + timedelta(hours=36)),  # half and half: all hours
    ):
        inside = {
            key: sketch for key, (start, sketch) in sketches.items() if since <= start < until
        }
        result = query(engine, since, until)
        assert (result.since, result.until) == (since, until)
        assert_pooled(result, list(inside.values()))
        by_device: dict[str, list[DriftSketch]] = {}
        for (device_id, _), sketch in inside.items():
            by_device.setdefault(device_id, []).append(sketch)
        assert_devices(result, by_device)
        windows = [r for r in reports if since <= r.window_start < until]
        assert result.sla.windows == len(windows)
        assert result.sla.errors == sum(r.models[0].errors for r in windows)
        assert result.sla.inferences == 50 * len(windows)
        # a list of devices answers from device rows alone, with the same figures
        subset = ["dev-1", "dev-4"]
        scoped = query(engine, since, until, subset)
        assert_pooled(scoped, [s for (d, _), s in inside.items() if d in subset])
        assert scoped.devices.in_scope == 2

    day = query(engine, T0, T0 + timedelta(days=1))
    assert day.rows_read == {"fleet_day": shards, "day": 5}  # a shard's row per worker
    assert day.top_devices[0].device_id == "dev-4" and day.top_devices[0].feature == "f2"


def test_a_device_whose_windows_all_fall_in_the_hours_taken_off_its_day_is_not_counted(
    engine: Engine,
) -> None:
    rng = np.random.default_rng(5)
    early = sketch_of(REFERENCE, rng, 300, {"f1": 2.0})
    later = sketch_of(REFERENCE, rng, 300)
    reports = [
        report("early", 0, T0 + timedelta(minutes=10), early),  # Monday 00:10
        report("later", 0, T0 + timedelta(hours=5), later),
        report("later", 1, T0 + timedelta(hours=24, minutes=30), later),  # Tuesday 00:30
    ]
    assert store(engine, [reports]) == 3
    result = query(engine, T0 + timedelta(hours=1), T0 + timedelta(hours=25))
    assert result.rows_read == {"fleet_hour": 2, "day": 2, "hour": 2}  # Monday - 00:00 + Tue 00:00
    assert result.devices.with_drift_data == 1
    assert_devices(result, {"later": [later, later]})
    assert_pooled(result, [later, later])


def test_fleet_rows_are_the_sum_of_device_rows_and_days_of_hours(engine: Engine) -> None:
    rng = np.random.default_rng(3)
    reports = [
        report(f"d{d}", seq, T0 + timedelta(minutes=50 * seq + d), sketch_of(REFERENCE, rng, 30))
        for d in range(3)
        for seq in range(40)
    ]
    store(engine, [reports[:70], reports[70:]])
    with Session(engine) as session:
        device_rows = session.execute(select(DriftRollup)).scalars().all()
        fleet_rows = session.execute(select(DriftFleetRollup)).scalars().all()

    def counts(row: DriftRollup | DriftFleetRollup) -> list[int]:
        assert row.counts is not None
        return unpack_counts(row.counts, LAYOUT.size).tolist()

    for fleet in fleet_rows:
        parts = [
            r
            for r in device_rows
            if (r.period, r.bucket_start, r.reference_id)
            == (fleet.period, fleet.bucket_start, fleet.reference_id)
        ]
        assert np.sum([counts(r) for r in parts], axis=0).tolist() == counts(fleet)
        assert sum(r.windows for r in parts) == fleet.windows
    for day in (r for r in device_rows if r.period == "day"):
        hours = [
            r
            for r in device_rows
            if r.period == "hour"
            and r.device_id == day.device_id
            and floor_to(r.bucket_start, Period.DAY) == day.bucket_start
        ]
        assert np.sum([counts(r) for r in hours], axis=0).tolist() == counts(day)
        assert sum(r.inferences for r in hours) == day.inferences


def test_a_sketch_that_does_not_fit_its_layout_still_counts_for_the_sla(engine: Engine) -> None:
    rng = np.random.default_rng(0)
    good = sketch_of(REFERENCE, rng, 300)
    bad = good.model_copy(update={"features": good.features[:3]})
    with Session(engine) as session:
        first = add_windows(
            session,
            [
                WindowInput("a", MODEL, 1, T0, 300, 0, [0] * 83, good),
                WindowInput("b", MODEL, 1, T0, 300, 2, [0] * 83, bad),
            ],
        )
        session.commit()
    assert first.refused_sketches and first.refused_sketches[0][0] == "b"
    # through ingestion, the refusal is counted for the device
    late = report("b", 0, T0 + timedelta(minutes=10), bad)
    with Session(engine) as session:
        assert store_reports(session, [late]) == 1
        session.commit()
        drop = session.get(IngestDrop, ("b", "drift_layout"))
        assert drop is not None and drop.count == 1 and "3 features" in drop.last_detail
    result = query(engine, T0, T0 + timedelta(hours=1))
    assert result.sla.windows == 3 and result.sla.errors == 2
    assert result.devices.with_drift_data == 1
    assert_pooled(result, [good])


def test_nothing_in_range_answers_with_empty_figures(engine: Engine) -> None:
    result = query(engine, T0, T0 + timedelta(hours=3))
    assert result.features == [] and result.top_devices == [] and result.predictions is None
    assert result.devices.drifted_share is None and result.sla.p50_ms is None


windows = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.integers(0, 60 * 60),  # start, minutes after T0 - 6h (spans two midnights)
        st.integers(0, 120),  # rows
        st.booleans(),  # drifted
    ),
    min_size=1,
    max_size=25,
)
examples = itertools.count()


@settings(max_examples=12, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(windows, st.integers(0, 60), st.integers(1, 60), st.randoms(use_true_random=False))
def test_any_range_equals_the_pooled_computation(
    engine: Engine, items: list[tuple[str, int, int, bool]], start: int, hours: int, rnd: object
) -> None:
    example = next(examples)
    model = f"m{example}"  # each example its own model and seqs: one database for all
    rng = np.random.default_rng(len(items) * 1000 + start)
    base = T0 - timedelta(hours=6)
    reports, starts = [], {}
    for seq, (device_id, minute, rows, drifted) in enumerate(items):
        moment = base + timedelta(minutes=minute)
        sketch = sketch_of(REFERENCE, rng, rows, {"f1": 2.0} if drifted else None)
        r = report(device_id, 1000 * example + seq, moment, sketch, minutes=5)
        r.models[0].model_name = model  # type: ignore[misc]
        reports.append(r)
        starts[seq] = (moment, sketch)
    cut = rnd.randint(0, len(reports))  # type: ignore[attr-defined]
    store(engine, [reports[:cut], reports[cut // 2 :]])  # overlapping batches: replays
    since = base + timedelta(hours=start)
    until = since + timedelta(hours=hours)
    inside = [s for moment, s in starts.values() if since <= moment < until and s is not None]
    result = query(engine, since, until, model=model)
    if any(sum(f.counts) for s in inside for f in s.features):
        assert_pooled(result, inside)
    else:
        assert result.features == []


def test_timeseries_points_are_the_pooled_figures_of_each_bucket(engine: Engine) -> None:
    rng = np.random.default_rng(5)
    reports, sketches = [], []
    for seq in range(12):
        moment = T0 + timedelta(minutes=25 * seq)
        sketch = sketch_of(REFERENCE, rng, 200, {"f3": 0.2 * seq})
        reports.append(report("x", seq, moment, sketch))
        sketches.append((moment, sketch))
    store(engine, [reports])
    with Session(engine) as session:
        hourly = timeseries_report(
            session,
            reference=REFERENCE,
            model_name=MODEL,
            model_version=1,
            scope=Scope(None, None),
            since=T0,
            until=T0 + timedelta(hours=6),
            features=["f3"],
            bucket="auto",
            thresholds=THRESHOLDS,
        )
    assert hourly.bucket == "hour" and len(hourly.series[0].points) == 6
    for point in hourly.series[0].points:
        inside = [s for m, s in sketches if point.start <= m < point.end]
        if not inside:
            assert point.psi is None and point.n == 0
            continue
        pooled = compare(REFERENCE, merge_sketches(inside))[3]
        assert (point.n, point.psi, point.js_distance, point.ks) == (
            pooled.n,
            pooled.psi,
            pooled.js_distance,
            pooled.ks,
        )
    psis = [p.psi for p in hourly.series[0].points if p.psi is not None]
    assert psis == sorted(psis)  # the drift grows, window after window
