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


def test_drift_groups_split_the_fleet_and_tag_each_device_with_its_group(
    db_url: str, tmp_path: Path, mqtt_broker: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker_url = mqtt_broker.url  # type: ignore[attr-defined]
    app = create_app(fleet_settings(db_url, tmp_path, run_jobs=False, broker_url=broker_url))
    with serve(app) as url:
        monkeypatch.setenv("EDGEFLEET_TOKEN", admin_token(app.state.settings))
        for bad, why in (
            ("1.5:f1=2", "0 < SHARE <= 1"),
            ("0.5:", "at least one FEATURE=SHIFT"),
            ("0.5:f1=up", "must be a number"),
        ):
            refused = CliRunner().invoke(
                cli, ["simulate", "--server", url, "--devices", "4", "--drift-group", bad]
            )
            assert refused.exit_code == 2, refused.output
            assert why in " ".join(refused.output.split())  # the console wraps long lines
        too_many = CliRunner().invoke(
            cli,
            [
                *("simulate", "--server", url, "--devices", "4"),
                *("--drift-group", "0.75:f1=2", "--drift-group", "0.5:f2=1"),
            ],
        )
        assert too_many.exit_code == 2
        assert "more than the whole fleet" in " ".join(too_many.output.split())
        result = CliRunner().invoke(
            cli,
            [
                *("simulate", "--server", url, "--devices", "5", "--prefix", "grp", "--json"),
                *("--drift-group", "0.4:f1=2,f3=-1", "--drift-group", "0.2:f2=1"),
                *("--report-interval", "0.5", "--duration", "1"),
            ],
        )
        assert result.exit_code == 0, result.output
        listed = CliRunner().invoke(cli, ["devices", "list", "--server", url, "--json"])
        assert listed.exit_code == 0, listed.output
        groups = {
            d["id"]: d["tags"]["drift_group"]
            for d in json.loads(listed.stdout)
            if d["id"].startswith("grp-")
        }
        assert groups == {
            "grp-0000": "1",
            "grp-0001": "1",
            "grp-0002": "2",
            "grp-0003": "none",
            "grp-0004": "none",
        }
