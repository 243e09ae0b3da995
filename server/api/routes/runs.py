"""Training runs: queue one, follow its progress, cancel it.

Creating a run only validates and queues it (``202``); a job runner trains it in a
worker process, so no request ever waits for training. A spec that cannot fit the
dataset is refused here with ``422``, before anything is queued.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, status
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session, col, select

from server.api.deps import SessionDep
from server.datasets.types import DatasetSchema
from server.errors import ConflictError
from server.models import Dataset, DatasetVersion, Model, ModelVersion, TrainingRun
from server.training import jobs
from server.training.spec import Arch, spec_with_overrides

__all__ = ["RunCreate", "RunLineage", "RunPublic", "RunSummary", "router"]

router = APIRouter(prefix="/runs", tags=["training"])

RunStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class RunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(
        min_length=1, max_length=200, description="NAME or NAME@VERSION (default: newest)"
    )
    model: str = Field(pattern=NAME_PATTERN, description="the model this run makes a version of")
    arch: Arch | None = Field(
        None, description="default: cnn2d for 3-D inputs, cnn1d for 2-D, else mlp"
    )
    epochs: int | None = Field(None, ge=1, le=500)
    spec: dict[str, Any] = Field(
        default_factory=dict,
        description="overrides of the default spec for the dataset: hidden_units, filters, "
        "kernel_size, dense_units, dropout, batch_norm, epochs, batch_size, learning_rate, "
        "seed, k_folds, early_stopping_patience",
    )


class RunLineage(BaseModel):
    """Dataset version -> run -> model version."""

    dataset: str | None
    dataset_version: int | None
    dataset_version_id: int
    run_id: int
    model: str
    model_version: int | None
    model_version_id: int | None


class RunSummary(BaseModel):
    id: int
    model_name: str
    dataset: str | None = Field(description="NAME@VERSION of the dataset version")
    dataset_version_id: int
    status: RunStatus
    phase: str
    arch: str | None
    epochs: int | None
    seed: int | None
    progress: dict[str, Any] = Field(
        description="the latest epoch: stage, fold, folds, epoch, epochs, loss, metrics"
    )
    metrics: dict[str, Any] = Field(
        description="test, validation, cross_validation, parameters, epochs_trained, best_epoch"
    )
    error: str | None
    cancel_requested: bool
    model_version_id: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class RunPublic(RunSummary):
    spec: dict[str, Any]
    history: list[dict[str, Any]] = Field(description="per epoch of the final fit")
    environment: dict[str, Any] = Field(description="package versions and the seed")
    worker: str | None
    lineage: RunLineage


def _loads(text: str, default: Any) -> Any:
    try:
        return json.loads(text) if text else default
    except ValueError:
        return default


def _lineage_lookups(
    session: Session, runs: list[TrainingRun]
) -> tuple[dict[int, tuple[str, int]], dict[int, int]]:
    """(dataset_version_id -> (dataset name, version), model_version_id -> version)."""
    version_ids = {run.dataset_version_id for run in runs}
    datasets: dict[int, tuple[str, int]] = {}
    if version_ids:
        rows = session.exec(
            select(DatasetVersion.id, Dataset.name, DatasetVersion.version)
            .join(Dataset, col(Dataset.id) == col(DatasetVersion.dataset_id))
            .where(col(DatasetVersion.id).in_(version_ids))
        ).all()
        datasets = {row[0]: (row[1], row[2]) for row in rows if row[0] is not None}
    model_version_ids = {run.model_version_id for run in runs if run.model_version_id}
    models: dict[int, int] = {}
    if model_version_ids:
        found = session.exec(
            select(ModelVersion.id, ModelVersion.version).where(
                col(ModelVersion.id).in_(model_version_ids)
            )
        ).all()
        models = {row[0]: row[1] for row in found if row[0] is not None}
    return datasets, models


def _summary_fields(run: TrainingRun, dataset: tuple[str, int] | None) -> dict[str, Any]:
    spec = _loads(run.spec_json, {})
    assert run.id is not None
    return {
        "id": run.id,
        "model_name": run.model_name,
        "dataset": f"{dataset[0]}@{dataset[1]}" if dataset else None,
        "dataset_version_id": run.dataset_version_id,
        "status": run.status,
        "phase": run.phase,
        "arch": spec.get("arch"),
        "epochs": spec.get("epochs"),
        "seed": spec.get("seed"),
        "progress": _loads(run.progress_json, {}),
        "metrics": _loads(run.metrics_json, {}),
        "error": run.error,
        "cancel_requested": run.cancel_requested,
        "model_version_id": run.model_version_id,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
    }


def run_public(session: Session, run: TrainingRun) -> RunPublic:
    datasets, models = _lineage_lookups(session, [run])
    dataset = datasets.get(run.dataset_version_id)
    assert run.id is not None
    return RunPublic(
        **_summary_fields(run, dataset),
        spec=_loads(run.spec_json, {}),
        history=_loads(run.history_json, []),
        environment=_loads(run.environment_json, {}),
        worker=run.worker,
        lineage=RunLineage(
            dataset=dataset[0] if dataset else None,
            dataset_version=dataset[1] if dataset else None,
            dataset_version_id=run.dataset_version_id,
            run_id=run.id,
            model=run.model_name,
            model_version=models.get(run.model_version_id) if run.model_version_id else None,
            model_version_id=run.model_version_id,
        ),
    )


def _resolve_dataset(session: Session, ref: str) -> DatasetVersion:
    # Imported here: the datasets service is heavier than this router needs at import time,
    # and raises NotFoundError (404) for an unknown name or version.
    from server.datasets.service import resolve_version

    return resolve_version(session, ref)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=RunPublic,
    summary="Queue a training run",
    responses={404: {"description": "no such dataset"}, 422: {"description": "invalid spec"}},
)
def create_training_run(body: RunCreate, session: SessionDep) -> RunPublic:
    """Validate the spec against the dataset's schema and queue the run; a runner trains it."""
    version = _resolve_dataset(session, body.dataset)
    assert version.id is not None
    schema = DatasetSchema.model_validate_json(version.data_schema_json)
    overrides = dict(body.spec)
    if body.epochs is not None:
        overrides["epochs"] = body.epochs
    spec = spec_with_overrides(body.arch, schema, overrides)
    existing = session.exec(select(Model).where(Model.name == body.model)).first()
    if existing is not None and existing.task != schema.task:
        raise ConflictError(
            f"model {body.model!r} is a {existing.task} model; dataset {body.dataset!r} is "
            f"for {schema.task}"
        )
    run = jobs.create_run(session, model_name=body.model, dataset_version_id=version.id, spec=spec)
    return run_public(session, run)


@router.get("", response_model=list[RunSummary], summary="Training runs, newest first")
def list_training_runs(
    session: SessionDep,
    model: str | None = None,
    run_status: Annotated[RunStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[RunSummary]:
    runs = jobs.list_runs(session, model_name=model, status=run_status, limit=limit)
    datasets, _ = _lineage_lookups(session, runs)
    return [
        RunSummary(**_summary_fields(run, datasets.get(run.dataset_version_id))) for run in runs
    ]


@router.get("/{run_id}", response_model=RunPublic, summary="One training run")
def get_training_run(run_id: int, session: SessionDep) -> RunPublic:
    """Status, phase, progress, history, metrics, error and lineage."""
    return run_public(session, jobs.get_run(session, run_id=run_id))


@router.post(
    "/{run_id}/cancel",
    response_model=RunPublic,
    summary="Cancel a training run",
    responses={409: {"description": "the run has already finished"}},
)
def cancel_training_run(run_id: int, session: SessionDep) -> RunPublic:
    """A queued run is cancelled at once; a running one is stopped by its runner."""
    return run_public(session, jobs.request_cancel(session, run_id=run_id))
