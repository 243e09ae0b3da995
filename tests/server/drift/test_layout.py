"""Packing and merging rollup arrays: lossless at every width, moments as shared's Chan."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from server.drift.layout import (
    Layout,
    LayoutError,
    merge_moment_pair,
    merge_moment_stack,
    moments_array,
    pack_counts,
    pack_moments,
    unpack_counts,
    unpack_counts_many,
    unpack_moments,
)
from shared.drift import DriftSketch, FeatureSketch, merge_moments, merge_sketches, moments_of
from tests.server.drift.conftest import make_reference, sketch_of

REFERENCE = make_reference()
LAYOUT = Layout.of_reference(REFERENCE)

any_count = st.one_of(st.integers(0, 300), st.integers(0, 2**31 + 5), st.integers(2**40, 2**62))
counts_arrays = hnp.arrays(np.int64, st.integers(1, 40), elements=any_count)


@given(counts_arrays)
def test_counts_round_trip_at_the_narrowest_width(counts: np.ndarray) -> None:
    blob = pack_counts(counts)
    width = len(blob) // counts.size
    largest = int(counts.max())
    assert width == (2 if largest < 2**15 else 4 if largest < 2**31 else 8)
    assert unpack_counts(blob, counts.size).tolist() == counts.tolist()


@given(st.lists(hnp.arrays(np.int64, 7, elements=any_count), min_size=1, max_size=6))
def test_mixed_widths_decode_together(parts: list[np.ndarray]) -> None:
    decoded = unpack_counts_many([pack_counts(p) for p in parts], 7)
    assert decoded.tolist() == [p.tolist() for p in parts]


def test_bad_blobs_and_negative_counts_are_refused() -> None:
    with pytest.raises(LayoutError, match="does not hold 4 counts"):
        unpack_counts(b"\x00" * 12, 4)
    with pytest.raises(LayoutError, match="negative"):
        pack_counts(np.asarray([1, -1]))
    with pytest.raises(LayoutError, match="does not hold 2 rows"):
        unpack_moments(b"\x00" * 8, 2)


def test_a_sketch_flattens_and_comes_back_the_same() -> None:
    sketch = sketch_of(REFERENCE, np.random.default_rng(1), 500)
    counts, moments = LAYOUT.flatten(sketch)
    assert counts.shape == (LAYOUT.size,)
    back = LAYOUT.to_sketch(REFERENCE.reference_id, counts, moments)
    assert back == sketch
    assert Layout.from_json(LAYOUT.to_json()) == LAYOUT == Layout.of_sketch(sketch)
    assert unpack_moments(pack_moments(moments), LAYOUT.moment_rows).tolist() == moments.tolist()


def test_sketches_that_do_not_fit_the_layout_are_refused() -> None:
    sketch = sketch_of(REFERENCE, np.random.default_rng(1), 50)
    other = sketch.features[0].model_copy(update={"name": "other"})
    renamed = sketch.model_copy(update={"features": [other, *sketch.features[1:]]})
    with pytest.raises(LayoutError, match="feature 0 is 'other'"):
        LAYOUT.flatten(renamed)
    with pytest.raises(LayoutError, match="4 features, the layout 5"):
        LAYOUT.flatten(sketch.model_copy(update={"features": sketch.features[:4]}))
    short = FeatureSketch(name="f1", counts=[1, 2, 3])
    with pytest.raises(LayoutError, match="'f1' with 3 counts"):
        LAYOUT.flatten(
            sketch.model_copy(
                update={"features": [sketch.features[0], short, *sketch.features[2:]]}
            )
        )


def test_a_sketch_without_predictions_counts_none() -> None:
    sketch = sketch_of(REFERENCE, np.random.default_rng(1), 50)
    bare = DriftSketch(reference_id=sketch.reference_id, features=sketch.features)
    counts, _ = LAYOUT.flatten(bare)
    assert LAYOUT.class_slice is not None
    assert counts[LAYOUT.class_slice].sum() == 0
    assert (
        counts[: LAYOUT.feature_size].tolist()
        == LAYOUT.flatten(sketch)[0][: LAYOUT.feature_size].tolist()
    )


finite = st.floats(-1e6, 1e6, allow_nan=False)


@given(st.lists(st.lists(finite, max_size=30), min_size=1, max_size=8))
def test_moments_merge_as_shared_does(samples: list[list[float]]) -> None:
    parts = [moments_of(np.asarray(s)) for s in samples]
    arrays = [moments_array([m]) for m in parts]
    # pairwise: bit for bit shared.drift.merge_moments
    expected, merged = parts[0], arrays[0]
    for m, a in zip(parts[1:], arrays[1:], strict=True):
        expected = merge_moments(expected, m)
        merged = merge_moment_pair(merged, a)
    assert merged.tolist() == moments_array([expected]).tolist()
    # k-way: the pooled sample's moments
    pooled = moments_of(np.concatenate([np.asarray(s) for s in samples]))
    stacked = merge_moment_stack(np.stack(arrays))[0]
    assert stacked[0] == pooled.n
    if pooled.n:
        scale = max(1.0, abs(pooled.mean))
        assert stacked[1] == pytest.approx(pooled.mean, rel=1e-9, abs=1e-9 * scale)
        assert stacked[2] == pytest.approx(pooled.m2, rel=1e-7, abs=1e-6 * scale**2)
        assert (stacked[3], stacked[4]) == (pooled.min, pooled.max)


def test_flattened_counts_add_up_to_merged_sketches() -> None:
    rng = np.random.default_rng(3)
    sketches = [sketch_of(REFERENCE, rng, n) for n in (0, 10, 400, 3)]
    total = sum(LAYOUT.flatten(s)[0] for s in sketches)
    moments = merge_moment_stack(np.stack([LAYOUT.flatten(s)[1] for s in sketches]))
    merged = merge_sketches(sketches)
    assert LAYOUT.flatten(merged)[0].tolist() == total.tolist()
    back = LAYOUT.to_sketch(REFERENCE.reference_id, total, moments)
    for ours, theirs in zip(back.features, merged.features, strict=True):
        assert ours.counts == theirs.counts
        assert ours.moments.n == theirs.moments.n
        assert ours.moments.mean == pytest.approx(theirs.moments.mean, rel=1e-12, abs=1e-12)
