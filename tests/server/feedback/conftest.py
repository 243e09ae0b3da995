"""Helpers for the feedback and samples tests: a registered classifier with a real stored
dataset (class names and all), devices, a group, and labelled outcomes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
from sqlmodel import Session

from server.artifacts import ArtifactStore
from server.datasets.ingest import from_arrays
from server.datasets.service import add_dataset_version
from server.feedback.service import FeedbackInput
from server.fleet.groups import add_members, create_group
from server.fleet.models import Device, DeviceStatus
from server.models import DatasetVersion, Model, ModelVersion

MODEL = "parts"
LABELS = ["ok", "scratch", "dent"]
FEATURES = ["f0", "f1", "f2", "f3"]
T0 = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)


def add_dataset(session: Session, store: ArtifactStore, *, rows: int = 60) -> DatasetVersion:
    """A small stored classification dataset, version 1 of ``parts-data``. Commits."""
    rng = np.random.default_rng(0)
    y = np.arange(rows) % len(LABELS)
    x = rng.normal(size=(rows, len(FEATURES))) + y[:, None]
    parsed = from_arrays(x, y, label="defect", feature_names=FEATURES, class_names=LABELS)
    return add_dataset_version(session, store=store, name="parts-data", parsed=parsed)


def add_model(
    session: Session, store: ArtifactStore, *, versions: int = 2, task: str = "classification"
) -> list[ModelVersion]:
    """Model ``parts`` with ``versions`` ready versions trained on ``parts-data`` v1. Commits."""
    dataset = add_dataset(session, store)
    model = Model(name=MODEL, task=task)
    session.add(model)
    session.flush()
    rows = [
        ModelVersion(
            model_id=model.id,  # type: ignore[arg-type]
            version=v,
            source="trained",
            dataset_version_id=dataset.id,  # type: ignore[arg-type]
            keras_sha256="0" * 64,
            status="ready",
        )
        for v in range(1, versions + 1)
    ]
    session.add_all(rows)
    session.commit()
    return rows


def add_device(
    session: Session, device_id: str, status: DeviceStatus = DeviceStatus.ACCEPTED
) -> None:
    session.add(
        Device(
            id=device_id,
            status=status.value,
            profile="edge-x86_64-litert",
            arch="x86_64",
            runtime_name="litert",
            runtime_version="2.3.0",
            agent_version="test",
        )
    )


def add_fleet(session: Session, *, line_a: int = 3, line_b: int = 2) -> None:
    """Devices ``a-0..`` in static group ``line-a`` and ``b-0..`` in ``line-b``. Commits."""
    for prefix, count in (("a", line_a), ("b", line_b)):
        ids = [f"{prefix}-{i}" for i in range(count)]
        for device_id in ids:
            add_device(session, device_id)
        session.flush()
        group = create_group(session, name=f"line-{prefix}")
        add_members(session, group=group, device_ids=ids)
    session.commit()


def outcome(
    device_id: str,
    prediction_id: str,
    predicted: str,
    true: str,
    *,
    version: int = 1,
    minutes: float = 0,
    predicted_at: bool = True,
) -> FeedbackInput:
    at = T0 + timedelta(minutes=minutes)
    return FeedbackInput(
        device_id=device_id,
        prediction_id=prediction_id,
        model_name=MODEL,
        model_version=version,
        predicted_label=predicted,
        true_label=true,
        predicted_at=at if predicted_at else None,
        labelled_at=at + timedelta(hours=2),
    )
