"""``edgefleet drift`` against a real server running in a thread."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session
from typer.testing import CliRunner

from server.app import create_app
from server.cli import app
from tests.conftest import admin_token
from tests.server.drift.conftest import DRIFTED_FEATURE, T0, make_reference, seed_fleet
from tests.server.fleet.conftest import fleet_settings, serve

pytestmark = pytest.mark.database

runner = CliRunner()
RANGE = ["--since", "2026-11-02T00:00:00Z", "--until", "2026-11-02T06:00:00Z"]


@pytest.fixture
def server_url(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    # The app lives on the fleet's own day, so its retention job keeps the seeded reports.
    api = create_app(
        fleet_settings(db_url, tmp_path, run_jobs=False), clock=lambda: T0 + timedelta(hours=12)
    )
    with serve(api) as url:
        state = api.state
        monkeypatch.setenv("EDGEFLEET_TOKEN", admin_token(state.settings))
        with Session(state.engine) as session:
            seed_fleet(session, store=state.artifacts, keys=state.keys, reference=make_reference())
            session.commit()
        yield url


def test_drift_as_json_and_as_a_table(server_url: str) -> None:
    args = ["drift", "--model", "sensor", "--group", "canary", *RANGE, "--json"]
    result = runner.invoke(app, [*args, "--feature", DRIFTED_FEATURE, "--server", server_url])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)  # only JSON on stdout
    assert body["top_features"] == [DRIFTED_FEATURE]
    assert body["devices"]["drifted_share"] == 1.0
    assert body["timeseries"]["series"][0]["feature"] == DRIFTED_FEATURE

    table = runner.invoke(
        app, ["drift", "--model", "sensor", *RANGE, "--top", "3", "--server", server_url]
    )
    assert table.exit_code == 0, table.output
    text = " ".join(table.stdout.split())
    assert "sensor v1 · the whole fleet" in text
    assert "features by PSI" in text and "ACT" in text
    assert "devices drifted (PSI ≥ 0.25): 3 of 6 evaluated (50%)" in text
    assert "top devices" in text and "canary-" in text
    assert "latency p50" in text and "errors 72 of" in text
    # the drifted feature comes first in the table
    assert text.index(DRIFTED_FEATURE) < text.index(" f0 ")


def test_errors_are_one_line_with_the_servers_reason(server_url: str) -> None:
    result = runner.invoke(app, ["drift", "--model", "nope", "--server", server_url])
    assert result.exit_code == 1
    assert "HTTP 404" in result.output and "no model named 'nope'" in result.output
    bad = runner.invoke(
        app, ["drift", "--model", "sensor", "--since", "soon", "--server", server_url]
    )
    assert bad.exit_code == 1 and "since='soon'" in " ".join(bad.output.split())
