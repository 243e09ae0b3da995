"""The rollouts API and CLI: create, list, show, commands and pins, with the 4xx answers
that name the problem, and the HTTP artifact endpoint serving exactly what a device's
latest issued manifest names. No broker here: rollouts stay as the API leaves them
(tests/server/rollouts/test_engine.py drives them)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session
from typer.testing import CliRunner

from server.app import create_app
from server.cli import app as edgefleet
from server.commands.rollouts import parse_duration
from server.rollouts import service
from server.rollouts.desired import DesiredContent, issue_manifest
from server.settings import Settings
from shared.messages import ArtifactRef, Deployment
from tests.conftest import admin_token, operator_client
from tests.server.fleet.conftest import enroll_body, serve
from tests.server.rollouts.harness import PROFILE, Clock, register_version

pytestmark = pytest.mark.database
MODEL = "digits"


class Api:
    def __init__(self, app: Any, client: TestClient) -> None:
        self.app = app
        self.client = client

    def call(self, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
        response = self.client.request(method, f"/api/v1{path}", **kwargs)
        assert response.status_code == expect, f"{method} {path}: {response.text}"
        return None if expect == 204 else response.json()

    def enroll(self, device_id: str, **facts: Any) -> dict[str, Any]:
        token = self.call("POST", "/provisioning-tokens", 201, json={"auto_accept": True})
        body = enroll_body(token["token"], device_id, **facts)
        enrolled: dict[str, Any] = self.call("POST", "/enroll", 201, json=body)
        return enrolled

    def session(self) -> Session:
        return Session(self.app.state.engine)


@pytest.fixture
def api(db_url: str, tmp_path: Path) -> Iterator[Api]:
    app = create_app(
        Settings(data_dir=tmp_path / "data", database_url=db_url, run_jobs=False), clock=Clock()
    )
    with operator_client(app) as client:
        api = Api(app, client)
        for device_id in ("d1", "d2"):
            api.enroll(device_id)
        api.call("POST", "/groups", 201, json={"name": "line"})
        api.call("POST", "/groups/line/members", json={"device_ids": ["d1", "d2"]})
        with api.session() as session:
            register_version(session)
            register_version(session, artifacts={PROFILE: {"gate": False}})
            session.commit()
        yield api


def test_create_show_list_and_filter(api: Api) -> None:
    created = api.call(
        "POST",
        "/rollouts",
        201,
        json={
            "model": MODEL,
            "version": "1",
            "group": "line",
            "phases": "1dev,100",
            "approval": True,
            "wait_between_phases": 600,
            "device_timeout": "PT15M",
            "max_devices_per_minute": 30,
            "on_breach": "abort",
            "gates": {"max_error_rate": 0.05, "min_inferences": 50},
            "id": "canary-1",
        },
    )
    assert created["id"] == "canary-1" and created["status"] == "pending"
    assert (created["model_name"], created["model_version"], created["group"]) == (MODEL, 1, "line")
    assert (created["phase"], created["phases"]) == (1, 2)
    assert (created["group_members"], created["eligible"]) == (2, 2)
    assert [(p["size"], p["target"], p["state"]) for p in created["phase_progress"]] == [
        ("1 devices", 1, "current"),
        ("100%", 2, "upcoming"),
    ]
    assert [p["approval_required"] for p in created["phase_progress"]] == [True, False]
    spec = created["spec"]
    assert spec["on_breach"] == "abort" and spec["max_devices_per_minute"] == 30
    assert spec["device_timeout"] == "PT15M" and spec["wait_between_phases"] == "PT10M"
    assert spec["gates"]["max_error_rate"] == 0.05 and spec["gates"]["min_inferences"] == 50
    assert created["devices"] == [] and created["excluded"] == [] and created["gates"] == []
    assert api.call("GET", "/rollouts/canary-1") == created

    api.call("POST", "/groups", 201, json={"name": "empty"})
    other = api.call(
        "POST", "/rollouts", 201, json={"model": MODEL, "version": 1, "group": "empty"}
    )
    api.call("POST", f"/rollouts/{other['id']}/abort")
    assert [r["id"] for r in api.call("GET", "/rollouts")] == [other["id"], "canary-1"]
    assert [r["id"] for r in api.call("GET", "/rollouts", params={"status": "aborted"})] == [
        other["id"]
    ]
    assert [r["id"] for r in api.call("GET", "/rollouts", params={"active": True})] == ["canary-1"]
    assert [r["id"] for r in api.call("GET", "/rollouts", params={"group": "line"})] == ["canary-1"]
    assert api.call("GET", "/rollouts", params={"model": "nope"}) == []


@pytest.mark.parametrize(
    ("body", "code", "says"),
    [
        ({"model": "nope", "version": 1, "group": "line"}, 404, "no model named 'nope'"),
        ({"model": MODEL, "version": 9, "group": "line"}, 404, "has no version or alias '9'"),
        ({"model": MODEL, "version": 1, "group": "nope"}, 404, "no device group named 'nope'"),
        ({"model": MODEL, "version": 2, "group": "line"}, 409, "no rollout of an unevaluated"),
        ({"model": MODEL, "version": 1, "group": "line", "phases": "5,x"}, 422, "phase 'x'"),
        ({"model": MODEL, "version": 1, "group": "line", "phases": "50,5"}, 422, "must increase"),
        (
            {"model": MODEL, "version": 1, "group": "line", "max_devices_per_minute": 0},
            422,
            "max_devices_per_minute",
        ),
        ({"model": MODEL, "version": 1, "group": "line", "on_breach": "panic"}, 422, "on_breach"),
        ({"model": MODEL, "version": 1, "group": "line", "colour": "red"}, 422, "colour"),
        ({"model": MODEL, "group": "line"}, 422, "version"),
    ],
)
def test_bad_rollouts_get_a_4xx_naming_the_problem(
    api: Api, body: dict[str, Any], code: int, says: str
) -> None:
    response = api.client.post("/api/v1/rollouts", json=body)
    assert response.status_code == code
    assert says in json.dumps(response.json())


def test_commands_and_their_refusals(api: Api) -> None:
    rollout_id = api.call(
        "POST", "/rollouts", 201, json={"model": MODEL, "version": 1, "group": "line"}
    )["id"]
    conflict = api.client.post(
        "/api/v1/rollouts", json={"model": MODEL, "version": 1, "group": "line"}
    )
    assert conflict.status_code == 409 and f"rollout {rollout_id}" in conflict.json()["detail"]
    paused = api.call("POST", f"/rollouts/{rollout_id}/pause", json={"reason": "lunch"})
    assert (paused["status"], paused["status_reason"]) == ("paused", "lunch")
    refused = api.client.post(f"/api/v1/rollouts/{rollout_id}/approve")
    assert refused.status_code == 409
    assert refused.json()["detail"] == "cannot approve a rollout that is paused"
    bad_phase = api.client.post(f"/api/v1/rollouts/{rollout_id}/approve", json={"phase": 0})
    assert bad_phase.status_code == 422
    resumed = api.call("POST", f"/rollouts/{rollout_id}/resume", json={"override_gates": True})
    assert resumed["status"] == "pending" and "gates overridden" in resumed["status_reason"]
    aborted = api.call("POST", f"/rollouts/{rollout_id}/abort")
    assert (aborted["status"], aborted["status_reason"]) == ("aborted", "aborted by operator")
    assert aborted["revision"] == 3
    assert api.client.post(f"/api/v1/rollouts/{rollout_id}/pause").status_code == 409
    missing = api.client.post("/api/v1/rollouts/nope/abort")
    assert missing.status_code == 404 and missing.json()["detail"] == "no rollout with id 'nope'"
    assert api.client.get("/api/v1/rollouts", params={"status": "sleeping"}).status_code == 422


def test_pins_through_the_api(api: Api) -> None:
    api.enroll("arm-1", profile="edge-arm64-litert", arch="aarch64")
    pin = api.call("PUT", f"/devices/d1/pins/{MODEL}", json={"version": 1, "note": "audit"})
    assert (pin["device_id"], pin["model_name"], pin["model_version"]) == ("d1", MODEL, 1)
    assert [p["model_version"] for p in api.call("GET", "/devices/d1/pins")] == [1]
    refused = api.client.put(f"/api/v1/devices/arm-1/pins/{MODEL}", json={"version": 1})
    assert refused.status_code == 409
    assert refused.json()["detail"] == (
        "cannot pin arm-1 to digits v1: no_artifact "
        "(digits v1 has no artifact for profile edge-arm64-litert)"
    )
    ungated = api.client.put(f"/api/v1/devices/d1/pins/{MODEL}", json={"version": 2})
    assert ungated.status_code == 409 and "ungated" in ungated.json()["detail"]
    assert api.client.get("/api/v1/devices/ghost/pins").status_code == 404
    api.call("DELETE", f"/devices/d1/pins/{MODEL}", 204)
    assert api.call("GET", "/devices/d1/pins") == []
    assert api.client.delete(f"/api/v1/devices/d1/pins/{MODEL}").status_code == 404


def test_the_artifact_endpoint_serves_only_what_the_latest_manifest_names(api: Api) -> None:
    password = api.enroll("d3")["credentials"]["password"]
    store = api.app.state.artifacts
    old = store.put_bytes(b"old model " * 100)
    new = store.put_bytes(b"new model " * 100)
    keys = api.app.state.keys
    now = datetime.now(UTC)
    last = None
    for number, stored in ((1, old), (2, new)):
        content = DesiredContent(
            "d3",
            "r1",
            (
                Deployment(
                    model_name=MODEL,
                    model_version=number,
                    target=PROFILE,
                    artifact=ArtifactRef(sha256=stored.sha256, length=stored.length),
                ),
            ),
        )
        issue = issue_manifest(content, keys=keys, last=last, now=now + timedelta(minutes=number))
        with api.session() as session:
            service.record_manifest(
                session, manifest=issue.manifest, content=content, reason=issue.reason
            )
            session.commit()
        last = issue.manifest

    def fetch(sha256: str, auth: tuple[str, str] = ("d3", password)) -> Any:
        return api.client.get(f"/api/v1/devices/d3/artifacts/{sha256}", auth=auth)

    got = fetch(new.sha256)
    assert got.status_code == 200 and got.content == b"new model " * 100
    ranged = api.client.get(
        f"/api/v1/devices/d3/artifacts/{new.sha256}",
        auth=("d3", password),
        headers={"Range": "bytes=10-19"},
    )
    assert ranged.status_code == 206 and ranged.content == b"new model "
    assert fetch(old.sha256).status_code == 403  # named only by an older manifest
    assert fetch(new.sha256, auth=("d3", "wrong")).status_code == 401
    assert api.client.get(
        f"/api/v1/devices/d1/artifacts/{new.sha256}", auth=("d1", "x")
    ).status_code in (401, 403)
    api.call("POST", "/devices/d3/revoke")
    assert fetch(new.sha256).status_code == 401  # its credentials stopped working


def test_openapi_documents_the_rollout_endpoints(api: Api) -> None:
    paths = api.call("GET", "/openapi.json")["paths"]
    for path, methods in {
        "/api/v1/rollouts": {"get", "post"},
        "/api/v1/rollouts/{rollout_id}": {"get"},
        "/api/v1/rollouts/{rollout_id}/pause": {"post"},
        "/api/v1/rollouts/{rollout_id}/resume": {"post"},
        "/api/v1/rollouts/{rollout_id}/approve": {"post"},
        "/api/v1/rollouts/{rollout_id}/abort": {"post"},
        "/api/v1/devices/{device_id}/pins": {"get"},
        "/api/v1/devices/{device_id}/pins/{model_name}": {"put", "delete"},
    }.items():
        assert methods <= set(paths[path]), path
        for method in methods:
            assert paths[path][method]["summary"]


# ----------------------------------------------------------------------------- the CLI


def test_the_cli_creates_lists_shows_steers_and_pins(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()

    def cli(*args: str, code: int = 0) -> str:
        result = runner.invoke(edgefleet, [*args, "--server", url])
        assert result.exit_code == code, result.output
        return result.stdout

    with serve(api.app) as url:
        monkeypatch.setenv("EDGEFLEET_TOKEN", admin_token(api.app.state.settings))
        create = [
            "rollouts", "create", "--model", MODEL, "--version", "1", "--group", "line",
            "--phases", "1dev,100", "--wait", "1h30m", "--rate", "10", "--timeout", "15m",
            "--on-breach", "abort", "--approval", "--id", "cli-1", "--json",
            "--gates", '{"max_error_rate": 0.02, "min_outcomes": 2}', "--max-failure-rate", "0",
            "--max-attempts", "1",
        ]  # fmt: skip
        created = json.loads(cli(*create))
        spec = created["spec"]
        gates = spec["gates"]
        assert (gates["max_error_rate"], gates["min_outcomes"]) == (0.02, 2)
        assert gates["max_activation_failure_rate"] == 0
        assert spec["retry"]["max_attempts"] == 1
        assert (spec["wait_between_phases"], spec["device_timeout"]) == ("PT1H30M", "PT15M")
        assert spec["max_devices_per_minute"] == 10 and spec["on_breach"] == "abort"
        assert [p["approval_required"] for p in spec["phases"]] == [True, False]
        listed = cli("rollouts", "list")
        assert "cli-1" in listed and "pending" in listed
        assert [r["id"] for r in json.loads(cli("rollouts", "list", "--active", "--json"))] == [
            "cli-1"
        ]
        shown = cli("rollouts", "show", "cli-1")
        assert "cli-1" in shown and "1 devices" in shown and "100%" in shown
        assert "paused" in cli("rollouts", "pause", "cli-1", "--reason", "wait")
        assert "pending" in cli("rollouts", "resume", "cli-1")
        aborted = json.loads(cli("rollouts", "abort", "cli-1", "--json"))
        assert aborted["status"] == "aborted"
        cli("rollouts", "watch", "cli-1", code=1)  # already final: aborted
        # Errors name the problem and exit non-zero.
        assert (
            "409"
            in runner.invoke(edgefleet, ["rollouts", "pause", "cli-1", "--server", url]).output
        )
        bad_wait = [
            "rollouts", "create", "--model", MODEL, "--version", "1", "--group", "line",
            "--wait", "soon", "--server", url,
        ]  # fmt: skip
        bad = runner.invoke(edgefleet, bad_wait)
        assert bad.exit_code == 2 and "--wait 'soon'" in bad.output
        bad_gates = [*bad_wait[:-4], "--gates", "{max_error_rate: 1}", "--server", url]
        bad = runner.invoke(edgefleet, bad_gates)
        assert bad.exit_code == 2 and "--gates: not valid JSON" in bad.output
        unknown_gate = [*bad_wait[:-4], "--gates", '{"max_eror_rate": 1}', "--server", url]
        bad = runner.invoke(edgefleet, unknown_gate)
        assert bad.exit_code != 0 and "max_eror_rate" in bad.output
        # Pins live under `edgefleet devices`.
        assert "pinned to digits v1" in cli(
            "devices", "pin", "d1", "--model", MODEL, "--version", "1"
        )
        assert "no longer pinned" in cli("devices", "unpin", "d1", "--model", MODEL)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("45", 45.0), ("90s", 90.0), ("10m", 600.0), ("1h30m", 5400.0), ("2d", 172800.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_the_refresh_margin_must_be_shorter_than_the_manifest_lifetime(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="REFRESH_MARGIN_DAYS must be shorter"):
        Settings(data_dir=tmp_path, manifest_lifetime_days=2, manifest_refresh_margin_days=2)
