"""One telemetry window of the models the agent serves: counts, latency, drift, resources.

:class:`WindowMonitor` is fed once per ``predict`` call (:meth:`~WindowMonitor.record`)
and, once per window, turns what it counted into a :class:`~shared.messages.TelemetryReport`
(:meth:`~WindowMonitor.close_window`).

What always holds:

- ``record()`` is the only per-inference work. It increments counters (one of them
  a latency bucket, preallocated) and appends the rows to a bounded pending list;
  it reads no clock, does no I/O and builds no pydantic object. Pending rows are
  binned against the drift reference many at a time (when the list is full, on
  :meth:`~WindowMonitor.flush`, and when the window closes), where numpy's cost per
  row is smallest.
- Drift counts equal those of one :class:`~shared.drift.DriftAccumulator` fed the same
  rows: counts add up whatever the batches, and moments agree to float rounding.
- ``inferences`` counts rows; the latency histogram counts ``predict`` calls (one per
  ``record()``), in the fixed buckets of :mod:`shared.latency`.
- One lock guards all state, so HTTP threads may record concurrently.
- Every buffer is bounded: pending drift rows (binned once a model has 512 of them,
  or :data:`PENDING_DRIFT_BYTES` worth as float64), latency (fixed buckets), captured
  samples (at most ``capture.max_per_window`` rows and ``capture.max_bytes`` per
  window, and ``capture.max_bytes`` waiting for :meth:`~WindowMonitor.take_samples`).
- Resources: RSS now, CPU seconds since the process started, free space on the data
  directory's disk, seconds since the monitor was made (the agent's uptime).
- Window length is measured on the injected monotonic ``clock``; window start and end
  are read from the injected ``wall_clock``, and an end is never before its start.
- Input sample capture is off unless ``capture.enabled``; when on, each window keeps
  a uniform reservoir sample of the rows it saw, each with the prediction id it was
  answered under when the caller gave one (so a label posted later can be joined).
"""

from __future__ import annotations

import logging
import math
import os
import resource
import shutil
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.config import CaptureConfig
from agent.runtime import Prediction
from shared.bundle import BundleManifest
from shared.drift import DriftAccumulator
from shared.errors import DriftError
from shared.latency import LATENCY_BOUNDS_MS, N_LATENCY_BUCKETS, latency_quantile
from shared.messages import LatencyHistogram, ModelWindow, Resources, TelemetryReport

__all__ = [
    "PENDING_DRIFT_BYTES",
    "CapturedSamples",
    "WindowMonitor",
    "percentiles",
    "read_resources",
]

log = logging.getLogger(__name__)

PENDING_DRIFT_BYTES = 512 * 1024
"""Raw rows (as float64) a model may hold before they are binned against its reference."""

# Binning costs least per row around 512 rows at a time (measured on the digits model's
# 64 features: 1.5 us a row at 512, 2.0 at 1024, where the arrays outgrow the caches).
_MAX_PENDING_ROWS = 512


@dataclass(frozen=True, slots=True)
class CapturedSamples:
    """Raw input rows sampled uniformly from one model's share of one closed window."""

    model_name: str
    model_version: int
    target: str
    seq: int
    window_end: datetime
    rows: npt.NDArray[np.float64]
    prediction_ids: tuple[str | None, ...] | None = None
    """Per row, the id of the prediction it was answered under (None: no ids were given)."""


def percentiles(counts: Sequence[int] | npt.NDArray[np.int64]) -> dict[str, float | None]:
    """p50, p95 and p99 (bucket upper bounds, ms) of a latency histogram; None when empty.

    A percentile in the overflow bucket is ``inf``.
    """
    return {
        "p50": latency_quantile(counts, 0.50),
        "p95": latency_quantile(counts, 0.95),
        "p99": latency_quantile(counts, 0.99),
    }


def read_resources(data_dir: Path | None = None) -> Resources:
    """This process's resident memory and CPU time (since it started), and free disk space.

    RSS comes from ``/proc/self/statm``; where there is none, from the peak resident
    size ``getrusage`` reports (an upper bound). Whatever cannot be read is None.
    """
    return Resources(
        rss_bytes=_rss_bytes(),
        cpu_seconds=time.process_time(),
        disk_free_bytes=_disk_free(data_dir),
    )


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):
        return None
    return int(peak) if os.uname().sysname == "Darwin" else int(peak) * 1024  # KiB on Linux


def _disk_free(data_dir: Path | None) -> int | None:
    if data_dir is None:
        return None
    try:
        return shutil.disk_usage(data_dir).free
    except OSError:
        return None


def _utc_now() -> datetime:
    return datetime.now(UTC)


# ----------------------------------------------------------------------------- capture


class _Reservoir:
    """A uniform sample of at most ``capacity`` rows from a stream (Li's Algorithm L).

    Past the first ``capacity`` rows, the index of the next row to keep is drawn
    ahead of time, so a row that is not kept costs one comparison.
    """

    def __init__(self, max_rows: int, max_bytes: int, rng: np.random.Generator) -> None:
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._rng = rng
        self._capacity: int | None = None  # set by the first row's size
        self._rows: list[npt.NDArray[np.float64]] = []
        self._ids: list[str | None] = []
        self._any_id = False
        self._seen = 0
        self._next = 0
        self._w = 1.0

    def offer(self, rows: npt.NDArray[Any], ids: Sequence[str] | None = None) -> None:
        if rows.shape[0] == 0:
            return
        if ids is not None and len(ids) != rows.shape[0]:
            ids = None  # a caller's bug; capture never fails an inference
        self._any_id = self._any_id or ids is not None
        if self._capacity is None:
            self._capacity = min(self._max_rows, self._max_bytes // max(rows[0].size * 8, 1))
        capacity = self._capacity
        start, end = self._seen, self._seen + rows.shape[0]
        while len(self._rows) < capacity and self._seen < end:
            self._rows.append(np.array(rows[self._seen - start], dtype=np.float64))
            self._ids.append(None if ids is None else ids[self._seen - start])
            self._seen += 1
            if len(self._rows) == capacity:
                self._w = math.exp(math.log(self._random()) / capacity)
                self._advance()
        while capacity and len(self._rows) == capacity and self._next < end:
            slot = int(self._rng.integers(capacity))
            self._rows[slot] = np.array(rows[self._next - start], dtype=np.float64)
            self._ids[slot] = None if ids is None else ids[self._next - start]
            self._w *= math.exp(math.log(self._random()) / capacity)
            self._advance()
        self._seen = end

    def _random(self) -> float:
        return float(self._rng.random()) or 1e-300  # log(0) would fail

    def _advance(self) -> None:
        skip = math.floor(math.log(self._random()) / math.log1p(-self._w)) if self._w < 1 else 0
        self._next = self._seen + skip if self._next < self._seen else self._next + 1 + skip

    def take(self) -> npt.NDArray[np.float64] | None:
        if not self._rows:
            return None
        return np.stack(self._rows)

    def taken_ids(self) -> tuple[str | None, ...] | None:
        """The prediction ids of the rows :meth:`take` returns (None if none were given)."""
        return tuple(self._ids) if self._any_id else None


# ----------------------------------------------------------------------------- one model


class _ModelStats:
    """One model's counts in the current window. Not thread-safe: the monitor locks."""

    def __init__(
        self,
        manifest: BundleManifest,
        capture: CaptureConfig,
        rng: np.random.Generator,
    ) -> None:
        self.manifest = manifest
        self.key = (manifest.model_name, manifest.model_version, manifest.target)
        self.inferences = 0
        self.errors: dict[str, int] = {}
        # A list: adding one to a Python int is twice as fast as to a numpy element.
        self.latency = [0] * N_LATENCY_BUCKETS
        reference = manifest.drift_reference
        self.drift = DriftAccumulator(reference) if reference is not None else None
        self.n_features = len(reference.features) if reference is not None else 0
        predictions = reference.predictions if reference is not None else None
        # Which part of a prediction drift counts: probabilities, a value, or nothing.
        self.keeps_probabilities = predictions is not None and (
            predictions.class_counts is not None or predictions.confidence_counts is not None
        )
        self.n_classes = (
            len(predictions.class_counts)
            if predictions is not None and predictions.class_counts is not None
            else None
        )
        self.keeps_values = predictions is not None and predictions.value is not None
        self.pending_limit = max(
            1, min(_MAX_PENDING_ROWS, PENDING_DRIFT_BYTES // (8 * max(self.n_features, 1)))
        )
        self.pending_rows: list[npt.NDArray[np.float64]] = []
        self.pending_outputs: list[npt.NDArray[Any]] = []
        self.pending = 0
        self.drift_skipped = 0
        self._capture = capture
        self._rng = rng
        self.reservoir = self._new_reservoir()

    def _new_reservoir(self) -> _Reservoir | None:
        if not self._capture.enabled:
            return None
        return _Reservoir(self._capture.max_per_window, self._capture.max_bytes, self._rng)

    @property
    def active_in_window(self) -> bool:
        return self.inferences > 0 or bool(self.errors)

    def add(self, rows: npt.NDArray[Any], prediction: Prediction, n: int) -> None:
        """Queue rows and outputs for binning (the drift reference is there)."""
        if rows.ndim != 2 or rows.shape[1] != self.n_features:
            if rows.size != n * self.n_features:  # a caller's bug; monitoring never raises
                self.drift_skipped += n
                return
            rows = rows.reshape(n, self.n_features)
        if self.keeps_probabilities:
            outputs = prediction.probabilities
            if outputs is None:  # a classifier without probabilities: argmax still counts
                outputs = prediction.outputs
            if self.n_classes is not None and outputs.shape[1] != self.n_classes:
                self.drift_skipped += n
                return
            self.pending_outputs.append(outputs)
        elif self.keeps_values:
            self.pending_outputs.append(prediction.outputs)
        self.pending_rows.append(rows.copy())  # callers may reuse their input buffer
        self.pending += n
        if self.pending >= self.pending_limit:
            self.fold()

    def fold(self) -> None:
        """Bin the pending rows against the reference, all at once."""
        if not self.pending_rows or self.drift is None:
            return
        rows_list, outputs_list = self.pending_rows, self.pending_outputs
        self.pending_rows, self.pending_outputs, pending = [], [], self.pending
        self.pending = 0
        rows = rows_list[0] if len(rows_list) == 1 else np.concatenate(rows_list)
        outputs = None
        if outputs_list:
            outputs = outputs_list[0] if len(outputs_list) == 1 else np.concatenate(outputs_list)
        try:
            if self.keeps_probabilities:
                self.drift.update(rows, probabilities=outputs)
            elif self.keeps_values and outputs is not None:
                self.drift.update(rows, predicted_values=outputs.reshape(pending, -1)[:, 0])
            else:
                self.drift.update(rows)
        except DriftError as e:  # monitoring never fails an inference
            self.drift_skipped += pending
            log.warning("drift counting skipped %d rows of %s: %s", pending, self.key, e)

    def window(self) -> ModelWindow:
        self.fold()
        drift = self.drift.sketch() if self.drift is not None and self.drift.rows else None
        name, version, target = self.key
        return ModelWindow(
            model_name=name,
            model_version=version,
            target=target,
            inferences=self.inferences,
            errors=sum(self.errors.values()),
            latency_ms=LatencyHistogram(counts=list(self.latency)),
            drift=drift,
        )

    def reset(self) -> None:
        self.inferences = 0
        self.errors = {}
        self.latency = [0] * N_LATENCY_BUCKETS
        self.pending_rows, self.pending_outputs, self.pending = [], [], 0
        self.drift_skipped = 0
        if self.drift is not None:
            self.drift.reset()
        self.reservoir = self._new_reservoir()

    def snapshot(self) -> dict[str, Any]:
        name, version, target = self.key
        return {
            "model_name": name,
            "model_version": version,
            "target": target,
            "inferences": self.inferences,
            "errors": dict(self.errors),
            "latency_ms": percentiles(self.latency),
            "drift_rows": (self.drift.rows if self.drift is not None else 0) + self.pending,
            "drift_skipped_rows": self.drift_skipped,
        }


# ----------------------------------------------------------------------------- the monitor


class WindowMonitor:
    """Counts inferences, errors, latency and drift per model, one window at a time."""

    def __init__(
        self,
        *,
        device_id: str,
        window_seconds: float,
        capture: CaptureConfig | None = None,
        data_dir: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = _utc_now,
        rng: np.random.Generator | None = None,
    ) -> None:
        if window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        self.device_id = device_id
        self.window_seconds = window_seconds
        self._capture = capture if capture is not None else CaptureConfig()
        self._data_dir = data_dir
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng if rng is not None else np.random.default_rng()
        self._lock = threading.Lock()
        self._started = clock()
        self._opened = self._started
        self._window_start = wall_clock()
        self._active: _ModelStats | None = None
        self._models: dict[tuple[str, int, str], _ModelStats] = {}
        self._unattributed_errors: dict[str, int] = {}
        self._samples: list[CapturedSamples] = []

    # -- the inference path

    def set_model(self, manifest: BundleManifest | None) -> None:
        """Count what follows against ``manifest`` (None: no model is active).

        A model replaced within a window still reports what it did in that window.
        """
        with self._lock:
            if manifest is None:
                self._active = None
                return
            self._active = self._stats_for(manifest)
            self._active.manifest = manifest  # the same model, perhaps re-read

    def _stats_for(self, manifest: BundleManifest) -> _ModelStats:
        key = (manifest.model_name, manifest.model_version, manifest.target)
        stats = self._models.get(key)
        if stats is None:
            stats = self._models[key] = _ModelStats(manifest, self._capture, self._rng)
        return stats

    def record(
        self,
        rows_raw: npt.NDArray[Any],
        prediction: Prediction,
        latency_ms: float,
        *,
        manifest: BundleManifest | None = None,
        prediction_ids: Sequence[str] | None = None,
    ) -> None:
        """Count one ``predict`` call: its rows (raw, before preprocessing) and outputs.

        The prediction's arrays are kept (not copied) until they are binned; a
        :class:`~agent.runtime.Prediction` is never changed after it is returned.

        ``manifest`` names the model that answered, when it may no longer be the
        active one; by default the active model. Nothing is counted with no model.
        ``prediction_ids`` (one per row) go with the rows sample capture keeps.
        """
        n = len(prediction.outputs)
        if n == 0:
            return
        bucket = bisect_left(LATENCY_BOUNDS_MS, latency_ms)
        with self._lock:
            stats = self._active
            if manifest is not None and (stats is None or manifest is not stats.manifest):
                stats = self._stats_for(manifest)
            if stats is None:
                return
            stats.inferences += n
            stats.latency[bucket] += 1
            if stats.drift is not None:
                stats.add(rows_raw, prediction, n)
            if stats.reservoir is not None and rows_raw.size % n == 0:
                stats.reservoir.offer(rows_raw.reshape(n, -1), prediction_ids)

    def record_error(self, kind: str, *, manifest: BundleManifest | None = None) -> None:
        """Count one ``predict`` request that produced no prediction, by ``kind``.

        Attributed to ``manifest`` or else the active model; with neither it is
        counted apart (see :meth:`snapshot`) and sent nowhere.
        """
        with self._lock:
            stats = self._stats_for(manifest) if manifest is not None else self._active
            errors = stats.errors if stats is not None else self._unattributed_errors
            errors[kind] = errors.get(kind, 0) + 1

    def flush(self) -> None:
        """Bin pending rows now, so that the request path rarely has to."""
        with self._lock:
            for stats in self._models.values():
                stats.fold()

    # -- the window

    def window_due(self) -> bool:
        return self.seconds_until_due() <= 0

    def seconds_until_due(self) -> float:
        return self.window_seconds - (self._clock() - self._opened)

    def close_window(self, seq: int, dropped_reports: int = 0) -> TelemetryReport:
        """The report of the window so far; a new window starts now.

        The report names the active model (even idle) and any other model that
        served or failed in the window.
        """
        with self._lock:
            now = self._clock()
            end = max(self._wall_clock(), self._window_start)
            models = []
            for key, stats in list(self._models.items()):
                if stats is self._active or stats.active_in_window:
                    models.append(stats.window())
                    self._keep_samples(stats, seq, end)
                if stats is self._active:
                    stats.reset()
                else:
                    del self._models[key]
            start = self._window_start
            self._window_start, self._opened = end, now
            self._unattributed_errors = {}
        resources = read_resources(self._data_dir)
        resources.uptime_seconds = max(now - self._started, 0.0)
        return TelemetryReport(
            device_id=self.device_id,
            seq=seq,
            window_start=start,
            window_end=end,
            models=models,
            resources=resources,
            dropped_reports=dropped_reports,
        )

    def _keep_samples(self, stats: _ModelStats, seq: int, end: datetime) -> None:
        rows = stats.reservoir.take() if stats.reservoir is not None else None
        if rows is None or stats.reservoir is None:
            return
        name, version, target = stats.key
        ids = stats.reservoir.taken_ids()
        self._samples.append(CapturedSamples(name, version, target, seq, end, rows, ids))
        total = sum(s.rows.nbytes for s in self._samples)
        while self._samples and total > self._capture.max_bytes:  # the oldest go first
            total -= self._samples.pop(0).rows.nbytes

    def take_samples(self) -> list[CapturedSamples]:
        """Samples captured in closed windows and not taken yet, oldest first."""
        with self._lock:
            samples, self._samples = self._samples, []
        return samples

    def snapshot(self) -> dict[str, Any]:
        """The current window so far, as plain data (for a status page)."""
        with self._lock:
            return {
                "window_seconds": self.window_seconds,
                "window_age_seconds": self._clock() - self._opened,
                "active_model": None if self._active is None else self._active.key[0],
                "models": [stats.snapshot() for stats in self._models.values()],
                "unattributed_errors": dict(self._unattributed_errors),
            }
