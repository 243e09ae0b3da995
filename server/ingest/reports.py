"""Telemetry reports as ingestion stores them, and the fast path that parses most of them.

:func:`parse_fast` reads a telemetry payload straight into a :class:`ParsedReport` --
plain values and numpy arrays, no pydantic model -- at a fraction of the cost of
:meth:`shared.messages.TelemetryReport.from_bytes` (orjson decodes; the contract's rules
are checked by hand on the decoded values; the drift counts become arrays once, where
both the checks and the rollups need them). :meth:`ParsedReport.of_report` makes the
same from a validated :class:`~shared.messages.TelemetryReport`.

What always holds:

- :func:`parse_fast` accepts a payload only if ``TelemetryReport.from_bytes`` accepts
  it, and then gives the same values. Whatever it is not sure of returns None, and the
  caller takes the strict path, which decides and words every refusal: a payload that
  orjson does not take or that is not exactly what orjson writes back for what it read
  (a key twice in an object, another spacing or escaping, a number written another
  way), a ``true``/``false`` anywhere (pydantic would read a boolean as a number), a
  field the contract does not name (kept by the strict path), a value of another JSON
  type than the field's (pydantic would coerce a string or a float), a number past the
  database's columns.
- It never raises on bad data, whatever the payload.
- Pure: bytes in, values out; no clock, no I/O.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from itertools import chain
from operator import itemgetter
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from shared.drift import MAX_BINS, DriftSketch, FeatureSketch
from shared.latency import N_LATENCY_BUCKETS
from shared.messages import TelemetryReport

__all__ = ["ParsedReport", "ParsedWindow", "SketchArrays", "parse_fast"]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

MomentRow = tuple[float, float, float, float, float]
EMPTY_MOMENT: MomentRow = (0.0, 0.0, 0.0, math.inf, -math.inf)
"""``(n, mean, m2, min, max)`` of no values (as :data:`server.drift.layout.EMPTY_MOMENT`)."""

_INT32 = 2**31  # model_windows' integer columns are 32-bit on PostgreSQL
_INT64 = 2**63

_TOP = frozenset(
    {
        "schema",
        "schema_version",
        "device_id",
        "seq",
        "window_start",
        "window_end",
        "models",
        "resources",
        "dropped_reports",
    }
)
_WINDOW = frozenset(
    {"model_name", "model_version", "target", "inferences", "errors", "latency_ms", "drift"}
)
_SKETCH = frozenset({"reference_id", "features", "predictions"})
_FEATURE = frozenset({"name", "counts", "moments"})
_MOMENTS = frozenset({"n", "mean", "m2", "min", "max"})
_PREDICTIONS = frozenset({"class_counts", "confidence_counts", "value"})
_RESOURCES = frozenset({"rss_bytes", "cpu_seconds", "disk_free_bytes", "uptime_seconds"})
_LATENCY = frozenset({"counts"})
_MAX_FEATURE_COUNTS = MAX_BINS + 3
_MAX_FEATURES = 4096
_MAX_MODELS = 32

_INSTANT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}:\d{2})")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_REFERENCE_ID = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class SketchArrays:
    """A drift sketch's numbers as arrays: what the rollups add, in the sketch's own order."""

    reference_id: str
    features: tuple[tuple[str, int], ...]
    """Each feature's name and number of counts."""
    counts: IntArray
    """Every feature's counts, one after the other."""
    moments: FloatArray
    """``(len(features), 5)``: ``(n, mean, m2, min, max)``, or the empty row where the
    feature has no values (``n`` 0, or no min or max)."""
    class_counts: IntArray | None
    confidence_counts: IntArray | None
    value_counts: IntArray | None
    value_moments: MomentRow | None
    document: Any
    """The sketch as a :class:`~shared.drift.DriftSketch` (strict path) or as its decoded
    JSON object (fast path, already checked): :meth:`sketch` makes the model of it."""

    def sketch(self) -> DriftSketch:
        """The sketch as the wire model (only needed the first time a reference is seen)."""
        if isinstance(self.document, DriftSketch):
            return self.document
        return DriftSketch.model_validate(self.document)


@dataclass(frozen=True, slots=True)
class ParsedWindow:
    """One model's share of a report."""

    model_name: str
    model_version: int
    target: str
    inferences: int
    errors: int
    latency: IntArray
    latency_json: str
    drift_json: str | None
    """What ``model_windows`` keeps of the sketch: a :class:`~shared.drift.DriftSketch`
    with its reference id and prediction sketch but no features -- the rollups hold
    the feature counts, and the window's readers (the rollout gates) read only the
    predictions. About a tenth of the sketch's bytes, and as many fewer pages to write."""
    sketch: SketchArrays | None


@dataclass(frozen=True, slots=True)
class ParsedReport:
    """One validated telemetry report."""

    device_id: str
    seq: int
    window_start: datetime
    window_end: datetime
    dropped_reports: int
    rss_bytes: int | None
    cpu_seconds: float | None
    models: tuple[ParsedWindow, ...]

    @classmethod
    def of_report(cls, report: TelemetryReport) -> ParsedReport:
        """The same values from a report the strict path validated."""
        return cls(
            device_id=report.device_id,
            seq=report.seq,
            window_start=report.window_start,
            window_end=report.window_end,
            dropped_reports=report.dropped_reports,
            rss_bytes=report.resources.rss_bytes,
            cpu_seconds=report.resources.cpu_seconds,
            models=tuple(
                ParsedWindow(
                    model_name=m.model_name,
                    model_version=m.model_version,
                    target=m.target,
                    inferences=m.inferences,
                    errors=m.errors,
                    latency=np.asarray(m.latency_ms.counts, dtype=np.int64),
                    latency_json=m.latency_ms.model_dump_json(),
                    drift_json=None
                    if m.drift is None
                    else m.drift.model_copy(update={"features": []}).model_dump_json(),
                    sketch=None if m.drift is None else _arrays_of_sketch(m.drift),
                )
                for m in report.models
            ),
        )


def _moment_row_of(feature: FeatureSketch) -> MomentRow:
    m = feature.moments
    if m.n == 0 or m.min is None or m.max is None:
        return EMPTY_MOMENT
    return (float(m.n), m.mean, m.m2, m.min, m.max)


def _arrays_of_sketch(sketch: DriftSketch) -> SketchArrays:
    flat: list[int] = []
    for f in sketch.features:
        flat += f.counts
    p = sketch.predictions
    value = None if p is None else p.value
    return SketchArrays(
        reference_id=sketch.reference_id,
        features=tuple((f.name, len(f.counts)) for f in sketch.features),
        counts=np.asarray(flat, dtype=np.int64),
        moments=np.asarray([_moment_row_of(f) for f in sketch.features], dtype=np.float64).reshape(
            -1, 5
        ),
        class_counts=None
        if p is None or p.class_counts is None
        else np.asarray(p.class_counts, dtype=np.int64),
        confidence_counts=None
        if p is None or p.confidence_counts is None
        else np.asarray(p.confidence_counts, dtype=np.int64),
        value_counts=None if value is None else np.asarray(value.counts, dtype=np.int64),
        value_moments=None if value is None else _moment_row_of(value),
        document=sketch,
    )


# ----------------------------------------------------------------------------- the fast path


class _Unsure(Exception):
    """The fast path cannot vouch for this payload: the strict path decides."""


def parse_fast(device_id: str, payload: bytes) -> ParsedReport | None:
    """``payload`` published on ``device_id``'s telemetry topic, if the fast path is sure
    of it (see the module docstring); None hands it to the strict path."""
    if b"true" in payload or b"false" in payload:
        return None
    try:
        data = orjson.loads(payload)
        if type(data) is not dict:
            return None
        report = _report(device_id, data)
        if orjson.dumps(data) != payload:  # a repeated key, or written otherwise
            return None
    except (_Unsure, orjson.JSONDecodeError, KeyError, ValueError, TypeError, OverflowError):
        return None
    return report


def _int(value: Any, low: int, high: int) -> int:
    if type(value) is not int or not low <= value < high:
        raise _Unsure
    return value


def _number(value: Any) -> float:
    kind = type(value)
    if kind is float:
        return value  # type: ignore[no-any-return]  # orjson reads no NaN or infinity
    if kind is int:
        return float(value)
    raise _Unsure


def _name(value: Any) -> str:
    if type(value) is not str or _NAME.fullmatch(value) is None:
        raise _Unsure
    return value


def _instant(value: Any) -> datetime:
    if type(value) is not str or _INSTANT.fullmatch(value) is None:
        raise _Unsure
    return datetime.fromisoformat(value)  # ValueError (a 13th month, say): the strict path


def _counts(values: Any, *, non_negative: bool) -> IntArray:
    """A JSON list of integers as int64, or :class:`_Unsure`."""
    if type(values) is not list:
        raise _Unsure
    if not values:
        return np.zeros(0, dtype=np.int64)
    array = np.array(values)
    if array.dtype != np.int64 or array.ndim != 1:
        raise _Unsure
    if non_negative and array.min() < 0:
        raise _Unsure
    return array


def _report(device_id: str, data: dict[str, Any]) -> ParsedReport:
    if not data.keys() <= _TOP:
        raise _Unsure
    if data["schema"] != TelemetryReport.SCHEMA:
        raise _Unsure
    _int(data["schema_version"], 1, TelemetryReport.SCHEMA_VERSION + 1)
    if data["device_id"] != device_id:
        raise _Unsure
    seq = _int(data["seq"], 0, _INT64)
    window_start = _instant(data["window_start"])
    window_end = _instant(data["window_end"])
    if window_end < window_start:
        raise _Unsure
    dropped = _int(data.get("dropped_reports", 0), 0, _INT32)
    rss_bytes: int | None = None
    cpu_seconds: float | None = None
    resources = data.get("resources", _EMPTY)
    if type(resources) is not dict or not resources.keys() <= _RESOURCES:
        raise _Unsure
    for key, value in resources.items():
        if value is None:
            continue
        if key.endswith("_bytes"):
            _int(value, 0, _INT64)
        elif _number(value) < 0:
            raise _Unsure
    rss_bytes = resources.get("rss_bytes")
    cpu = resources.get("cpu_seconds")
    cpu_seconds = None if cpu is None else float(cpu)
    models = data.get("models", [])
    if type(models) is not list or len(models) > _MAX_MODELS:
        raise _Unsure
    return ParsedReport(
        device_id=device_id,
        seq=seq,
        window_start=window_start,
        window_end=window_end,
        dropped_reports=dropped,
        rss_bytes=rss_bytes,
        cpu_seconds=cpu_seconds,
        models=tuple(_window(m) for m in models),
    )


_EMPTY: dict[str, Any] = {}
_EMPTY_LATENCY = np.zeros(N_LATENCY_BUCKETS, dtype=np.int64)
_EMPTY_LATENCY_JSON = orjson.dumps({"counts": [0] * N_LATENCY_BUCKETS}).decode()


def _window(data: Any) -> ParsedWindow:
    if type(data) is not dict or not data.keys() <= _WINDOW:
        raise _Unsure
    latency_data = data.get("latency_ms")
    if latency_data is None:
        if "latency_ms" in data:  # null: not optional
            raise _Unsure
        latency, latency_json = _EMPTY_LATENCY, _EMPTY_LATENCY_JSON
    else:
        if type(latency_data) is not dict or latency_data.keys() != _LATENCY:
            raise _Unsure
        latency = _counts(latency_data["counts"], non_negative=True)
        if latency.size != N_LATENCY_BUCKETS:
            raise _Unsure
        latency_json = orjson.dumps(latency_data).decode()
    drift = data.get("drift")
    return ParsedWindow(
        model_name=_name(data["model_name"]),
        model_version=_int(data["model_version"], 1, _INT32),
        target=_name(data["target"]),
        inferences=_int(data.get("inferences", 0), 0, _INT32),
        errors=_int(data.get("errors", 0), 0, _INT32),
        latency=latency,
        latency_json=latency_json,
        drift_json=None if drift is None else _stored_drift_json(drift),
        sketch=None if drift is None else _sketch(drift),
    )


def _stored_drift_json(drift: dict[str, Any]) -> str:
    """What ``model_windows`` keeps of a checked sketch: see :class:`ParsedWindow`."""
    kept: dict[str, Any] = {"reference_id": drift["reference_id"], "features": []}
    if drift.get("predictions") is not None:
        kept["predictions"] = drift["predictions"]
    return orjson.dumps(kept).decode()


def _moment_row(data: Any) -> MomentRow:
    if type(data) is not dict or not data.keys() <= _MOMENTS:
        raise _Unsure
    n = _int(data.get("n", 0), 0, _INT64)
    mean = _number(data.get("mean", 0.0))
    m2 = _number(data.get("m2", 0.0))
    if m2 < 0:
        raise _Unsure
    low, high = data.get("min"), data.get("max")
    low = None if low is None else _number(low)
    high = None if high is None else _number(high)
    if n == 0 or low is None or high is None:
        return EMPTY_MOMENT
    return (float(n), mean, m2, low, high)


def _feature(data: Any, flat: list[int]) -> tuple[tuple[str, int], MomentRow]:
    """A feature's name and length and its moments; its counts go on ``flat`` (unchecked)."""
    if type(data) is not dict or not data.keys() <= _FEATURE:
        raise _Unsure
    name, counts = data["name"], data["counts"]
    if type(name) is not str or not 1 <= len(name) <= 128:
        raise _Unsure
    if type(counts) is not list or len(counts) > _MAX_FEATURE_COUNTS:
        raise _Unsure
    flat += counts
    moments = data.get("moments", _EMPTY)
    return (name, len(counts)), _moment_row(moments)


_FEATURE_PARTS = itemgetter("name", "counts", "moments")
_MOMENT_PARTS = itemgetter("n", "mean", "m2", "min", "max")
_FIRST = itemgetter(0)


def _features_at_once(
    features: list[Any],
) -> tuple[tuple[tuple[str, int], ...], IntArray, FloatArray]:
    """Every feature checked and converted with a few calls over all of them: the shape
    agents send, every field present and every moment a number. Anything else raises
    :class:`_Unsure` (the feature-by-feature path may still take it)."""
    parts = list(map(_FEATURE_PARTS, features))  # only dicts take a str index
    if sum(map(len, features)) != 3 * len(features):
        raise _Unsure
    names, count_lists, moment_dicts = zip(*parts, strict=True) if parts else ((), (), ())
    if not all(type(name) is str for name in names):
        raise _Unsure
    if names and not (min(map(len, names)) >= 1 and max(map(len, names)) <= 128):
        raise _Unsure
    if not all(type(counts) is list for counts in count_lists):
        raise _Unsure
    lengths = list(map(len, count_lists))
    if lengths and max(lengths) > _MAX_FEATURE_COUNTS:
        raise _Unsure
    rows = list(map(_MOMENT_PARTS, moment_dicts))
    if sum(map(len, moment_dicts)) != 5 * len(moment_dicts):
        raise _Unsure
    moments = np.array(rows) if rows else np.zeros((0, 5))
    if moments.dtype != np.float64:  # None (no min or max) makes objects, a string text
        if moments.dtype != np.int64:
            raise _Unsure
        moments = moments.astype(np.float64)
    n = np.array(list(map(_FIRST, rows))) if rows else np.zeros(0, dtype=np.int64)
    if n.dtype != np.int64 or moments.shape != (len(rows), 5) or (rows and n.min() < 0):
        raise _Unsure
    if rows and moments[:, 2].min() < 0:
        raise _Unsure
    empty = n == 0
    if empty.any():
        moments[empty] = EMPTY_MOMENT
    flat = list(chain.from_iterable(count_lists))
    counts = _counts(flat, non_negative=True)
    return tuple(zip(names, lengths, strict=True)), counts, moments


def _features_one_by_one(
    features: list[Any],
) -> tuple[tuple[tuple[str, int], ...], IntArray, FloatArray]:
    flat: list[int] = []
    shapes: list[tuple[str, int]] = []
    rows: list[MomentRow] = []
    for feature in features:
        shape, row = _feature(feature, flat)
        shapes.append(shape)
        rows.append(row)
    counts = _counts(flat, non_negative=True)
    return tuple(shapes), counts, np.asarray(rows, dtype=np.float64).reshape(-1, 5)


def _sketch(data: Any) -> SketchArrays:
    if type(data) is not dict or not data.keys() <= _SKETCH:
        raise _Unsure
    reference_id, features = data["reference_id"], data["features"]
    if type(reference_id) is not str or _REFERENCE_ID.fullmatch(reference_id) is None:
        raise _Unsure
    if type(features) is not list or len(features) > _MAX_FEATURES:
        raise _Unsure
    try:
        shapes, counts, moments = _features_at_once(features)
    except (_Unsure, KeyError, TypeError, ValueError):
        shapes, counts, moments = _features_one_by_one(features)
    class_counts = confidence_counts = value_counts = None
    value_moments = None
    predictions = data.get("predictions")
    if predictions is not None:
        if type(predictions) is not dict or not predictions.keys() <= _PREDICTIONS:
            raise _Unsure
        part = predictions.get("class_counts")
        class_counts = None if part is None else _counts(part, non_negative=False)
        part = predictions.get("confidence_counts")
        confidence_counts = None if part is None else _counts(part, non_negative=False)
        value = predictions.get("value")
        if value is not None:
            value_flat: list[int] = []
            _shape, value_moments = _feature(value, value_flat)
            value_counts = _counts(value_flat, non_negative=True)
    return SketchArrays(
        reference_id=reference_id,
        features=shapes,
        counts=counts,
        moments=moments,
        class_counts=class_counts,
        confidence_counts=confidence_counts,
        value_counts=value_counts,
        value_moments=value_moments,
        document=data,
    )
