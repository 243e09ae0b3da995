"""A trained model becomes a registered version with one signed, verifiable bundle per target."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from server import registry
from server.artifacts import ArtifactStore
from server.db import session_scope
from server.keys import FleetKeys, init_keys
from server.models import ModelVersion, TargetArtifact
from server.pipeline.evaluate import LiteRTRunner, OnnxRunner
from server.pipeline.publish import publish_model_version
from server.profiles import load_profiles
from shared.bundle import check_target, read_bundle
from shared.drift import DriftAccumulator, compare
from shared.preprocessing import apply_preprocessing
from tests.server.conftest import add_dataset_row
from tests.server.pipeline.conftest import Prepared

pytestmark = pytest.mark.database


@pytest.fixture
def keys(tmp_path: Path) -> FleetKeys:
    return init_keys(tmp_path / "keys", now=datetime.now(UTC), lifetime=timedelta(days=30))


def dataset_version_id(engine: Engine) -> int:
    with session_scope(engine) as session:
        return add_dataset_row(session).id  # type: ignore[return-value]


def test_publish_registers_every_target_with_a_verifiable_bundle(
    engine: Engine, tmp_path: Path, keys: FleetKeys, digits: Prepared, digits_cnn: Any
) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    profiles = load_profiles()
    phases: list[str] = []
    float_accuracy = float(
        (
            digits_cnn.predict(digits.model_input(digits.data.x_test), verbose=0).argmax(1)
            == digits.data.y_test
        ).mean()
    )
    with Session(engine) as session:
        version = publish_model_version(
            session,
            store=store,
            keys=keys,
            profiles=profiles,
            model_name="digits-cnn",
            dataset=digits.data,
            dataset_version_id=dataset_version_id(engine),
            keras_model=digits_cnn,
            preprocessing=digits.steps,
            float_metrics={"accuracy": float_accuracy, "confusion_matrix": [[1, 0], [0, 1]]},
            source="trained",
            run_id=None,
            on_phase=phases.append,
        )
        assert (version.version, version.status) == (1, "ready")
        assert phases == ["storing the float model", "building targets", "signing bundles"]
        rows = session.exec(
            select(TargetArtifact).where(TargetArtifact.model_version_id == version.id)
        ).all()
    assert {r.target for r in rows} == set(profiles)
    trusted = keys.keyring.verify_keys()
    for row in rows:
        assert row.bundle_sha256 and row.bundle_length, row.error
        with store.open(row.bundle_sha256) as f:
            bundle = read_bundle(
                f,
                trusted_keys=trusted,
                expected_sha256=row.bundle_sha256,
                expected_length=row.bundle_length,
            )
        m = bundle.manifest
        check_target(
            m, model_name="digits-cnn", model_version=1, target=row.target, runtimes=[m.runtime]
        )
        assert m.labels == digits.data.schema.class_names
        assert m.metrics["float"] == {"accuracy": float_accuracy}  # the matrix is not a number
        assert m.drift_reference is not None
        # the device side: self-tests reproduce in the target's runtime from the bundle alone
        runner = OnnxRunner(bundle.model) if m.format == "onnx" else LiteRTRunner(bundle.model)
        for test in m.self_tests:
            got = runner.predict(apply_preprocessing(m.preprocessing, test.input))
            assert np.allclose(got, test.expected, atol=test.atol)
        # and its drift reference sees the training distribution as undrifted
        acc = DriftAccumulator(m.drift_reference)
        acc.update(digits.data.x_test)
        assert max(d.psi for d in compare(m.drift_reference, acc.sketch())) < 0.5
    with session_scope(engine) as session:
        registry.promote(session, model_name="digits-cnn", version=1, alias="candidate")
    # a second publish numbers the next version
    with Session(engine) as session:
        second = publish_model_version(
            session,
            store=store,
            keys=keys,
            profiles={"edge-x86_64-litert": profiles["edge-x86_64-litert"]},
            model_name="digits-cnn",
            dataset=digits.data,
            dataset_version_id=version.dataset_version_id,
            keras_model=digits_cnn,
            preprocessing=digits.steps,
            float_metrics={"accuracy": float_accuracy},
            source="trained",
            run_id=None,
        )
        assert second.version == 2


def test_a_failure_while_building_marks_the_version_failed(
    engine: Engine, tmp_path: Path, keys: FleetKeys, digits: Prepared, digits_cnn: Any
) -> None:
    def broken_build(*_args: Any, **_kwargs: Any) -> list[Any]:
        raise RuntimeError("converter crashed")

    with Session(engine) as session, pytest.raises(RuntimeError, match="converter crashed"):
        publish_model_version(
            session,
            store=ArtifactStore(tmp_path / "artifacts"),
            keys=keys,
            profiles=load_profiles(),
            model_name="digits-cnn",
            dataset=digits.data,
            dataset_version_id=dataset_version_id(engine),
            keras_model=digits_cnn,
            preprocessing=digits.steps,
            float_metrics={"accuracy": 0.9},
            source="trained",
            run_id=None,
            build=broken_build,
        )
    with Session(engine) as session:
        version = session.exec(select(ModelVersion)).one()
        assert version.status == "failed" and "converter crashed" in (version.error or "")
        assert session.exec(select(TargetArtifact)).all() == []
