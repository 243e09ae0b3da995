"""Helpers for the drift view's tests: a reference, sketches as devices count them, reports
as devices send them, and a registered model version whose signed bundle carries the
reference (so the API reads it the way it does in production)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

import numpy as np
from sqlmodel import Session, select

from server.artifacts import ArtifactStore
from server.keys import FleetKeys
from server.models import Model, ModelVersion, TargetArtifact
from shared.bundle import BundleManifest, FileRef, TensorSpec, build_bundle
from shared.drift import DriftAccumulator, DriftReference, DriftSketch
from shared.latency import latency_counts
from shared.messages import LatencyHistogram, ModelWindow, TelemetryReport
from tests.server.conftest import add_dataset_row

FEATURES = ["f0", "f1", "f2", "f3", "f4"]
MODEL = "sensor"
TARGET = "edge-x86_64-litert"
T0 = datetime(2026, 11, 2, 0, 0, tzinfo=UTC)
"""A Monday midnight (UTC): day and hour boundaries are easy to cross on purpose."""


def make_reference(seed: int = 0, n_bins: int = 8) -> DriftReference:
    rng = np.random.default_rng(seed)
    train = rng.normal(size=(4000, len(FEATURES))) * [1, 2, 0.5, 3, 1] + [0, 1, -1, 10, 0]
    return DriftReference.from_data(
        train,
        feature_names=FEATURES,
        n_bins=n_bins,
        probabilities=rng.dirichlet(np.ones(3), size=4000),
    )


def sketch_of(
    reference: DriftReference,
    rng: np.random.Generator,
    rows: int,
    shift: Mapping[str, float] | None = None,
) -> DriftSketch:
    """What a device counts over ``rows`` inputs, its features shifted by ``shift`` (in std)."""
    x = rng.normal(size=(rows, len(FEATURES))) * [1, 2, 0.5, 3, 1] + [0, 1, -1, 10, 0]
    for name, amount in (shift or {}).items():
        j = FEATURES.index(name)
        x[:, j] += amount * [1, 2, 0.5, 3, 1][j]
    if rows:
        x[rng.random(rows) < 0.01, 4] = np.nan
    accumulator = DriftAccumulator(reference)
    if rows:
        accumulator.update(x, probabilities=rng.dirichlet(np.ones(3), size=rows))
    return accumulator.sketch()


def report(
    device_id: str,
    seq: int,
    start: datetime,
    sketch: DriftSketch | None,
    *,
    minutes: float = 10,
    version: int = 1,
    inferences: int = 100,
    errors: int = 0,
    latency_ms: float = 5.0,
) -> TelemetryReport:
    return TelemetryReport(
        device_id=device_id,
        seq=seq,
        window_start=start,
        window_end=start + timedelta(minutes=minutes),
        models=[
            ModelWindow(
                model_name=MODEL,
                model_version=version,
                target=TARGET,
                inferences=inferences,
                errors=errors,
                latency_ms=LatencyHistogram(
                    counts=latency_counts([latency_ms] * inferences).tolist()
                ),
                drift=sketch,
            )
        ],
    )


def register_version(
    session: Session,
    *,
    store: ArtifactStore,
    keys: FleetKeys,
    reference: DriftReference | None,
    version: int = 1,
    model_name: str = MODEL,
) -> ModelVersion:
    """A ready model version with one target artifact: a signed bundle in ``store``."""
    model = session.exec(select(Model).where(Model.name == model_name)).first()
    if model is None:
        dataset = add_dataset_row(session, name=f"{model_name}-data")
        model = Model(name=model_name, task="classification")
        session.add(model)
        session.flush()
        dataset_version_id = dataset.id
    else:
        first = session.exec(select(ModelVersion).where(ModelVersion.model_id == model.id)).first()
        assert first is not None
        dataset_version_id = first.dataset_version_id
    row = ModelVersion(
        model_id=model.id,  # type: ignore[arg-type]
        version=version,
        source="imported",
        dataset_version_id=dataset_version_id,  # type: ignore[arg-type]
        keras_sha256="0" * 64,
        status="ready",
    )
    session.add(row)
    session.flush()
    payload = bytes(range(256)) * 4  # opaque: nothing here runs the model
    manifest = BundleManifest(
        model_name=model_name,
        model_version=version,
        target=TARGET,
        runtime="litert",
        min_runtime_version="2.0.0",
        format="tflite",
        task="classification",
        model_file=FileRef(name="model.tflite", sha256="0" * 64, length=len(payload)),
        inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, len(FEATURES)])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[-1, 3])],
        feature_names=FEATURES,
        labels=["a", "b", "c"],
        drift_reference=reference,
        created_at=datetime.now(UTC),
    )
    stored = store.put_bytes(build_bundle(manifest, payload, keys.signing_keys))
    session.add(
        TargetArtifact(
            model_version_id=row.id,  # type: ignore[arg-type]
            target=TARGET,
            format="tflite",
            quantization="int8",
            runtime="litert",
            bundle_sha256=stored.sha256,
            bundle_length=stored.length,
            gate_passed=True,
        )
    )
    session.flush()
    return row


# ----------------------------------------------------------------------------- a small fleet

CANARY = [f"canary-{i}" for i in range(3)]
CONTROL = [f"control-{i}" for i in range(3)]
DRIFTED_FEATURE = "f3"


def add_devices(session: Session, device_ids: list[str]) -> None:
    from server.fleet.models import Device, DeviceStatus

    for device_id in device_ids:
        session.add(
            Device(
                id=device_id,
                status=DeviceStatus.ACCEPTED.value,
                profile=TARGET,
                arch="x86_64",
                runtime_name="litert",
                runtime_version="2.3.0",
                agent_version="test",
            )
        )
    session.flush()


def seed_fleet(
    session: Session, *, store: ArtifactStore, keys: FleetKeys, reference: DriftReference
) -> None:
    """Six accepted devices in two static groups; the canaries drifted on f3 for six hours
    from T0, the control group not; version 1 with the reference, version 2 without data."""
    from server.fleet.groups import add_members, create_group
    from server.ingest.telemetry import store_reports

    add_devices(session, CANARY + CONTROL)
    for name, members in (("canary", CANARY), ("control", CONTROL)):
        add_members(session, group=create_group(session, name=name), device_ids=members)
    register_version(session, store=store, keys=keys, reference=reference, version=1)
    register_version(session, store=store, keys=keys, reference=reference, version=2)
    rng = np.random.default_rng(2)
    reports = []
    for device_id in CANARY + CONTROL:
        shift = {DRIFTED_FEATURE: 2.0} if device_id in CANARY else None
        for seq in range(12):
            start = T0 + timedelta(minutes=30 * seq)
            sketch = sketch_of(reference, rng, 300, shift)
            reports.append(
                report(device_id, seq, start, sketch, minutes=30, errors=1, inferences=300)
            )
    store_reports(session, reports)
