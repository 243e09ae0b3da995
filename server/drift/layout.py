"""The packed form of drift counts and moments: one flat array per rollup row.

A :class:`Layout` says where each part of a drift reference's counts sits in one flat
integer array: every feature's ``[under, bins..., over, nan]`` in reference order,
then the predicted-class counts, the confidence histogram and the predicted-value
counts (each only when the reference has it). Moments are a float array with one
row ``(n, mean, m2, min, max)`` per feature (and one for the predicted value).

What always holds:

- Pure: arrays and bytes in, arrays and bytes out; no clock, no I/O.
- Packing is lossless: counts are stored as little-endian int16, int32 or int64, the
  narrowest that holds every value (the blob's length says which); moments as
  little-endian float64.
- Moments merge with Chan's parallel formula (:func:`merge_moment_pair`, bit for bit
  what :func:`shared.drift.merge_moments` computes) or its k-way form
  (:func:`merge_moment_stack`), so merged moments equal the pooled sample's up to
  floating-point rounding; counts merge by exact integer addition.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from shared.drift import (
    DriftReference,
    DriftSketch,
    FeatureSketch,
    Moments,
    PredictionSketch,
)

__all__ = [
    "EMPTY_MOMENT",
    "Layout",
    "LayoutError",
    "SketchParts",
    "merge_moment_pair",
    "merge_moment_stack",
    "moments_array",
    "pack_counts",
    "pack_counts_many",
    "pack_moments",
    "pack_moments_many",
    "unpack_counts",
    "unpack_counts_many",
    "unpack_moments",
    "unpack_moments_many",
]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

EMPTY_MOMENT = (0.0, 0.0, 0.0, np.inf, -np.inf)
"""``(n, mean, m2, min, max)`` of no values: min and max start where any value beats them."""


class SketchParts(Protocol):
    """A drift sketch's numbers as arrays (:class:`server.ingest.reports.SketchArrays`)."""

    @property
    def features(self) -> tuple[tuple[str, int], ...]: ...
    @property
    def counts(self) -> IntArray: ...
    @property
    def moments(self) -> FloatArray: ...
    @property
    def class_counts(self) -> IntArray | None: ...
    @property
    def confidence_counts(self) -> IntArray | None: ...
    @property
    def value_counts(self) -> IntArray | None: ...
    @property
    def value_moments(self) -> tuple[float, float, float, float, float] | None: ...


class LayoutError(ValueError):
    """Counts or moments that do not fit a layout (wrong features, lengths or blob size)."""


@dataclass(frozen=True)
class Layout:
    """Where each part of one drift reference's counts sits in a flat array."""

    features: tuple[tuple[str, int], ...]
    class_counts: int | None = None
    confidence_counts: int | None = None
    value_slots: int | None = None

    # -- building

    @classmethod
    def of_reference(cls, reference: DriftReference) -> Layout:
        p = reference.predictions
        return cls(
            features=tuple((f.name, len(f.counts)) for f in reference.features),
            class_counts=None if p is None or p.class_counts is None else len(p.class_counts),
            confidence_counts=None
            if p is None or p.confidence_counts is None
            else len(p.confidence_counts),
            value_slots=None if p is None or p.value is None else len(p.value.counts),
        )

    @classmethod
    def of_sketch(cls, sketch: DriftSketch) -> Layout:
        p = sketch.predictions
        return cls(
            features=tuple((f.name, len(f.counts)) for f in sketch.features),
            class_counts=None if p is None or p.class_counts is None else len(p.class_counts),
            confidence_counts=None
            if p is None or p.confidence_counts is None
            else len(p.confidence_counts),
            value_slots=None if p is None or p.value is None else len(p.value.counts),
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "features": [list(f) for f in self.features],
                "class_counts": self.class_counts,
                "confidence_counts": self.confidence_counts,
                "value_slots": self.value_slots,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> Layout:
        data: dict[str, Any] = json.loads(text)
        return cls(
            features=tuple((str(name), int(slots)) for name, slots in data["features"]),
            class_counts=data.get("class_counts"),
            confidence_counts=data.get("confidence_counts"),
            value_slots=data.get("value_slots"),
        )

    # -- geometry

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.features]

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start of each feature's counts, and (last) the end of all features."""
        return tuple(
            int(x) for x in np.concatenate([[0], np.cumsum([s for _, s in self.features])])
        )

    @property
    def feature_size(self) -> int:
        return self.offsets[-1]

    def feature_slice(self, j: int) -> slice:
        return slice(self.offsets[j], self.offsets[j + 1])

    @property
    def class_slice(self) -> slice | None:
        if self.class_counts is None:
            return None
        return slice(self.feature_size, self.feature_size + self.class_counts)

    @property
    def confidence_slice(self) -> slice | None:
        if self.confidence_counts is None:
            return None
        start = self.feature_size + (self.class_counts or 0)
        return slice(start, start + self.confidence_counts)

    @property
    def value_slice(self) -> slice | None:
        if self.value_slots is None:
            return None
        start = self.feature_size + (self.class_counts or 0) + (self.confidence_counts or 0)
        return slice(start, start + self.value_slots)

    @property
    def size(self) -> int:
        """Length of the flat counts array."""
        return (
            self.feature_size
            + (self.class_counts or 0)
            + (self.confidence_counts or 0)
            + (self.value_slots or 0)
        )

    @property
    def moment_rows(self) -> int:
        return self.n_features + (1 if self.value_slots is not None else 0)

    def covers_features_of(self, other: Layout) -> bool:
        """Whether ``other`` has exactly these features (prediction parts may differ)."""
        return self.features == other.features

    # -- sketches <-> arrays

    def flatten(self, sketch: DriftSketch) -> tuple[IntArray, FloatArray]:
        """A sketch as ``(counts, moments)`` in this layout, or :class:`LayoutError`.

        Features must match exactly. A prediction part the layout has but the sketch
        lacks counts as zeros (nothing was counted); one the sketch has but the layout
        lacks is left out.
        """
        features = sketch.features
        if tuple((f.name, len(f.counts)) for f in features) != self.features:
            if len(features) != self.n_features:
                raise LayoutError(
                    f"the sketch has {len(features)} features, the layout {self.n_features}"
                )
            for j, (f, (name, slots)) in enumerate(zip(features, self.features, strict=True)):
                if (f.name, len(f.counts)) != (name, slots):
                    raise LayoutError(
                        f"feature {j} is {f.name!r} with {len(f.counts)} counts, "
                        f"the layout has {name!r} with {slots}"
                    )
        counts = np.zeros(self.size, dtype=np.int64)
        counts[: self.feature_size] = np.fromiter(
            itertools.chain.from_iterable(f.counts for f in features),
            dtype=np.int64,
            count=self.feature_size,
        )
        moments = np.empty((self.moment_rows, 5))
        if features:
            moments[: self.n_features] = [  # _moment_row, inlined: a call per feature shows
                EMPTY_MOMENT
                if m.n == 0 or m.min is None or m.max is None
                else (m.n, m.mean, m.m2, m.min, m.max)
                for m in (f.moments for f in features)
            ]
        if self.moment_rows > self.n_features:
            moments[-1] = EMPTY_MOMENT
        p = sketch.predictions
        if p is not None:
            for part, where in (
                (p.class_counts, self.class_slice),
                (p.confidence_counts, self.confidence_slice),
                (None if p.value is None else p.value.counts, self.value_slice),
            ):
                if part is None or where is None:
                    continue
                if len(part) != where.stop - where.start:
                    raise LayoutError(
                        f"a prediction part has {len(part)} counts, the layout "
                        f"{where.stop - where.start}"
                    )
                if part and min(part) < 0:  # the contract lets class counts go negative
                    raise LayoutError("a prediction part has a negative count")
                counts[where] = part
            if p.value is not None and self.value_slots is not None:
                moments[-1] = _moment_row(p.value.moments)
        return counts, moments

    def flatten_arrays(self, sketch: SketchParts) -> tuple[IntArray, FloatArray]:
        """:meth:`flatten` of a sketch already turned into arrays (ingestion's fast path):
        the same result, or the same :class:`LayoutError`."""
        features = sketch.features
        if features != self.features:
            if len(features) != self.n_features:
                raise LayoutError(
                    f"the sketch has {len(features)} features, the layout {self.n_features}"
                )
            for j, ((name, length), (own, slots)) in enumerate(
                zip(features, self.features, strict=True)
            ):
                if (name, length) != (own, slots):
                    raise LayoutError(
                        f"feature {j} is {name!r} with {length} counts, "
                        f"the layout has {own!r} with {slots}"
                    )
        counts = np.zeros(self.size, dtype=np.int64)
        counts[: self.feature_size] = sketch.counts
        moments = np.empty((self.moment_rows, 5))
        moments[: self.n_features] = sketch.moments
        if self.moment_rows > self.n_features:
            moments[-1] = EMPTY_MOMENT
        for part, where in (
            (sketch.class_counts, self.class_slice),
            (sketch.confidence_counts, self.confidence_slice),
            (sketch.value_counts, self.value_slice),
        ):
            if part is None or where is None:
                continue
            if len(part) != where.stop - where.start:
                raise LayoutError(
                    f"a prediction part has {len(part)} counts, the layout "
                    f"{where.stop - where.start}"
                )
            if part.size and part.min() < 0:
                raise LayoutError("a prediction part has a negative count")
            counts[where] = part
        if sketch.value_moments is not None and self.value_slots is not None:
            moments[-1] = sketch.value_moments
        return counts, moments

    def to_sketch(self, reference_id: str, counts: IntArray, moments: FloatArray) -> DriftSketch:
        """Flat arrays back into a wire sketch (for :func:`shared.drift.compare`)."""
        if counts.shape != (self.size,):
            raise LayoutError(f"{counts.shape[0]} counts for a layout of {self.size}")
        features = [
            FeatureSketch(
                name=name,
                counts=counts[self.feature_slice(j)].tolist(),
                moments=moments_of_row(moments[j]),
            )
            for j, (name, _) in enumerate(self.features)
        ]
        predictions = None
        if (
            self.class_counts is not None
            or self.confidence_counts is not None
            or self.value_slots is not None
        ):
            cls_, conf, val = self.class_slice, self.confidence_slice, self.value_slice
            predictions = PredictionSketch(
                class_counts=None if cls_ is None else counts[cls_].tolist(),
                confidence_counts=None if conf is None else counts[conf].tolist(),
                value=None
                if val is None
                else FeatureSketch(
                    name="prediction",
                    counts=counts[val].tolist(),
                    moments=moments_of_row(moments[-1]),
                ),
            )
        return DriftSketch(reference_id=reference_id, features=features, predictions=predictions)


def _moment_row(m: Moments) -> tuple[float, float, float, float, float]:
    if m.n == 0 or m.min is None or m.max is None:
        return EMPTY_MOMENT
    return (float(m.n), m.mean, m.m2, m.min, m.max)


def moments_of_row(row: FloatArray) -> Moments:
    n = int(row[0])
    if n == 0:
        return Moments()
    return Moments(
        n=n, mean=float(row[1]), m2=float(max(row[2], 0.0)), min=float(row[3]), max=float(row[4])
    )


def moments_array(moments: list[Moments]) -> FloatArray:
    return np.asarray([_moment_row(m) for m in moments], dtype=np.float64).reshape(-1, 5)


# ----------------------------------------------------------------------------- merging


def merge_moment_pair(a: FloatArray, b: FloatArray) -> FloatArray:
    """Chan's parallel update, row by row: the moments of both samples together.

    The same operations, in the same order, as :func:`shared.drift.merge_moments`.
    """
    na, nb = a[:, 0], b[:, 0]
    n = na + nb
    safe = np.where(n > 0, n, 1.0)
    delta = b[:, 1] - a[:, 1]
    mean = a[:, 1] + delta * nb / safe
    m2 = np.maximum(a[:, 2] + b[:, 2] + delta * delta * na * nb / safe, 0.0)
    merged = np.stack(
        [n, mean, m2, np.minimum(a[:, 3], b[:, 3]), np.maximum(a[:, 4], b[:, 4])], axis=1
    )
    merged = np.where((na == 0)[:, None], b, merged)
    result: FloatArray = np.where(((nb == 0) & (na > 0))[:, None], a, merged)
    return result


def merge_moment_stack(stack: FloatArray) -> FloatArray:
    """Moments of ``k`` samples at once, ``(k, rows, 5) -> (rows, 5)``.

    The k-way form of Chan's update: the pooled mean, and the pooled M2 as the sum of
    the parts' M2 plus each part's ``n * (mean_i - mean)**2``.
    """
    if stack.shape[0] == 0:
        return np.tile(np.asarray(EMPTY_MOMENT), (stack.shape[1], 1))
    n_i = stack[:, :, 0]
    n = n_i.sum(axis=0)
    safe = np.where(n > 0, n, 1.0)
    mean = (n_i * stack[:, :, 1]).sum(axis=0) / safe
    spread = n_i * (stack[:, :, 1] - mean) ** 2
    m2 = stack[:, :, 2].sum(axis=0) + np.where(n_i > 0, spread, 0.0).sum(axis=0)
    result: FloatArray = np.stack(
        [
            n,
            np.where(n > 0, mean, 0.0),
            np.maximum(m2, 0.0),
            stack[:, :, 3].min(axis=0),
            stack[:, :, 4].max(axis=0),
        ],
        axis=1,
    )
    return result


# ----------------------------------------------------------------------------- packing


_WIDTHS = ((2, "<i2", 2**15 - 1), (4, "<i4", 2**31 - 1), (8, "<i8", 2**63 - 1))


def pack_counts(counts: IntArray) -> bytes:
    """Little-endian int16, int32 or int64: the narrowest that holds every count."""
    if counts.size and counts.min() < 0:
        raise LayoutError("counts must not be negative")
    largest = int(counts.max()) if counts.size else 0
    for _, dtype, limit in _WIDTHS:
        if largest <= limit:
            return counts.astype(dtype).tobytes()
    raise LayoutError("a count does not fit in 64 bits")  # pragma: no cover - int64 input


def pack_counts_many(counts: IntArray) -> list[bytes]:
    """:func:`pack_counts` of each row of a ``(rows, size)`` array, a width at a time."""
    rows = counts.shape[0]
    if rows == 0:
        return []
    if counts.size and counts.min() < 0:
        raise LayoutError("counts must not be negative")
    largest = counts.max(axis=1) if counts.shape[1] else np.zeros(rows, dtype=np.int64)
    out: list[bytes] = [b""] * rows
    todo = np.ones(rows, dtype=bool)
    for _, dtype, limit in _WIDTHS:
        fits = todo & (largest <= limit)
        if fits.any():
            at = np.flatnonzero(fits)
            packed = counts[at].astype(dtype)
            for i, row in zip(at.tolist(), packed, strict=True):
                out[i] = row.tobytes()
            todo &= ~fits
    return out


def pack_moments_many(moments: FloatArray) -> list[bytes]:
    """:func:`pack_moments` of each ``(m, 5)`` block of a ``(rows, m, 5)`` array."""
    packed = np.ascontiguousarray(moments, dtype="<f8")
    return [block.tobytes() for block in packed]


def unpack_moments_many(blobs: list[bytes], rows: int) -> FloatArray:
    """``(len(blobs), rows, 5)`` moments; each blob as :func:`unpack_moments` checks it."""
    for blob in blobs:
        if len(blob) != 8 * 5 * rows:
            raise LayoutError(f"a moments blob of {len(blob)} bytes does not hold {rows} rows")
    if not blobs:
        return np.zeros((0, rows, 5))
    joined = np.frombuffer(b"".join(blobs), dtype="<f8").reshape(len(blobs), rows, 5)
    return joined.astype(np.float64)


def _dtype_for(blob_length: int, size: int) -> str:
    for width, dtype, _ in _WIDTHS:
        if blob_length == width * size:
            return dtype
    raise LayoutError(f"a counts blob of {blob_length} bytes does not hold {size} counts")


def unpack_counts(blob: bytes, size: int) -> IntArray:
    if size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.frombuffer(blob, dtype=_dtype_for(len(blob), size)).astype(np.int64)


def unpack_counts_many(blobs: list[bytes], size: int) -> IntArray:
    """``(len(blobs), size)`` counts; one ``frombuffer`` per width present."""
    out = np.empty((len(blobs), size), dtype=np.int64)
    if not blobs or size == 0:
        return out
    by_length: dict[int, list[int]] = {}
    for i, blob in enumerate(blobs):
        by_length.setdefault(len(blob), []).append(i)
    for length, rows in by_length.items():
        dtype = _dtype_for(length, size)
        joined = b"".join(blobs[i] for i in rows)
        decoded = np.frombuffer(joined, dtype=dtype).reshape(len(rows), size)
        if len(rows) == len(blobs):
            out[:] = decoded
        else:
            out[rows] = decoded
    return out


def pack_moments(moments: FloatArray) -> bytes:
    return np.ascontiguousarray(moments, dtype="<f8").tobytes()


def unpack_moments(blob: bytes, rows: int) -> FloatArray:
    if len(blob) != 8 * 5 * rows:
        raise LayoutError(f"a moments blob of {len(blob)} bytes does not hold {rows} rows")
    return np.frombuffer(blob, dtype="<f8").reshape(rows, 5).astype(np.float64)
