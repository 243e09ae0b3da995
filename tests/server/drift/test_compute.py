"""The figures from summed counts: per-device PSI as shared computes it, device shares with a
sample floor, the ranking, prediction shift and the SLA summary."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from server.drift.compute import (
    DevicePsi,
    Sums,
    device_psi,
    device_summary,
    prediction_shift,
    sla_summary,
    top_devices,
)
from server.drift.layout import Layout
from server.drift.report import Level, Thresholds
from shared.drift import DriftAccumulator, DriftReference, psi
from shared.latency import N_LATENCY_BUCKETS, latency_counts
from tests.server.drift.conftest import make_reference, sketch_of

REFERENCE = make_reference(n_bins=6)
LAYOUT = Layout.of_reference(REFERENCE)


@given(
    hnp.arrays(
        np.int64, st.tuples(st.integers(1, 6), st.just(LAYOUT.size)), elements=st.integers(0, 10**6)
    )
)
def test_device_psi_is_shared_psi_for_every_device_and_feature(counts: np.ndarray) -> None:
    ids = [f"d{i}" for i in range(counts.shape[0])]
    scores = device_psi(REFERENCE, LAYOUT, ids, counts)
    for i in range(counts.shape[0]):
        for j, feature in enumerate(REFERENCE.features):
            live = counts[i, LAYOUT.feature_slice(j)]
            assert scores.n[i, j] == live.sum()
            if live.sum() == 0:
                assert scores.psi[i, j] == 0.0
            else:
                assert scores.psi[i, j] == pytest.approx(
                    psi(feature.counts, live), rel=1e-12, abs=1e-15
                )


def scores_of(psi_rows: list[list[float]], n_rows: list[list[int]]) -> DevicePsi:
    return DevicePsi(
        [f"d{i}" for i in range(len(psi_rows))],
        np.asarray(psi_rows, dtype=np.float64),
        np.asarray(n_rows, dtype=np.int64),
    )


def test_a_device_with_a_few_rows_is_not_drifted() -> None:
    thresholds = Thresholds(min_samples=100)
    scores = scores_of(
        [[9.0, 0.0], [0.3, 0.0], [0.12, 0.05], [0.0, 0.01], [5.0, 5.0]],
        [[3, 3], [500, 500], [500, 500], [500, 500], [0, 0]],
    )
    summary, act, warn = device_summary(scores, thresholds, in_scope=6)
    assert (summary.in_scope, summary.with_drift_data, summary.evaluated) == (6, 4, 3)
    assert (summary.act, summary.warn) == (1, 1)
    assert summary.drifted_share == pytest.approx(1 / 3)
    assert summary.warning_share == pytest.approx(2 / 3)
    assert act is not None and warn is not None
    assert act.tolist() == pytest.approx([1 / 3, 0.0])
    assert warn.tolist() == pytest.approx([2 / 3, 0.0])
    ranked = top_devices(scores, ["a", "b"], thresholds, limit=10)
    assert [(d.device_id, d.feature, d.level) for d in ranked] == [
        ("d1", "a", Level.ACT),
        ("d2", "a", Level.WARN),
        ("d3", "b", Level.OK),
    ]
    assert top_devices(scores, ["a", "b"], thresholds, limit=1)[0].device_id == "d1"


def test_no_evaluated_device_means_no_share() -> None:
    summary, act, warn = device_summary(
        scores_of([[1.0]], [[2]]), Thresholds(min_samples=10), in_scope=None
    )
    assert (summary.evaluated, summary.drifted_share, act, warn) == (0, None, None, None)


def test_prediction_shift_compares_classes_and_confidence() -> None:
    rng = np.random.default_rng(0)
    counts, _ = LAYOUT.flatten(sketch_of(REFERENCE, rng, 3000))
    shift = prediction_shift(REFERENCE, LAYOUT, counts, Thresholds())
    assert shift is not None and shift.classes is not None and shift.confidence is not None
    assert shift.classes.level is Level.OK and shift.classes.n == 3000
    assert sum(shift.classes.live) == pytest.approx(1.0)
    assert shift.value is None
    skewed = counts.copy()
    assert LAYOUT.class_slice is not None
    skewed[LAYOUT.class_slice] = [2900, 50, 50]
    lopsided = prediction_shift(REFERENCE, LAYOUT, skewed, Thresholds())
    assert lopsided is not None and lopsided.classes is not None
    assert lopsided.classes.level is Level.ACT


def test_sla_summary() -> None:
    latency = latency_counts([1.0] * 90 + [20.0] * 9 + [1e9])
    summary = sla_summary(Sums(windows=3, inferences=100, errors=25, latency=latency))
    assert summary.error_rate == pytest.approx(0.2)
    assert summary.p50_ms is not None and 1.0 <= summary.p50_ms < 1.2
    assert summary.p95_ms is not None and 20.0 <= summary.p95_ms < 24
    assert summary.p99_ms is not None and summary.over_max == 1
    empty = sla_summary(
        Sums(windows=0, inferences=0, errors=0, latency=np.zeros(N_LATENCY_BUCKETS, np.int64))
    )
    assert (empty.error_rate, empty.p50_ms, empty.over_max) == (None, None, 0)


def test_a_regressions_predicted_values_are_compared_too() -> None:
    rng = np.random.default_rng(4)
    train = rng.normal(size=(3000, 2))
    reference = DriftReference.from_data(
        train, feature_names=["a", "b"], predicted_values=train.sum(axis=1)
    )
    layout = Layout.of_reference(reference)
    assert layout.value_slots is not None and layout.class_slice is None
    live = rng.normal(size=(2000, 2))
    accumulator = DriftAccumulator(reference)
    accumulator.update(live, predicted_values=live.sum(axis=1) + 2.0)
    counts, moments = layout.flatten(accumulator.sketch())
    assert moments[-1][0] == 2000  # the predicted value's moments ride along
    shift = prediction_shift(reference, layout, counts, Thresholds())
    assert shift is not None and shift.classes is None and shift.confidence is None
    assert shift.value is not None and shift.value.level is Level.ACT
