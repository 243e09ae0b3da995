"""Drift math: exact counting, exact merging, and the distances on merged counts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shared.drift import (
    CONFIDENCE_BINS,
    DriftAccumulator,
    DriftReference,
    FeatureReference,
    Moments,
    binned_ks,
    chi_squared,
    compare,
    confidence_counts,
    count_bins,
    js_distance,
    merge_moments,
    merge_sketches,
    moments_of,
    psi,
    quantile_edges,
)
from shared.errors import DriftError, MessageError
from shared.latency import N_LATENCY_BUCKETS
from shared.messages import TelemetryReport

RNG = np.random.default_rng(42)
TRAIN = RNG.normal(size=(2000, 4)) * [1, 2, 0.5, 10] + [0, 5, -1, 100]
NAMES = ["vib_x", "vib_y", "temp", "rpm"]
PROBS = RNG.dirichlet(np.ones(3), size=2000)
REFERENCE = DriftReference.from_data(TRAIN, feature_names=NAMES, n_bins=12, probabilities=PROBS)


def brute_force_counts(column: np.ndarray, edges: list[float]) -> list[int]:
    """One value at a time, straight from the layout's definition."""
    k = len(edges) - 1
    counts = [0] * (k + 3)
    for v in column:
        if math.isnan(v):
            counts[k + 2] += 1
        elif v < edges[0]:
            counts[0] += 1
        elif v > edges[-1]:
            counts[k + 1] += 1
        elif v == edges[-1]:
            counts[k] += 1
        else:
            counts[1 + max(i for i in range(k) if edges[i] <= v)] += 1
    return counts


def test_reference_from_training_data() -> None:
    assert [f.name for f in REFERENCE.features] == NAMES
    for j, feature in enumerate(REFERENCE.features):
        assert feature.n_bins == 12
        assert sum(feature.counts) == 2000
        assert feature.counts[0] == feature.counts[-2] == feature.counts[-1] == 0
        # quantile bins hold about the same number of training rows
        assert max(feature.counts[1:-2]) - min(feature.counts[1:-2]) <= 2
        assert feature.moments.n == 2000
        assert feature.moments.mean == pytest.approx(TRAIN[:, j].mean())
        assert feature.moments.std == pytest.approx(TRAIN[:, j].std(ddof=1))
    assert REFERENCE.predictions is not None
    assert sum(REFERENCE.predictions.class_counts or []) == 2000
    assert len(REFERENCE.predictions.confidence_counts or []) == CONFIDENCE_BINS


def test_counting_matches_the_definition_including_edge_cases() -> None:
    edges = [0.0, 1.0, 2.0, 4.0]
    values = np.array([-1, 0, 0.5, 1, 1.999, 2, 3.9, 4, 4.0001, np.inf, -np.inf, np.nan, np.nan])
    counts = count_bins(values[:, None], [edges])[0]
    assert counts.tolist() == brute_force_counts(values, edges) == [2, 2, 2, 3, 2, 2]


@settings(max_examples=80, deadline=None)
@given(
    data=hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 40), st.just(3)),
        elements=st.one_of(
            st.floats(-1e6, 1e6, allow_nan=False),
            st.just(np.nan),
            st.just(np.inf),
            st.sampled_from([0.0, 1.0, 2.0]),
        ),
    )
)
def test_vectorised_counting_equals_brute_force(data: np.ndarray) -> None:
    edges = [[0.0, 1.0, 2.0], [-5.0, 0.0, 5.0, 10.0, 20.0], [3.0, 3.0]]
    counts = count_bins(data, edges)
    for j in range(3):
        assert counts[j].tolist() == brute_force_counts(data[:, j], edges[j])


def test_ties_collapse_bins_and_constant_features_keep_one() -> None:
    assert quantile_edges([1] * 100 + [2], 10) == [1.0, 2.0]
    assert quantile_edges([7, 7, 7], 10) == [7.0, 7.0]
    ref = DriftReference.from_data(np.array([[7.0], [7.0]]), feature_names=["c"])
    assert ref.features[0].counts == [0, 2, 0, 0]
    with pytest.raises(DriftError):
        quantile_edges([np.nan, np.inf], 10)
    with pytest.raises(DriftError):
        quantile_edges([1, 2], 1)


def sketch_of(batch: np.ndarray, probs: np.ndarray | None = None):  # type: ignore[no-untyped-def]
    acc = DriftAccumulator(REFERENCE)
    acc.update(batch, probabilities=probs)
    return acc.sketch()


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 60), min_size=2, max_size=6),
    shift=st.floats(-3, 3),
    seed=st.integers(0, 2**32 - 1),
    order=st.randoms(use_true_random=False),
)
def test_merging_is_order_free_and_equals_pooled_data(sizes, shift, seed, order) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    parts = [TRAIN[rng.integers(0, 2000, n)] + shift for n in sizes]
    probs = [rng.dirichlet(np.ones(3), size=n) for n in sizes]
    pooled = sketch_of(np.vstack(parts), np.vstack(probs))
    sketches = [sketch_of(p, q) for p, q in zip(parts, probs, strict=True)]
    shuffled = list(sketches)
    order.shuffle(shuffled)
    merged = merge_sketches(shuffled)
    # counts: exactly equal, whatever the order or grouping
    assert [f.counts for f in merged.features] == [f.counts for f in pooled.features]
    assert merged.predictions == pooled.predictions
    left = merge_sketches([merge_sketches(shuffled[:1]), merge_sketches(shuffled[1:])])
    assert [f.counts for f in left.features] == [f.counts for f in merged.features]
    # so every distance on merged counts equals the distance on the pooled data
    for a, b in zip(compare(REFERENCE, merged), compare(REFERENCE, pooled), strict=True):
        assert a.psi == b.psi and a.js_distance == b.js_distance and a.ks == b.ks
        assert a.chi_squared == b.chi_squared
    # moments: equal up to floating-point rounding
    for m, p in zip(merged.features, pooled.features, strict=True):
        assert m.moments.n == p.moments.n
        assert m.moments.mean == pytest.approx(p.moments.mean, rel=1e-9, abs=1e-9)
        assert m.moments.m2 == pytest.approx(p.moments.m2, rel=1e-7, abs=1e-6)
        assert (m.moments.min, m.moments.max) == (p.moments.min, p.moments.max)


@given(
    st.lists(st.floats(-1e3, 1e3), min_size=0, max_size=30),
    st.lists(st.floats(-1e3, 1e3), min_size=0, max_size=30),
    st.lists(st.floats(-1e3, 1e3), min_size=0, max_size=30),
)
def test_chan_merge_is_associative_and_matches_numpy(a, b, c) -> None:  # type: ignore[no-untyped-def]
    ma, mb, mc = moments_of(a), moments_of(b), moments_of(c)
    left = merge_moments(merge_moments(ma, mb), mc)
    right = merge_moments(ma, merge_moments(mb, mc))
    pooled = moments_of(a + b + c)
    for m in (left, right):
        assert m.n == pooled.n
        assert m.mean == pytest.approx(pooled.mean, abs=1e-6)
        assert m.m2 == pytest.approx(pooled.m2, rel=1e-6, abs=1e-4)
    assert merge_moments(Moments(), ma) == ma


def test_identical_distributions_have_zero_distance() -> None:
    counts = REFERENCE.features[0].counts
    assert psi(counts, counts) == 0.0
    assert js_distance(counts, counts) == 0.0
    assert binned_ks(counts, counts) == 0.0
    assert chi_squared(counts, counts)[0] == 0.0


def test_distances_on_known_values() -> None:
    e, a = [50, 50], [90, 10]
    expected_psi = (0.9 - 0.5) * math.log(0.9 / 0.5) + (0.1 - 0.5) * math.log(0.1 / 0.5)
    assert psi(e, a) == pytest.approx(expected_psi)
    m = [0.7, 0.3]
    kl = lambda p: sum(pi * math.log2(pi / mi) for pi, mi in zip(p, m, strict=True))  # noqa: E731
    assert js_distance(e, a) == pytest.approx(
        math.sqrt(0.5 * kl([0.5, 0.5]) + 0.5 * kl([0.9, 0.1]))
    )
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)
    statistic, dof = chi_squared(e, a)
    assert dof == 1
    assert statistic == pytest.approx(2 * (20**2 / 70 + 20**2 / 30))  # 2x2 table by hand
    assert binned_ks([1, 1, 0, 0, 0], [0, 0, 1, 1, 0]) == pytest.approx(
        1.0
    )  # last slot (NaN) ignored
    with pytest.raises(DriftError):
        psi([0, 0], [1, 1])
    with pytest.raises(DriftError):
        psi([1, 2], [1, 2, 3])


def test_binned_ks_is_close_to_the_exact_statistic() -> None:
    rng = np.random.default_rng(3)
    live = rng.normal(0.3, 1.2, size=(3000, 1))
    ref = DriftReference.from_data(TRAIN[:, :1], feature_names=["x"], n_bins=20)
    sketch = DriftAccumulator(ref)
    sketch.update(live)
    binned = compare(ref, sketch.sketch())[0].ks
    grid = np.sort(np.concatenate([TRAIN[:, 0], live[:, 0]]))
    exact = np.max(
        np.abs(
            np.searchsorted(np.sort(TRAIN[:, 0]), grid, side="right") / 2000
            - np.searchsorted(np.sort(live[:, 0]), grid, side="right") / 3000
        )
    )
    assert binned <= exact + 1e-12
    assert exact - binned <= 1 / 20 + 0.02  # bounded by about one bin's mass


def test_drifted_features_stand_out() -> None:
    rng = np.random.default_rng(5)
    live = TRAIN[rng.integers(0, 2000, 1500)].copy()
    live[:, 1] = live[:, 1] * 1.8 + 3  # gain change and offset on one sensor
    live[::10, 2] = np.nan  # a flaky sensor
    report = {d.name: d for d in compare(REFERENCE, sketch_of(live))}
    assert report["vib_y"].psi > 0.25 and report["vib_y"].js_distance > 0.1
    assert report["vib_x"].psi < 0.1 and report["rpm"].psi < 0.1
    assert report["temp"].nan_share == pytest.approx(0.1)
    assert report["vib_y"].out_of_range_share > 0.2
    assert report["vib_y"].mean_shift > 1


def test_mismatched_inputs_are_refused() -> None:
    acc = DriftAccumulator(REFERENCE)
    with pytest.raises(DriftError, match="features"):
        acc.update(np.zeros((2, 3)))
    with pytest.raises(DriftError, match="classes"):
        acc.update(np.zeros((2, 4)), probabilities=np.ones((2, 5)) / 5)
    with pytest.raises(DriftError, match="rows"):
        acc.update(np.zeros((2, 4)), probabilities=np.ones((3, 3)) / 3)
    other = DriftReference.from_data(TRAIN * 2, feature_names=NAMES)
    with pytest.raises(DriftError, match="different drift reference"):
        compare(other, sketch_of(TRAIN[:10]))
    with pytest.raises(DriftError, match="different"):
        merge_sketches([sketch_of(TRAIN[:10]), DriftAccumulator(other).sketch()])
    with pytest.raises(DriftError):
        merge_sketches([])


def test_a_single_row_and_reset() -> None:
    acc = DriftAccumulator(REFERENCE)
    acc.update(TRAIN[0], probabilities=PROBS[0])
    assert acc.rows == 1
    acc.reset()
    assert acc.rows == 0 and sum(acc.sketch().features[0].counts) == 0


def test_confidence_histogram() -> None:
    probs = np.array([[1.0, 0.0], [0.55, 0.45], [0.05, 0.95], [np.nan, np.nan]])
    assert confidence_counts(probs).tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 2]


def test_regression_predictions() -> None:
    values = RNG.normal(10, 2, size=2000)
    ref = DriftReference.from_data(TRAIN, feature_names=NAMES, predicted_values=values)
    acc = DriftAccumulator(ref)
    acc.update(TRAIN[:100], predicted_values=values[:100] + 5)
    sketch = acc.sketch()
    assert sketch.predictions is not None and sketch.predictions.value is not None
    assert ref.predictions is not None and ref.predictions.value is not None
    assert psi(ref.predictions.value.counts, sketch.predictions.value.counts) > 1


def test_reference_validation() -> None:
    with pytest.raises(ValueError, match="strictly increase"):
        FeatureReference(name="x", edges=[1, 1, 2], counts=[0] * 5)
    with pytest.raises(ValueError, match="counts"):
        FeatureReference(name="x", edges=[1, 2], counts=[0] * 5)
    with pytest.raises(ValueError, match="unique"):
        DriftReference(features=[REFERENCE.features[0], REFERENCE.features[0]])
    assert (
        REFERENCE.reference_id == DriftReference.model_validate(REFERENCE.model_dump()).reference_id
    )


def test_reference_id_is_carried_and_checked() -> None:
    data = REFERENCE.model_dump(mode="json")
    assert data["reference_id"] == REFERENCE.compute_reference_id()
    assert DriftReference.model_validate(data).reference_id == REFERENCE.reference_id
    data["features"][0]["edges"][1] += 1e-9  # other bins, stale id
    with pytest.raises(ValueError, match="does not match"):
        DriftReference.model_validate(data)
    del data["reference_id"]
    assert DriftReference.model_validate(data).reference_id != REFERENCE.reference_id


@pytest.mark.parametrize("where", [0, 5, -1])
def test_a_negative_count_anywhere_in_a_sketch_is_refused_by_name(where: int) -> None:
    """The checks run in C (``min``) but still see every count, the last one too."""
    accumulator = DriftAccumulator(REFERENCE)
    accumulator.update(TRAIN[:50], probabilities=PROBS[:50])
    sketch = accumulator.sketch().model_dump(mode="json")
    report = {
        "schema": "ef.telemetry",
        "schema_version": 1,
        "device_id": "dev-1",
        "seq": 1,
        "window_start": "2026-11-29T12:00:00Z",
        "window_end": "2026-11-29T12:01:00Z",
        "models": [
            {
                "model_name": "m",
                "model_version": 1,
                "target": "edge",
                "latency_ms": {"counts": [0] * N_LATENCY_BUCKETS},
                "drift": sketch,
            }
        ],
    }
    TelemetryReport.from_dict(report)  # as counted: accepted
    bad_feature = json.loads(json.dumps(report))
    bad_feature["models"][0]["drift"]["features"][2]["counts"][where] = -1
    with pytest.raises(MessageError, match=r"features\.2\.counts: .*counts must not be negative"):
        TelemetryReport.from_dict(bad_feature)
    bad_latency = json.loads(json.dumps(report))
    bad_latency["models"][0]["latency_ms"]["counts"][where] = -3
    with pytest.raises(MessageError, match="latency counts must not be negative"):
        TelemetryReport.from_dict(bad_latency)
