"""``/api/v1/runs`` through the real app and a real database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.app import create_app
from server.models import Model, ModelVersion
from server.settings import Settings
from server.training import jobs
from tests.conftest import operator_client
from tests.server.training.conftest import (
    add_dataset_version,
    digits_schema,
    regression_data,
)

pytestmark = pytest.mark.database


@pytest.fixture
def client(engine: Engine, db_url: str, tmp_path: Path) -> Iterator[TestClient]:
    # this suite drives runs itself: the app's own job runner stays off
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, run_jobs=False)
    add_dataset_version(engine, digits_schema(), name="digits", version=1)
    add_dataset_version(engine, digits_schema(), name="digits", version=2)
    add_dataset_version(engine, regression_data().schema, name="prices", version=1)
    with operator_client(create_app(settings)) as client:
        yield client


def test_post_queues_a_run_with_the_datasets_default_spec(client: TestClient) -> None:
    response = client.post("/api/v1/runs", json={"dataset": "digits", "model": "digits-cnn"})
    assert response.status_code == 202, response.text
    run = response.json()
    assert run["status"] == "queued" and run["phase"] == ""
    assert (run["dataset"], run["arch"], run["epochs"], run["seed"]) == ("digits@2", "cnn2d", 15, 0)
    assert run["spec"]["filters"] == [32, 64] and run["spec"]["dense_units"] == 128
    assert run["progress"] == {} and run["history"] == [] and run["metrics"] == {}
    assert run["lineage"] == {
        "dataset": "digits",
        "dataset_version": 2,
        "dataset_version_id": run["dataset_version_id"],
        "run_id": run["id"],
        "model": "digits-cnn",
        "model_version": None,
        "model_version_id": None,
    }
    assert client.get(f"/api/v1/runs/{run['id']}").json() == run


def test_post_with_arch_epochs_and_spec_overrides(client: TestClient) -> None:
    body = {
        "dataset": "digits@1",
        "model": "digits-mlp",
        "arch": "mlp",
        "epochs": 3,
        "spec": {"hidden_units": [16], "seed": 4, "k_folds": 3},
    }
    run = client.post("/api/v1/runs", json=body).json()
    assert run["dataset"] == "digits@1"
    assert run["spec"] | body["spec"] == run["spec"]
    assert (run["arch"], run["epochs"], run["seed"]) == ("mlp", 3, 4)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"arch": "cnn1d"}, "cnn1d needs a 2-D input shape"),
        ({"spec": {"epochs": 0}}, "invalid model spec: epochs"),
        ({"spec": {"optimizer": "sgd"}}, "optimizer: Extra inputs are not permitted"),
        ({"spec": {"filters": [8] * 5}}, "use at most 4 blocks"),
        ({"epochs": 501}, "less than or equal to 500"),
        ({"arch": "rnn"}, "'mlp', 'cnn1d' or 'cnn2d'"),
        ({"model": "no spaces please"}, "should match pattern"),
        ({"colour": "blue"}, "Extra inputs are not permitted"),
    ],
)
def test_a_spec_that_cannot_work_is_refused_with_422(
    client: TestClient, body: dict[str, object], message: str
) -> None:
    response = client.post("/api/v1/runs", json={"dataset": "digits", "model": "m"} | body)
    assert response.status_code == 422, response.text
    assert message in str(response.json()["detail"])
    assert client.get("/api/v1/runs").json() == []  # nothing was queued


def test_unknown_datasets_are_404(client: TestClient) -> None:
    for ref in ("no-such-dataset", "digits@9"):
        response = client.post("/api/v1/runs", json={"dataset": ref, "model": "m"})
        assert response.status_code == 404, response.text


def test_a_model_keeps_its_task(client: TestClient, engine: Engine) -> None:
    with Session(engine) as session:
        session.add(Model(name="prices", task="regression"))
        session.commit()
    response = client.post("/api/v1/runs", json={"dataset": "digits", "model": "prices"})
    assert response.status_code == 409
    assert "is a regression model" in response.json()["detail"]
    assert (
        client.post("/api/v1/runs", json={"dataset": "prices", "model": "prices"}).status_code
        == 202
    )


def test_list_filters_and_get(client: TestClient, engine: Engine) -> None:
    first = client.post("/api/v1/runs", json={"dataset": "digits", "model": "a"}).json()
    second = client.post("/api/v1/runs", json={"dataset": "prices", "model": "b"}).json()
    with Session(engine) as session:
        jobs.claim_next_run(session, worker="h:1")
    listed = client.get("/api/v1/runs").json()
    assert [r["id"] for r in listed] == [second["id"], first["id"]]
    assert "history" not in listed[0] and listed[1]["status"] == "running"
    assert [r["id"] for r in client.get("/api/v1/runs", params={"model": "b"}).json()] == [
        second["id"]
    ]
    running = client.get("/api/v1/runs", params={"status": "running"}).json()
    assert [r["id"] for r in running] == [first["id"]]
    assert client.get("/api/v1/runs", params={"status": "bogus"}).status_code == 422
    assert client.get("/api/v1/runs", params={"limit": 1}).json()[0]["id"] == second["id"]
    assert client.get("/api/v1/runs/9999").status_code == 404
    assert client.get(f"/api/v1/runs/{first['id']}").json()["worker"] == "h:1"


def test_cancel(client: TestClient, engine: Engine) -> None:
    queued = client.post("/api/v1/runs", json={"dataset": "digits", "model": "a"}).json()
    running = client.post("/api/v1/runs", json={"dataset": "digits", "model": "a"}).json()
    done = client.post("/api/v1/runs", json={"dataset": "digits", "model": "a"}).json()
    with Session(engine) as session:
        jobs.request_cancel(session, run_id=queued["id"])  # make room: claim the next two
        jobs.claim_next_run(session, worker="h:1")
        jobs.claim_next_run(session, worker="h:1")
        jobs.finish_run(session, run_id=done["id"], status="succeeded")
    response = client.post(f"/api/v1/runs/{running['id']}/cancel")
    assert response.status_code == 200
    assert (response.json()["status"], response.json()["cancel_requested"]) == ("running", True)
    cancelled = client.post(f"/api/v1/runs/{queued['id']}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    conflict = client.post(f"/api/v1/runs/{done['id']}/cancel")
    assert conflict.status_code == 409 and "already succeeded" in conflict.json()["detail"]
    assert client.post("/api/v1/runs/9999/cancel").status_code == 404


def test_a_finished_run_shows_its_results_and_lineage(client: TestClient, engine: Engine) -> None:
    run = client.post("/api/v1/runs", json={"dataset": "digits@1", "model": "digits"}).json()
    with Session(engine) as session:
        model = Model(name="digits", task="classification")
        session.add(model)
        session.flush()
        version = ModelVersion(
            model_id=model.id,  # type: ignore[arg-type]
            version=1,
            source="trained",
            dataset_version_id=run["dataset_version_id"],
            run_id=run["id"],
            keras_sha256="f" * 64,
        )
        session.add(version)
        session.commit()
        jobs.claim_next_run(session, worker="h:1")
        jobs.record_results(
            session,
            run_id=run["id"],
            metrics={"test": {"accuracy": 0.97}},
            environment={"tensorflow": "2.21.0", "seed": "0"},
            history=[{"epoch": 1, "loss": 0.3}],
            phase="building targets",
        )
        jobs.finish_run(
            session, run_id=run["id"], status="succeeded", model_version_id=version.id, phase="done"
        )
    shown = client.get(f"/api/v1/runs/{run['id']}").json()
    assert shown["status"] == "succeeded" and shown["metrics"]["test"]["accuracy"] == 0.97
    assert shown["history"] == [{"epoch": 1, "loss": 0.3}]
    assert shown["environment"]["tensorflow"] == "2.21.0"
    assert shown["lineage"]["model_version"] == 1
    assert shown["lineage"]["dataset"] == "digits" and shown["lineage"]["dataset_version"] == 1
    assert shown["model_version_id"] == shown["lineage"]["model_version_id"]


def test_openapi_documents_the_routes(client: TestClient) -> None:
    paths = client.get("/api/v1/openapi.json").json()["paths"]
    assert {"/api/v1/runs", "/api/v1/runs/{run_id}", "/api/v1/runs/{run_id}/cancel"} <= set(paths)
