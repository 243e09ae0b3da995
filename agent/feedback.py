"""Feedback and samples on the device: prediction ids, labels matched to them, and the
captured samples turned into wire messages.

:class:`PredictionLog` gives every prediction the local API serves an id and keeps the
last ``capacity`` of them -- which model answered (name, version, target, label names)
and which class it predicted -- so that a label posted later *to the device*
(``POST /v1/feedback``) can be checked against the model that made the prediction and
forwarded as a :class:`~shared.messages.LabelledOutcome`. :func:`sample_batches` cuts
one window's :class:`~agent.monitoring.CapturedSamples` into
:class:`~shared.messages.SampleBatch` payloads that fit the wire limit, and
:func:`samples_fit` is the outbox budget samples keep to.

What always holds:

- A prediction id is ``{token}-{n}``: ``token`` is 12 random hex digits drawn when the
  log is made (each agent start), ``n`` counts predictions from 1. Ids are unique per
  device with overwhelming probability, across restarts too, and say which log issued
  them; an id from an earlier run, or one older than the last ``capacity``
  predictions, is reported as unknown -- never matched to the wrong prediction.
- The log is bounded: fixed arrays of ``capacity`` slots (about 30 bytes each) and one
  entry per distinct model served since start. :meth:`PredictionLog.record` (the
  request path) takes a lock for a few array writes and builds the id strings.
- A label is accepted only from the label set of the model that made the prediction
  (its label names, or its class indexes where it names none); classification only.
  A prediction keeps the first label forwarded for it: the same label again is
  idempotent, another one is a conflict.
- Samples never take more than half of the outbox's bounds (rows and bytes), so
  telemetry and events always keep the other half; rows that are not finite numbers
  (which JSON cannot carry) are left out and counted.

Pure or in-memory only: nothing here does I/O.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import AgentError
from agent.monitoring import CapturedSamples
from shared.bundle import BundleManifest
from shared.errors import PayloadTooLargeError
from shared.messages import MAX_SAMPLE_ROWS, SampleBatch

__all__ = [
    "FeedbackError",
    "LabelConflictError",
    "LoggedPrediction",
    "PredictionLog",
    "UnknownLabelError",
    "UnknownPredictionError",
    "sample_batches",
    "samples_fit",
]

_NO_CLASS = -1
_MAX_PARTS = 1024


class FeedbackError(AgentError):
    """A label cannot be matched to a prediction; the message says why."""


class UnknownPredictionError(FeedbackError):
    """The prediction id was not issued by this agent run, or is no longer remembered."""


class UnknownLabelError(FeedbackError):
    """The label is not one of the predicting model's labels (or the model is no classifier)."""


class LabelConflictError(FeedbackError):
    """The prediction was already labelled otherwise."""


@dataclass(frozen=True, slots=True)
class _ModelEntry:
    name: str
    version: int
    target: str
    labels: tuple[str, ...] | None
    n_classes: int | None
    """None: the model is not a classifier (feedback labels classifications only)."""


@dataclass(frozen=True, slots=True)
class LoggedPrediction:
    """One remembered prediction: the model that made it and the class it answered."""

    prediction_id: str
    model_name: str
    model_version: int
    target: str
    predicted_class: int | None
    labels: tuple[str, ...] | None
    n_classes: int | None
    predicted_at: datetime

    def label_of(self, class_index: int) -> str:
        """The model's name for a class (its index as text where it names none)."""
        if self.labels is not None and 0 <= class_index < len(self.labels):
            return self.labels[class_index]
        return str(class_index)

    @property
    def predicted_label(self) -> str | None:
        return None if self.predicted_class is None else self.label_of(self.predicted_class)

    def class_of(self, label: Any) -> int:
        """The class index of ``label`` (a label name, or a class index as a number or
        text), or :class:`UnknownLabelError` naming the labels the model knows."""
        what = f"{self.model_name} v{self.model_version}"
        if self.n_classes is None or self.predicted_class is None:
            raise UnknownLabelError(
                f"prediction {self.prediction_id} was made by {what}, which is not a "
                "classifier: feedback labels classifications only"
            )
        if isinstance(label, str) and self.labels is not None and label in self.labels:
            return self.labels.index(label)
        if isinstance(label, int) and not isinstance(label, bool):
            index = label
        elif isinstance(label, str) and label.isdigit() and self.labels is None:
            index = int(label)
        else:
            index = -1
        if 0 <= index < self.n_classes:
            return index
        known = (
            ", ".join(repr(name) for name in self.labels[:20])
            + (f", ... ({len(self.labels)} in all)" if len(self.labels) > 20 else "")
            if self.labels is not None
            else f"class indexes 0 to {self.n_classes - 1}"
        )
        raise UnknownLabelError(f"{label!r} is not a label of {what}; it knows {known}")


class PredictionLog:
    """The last ``capacity`` predictions served, by id (see the module docstring). Thread-safe."""

    def __init__(
        self,
        capacity: int,
        *,
        wall_clock: Callable[[], float] = time.time,
        token: str | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("the prediction log needs a capacity of at least 1")
        self.capacity = capacity
        self.token = token if token is not None else secrets.token_hex(6)
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._next = 1
        self._number = np.zeros(capacity, dtype=np.int64)  # 0: an empty slot
        self._model = np.zeros(capacity, dtype=np.int32)
        self._class = np.full(capacity, _NO_CLASS, dtype=np.int32)
        self._at = np.zeros(capacity, dtype=np.float64)
        self._true = np.full(capacity, _NO_CLASS, dtype=np.int32)
        self._models: list[_ModelEntry] = []
        self._model_index: dict[tuple[str, int, str], int] = {}
        self._last: tuple[BundleManifest, int] | None = None

    def _index_of(self, manifest: BundleManifest, n_classes: int | None) -> int:
        last = self._last
        if last is not None and last[0] is manifest:
            return last[1]
        key = (manifest.model_name, manifest.model_version, manifest.target)
        index = self._model_index.get(key)
        if index is None:
            labels = tuple(manifest.labels) if manifest.labels else None
            classifier = manifest.task == "classification"
            self._models.append(
                _ModelEntry(
                    name=manifest.model_name,
                    version=manifest.model_version,
                    target=manifest.target,
                    labels=labels,
                    n_classes=(len(labels) if labels else n_classes) if classifier else None,
                )
            )
            index = self._model_index[key] = len(self._models) - 1
        self._last = (manifest, index)
        return index

    def record(
        self,
        manifest: BundleManifest,
        classes: npt.NDArray[np.int64] | None,
        *,
        rows: int,
        n_classes: int | None = None,
    ) -> list[str]:
        """Remember ``rows`` predictions of ``manifest`` (``classes``: the predicted class
        of each, None for a regression); return their ids, in row order."""
        if rows <= 0:
            return []
        now = self._wall_clock()
        if rows == 1:  # the common request: scalar writes cost a fifth of slicing
            with self._lock:
                n = self._next
                self._next += 1
                slot = n % self.capacity
                self._number[slot] = n
                self._model[slot] = self._index_of(manifest, n_classes)
                self._class[slot] = _NO_CLASS if classes is None else int(classes[0])
                self._at[slot] = now
                self._true[slot] = _NO_CLASS
            return [f"{self.token}-{n}"]
        with self._lock:
            first = self._next
            self._next += rows
            model = self._index_of(manifest, n_classes)
            kept = min(rows, self.capacity)  # a batch larger than the log keeps its tail
            numbers = np.arange(first + rows - kept, first + rows, dtype=np.int64)
            slots = numbers % self.capacity
            self._number[slots] = numbers
            self._model[slots] = model
            self._class[slots] = _NO_CLASS if classes is None else classes[rows - kept :]
            self._at[slots] = now
            self._true[slots] = _NO_CLASS
        token = self.token
        return [f"{token}-{n}" for n in range(first, first + rows)]

    def _slot(self, prediction_id: str) -> int:
        """The slot holding ``prediction_id`` (lock held), or :class:`UnknownPredictionError`."""
        token, _, number = prediction_id.rpartition("-")
        if token != self.token or not number.isdigit():
            raise UnknownPredictionError(
                f"prediction {prediction_id!r} was not served by this agent since it started "
                "(ids from /v1/predict are remembered until the agent restarts)"
            )
        n = int(number)
        slot = n % self.capacity
        if n <= 0 or n >= self._next or int(self._number[slot]) != n:
            raise UnknownPredictionError(
                f"prediction {prediction_id!r} is no longer remembered: the agent keeps the "
                f"last {self.capacity} predictions (limits.prediction_log_size)"
            )
        return slot

    def lookup(self, prediction_id: str) -> LoggedPrediction:
        """The prediction behind an id, or :class:`UnknownPredictionError` saying why not."""
        with self._lock:
            slot = self._slot(prediction_id)
            model = self._models[int(self._model[slot])]
            predicted = int(self._class[slot])
            at = float(self._at[slot])
        return LoggedPrediction(
            prediction_id=prediction_id,
            model_name=model.name,
            model_version=model.version,
            target=model.target,
            predicted_class=None if predicted == _NO_CLASS else predicted,
            labels=model.labels,
            n_classes=model.n_classes,
            predicted_at=datetime.fromtimestamp(at, UTC),
        )

    def labelled_as(self, prediction_id: str) -> int | None:
        """The class already forwarded as this prediction's label, if any."""
        with self._lock:
            true = int(self._true[self._slot(prediction_id)])
        return None if true == _NO_CLASS else true

    def mark_labelled(self, prediction_id: str, true_class: int) -> None:
        """Remember the label forwarded for a prediction (the first one stays)."""
        with self._lock:
            try:
                slot = self._slot(prediction_id)
            except UnknownPredictionError:
                return  # overwritten meanwhile: nothing left to protect
            if int(self._true[slot]) == _NO_CLASS:
                self._true[slot] = true_class


# ----------------------------------------------------------------------------- samples


def samples_fit(*, rows: int, bytes_stored: int, max_rows: int, max_bytes: int, size: int) -> bool:
    """Whether one more sample message of ``size`` bytes keeps the outbox within half its
    bounds (``rows`` and ``bytes_stored``: what it holds now)."""
    return rows + 1 <= max_rows // 2 and bytes_stored + size <= max_bytes // 2


def sample_batches(
    device_id: str, captured: CapturedSamples, *, max_bytes: int = SampleBatch.MAX_BYTES
) -> tuple[list[SampleBatch], int]:
    """One window's captured rows as :class:`SampleBatch` payloads of at most ``max_bytes``
    each (split into parts when needed); also how many rows were left out as not finite.

    Raises :class:`AgentError` if a single row does not fit ``max_bytes``.
    """
    rows = np.asarray(captured.rows, dtype=np.float64)
    if rows.ndim != 2 or rows.shape[0] == 0:
        return [], 0
    finite = np.isfinite(rows).all(axis=1)
    skipped = int((~finite).sum())
    kept = np.flatnonzero(finite)
    if kept.size == 0:
        return [], skipped
    ids: Sequence[str | None] | None = captured.prediction_ids
    limit = min(kept.size, _MAX_PARTS)
    parts = min(max(1, math.ceil(kept.size / MAX_SAMPLE_ROWS)), limit)
    while True:
        chunks = np.array_split(kept, parts)
        batches = [
            SampleBatch(
                device_id=device_id,
                seq=captured.seq,
                part=i,
                parts=parts,
                model_name=captured.model_name,
                model_version=captured.model_version,
                target=captured.target,
                window_end=captured.window_end,
                rows=rows[chunk].tolist(),
                prediction_ids=None if ids is None else [ids[j] for j in chunk.tolist()],
            )
            for i, chunk in enumerate(chunks)
        ]
        try:
            if all(len(b.to_bytes()) <= max_bytes for b in batches):
                return batches, skipped
        except PayloadTooLargeError:
            pass
        if parts >= limit:
            break
        parts = min(parts * 2, limit)
    raise AgentError(
        f"captured samples of {captured.model_name} (window {captured.seq}) do not fit "
        f"{max_bytes}-byte messages even one row at a time"
    )
