"""Fixed log-scale latency buckets, shared by every device so histograms merge by addition.

Bucket ``i`` counts latencies ``<= LATENCY_BOUNDS_MS[i]`` (and above the previous
bound); one extra last bucket counts everything above the largest bound. Bounds
grow by ``2 ** 0.25`` (about 19 %) from 0.05 ms to about 60 s, so a percentile read
from a histogram is within one bucket (at most 19 %) of the exact value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["LATENCY_BOUNDS_MS", "N_LATENCY_BUCKETS", "latency_counts", "latency_quantile"]

LATENCY_BOUNDS_MS: tuple[float, ...] = tuple(round(0.05 * 2 ** (i / 4), 6) for i in range(82))
N_LATENCY_BUCKETS = len(LATENCY_BOUNDS_MS) + 1
_BOUNDS = np.asarray(LATENCY_BOUNDS_MS)


def latency_counts(latencies_ms: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Histogram of latencies (milliseconds) over the fixed buckets."""
    values = np.asarray(latencies_ms, dtype=np.float64).reshape(-1)
    index = np.searchsorted(_BOUNDS, values, side="left")
    return np.bincount(index, minlength=N_LATENCY_BUCKETS).astype(np.int64)


def latency_quantile(counts: Sequence[int] | npt.NDArray[np.int64], q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` (0..1); None for an empty histogram.

    The overflow bucket reports ``inf``: the latency is known only to exceed the
    largest bound.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile must be within [0, 1], not {q}")
    c = np.asarray(counts, dtype=np.int64)
    if c.size != N_LATENCY_BUCKETS:
        raise ValueError(f"a latency histogram has {N_LATENCY_BUCKETS} buckets, not {c.size}")
    total = int(c.sum())
    if total == 0:
        return None
    rank = max(1, int(np.ceil(q * total)))
    index = int(np.searchsorted(np.cumsum(c), rank, side="left"))
    return float("inf") if index >= len(LATENCY_BOUNDS_MS) else LATENCY_BOUNDS_MS[index]
