"""Feedback and samples over HTTP and from the command line, against a real app and database."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import Session
from typer.testing import CliRunner

from server.api.deps import get_now
from server.app import create_app
from server.cli import app as cli
from server.samples.service import store_sample_batches
from shared.messages import SampleBatch
from tests.conftest import admin_token, operator_client
from tests.server.feedback.conftest import FEATURES, MODEL, T0, add_fleet, add_model
from tests.server.fleet.conftest import fleet_settings, serve

pytestmark = pytest.mark.database
runner = CliRunner()
NOW = T0 + timedelta(hours=6)
UNTIL = ["--until", "2026-11-03T00:00:00Z"]  # a label posted now is at `now`, which until excludes


@pytest.fixture
def api(db_url: str, tmp_path: Path) -> Iterator[tuple[FastAPI, TestClient]]:
    app = create_app(fleet_settings(db_url, tmp_path, run_jobs=False))
    app.dependency_overrides[get_now] = lambda: NOW
    with operator_client(app) as client:
        with Session(app.state.engine) as session:
            add_model(session, app.state.artifacts)
            add_fleet(session)
        yield app, client


def label(device: str, prediction: str, predicted: str, true: str, **more: Any) -> dict[str, Any]:
    return {
        "device_id": device,
        "prediction_id": prediction,
        "model": MODEL,
        "model_version": 1,
        "predicted_label": predicted,
        "true_label": true,
        "predicted_at": (T0 + timedelta(minutes=5)).isoformat(),
        **more,
    }


def test_posting_labels_is_idempotent_and_refusals_name_the_problem(api: Any) -> None:
    _, client = api
    first = client.post("/api/v1/feedback", json=label("a-0", "p-1", "ok", "dent"))
    assert first.status_code == 201, first.text
    body = first.json()
    assert (body["correct"], body["created"], body["source"]) == (False, True, "api")
    assert body["labelled_at"].startswith(NOW.isoformat()[:19])
    again = client.post("/api/v1/feedback", json=label("a-0", "p-1", "ok", "dent"))
    assert again.status_code == 200 and again.json()["created"] is False
    conflict = client.post("/api/v1/feedback", json=label("a-0", "p-1", "ok", "scratch"))
    assert conflict.status_code == 409 and "already has a label" in conflict.json()["detail"]
    for body, status, text in (
        (label("nobody", "p-2", "ok", "ok"), 404, "no device 'nobody'"),
        (label("a-0", "p-2", "ok", "crack"), 422, "'crack' is not a label of parts v1"),
        (label("a-0", "p-2", "ok", "ok", model_version=5), 404, "no version or alias '5'"),
        (label("a-0", "p 2", "ok", "ok"), 422, "prediction_id"),
        (label("a/0", "p-2", "ok", "ok"), 422, "device_id"),
    ):
        response = client.post("/api/v1/feedback", json=body)
        assert response.status_code == status, response.text
        assert text in json.dumps(response.json()["detail"])

    batch = client.post(
        "/api/v1/feedback/batch",
        json={"items": [label("a-1", "p-1", "ok", "ok"), label("a-2", "p-1", "dent", "dent")]},
    )
    assert batch.status_code == 200 and (batch.json()["created"], batch.json()["unchanged"]) == (
        2,
        0,
    )
    refused = client.post(
        "/api/v1/feedback/batch",
        json={"items": [label("b-0", "p-1", "ok", "ok"), label("b-0", "p-2", "ok", "crack")]},
    )
    assert refused.status_code == 422
    accuracy = client.get(
        "/api/v1/feedback/accuracy", params={"model": MODEL, "devices": "b-0", "since": "7d"}
    ).json()
    assert accuracy["overall"]["total"] == 0  # nothing of the refused batch was stored


def test_accuracy_per_group_version_and_label(api: Any) -> None:
    _, client = api
    items = [
        label("a-0", "p-1", "ok", "ok"),
        label("a-1", "p-1", "ok", "dent"),
        label("a-2", "p-1", "dent", "dent"),
        label("b-0", "p-1", "ok", "ok"),
        label("b-1", "p-1", "scratch", "scratch", model_version=2),
    ]
    assert client.post("/api/v1/feedback/batch", json={"items": items}).status_code == 200
    params = {"model": MODEL, "since": "2026-11-02T00:00:00Z", "until": "2026-11-03T00:00:00Z"}
    fleet = client.get("/api/v1/feedback/accuracy", params=params).json()
    assert fleet["version"] is None and fleet["devices_in_scope"] is None
    assert [(v["version"], v["correct"], v["total"]) for v in fleet["versions"]] == [
        (1, 3, 4),
        (2, 1, 1),
    ]
    assert fleet["overall"] == {"correct": 4, "total": 5, "accuracy": 0.8}
    group = client.get(
        "/api/v1/feedback/accuracy", params={**params, "group": "line-a", "version": "1"}
    ).json()
    assert group["overall"] == {"correct": 2, "total": 3, "accuracy": pytest.approx(2 / 3)}
    assert {row["label"]: (row["correct"], row["total"]) for row in group["labels"]} == {
        "dent": (1, 2),
        "ok": (1, 1),
    }
    # the range is placed by when the predictions were served, exactly
    late = client.get(
        "/api/v1/feedback/accuracy", params={**params, "since": "2026-11-02T08:05:01Z"}
    ).json()
    assert late["overall"]["total"] == 0
    for bad, status in (
        ({"model": "nope"}, 404),
        ({"model": MODEL, "group": "nope"}, 404),
        ({"model": MODEL, "since": "yesterday"}, 422),
        ({"model": MODEL, "since": "1h", "until": "2h"}, 422),
        ({"model": MODEL, "group": "line-a", "devices": "a-0"}, 422),
    ):
        response = client.get("/api/v1/feedback/accuracy", params=bad)
        assert response.status_code == status, (bad, response.text)


def samples(device: str, seq: int, ids: list[str | None], *, shift: float = 0.0) -> SampleBatch:
    rows = (np.arange(len(ids) * len(FEATURES)).reshape(len(ids), -1) / 10 + shift).tolist()
    return SampleBatch(
        device_id=device,
        seq=seq,
        model_name=MODEL,
        model_version=1,
        target="edge-x86_64-litert",
        window_end=T0 + timedelta(minutes=seq),
        rows=rows,
        prediction_ids=ids,
    )


def test_samples_become_a_dataset_version_with_lineage(api: Any) -> None:
    app, client = api
    with Session(app.state.engine) as session:
        stored = store_sample_batches(
            session,
            [
                samples("a-0", 1, ["p-1", "p-2", None]),
                samples("a-1", 2, ["p-1", "p-3"], shift=5),
                samples("b-0", 3, ["p-1"], shift=9),
                samples("a-0", 1, ["p-1", "p-2", None]),  # delivered twice
            ],
            now=NOW,
        )
        session.commit()
    assert stored == (3, 1)
    query = {"model": MODEL, "since": "1d"}
    summary = client.get("/api/v1/samples", params=query).json()
    assert (summary["batches"], summary["rows"], summary["devices"]) == (3, 6, 3)
    assert (summary["labelled_rows"], summary["unlabelled_rows"]) == (0, 5)
    assert summary["rows_without_prediction_id"] == 1
    nothing = client.post("/api/v1/samples/dataset-versions", json=query)
    assert nothing.status_code == 422 and "none of the 6 sample rows" in nothing.json()["detail"]

    client.post(
        "/api/v1/feedback/batch",
        json={
            "items": [
                label("a-0", "p-1", "ok", "scratch"),
                label("a-0", "p-2", "ok", "ok"),
                label("a-1", "p-3", "dent", "dent"),
                label("b-0", "p-1", "ok", "dent"),
            ]
        },
    )
    body = {**query, "group": "line-a"}
    added = client.post("/api/v1/samples/dataset-versions", json=body)
    assert added.status_code == 201, added.text
    result = added.json()
    assert (result["dataset"], result["version"], result["base_version"]) == ("parts-data", 2, 1)
    assert (result["added_rows"], result["rows"]) == (3, 63)
    lineage = result["lineage"]
    assert lineage["devices"] == ["a-0", "a-1"] and lineage["scope"]["group"] == "line-a"
    assert lineage["model_versions"] == [1]
    assert (lineage["unlabelled_rows"], lineage["rows_without_prediction_id"]) == (1, 1)
    assert lineage["windows"]["first_end"].startswith("2026-11-02T08:01")
    version = client.get("/api/v1/datasets/parts-data/versions/2").json()
    assert version["source_format"] == "samples" and version["lineage"] == lineage
    again = client.post("/api/v1/samples/dataset-versions", json=body)
    assert again.status_code == 200 and again.json()["version"] == 2
    assert again.json()["created"] is False


def test_the_commands(api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    app, _ = api
    with serve(app) as url:
        monkeypatch.setenv("EDGEFLEET_TOKEN", admin_token(app.state.settings))
        added = runner.invoke(
            cli,
            [
                "feedback", "add", "--device", "a-0", "--prediction", "p-7", "--model", MODEL,
                "--version", "1", "--predicted", "ok", "--label", "dent", "--server", url,
            ],
        )  # fmt: skip
        assert added.exit_code == 0, added.output
        assert "recorded" in added.stdout and "wrong" in added.stdout
        shown = runner.invoke(
            cli,
            [
                "feedback",
                "accuracy",
                "--model",
                MODEL,
                "--since",
                "30d",
                *UNTIL,
                "--json",
                "--server",
                url,
            ],
        )
        assert shown.exit_code == 0, shown.output
        assert json.loads(shown.stdout)["overall"]["total"] == 1
        table = runner.invoke(
            cli,
            ["feedback", "accuracy", "--model", MODEL, "--since", "30d", *UNTIL, "--server", url],
        )
        assert "accuracy 0.0%" in " ".join(table.stdout.split())
        bad = runner.invoke(cli, ["feedback", "accuracy", "--model", "nope", "--server", url])
        assert bad.exit_code == 1 and "no model named 'nope'" in bad.output

        with Session(app.state.engine) as session:
            store_sample_batches(session, [samples("a-0", 4, ["p-7"])], now=NOW)
            session.commit()
        summary = runner.invoke(
            cli, ["datasets", "samples", "show", "--model", MODEL, "--since", "1d", "--server", url]
        )
        assert summary.exit_code == 0, summary.output
        assert "1 rows in 1 batches" in summary.stdout
        made = runner.invoke(
            cli,
            [
                "datasets",
                "samples",
                "add",
                "--model",
                MODEL,
                "--since",
                "1d",
                "--json",
                "--server",
                url,
            ],
        )
        assert made.exit_code == 0, made.output
        assert json.loads(made.stdout)["added_rows"] == 1
