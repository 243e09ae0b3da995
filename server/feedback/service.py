"""Labels for past predictions in the database, and the live accuracy they give.

Keyword-only functions on a sqlmodel ``Session``; none of them commits (the caller's
transaction holds the change). :func:`accuracy` is what other packages call (the
alert rule "accuracy below the SLA"); :func:`accuracy_report` is the API's view.

What always holds:

- One row per ``(device_id, prediction_id)``: the first label a prediction gets is
  kept. The same outcome posted again changes nothing (idempotent); another label,
  model or predicted label for a prediction that has one is a conflict -- refused
  with :class:`~server.feedback.errors.FeedbackConflictError` on the API, dropped and
  counted (``feedback_conflict``) on the MQTT path.
- A label is valid only if the model version exists in the registry, is a classifier,
  and both the predicted and the true label are among its class names (the labels
  its bundle carries: its dataset's ``class_names``). The device must be known.
- ``correct`` is ``predicted_label == true_label``; ``at`` is ``predicted_at`` when
  given, else ``labelled_at``. Accuracy over a range counts the outcomes whose ``at``
  lies in ``[since, until)`` -- exact times, not rounded to hours.
- :func:`record_feedback` validates every item before it writes any (all or
  nothing); :func:`store_device_feedback` keeps the valid outcomes of a report and
  returns the others as refusals with a reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import Table, case, func, select, tuple_
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from server import registry
from server.datasets.types import DatasetSchema
from server.drift.errors import TimeRangeError
from server.drift.service import Scope, resolve_scope
from server.drift.timerange import MAX_RANGE, parse_instant
from server.errors import InvalidInputError, NotFoundError
from server.feedback.errors import (
    FeedbackConflictError,
    FeedbackInvalidError,
    FeedbackNotFoundError,
)
from server.feedback.models import FeedbackRecord, FeedbackSource
from server.fleet.models import Device
from server.models import DatasetVersion, ModelVersion

__all__ = [
    "AccuracyFigure",
    "AccuracyReport",
    "FeedbackInput",
    "LabelAccuracy",
    "Refusal",
    "StoreResult",
    "VersionAccuracy",
    "accuracy",
    "accuracy_by_label",
    "accuracy_by_version",
    "accuracy_report",
    "model_labels",
    "record_feedback",
    "resolve_times",
    "store_device_feedback",
]

_CHUNK = 400
"""Keys per ``IN (...)`` lookup: far below every backend's bind-parameter limit."""
_DEVICE_CHUNK = 5000


@dataclass(frozen=True, slots=True)
class FeedbackInput:
    """One labelled outcome, as posted to the API or forwarded by a device."""

    device_id: str
    prediction_id: str
    model_name: str
    model_version: int
    predicted_label: str
    true_label: str
    labelled_at: datetime
    predicted_at: datetime | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.device_id, self.prediction_id)


@dataclass(frozen=True, slots=True)
class Refusal:
    """An outcome not stored: ``reason`` is a short code, ``detail`` says what was wrong."""

    device_id: str
    prediction_id: str
    reason: str
    detail: str


@dataclass
class StoreResult:
    """What :func:`store_device_feedback` did."""

    stored: int = 0
    duplicates: int = 0
    refused: list[Refusal] = field(default_factory=list)


# ----------------------------------------------------------------------------- labels


def model_labels(session: Session, *, model_name: str, model_version: int | str) -> list[str]:
    """The class names a model version predicts (its dataset's ``class_names``).

    :class:`FeedbackNotFoundError` for an unknown model or version,
    :class:`FeedbackInvalidError` for a model that is not a classifier.
    """
    try:
        version = registry.get_version(session, model_name=model_name, version=model_version)
    except NotFoundError as e:
        raise FeedbackNotFoundError(str(e)) from e
    return _labels_of(session, version, model_name)


def _labels_of(session: Session, version: ModelVersion, model_name: str) -> list[str]:
    dataset_version = session.get(DatasetVersion, version.dataset_version_id)
    schema = (
        None
        if dataset_version is None
        else DatasetSchema.model_validate_json(dataset_version.data_schema_json)
    )
    if schema is None or schema.task != "classification" or not schema.class_names:
        raise FeedbackInvalidError(
            f"{model_name} v{version.version} is not a classification model; feedback labels "
            "classifications only"
        )
    return list(schema.class_names)


class _Labels:
    """Class names per (model, version), each looked up once; failures remembered too."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._found: dict[tuple[str, int], list[str] | Exception] = {}

    def get(self, model_name: str, model_version: int) -> list[str]:
        key = (model_name, model_version)
        if key not in self._found:
            try:
                self._found[key] = model_labels(
                    self._session, model_name=model_name, model_version=model_version
                )
            except (FeedbackNotFoundError, FeedbackInvalidError) as e:
                self._found[key] = e
        found = self._found[key]
        if isinstance(found, Exception):
            raise found
        return found


def _shown(labels: Sequence[str], limit: int = 20) -> str:
    text = ", ".join(repr(label) for label in labels[:limit])
    return text + (f", ... ({len(labels)} in all)" if len(labels) > limit else "")


def _problem(item: FeedbackInput, labels: _Labels) -> tuple[str, str] | None:
    """``(reason, detail)`` when the outcome cannot be stored, else None."""
    what = f"{item.model_name} v{item.model_version}"
    try:
        names = labels.get(item.model_name, item.model_version)
    except FeedbackNotFoundError as e:
        return "unknown_model", str(e)
    except FeedbackInvalidError as e:
        return "not_classification", str(e)
    for field_name, value in (
        ("predicted_label", item.predicted_label),
        ("true_label", item.true_label),
    ):
        if value not in names:
            return (
                "bad_label",
                f"{field_name} {value!r} is not a label of {what}; its labels are {_shown(names)}",
            )
    return None


# ----------------------------------------------------------------------------- writing


def _table() -> Table:
    table: Table = FeedbackRecord.__table__  # type: ignore[attr-defined]
    return table


def _existing(session: Session, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Any]:
    table = _table()
    wanted = sorted(set(keys))
    found: dict[tuple[str, str], Any] = {}
    for start in range(0, len(wanted), _CHUNK):
        rows = session.execute(
            select(table).where(
                tuple_(table.c.device_id, table.c.prediction_id).in_(wanted[start : start + _CHUNK])
            )
        ).mappings()
        for row in rows:
            found[(row["device_id"], row["prediction_id"])] = row
    return found


def _same(row: Any, item: FeedbackInput) -> bool:
    return (
        row["model_name"] == item.model_name
        and row["model_version"] == item.model_version
        and row["predicted_label"] == item.predicted_label
        and row["true_label"] == item.true_label
    )


def _same_outcome(a: FeedbackInput, b: FeedbackInput) -> bool:
    return (a.model_name, a.model_version, a.predicted_label, a.true_label) == (
        b.model_name,
        b.model_version,
        b.predicted_label,
        b.true_label,
    )


def _conflict_detail(row: Any, item: FeedbackInput) -> str:
    return (
        f"prediction {item.prediction_id} of {item.device_id} already has a label: "
        f"{row['model_name']} v{row['model_version']} predicted {row['predicted_label']!r}, "
        f"true label {row['true_label']!r} (the first label stays)"
    )


def _insert(
    session: Session, items: Sequence[FeedbackInput], *, source: FeedbackSource, now: datetime
) -> set[tuple[str, str]]:
    """Insert rows not there yet; return the keys this statement inserted."""
    if not items:
        return set()
    table = _table()
    dialect = session.get_bind().dialect.name
    statement = (
        (postgresql if dialect == "postgresql" else sqlite)
        .insert(table)
        .on_conflict_do_nothing(index_elements=["device_id", "prediction_id"])
        .returning(table.c.device_id, table.c.prediction_id)
    )
    rows = [
        {
            "device_id": item.device_id,
            "prediction_id": item.prediction_id,
            "model_name": item.model_name,
            "model_version": item.model_version,
            "predicted_label": item.predicted_label,
            "true_label": item.true_label,
            "correct": item.predicted_label == item.true_label,
            "predicted_at": item.predicted_at,
            "labelled_at": item.labelled_at,
            "at": item.predicted_at or item.labelled_at,
            "source": source.value,
            "received_at": now,
        }
        for item in items
    ]
    return {(d, p) for d, p in session.execute(statement, rows)}


def record_feedback(
    session: Session,
    items: Sequence[FeedbackInput],
    *,
    source: FeedbackSource = FeedbackSource.API,
    now: datetime,
) -> list[tuple[FeedbackRecord, bool]]:
    """Store labelled outcomes, all or nothing; per item, its row and whether it is new.

    Raises :class:`FeedbackNotFoundError` (unknown device, model or version),
    :class:`FeedbackInvalidError` (a label the model does not know, a regression model,
    a prediction twice in one request) or :class:`FeedbackConflictError` (a prediction
    labelled otherwise before) -- naming the item -- before writing anything.
    """
    keys = [item.key for item in items]
    if len(set(keys)) != len(keys):
        raise FeedbackInvalidError("a prediction appears twice in one request")
    device_ids = sorted({item.device_id for item in items})
    known = set(
        session.execute(
            select(Device.id).where(Device.id.in_(device_ids))  # type: ignore[call-overload,attr-defined]
        ).scalars()
    )
    labels = _Labels(session)
    for item in items:
        if item.device_id not in known:
            raise FeedbackNotFoundError(f"no device {item.device_id!r} in this fleet")
        problem = _problem(item, labels)
        if problem is not None:
            reason, detail = problem
            error = FeedbackNotFoundError if reason == "unknown_model" else FeedbackInvalidError
            raise error(detail)
    existing = _existing(session, keys)
    for item in items:
        row = existing.get(item.key)
        if row is not None and not _same(row, item):
            raise FeedbackConflictError(_conflict_detail(row, item))
    new = [item for item in items if item.key not in existing]
    inserted = _insert(session, new, source=source, now=now)
    raced = [item for item in new if item.key not in inserted]
    if raced:  # another writer stored these between our read and our insert
        existing |= _existing(session, [item.key for item in raced])
        for item in raced:
            if not _same(existing[item.key], item):
                raise FeedbackConflictError(_conflict_detail(existing[item.key], item))
    session.flush()
    results = []
    for item in items:
        record = session.get(FeedbackRecord, item.key)
        assert record is not None
        results.append((record, item.key in inserted))
    return results


def store_device_feedback(
    session: Session, items: Sequence[FeedbackInput], *, now: datetime
) -> StoreResult:
    """Store outcomes forwarded by devices (their devices were checked by the caller):
    the valid ones once each; the rest come back as refusals (``unknown_model``,
    ``not_classification``, ``bad_label``, ``feedback_conflict``)."""
    result = StoreResult()
    labels = _Labels(session)
    by_key: dict[tuple[str, str], FeedbackInput] = {}
    for item in items:  # each bad outcome counts, as often as it comes
        problem = _problem(item, labels)
        if problem is not None:
            result.refused.append(Refusal(item.device_id, item.prediction_id, *problem))
            continue
        first = by_key.get(item.key)  # twice within the batch: the first one counts
        if first is None:
            by_key[item.key] = item
        elif _same_outcome(first, item):
            result.duplicates += 1
        else:
            result.refused.append(
                Refusal(
                    item.device_id,
                    item.prediction_id,
                    "feedback_conflict",
                    f"prediction {item.prediction_id} of {item.device_id} is labelled "
                    f"{first.true_label!r} earlier in the same batch (the first label stays)",
                )
            )
    valid = list(by_key.values())
    existing = _existing(session, [item.key for item in valid])
    new = []
    for item in valid:
        row = existing.get(item.key)
        if row is None:
            new.append(item)
        elif _same(row, item):
            result.duplicates += 1
        else:
            result.refused.append(
                Refusal(
                    item.device_id,
                    item.prediction_id,
                    "feedback_conflict",
                    _conflict_detail(row, item),
                )
            )
    inserted = _insert(session, new, source=FeedbackSource.DEVICE, now=now)
    result.stored = len(inserted)
    result.duplicates += len(new) - len(inserted)  # another worker stored these first
    return result


# ----------------------------------------------------------------------------- accuracy


def _scoped(
    query: Any, *, device_ids: Sequence[str] | None, since: datetime, until: datetime
) -> list[Any]:
    """Run ``query`` (grouped sums) per chunk of ``device_ids`` (None: every device)."""
    table = _table()
    query = query.where(table.c.at >= since, table.c.at < until)
    if device_ids is None:
        return [query]
    ids = sorted(set(device_ids))
    return [
        query.where(table.c.device_id.in_(ids[start : start + _DEVICE_CHUNK]))
        for start in range(0, len(ids), _DEVICE_CHUNK)
    ]


def _sums(table: Table) -> tuple[Any, Any]:
    return (
        func.coalesce(func.sum(case((table.c.correct, 1), else_=0)), 0),
        func.count(),
    )


def accuracy(
    session: Session,
    *,
    model_name: str,
    model_version: int,
    device_ids: Sequence[str] | None,
    since: datetime,
    until: datetime,
) -> tuple[int, int]:
    """``(correct, total)``: the labelled predictions of one model version whose ``at``
    lies in ``[since, until)``, from ``device_ids`` (None: every device; an empty list:
    none). Accuracy is ``correct / total`` (undefined when ``total`` is 0)."""
    table = _table()
    correct_sum, total_count = _sums(table)
    base = select(correct_sum, total_count).where(
        table.c.model_name == model_name, table.c.model_version == model_version
    )
    correct = total = 0
    for query in _scoped(base, device_ids=device_ids, since=since, until=until):
        c, t = session.execute(query).one()
        correct, total = correct + int(c), total + int(t)
    return correct, total


def accuracy_by_version(
    session: Session,
    *,
    model_name: str,
    device_ids: Sequence[str] | None,
    since: datetime,
    until: datetime,
) -> dict[int, tuple[int, int]]:
    """:func:`accuracy` for every version of the model with labels in the range."""
    table = _table()
    correct_sum, total_count = _sums(table)
    base = (
        select(table.c.model_version, correct_sum, total_count)
        .where(table.c.model_name == model_name)
        .group_by(table.c.model_version)
    )
    out: dict[int, tuple[int, int]] = {}
    for query in _scoped(base, device_ids=device_ids, since=since, until=until):
        for version, c, t in session.execute(query):
            had = out.get(int(version), (0, 0))
            out[int(version)] = (had[0] + int(c), had[1] + int(t))
    return dict(sorted(out.items()))


def accuracy_by_label(
    session: Session,
    *,
    model_name: str,
    model_version: int,
    device_ids: Sequence[str] | None,
    since: datetime,
    until: datetime,
) -> dict[str, tuple[int, int]]:
    """Per true label: ``(correct, total)`` -- each class's recall -- over the same scope."""
    table = _table()
    correct_sum, total_count = _sums(table)
    base = (
        select(table.c.true_label, correct_sum, total_count)
        .where(table.c.model_name == model_name, table.c.model_version == model_version)
        .group_by(table.c.true_label)
    )
    out: dict[str, tuple[int, int]] = {}
    for query in _scoped(base, device_ids=device_ids, since=since, until=until):
        for label, c, t in session.execute(query):
            had = out.get(label, (0, 0))
            out[label] = (had[0] + int(c), had[1] + int(t))
    return dict(sorted(out.items()))


class AccuracyFigure(BaseModel):
    correct: int
    total: int
    accuracy: float | None = Field(description="correct / total; null without labels")

    @classmethod
    def of(cls, correct: int, total: int) -> AccuracyFigure:
        return cls(correct=correct, total=total, accuracy=correct / total if total else None)


class VersionAccuracy(AccuracyFigure):
    version: int


class LabelAccuracy(AccuracyFigure):
    label: str = Field(description="the true label; accuracy here is that class's recall")


class AccuracyReport(BaseModel):
    """Live accuracy from labelled feedback, for one model over a scope and time range."""

    model: str
    version: int | None = Field(description="the version asked for; null: every version")
    group: str | None
    devices: list[str] | None = Field(description="the device list asked for, if any")
    devices_in_scope: int | None = Field(description="null: the whole fleet")
    since: datetime
    until: datetime
    overall: AccuracyFigure
    versions: list[VersionAccuracy]
    labels: list[LabelAccuracy] = Field(description="per true label (with one version only)")


def _scope(session: Session, *, group: str | None, devices: Sequence[str] | None) -> Scope:
    """The drift view's scope (a group's accepted members now, a device list, the fleet),
    its errors translated to this package's."""
    try:
        return resolve_scope(session, group=group, devices=devices)
    except NotFoundError as e:
        raise FeedbackNotFoundError(str(e)) from e
    except InvalidInputError as e:
        raise FeedbackInvalidError(str(e)) from e


def _instant(text: str | None, *, now: datetime, name: str) -> datetime:
    if text is None or not text.strip():
        return now.astimezone(UTC)
    try:
        return parse_instant(text, now=now, name=name)
    except TimeRangeError as e:
        raise FeedbackInvalidError(str(e)) from e


def resolve_times(since: str, until: str | None, *, now: datetime) -> tuple[datetime, datetime]:
    """``since`` / ``until`` as the drift view takes them (``24h``, ``7d``, ISO 8601,
    ``now``), exact (not rounded); :class:`FeedbackInvalidError` naming a bad one."""
    start = _instant(since, now=now, name="since")
    end = _instant(until, now=now, name="until")
    if start >= end:
        raise FeedbackInvalidError(
            f"since ({start.isoformat()}) must be before until ({end.isoformat()})"
        )
    if end - start > MAX_RANGE:
        raise FeedbackInvalidError(f"the range is longer than {MAX_RANGE.days} days")
    return start, end


def accuracy_report(
    session: Session,
    *,
    model: str,
    version: str | None,
    group: str | None,
    devices: Sequence[str] | None,
    since: str,
    until: str | None,
    now: datetime,
) -> AccuracyReport:
    """The API's accuracy view: one version (number, alias or ``latest``) or every version
    with labels, over a group's accepted members now, a device list or the fleet."""
    start, end = resolve_times(since, until, now=now)
    try:
        registry.get_model(session, name=model)
        chosen = (
            None
            if version is None
            else registry.get_version(session, model_name=model, version=version)
        )
    except NotFoundError as e:
        raise FeedbackNotFoundError(str(e)) from e
    scope = _scope(session, group=group, devices=devices)
    device_ids = scope.device_ids
    if chosen is not None:
        _labels_of(session, chosen, model)  # 422 for a regression model
        figures = {
            chosen.version: accuracy(
                session,
                model_name=model,
                model_version=chosen.version,
                device_ids=device_ids,
                since=start,
                until=end,
            )
        }
        by_label = accuracy_by_label(
            session,
            model_name=model,
            model_version=chosen.version,
            device_ids=device_ids,
            since=start,
            until=end,
        )
    else:
        figures = accuracy_by_version(
            session, model_name=model, device_ids=device_ids, since=start, until=end
        )
        by_label = {}
    correct = sum(c for c, _ in figures.values())
    total = sum(t for _, t in figures.values())
    return AccuracyReport(
        model=model,
        version=None if chosen is None else chosen.version,
        group=scope.group,
        devices=None if scope.group is not None else device_ids,
        devices_in_scope=None if device_ids is None else len(device_ids),
        since=start,
        until=end,
        overall=AccuracyFigure.of(correct, total),
        versions=[
            VersionAccuracy(version=v, **AccuracyFigure.of(c, t).model_dump())
            for v, (c, t) in figures.items()
        ],
        labels=[
            LabelAccuracy(label=label, **AccuracyFigure.of(c, t).model_dump())
            for label, (c, t) in by_label.items()
        ],
    )
