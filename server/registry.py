"""The model registry: names, numbered versions, aliases, per-target artifacts, lineage.

Keyword-only functions on a session. What always holds: versions only ever count
up; an alias points at one version of its own model; a version can be promoted
(given an alias) only when at least one of its artifacts passed its gates --
nothing that was never evaluated or that failed every gate can reach a rollout.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from sqlmodel import Session, select

from server.db import utcnow
from server.errors import ConflictError, InvalidInputError, NotFoundError
from server.models import (
    Dataset,
    DatasetVersion,
    Model,
    ModelAlias,
    ModelVersion,
    TargetArtifact,
    TrainingRun,
)
from server.pipeline.types import GateConfig

__all__ = [
    "VersionDetail",
    "aliases_of",
    "get_model",
    "get_version",
    "list_artifacts",
    "list_models",
    "list_versions",
    "promote",
    "set_gates",
    "version_detail",
]

_ALIAS = re.compile(r"[a-z][a-z0-9_-]{0,63}")


def get_model(session: Session, *, name: str) -> Model:
    model = session.exec(select(Model).where(Model.name == name)).first()
    if model is None:
        raise NotFoundError(f"no model named {name!r}")
    return model


def list_models(session: Session) -> list[Model]:
    return list(session.exec(select(Model).order_by(Model.name)))


def list_versions(session: Session, *, model: Model) -> list[ModelVersion]:
    return list(
        session.exec(
            select(ModelVersion)
            .where(ModelVersion.model_id == model.id)
            .order_by(ModelVersion.version)  # type: ignore[arg-type]
        )
    )


def aliases_of(session: Session, *, model: Model) -> dict[str, int]:
    """Alias -> version number."""
    rows = session.exec(
        select(ModelAlias.alias, ModelVersion.version)
        .join(ModelVersion, ModelAlias.model_version_id == ModelVersion.id)  # type: ignore[arg-type]
        .where(ModelAlias.model_id == model.id)
    )
    return {alias: version for alias, version in rows}


def get_version(session: Session, *, model_name: str, version: str | int) -> ModelVersion:
    """A version by number (``3``), by alias (``production``) or ``latest``."""
    model = get_model(session, name=model_name)
    query = select(ModelVersion).where(ModelVersion.model_id == model.id)
    text = str(version)
    if text.isdigit():
        found = session.exec(query.where(ModelVersion.version == int(text))).first()
    elif text == "latest":
        found = session.exec(query.order_by(ModelVersion.version.desc())).first()  # type: ignore[attr-defined]
    else:
        alias = session.get(ModelAlias, (model.id, text))
        found = None if alias is None else session.get(ModelVersion, alias.model_version_id)
    if found is None:
        raise NotFoundError(f"model {model_name!r} has no version or alias {text!r}")
    return found


def list_artifacts(session: Session, *, version: ModelVersion) -> list[TargetArtifact]:
    return list(
        session.exec(
            select(TargetArtifact)
            .where(TargetArtifact.model_version_id == version.id)
            .order_by(TargetArtifact.target)  # type: ignore[arg-type]
        )
    )


def promote(session: Session, *, model_name: str, version: str | int, alias: str) -> ModelAlias:
    """Point ``alias`` at a version that has at least one artifact that passed its gates."""
    if not _ALIAS.fullmatch(alias) or alias == "latest" or alias.isdigit():
        raise InvalidInputError(
            f"invalid alias {alias!r}: use lowercase letters, digits, '-' or '_', starting "
            "with a letter ('latest' is reserved)"
        )
    target = get_version(session, model_name=model_name, version=version)
    if target.status != "ready":
        raise ConflictError(
            f"{model_name} v{target.version} is {target.status}; "
            "only a ready version can be promoted"
        )
    passed = [a.target for a in list_artifacts(session, version=target) if a.gate_passed]
    if not passed:
        raise ConflictError(
            f"{model_name} v{target.version} has no artifact that passed its gates; "
            "it cannot be promoted"
        )
    row = session.get(ModelAlias, (target.model_id, alias))
    if row is None:
        row = ModelAlias(model_id=target.model_id, alias=alias, model_version_id=target.id)  # type: ignore[arg-type]
    else:
        row.model_version_id = target.id  # type: ignore[assignment]
        row.updated_at = utcnow()
    session.add(row)
    session.flush()
    return row


def set_gates(session: Session, *, model_name: str, gates: GateConfig) -> Model:
    """Gates for the model's future versions (existing versions keep their results)."""
    model = get_model(session, name=model_name)
    model.gates_json = gates.model_dump_json()
    session.add(model)
    session.flush()
    return model


@dataclass(frozen=True)
class VersionDetail:
    model: Model
    version: ModelVersion
    aliases: list[str]
    artifacts: list[TargetArtifact]
    dataset_name: str | None
    dataset_version: int | None
    run: TrainingRun | None

    def lineage(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset_name,
            "dataset_version": self.dataset_version,
            "run_id": self.version.run_id,
            "source": self.version.source,
            "model_version": self.version.version,
        }


def version_detail(session: Session, *, model_name: str, version: str | int) -> VersionDetail:
    found = get_version(session, model_name=model_name, version=version)
    model = session.get(Model, found.model_id)
    assert model is not None
    dataset_version = session.get(DatasetVersion, found.dataset_version_id)
    dataset_name = None
    if dataset_version is not None:
        dataset = session.get(Dataset, dataset_version.dataset_id)
        dataset_name = None if dataset is None else dataset.name
    aliases = [a for a, v in aliases_of(session, model=model).items() if v == found.version]
    return VersionDetail(
        model=model,
        version=found,
        aliases=sorted(aliases),
        artifacts=list_artifacts(session, version=found),
        dataset_name=dataset_name,
        dataset_version=None if dataset_version is None else dataset_version.version,
        run=None if found.run_id is None else session.get(TrainingRun, found.run_id),
    )


def loads(text: str) -> Any:
    return json.loads(text or "null")
