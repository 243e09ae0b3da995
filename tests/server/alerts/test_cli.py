"""``edgefleet alerts ...`` against a real server (uvicorn in a thread) whose evaluator opens
the alerts."""

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
from tests.server.alerts.conftest import CANARY, MODEL, Clock, Fleet, at, make_fleet
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
    with serve(create_app(settings, clock=Clock(at(0.5)))) as found:
        monkeypatch.setenv("EDGEFLEET_TOKEN", admin_token(settings))
        yield found


def cli(url: str, *args: str, code: int = 0) -> str:
    result = runner.invoke(app, [*args, "--server", url], env={"COLUMNS": "200"})
    assert result.exit_code == code, result.output
    return result.stdout if code == 0 else result.output


def wait_json(url: str, *args: str) -> Any:
    deadline = time.monotonic() + 20
    while True:  # the server's evaluator thread writes the alert
        found = json.loads(cli(url, *args, "--json"))
        if found:
            return found
        assert time.monotonic() < deadline, f"nothing from {args}"
        time.sleep(0.05)


def test_rules_and_alerts_from_the_command_line(url: str, fleet: Fleet) -> None:
    fleet.hour(0, CANARY, errors=40, latency_ms=60.0)
    created = json.loads(
        cli(
            url,
            "alerts",
            "rules",
            "create",
            "canary-errors",
            "--kind",
            "error_rate",
            "--model",
            MODEL,
            "--group",
            "canary",
            "--max-error-rate",
            "0.05",
            "--severity",
            "critical",
            "--json",
        )
    )
    assert created["condition"]["max_error_rate"] == 0.05 and created["severity"] == "critical"
    text = cli(
        url, "alerts", "rules", "create", "slow", "--kind", "latency_p95", "--model", MODEL,
        "--sla-ratio", "1.5", "--webhook", "https://hooks.example.com/secret/path",
    )  # fmt: skip
    assert "slow latency_p95 · sensor in the fleet" in text
    assert "webhook: https://hooks.example.com/…" in text and "secret" not in text

    (alert, *_) = wait_json(url, "alerts", "list", "--rule", "canary-errors")
    assert alert["subject"] == "sensor v1 in group canary"
    table = " ".join(cli(url, "alerts", "list").split())
    assert "canary-errors" in table and "critical" in table and "slow" in table
    shown = json.loads(cli(url, "alerts", "show", str(alert["id"]), "--json"))
    assert shown["evidence"]["windows"][0]["errors"] == 240
    text = " ".join(cli(url, "alerts", "show", str(alert["id"])).split())
    assert f"alert {alert['id']} critical open · rule canary-errors (error_rate)" in text
    assert "evidence when it opened" in text

    listed = json.loads(cli(url, "alerts", "rules", "list", "--json"))
    assert [r["name"] for r in listed] == ["canary-errors", "slow"]
    disabled = json.loads(cli(url, "alerts", "rules", "disable", "canary-errors", "--json"))
    assert disabled["enabled"] is False and disabled["open_alerts"] == 0
    resolved = json.loads(cli(url, "alerts", "list", "--status", "resolved", "--json"))
    assert [a["resolution"] for a in resolved] == ["the rule was disabled"]
    assert "rule slow deleted" in cli(url, "alerts", "rules", "delete", "slow")


def test_errors_name_the_problem(url: str) -> None:
    out = cli(url, "alerts", "rules", "create", "x", "--kind", "drift", "--model", "nope", code=1)
    assert "HTTP 404" in out and "no model named 'nope'" in out
    out = cli(
        url, "alerts", "rules", "create", "x", "--kind", "drift", "--model", MODEL,
        "--max-error-rate", "0.1", code=1,
    )  # fmt: skip
    assert "condition.drift.max_error_rate: Extra inputs are not permitted" in out
    out = cli(url, "alerts", "list", "--status", "closed", code=2)
    assert "use open, resolved or all" in out
    out = cli(
        url, "alerts", "rules", "create", "x", "--kind", "offline", "--offline-for", "soon", code=2
    )
    assert "--offline-for 'soon'" in out
    assert "no alert 12" in cli(url, "alerts", "show", "12", code=1)
