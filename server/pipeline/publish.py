"""From a trained (or imported) Keras model to a registered version with signed bundles.

:func:`publish_model_version` is the last step of every training run and of every
import. It

1. stores the float model (``.keras``) in the artifact store and numbers a new
   version of the model, linked to its dataset version and run (lineage);
2. builds one artifact per target profile (conversion, evaluation in the target
   runtime, gates -- :mod:`server.pipeline.targets`);
3. builds the drift reference from the *training* split, as the device will see
   its inputs (raw, before preprocessing), with the float model's outputs;
4. signs one bundle per converted artifact and stores it content-addressed.

What always holds: an artifact that fails a gate is kept, with its bundle and its
reasons, but marked failed. The version row is committed first (status
``building``, so its number is taken and it shows while targets build, with no
transaction held meanwhile); its artifact rows are committed together with status
``ready``, after every file they name is in the store; on any error the version is
marked ``failed`` with the error, and no artifact row is written.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlmodel import Session, select

from server.artifacts import ArtifactStore, register_artifact
from server.datasets.types import LoadedDataset
from server.errors import InvalidInputError
from server.keys import FleetKeys
from server.models import Model, ModelVersion, TargetArtifact
from server.pipeline.types import GateConfig, TargetBuild
from server.profiles import Profile
from shared.bundle import BundleManifest, FileRef, build_bundle
from shared.drift import DriftReference
from shared.integrity import sha256_hex
from shared.preprocessing import PreprocessingStep, apply_preprocessing

__all__ = [
    "BUNDLE_MEDIA_TYPE",
    "KERAS_MEDIA_TYPE",
    "build_drift_reference",
    "get_or_create_model",
    "numeric_metrics",
    "publish_model_version",
]

BUNDLE_MEDIA_TYPE = "application/vnd.edgefleet.bundle"
KERAS_MEDIA_TYPE = "application/vnd.keras"
DRIFT_BINS = 10
_MAX_DRIFT_ROWS = 20_000


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The scalar metrics (a bundle's metrics are numbers; the confusion matrix is not)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)
    }


def get_or_create_model(session: Session, *, name: str, task: str) -> Model:
    model = session.exec(select(Model).where(Model.name == name)).first()
    if model is None:
        model = Model(name=name, task=task)
        session.add(model)
        session.flush()
    elif model.task != task:
        raise InvalidInputError(
            f"model {name!r} is a {model.task} model; a {task} dataset cannot train it"
        )
    return model


def build_drift_reference(
    keras_model: Any, *, dataset: LoadedDataset, preprocessing: Sequence[PreprocessingStep]
) -> DriftReference:
    """Bins from the training split's raw features, plus the float model's outputs on it."""
    x = dataset.x_train[:_MAX_DRIFT_ROWS]
    outputs = np.asarray(keras_model.predict(apply_preprocessing(preprocessing, x), verbose=0))
    if dataset.schema.task == "classification":
        return DriftReference.from_data(
            x, feature_names=dataset.schema.feature_names, n_bins=DRIFT_BINS, probabilities=outputs
        )
    return DriftReference.from_data(
        x,
        feature_names=dataset.schema.feature_names,
        n_bins=DRIFT_BINS,
        predicted_values=outputs.reshape(-1),
    )


def _store_keras(store: ArtifactStore, keras_model: Any) -> str:
    with tempfile.TemporaryDirectory(prefix="edgefleet-keras-") as tmp:
        path = Path(tmp) / "model.keras"
        keras_model.save(path)
        with path.open("rb") as f:
            return store.put_stream(f).sha256


def publish_model_version(
    session: Session,
    *,
    store: ArtifactStore,
    keys: FleetKeys,
    profiles: Mapping[str, Profile],
    model_name: str,
    dataset: LoadedDataset,
    dataset_version_id: int,
    keras_model: Any,
    preprocessing: list[PreprocessingStep],
    float_metrics: dict[str, Any],
    source: str,
    run_id: int | None,
    on_phase: Callable[[str], None] | None = None,
    build: Callable[..., list[TargetBuild]] | None = None,
    notes: str = "",
) -> ModelVersion:
    """Register a new version of ``model_name`` with one artifact per profile.

    ``build`` defaults to :func:`server.pipeline.targets.build_targets`.
    """
    if build is None:
        from server.pipeline.targets import build_targets

        build = build_targets
    phase = on_phase or (lambda _phase: None)
    task = dataset.schema.task

    # 1. The float model and a numbered version, committed at once: the version is
    # visible (status "building") while its targets build, and its number is taken.
    phase("storing the float model")
    keras_sha256 = _store_keras(store, keras_model)
    model = get_or_create_model(session, name=model_name, task=task)
    gates = GateConfig.model_validate(json.loads(model.gates_json or "{}"))
    register_artifact(session, stored=store.verify(keras_sha256), media_type=KERAS_MEDIA_TYPE)
    last = session.exec(
        select(ModelVersion.version)
        .where(ModelVersion.model_id == model.id)
        .order_by(ModelVersion.version.desc())  # type: ignore[attr-defined]
    ).first()
    version = ModelVersion(
        model_id=model.id,  # type: ignore[arg-type]
        version=(last or 0) + 1,
        source=source,
        dataset_version_id=dataset_version_id,
        run_id=run_id,
        keras_sha256=keras_sha256,
        status="building",
        metrics_json=json.dumps(float_metrics, default=_jsonable),
        preprocessing_json=json.dumps([step.model_dump() for step in preprocessing]),
        notes=notes,
    )
    session.add(version)
    session.commit()

    try:
        # 2. Per-target artifacts: no transaction is held while they build.
        phase("building targets")
        builds = build(
            keras_model,
            data=dataset,
            preprocessing=preprocessing,
            profiles=list(profiles.values()),
            gates=gates,
            float_metrics=numeric_metrics(float_metrics),
        )
        phase("signing bundles")
        reference = build_drift_reference(keras_model, dataset=dataset, preprocessing=preprocessing)
        rows = [
            _artifact_row(
                session,
                store=store,
                keys=keys,
                target=target,
                version=version,
                model_name=model_name,
                dataset=dataset,
                preprocessing=preprocessing,
                float_metrics=float_metrics,
                reference=reference,
            )
            for target in builds
        ]
    except BaseException as e:
        session.rollback()
        version.status = "failed"
        version.error = f"{type(e).__name__}: {e}"[:2000]
        session.add(version)
        session.commit()
        raise

    # 3. All artifact rows appear together with the version's final status.
    for row in rows:
        session.add(row)
    version.status = "ready"
    session.add(version)
    session.commit()
    session.refresh(version)
    return version


def _artifact_row(
    session: Session,
    *,
    store: ArtifactStore,
    keys: FleetKeys,
    target: TargetBuild,
    version: ModelVersion,
    model_name: str,
    dataset: LoadedDataset,
    preprocessing: list[PreprocessingStep],
    float_metrics: dict[str, Any],
    reference: DriftReference,
) -> TargetArtifact:
    row = TargetArtifact(
        model_version_id=version.id,  # type: ignore[arg-type]
        target=target.profile,
        format=target.format,
        quantization=target.quantization,
        runtime=target.runtime,
        size_bytes=target.size_bytes or None,
        metric_name=target.metric_name,
        metric_value=target.metric_value,
        metric_delta=target.metric_delta,
        latency_p50_ms=target.latency_p50_ms,
        metrics_json=json.dumps(target.metrics),
        ops_json=json.dumps([op.model_dump() for op in target.ops]),
        gate_passed=target.gate.passed and target.model is not None,
        gate_reasons_json=json.dumps(target.gate.reasons),
        error=target.error,
    )
    if target.model is None:
        return row
    manifest = BundleManifest(
        model_name=model_name,
        model_version=version.version,
        target=target.profile,
        runtime=target.runtime,  # type: ignore[arg-type]
        min_runtime_version=target.min_runtime_version,
        format=target.format,
        task=dataset.schema.task,
        model_file=FileRef(
            name=f"model.{target.format}", sha256="0" * 64, length=len(target.model)
        ),
        inputs=target.inputs,
        outputs=target.outputs,
        feature_names=dataset.schema.feature_names,
        labels=dataset.schema.class_names,
        preprocessing=preprocessing,
        metrics={"float": numeric_metrics(float_metrics), "target": target.metrics},
        drift_reference=reference,
        self_tests=target.self_tests,
        ops=target.ops,
        created_at=datetime.now(UTC),
    )
    stored = store.put_bytes(build_bundle(manifest, target.model, keys.signing_keys))
    register_artifact(session, stored=stored, media_type=BUNDLE_MEDIA_TYPE)
    row.bundle_sha256 = stored.sha256
    row.bundle_length = stored.length
    row.model_sha256 = sha256_hex(target.model)
    return row


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in metrics")
