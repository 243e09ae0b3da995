"""The datasets REST API through a real app (SQLite, and PostgreSQL when configured)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from server.api.routes.datasets import get_ingest_limits
from server.app import create_app
from server.datasets.ingest import IngestLimits
from server.settings import Settings
from tests.conftest import operator_client

pytestmark = pytest.mark.database

GOOD_CSV = (
    "temp,rpm,state\n" + "".join(f"{i},{i * 10},{'on' if i % 2 else 'off'}\n" for i in range(40))
).encode()


@pytest.fixture
def client(db_url: str, tmp_path: Path) -> Iterator[TestClient]:
    app = create_app(Settings(data_dir=tmp_path / "data", database_url=db_url))
    with operator_client(app) as client:
        yield client


def upload(client: TestClient, data: bytes, *, filename: str = "data.csv", **form: str):  # type: ignore[no-untyped-def]
    return client.post("/api/v1/datasets", data=form, files={"file": (filename, data)})


def test_upload_a_csv_then_the_same_again(client: TestClient) -> None:
    response = upload(client, GOOD_CSV, name="machines", label="state", description="plant 1")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["created"] is True
    assert (body["dataset"], body["version"], body["rows"]) == ("machines", 1, 40)
    assert body["source_format"] == "csv" and body["source_name"] == "data.csv"
    schema = body["data_schema"]
    assert schema["task"] == "classification" and schema["class_names"] == ["off", "on"]
    assert schema["feature_names"] == ["temp", "rpm"]
    assert body["split_sizes"] == {"train": 28, "validation": 6, "test": 6}
    assert body["lineage"] == {"source": "upload", "filename": "data.csv"}

    again = upload(client, GOOD_CSV, name="machines", label="state")
    assert again.status_code == 200 and again.json()["created"] is False
    assert again.json()["version"] == 1

    listed = client.get("/api/v1/datasets").json()
    assert [(d["name"], d["latest_version"], d["version_count"]) for d in listed] == [
        ("machines", 1, 1)
    ]
    assert listed[0]["description"] == "plant 1"


def test_a_bad_csv_gets_every_problem(client: TestClient) -> None:
    rows = "".join(f"{'' if i < 4 else i},{'fast' if i == 3 else i},{i % 2}\n" for i in range(20))
    response = upload(client, b"temp,rpm,status\n" + rows.encode(), name="m", label="state")
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "3 problems" in detail
    assert "no column named 'state'" in detail
    assert "feature 'rpm' is not numeric" in detail
    assert "feature 'temp' is 20.0% missing" in detail
    assert client.get("/api/v1/datasets").json() == []


def test_bad_form_fields_are_all_reported(client: TestClient) -> None:
    response = upload(client, b"", name="bad name", lable="y", task="clustering")
    assert response.status_code == 422
    detail = response.json()["detail"]
    for expected in [
        "unknown form field 'lable'",
        "invalid dataset name 'bad name'",
        "form field 'label'",
        "task must be classification or regression",
    ]:
        assert expected in detail
    no_file = client.post(
        "/api/v1/datasets", data={"name": "m", "label": "y"}, files={"x": ("", b"")}
    )
    assert "no 'file' part" in no_file.json()["detail"]
    not_multipart = client.post("/api/v1/datasets", json={"name": "m"})
    assert not_multipart.status_code == 422 and "multipart/form-data" in not_multipart.text


def test_the_size_limit_holds(client: TestClient) -> None:
    limits = IngestLimits(max_bytes=200)
    client.app.dependency_overrides[get_ingest_limits] = lambda: limits  # type: ignore[attr-defined]
    response = upload(client, GOOD_CSV, name="m", label="state")
    assert response.status_code == 422
    assert "the file is larger than the limit of 200 bytes" in response.json()["detail"]
    declared_too_large = upload(client, b"a,y\n" + b"1,2\n" * 100_000, name="m", label="y")
    assert declared_too_large.status_code == 422
    assert "more than the file limit of 200 bytes" in declared_too_large.json()["detail"]
    assert client.get("/api/v1/datasets").json() == []


def test_npz_upload_and_task_from_the_dataset(client: TestClient) -> None:
    x = np.random.default_rng(0).normal(size=(30, 4, 2))
    buffer = io.BytesIO()
    np.savez(buffer, x=x, level=np.arange(30) % 3)
    first = upload(
        client, buffer.getvalue(), filename="a.npz", name="n", label="level", task="regression"
    )
    assert first.status_code == 201, first.text
    assert first.json()["data_schema"]["input_shape"] == [4, 2]
    assert first.json()["data_schema"]["task"] == "regression"
    buffer = io.BytesIO()
    np.savez(buffer, x=x[:20], level=np.arange(20) % 2)  # would be inferred as classification
    second = upload(client, buffer.getvalue(), filename="b.npz", name="n", label="level")
    assert second.status_code == 201, second.text
    assert second.json()["version"] == 2 and second.json()["data_schema"]["task"] == "regression"
    conflict = upload(client, buffer.getvalue(), name="n", label="level", task="classification")
    assert conflict.status_code == 409 and "regression dataset" in conflict.json()["detail"]


def test_examples_and_reading_versions(client: TestClient) -> None:
    digits = client.post("/api/v1/datasets/examples/digits")
    assert digits.status_code == 201, digits.text
    assert digits.json()["data_schema"]["input_shape"] == [8, 8, 1]
    assert digits.json()["source_format"] == "builtin"
    vibration = client.post("/api/v1/datasets/examples/vibration", params={"name": "vib-1"})
    assert vibration.status_code == 201
    assert vibration.json()["dataset"] == "vib-1" and vibration.json()["rows"] == 2000
    assert vibration.json()["lineage"]["generator"]["seed"] == 0
    assert client.post("/api/v1/datasets/examples/digits").status_code == 200
    missing = client.post("/api/v1/datasets/examples/mnist")
    assert missing.status_code == 404 and "digits, vibration" in missing.json()["detail"]

    detail = client.get("/api/v1/datasets/vib-1").json()
    assert detail["task"] == "classification" and detail["label"] == "condition"
    assert [v["version"] for v in detail["versions"]] == [1]
    version = client.get("/api/v1/datasets/vib-1/versions/latest").json()
    assert version["sha256"] == vibration.json()["sha256"]
    assert sum(version["split_sizes"].values()) == 2000
    assert client.get("/api/v1/datasets/vib-1/versions/1").json()["version"] == 1
    assert client.get("/api/v1/datasets/nope").status_code == 404
    assert client.get("/api/v1/datasets/vib-1/versions/9").status_code == 404
    assert client.get("/api/v1/datasets/vib-1/versions/v1").status_code == 422


def test_the_upload_is_documented(client: TestClient) -> None:
    spec = client.get("/api/v1/openapi.json").json()
    body = spec["paths"]["/api/v1/datasets"]["post"]["requestBody"]
    assert body["content"]["multipart/form-data"]["schema"]["required"] == ["file", "name", "label"]
