"""Drift counting cost, against a straightforward baseline measured in the same run.

Baseline: per feature, ``np.histogram`` over the reference edges plus separate
under/overflow/NaN counts -- what one would write without the padded-edge trick.
Figures: time to count a batch (rows x 64 features) and to add one row (the
agent's per-inference cost), each as a ratio to the baseline. Lower is better.

    python bench/drift.py [--quick] [--results PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
from results import BenchResults, add_results_argument

from shared.drift import DriftAccumulator, DriftReference, count_bins


def baseline_counts(x: np.ndarray, reference: DriftReference) -> list[np.ndarray]:
    out = []
    for j, feature in enumerate(reference.features):
        column = x[:, j]
        nan = np.isnan(column)
        finite = column[~nan]
        edges = np.asarray(feature.edges)
        inner, _ = np.histogram(finite[(finite >= edges[0]) & (finite <= edges[-1])], bins=edges)
        out.append(
            np.concatenate(
                [[np.sum(finite < edges[0])], inner, [np.sum(finite > edges[-1])], [nan.sum()]]
            )
        )
    return out


def baseline_moments(x: np.ndarray) -> list[tuple[float, float, float, float, int]]:
    out = []
    for j in range(x.shape[1]):
        column = x[:, j][np.isfinite(x[:, j])]
        if column.size:
            out.append((column.mean(), column.var(), column.min(), column.max(), column.size))
    return out


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (CI)")
    add_results_argument(parser)
    args = parser.parse_args()
    repeats = 3 if args.quick else 15
    rng = np.random.default_rng(0)
    train = rng.normal(size=(5000, 64))
    reference = DriftReference.from_data(
        train, feature_names=[f"f{i}" for i in range(64)], n_bins=10
    )
    batch = rng.normal(0.2, 1.1, size=(4096, 64))
    batch[::50, 3] = np.nan

    acc = DriftAccumulator(reference)
    acc.update(batch)
    ours = [f.counts for f in acc.sketch().features]
    assert ours == [c.tolist() for c in baseline_counts(batch, reference)], "counts differ"

    edges = [f.edges for f in reference.features]
    counts_ours = best_of(lambda: count_bins(batch, edges), repeats)
    counts_base = best_of(lambda: baseline_counts(batch, reference), repeats)
    batch_ours = best_of(lambda: DriftAccumulator(reference).update(batch), repeats)
    batch_base = best_of(
        lambda: (baseline_counts(batch, reference), baseline_moments(batch)), repeats
    )
    rows = batch[:500]
    acc = DriftAccumulator(reference)

    def per_row_ours() -> None:
        for row in rows:
            acc.update(row)

    def per_row_base() -> None:
        for row in rows:
            baseline_counts(row[None, :], reference)
            baseline_moments(row[None, :])

    row_ours = best_of(per_row_ours, repeats) / len(rows)
    row_base = best_of(per_row_base, repeats) / len(rows)
    results = BenchResults("drift", quick=args.quick, path=args.results)
    results.note(
        f"drift counting, 64 features x 10 bins, median of {repeats} repeats; "
        "baseline: per-feature np.histogram + separate under/overflow/NaN counts"
    )
    for name, ours_s, base_s, unit, scale in (
        ("bin counts, 4096 x 64 batch", counts_ours, counts_base, "ms", 1e3),
        ("counts + moments, 4096 x 64 batch", batch_ours, batch_base, "ms", 1e3),
        ("counts + moments, one row of 64", row_ours, row_base, "us", 1e6),
    ):
        results.add(
            name,
            ours_s * scale,
            unit,
            baseline=base_s * scale,
            baseline_text=f"{base_s * scale:.1f} {unit} (per-feature numpy)",
            value_text=f"{ours_s * scale:.1f} {unit}",
            ratio=ours_s / base_s,
            goal="lower is better",
        )
    results.finish()


if __name__ == "__main__":
    main()
