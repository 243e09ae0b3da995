"""The model registry over HTTP: models, versions with lineage, per-target artifacts, aliases."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile, status
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from sqlmodel import Session, select

from server import registry
from server.api.deps import ArtifactsDep, SessionDep
from server.auth import audit
from server.auth.deps import PrincipalDep
from server.errors import ConflictError, InvalidInputError, NotFoundError
from server.models import Dataset, Model, ModelVersion, TargetArtifact, TrainingRun
from server.pipeline.types import GateConfig

router = APIRouter(prefix="/models", tags=["models"])


class ArtifactView(BaseModel):
    target: str
    format: str
    quantization: str
    runtime: str
    size_bytes: int | None
    metric_name: str
    metric_value: float | None
    metric_delta: float | None = Field(
        description="vs the float model: points lost / % RMSE gained"
    )
    latency_p50_ms: float | None
    ops: list[dict[str, Any]]
    gate_passed: bool
    gate_reasons: list[str]
    error: str | None
    bundle_sha256: str | None
    bundle_length: int | None
    bundle_url: str | None


class VersionSummary(BaseModel):
    version: int
    status: str
    source: str
    created_at: datetime
    aliases: list[str]
    metrics: dict[str, Any]
    targets_passed: list[str]


class ModelSummary(BaseModel):
    name: str
    task: str
    latest_version: int | None
    aliases: dict[str, int]
    created_at: datetime


class ModelDetail(ModelSummary):
    gates: GateConfig
    versions: list[VersionSummary]


class VersionView(BaseModel):
    model: str
    version: int
    status: str
    source: str
    notes: str
    error: str | None
    created_at: datetime
    aliases: list[str]
    lineage: dict[str, Any]
    metrics: dict[str, Any]
    preprocessing: list[dict[str, Any]]
    run: dict[str, Any] | None
    artifacts: list[ArtifactView]


class VersionUpdate(BaseModel):
    notes: str = Field(max_length=4000, description="free text kept with the version")


class PromoteRequest(BaseModel):
    version: str = Field(description="a version number, an existing alias, or 'latest'")


class AliasView(BaseModel):
    model: str
    alias: str
    version: int


def _artifact_view(model: Model, version: ModelVersion, row: TargetArtifact) -> ArtifactView:
    url = None
    if row.bundle_sha256:
        url = (
            f"/api/v1/models/{model.name}/versions/{version.version}/artifacts/{row.target}/bundle"
        )
    return ArtifactView(
        target=row.target,
        format=row.format,
        quantization=row.quantization,
        runtime=row.runtime,
        size_bytes=row.size_bytes,
        metric_name=row.metric_name,
        metric_value=row.metric_value,
        metric_delta=row.metric_delta,
        latency_p50_ms=row.latency_p50_ms,
        ops=json.loads(row.ops_json),
        gate_passed=row.gate_passed,
        gate_reasons=json.loads(row.gate_reasons_json),
        error=row.error,
        bundle_sha256=row.bundle_sha256,
        bundle_length=row.bundle_length,
        bundle_url=url,
    )


def _summary(session: Session, model: Model) -> ModelSummary:
    versions = registry.list_versions(session, model=model)
    return ModelSummary(
        name=model.name,
        task=model.task,
        latest_version=versions[-1].version if versions else None,
        aliases=registry.aliases_of(session, model=model),
        created_at=model.created_at,
    )


@router.get("", response_model=list[ModelSummary], summary="List models")
def list_models(session: SessionDep) -> list[ModelSummary]:
    return [_summary(session, m) for m in registry.list_models(session)]


@router.get("/{name}", response_model=ModelDetail, summary="A model and its versions")
def show_model(name: str, session: SessionDep) -> ModelDetail:
    model = registry.get_model(session, name=name)
    aliases = registry.aliases_of(session, model=model)
    versions = []
    for v in registry.list_versions(session, model=model):
        versions.append(
            VersionSummary(
                version=v.version,
                status=v.status,
                source=v.source,
                created_at=v.created_at,
                aliases=sorted(a for a, n in aliases.items() if n == v.version),
                metrics=json.loads(v.metrics_json),
                targets_passed=[
                    a.target for a in registry.list_artifacts(session, version=v) if a.gate_passed
                ],
            )
        )
    return ModelDetail(
        **_summary(session, model).model_dump(),
        gates=GateConfig.model_validate_json(model.gates_json or "{}"),
        versions=versions,
    )


@router.get(
    "/{name}/versions/{version}",
    response_model=VersionView,
    summary="A version (number, alias or 'latest') with lineage, metrics and artifacts",
)
def show_version(name: str, version: str, session: SessionDep) -> VersionView:
    detail = registry.version_detail(session, model_name=name, version=version)
    run = None
    if detail.run is not None:
        run = {
            "id": detail.run.id,
            "spec": json.loads(detail.run.spec_json),
            "environment": json.loads(detail.run.environment_json),
            "history": json.loads(detail.run.history_json),
        }
    v = detail.version
    return VersionView(
        model=detail.model.name,
        version=v.version,
        status=v.status,
        source=v.source,
        notes=v.notes,
        error=v.error,
        created_at=v.created_at,
        aliases=detail.aliases,
        lineage=detail.lineage(),
        metrics=json.loads(v.metrics_json),
        preprocessing=json.loads(v.preprocessing_json),
        run=run,
        artifacts=[_artifact_view(detail.model, v, a) for a in detail.artifacts],
    )


@router.patch(
    "/{name}/versions/{version}",
    response_model=VersionView,
    summary="Edit a version's notes (everything else about a version is immutable)",
)
def update_version(
    name: str, version: str, body: VersionUpdate, session: SessionDep, who: PrincipalDep
) -> VersionView:
    found = registry.get_version(session, model_name=name, version=version)
    found.notes = body.notes
    session.add(found)
    audit.record(
        session,
        actor=who.name,
        action="model.notes",
        target=f"model:{name}@{found.version}",
        detail={"notes": body.notes},
    )
    session.commit()
    return show_version(name, str(found.version), session)


@router.get(
    "/{name}/versions/{version}/artifacts/{target}/bundle",
    response_class=FileResponse,
    summary="Download the signed bundle of one target (supports HTTP range requests)",
)
def download_bundle(
    name: str, version: str, target: str, session: SessionDep, store: ArtifactsDep
) -> FileResponse:
    detail = registry.version_detail(session, model_name=name, version=version)
    for row in detail.artifacts:
        if row.target == target and row.bundle_sha256:
            return FileResponse(
                store.path(row.bundle_sha256),
                media_type="application/vnd.edgefleet.bundle",
                filename=f"{name}-v{detail.version.version}-{target}.efb",
            )
    raise NotFoundError(f"{name} v{detail.version.version} has no bundle for target {target!r}")


@router.put(
    "/{name}/aliases/{alias}",
    response_model=AliasView,
    summary="Promote: point an alias at a version that passed its gates",
)
def promote(
    name: str, alias: str, body: PromoteRequest, session: SessionDep, who: PrincipalDep
) -> AliasView:
    row = registry.promote(session, model_name=name, version=body.version, alias=alias)
    version = session.get(ModelVersion, row.model_version_id)
    assert version is not None
    audit.record(
        session,
        actor=who.name,
        action="model.promote",
        target=f"model:{name}",
        detail={"alias": alias, "version": version.version, "asked": body.version},
    )
    session.commit()
    return AliasView(model=name, alias=alias, version=version.version)


@router.put("/{name}/gates", response_model=GateConfig, summary="Gates for future versions")
def set_gates(name: str, gates: GateConfig, session: SessionDep, who: PrincipalDep) -> GateConfig:
    registry.set_gates(session, model_name=name, gates=gates)
    audit.record(
        session,
        actor=who.name,
        action="model.gates",
        target=f"model:{name}",
        detail=gates.model_dump(mode="json"),
    )
    session.commit()
    return gates


class ImportAccepted(BaseModel):
    run_id: int
    status: str
    model: str
    dataset: str
    dataset_version: int
    format: str


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@router.post(
    "/{name}/imports",
    response_model=ImportAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Bring your own model: a .keras file or a zipped SavedModel, for a dataset version",
)
def import_model(
    name: str,
    session: SessionDep,
    store: ArtifactsDep,
    file: Annotated[UploadFile, File(description=".keras file, or a .zip holding one SavedModel")],
    dataset: Annotated[
        str, Form(description="NAME or NAME@VERSION: evaluated and calibrated on it")
    ],
    preprocessing: Annotated[
        str,
        Form(description="JSON list of preprocessing steps from raw rows to the model's input"),
    ] = "",
    notes: Annotated[str, Form(max_length=4000)] = "",
) -> ImportAccepted:
    """Stored, then evaluated, converted, gated and signed by a worker like a trained model."""
    from server.datasets.service import resolve_version
    from server.training.importing import (
        ImportSpec,
        detect_format,
        parse_preprocessing,
        spec_json,
    )

    if not _NAME.fullmatch(name):
        raise InvalidInputError(f"invalid model name {name!r}")
    version = resolve_version(session, dataset)
    dataset_row = session.get(Dataset, version.dataset_id)
    assert dataset_row is not None
    existing = session.exec(select(Model).where(Model.name == name)).first()
    if existing is not None and existing.task != dataset_row.task:
        raise ConflictError(
            f"model {name!r} is a {existing.task} model; dataset {dataset_row.name!r} is "
            f"{dataset_row.task}"
        )
    steps = parse_preprocessing(preprocessing)
    stored = store.put_stream(file.file)
    spec = ImportSpec(
        artifact_sha256=stored.sha256,
        filename=(file.filename or "model")[:256],
        format=detect_format(stored.path),
        preprocessing=steps,
        notes=notes,
    )
    run = TrainingRun(
        model_name=name,
        dataset_version_id=version.id,  # type: ignore[arg-type]
        status="queued",
        spec_json=spec_json(spec),
    )
    session.add(run)
    session.commit()
    session.refresh(run)
    return ImportAccepted(
        run_id=run.id,  # type: ignore[arg-type]
        status=run.status,
        model=name,
        dataset=dataset_row.name,
        dataset_version=version.version,
        format=spec.format,
    )
