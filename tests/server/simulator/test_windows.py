"""Cheap telemetry windows are still the real thing.

A simulated device builds its reports from a shared pool of drawn rows and kept,
encoded sketches (:mod:`server.simulator.windows`). Pure tests: the reports are valid
``TelemetryReport`` payloads byte for byte as pydantic writes them; a sketch is what the
agent's own :class:`DriftAccumulator` counts for the same rows; drift shows on the
drifted feature only; and windows vary from report to report and device to device.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from server.simulator.device import Behaviour
from server.simulator.windows import (
    POOL_ROWS,
    SKETCHES_PER_SIZE,
    WindowMaker,
    encode_report,
    row_pool,
)
from shared.drift import DriftAccumulator, DriftReference, DriftSketch, compare, merge_sketches
from shared.messages import ArtifactRef, Deployment, TelemetryReport

FEATURES = [f"f{i}" for i in range(5)]
START = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def reference(kind: str, seed: int = 0) -> DriftReference:
    rng = np.random.default_rng(seed)
    train = rng.normal(size=(3000, len(FEATURES))) * [1, 2, 0.5, 3, 1] + [0, 1, -1, 10, 0]
    if kind == "classifier":
        probabilities = rng.dirichlet(np.ones(4), size=len(train))
        return DriftReference.from_data(train, feature_names=FEATURES, probabilities=probabilities)
    if kind == "regressor":
        predicted = train.sum(axis=1) + rng.normal(size=len(train))
        return DriftReference.from_data(train, feature_names=FEATURES, predicted_values=predicted)
    return DriftReference.from_data(train, feature_names=FEATURES, n_bins=6)


def deployment(name: str = "sensor", version: int = 3) -> Deployment:
    return Deployment(
        model_name=name,
        model_version=version,
        target="edge-x86_64-litert",
        artifact=ArtifactRef(sha256="ab" * 32, length=1234),
    )


def maker(ref: DriftReference | None) -> WindowMaker:
    return WindowMaker(deployment(), ref)


def behaviour(drift: dict[str, float] | None = None, error_rate: float = 0.0) -> Behaviour:
    return Behaviour(latency_ms=8.0, error_rate=error_rate, drift=drift or {})


@pytest.mark.parametrize("kind", ["classifier", "regressor", "features-only", "no-reference"])
@pytest.mark.parametrize("inferences", [0, 1, 37])
def test_a_report_is_what_pydantic_writes_for_the_same_fields(kind: str, inferences: int) -> None:
    ref = None if kind == "no-reference" else reference(kind)
    rng = np.random.default_rng(1)
    makers = [(maker(ref), behaviour(error_rate=0.2)), (maker(ref), behaviour({"f1": 2.0}))]
    for seq in range(3):
        windows = [m.window(inferences, rng, b) for m, b in makers]
        end = START + timedelta(seconds=seq + 1, microseconds=123)
        raw = encode_report("sim-0007", seq, START + timedelta(seconds=seq), end, windows)

        report = TelemetryReport.from_bytes(raw)  # validates every field and limit
        assert report.to_bytes() == raw
        assert (report.device_id, report.seq, report.window_end) == ("sim-0007", seq, end)
        for window in report.models:
            assert (window.model_name, window.model_version) == ("sensor", 3)
            assert sum(window.latency_ms.counts) == window.inferences
            assert window.inferences + window.errors == inferences
            if ref is None:
                assert window.drift is None
                continue
            assert window.drift is not None
            assert window.drift.reference_id == ref.reference_id
            for feature in window.drift.features:
                assert sum(feature.counts) == window.inferences == feature.moments.n


@pytest.mark.parametrize("kind", ["classifier", "regressor"])
def test_a_sketch_is_what_the_agents_accumulator_counts_for_the_same_rows(kind: str) -> None:
    """Shifted far enough that rows fall under and over the reference's outer edges."""
    ref = reference(kind)
    pool = row_pool(ref, {"f0": 4.0, "f3": -4.0})
    for rows in (np.arange(POOL_ROWS), np.random.default_rng(2).integers(0, POOL_ROWS, 25)):
        sketch = DriftSketch.model_validate(
            WindowMaker.sketch(pool, rows, np.random.default_rng(3))
        )
        accumulator = DriftAccumulator(ref)
        accumulator.update(
            pool.values[rows],
            predicted_values=None if pool.predicted_values is None else pool.predicted_values[rows],
        )
        expected = accumulator.sketch()
        assert [f.counts for f in sketch.features] == [f.counts for f in expected.features]
        for got, want in zip(sketch.features, expected.features, strict=True):
            assert got.moments.n == want.moments.n
            assert (got.moments.min, got.moments.max) == (want.moments.min, want.moments.max)
            assert got.moments.mean == pytest.approx(want.moments.mean, rel=1e-12, abs=1e-12)
            assert got.moments.m2 == pytest.approx(want.moments.m2, rel=1e-9, abs=1e-12)
        if kind == "regressor":
            assert sketch.predictions is not None and expected.predictions is not None
            assert sketch.predictions.value is not None and expected.predictions.value is not None
            assert sketch.predictions.value.counts == expected.predictions.value.counts
    whole = DriftSketch.model_validate(
        WindowMaker.sketch(pool, np.arange(POOL_ROWS), np.random.default_rng(4))
    )
    f0 = whole.features[0].counts
    assert f0[-2] > POOL_ROWS / 2  # shifted 4 std up: most above the last edge
    assert whole.features[3].counts[0] > POOL_ROWS / 2  # 4 std down: below the first


def merged(
    ref: DriftReference, drift: dict[str, float], rng: np.random.Generator, windows: int, rows: int
) -> DriftSketch:
    m, b = maker(ref), behaviour(drift)
    sketches = []
    for seq in range(windows):
        raw = encode_report("sim-1", seq, START, START, [m.window(rows, rng, b)])
        drift = TelemetryReport.from_bytes(raw).models[0].drift
        assert drift is not None
        sketches.append(drift)
    return merge_sketches(sketches)


def test_drift_shows_on_the_drifted_feature_only() -> None:
    ref = reference("classifier")
    rng = np.random.default_rng(5)
    healthy = {d.name: d.psi for d in compare(ref, merged(ref, {}, rng, 300, 40))}
    drifted = {d.name: d.psi for d in compare(ref, merged(ref, {"f2": 2.0}, rng, 300, 40))}
    assert max(healthy.values()) < 0.05, healthy
    assert drifted["f2"] > 0.25, drifted
    assert max(psi for name, psi in drifted.items() if name != "f2") < 0.05, drifted


def test_windows_vary_between_reports_and_devices_and_kept_sketches_stay_bounded() -> None:
    ref = reference("classifier", seed=9)  # a reference of its own: a pool of its own
    pool = row_pool(ref, {})
    rng_a, rng_b = np.random.default_rng(11), np.random.default_rng(12)
    first, second, healthy = maker(ref), maker(ref), behaviour()
    a = [first.window(20, rng_a, healthy) for _ in range(3 * SKETCHES_PER_SIZE)]
    b = [second.window(20, rng_b, healthy) for _ in range(SKETCHES_PER_SIZE)]
    assert len(set(a)) > 0.95 * len(a)  # latencies and sketches: windows rarely repeat

    def drift_of(window: str) -> str:
        return window.split('"drift":', 1)[1][:-1]

    kept = pool.sketches[(20, 0.9)]
    assert len(kept) == SKETCHES_PER_SIZE  # kept up to the bound, then reused, not grown
    assert len(set(kept)) == SKETCHES_PER_SIZE  # every kept sketch its own draw
    later = [drift_of(w) for w in a[SKETCHES_PER_SIZE:] + b]
    assert set(later) <= set(kept)
    assert len(set(later)) > 0.8 * SKETCHES_PER_SIZE  # picked at random, all of them in use
    assert [drift_of(w) for w in b[:50]] != later[:50]  # devices pick independently
    reports = [
        TelemetryReport.from_bytes(encode_report("sim-2", i, START, START, [w]))
        for i, w in enumerate(a[-50:])
    ]
    assert len({tuple(r.models[0].latency_ms.counts) for r in reports}) > 40


def test_the_devices_behaviour_is_read_at_every_window() -> None:
    """Tests change a running device's behaviour (slow, then fast; drifting, then not)."""
    ref = reference("classifier", seed=3)
    m, rng = maker(ref), np.random.default_rng(6)

    def window(b: Behaviour) -> TelemetryReport:
        return TelemetryReport.from_bytes(
            encode_report("sim-3", 0, START, START, [m.window(400, rng, b)])
        )

    slow = window(Behaviour(latency_ms=200.0)).models[0].latency_ms.counts
    fast = window(Behaviour(latency_ms=2.0)).models[0].latency_ms.counts
    assert np.argmax(slow) > np.argmax(fast) + 10
    assert window(Behaviour(error_rate=1.0)).models[0].errors == 400
    drifted = window(Behaviour(drift={"f4": 5.0})).models[0].drift
    calm = window(Behaviour()).models[0].drift
    assert drifted is not None and calm is not None
    assert drifted.features[4].counts[-2] > 200 > calm.features[4].counts[-2]  # overflow


def test_windows_of_many_sizes_keep_a_bounded_number_of_sketches() -> None:
    """Errors spread windows over many sizes (served rows); the pool keeps fewer per size
    rather than drawing every window afresh or growing without end."""
    ref = reference("classifier", seed=21)
    m, failing, rng = maker(ref), behaviour(error_rate=0.5), np.random.default_rng(22)
    windows = 8000
    for _ in range(windows):
        m.window(200, rng, failing)
    kept = row_pool(ref, {}).sketches
    total = sum(len(k) for k in kept.values())
    assert len(kept) > 20  # served rows ~ Binomial(200, 0.5): many sizes
    assert all(len(k) <= SKETCHES_PER_SIZE for k in kept.values())
    assert total <= 2048 + SKETCHES_PER_SIZE
    assert total < windows / 2  # most windows reused a kept sketch
