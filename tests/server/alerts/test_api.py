"""``/api/v1/alert-rules`` and ``/api/v1/alerts`` on a real app and database, with the app's
own evaluator thread (its clock set by the test) opening and resolving the alerts."""

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
from tests.server.alerts.conftest import CANARY, CONTROL, MODEL, Clock, Fleet, at, make_fleet

pytestmark = pytest.mark.database

DRIFT = {"kind": "drift", "windows": 1, "min_samples": 200}


@pytest.fixture
def fleet(engine: Engine, tmp_path: Path) -> Fleet:
    return make_fleet(engine, tmp_path / "data")


@pytest.fixture
def clock() -> Clock:
    return Clock(at(0.5))


@pytest.fixture
def client(db_url: str, tmp_path: Path, fleet: Fleet, clock: Clock) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        run_jobs=False,
        alert_interval_seconds=0.05,
    )
    with operator_client(create_app(settings, clock=clock)) as client:
        yield client


def call(client: TestClient, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
    response = client.request(method, f"/api/v1{path}", **kwargs)
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


def rule(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "model": MODEL, "condition": DRIFT} | fields


def test_rules_are_created_listed_changed_and_deleted(client: TestClient) -> None:
    created = call(
        client,
        "POST",
        "/alert-rules",
        201,
        json=rule(
            "canary-drift",
            group="canary",
            severity="critical",
            webhook_url="https://hooks.example.com/services/T000/B000/XXXX",
        ),
    )
    assert created["kind"] == "drift" and created["group"] == "canary"
    assert created["condition"]["windows"] == 1 and created["condition"]["threshold"] is None
    assert created["webhook"] == "https://hooks.example.com/…"  # the secret path is hidden
    assert created["open_alerts"] == 0 and created["enabled"] is True
    call(
        client,
        "POST",
        "/alert-rules",
        201,
        json=rule("fleet-errors", condition={"kind": "error_rate", "max_error_rate": 0.1}),
    )
    call(
        client,
        "POST",
        "/alert-rules",
        201,
        json={
            "name": "gone-quiet",
            "group": "control",
            "condition": {"kind": "offline", "offline_for": 1800},
        },
    )
    names = [r["name"] for r in call(client, "GET", "/alert-rules")]
    assert names == ["canary-drift", "fleet-errors", "gone-quiet"]
    assert [r["name"] for r in call(client, "GET", "/alert-rules", params={"kind": "offline"})] == [
        "gone-quiet"
    ]
    assert call(client, "GET", "/alert-rules/gone-quiet")["condition"]["offline_for"] == "PT30M"

    changed = call(
        client,
        "PATCH",
        "/alert-rules/canary-drift",
        json={"enabled": False, "webhook_url": None, "condition": {"kind": "drift", "windows": 2}},
    )
    assert changed["enabled"] is False and changed["webhook"] is None
    assert changed["condition"]["windows"] == 2
    call(client, "DELETE", "/alert-rules/canary-drift", 204)
    call(client, "GET", "/alert-rules/canary-drift", 404)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (rule("x", model="nope"), 404, "no model named 'nope'"),
        (rule("x", group="nope"), 404, "no device group named 'nope'"),
        (rule("x", model=None), 422, "a drift rule needs a model"),
        (
            {"name": "x", "model": MODEL, "condition": {"kind": "offline", "offline_for": 600}},
            422,
            "an offline rule watches a group's devices",
        ),
        (rule("x", condition={"kind": "drift", "window": 2}), 422, '"drift","window"'),
        (rule("x", condition={"kind": "loud"}), 422, "does not match any of the expected tags"),
        (rule("x", condition={"kind": "error_rate"}), 422, "max_error_rate"),
        (rule("x", webhook_url="ftp://example.com/x"), 422, "use an http:// or https:// URL"),
        (rule("no spaces please"), 422, "name"),
        (rule("x", severity="loud"), 422, "severity"),
    ],
)
def test_bad_rules_are_refused_naming_the_problem(
    client: TestClient, body: dict[str, Any], status: int, message: str
) -> None:
    response = client.post("/api/v1/alert-rules", json=body)
    assert response.status_code == status, response.text
    assert message in response.text


def test_a_taken_name_is_a_conflict_and_commands_on_unknown_rules_404(client: TestClient) -> None:
    call(client, "POST", "/alert-rules", 201, json=rule("dup"))
    assert "exists already" in call(client, "POST", "/alert-rules", 409, json=rule("dup"))["detail"]
    call(client, "PATCH", "/alert-rules/nope", 404, json={"enabled": False})
    call(client, "DELETE", "/alert-rules/nope", 404)
    kind_change = {"condition": {"kind": "error_rate", "max_error_rate": 0.1}}
    assert (
        "needs a rule of its own"
        in call(client, "PATCH", "/alert-rules/dup", 422, json=kind_change)["detail"]
    )


def test_the_servers_evaluator_opens_and_resolves_alerts(
    client: TestClient, fleet: Fleet, clock: Clock
) -> None:
    fleet.hour(0, CANARY, shift={"f3": 2.0})
    fleet.hour(0, CONTROL)
    call(client, "POST", "/alert-rules", 201, json=rule("canary-drift", group="canary"))
    call(client, "POST", "/alert-rules", 201, json=rule("control-drift", group="control"))

    opened = wait_for(lambda: call(client, "GET", "/alerts"), "an open alert")
    (alert,) = opened
    assert alert["rule"] == "canary-drift" and alert["status"] == "open"
    assert alert["subject"] == "sensor v1 in group canary" and alert["version"] == 1
    shown = call(client, "GET", f"/alerts/{alert['id']}")
    assert {d["device_id"] for d in shown["evidence"]["devices"]} == set(CANARY)
    assert shown["evidence"]["features"] == ["f3"] and shown["deliveries"] == []
    assert call(client, "GET", "/alert-rules/canary-drift")["open_alerts"] == 1
    control = wait_for(
        lambda: (r := call(client, "GET", "/alert-rules/control-drift"))["last_evaluated_at"] and r,
        "the control group's rule evaluated",
    )
    assert control["open_alerts"] == 0 and call(client, "GET", "/alerts") == opened

    fleet.hour(1, CANARY)
    clock.now = at(1.5)
    resolved = wait_for(
        lambda: call(client, "GET", "/alerts", params={"status": "resolved"}), "the resolution"
    )
    assert [a["id"] for a in resolved] == [alert["id"]]
    assert resolved[0]["resolved_at"].startswith("2026-11-02T01:30")
    assert call(client, "GET", "/alerts", params={"status": "open"}) == []
    for params, expected in (
        ({"rule": "canary-drift"}, 1),
        ({"group": "control"}, 0),
        ({"model": MODEL, "kind": "drift", "severity": "warning"}, 1),
        ({"since": "2026-11-02T01:45:00Z"}, 0),  # resolved before then
        ({"since": "30m"}, 1),  # clock-relative: resolved at 01:30, 30 min ago
    ):
        assert len(call(client, "GET", "/alerts", params=params)) == expected, params
    assert "since='soon'" in call(client, "GET", "/alerts", 422, params={"since": "soon"})["detail"]
    call(client, "GET", "/alerts", 422, params={"status": "closed"})
    assert call(client, "GET", "/alerts/9999", 404)["detail"] == "no alert 9999"
