"""Agent releases: the wheel check (every refusal names its problem), publishing through
the API and the CLI into the artifact store, and agent rollouts created over the API.

Wheels are built in memory from this checkout's packages
(:func:`tests.agent.selfupdate_wheels.build_wheel`, the wheels the device tests install);
one test checks the wheel ``pip wheel`` makes of this very checkout.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select
from typer.testing import CliRunner

from server.agent_releases.errors import AgentReleaseError, InvalidWheelError
from server.agent_releases.service import build_wheel as build_checkout_wheel
from server.agent_releases.wheel import inspect_wheel
from server.app import create_app
from server.auth.models import AuditEntry
from server.cli import app as edgefleet
from server.models import Artifact
from server.settings import Settings
from shared.messages import AGENT_WHEEL_MEDIA_TYPE
from shared.wheel import WheelError
from tests.agent.selfupdate_wheels import build_wheel, package_files
from tests.conftest import admin_token, operator_client
from tests.server.fleet.conftest import enroll_body, serve
from tests.server.rollouts.agent_harness import publish_agent_release, start_agent_rollout
from tests.server.rollouts.harness import Clock

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- the wheel check


def test_a_well_formed_agent_wheel_is_described() -> None:
    facts = inspect_wheel(build_wheel("0.2.0rc1"), filename="edgefleet-0.2.0rc1-py3-none-any.whl")
    assert facts.version == "0.2.0rc1"
    assert facts.tags == ("py3-none-any",)
    assert facts.requires_python == ">=3.11"
    assert facts.files == len(package_files()) + 3  # METADATA, WHEEL, RECORD


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"PK\x03\x04 not really a zip", "not a zip archive"),
        (build_wheel("0.2.0", purelib=False), "Root-Is-Purelib: true"),
        (
            build_wheel("0.2.0", tamper_after_record={"agent/cli.py": b"import os\n"}),
            "agent/cli.py does not match its hash",
        ),
    ],
    ids=["zip", "platlib", "hash"],
)
def test_a_wheel_the_devices_cannot_install_is_refused_naming_the_problem(
    data: bytes, problem: str
) -> None:
    # Every rule is tested once in tests/shared/test_wheel.py; here: a refusal is an
    # InvalidWheelError (HTTP 422) that keeps the rule's message.
    with pytest.raises(InvalidWheelError) as caught:
        inspect_wheel(data)
    assert problem in str(caught.value)
    assert isinstance(caught.value.__cause__, WheelError)


def test_a_file_name_that_names_another_version_is_refused() -> None:
    with pytest.raises(InvalidWheelError, match=r"holds edgefleet 0\.2\.0"):
        inspect_wheel(build_wheel("0.2.0"), filename="edgefleet-0.3.0-py3-none-any.whl")


def test_the_wheel_of_this_checkout_passes_the_check_under_the_version_asked(
    tmp_path: Path,
) -> None:
    before = (REPO / "pyproject.toml").read_text()
    runner = CliRunner()
    result = runner.invoke(
        edgefleet,
        ["agent-releases", "build", "--source", str(REPO), "--out", str(tmp_path), "--version",
         "0.1.1rc7"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (path,) = tmp_path.glob("*.whl")
    assert path.name == "edgefleet-0.1.1rc7-py3-none-any.whl"
    facts = inspect_wheel(path.read_bytes(), filename=path.name)
    assert facts.version == "0.1.1rc7" and facts.files > 50
    assert (REPO / "pyproject.toml").read_text() == before  # built on a copy
    with pytest.raises(AgentReleaseError, match="not a version"):
        build_checkout_wheel(REPO, tmp_path, version="latest!")


# ----------------------------------------------------------------------------- the API


class Api:
    def __init__(self, app: Any, client: TestClient) -> None:
        self.app = app
        self.client = client

    def call(self, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
        response = self.client.request(method, f"/api/v1{path}", **kwargs)
        assert response.status_code == expect, f"{method} {path}: {response.text}"
        return None if expect == 204 else response.json()


@pytest.fixture
def api(db_url: str, tmp_path: Path) -> Iterator[Api]:
    app = create_app(
        Settings(data_dir=tmp_path / "data", database_url=db_url, run_jobs=False), clock=Clock()
    )
    with operator_client(app) as client:
        yield Api(app, client)


@pytest.mark.database
def test_publish_stores_registers_and_audits_the_wheel_once(api: Api) -> None:
    wheel = build_wheel("0.2.0")
    published = publish_agent_release(api.call, "0.2.0", data=wheel)
    assert (published["version"], published["length"]) == ("0.2.0", len(wheel))
    assert published["media_type"] == AGENT_WHEEL_MEDIA_TYPE
    store = api.app.state.artifacts
    with store.open(published["sha256"]) as stored:
        assert stored.read() == wheel
    with Session(api.app.state.engine) as session:
        artifact = session.get(Artifact, published["sha256"])
        assert artifact is not None and artifact.media_type == AGENT_WHEEL_MEDIA_TYPE
        audit = session.exec(
            select(AuditEntry).where(AuditEntry.action == "agent_release.publish")
        ).all()
        assert [a.target for a in audit] == ["agent:0.2.0"]

    refused = publish_agent_release(api.call, "0.2.0", data=build_wheel("0.2.0"), expect=409)
    assert "published already" in refused["detail"]
    publish_agent_release(api.call, "0.3.0", data=build_wheel("0.3.0"))
    assert [r["version"] for r in api.call("GET", "/agent-releases")] == ["0.3.0", "0.2.0"]
    assert api.call("GET", "/agent-releases/0.2.0")["sha256"] == published["sha256"]
    assert "no agent release" in api.call("GET", "/agent-releases/9.9", 404)["detail"]


@pytest.mark.database
def test_a_bad_wheel_is_refused_with_its_problem_and_leaves_nothing_behind(api: Api) -> None:
    broken = build_wheel("0.2.0", purelib=False)
    refused = publish_agent_release(api.call, "0.2.0", data=broken, expect=422)
    assert "Root-Is-Purelib" in refused["detail"]
    assert "empty" in publish_agent_release(api.call, "0.2.0", data=b"", expect=422)["detail"]
    assert api.call("GET", "/agent-releases") == []
    with Session(api.app.state.engine) as session:
        media = session.exec(select(Artifact.media_type)).all()
        assert AGENT_WHEEL_MEDIA_TYPE not in media


@pytest.mark.database
def test_a_viewer_cannot_publish(api: Api) -> None:
    viewer = api.call("POST", "/operators", 201, json={"name": "watcher", "role": "viewer"})
    headers = {
        "Authorization": f"Bearer {viewer['token']}",
        "Content-Type": "application/octet-stream",
    }
    response = api.client.post(
        "/api/v1/agent-releases", content=build_wheel("0.2.0"), headers=headers
    )
    assert response.status_code == 403, response.text
    assert api.client.get("/api/v1/agent-releases", headers=headers).status_code == 200


@pytest.mark.database
def test_agent_rollouts_over_the_api_one_per_group_beside_model_rollouts(api: Api) -> None:
    for device_id in ("g1", "g2"):
        token = api.call("POST", "/provisioning-tokens", 201, json={"auto_accept": True})
        api.call("POST", "/enroll", 201, json=enroll_body(token["token"], device_id))
    api.call("POST", "/groups", 201, json={"name": "line"})
    api.call("POST", "/groups/line/members", json={"device_ids": ["g1", "g2"]})
    api.call("POST", "/groups", 201, json={"name": "g1-only"})
    api.call("POST", "/groups/g1-only/members", json={"device_ids": ["g1"]})

    missing = api.call("POST", "/rollouts", 404, json={"agent_version": "0.2.0", "group": "line"})
    assert "no agent release '0.2.0'" in missing["detail"]
    publish_agent_release(api.call, "0.2.0", data=build_wheel("0.2.0"))
    created = start_agent_rollout(api.call, "0.2.0", "line", phases="50,100", health_timeout_s=90)
    assert (created["kind"], created["agent_version"], created["model_name"]) == (
        "agent",
        "0.2.0",
        None,
    )
    assert created["spec"]["health_timeout_s"] == 90
    assert created["eligible"] == 2

    overlap = api.call(
        "POST", "/rollouts", 409, json={"agent_version": "0.2.0", "group": "g1-only"}
    )
    assert "of the agent" in overlap["detail"] and "g1" in overlap["detail"]
    both = api.call(
        "POST",
        "/rollouts",
        422,
        json={"agent_version": "0.2.0", "model": "x", "version": 1, "group": "line"},
    )
    assert "not both" in json.dumps(both)
    listed = api.call("GET", "/rollouts", params={"kind": "agent"})
    assert [r["id"] for r in listed] == [created["id"]]
    assert api.call("GET", "/rollouts", params={"kind": "model"}) == []
    aborted = api.call("POST", f"/rollouts/{created['id']}/abort", json={"reason": "test"})
    assert aborted["status"] == "aborted"  # nothing was moved yet


@pytest.mark.database
def test_the_cli_builds_nothing_but_publishes_lists_shows_and_starts_agent_rollouts(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    wheel = tmp_path / "edgefleet-0.2.0-py3-none-any.whl"
    wheel.write_bytes(build_wheel("0.2.0"))
    bad = tmp_path / "edgefleet-0.3.0-py3-none-any.whl"
    bad.write_bytes(build_wheel("0.3.0", tamper_after_record={"agent/cli.py": b"import os\n"}))
    token = api.call("POST", "/provisioning-tokens", 201, json={"auto_accept": True})
    api.call("POST", "/enroll", 201, json=enroll_body(token["token"], "g1"))
    api.call("POST", "/groups", 201, json={"name": "line"})
    api.call("POST", "/groups/line/members", json={"device_ids": ["g1"]})

    with serve(api.app) as url:
        monkeypatch.setenv("EDGEFLEET_TOKEN", admin_token(api.app.state.settings))

        def cli(*args: str, code: int = 0) -> str:
            result = runner.invoke(edgefleet, [*args, "--server", url])
            assert result.exit_code == code, result.output
            return result.output

        assert "agent 0.2.0" in cli("agent-releases", "publish", str(wheel))
        assert "does not match its hash" in cli("agent-releases", "publish", str(bad), code=1)
        listed = json.loads(cli("agent-releases", "list", "--json"))
        assert [r["version"] for r in listed] == ["0.2.0"]
        assert json.loads(cli("agent-releases", "show", "0.2.0", "--json"))["length"] > 0
        out = cli(
            "rollouts", "create", "--agent-version", "0.2.0", "--group", "line",
            "--health-timeout", "2m", "--json",
        )  # fmt: skip
        created = json.loads(out)
        assert created["spec"]["health_timeout_s"] == 120
        assert "agent 0.2.0" in cli("rollouts", "list")
        assert "agent 0.2.0" in cli("rollouts", "show", created["id"])
        cli(
            "rollouts",
            "create",
            "--agent-version",
            "0.2.0",
            "--model",
            "m",
            "--group",
            "line",
            code=2,
        )
