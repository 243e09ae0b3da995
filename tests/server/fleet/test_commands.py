"""``edgefleet tokens | devices | groups`` against a real server running in a thread."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from server.app import create_app
from server.cli import app
from server.commands.tokens import parse_duration
from tests.conftest import admin_token
from tests.server.fleet.conftest import PROFILE, enroll_body, fleet_settings, serve

pytestmark = pytest.mark.database

runner = CliRunner()


@pytest.fixture
def server_url(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    settings = fleet_settings(db_url, tmp_path, run_jobs=False)
    with serve(create_app(settings)) as url:
        monkeypatch.setenv("EDGEFLEET_TOKEN", admin_token(settings))
        yield url


def run(server_url: str, *args: str) -> Any:
    return runner.invoke(app, [*args, "--server", server_url])


def ok_json(server_url: str, *args: str) -> Any:
    result = run(server_url, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_tokens_devices_and_groups_from_the_command_line(server_url: str) -> None:
    created = run(server_url, "tokens", "create", "--profile", PROFILE, "--uses", "2")
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()  # only the token on stdout, for scripts
    assert token.startswith("efp.") and "\n" not in token
    auto = ok_json(server_url, "tokens", "create", "--auto-accept", "--expires", "2h")
    assert auto["auto_accept"] and auto["max_uses"] == 1 and auto["token"].startswith("efp.")

    for device_id, secret in (("cam-1", token), ("cam-2", token), ("gw-1", auto["token"])):
        response = httpx.post(f"{server_url}/api/v1/enroll", json=enroll_body(secret, device_id))
        assert response.status_code == 201, response.text

    tokens = ok_json(server_url, "tokens", "list")
    assert sorted((t["uses"], t["state"]) for t in tokens) == [(1, "used_up"), (2, "used_up")]
    assert all("token" not in t for t in tokens)

    pending = ok_json(server_url, "devices", "list", "--status", "pending")
    assert [d["id"] for d in pending] == ["cam-1", "cam-2"]
    accepted = run(server_url, "devices", "accept", "cam-1")
    assert accepted.exit_code == 0 and "cam-1: accepted" in accepted.stdout
    rejected = run(server_url, "devices", "reject", "cam-2")
    assert rejected.exit_code == 0 and "cam-2: rejected" in rejected.stdout
    refused = run(server_url, "devices", "accept", "cam-2")
    assert refused.exit_code == 1 and "HTTP 409" in refused.output

    tagged = run(server_url, "devices", "tag", "cam-1", "site=berlin", "line=2")
    assert tagged.exit_code == 0 and "line=2, site=berlin" in tagged.stdout
    untagged = ok_json(server_url, "devices", "tag", "cam-1", "--remove", "line")
    assert untagged["tags"] == {"site": "berlin"}
    bad_tag = run(server_url, "devices", "tag", "cam-1", "site")
    assert bad_tag.exit_code == 2 and "use NAME=VALUE" in bad_tag.output

    group = ok_json(server_url, "groups", "create", "berlin", "--selector", "site = berlin")
    assert group["selector"] == "site=berlin" and group["members"] == ["cam-1"]
    shown = run(server_url, "groups", "show", "berlin")
    assert shown.exit_code == 0 and "members (1): cam-1" in shown.stdout
    bad = run(server_url, "groups", "create", "oops", "--selector", "site=(berlin")
    assert bad.exit_code == 1 and "at position 5" in " ".join(bad.output.split())

    assert run(server_url, "groups", "create", "canary").exit_code == 0
    added = ok_json(server_url, "groups", "add", "canary", "gw-1", "cam-1")
    assert added["members"] == ["cam-1", "gw-1"]
    removed = ok_json(server_url, "groups", "remove", "canary", "cam-1")
    assert removed["members"] == ["gw-1"]
    windowed = ok_json(
        server_url, "groups", "update", "canary", "--maintenance-window", "01:00-03:00"
    )
    assert windowed["maintenance_window"] == "01:00-03:00"
    listed = ok_json(server_url, "groups", "list")
    assert [(g["name"], g["kind"], g["member_count"]) for g in listed] == [
        ("berlin", "dynamic", 1),
        ("canary", "static", 1),
    ]
    table = run(server_url, "groups", "list")
    assert "berlin" in table.stdout and "site=berlin" in table.stdout

    shown_device = ok_json(server_url, "devices", "show", "cam-1")
    assert shown_device["groups"] == ["berlin"] and shown_device["status"] == "accepted"
    human = run(server_url, "devices", "show", "cam-1")
    assert human.exit_code == 0 and "site=berlin" in human.stdout and "berlin" in human.stdout
    in_group = ok_json(server_url, "devices", "list", "--group", "canary")
    assert [d["id"] for d in in_group] == ["gw-1"]
    by_tag = ok_json(server_url, "devices", "list", "--tag", "site=berlin", "--offline")
    assert [d["id"] for d in by_tag] == ["cam-1"]
    listing = run(server_url, "devices", "list")
    assert listing.exit_code == 0 and "gw-1" in listing.stdout

    revoked = run(server_url, "devices", "revoke", "gw-1")
    assert revoked.exit_code == 0 and "gw-1: revoked" in revoked.stdout
    assert run(server_url, "devices", "delete", "cam-2").exit_code == 0
    assert run(server_url, "devices", "show", "cam-2").exit_code == 1
    revoked_token = ok_json(server_url, "tokens", "revoke", auto["id"])
    assert revoked_token["state"] == "revoked"
    assert run(server_url, "tokens", "create", "--expires", "soon").exit_code == 2


def test_durations() -> None:
    assert parse_duration("24h") == 86400
    assert parse_duration("1d12h") == 129600
    assert parse_duration("90m") == 5400 and parse_duration("45") == 45
    for bad in ("", "h", "3x", "1h-2m"):
        with pytest.raises(ValueError, match="invalid duration"):
            parse_duration(bad)
