"""``/api/v1/retraining/...`` on a real app and database; the app's own evaluator thread (its
clock set by the test) takes the decisions."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from server.app import create_app
from server.settings import Settings
from tests.conftest import operator_client
from tests.server.alerts.conftest import (
    CANARY,
    CONTROL,
    DRIFTED_FEATURE,
    MODEL,
    Clock,
    Fleet,
    at,
    make_fleet,
)

pytestmark = pytest.mark.database

DRIFT = {"kind": "drift", "windows": 2, "min_samples": 200, "min_device_share": 0.5}


@pytest.fixture
def fleet(engine: Engine, tmp_path: Path) -> Fleet:
    return make_fleet(engine, tmp_path / "data")


@pytest.fixture
def clock() -> Clock:
    return Clock(at(0.5))


@pytest.fixture
def client(db_url: str, tmp_path: Path, fleet: Fleet, clock: Clock) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path / "data", database_url=db_url, run_jobs=False, alert_interval_seconds=0.05
    )
    with operator_client(create_app(settings, clock=clock)) as client:
        yield client


def call(client: TestClient, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
    response = client.request(method, f"/api/v1/retraining{path}", **kwargs)
    assert response.status_code == expect, f"{method} {path}: {response.text}"
    return None if expect == 204 else response.json()


def wait_for(condition: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:  # the evaluator is a thread: poll what it wrote
        found = condition()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def policy(name: str = "sensor-drift", **fields: Any) -> dict[str, Any]:
    return {
        "name": name,
        "model": MODEL,
        "groups": ["canary", "control"],
        "condition": DRIFT,
    } | fields


def test_policies_are_created_listed_changed_and_deleted(client: TestClient) -> None:
    created = call(
        client,
        "POST",
        "/policies",
        201,
        json=policy(
            cooldown=7200,
            training={"epochs": 2},
            canary={
                "phases": "1dev,100",
                "wait_between_phases": 30,
                "gates": {"min_inferences": 50},
            },
        ),
    )
    assert created["kind"] == "drift" and created["groups"] == ["canary", "control"]
    assert created["approval"] is True and created["cooldown_seconds"] == 7200
    assert created["training"] == {"epochs": 2, "spec": {}} and created["alias"] == "candidate"
    canary = created["canary"]
    assert (canary["phases"], canary["approval"], canary["device_timeout"]) == (
        "1dev,100",
        True,
        None,
    )
    assert canary["wait_between_phases"] == "PT30S" and canary["gates"]["min_inferences"] == 50
    assert canary["gates"]["max_error_rate"] == 0.01  # the other gates keep their defaults
    call(client, "POST", "/policies", 201, json=policy("other", groups=["control"]))
    assert [p["name"] for p in call(client, "GET", "/policies")] == ["other", "sensor-drift"]
    assert call(client, "GET", "/policies", params={"model": "nope"}) == []
    changed = call(
        client, "PATCH", "/policies/sensor-drift", json={"canary": None, "approval": False}
    )
    assert changed["canary"] is None and changed["approval"] is False
    assert call(client, "GET", "/policies/sensor-drift")["approval"] is False
    call(client, "DELETE", "/policies/other", 204)
    call(client, "GET", "/policies/other", 404)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (policy(model="nope"), 404, "no model named 'nope'"),
        (policy(groups=["nope"]), 404, "no device group named 'nope'"),
        (policy(groups=[]), 422, "groups"),
        (policy(condition={"kind": "offline", "offline_for": 600}), 422, "does not match"),
        (policy(alias="production"), 422, "promote it to production yourself"),
        (policy(canary={"phases": "50,25"}), 422, "must increase"),
        (policy(training={"epochs": 0}), 422, "epochs"),
        (policy(cooldown=-5), 422, "cooldown must be between"),
        (policy(surprise=1), 422, "surprise"),
    ],
)
def test_bad_policies_are_refused_naming_the_problem(
    client: TestClient, body: dict[str, Any], status: int, message: str
) -> None:
    response = client.post("/api/v1/retraining/policies", json=body)
    assert response.status_code == status, response.text
    assert message in response.text


def test_the_servers_evaluator_takes_a_decision_that_an_operator_approves(
    client: TestClient, fleet: Fleet, clock: Clock
) -> None:
    for hour in (0, 1):
        fleet.hour(hour, CANARY, shift={DRIFTED_FEATURE: 2.0})
        fleet.hour(hour, CONTROL)
    call(client, "POST", "/policies", 201, json=policy(training={"epochs": 2}))
    call(client, "POST", "/policies", 201, json=policy("rejected-one", groups=["canary"]))
    clock.now = at(1.5)
    found = wait_for(
        lambda: len(d := call(client, "GET", "/decisions")) == 2 and d, "two decisions"
    )
    assert {(d["policy"], d["group"], d["status"]) for d in found} == {
        ("sensor-drift", "canary", "pending_approval"),
        ("rejected-one", "canary", "pending_approval"),
    }
    mine = next(d for d in found if d["policy"] == "sensor-drift")
    shown = call(client, "GET", f"/decisions/{mine['id']}")
    assert {d["device_id"] for d in shown["evidence"]["devices"]} == set(CANARY)
    assert shown["evidence"]["features"] == [DRIFTED_FEATURE]
    assert shown["plan"]["dataset"]["dataset"] == "sensor-data" and shown["run"] is None

    approved = call(client, "POST", f"/decisions/{mine['id']}/approve", json={"note": "looks real"})
    assert approved["status"] == "training" and approved["note"] == "looks real"
    assert approved["run"]["status"] == "queued" and approved["run_id"] == approved["run"]["id"]
    assert approved["plan"]["spec"]["epochs"] == 2
    assert [h["status"] for h in approved["history"]] == ["pending_approval", "training"]
    again = call(client, "POST", f"/decisions/{mine['id']}/approve", 409)
    assert "only a decision pending approval can be approved" in again["detail"]

    other = next(d for d in found if d["policy"] == "rejected-one")
    rejected = call(client, "POST", f"/decisions/{other['id']}/reject")  # no body: no note
    assert rejected["status"] == "rejected" and rejected["status_reason"] == "rejected"
    call(client, "POST", f"/decisions/{other['id']}/reject", 409)
    listed = call(client, "GET", "/decisions", params={"status": "training"})
    assert [d["id"] for d in listed] == [mine["id"]]
    assert call(client, "GET", "/decisions", params={"group": "control"}) == []
    call(client, "GET", "/decisions", 422, params={"status": "done"})
    call(client, "GET", "/decisions/999", 404)
    call(client, "POST", "/decisions/999/approve", 404)
