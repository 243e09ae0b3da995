"""``edgefleet retraining ...`` against a real server (uvicorn in a thread) whose evaluator
takes the decision."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from server.app import create_app
from server.cli import app
from server.settings import Settings
from tests.conftest import admin_token
from tests.server.alerts.conftest import (
    CANARY,
    DRIFTED_FEATURE,
    MODEL,
    Clock,
    Fleet,
    at,
    make_fleet,
)
from tests.server.fleet.conftest import serve

pytestmark = pytest.mark.database

runner = CliRunner()


@pytest.fixture
def fleet(engine: Engine, tmp_path: Path) -> Fleet:
    return make_fleet(engine, tmp_path / "data")


@pytest.fixture
def url(
    db_url: str, tmp_path: Path, fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    settings = Settings(
        data_dir=tmp_path / "data", database_url=db_url, run_jobs=False, alert_interval_seconds=0.05
    )
    with serve(create_app(settings, clock=Clock(at(1.5)))) as found:
        monkeypatch.setenv("EDGEFLEET_TOKEN", admin_token(settings))
        yield found


def cli(url: str, *args: str, code: int = 0) -> str:
    result = runner.invoke(app, [*args, "--server", url], env={"COLUMNS": "200"})
    assert result.exit_code == code, result.output
    return result.stdout if code == 0 else result.output


def wait_json(url: str, *args: str) -> Any:
    deadline = time.monotonic() + 20
    while True:  # the server's evaluator thread takes the decision
        found = json.loads(cli(url, *args, "--json"))
        if found:
            return found
        assert time.monotonic() < deadline, f"nothing from {args}"
        time.sleep(0.05)


def test_a_policy_its_decision_and_the_approval_from_the_command_line(
    url: str, fleet: Fleet
) -> None:
    for hour in (0, 1):
        fleet.hour(hour, CANARY, shift={DRIFTED_FEATURE: 2.0})
    create = [
        "retraining", "policies", "create", "sensor-drift", "--model", MODEL,
        "--group", "canary", "--group", "control", "--windows", "2", "--min-samples", "200",
        "--share", "0.5", "--epochs", "2", "--canary", "1dev,100", "--cooldown", "12h",
    ]  # fmt: skip
    created = json.loads(cli(url, *create, "--json"))
    assert created["groups"] == ["canary", "control"] and created["cooldown_seconds"] == 43200
    assert created["condition"]["min_device_share"] == 0.5 and created["training"]["epochs"] == 2
    text = " ".join(cli(url, "retraining", "policies", "show", "sensor-drift").split())
    assert "sensor-drift sensor · drift on canary, control · enabled" in text
    assert "then: waits for approval, promotes to 'candidate', canary rollout 1dev,100" in text

    (decision,) = wait_json(url, "retraining", "decisions")
    assert decision["status"] == "pending_approval" and decision["group"] == "canary"
    text = " ".join(cli(url, "retraining", "decisions", str(decision["id"])).split())
    assert f"decision {decision['id']} pending_approval · policy sensor-drift" in text
    assert f"features: {DRIFTED_FEATURE}" in text and "canary-0" in text
    assert f"approve: edgefleet retraining approve {decision['id']}" in text
    table = " ".join(cli(url, "retraining", "decisions").split())
    assert "pending_approval" in table and "sensor v1" in table

    approved = json.loads(
        cli(url, "retraining", "approve", str(decision["id"]), "--note", "go", "--json")
    )
    assert approved["status"] == "training" and approved["run"]["status"] == "queued"
    out = cli(url, "retraining", "reject", str(decision["id"]), code=1)
    assert "HTTP 409" in out and "only a decision pending approval can be rejected" in out
    training = json.loads(cli(url, "retraining", "decisions", "--status", "training", "--json"))
    assert [d["id"] for d in training] == [decision["id"]]

    listed = json.loads(cli(url, "retraining", "policies", "list", "--json"))
    assert [p["name"] for p in listed] == ["sensor-drift"]
    assert (
        json.loads(cli(url, "retraining", "policies", "disable", "sensor-drift", "--json"))[
            "enabled"
        ]
        is False
    )
    assert "policy sensor-drift deleted" in cli(
        url, "retraining", "policies", "delete", "sensor-drift"
    )


def test_errors_name_the_problem(url: str) -> None:
    out = cli(
        url, "retraining", "policies", "create", "p", "--model", MODEL, "--group", "nope", code=1
    )
    assert "HTTP 404" in out and "no device group named 'nope'" in out
    out = cli(
        url, "retraining", "policies", "create", "p", "--model", MODEL, "--group", "canary",
        "--kind", "offline", code=1,
    )  # fmt: skip
    assert "HTTP 422" in out
    out = cli(url, "retraining", "approve", "41", code=1)
    assert "no retraining decision 41" in out
