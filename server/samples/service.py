"""Captured samples in the database, and dataset versions made from them.

Keyword-only functions on a sqlmodel ``Session``. :func:`store_sample_batches` (the
ingestor's path) and :func:`purge_samples` write in the caller's transaction;
:func:`add_samples_version` commits (it adds a dataset version, which commits).

What always holds:

- A batch is stored once per ``(device_id, seq, model_name, part)``.
- A sample row gets its label from feedback only: the label posted for the
  prediction the row was answered under, joined by ``(device_id, prediction_id)``
  (and the same model name). Rows without a label -- not labelled yet, or captured
  without a prediction id -- are *not* put in a dataset version: they are counted in
  its lineage (``unlabelled_rows``, ``rows_without_prediction_id``) and stay stored, so
  a later build over the same range takes them once their labels came.
- A samples version is a new version of the dataset the model was trained on (or of
  ``base``): the base version's rows plus the labelled sample rows, validated like any
  upload (:func:`server.datasets.ingest.from_arrays`) with the base's schema -- same
  feature names, label column and class names -- and split with the given seed. Its
  ``source_format`` is ``samples``; its lineage names the base, the model versions,
  the devices whose rows it holds, the range asked for and the windows the rows came
  from, and every row left out and why. The same content again returns the existing
  version (datasets are content-addressed).
- Classification only: labels are class names of the base dataset; a label that is
  not one of them leaves its row out (``label_not_in_dataset``), as does a row whose
  width differs from the dataset's features (``feature_count``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import numpy as np
from pydantic import BaseModel, Field
from sqlalchemy import CursorResult, Table, delete, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from server import registry
from server.artifacts import ArtifactStore
from server.datasets import service as datasets
from server.datasets.ingest import DatasetError, from_arrays
from server.datasets.types import DatasetSchema
from server.drift.service import Scope, resolve_scope
from server.errors import InvalidInputError, NotFoundError
from server.feedback.errors import FeedbackInvalidError
from server.feedback.models import FeedbackRecord
from server.feedback.service import resolve_times
from server.models import Dataset, DatasetVersion, ModelVersion
from server.samples.errors import SamplesInvalidError, SamplesNotFoundError
from server.samples.models import SampleBatchRecord
from shared.messages import SampleBatch

__all__ = [
    "MAX_ROWS_PER_BUILD",
    "SamplesSummary",
    "SamplesVersion",
    "add_samples_version",
    "purge_samples",
    "samples_summary",
    "store_sample_batches",
]

MAX_ROWS_PER_BUILD = 2_000_000
"""Sample rows one build may read; a larger scope is refused (narrow the range or group)."""
MAX_LINEAGE_DEVICES = 500
"""Device ids a lineage lists one by one; beyond, their count and a hash of the list."""
_CHUNK = 400


def _table() -> Table:
    table: Table = SampleBatchRecord.__table__  # type: ignore[attr-defined]
    return table


# ----------------------------------------------------------------------------- ingestion


def store_sample_batches(
    session: Session, batches: Sequence[SampleBatch], *, now: datetime
) -> tuple[int, int]:
    """Insert batches not stored yet (caller's transaction); ``(stored, duplicates)``."""
    unique = {(b.device_id, b.seq, b.model_name, b.part): b for b in batches}
    if not unique:
        return 0, 0
    table = _table()
    dialect = session.get_bind().dialect.name
    statement = (
        (postgresql if dialect == "postgresql" else sqlite)
        .insert(table)
        .on_conflict_do_nothing(index_elements=["device_id", "seq", "model_name", "part"])
        .returning(table.c.device_id)
    )
    rows = []
    for b in unique.values():
        values = np.asarray(b.rows, dtype="<f8")
        rows.append(
            {
                "device_id": b.device_id,
                "seq": b.seq,
                "model_name": b.model_name,
                "part": b.part,
                "parts": b.parts,
                "model_version": b.model_version,
                "target": b.target,
                "window_end": b.window_end,
                "n_rows": int(values.shape[0]),
                "n_features": int(values.shape[1]),
                "rows": values.tobytes(),
                "prediction_ids_json": None
                if b.prediction_ids is None
                else json.dumps(b.prediction_ids, separators=(",", ":")),
                "received_at": now,
            }
        )
    stored = len(session.execute(statement, rows).all())
    return stored, len(batches) - stored


def purge_samples(session: Session, *, before: datetime) -> int:
    """Delete batches captured in windows that ended before ``before``; how many."""
    table = _table()
    result = cast(
        CursorResult[Any], session.execute(delete(table).where(table.c.window_end < before))
    )
    return int(result.rowcount)


# ----------------------------------------------------------------------------- reading


def _scope(session: Session, *, group: str | None, devices: Sequence[str] | None) -> Scope:
    """The drift view's scope (a group's accepted members now, a device list, the fleet),
    its errors translated to this package's."""
    try:
        return resolve_scope(session, group=group, devices=devices)
    except NotFoundError as e:
        raise SamplesNotFoundError(str(e)) from e
    except InvalidInputError as e:
        raise SamplesInvalidError(str(e)) from e


def _times(since: str, until: str | None, now: datetime) -> tuple[datetime, datetime]:
    try:
        return resolve_times(since, until, now=now)
    except FeedbackInvalidError as e:
        raise SamplesInvalidError(str(e)) from e


@dataclass(frozen=True, slots=True)
class _Batch:
    device_id: str
    seq: int
    model_version: int
    window_end: datetime
    rows: np.ndarray
    prediction_ids: list[str | None] | None


@dataclass
class _Joined:
    """The rows of a scope, each with its label (None: none yet)."""

    batches: list[_Batch]
    labels: list[list[str | None]]

    @property
    def rows(self) -> int:
        return sum(b.rows.shape[0] for b in self.batches)

    def count(self, predicate: Any) -> int:
        return sum(
            1
            for batch, labels in zip(self.batches, self.labels, strict=True)
            for i, label in enumerate(labels)
            if predicate(batch, i, label)
        )


def _resolve_versions(
    session: Session, *, model: str, version: str | None
) -> tuple[list[int] | None, ModelVersion]:
    """The model versions asked for (None: all) and the version whose dataset is the base."""
    try:
        registry.get_model(session, name=model)
        chosen = registry.get_version(session, model_name=model, version=version or "latest")
    except NotFoundError as e:
        raise SamplesNotFoundError(str(e)) from e
    return (None if version is None else [chosen.version]), chosen


def _read(
    session: Session,
    *,
    model: str,
    versions: list[int] | None,
    device_ids: list[str] | None,
    since: datetime,
    until: datetime,
) -> _Joined:
    table = _table()
    query = select(table).where(
        table.c.model_name == model, table.c.window_end >= since, table.c.window_end < until
    )
    if versions is not None:
        query = query.where(table.c.model_version.in_(versions))
    chunks: list[Any]
    if device_ids is None:
        chunks = [query]
    else:
        chunks = [
            query.where(table.c.device_id.in_(device_ids[start : start + 5000]))
            for start in range(0, len(device_ids), 5000)
        ]
    batches: list[_Batch] = []
    total = 0
    for chunk in chunks:
        ordered = chunk.order_by(table.c.window_end, table.c.device_id, table.c.seq, table.c.part)
        for row in session.execute(ordered).mappings():
            total += row["n_rows"]
            if total > MAX_ROWS_PER_BUILD:
                raise SamplesInvalidError(
                    f"the scope holds more than {MAX_ROWS_PER_BUILD:,} sample rows; narrow the "
                    "time range, the group or the device list"
                )
            values = np.frombuffer(row["rows"], dtype="<f8").reshape(
                row["n_rows"], row["n_features"]
            )
            ids = (
                None
                if row["prediction_ids_json"] is None
                else json.loads(row["prediction_ids_json"])
            )
            batches.append(
                _Batch(
                    row["device_id"],
                    row["seq"],
                    row["model_version"],
                    row["window_end"],
                    values,
                    ids,
                )
            )
    batches.sort(key=lambda b: (b.window_end, b.device_id, b.seq))
    return _Joined(batches, _labels(session, model, batches))


def _labels(session: Session, model: str, batches: list[_Batch]) -> list[list[str | None]]:
    """Per batch, per row: the true label posted for its prediction (None: none)."""
    keys = sorted(
        {
            (b.device_id, pid)
            for b in batches
            if b.prediction_ids is not None
            for pid in b.prediction_ids
            if pid is not None
        }
    )
    table: Table = FeedbackRecord.__table__  # type: ignore[attr-defined]
    found: dict[tuple[str, str], str] = {}
    for start in range(0, len(keys), _CHUNK):
        rows = session.execute(
            select(table.c.device_id, table.c.prediction_id, table.c.true_label).where(
                tuple_(table.c.device_id, table.c.prediction_id).in_(keys[start : start + _CHUNK]),
                table.c.model_name == model,
            )
        )
        for device_id, prediction_id, label in rows:
            found[(device_id, prediction_id)] = label
    return [
        [None] * b.rows.shape[0]
        if b.prediction_ids is None
        else [None if pid is None else found.get((b.device_id, pid)) for pid in b.prediction_ids]
        for b in batches
    ]


# ----------------------------------------------------------------------------- summary


class SamplesSummary(BaseModel):
    """What has been captured for a model over a scope and range, and how much is labelled."""

    model: str
    versions: list[int] = Field(description="model versions the rows were captured under")
    group: str | None
    devices_in_scope: int | None = Field(description="null: the whole fleet")
    since: datetime
    until: datetime
    batches: int
    rows: int
    labelled_rows: int = Field(description="rows whose prediction has a feedback label")
    unlabelled_rows: int = Field(description="rows with a prediction id but no label yet")
    rows_without_prediction_id: int = Field(description="rows that can never get a label")
    devices: int = Field(description="devices the rows came from")
    first_window_end: datetime | None
    last_window_end: datetime | None


def samples_summary(
    session: Session,
    *,
    model: str,
    version: str | None,
    group: str | None,
    devices: Sequence[str] | None,
    since: str,
    until: str | None,
    now: datetime,
) -> SamplesSummary:
    start, end = _times(since, until, now)
    versions, _ = _resolve_versions(session, model=model, version=version)
    scope = _scope(session, group=group, devices=devices)
    joined = _read(
        session, model=model, versions=versions, device_ids=scope.device_ids, since=start, until=end
    )
    return _summary(model, scope.group, scope.device_ids, start, end, joined)


def _summary(
    model: str,
    group: str | None,
    device_ids: list[str] | None,
    since: datetime,
    until: datetime,
    joined: _Joined,
) -> SamplesSummary:
    batches = joined.batches
    labelled = joined.count(lambda _b, _i, label: label is not None)
    without_id = joined.count(
        lambda b, i, _label: b.prediction_ids is None or b.prediction_ids[i] is None
    )
    return SamplesSummary(
        model=model,
        versions=sorted({b.model_version for b in batches}),
        group=group,
        devices_in_scope=None if device_ids is None else len(device_ids),
        since=since,
        until=until,
        batches=len(batches),
        rows=joined.rows,
        labelled_rows=labelled,
        unlabelled_rows=joined.rows - labelled - without_id,
        rows_without_prediction_id=without_id,
        devices=len({b.device_id for b in batches}),
        first_window_end=batches[0].window_end if batches else None,
        last_window_end=batches[-1].window_end if batches else None,
    )


# ----------------------------------------------------------------------------- dataset versions


class SamplesVersion(BaseModel):
    """The dataset version a build made (or found: the same content existed already)."""

    dataset: str
    version: int
    created: bool = Field(description="false when the dataset already had this exact content")
    sha256: str
    rows: int
    base_version: int
    added_rows: int = Field(description="labelled sample rows added to the base's rows")
    samples: SamplesSummary
    lineage: dict[str, Any]


def _base_version(
    session: Session, *, base: str | None, model_version: ModelVersion
) -> DatasetVersion:
    try:
        if base:
            return datasets.resolve_version(session, base)
        found = session.get(DatasetVersion, model_version.dataset_version_id)
    except DatasetError as e:
        raise SamplesNotFoundError(str(e)) from e
    if found is None:
        raise SamplesNotFoundError("the model version's dataset version no longer exists")
    return found


def _device_lineage(device_ids: list[str]) -> dict[str, Any]:
    if len(device_ids) <= MAX_LINEAGE_DEVICES:
        return {"devices": device_ids, "device_count": len(device_ids)}
    digest = hashlib.sha256("\n".join(device_ids).encode()).hexdigest()
    return {
        "devices": device_ids[:MAX_LINEAGE_DEVICES],
        "device_count": len(device_ids),
        "devices_sha256": digest,
        "devices_note": f"the first {MAX_LINEAGE_DEVICES} ids; devices_sha256 hashes them all",
    }


def add_samples_version(
    session: Session,
    *,
    store: ArtifactStore,
    model: str,
    version: str | None,
    group: str | None,
    devices: Sequence[str] | None,
    since: str,
    until: str | None,
    base: str | None,
    split_seed: int,
    now: datetime,
) -> SamplesVersion:
    """Add the labelled samples of a model (one version, or all) over a scope and range to
    the model's dataset as a new version (see the module docstring). Commits.

    :class:`SamplesInvalidError` when no captured row has a label yet, or the dataset is
    not a classification dataset; :class:`SamplesNotFoundError` for an unknown model,
    version, group or base.
    """
    start, end = _times(since, until, now)
    versions, newest = _resolve_versions(session, model=model, version=version)
    scope = _scope(session, group=group, devices=devices)
    base_row = _base_version(session, base=base, model_version=newest)
    dataset = session.get(Dataset, base_row.dataset_id)
    assert dataset is not None  # a foreign key
    schema = DatasetSchema.model_validate_json(base_row.data_schema_json)
    if schema.task != "classification" or not schema.class_names:
        raise SamplesInvalidError(
            f"dataset {dataset.name!r} is a {schema.task} dataset; samples get their labels from "
            "feedback, which labels classifications only"
        )
    joined = _read(
        session,
        model=model,
        versions=versions,
        device_ids=scope.device_ids,
        since=start,
        until=end,
    )
    summary = _summary(model, scope.group, scope.device_ids, start, end, joined)
    class_index = {name: i for i, name in enumerate(schema.class_names)}
    width = len(schema.feature_names)
    x_parts: list[np.ndarray] = []
    y_parts: list[int] = []
    refused = {"feature_count": 0, "label_not_in_dataset": 0}
    contributors: set[str] = set()
    windows: list[datetime] = []
    for batch, labels in zip(joined.batches, joined.labels, strict=True):
        rows = [i for i, label in enumerate(labels) if label is not None]
        if not rows:
            continue
        if batch.rows.shape[1] != width:
            refused["feature_count"] += len(rows)
            continue
        kept = [i for i in rows if labels[i] in class_index]
        refused["label_not_in_dataset"] += len(rows) - len(kept)
        if not kept:
            continue
        x_parts.append(batch.rows[kept])
        y_parts.extend(class_index[cast(str, labels[i])] for i in kept)
        contributors.add(batch.device_id)
        windows.append(batch.window_end)
    if not x_parts:
        raise SamplesInvalidError(
            f"none of the {summary.rows} sample rows of {model} in this scope and range can be "
            f"added: {summary.labelled_rows} have a label ({summary.unlabelled_rows} await one; "
            f"{summary.rows_without_prediction_id} have no prediction id), "
            f"{refused['feature_count']} do not have the dataset's {width} features and "
            f"{refused['label_not_in_dataset']} have a label the dataset does not know. Post "
            "labels for their predictions (POST /api/v1/feedback, or the agent's /v1/feedback)"
        )
    try:
        loaded = datasets.load_dataset_version(
            session, store=store, dataset_version_id=cast(int, base_row.id)
        )
        base_x = np.concatenate([loaded.x_train, loaded.x_val, loaded.x_test])
        base_y = np.concatenate([loaded.y_train, loaded.y_val, loaded.y_test])
        added_x = np.concatenate(x_parts)
        parsed = from_arrays(
            np.concatenate([base_x, added_x.astype(np.float32)]),
            np.concatenate([base_y, np.asarray(y_parts, dtype=np.int64)]),
            label=schema.label,
            feature_names=schema.feature_names,
            input_shape=schema.input_shape,
            class_names=schema.class_names,
            task="classification",
            source_format="samples",  # type: ignore[arg-type]  # stored as text; not an upload
        )
    except DatasetError as e:
        raise SamplesInvalidError(f"the samples do not make a valid dataset version: {e}") from e
    device_ids = sorted(contributors)
    lineage: dict[str, Any] = {
        "kind": "device_samples",
        "model": model,
        "model_versions": sorted({b.model_version for b in joined.batches}),
        "base": {"dataset": dataset.name, "version": base_row.version, "rows": len(base_y)},
        "scope": {"group": scope.group, "devices": None if scope.group else scope.device_ids},
        "range": {"since": start.isoformat(), "until": end.isoformat()},
        "windows": {"first_end": min(windows).isoformat(), "last_end": max(windows).isoformat()},
        **_device_lineage(device_ids),
        "labels_from": "feedback, joined by (device_id, prediction_id)",
        "sample_rows": summary.rows,
        "added_rows": len(y_parts),
        "unlabelled_rows": summary.unlabelled_rows,
        "rows_without_prediction_id": summary.rows_without_prediction_id,
        "refused_rows": refused,
        "built_at": now.isoformat(),
    }
    if scope.device_ids is not None and len(scope.device_ids) > MAX_LINEAGE_DEVICES:
        lineage["scope"]["devices"] = None  # the contributing devices are listed above
    existing = datasets.find_version_by_content(
        session, name=dataset.name, sha256=parsed.content_sha256
    )
    try:
        added = datasets.add_dataset_version(
            session,
            store=store,
            name=dataset.name,
            parsed=parsed,
            source_name=f"samples of {model} from {len(device_ids)} devices"[:256],
            split_seed=split_seed,
            lineage=lineage,
        )
    except DatasetError as e:
        raise SamplesInvalidError(str(e)) from e
    return SamplesVersion(
        dataset=dataset.name,
        version=added.version,
        created=existing is None,
        sha256=added.sha256,
        rows=added.rows,
        base_version=base_row.version,
        added_rows=len(y_parts),
        samples=summary,
        lineage=json.loads(added.lineage_json or "{}"),
    )
