"""Registry rules on both databases: numbering, aliases, promotion only past the gates."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server import registry
from server.app import create_app
from server.db import session_scope
from server.errors import ConflictError, InvalidInputError, NotFoundError
from server.models import Model, ModelVersion, TargetArtifact
from server.pipeline.types import GateConfig
from server.settings import Settings
from tests.conftest import operator_client
from tests.server.conftest import add_dataset_row

pytestmark = pytest.mark.database


def seed(session: Session) -> None:
    """A dataset version and a model with v1 (every gate failed) and v2 (one target passed)."""
    dv = add_dataset_row(session, name="vib", rows=100)
    model = Model(name="vib-clf", task="classification")
    session.add(model)
    session.flush()
    for number, passed in ((1, False), (2, True)):
        version = ModelVersion(
            model_id=model.id,  # type: ignore[arg-type]
            version=number,
            source="trained",
            dataset_version_id=dv.id,  # type: ignore[arg-type]
            keras_sha256="d" * 64,
            status="ready",
            metrics_json=json.dumps({"accuracy": 0.9 + number / 100}),
        )
        session.add(version)
        session.flush()
        session.add(
            TargetArtifact(
                model_version_id=version.id,  # type: ignore[arg-type]
                target="edge-arm64-litert",
                format="tflite",
                quantization="int8",
                runtime="litert",
                metric_name="accuracy",
                metric_value=0.9,
                metric_delta=0.4 if passed else 3.0,
                gate_passed=passed,
                gate_reasons_json=json.dumps([] if passed else ["accuracy drop 3.00 > 1.00"]),
            )
        )
    session.flush()


def test_promotion_needs_a_passing_artifact(engine: Engine) -> None:
    with session_scope(engine) as session:
        seed(session)
    with session_scope(engine) as session:
        with pytest.raises(ConflictError, match="no artifact that passed"):
            registry.promote(session, model_name="vib-clf", version=1, alias="production")
        registry.promote(session, model_name="vib-clf", version=2, alias="production")
    with Session(engine) as session:
        assert (
            registry.get_version(session, model_name="vib-clf", version="production").version == 2
        )
        assert registry.get_version(session, model_name="vib-clf", version="latest").version == 2
        model = registry.get_model(session, name="vib-clf")
        assert registry.aliases_of(session, model=model) == {"production": 2}
        with pytest.raises(NotFoundError, match="'staging'"):
            registry.get_version(session, model_name="vib-clf", version="staging")
        with pytest.raises(NotFoundError, match="no model"):
            registry.get_model(session, name="nope")


@pytest.mark.parametrize("alias", ["Production", "latest", "7", "a b", "", "x" * 65])
def test_bad_aliases(engine: Engine, alias: str) -> None:
    with session_scope(engine) as session:
        seed(session)
    with session_scope(engine) as session, pytest.raises(InvalidInputError):
        registry.promote(session, model_name="vib-clf", version=2, alias=alias)


def test_a_building_version_cannot_be_promoted(engine: Engine) -> None:
    with session_scope(engine) as session:
        seed(session)
        version = registry.get_version(session, model_name="vib-clf", version=2)
        version.status = "building"
        session.add(version)
    with session_scope(engine) as session, pytest.raises(ConflictError, match="building"):
        registry.promote(session, model_name="vib-clf", version=2, alias="candidate")


@pytest.fixture
def client(db_url: str, tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(Settings(data_dir=tmp_path / "data", database_url=db_url))
    with operator_client(app) as client:
        with session_scope(app.state.engine) as session:
            seed(session)
        yield client


def test_registry_api(client: TestClient) -> None:
    assert client.get("/api/v1/models").json()[0]["latest_version"] == 2
    detail = client.get("/api/v1/models/vib-clf").json()
    assert [v["targets_passed"] for v in detail["versions"]] == [[], ["edge-arm64-litert"]]
    version = client.get("/api/v1/models/vib-clf/versions/latest").json()
    assert version["lineage"] == {
        "dataset": "vib",
        "dataset_version": 1,
        "run_id": None,
        "source": "trained",
        "model_version": 2,
    }
    assert version["artifacts"][0]["gate_passed"] is True
    refused = client.put("/api/v1/models/vib-clf/aliases/production", json={"version": "1"})
    assert refused.status_code == 409 and "gates" in refused.json()["detail"]
    ok = client.put("/api/v1/models/vib-clf/aliases/production", json={"version": "2"})
    assert ok.json() == {"model": "vib-clf", "alias": "production", "version": 2}
    assert client.get("/api/v1/models/vib-clf/versions/production").json()["version"] == 2
    assert client.get("/api/v1/models/nope").status_code == 404
    gates = client.put("/api/v1/models/vib-clf/gates", json={"max_metric_drop": 0.5})
    assert gates.json()["max_metric_drop"] == 0.5
    assert (
        client.put("/api/v1/models/vib-clf/gates", json={"max_metric_drop": -1}).status_code == 422
    )
    assert GateConfig.model_validate(client.get("/api/v1/models/vib-clf").json()["gates"])
    noted = client.patch("/api/v1/models/vib-clf/versions/2", json={"notes": "retrained, site B"})
    assert noted.json()["notes"] == "retrained, site B"
    assert client.get("/api/v1/models/vib-clf/versions/2").json()["notes"] == "retrained, site B"
    assert client.patch("/api/v1/models/vib-clf/versions/9", json={"notes": "x"}).status_code == 404
