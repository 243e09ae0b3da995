from __future__ import annotations

import numpy as np
import pytest

from shared.latency import LATENCY_BOUNDS_MS, N_LATENCY_BUCKETS, latency_counts, latency_quantile


def test_buckets_are_log_spaced_and_cover_a_minute() -> None:
    ratios = np.diff(np.log2(LATENCY_BOUNDS_MS))
    assert np.allclose(ratios, 0.25, atol=1e-4)
    assert LATENCY_BOUNDS_MS[0] == 0.05 and LATENCY_BOUNDS_MS[-1] > 60_000


def test_quantiles_are_within_one_bucket_of_exact() -> None:
    values = np.random.default_rng(0).lognormal(1.0, 0.8, size=20_000)
    counts = latency_counts(values)
    assert counts.sum() == values.size and counts.size == N_LATENCY_BUCKETS
    for q in (0.5, 0.95, 0.99):
        exact = float(np.quantile(values, q))
        estimate = latency_quantile(counts, q)
        assert estimate is not None
        assert exact <= estimate <= exact * 2**0.25 * 1.001


def test_merging_histograms_is_addition() -> None:
    a, b = np.array([1.0, 2.0, 500.0]), np.array([0.01, 70_000.0])
    assert (latency_counts(a) + latency_counts(b)).tolist() == latency_counts(np.r_[a, b]).tolist()
    assert latency_quantile(latency_counts(b), 1.0) == float("inf")
    assert latency_quantile(latency_counts(b), 0.0) == LATENCY_BOUNDS_MS[0]


def test_empty_and_invalid() -> None:
    assert latency_quantile([0] * N_LATENCY_BUCKETS, 0.5) is None
    with pytest.raises(ValueError):
        latency_quantile([0] * 3, 0.5)
    with pytest.raises(ValueError):
        latency_quantile([0] * N_LATENCY_BUCKETS, 1.5)
