"""Database tables (SQLModel). The schema itself is owned by Alembic migrations.

Tables follow the FastAPI full-stack template's layers: a ``*Base`` with the
shared fields, the ``table=True`` class, and ``*Public`` for what the API returns.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from server.db import UTCDateTime, utcnow

__all__ = [
    "Artifact",
    "ArtifactPublic",
    "Dataset",
    "DatasetVersion",
    "KeyringPublic",
    "KeyringRecord",
    "Model",
    "ModelAlias",
    "ModelVersion",
    "TargetArtifact",
    "TrainingRun",
]


class ArtifactBase(SQLModel):
    sha256: str = Field(primary_key=True, min_length=64, max_length=64)
    length: int = Field(ge=0)
    media_type: str = Field(max_length=128)


class Artifact(ArtifactBase, table=True):
    """A content-addressed file in the artifact store (bundles, datasets)."""

    __tablename__ = "artifacts"

    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )


class ArtifactPublic(ArtifactBase):
    created_at: datetime


class KeyringBase(SQLModel):
    version: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    issued_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    expires_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


class KeyringRecord(KeyringBase, table=True):
    """Every root-signed keyring the fleet has been given; the highest version is current."""

    __tablename__ = "keyrings"

    envelope: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )


class KeyringPublic(KeyringBase):
    envelope: str


# ----------------------------------------------------------------------------- datasets


class Dataset(SQLModel, table=True):
    """A named dataset; its content lives in immutable versions."""

    __tablename__ = "datasets"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=128, unique=True, index=True)
    task: str = Field(max_length=32)
    label: str = Field(max_length=256)
    description: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )


class DatasetVersion(SQLModel, table=True):
    """One immutable, content-addressed upload with its schema and seeded splits."""

    __tablename__ = "dataset_versions"
    __table_args__ = (
        UniqueConstraint("dataset_id", "version"),
        UniqueConstraint("dataset_id", "sha256"),
    )

    id: int | None = Field(default=None, primary_key=True)
    dataset_id: int = Field(foreign_key="datasets.id", index=True)
    version: int = Field(ge=1)
    sha256: str = Field(max_length=64, description="the canonical stored arrays (npz)")
    source_sha256: str = Field(max_length=64, description="the file as uploaded")
    source_format: str = Field(max_length=16, description="csv, npz or builtin")
    source_name: str = Field(default="", max_length=256)
    rows: int
    data_schema_json: str = Field(sa_column=Column(Text, nullable=False))
    splits_sha256: str = Field(max_length=64, description="stored split indices (npz)")
    split_seed: int
    lineage_json: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )


# ----------------------------------------------------------------------------- training runs


class TrainingRun(SQLModel, table=True):
    """A training job: queued -> running -> succeeded | failed | cancelled."""

    __tablename__ = "training_runs"

    id: int | None = Field(default=None, primary_key=True)
    model_name: str = Field(max_length=128, index=True)
    dataset_version_id: int = Field(foreign_key="dataset_versions.id")
    status: str = Field(default="queued", max_length=16, index=True)
    phase: str = Field(default="", max_length=32, description="training, converting, ...")
    spec_json: str = Field(sa_column=Column(Text, nullable=False))
    progress_json: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))
    history_json: str = Field(default="[]", sa_column=Column(Text, nullable=False, default="[]"))
    metrics_json: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))
    environment_json: str = Field(
        default="{}", sa_column=Column(Text, nullable=False, default="{}")
    )
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    cancel_requested: bool = False
    worker: str | None = Field(default=None, max_length=128, description="host:pid running it")
    model_version_id: int | None = Field(default=None, foreign_key="model_versions.id")
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )
    started_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    finished_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))


# ----------------------------------------------------------------------------- registry


class Model(SQLModel, table=True):
    __tablename__ = "models"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=128, unique=True, index=True)
    task: str = Field(max_length=32)
    description: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    gates_json: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )


class ModelVersion(SQLModel, table=True):
    """A trained (or imported) model: numbered per model, with its lineage and metrics."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    model_id: int = Field(foreign_key="models.id", index=True)
    version: int = Field(ge=1)
    source: str = Field(max_length=16, description="trained or imported")
    dataset_version_id: int = Field(foreign_key="dataset_versions.id")
    run_id: int | None = Field(default=None, description="the training run, if trained here")
    keras_sha256: str = Field(max_length=64, description="the float model (.keras) in the store")
    status: str = Field(
        default="evaluating", max_length=16, description="evaluating, ready, failed"
    )
    metrics_json: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))
    preprocessing_json: str = Field(
        default="[]", sa_column=Column(Text, nullable=False, default="[]")
    )
    notes: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )


class ModelAlias(SQLModel, table=True):
    """A movable name (``production``, ``candidate``, ...) for one version of a model."""

    __tablename__ = "model_aliases"

    model_id: int = Field(foreign_key="models.id", primary_key=True)
    alias: str = Field(max_length=64, primary_key=True)
    model_version_id: int = Field(foreign_key="model_versions.id")
    updated_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )


class TargetArtifact(SQLModel, table=True):
    """One model version built for one target profile: its bundle, numbers and gate result."""

    __tablename__ = "target_artifacts"
    __table_args__ = (UniqueConstraint("model_version_id", "target"),)

    id: int | None = Field(default=None, primary_key=True)
    model_version_id: int = Field(foreign_key="model_versions.id", index=True)
    target: str = Field(max_length=64)
    format: str = Field(max_length=16)
    quantization: str = Field(max_length=16)
    runtime: str = Field(max_length=32)
    bundle_sha256: str | None = Field(default=None, max_length=64)
    bundle_length: int | None = None
    model_sha256: str | None = Field(default=None, max_length=64)
    size_bytes: int | None = None
    metric_name: str = Field(default="", max_length=32)
    metric_value: float | None = None
    metric_delta: float | None = Field(default=None, description="vs the float model, in points")
    latency_p50_ms: float | None = None
    metrics_json: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))
    ops_json: str = Field(default="[]", sa_column=Column(Text, nullable=False, default="[]"))
    gate_passed: bool = False
    gate_reasons_json: str = Field(
        default="[]", sa_column=Column(Text, nullable=False, default="[]")
    )
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )


import server.agent_releases.models  # noqa: E402  (agent versions the fleet can roll out)
import server.alerts.models  # noqa: E402  (alert rules, alerts, webhook deliveries)
import server.auth.models  # noqa: E402  (operator tokens, audit log)
import server.drift.models  # noqa: E402  (drift rollups, layouts, retention marks)
import server.feedback.models  # noqa: E402  (labels for past predictions)
import server.fleet.models  # noqa: E402  (the fleet's tables, on the same metadata)
import server.ingest.models  # noqa: E402  (ingested telemetry, on the same metadata)
import server.retraining.models  # noqa: E402  (retraining policies and decisions)
import server.rollouts.models  # noqa: E402  (rollouts, manifests, pins, events)
import server.samples.models  # noqa: E402, F401  (captured input samples from devices)
