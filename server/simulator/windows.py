"""Telemetry windows of simulated devices, cheap enough for a thousand reports a second.

An agent counts the rows it serves into its drift sketch. A simulated device serves no
rows, so it draws them -- and drawing 64 features per window, counting them with
:class:`shared.drift.DriftAccumulator` and building the report through pydantic costs
milliseconds a report: a thousand devices reporting every second would then need more
cores than the server they are meant to load. So here:

- Rows are drawn once. A :class:`RowPool` holds :data:`POOL_ROWS` rows drawn from the
  reference's training histograms, each feature shifted by its drift, together with
  every value's bin slot (and the predicted value's). Devices with the same reference
  and drift share one pool (:func:`row_pool`).
- A window's drift sketch counts rows resampled from the pool (with replacement) with
  one ``bincount``; its moments are those of the resampled rows, computed as the
  accumulator computes one batch. So a sketch is the real sketch of real rows: counts
  and moments agree with each other and with what the agent's accumulator gives for
  the same rows.
- Sketches are kept, encoded: a pool keeps up to :data:`SKETCHES_PER_SIZE` of them per
  (rows per window, confidence), and once it holds that many a window takes one of
  them at random instead of drawing a new one. Reports therefore still vary from
  window to window and from device to device, and their sum over a fleet still follows
  the drifted distribution, but encoding 64 features' floats (the costliest part) is
  paid a bounded number of times. Latencies and errors are drawn for every window.
- The report is assembled from JSON text in the wire models' field order
  (:func:`encode_report`), with the standard library's encoder for every value.

What always holds: an encoded report parses as :class:`shared.messages.TelemetryReport`
and re-encodes to the same bytes (tests check this; the first report of each layout a
process makes is parsed back at run time, so a contract that moved on fails loudly
rather than sending what the server would drop); no report is larger than
``TelemetryReport.MAX_BYTES``; NaN and infinities are never written.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import AwareDatetime, TypeAdapter

from shared.drift import CONFIDENCE_BINS, DriftReference, FeatureReference
from shared.errors import PayloadTooLargeError
from shared.latency import latency_counts
from shared.messages import Deployment, TelemetryReport

__all__ = [
    "POOL_ROWS",
    "RowPool",
    "RowSampler",
    "WindowMaker",
    "encode_report",
    "row_pool",
    "wire_time",
]

POOL_ROWS = 8192
"""Rows drawn once per (reference, drift); windows resample them."""

SKETCHES_PER_SIZE = 256
"""Encoded sketches a pool keeps per (rows per window, confidence) before it reuses them;
fewer (down to 16) when errors spread the windows over many sizes, so that a pool keeps
about 2,048 in all."""

_SKETCHES_PER_POOL = 2048
_MIN_SKETCHES_PER_SIZE = 16

_MAX_POOLS = 64
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_TIME = TypeAdapter(AwareDatetime)
# what a device's agent process uses, as Resources writes it (every field, in its order)
_RESOURCES = _ENCODER.encode(
    {"rss_bytes": 60 * 2**20, "cpu_seconds": 1.0, "disk_free_bytes": None, "uptime_seconds": None}
)
_EMPTY_MOMENTS = {"n": 0, "mean": 0.0, "m2": 0.0, "min": None, "max": None}

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def wire_time(moment: datetime) -> str:
    """``moment`` as the wire models write it (pydantic's JSON form of an aware datetime)."""
    text: str = _TIME.dump_python(moment, mode="json")
    return text


class RowSampler:
    """Draws feature rows from a drift reference's training histograms (vectorised per feature)."""

    def __init__(
        self, reference: DriftReference, drift: Mapping[str, float], rng: np.random.Generator
    ) -> None:
        self._rng = rng
        self._features = [self._prepare(f, drift.get(f.name, 0.0)) for f in reference.features]
        predictions = reference.predictions
        self.class_probabilities: FloatArray | None = None
        if predictions is not None and predictions.class_counts:
            counts = np.asarray(predictions.class_counts, dtype=np.float64) + 0.5
            self.class_probabilities = counts / counts.sum()
        self.value = (
            None
            if predictions is None or predictions.value is None
            else self._prepare(predictions.value, 0.0)
        )

    @staticmethod
    def _prepare(feature: FeatureReference, shift: float) -> tuple[FloatArray, FloatArray, float]:
        edges = np.asarray(feature.edges, dtype=np.float64)
        # counts layout: [under, bins..., over, nan]; fold under/over into the outer bins
        counts = np.asarray(feature.counts[1:-2], dtype=np.float64)
        counts[0] += feature.counts[0]
        counts[-1] += feature.counts[-2]
        total = counts.sum()
        cdf = np.cumsum(counts) / total if total > 0 else np.linspace(0, 1, len(counts) + 1)[1:]
        spread = feature.moments.std if feature.moments.n > 1 else 0.0
        if not math.isfinite(spread) or spread <= 0:
            spread = float(edges[-1] - edges[0]) / 4 or 1.0
        return edges, cdf, shift * spread

    def _draw(self, prepared: tuple[FloatArray, FloatArray, float], n: int) -> FloatArray:
        edges, cdf, offset = prepared
        bins = np.minimum(np.searchsorted(cdf, self._rng.random(n), side="right"), len(cdf) - 1)
        low, high = edges[bins], edges[np.minimum(bins + 1, len(edges) - 1)]
        values: FloatArray = low + (high - low) * self._rng.random(n) + offset
        return values

    def rows(self, n: int) -> FloatArray:
        if not self._features:
            return np.zeros((n, 0))
        return np.stack([self._draw(f, n) for f in self._features], axis=1)

    def values(self, n: int) -> FloatArray | None:
        return None if self.value is None else self._draw(self.value, n)


def _slots(values: FloatArray, edges: list[float]) -> IntArray:
    """Each finite value's index in a feature's counts ``[under, bins..., over, nan]``."""
    bounds = np.asarray(edges, dtype=np.float64)
    n_bins = len(edges) - 1
    slot = np.minimum(np.searchsorted(bounds, values, side="right"), n_bins + 1)
    slot = np.where(values == bounds[-1], n_bins, slot)  # the last bin holds its upper edge
    result: IntArray = slot.astype(np.int64)
    return result


@dataclass(frozen=True, eq=False)
class RowPool:
    """Rows drawn once from a reference (shifted by a drift), with their count slots."""

    reference_id: str
    names: tuple[str, ...]
    values: FloatArray  # (POOL_ROWS, features)
    slots: IntArray  # (POOL_ROWS, features): index into the flat counts of every feature
    offsets: tuple[int, ...]  # feature j's counts are flat[offsets[j]:offsets[j + 1]]
    class_probabilities: FloatArray | None
    n_classes: int | None
    track_confidence: bool
    predicted_values: FloatArray | None
    predicted_slots: IntArray | None
    predicted_size: int
    sketches: dict[tuple[int, float], list[str]] = field(default_factory=dict)
    """Encoded drift sketches kept, by (rows, confidence)."""

    @classmethod
    def draw(
        cls, reference: DriftReference, drift: Mapping[str, float], seed: int, rows: int
    ) -> RowPool:
        rng = np.random.default_rng(seed)
        sampler = RowSampler(reference, drift, rng)
        values = sampler.rows(rows)
        sizes = [len(f.edges) + 2 for f in reference.features]  # bins + under, over, nan
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        slots = np.empty(values.shape, dtype=np.int64)
        for j, feature in enumerate(reference.features):
            slots[:, j] = _slots(values[:, j], feature.edges) + offsets[j]
        predictions = reference.predictions
        predicted = sampler.values(rows)
        predicted_slots = None
        predicted_size = 0
        if predicted is not None and predictions is not None and predictions.value is not None:
            predicted_slots = _slots(predicted, predictions.value.edges)
            predicted_size = len(predictions.value.edges) + 2
        return cls(
            reference_id=reference.reference_id,
            names=tuple(f.name for f in reference.features),
            values=values,
            slots=slots,
            offsets=tuple(int(o) for o in offsets),
            class_probabilities=sampler.class_probabilities,
            n_classes=(
                None
                if predictions is None or predictions.class_counts is None
                else len(predictions.class_counts)
            ),
            track_confidence=predictions is not None and predictions.confidence_counts is not None,
            predicted_values=predicted,
            predicted_slots=predicted_slots,
            predicted_size=predicted_size,
        )

    @property
    def size(self) -> int:
        return self.offsets[-1]


_pools: OrderedDict[tuple[str, tuple[tuple[str, float], ...]], RowPool] = OrderedDict()
_pools_lock = threading.Lock()


def _drift_key(drift: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted((name, float(shift)) for name, shift in drift.items() if shift))


def row_pool(reference: DriftReference, drift: Mapping[str, float]) -> RowPool:
    """The pool for ``reference`` shifted by ``drift``, drawn on first use and then shared
    (the last :data:`_MAX_POOLS` are kept)."""
    shifts = _drift_key(drift)
    key = (reference.reference_id, shifts)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is not None:
            _pools.move_to_end(key)
            return pool
    digest = hashlib.sha256(repr(key).encode()).digest()
    pool = RowPool.draw(reference, dict(shifts), int.from_bytes(digest[:8], "big"), POOL_ROWS)
    with _pools_lock:
        _pools[key] = pool
        while len(_pools) > _MAX_POOLS:
            _pools.popitem(last=False)
    return pool


class WindowBehaviour(Protocol):
    """What a window reads of a device's :class:`~server.simulator.device.Behaviour`."""

    @property
    def latency_ms(self) -> float: ...
    @property
    def error_rate(self) -> float: ...
    @property
    def confidence(self) -> float: ...
    @property
    def drift(self) -> Mapping[str, float]: ...


class WindowMaker:
    """One active model's share of a device's telemetry windows, as the wire's JSON text.

    The device's behaviour is read at every window (a test may change it while the
    device runs); ``reference`` is None for a bundle without a drift reference.
    """

    def __init__(self, deployment: Deployment, reference: DriftReference | None) -> None:
        self.reference = reference
        self.pool: RowPool | None = None
        self._drift_key: tuple[tuple[str, float], ...] | None = None
        self._head = (
            f'{{"model_name":{_ENCODER.encode(deployment.model_name)},'
            f'"model_version":{_ENCODER.encode(deployment.model_version)},'
            f'"target":{_ENCODER.encode(deployment.target)},'
        )
        self.layout: tuple[object, ...] = (
            deployment.model_name,
            deployment.model_version,
            deployment.target,
            None if reference is None else reference.reference_id,
        )
        """What decides the shape of this model's window on the wire."""

    def window(self, inferences: int, rng: np.random.Generator, behaviour: WindowBehaviour) -> str:
        """One window in which ``inferences`` requests came in (the failed ones apart)."""
        errors = int(rng.binomial(inferences, behaviour.error_rate)) if inferences else 0
        served = inferences - errors  # as the agent counts: served rows; errors apart
        latencies = rng.lognormal(math.log(behaviour.latency_ms), 0.25, size=served)
        histogram = _ENCODER.encode(latency_counts(latencies).tolist())
        drift = "null"
        if self.reference is not None:
            key = _drift_key(behaviour.drift)
            if self.pool is None or key != self._drift_key:
                self.pool, self._drift_key = row_pool(self.reference, behaviour.drift), key
            drift = self._drift(self.pool, served, rng, behaviour.confidence)
        return (
            f'{self._head}"inferences":{served},"errors":{errors},'
            f'"latency_ms":{{"counts":{histogram}}},"drift":{drift}}}'
        )

    def _drift(
        self, pool: RowPool, served: int, rng: np.random.Generator, confidence: float
    ) -> str:
        kept = pool.sketches.setdefault((served, confidence), [])
        enough = min(SKETCHES_PER_SIZE, _SKETCHES_PER_POOL // len(pool.sketches))
        if len(kept) >= max(enough, _MIN_SKETCHES_PER_SIZE):
            return kept[int(rng.integers(len(kept)))]
        rows = rng.integers(0, pool.values.shape[0], size=served)
        sketch = _ENCODER.encode(self.sketch(pool, rows, rng, confidence))
        kept.append(sketch)
        return sketch

    @staticmethod
    def sketch(
        pool: RowPool, rows: IntArray, rng: np.random.Generator, confidence: float = 0.9
    ) -> dict[str, Any]:
        """The drift sketch of the pool's ``rows`` (indices), as the wire's dict; ``rng``
        draws the predictions, whose mean top-class probability is ``confidence``."""
        offsets = pool.offsets
        served = int(rows.size)
        if served:
            flat = np.bincount(pool.slots[rows].ravel(), minlength=pool.size).tolist()
            values = pool.values[rows]
            mean = values.mean(axis=0)
            m2 = np.maximum(((values - mean) ** 2).sum(axis=0), 0.0)
            moments = [
                {"n": served, "mean": mu, "m2": spread, "min": low, "max": high}
                for mu, spread, low, high in zip(
                    mean.tolist(),
                    m2.tolist(),
                    values.min(axis=0).tolist(),
                    values.max(axis=0).tolist(),
                    strict=True,
                )
            ]
        else:
            flat = [0] * pool.size
            moments = [dict(_EMPTY_MOMENTS) for _ in pool.names]
        features = [
            {"name": name, "counts": flat[offsets[j] : offsets[j + 1]], "moments": moments[j]}
            for j, name in enumerate(pool.names)
        ]
        return {
            "reference_id": pool.reference_id,
            "features": features,
            "predictions": _predictions(pool, rows, rng, confidence),
        }


def _predictions(
    pool: RowPool, rows: IntArray, rng: np.random.Generator, confidence: float
) -> dict[str, Any] | None:
    if pool.n_classes is None and not pool.track_confidence and pool.predicted_slots is None:
        return None
    served = rows.size
    class_counts: list[int] | None = None
    confidence_counts: list[int] | None = None
    classes = pool.class_probabilities
    if pool.n_classes is not None:
        class_counts = [0] * pool.n_classes
    if pool.track_confidence:
        confidence_counts = [0] * CONFIDENCE_BINS
    if classes is not None and served:
        k = len(classes)
        if k < 2:  # one class: every row predicts it with certainty
            predicted = np.zeros(served, dtype=np.int64)
            top = np.ones(served)
        else:
            predicted = rng.choice(k, size=served, p=classes)
            mean = min(max(confidence, 1.0 / k + 1e-3), 0.999)
            concentration = 20.0
            top = rng.beta(mean * concentration, (1 - mean) * concentration, size=served)
            top = np.clip(top, 1.0 / k, 1.0)
        if class_counts is not None:
            class_counts = np.bincount(predicted, minlength=len(class_counts)).tolist()
        if confidence_counts is not None:
            index = np.minimum((top * CONFIDENCE_BINS).astype(np.int64), CONFIDENCE_BINS - 1)
            confidence_counts = np.bincount(index, minlength=CONFIDENCE_BINS).tolist()
    value = None
    if pool.predicted_slots is not None and pool.predicted_values is not None:
        if served:
            predicted_values = pool.predicted_values[rows]
            value_mean = float(predicted_values.mean())
            value_moments: dict[str, Any] = {
                "n": served,
                "mean": value_mean,
                "m2": max(float(((predicted_values - value_mean) ** 2).sum()), 0.0),
                "min": float(predicted_values.min()),
                "max": float(predicted_values.max()),
            }
            counts = np.bincount(pool.predicted_slots[rows], minlength=pool.predicted_size).tolist()
        else:
            value_moments = dict(_EMPTY_MOMENTS)
            counts = [0] * pool.predicted_size
        value = {"name": "prediction", "counts": counts, "moments": value_moments}
    return {
        "class_counts": class_counts,
        "confidence_counts": confidence_counts,
        "value": value,
    }


def encode_report(
    device_id: str,
    seq: int,
    window_start: datetime,
    window_end: datetime,
    windows: list[str],
) -> bytes:
    """A :class:`~shared.messages.TelemetryReport` payload from its model windows' JSON
    (:meth:`WindowMaker.window`): byte for byte what ``TelemetryReport(...).to_bytes()``
    gives for the same fields, without building the model."""
    text = (
        f'{{"schema":{_ENCODER.encode(TelemetryReport.SCHEMA)},'
        f'"schema_version":{TelemetryReport.SCHEMA_VERSION},'
        f'"device_id":{_ENCODER.encode(device_id)},"seq":{int(seq)},'
        f'"window_start":{_ENCODER.encode(wire_time(window_start))},'
        f'"window_end":{_ENCODER.encode(wire_time(window_end))},'
        f'"models":[{",".join(windows)}],"resources":{_RESOURCES},"dropped_reports":0}}'
    )
    raw = text.encode("utf-8")
    if len(raw) > TelemetryReport.MAX_BYTES:
        raise PayloadTooLargeError(TelemetryReport.SCHEMA, len(raw), TelemetryReport.MAX_BYTES)
    return raw
