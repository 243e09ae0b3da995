"""Feedback over HTTP: ground-truth labels for past predictions, and live accuracy.

``POST /feedback`` stores one labelled outcome, ``POST /feedback/batch`` up to
:data:`MAX_BATCH` at once (all or nothing). Each is idempotent per
``(device_id, prediction_id)``: a new label answers 201, the same one again 200, another
label for a prediction that has one 409 (the first label stays). An unknown device,
model or version answers 404; a label the model does not know, or a model that is no
classifier, 422 naming it.

``GET /feedback/accuracy`` answers the accuracy of a model's labelled predictions per
version (and per true label, for one version), over a group's accepted members now, a
device list or the whole fleet, and a time range placed by when the predictions were
served (exact times, not rounded).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from pydantic import AwareDatetime, BaseModel, Field, StringConstraints
from sqlmodel import Session

from server.api.deps import NowDep, SessionDep
from server.feedback import service
from server.feedback.models import FeedbackRecord
from server.feedback.service import AccuracyReport, FeedbackInput

__all__ = ["MAX_BATCH", "FeedbackBatch", "FeedbackCreate", "FeedbackPublic", "router"]

router = APIRouter(prefix="/feedback", tags=["feedback"])

MAX_BATCH = 1000

DeviceId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
PredictionId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]
ModelName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
Label = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class FeedbackCreate(BaseModel):
    """The ground truth for one prediction a device served."""

    device_id: DeviceId
    prediction_id: PredictionId = Field(description="the id the device's /v1/predict answered")
    model: ModelName
    model_version: int = Field(ge=1)
    predicted_label: Label = Field(description="what the model answered")
    true_label: Label = Field(description="the correct label")
    predicted_at: AwareDatetime | None = Field(None, description="when it was served")
    labelled_at: AwareDatetime | None = Field(None, description="default: now")

    def to_input(self, now: datetime) -> FeedbackInput:
        return FeedbackInput(
            device_id=self.device_id,
            prediction_id=self.prediction_id,
            model_name=self.model,
            model_version=self.model_version,
            predicted_label=self.predicted_label,
            true_label=self.true_label,
            predicted_at=self.predicted_at,
            labelled_at=self.labelled_at or now,
        )


class FeedbackBatch(BaseModel):
    items: list[FeedbackCreate] = Field(min_length=1, max_length=MAX_BATCH)


class FeedbackPublic(BaseModel):
    device_id: str
    prediction_id: str
    model: str
    model_version: int
    predicted_label: str
    true_label: str
    correct: bool
    predicted_at: datetime | None
    labelled_at: datetime
    source: str
    created: bool = Field(description="false when this outcome was stored before")


class FeedbackBatchResult(BaseModel):
    created: int
    unchanged: int
    items: list[FeedbackPublic]


def _public(record: FeedbackRecord, created: bool) -> FeedbackPublic:
    return FeedbackPublic(
        device_id=record.device_id,
        prediction_id=record.prediction_id,
        model=record.model_name,
        model_version=record.model_version,
        predicted_label=record.predicted_label,
        true_label=record.true_label,
        correct=record.correct,
        predicted_at=record.predicted_at,
        labelled_at=record.labelled_at,
        source=record.source,
        created=created,
    )


def _record(session: Session, items: list[FeedbackCreate], now: datetime) -> list[FeedbackPublic]:
    try:
        results = service.record_feedback(session, [i.to_input(now) for i in items], now=now)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return [_public(record, created) for record, created in results]


@router.post(
    "",
    response_model=FeedbackPublic,
    status_code=status.HTTP_201_CREATED,
    summary="The true label of one past prediction (idempotent per device and prediction id)",
)
def post_feedback(
    body: FeedbackCreate, session: SessionDep, now: NowDep, response: Response
) -> FeedbackPublic:
    (result,) = _record(session, [body], now)
    if not result.created:
        response.status_code = status.HTTP_200_OK
    return result


@router.post(
    "/batch",
    response_model=FeedbackBatchResult,
    summary=f"Up to {MAX_BATCH} labelled predictions at once (all or nothing)",
)
def post_feedback_batch(
    body: FeedbackBatch, session: SessionDep, now: NowDep
) -> FeedbackBatchResult:
    results = _record(session, body.items, now)
    created = sum(r.created for r in results)
    return FeedbackBatchResult(created=created, unchanged=len(results) - created, items=results)


@router.get(
    "/accuracy",
    response_model=AccuracyReport,
    summary="Live accuracy from labelled feedback, per version, over a group, devices or fleet",
)
def get_accuracy(
    session: SessionDep,
    now: NowDep,
    model: Annotated[str, Query(min_length=1, max_length=128, description="model name")],
    version: Annotated[
        str | None,
        Query(max_length=64, description="version number, alias or 'latest'; default: every one"),
    ] = None,
    group: Annotated[
        str | None, Query(max_length=64, description="a device group: its accepted members now")
    ] = None,
    devices: Annotated[
        list[str] | None,
        Query(description="device ids instead of a group; repeat or separate by commas"),
    ] = None,
    since: Annotated[
        str, Query(max_length=64, description="a duration ago (30m, 24h, 7d) or an ISO 8601 time")
    ] = "24h",
    until: Annotated[
        str | None, Query(max_length=64, description="end (exclusive), as since; default now")
    ] = None,
) -> AccuracyReport:
    """``correct / total`` of the labelled predictions whose serving time (else labelling
    time) lies in ``[since, until)``; per version, and per true label for one version."""
    listed = None
    if devices:
        listed = [part for value in devices for part in value.split(",") if part.strip()]
    return service.accuracy_report(
        session,
        model=model,
        version=version,
        group=group,
        devices=listed,
        since=since,
        until=until,
        now=now,
    )
