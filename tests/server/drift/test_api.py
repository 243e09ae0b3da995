"""``GET /api/v1/drift`` and ``/drift/timeseries`` on a real app and database: a drifted
group shows drift on the right feature while the control group does not; bad input is
a 4xx that names the problem."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from server.app import create_app
from server.settings import Settings
from tests.conftest import operator_client
from tests.server.drift.conftest import (
    CANARY,
    CONTROL,
    DRIFTED_FEATURE,
    T0,
    make_reference,
    register_version,
    seed_fleet,
)

pytestmark = pytest.mark.database

REFERENCE = make_reference()
RANGE = {"since": "2026-11-02T00:00:00Z", "until": "2026-11-02T06:00:00Z"}


@pytest.fixture
def client(db_url: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, run_jobs=False)
    # The app lives on the fleet's own day, so its retention job keeps the seeded reports.
    with operator_client(create_app(settings, clock=lambda: T0 + timedelta(hours=12))) as client:
        state = client.app.state  # type: ignore[attr-defined]
        with Session(state.engine) as session:
            seed_fleet(session, store=state.artifacts, keys=state.keys, reference=REFERENCE)
            session.commit()
        yield client


def drift(client: TestClient, **params: Any) -> Any:
    response = client.get("/api/v1/drift", params={"model": "sensor"} | RANGE | params)
    assert response.status_code == 200, response.text
    return response.json()


def levels(body: dict[str, Any]) -> dict[str, str]:
    return {f["name"]: f["level"] for f in body["features"]}


def test_a_drifted_group_shows_drift_on_its_feature_and_the_control_group_does_not(
    client: TestClient,
) -> None:
    canary = drift(client, group="canary")
    assert canary["version"] == 1  # the newest version with data, not v2
    assert canary["group"] == "canary" and canary["devices"]["in_scope"] == 3
    assert levels(canary)[DRIFTED_FEATURE] == "act"
    assert all(level == "ok" for name, level in levels(canary).items() if name != "f3")
    assert canary["top_features"] == [DRIFTED_FEATURE]
    assert canary["devices"]["drifted_share"] == 1.0
    assert {d["device_id"] for d in canary["top_devices"]} == set(CANARY)
    assert all(d["feature"] == DRIFTED_FEATURE for d in canary["top_devices"])
    by_name = {f["name"]: f for f in canary["features"]}
    assert by_name[DRIFTED_FEATURE]["devices_act_share"] == 1.0
    assert by_name[DRIFTED_FEATURE]["mean_shift"] > 1.5

    control = drift(client, group="control")
    assert set(levels(control).values()) == {"ok"}
    assert control["devices"]["drifted_share"] == 0.0 and control["top_features"] == []

    fleet = drift(client)
    assert fleet["devices"]["drifted_share"] == 0.5 and fleet["devices"]["in_scope"] is None
    assert fleet["rows_read"] == {"fleet_6h": 1, "6h": 6}  # 6 hours from 00:00: one block
    assert fleet["sla"]["windows"] == 72 and fleet["sla"]["errors"] == 72
    assert fleet["sla"]["error_rate"] == pytest.approx(72 / (72 * 301))
    assert 5.0 <= fleet["sla"]["p95_ms"] < 6.0
    assert fleet["predictions"]["classes"]["level"] == "ok"

    listed = drift(client, devices=f"{CANARY[0]},{CONTROL[0]}")
    assert listed["devices"]["in_scope"] == 2 and listed["devices"]["drifted_share"] == 0.5
    pairs = [("model", "sensor"), ("devices", CANARY[0]), ("devices", CONTROL[0])]
    repeated = client.get("/api/v1/drift", params=[*pairs, *RANGE.items()])
    assert repeated.json()["devices"] == listed["devices"]

    strict = drift(client, group="canary", min_samples=10_000)
    assert strict["devices"]["evaluated"] == 0 and strict["devices"]["drifted_share"] is None


def test_versions_by_number_and_latest(client: TestClient) -> None:
    assert drift(client, version="1")["version"] == 1
    empty = drift(client, version="latest")
    assert empty["version"] == 2 and empty["features"] == [] and empty["sla"]["windows"] == 0


def test_the_timeseries_of_a_feature(client: TestClient) -> None:
    response = client.get(
        "/api/v1/drift/timeseries",
        params={"model": "sensor", "group": "canary", "feature": [DRIFTED_FEATURE, "f0"]} | RANGE,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["bucket"] == "hour" and [s["feature"] for s in body["series"]] == ["f3", "f0"]
    drifted, steady = body["series"]
    assert len(drifted["points"]) == 6 and all(p["level"] == "act" for p in drifted["points"])
    assert all(p["level"] == "ok" for p in steady["points"])
    assert drifted["points"][0]["start"] == "2026-11-02T00:00:00Z"
    daily = client.get(
        "/api/v1/drift/timeseries", params={"model": "sensor", "bucket": "day"} | RANGE
    ).json()
    assert daily["bucket"] == "day" and len(daily["series"]) == len(REFERENCE.features)
    assert daily["series"][0]["points"][0]["n"] == 6 * 12 * 300  # devices x windows x rows


BAD_REQUESTS = [
    ("", {"model": "nope"}, 404, "no model named 'nope'"),
    ("", {"version": "9"}, 404, "has no version or alias '9'"),
    ("", {"group": "nope"}, 404, "no device group named 'nope'"),
    ("", {"since": "last week"}, 422, "since='last week'"),
    ("", {"since": "2026-11-03T00:00:00Z"}, 422, "must be before until"),
    ("", {"group": "canary", "devices": "canary-0"}, 422, "not both"),
    ("", {"warn": "0.5"}, 422, "warn (0.5) must be below act"),
    ("", {"min_samples": "0"}, 422, "min_samples"),
    ("/timeseries", {"feature": "f99"}, 422, "unknown feature(s) ['f99']"),
    ("/timeseries", {"bucket": "week"}, 422, "bucket"),
]


def test_bad_requests_name_the_problem(client: TestClient) -> None:
    for path, params, status, message in BAD_REQUESTS:
        response = client.get(f"/api/v1/drift{path}", params={"model": "sensor"} | RANGE | params)
        assert response.status_code == status, (params, response.text)
        assert message in response.text, (params, response.text)
    missing = client.get("/api/v1/drift", params=RANGE)
    assert missing.status_code == 422 and "model" in missing.text


def test_a_version_without_a_reference_is_a_404_saying_so(client: TestClient) -> None:
    state = client.app.state  # type: ignore[attr-defined]
    with Session(state.engine) as session:
        register_version(session, store=state.artifacts, keys=state.keys, reference=None, version=3)
        session.commit()
    response = client.get("/api/v1/drift", params={"model": "sensor", "version": "3"} | RANGE)
    assert response.status_code == 404
    assert "sensor v3 has no usable drift reference" in response.json()["detail"]
    assert "carries no drift reference" in response.json()["detail"]


def test_openapi_documents_the_drift_views(client: TestClient) -> None:
    spec = client.get("/api/v1/openapi.json").json()
    assert {"/api/v1/drift", "/api/v1/drift/timeseries"} <= set(spec["paths"])
    parameters = {p["name"] for p in spec["paths"]["/api/v1/drift"]["get"]["parameters"]}
    assert {"model", "version", "group", "devices", "since", "until"} <= parameters
    assert T0.isoformat().startswith(RANGE["since"][:10])
