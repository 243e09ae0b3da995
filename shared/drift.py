"""Drift sketches: binned counts and moments that merge exactly, and the distances on them.

The reference is built once from training data: per monitored feature, bin edges
at the training quantiles and the training counts over those bins. Devices count
live inputs over the *same* bins; the server adds counts from any set of devices
and windows and computes the distances on the sums.

Layout of one feature's counts (length ``n_bins + 3``)::

    [underflow, bin_1, ..., bin_n, overflow, nan]

``bin_i`` holds values in ``[edges[i-1], edges[i])``; the last bin also holds
``edges[-1]`` itself; ``underflow`` holds values below ``edges[0]``, ``overflow``
values above ``edges[-1]`` (including +inf), ``nan`` holds NaN.

What always holds:

- Counts are integers and merge by addition; moments (count, mean, M2, min, max
  over finite values) merge with Chan's parallel formula. So every distance
  computed from merged sketches equals the distance on the pooled raw data.
- Every function here is pure: arrays in, numbers out, no clock, no I/O.
- Distances use the same smoothing everywhere (:data:`PSI_EPSILON`), so the agent,
  the server and tests agree to the last bit on the same counts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import Field, field_validator, model_validator

from shared.errors import DriftError
from shared.model import ContractModel

__all__ = [
    "CONFIDENCE_BINS",
    "PSI_EPSILON",
    "DriftAccumulator",
    "DriftReference",
    "DriftSketch",
    "FeatureDrift",
    "FeatureReference",
    "FeatureSketch",
    "Moments",
    "PredictionReference",
    "PredictionSketch",
    "binned_ks",
    "chi_squared",
    "compare",
    "confidence_counts",
    "count_bins",
    "js_distance",
    "merge_moments",
    "merge_sketches",
    "moments_of",
    "psi",
    "quantile_edges",
]

PSI_EPSILON = 1e-4
"""Floor on bin proportions in PSI, so an empty bin gives a large but finite term."""

CONFIDENCE_BINS = 10
"""Equal-width bins of the top-class probability over [0, 1]."""

MIN_BINS, MAX_BINS = 2, 64
_CHUNK_ROWS = 4096
_SMALL_BATCH = 8

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


# ----------------------------------------------------------------------------- wire models


class Moments(ContractModel):
    """Count, mean, sum of squared deviations (M2), min and max of the finite values."""

    n: int = Field(0, ge=0)
    mean: float = 0.0
    m2: float = Field(0.0, ge=0.0)
    min: float | None = None
    max: float | None = None

    @property
    def variance(self) -> float:
        return self.m2 / (self.n - 1) if self.n > 1 else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    @property
    def total(self) -> float:
        return self.mean * self.n


class FeatureReference(ContractModel):
    """One monitored feature of a reference: its bin edges and training counts."""

    name: str = Field(min_length=1, max_length=128)
    edges: list[float] = Field(min_length=2, max_length=MAX_BINS + 1)
    counts: list[int] = Field(description="training counts, layout [under, bins..., over, nan]")
    moments: Moments = Field(default_factory=Moments)

    @field_validator("edges")
    @classmethod
    def _edges_increase(cls, edges: list[float]) -> list[float]:
        if not all(math.isfinite(e) for e in edges):
            raise ValueError("bin edges must be finite")
        if len(edges) == 2 and edges[0] == edges[1]:
            return edges  # a constant feature: one degenerate bin
        if any(b <= a for a, b in itertools.pairwise(edges)):
            raise ValueError("bin edges must strictly increase")
        return edges

    @model_validator(mode="after")
    def _counts_fit(self) -> FeatureReference:
        expected = len(self.edges) + 2
        if len(self.counts) != expected:
            raise ValueError(
                f"feature {self.name!r} has {len(self.edges) - 1} bins, so {expected} counts "
                f"are expected, not {len(self.counts)}"
            )
        if self.counts and min(self.counts) < 0:
            raise ValueError(f"feature {self.name!r} has a negative count")
        return self

    @property
    def n_bins(self) -> int:
        return len(self.edges) - 1


class PredictionReference(ContractModel):
    """The model's output distribution on the reference data."""

    class_counts: list[int] | None = Field(
        None, description="predicted-class counts (classification)"
    )
    confidence_counts: list[int] | None = Field(
        None, description=f"top-class probability histogram, {CONFIDENCE_BINS} bins over [0, 1]"
    )
    value: FeatureReference | None = Field(None, description="predicted value (regression)")


class DriftReference(ContractModel):
    """What live data is compared against; shipped inside every model bundle."""

    features: list[FeatureReference] = Field(min_length=1, max_length=4096)
    predictions: PredictionReference | None = None
    reference_id: str = Field(
        "",
        pattern=r"^([0-9a-f]{64})?$",
        description="SHA-256 of the bin layout, filled in when built; devices copy it into "
        "their drift sketches, readers check it",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> DriftReference:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("feature names in a drift reference must be unique")
        return self

    def layout_json(self) -> str:
        """The compact JSON of the bin layout that :meth:`compute_reference_id` hashes."""
        layout: list[Any] = [[f.name, f.edges] for f in self.features]
        if self.predictions is not None:
            p = self.predictions
            layout.append(
                [
                    None if p.class_counts is None else len(p.class_counts),
                    None if p.confidence_counts is None else len(p.confidence_counts),
                    None if p.value is None else p.value.edges,
                ]
            )
        return json.dumps(layout, separators=(",", ":"), allow_nan=False)

    def compute_reference_id(self) -> str:
        """SHA-256 of the bins (not the counts): sketches with the same id can be merged."""
        return hashlib.sha256(self.layout_json().encode("utf-8")).hexdigest()

    @model_validator(mode="after")
    def _fill_or_check_id(self) -> DriftReference:
        computed = self.compute_reference_id()
        if not self.reference_id:
            self.__dict__["reference_id"] = computed  # no re-validation loop
        elif self.reference_id != computed:
            raise ValueError("reference_id does not match the reference's bins")
        return self

    @classmethod
    def from_data(
        cls,
        data: npt.ArrayLike,
        *,
        feature_names: Sequence[str],
        n_bins: int = 10,
        probabilities: npt.ArrayLike | None = None,
        predicted_values: npt.ArrayLike | None = None,
    ) -> DriftReference:
        """Build a reference from training data ``(rows, features)``.

        ``probabilities`` (rows, classes) adds the predicted-class and confidence
        reference of a classifier; ``predicted_values`` (rows,) that of a regressor.
        """
        x = _as_2d(data)
        if x.shape[1] != len(feature_names):
            raise DriftError(
                f"data has {x.shape[1]} features but {len(feature_names)} names were given"
            )
        if x.shape[0] == 0:
            raise DriftError("a drift reference needs at least one row")
        features = []
        for j, name in enumerate(feature_names):
            column = x[:, j]
            edges = quantile_edges(column, n_bins)
            features.append(
                FeatureReference(
                    name=name,
                    edges=edges,
                    counts=count_bins(column[:, None], [edges])[0].tolist(),
                    moments=moments_of(column),
                )
            )
        predictions = None
        if probabilities is not None or predicted_values is not None:
            predictions = PredictionReference()
            if probabilities is not None:
                p = _as_2d(probabilities)
                predictions.class_counts = np.bincount(
                    p.argmax(axis=1), minlength=p.shape[1]
                ).tolist()
                predictions.confidence_counts = confidence_counts(p).tolist()
            if predicted_values is not None:
                v = np.asarray(predicted_values, dtype=np.float64).reshape(-1)
                edges = quantile_edges(v, n_bins)
                predictions.value = FeatureReference(
                    name="prediction",
                    edges=edges,
                    counts=count_bins(v[:, None], [edges])[0].tolist(),
                    moments=moments_of(v),
                )
        return cls(features=features, predictions=predictions)


class FeatureSketch(ContractModel):
    """Live counts of one feature over its reference bins, and its moments."""

    name: str = Field(min_length=1, max_length=128)
    counts: list[int] = Field(max_length=MAX_BINS + 3)
    moments: Moments = Field(default_factory=Moments)

    @field_validator("counts")
    @classmethod
    def _non_negative(cls, counts: list[int]) -> list[int]:
        # min() walks the list in C: a report carries thousands of counts
        if counts and min(counts) < 0:
            raise ValueError("counts must not be negative")
        return counts


class PredictionSketch(ContractModel):
    class_counts: list[int] | None = None
    confidence_counts: list[int] | None = None
    value: FeatureSketch | None = None


class DriftSketch(ContractModel):
    """One window's drift counts on one device, against one reference."""

    reference_id: str = Field(pattern=r"^[0-9a-f]{64}$")
    features: list[FeatureSketch] = Field(max_length=4096)
    predictions: PredictionSketch | None = None


# ----------------------------------------------------------------------------- counting


def quantile_edges(values: npt.ArrayLike, n_bins: int = 10) -> list[float]:
    """Bin edges at the quantiles of the finite ``values``; ties collapse to fewer bins."""
    if not MIN_BINS <= n_bins <= MAX_BINS:
        raise DriftError(f"n_bins must be between {MIN_BINS} and {MAX_BINS}, not {n_bins}")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise DriftError("cannot place bins: the feature has no finite value")
    edges = np.unique(np.quantile(v, np.linspace(0.0, 1.0, n_bins + 1)))
    if edges.size < 2:
        return [float(edges[0]), float(edges[0])]
    return [float(e) for e in edges]


class _Binning:
    """Bin edges of several features, padded into one array for vectorised counting.

    Built once per reference; counting a row is then a handful of numpy calls
    whatever the number of features. Features with fewer bins are padded with
    ``+inf`` edges that no finite value reaches.
    """

    def __init__(self, edges: Sequence[Sequence[float]]) -> None:
        self.n_features = len(edges)
        self.n_bins = np.array([len(e) - 1 for e in edges], dtype=np.int64)
        width = int(self.n_bins.max()) + 1 if self.n_features else 1
        self.padded = np.full((self.n_features, width), np.inf)
        for j, e in enumerate(edges):
            self.padded[j, : len(e)] = e
        self.last_edge = self.padded[np.arange(self.n_features), self.n_bins]
        self.offsets = np.concatenate([[0], np.cumsum(self.n_bins + 3)]).astype(np.int64)
        self.size = int(self.offsets[-1])

    def slots(self, x: FloatArray) -> IntArray:
        """Flat count index of every value of ``x`` (rows, features)."""
        if x.shape[1] != self.n_features:
            raise DriftError(
                f"input has {x.shape[1]} features, the reference has {self.n_features}"
            )
        if x.shape[0] <= _SMALL_BATCH:  # one broadcast compare beats a loop over features
            below_or_at = (x[:, :, None] >= self.padded[None, :, :]).sum(axis=2)
        else:  # a binary search per feature beats a (rows, features, edges) temporary
            below_or_at = np.empty(x.shape, dtype=np.int64)
            for j in range(self.n_features):
                edges = self.padded[j, : self.n_bins[j] + 1]
                below_or_at[:, j] = np.searchsorted(edges, x[:, j], side="right")
            below_or_at[np.isposinf(x)] = self.n_bins.max() + 1
        slot = np.minimum(below_or_at, self.n_bins + 1)
        slot = np.where(x == self.last_edge, self.n_bins, slot)
        slot = np.where(np.isnan(x), self.n_bins + 2, slot)
        index: IntArray = slot + self.offsets[:-1]
        return index

    def add(self, totals: IntArray, x: FloatArray) -> None:
        """Add the counts of ``x`` into the flat ``totals`` array."""
        if x.shape[0] == 1:
            totals[self.slots(x)[0]] += 1  # one slot per feature: indices are unique
            return
        for start in range(0, x.shape[0], _CHUNK_ROWS):
            index = self.slots(x[start : start + _CHUNK_ROWS]).ravel()
            totals += np.bincount(index, minlength=self.size)

    def split(self, totals: IntArray) -> list[IntArray]:
        return [
            totals[self.offsets[j] : self.offsets[j + 1]].copy() for j in range(self.n_features)
        ]


def count_bins(data: npt.ArrayLike, edges: Sequence[Sequence[float]]) -> list[IntArray]:
    """Count each column of ``data`` over its own edges; one count array per column."""
    x = _as_2d(data)
    binning = _Binning(edges)
    totals = np.zeros(binning.size, dtype=np.int64)
    binning.add(totals, x)
    return binning.split(totals)


def moments_of(values: npt.ArrayLike) -> Moments:
    """Moments of the finite values of a 1-D array."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Moments()
    mean = float(v.mean())
    return Moments(
        n=int(v.size),
        mean=mean,
        m2=float(((v - mean) ** 2).sum()),
        min=float(v.min()),
        max=float(v.max()),
    )


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s parallel update: the moments of the union of both samples."""
    if a.n == 0:
        return b.model_copy()
    if b.n == 0:
        return a.model_copy()
    n = a.n + b.n
    delta = b.mean - a.mean
    mean = a.mean + delta * b.n / n
    m2 = a.m2 + b.m2 + delta * delta * a.n * b.n / n
    assert a.min is not None and b.min is not None and a.max is not None and b.max is not None
    return Moments(n=n, mean=mean, m2=max(m2, 0.0), min=min(a.min, b.min), max=max(a.max, b.max))


class _MomentArrays:
    """Per-feature moments as arrays, merged with Chan's formula one batch at a time."""

    def __init__(self, n_features: int) -> None:
        self.n = np.zeros(n_features, dtype=np.int64)
        self.mean = np.zeros(n_features)
        self.m2 = np.zeros(n_features)
        self.min = np.full(n_features, np.inf)
        self.max = np.full(n_features, -np.inf)

    def add(self, x: FloatArray) -> None:
        finite = np.isfinite(x)
        if finite.all():  # the common case: no masking needed
            count = np.full(x.shape[1], x.shape[0], dtype=np.int64)
            batch_mean = x.mean(axis=0)
            batch_m2 = ((x - batch_mean) ** 2).sum(axis=0)
            batch_min, batch_max = x.min(axis=0), x.max(axis=0)
        else:
            count = finite.sum(axis=0)
            if not count.any():
                return
            safe = np.where(finite, x, 0.0)
            batch_mean = np.where(count > 0, safe.sum(axis=0) / np.maximum(count, 1), 0.0)
            batch_m2 = (np.where(finite, x - batch_mean, 0.0) ** 2).sum(axis=0)
            batch_min = np.where(finite, x, np.inf).min(axis=0)
            batch_max = np.where(finite, x, -np.inf).max(axis=0)
        total = self.n + count
        delta = batch_mean - self.mean
        weight = np.where(total > 0, count / np.maximum(total, 1), 0.0)
        self.mean = self.mean + delta * weight
        self.m2 = self.m2 + batch_m2 + delta * delta * self.n * weight
        self.n = total
        self.min = np.minimum(self.min, batch_min)
        self.max = np.maximum(self.max, batch_max)

    def moments(self, j: int) -> Moments:
        if self.n[j] == 0:
            return Moments()
        return Moments(
            n=int(self.n[j]),
            mean=float(self.mean[j]),
            m2=float(max(self.m2[j], 0.0)),
            min=float(self.min[j]),
            max=float(self.max[j]),
        )


def confidence_counts(probabilities: npt.ArrayLike) -> IntArray:
    """Histogram of each row's top probability over :data:`CONFIDENCE_BINS` bins of [0, 1]."""
    p = _as_2d(probabilities)
    top = np.clip(p.max(axis=1), 0.0, 1.0)
    top = np.where(np.isnan(top), 0.0, top)
    index = np.minimum((top * CONFIDENCE_BINS).astype(np.int64), CONFIDENCE_BINS - 1)
    return np.bincount(index, minlength=CONFIDENCE_BINS).astype(np.int64)


class DriftAccumulator:
    """Counts one window of live data against a reference (mutable; one per window).

    Built for the inference path: bins are prepared once, and adding one row costs
    a few vectorised numpy calls whatever the number of features.

    >>> acc = DriftAccumulator(reference)   # doctest: +SKIP
    >>> acc.update(batch, probabilities=probs)
    >>> sketch = acc.sketch()
    """

    def __init__(self, reference: DriftReference) -> None:
        self.reference = reference
        self._names = [f.name for f in reference.features]
        self._binning = _Binning([f.edges for f in reference.features])
        self._reference_id = reference.reference_id
        pred = reference.predictions
        self._n_classes = (
            len(pred.class_counts) if pred is not None and pred.class_counts is not None else None
        )
        self._track_confidence = pred is not None and pred.confidence_counts is not None
        self._value_binning = (
            _Binning([pred.value.edges]) if pred is not None and pred.value is not None else None
        )
        self.reset()

    def reset(self) -> None:
        self._counts = np.zeros(self._binning.size, dtype=np.int64)
        self._moments = _MomentArrays(self._binning.n_features)
        self._class_counts = (
            None if self._n_classes is None else np.zeros(self._n_classes, dtype=np.int64)
        )
        self._confidence = (
            np.zeros(CONFIDENCE_BINS, dtype=np.int64) if self._track_confidence else None
        )
        self._value_counts = (
            None
            if self._value_binning is None
            else np.zeros(self._value_binning.size, dtype=np.int64)
        )
        self._value_moments = _MomentArrays(1)
        self._rows = 0

    @property
    def rows(self) -> int:
        return self._rows

    def update(
        self,
        data: npt.ArrayLike,
        *,
        probabilities: npt.ArrayLike | None = None,
        predicted_values: npt.ArrayLike | None = None,
    ) -> None:
        """Add a batch ``(rows, features)`` (a single row may be 1-D)."""
        x = _as_2d(data)
        p = None
        if probabilities is not None:
            p = _as_2d(probabilities)
            if p.shape[0] != x.shape[0]:
                raise DriftError(f"{p.shape[0]} probability rows for {x.shape[0]} input rows")
            if self._class_counts is not None and p.shape[1] != self._class_counts.size:
                raise DriftError(
                    f"{p.shape[1]} classes, the reference has {self._class_counts.size}"
                )
        self._binning.add(self._counts, x)  # validates the feature count first
        self._moments.add(x)
        self._rows += x.shape[0]
        if p is not None:
            if self._class_counts is not None:
                self._class_counts += np.bincount(
                    p.argmax(axis=1), minlength=self._class_counts.size
                )
            if self._confidence is not None:
                self._confidence += confidence_counts(p)
        if predicted_values is not None and self._value_binning is not None:
            assert self._value_counts is not None
            v = np.asarray(predicted_values, dtype=np.float64).reshape(-1, 1)
            self._value_binning.add(self._value_counts, v)
            self._value_moments.add(v)

    def sketch(self) -> DriftSketch:
        """The window so far, as a wire model (the accumulator keeps counting)."""
        predictions = None
        if self.reference.predictions is not None:
            value = None
            if self._value_counts is not None:
                value = FeatureSketch(
                    name="prediction",
                    counts=self._value_counts.tolist(),
                    moments=self._value_moments.moments(0),
                )
            predictions = PredictionSketch(
                class_counts=None if self._class_counts is None else self._class_counts.tolist(),
                confidence_counts=None if self._confidence is None else self._confidence.tolist(),
                value=value,
            )
        counts = self._binning.split(self._counts)
        return DriftSketch(
            reference_id=self._reference_id,
            features=[
                FeatureSketch(name=name, counts=c.tolist(), moments=self._moments.moments(j))
                for j, (name, c) in enumerate(zip(self._names, counts, strict=True))
            ],
            predictions=predictions,
        )


def merge_sketches(sketches: Iterable[DriftSketch]) -> DriftSketch:
    """Add sketches of the same reference: counts by addition, moments by Chan's formula."""
    items = list(sketches)
    if not items:
        raise DriftError("nothing to merge")
    first = items[0]
    for other in items[1:]:
        if other.reference_id != first.reference_id:
            raise DriftError("cannot merge sketches of different drift references")
        if [f.name for f in other.features] != [f.name for f in first.features]:
            raise DriftError("cannot merge sketches with different features")
    features = []
    for j, feature in enumerate(first.features):
        counts = np.zeros(len(feature.counts), dtype=np.int64)
        moments = Moments()
        for sketch in items:
            f = sketch.features[j]
            if len(f.counts) != counts.size:
                raise DriftError(f"feature {f.name!r} has different bin counts across sketches")
            counts += np.asarray(f.counts, dtype=np.int64)
            moments = merge_moments(moments, f.moments)
        features.append(FeatureSketch(name=feature.name, counts=counts.tolist(), moments=moments))
    return DriftSketch(
        reference_id=first.reference_id,
        features=features,
        predictions=_merge_predictions([s.predictions for s in items]),
    )


def _merge_predictions(parts: list[PredictionSketch | None]) -> PredictionSketch | None:
    present = [p for p in parts if p is not None]
    if not present:
        return None

    def add(lists: list[list[int] | None]) -> list[int] | None:
        arrays = [np.asarray(v, dtype=np.int64) for v in lists if v is not None]
        if not arrays:
            return None
        if len({a.size for a in arrays}) != 1:
            raise DriftError("prediction counts differ in length across sketches")
        return [int(x) for x in np.sum(arrays, axis=0)]

    value = None
    values = [p.value for p in present if p.value is not None]
    if values:
        counts = add([v.counts for v in values])
        moments = Moments()
        for v in values:
            moments = merge_moments(moments, v.moments)
        value = FeatureSketch(name="prediction", counts=counts or [], moments=moments)
    return PredictionSketch(
        class_counts=add([p.class_counts for p in present]),
        confidence_counts=add([p.confidence_counts for p in present]),
        value=value,
    )


# ----------------------------------------------------------------------------- distances


def _proportions(counts: npt.ArrayLike) -> FloatArray:
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1:
        raise DriftError("counts must be one-dimensional")
    if (c < 0).any():
        raise DriftError("counts must not be negative")
    total = c.sum()
    if total <= 0:
        raise DriftError("cannot compare an empty distribution")
    result: FloatArray = c / total
    return result


def _pair(expected: npt.ArrayLike, actual: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    e, a = _proportions(expected), _proportions(actual)
    if e.shape != a.shape:
        raise DriftError(f"count vectors differ in length: {e.size} vs {a.size}")
    return e, a


def psi(expected: npt.ArrayLike, actual: npt.ArrayLike) -> float:
    """Population stability index: sum over bins of (a - e) * ln(a / e).

    Proportions are floored at :data:`PSI_EPSILON`. Rules of thumb: < 0.1 stable,
    0.1-0.25 a moderate shift, >= 0.25 a significant one.
    """
    e, a = _pair(expected, actual)
    e = np.maximum(e, PSI_EPSILON)
    a = np.maximum(a, PSI_EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


def js_distance(expected: npt.ArrayLike, actual: npt.ArrayLike) -> float:
    """Jensen-Shannon distance (base 2): the square root of the JS divergence, in [0, 1]."""
    e, a = _pair(expected, actual)
    m = 0.5 * (e + a)

    def kl(p: FloatArray) -> float:
        mask = p > 0
        return float(np.sum(p[mask] * np.log2(p[mask] / m[mask])))

    divergence = 0.5 * kl(e) + 0.5 * kl(a)
    return math.sqrt(min(max(divergence, 0.0), 1.0))


def chi_squared(expected: npt.ArrayLike, actual: npt.ArrayLike) -> tuple[float, int]:
    """Two-sample chi-squared statistic of homogeneity on counts, and its degrees of freedom.

    Bins empty in both samples are left out. The p-value needs the chi-squared
    distribution, which is the server's business (scipy); the agent needs none.
    """
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape:
        raise DriftError(f"count vectors differ in length: {e.size} vs {a.size}")
    keep = (e + a) > 0
    e, a = e[keep], a[keep]
    n_e, n_a = e.sum(), a.sum()
    if n_e <= 0 or n_a <= 0:
        raise DriftError("cannot compare an empty distribution")
    if e.size < 2:
        return 0.0, 0
    column = e + a
    total = n_e + n_a
    exp_e = column * n_e / total
    exp_a = column * n_a / total
    statistic = float(np.sum((e - exp_e) ** 2 / exp_e) + np.sum((a - exp_a) ** 2 / exp_a))
    return statistic, int(e.size - 1)


def binned_ks(expected: npt.ArrayLike, actual: npt.ArrayLike) -> float:
    """Kolmogorov-Smirnov statistic from binned CDFs (NaN slot excluded).

    Exact at the bin edges; between edges the true statistic can differ by at most
    the larger of the two samples' mass in one bin, which quantile bins keep near
    ``1 / n_bins`` for the reference.
    """
    e = np.asarray(expected, dtype=np.float64)[:-1]
    a = np.asarray(actual, dtype=np.float64)[:-1]
    e_cdf = np.cumsum(_proportions(e))
    a_cdf = np.cumsum(_proportions(a))
    if e_cdf.shape != a_cdf.shape:
        raise DriftError(f"count vectors differ in length: {e.size} vs {a.size}")
    return float(np.max(np.abs(e_cdf - a_cdf)))


@dataclass(frozen=True, slots=True)
class FeatureDrift:
    """The distances of one feature's live counts from its reference counts."""

    name: str
    n: int
    psi: float
    js_distance: float
    ks: float
    chi_squared: float
    degrees_of_freedom: int
    nan_share: float
    out_of_range_share: float
    mean_shift: float
    """Live mean minus reference mean, in reference standard deviations (0 if undefined)."""


def compare(reference: DriftReference, sketch: DriftSketch) -> list[FeatureDrift]:
    """Per-feature distances of ``sketch`` from ``reference`` (features with no rows skipped)."""
    if sketch.reference_id != reference.reference_id:
        raise DriftError("the sketch was counted against a different drift reference")
    result = []
    for ref, live in zip(reference.features, sketch.features, strict=True):
        live_counts = np.asarray(live.counts, dtype=np.int64)
        n = int(live_counts.sum())
        if n == 0:
            continue
        statistic, dof = chi_squared(ref.counts, live_counts)
        std = ref.moments.std
        shift = (live.moments.mean - ref.moments.mean) / std if std > 0 and live.moments.n else 0.0
        result.append(
            FeatureDrift(
                name=ref.name,
                n=n,
                psi=psi(ref.counts, live_counts),
                js_distance=js_distance(ref.counts, live_counts),
                ks=binned_ks(ref.counts, live_counts) if live_counts[:-1].sum() else 0.0,
                chi_squared=statistic,
                degrees_of_freedom=dof,
                nan_share=float(live_counts[-1] / n),
                out_of_range_share=float((live_counts[0] + live_counts[-2]) / n),
                mean_shift=float(shift),
            )
        )
    return result


def _as_2d(data: npt.ArrayLike) -> FloatArray:
    x = np.asarray(data, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise DriftError(f"expected a (rows, features) array, got shape {x.shape}")
    return x
