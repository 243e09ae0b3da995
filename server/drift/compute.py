"""The fleet drift and SLA figures, computed from summed rollup counts.

Pure: arrays and a :class:`~shared.drift.DriftReference` in, a
:class:`~server.drift.report.DriftReport` out; no clock, no I/O. The database side
(:mod:`server.drift.storage`) hands over counts already added up.

What always holds:

- Scope-wide figures come from one merged sketch and :func:`shared.drift.compare`, so
  they equal what the same functions give on the pooled raw data.
- A device's figures come from its *own* merged counts over the range. A feature of a
  device counts toward the device shares only with at least ``min_samples`` values;
  a device with no such feature is not evaluated (neither drifted nor fine).
- Per-device PSI is computed for all devices at once on padded arrays, with the same
  floor (:data:`shared.drift.PSI_EPSILON`) as :func:`shared.drift.psi`; padding slots
  add exactly zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import numpy.typing as npt

from server.drift.layout import Layout
from server.drift.report import (
    DeviceDrift,
    DeviceSummary,
    DistributionShift,
    FeatureDrift,
    FeatureSeries,
    PredictionShift,
    SeriesPoint,
    SlaSummary,
    Thresholds,
)
from shared.drift import (
    PSI_EPSILON,
    DriftReference,
    binned_ks,
    compare,
    js_distance,
    psi,
)
from shared.latency import LATENCY_BOUNDS_MS, latency_quantile

__all__ = [
    "DevicePsi",
    "Sums",
    "device_psi",
    "device_summary",
    "feature_drift",
    "prediction_shift",
    "series",
    "sla_summary",
    "top_devices",
]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


@dataclass
class Sums:
    """Everything one scope reported in a range, added up."""

    windows: int
    inferences: int
    errors: int
    latency: IntArray
    counts: IntArray | None = None
    """Drift counts in the layout (None: no window carried a sketch)."""
    moments: FloatArray | None = None


# ----------------------------------------------------------------------------- per device


@dataclass(frozen=True)
class DevicePsi:
    """Per device and feature: PSI against the reference, and how many values it saw."""

    device_ids: list[str]
    psi: FloatArray
    """(devices, features)"""
    n: IntArray
    """(devices, features)"""


def _reference_matrix(reference: DriftReference, layout: Layout) -> tuple[IntArray, FloatArray]:
    """Gather indices (features, slots) into a counts row, and the floored reference shares."""
    width = max(slots for _, slots in layout.features)
    index = np.full((layout.n_features, width), layout.size, dtype=np.int64)  # pad: a zero column
    expected = np.full((layout.n_features, width), PSI_EPSILON)
    for j, feature in enumerate(reference.features):
        part = layout.feature_slice(j)
        slots = part.stop - part.start
        index[j, :slots] = np.arange(part.start, part.stop)
        counts = np.asarray(feature.counts, dtype=np.float64)
        total = counts.sum()
        if total > 0:
            expected[j, :slots] = np.maximum(counts / total, PSI_EPSILON)
    return index, expected


def device_psi(
    reference: DriftReference, layout: Layout, device_ids: list[str], counts: IntArray
) -> DevicePsi:
    """PSI of every device's counts on every feature, computed in one go."""
    n_devices = counts.shape[0]
    if n_devices == 0:
        empty = np.zeros((0, layout.n_features))
        return DevicePsi([], empty, empty.astype(np.int64))
    index, expected = _reference_matrix(reference, layout)
    padded = np.concatenate([counts, np.zeros((n_devices, 1), dtype=np.int64)], axis=1)
    live = padded[:, index].astype(np.float64)  # (devices, features, slots)
    totals = live.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = live / np.where(totals > 0, totals, 1.0)[:, :, None]
    shares = np.maximum(shares, PSI_EPSILON)
    values = np.sum((shares - expected) * np.log(shares / expected), axis=2)
    values = np.where(totals > 0, values, 0.0)
    return DevicePsi(device_ids, values, totals.astype(np.int64))


def device_summary(
    scores: DevicePsi, thresholds: Thresholds, *, in_scope: int | None
) -> tuple[DeviceSummary, FloatArray | None, FloatArray | None]:
    """The device counts and shares, plus per feature the shares of devices at act / warn."""
    enough = scores.n >= thresholds.min_samples
    evaluated = enough.any(axis=1)
    masked = np.where(enough, scores.psi, -np.inf)
    worst = masked.max(axis=1) if masked.size else np.zeros(0)
    act = int(np.sum(evaluated & (worst >= thresholds.act)))
    warn = int(np.sum(evaluated & (worst >= thresholds.warn) & (worst < thresholds.act)))
    n_evaluated = int(evaluated.sum())
    feature_act = feature_warn = None
    if n_evaluated:
        judged = enough.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            feature_act = np.where(
                judged > 0, (enough & (scores.psi >= thresholds.act)).sum(axis=0) / judged, np.nan
            )
            feature_warn = np.where(
                judged > 0, (enough & (scores.psi >= thresholds.warn)).sum(axis=0) / judged, np.nan
            )
    summary = DeviceSummary(
        in_scope=in_scope,
        with_drift_data=int((scores.n.sum(axis=1) > 0).sum()) if scores.n.size else 0,
        evaluated=n_evaluated,
        act=act,
        warn=warn,
        drifted_share=act / n_evaluated if n_evaluated else None,
        warning_share=(act + warn) / n_evaluated if n_evaluated else None,
    )
    return summary, feature_act, feature_warn


def top_devices(
    scores: DevicePsi, names: list[str], thresholds: Thresholds, limit: int
) -> list[DeviceDrift]:
    """Evaluated devices by their largest PSI, largest first (ties by device id)."""
    enough = scores.n >= thresholds.min_samples
    evaluated = np.flatnonzero(enough.any(axis=1))
    if evaluated.size == 0 or limit <= 0:
        return []
    masked = np.where(enough[evaluated], scores.psi[evaluated], -np.inf)
    worst = masked.max(axis=1)
    # lexsort: last key first -- largest PSI first, then device id
    ids = np.asarray(scores.device_ids, dtype=object)[evaluated]
    order = np.lexsort((ids, -worst))[:limit]
    out = []
    for i in order:
        row = masked[i]
        j = int(np.argmax(row))
        out.append(
            DeviceDrift(
                device_id=str(ids[i]),
                n=int(scores.n[evaluated[i]].max()),
                psi=float(worst[i]),
                feature=names[j],
                level=thresholds.level(float(worst[i])),
                features_act=int(np.sum(row >= thresholds.act)),
                features_warn=int(np.sum(row >= thresholds.warn)),
            )
        )
    return out


# ----------------------------------------------------------------------------- scope-wide


def feature_drift(
    reference: DriftReference,
    layout: Layout,
    counts: IntArray,
    moments: FloatArray,
    thresholds: Thresholds,
    *,
    devices_act: FloatArray | None = None,
    devices_warn: FloatArray | None = None,
) -> list[FeatureDrift]:
    """Every feature with values, from the merged counts, through :func:`shared.drift.compare`."""
    sketch = layout.to_sketch(reference.reference_id, counts, moments)
    index = {name: j for j, name in enumerate(layout.names)}

    def share(values: FloatArray | None, j: int) -> float | None:
        if values is None or np.isnan(values[j]):
            return None
        return float(values[j])

    return [
        FeatureDrift(
            name=d.name,
            n=d.n,
            psi=d.psi,
            js_distance=d.js_distance,
            ks=d.ks,
            chi_squared=d.chi_squared,
            degrees_of_freedom=d.degrees_of_freedom,
            nan_share=d.nan_share,
            out_of_range_share=d.out_of_range_share,
            mean_shift=d.mean_shift,
            level=thresholds.level(d.psi),
            devices_act_share=share(devices_act, index[d.name]),
            devices_warn_share=share(devices_warn, index[d.name]),
        )
        for d in compare(reference, sketch)
    ]


def _shift(
    expected: Sequence[int] | None, live: IntArray | None, thresholds: Thresholds
) -> DistributionShift | None:
    if expected is None or live is None:
        return None
    e = np.asarray(expected, dtype=np.int64)
    if e.sum() <= 0 or live.sum() <= 0 or e.size != live.size:
        return None
    value = psi(e, live)
    return DistributionShift(
        n=int(live.sum()),
        psi=value,
        js_distance=js_distance(e, live),
        level=thresholds.level(value),
        reference=(e / e.sum()).tolist(),
        live=(live / live.sum()).tolist(),
    )


def prediction_shift(
    reference: DriftReference, layout: Layout, counts: IntArray, thresholds: Thresholds
) -> PredictionShift | None:
    """The model's outputs against the reference's: classes, confidence, predicted value."""
    p = reference.predictions
    if p is None:
        return None

    def part(where: slice | None) -> IntArray | None:
        return None if where is None else counts[where]

    return PredictionShift(
        classes=_shift(p.class_counts, part(layout.class_slice), thresholds),
        confidence=_shift(p.confidence_counts, part(layout.confidence_slice), thresholds),
        value=_shift(
            None if p.value is None else p.value.counts, part(layout.value_slice), thresholds
        ),
    )


def sla_summary(sums: Sums) -> SlaSummary:
    def quantile(q: float) -> float | None:
        value = latency_quantile(sums.latency, q)
        return None if value is None or not np.isfinite(value) else value

    attempts = sums.inferences + sums.errors
    return SlaSummary(
        windows=sums.windows,
        inferences=sums.inferences,
        errors=sums.errors,
        error_rate=sums.errors / attempts if attempts else None,
        p50_ms=quantile(0.5),
        p95_ms=quantile(0.95),
        p99_ms=quantile(0.99),
        over_max=int(sums.latency[len(LATENCY_BOUNDS_MS)]),
    )


# ----------------------------------------------------------------------------- time series


def series(
    reference: DriftReference,
    layout: Layout,
    features: Sequence[str],
    buckets: Sequence[tuple[datetime, datetime, IntArray | None]],
    thresholds: Thresholds,
) -> list[FeatureSeries]:
    """Per feature, PSI / JS / KS of each bucket's merged counts (null where it has none)."""
    index = {name: j for j, name in enumerate(layout.names)}
    out = []
    for name in features:
        j = index[name]
        ref = np.asarray(reference.features[j].counts, dtype=np.int64)
        points = []
        for start, end, counts in buckets:
            live = None if counts is None else counts[layout.feature_slice(j)]
            n = 0 if live is None else int(live.sum())
            if live is None or n == 0:
                points.append(
                    SeriesPoint(
                        start=start, end=end, n=0, psi=None, js_distance=None, ks=None, level=None
                    )
                )
                continue
            value = psi(ref, live)
            points.append(
                SeriesPoint(
                    start=start,
                    end=end,
                    n=n,
                    psi=value,
                    js_distance=js_distance(ref, live),
                    ks=binned_ks(ref, live) if live[:-1].sum() else 0.0,
                    level=thresholds.level(value),
                )
            )
        out.append(FeatureSeries(feature=name, points=points))
    return out
