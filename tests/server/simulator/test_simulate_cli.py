"""``edgefleet simulate``: devices enroll through the API and show up in the inventory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.app import create_app
from server.cli import app as cli
from tests.conftest import admin_token
from tests.server.fleet.conftest import fleet_settings, serve

pytestmark = [pytest.mark.database, pytest.mark.broker]


def test_simulate_enrolls_devices_that_go_online(
    db_url: str, tmp_path: Path, mqtt_broker: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker_url = mqtt_broker.url  # type: ignore[attr-defined]
    app = create_app(fleet_settings(db_url, tmp_path, run_jobs=False, broker_url=broker_url))
    with serve(app) as url:
        monkeypatch.setenv("EDGEFLEET_TOKEN", admin_token(app.state.settings))
        result = CliRunner().invoke(
            cli,
            [
                "simulate",
                "--server",
                url,
                "--devices",
                "3",
                "--group",
                "line-1",
                "--prefix",
                "cli-sim",
                "--tag",
                "site=berlin",
                "--report-interval",
                "0.5",
                "--duration",
                "2",
                "--json",
            ],
        )
        assert result.exit_code == 0, result.output
        stats = json.loads(result.stdout)
        assert stats["devices"] == 3
        assert stats["telemetry_sent"] >= 3
        listed = CliRunner().invoke(
            cli, ["devices", "list", "--server", url, "--tag", "site=berlin", "--json"]
        )
        assert listed.exit_code == 0, listed.output
        devices = {d["id"]: d for d in json.loads(listed.stdout)}
        assert set(devices) == {"cli-sim-0000", "cli-sim-0001", "cli-sim-0002"}
        assert {d["status"] for d in devices.values()} == {"accepted"}
        assert all(d["agent_version"] == "sim-1" for d in devices.values())
        again = CliRunner().invoke(
            cli, ["simulate", "--server", url, "--devices", "1", "--prefix", "cli-sim"]
        )
        assert again.exit_code == 1
        assert "cli-sim-0000" in again.output and "409" in again.output
