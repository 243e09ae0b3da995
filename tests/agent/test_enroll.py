"""``edgefleet-agent enroll`` against a live server (uvicorn in a thread, real database):
the facts it sends, the credentials it keeps, and what it refuses to do."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlmodel import Session
from typer.testing import CliRunner, Result

from agent.cli import app as agent_cli
from agent.config import load_config
from agent.enroll import EnrollError, enroll
from agent.runtime import available_runtimes
from server.app import create_app
from server.fleet.auth import authenticate_device
from server.fleet.models import Device
from tests.conftest import admin_token
from tests.server.conftest import db_url, external_schema  # noqa: F401 (fixtures)
from tests.server.fleet.conftest import PROFILE, fleet_settings, serve

pytestmark = pytest.mark.database

runner = CliRunner()
BROKER = "mqtts://broker.example:8883"


@dataclass
class Server:
    app: FastAPI
    url: str

    @property
    def operator(self) -> dict[str, str]:
        """Headers of an operator call (the dev-mode server's admin token)."""
        return {"Authorization": f"Bearer {admin_token(self.app.state.settings)}"}

    def token(self, **body: object) -> str:
        response = httpx.post(
            f"{self.url}/api/v1/provisioning-tokens", json=body, headers=self.operator
        )
        assert response.status_code == 201, response.text
        token: str = response.json()["token"]
        return token

    def device(self, device_id: str) -> Device | None:
        with Session(self.app.state.engine) as session:
            return session.get(Device, device_id)


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[Server]:  # noqa: F811
    app = create_app(
        fleet_settings(db_url, tmp_path / "server", run_jobs=False, device_broker_url=BROKER)
    )
    with serve(app) as url:
        yield Server(app, url)


def cli(*args: str) -> Result:
    return runner.invoke(agent_cli, ["enroll", *args])


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_fresh_device_enrolls_and_gets_a_config_it_can_run_with(
    server: Server, tmp_path: Path
) -> None:
    if "litert" not in available_runtimes():
        pytest.skip("needs the litert runtime that the profile runs")
    config = tmp_path / "device" / "agent.toml"
    token = server.token(profile=PROFILE)
    result = runner.invoke(
        agent_cli,
        [
            "enroll",
            "--server",
            server.url,
            "--token",
            token,
            "--config",
            str(config),
            "--profile",
            PROFILE,
            "--device-id",
            "press-cam-07",
            "--tag",
            "site=berlin",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "device press-cam-07: pending" in result.stdout
    assert "edgefleet devices accept press-cam-07" in result.stdout
    assert "trusting the root key the server sent" in result.output

    loaded = load_config(config)
    assert (loaded.device_id, loaded.profile) == ("press-cam-07", PROFILE)
    assert loaded.broker is not None and loaded.broker.url == BROKER
    assert loaded.broker.username == "press-cam-07"
    password_file = loaded.data_dir / "broker-password"
    assert loaded.broker.password_file == password_file
    assert mode(password_file) == 0o600 and mode(config) == 0o600
    assert mode(loaded.data_dir) == 0o700
    assert loaded.root_keys()[0].keyid == server.app.state.keys.root_public.keyid
    assert loaded.download.http_base_url == server.url

    # The server has the device's real facts, and the stored password is the one it issued.
    device = server.device("press-cam-07")
    assert device is not None and device.status == "pending"
    assert device.tags == {"site": "berlin"} and device.agent_version
    assert device.runtimes == available_runtimes()
    httpx.post(
        f"{server.url}/api/v1/devices/press-cam-07/accept", headers=server.operator
    ).raise_for_status()
    with Session(server.app.state.engine) as session:
        password = loaded.broker.resolved_password()
        assert password is not None
        assert authenticate_device(session, "press-cam-07", password).status == "accepted"

    # Enrolling again is refused locally, before the server is asked.
    before = config.read_text()
    again = cli("--server", server.url, "--token", server.token(), "--config", str(config))
    assert again.exit_code == 2
    assert "already has broker credentials" in again.output
    assert config.read_text() == before


EXISTING = """\
# The line-2 camera. Keep this comment.
device_id = "line2-cam"
profile = "{profile}"
data_dir = "data"

[broker]
url = "mqtt://old-broker:1883"  # replaced by enrollment
ca_file = "ca.pem"
keepalive = 45

# Keys from the image.
[trust]
root_keys = ["{root}"]   # baked into the image

[http]
port = 8799
"""


def test_an_existing_config_keeps_everything_but_its_broker_table(
    server: Server, tmp_path: Path
) -> None:
    config = tmp_path / "agent.toml"
    root = server.app.state.keys.root_public.to_base64()
    config.write_text(EXISTING.format(profile=PROFILE, root=root))
    config.chmod(0o640)
    token = server.token(auto_accept=True)
    result = enroll(server.url, token, config_path=config, broker_url="mqtt://new-broker:1883")
    assert (result.device_id, result.status) == ("line2-cam", "accepted")
    text = config.read_text()
    assert text.startswith("# The line-2 camera. Keep this comment.\n")
    assert 'root_keys = ["' in text and "# baked into the image" in text
    assert "# Keys from the image.\n[trust]" in text and "old-broker" not in text
    assert "[http]\nport = 8799" in text
    loaded = load_config(config)
    assert loaded.broker is not None
    assert (loaded.broker.url, loaded.broker.username) == ("mqtt://new-broker:1883", "line2-cam")
    assert loaded.broker.keepalive == 45 and loaded.broker.ca_file == tmp_path / "ca.pem"
    assert loaded.broker.password_file == tmp_path / "data" / "broker-password"
    assert loaded.http.port == 8799
    assert mode(config) == 0o640  # the operator's choice stays
    assert mode(tmp_path / "data" / "broker-password") == 0o600
    with Session(server.app.state.engine) as session:
        password = loaded.broker.resolved_password()
        assert password is not None
        assert authenticate_device(session, "line2-cam", password).id == "line2-cam"


def test_refusals_write_nothing(server: Server, tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    common = ["--server", server.url, "--config", str(config), "--profile", PROFILE]
    unknown = cli(*common, "--token", "efp.0123456789ab." + "A" * 43, "--device-id", "d1")
    assert unknown.exit_code == 1
    assert "(HTTP 401): unknown provisioning token" in unknown.output
    assert not config.exists() and not (tmp_path / "edgefleet-data" / "broker-password").exists()

    other_profile = server.token(profile="edge-arm64-litert")
    mismatch = cli(*common, "--token", other_profile, "--device-id", "d1")
    assert mismatch.exit_code == 1
    assert "HTTP 403" in mismatch.output and "is for profile" in mismatch.output
    assert not config.exists()

    first = enroll(
        server.url,
        server.token(),
        config_path=tmp_path / "other" / "agent.toml",
        profile=PROFILE,
        device_id="taken",
    )
    assert first.status == "pending"
    with pytest.raises(EnrollError, match="HTTP 409") as caught:
        enroll(server.url, server.token(), config_path=config, profile=PROFILE, device_id="taken")
    assert caught.value.status_code == 409
    assert not config.exists()

    no_profile = cli("--server", server.url, "--token", "x", "--config", str(config))
    assert no_profile.exit_code == 2 and "pass --profile" in no_profile.output
    bad_url = cli("--server", "ftp://x", "--token", "x", "--config", str(config))
    assert bad_url.exit_code == 2
    unreachable = cli(
        "--server",
        "http://127.0.0.1:9",
        "--token",
        "x",
        "--config",
        str(config),
        "--profile",
        PROFILE,
    )
    assert unreachable.exit_code == 1 and "cannot reach the server" in unreachable.output
    assert not config.exists()


def test_json_output_and_a_generated_device_id(server: Server, tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    result = runner.invoke(
        agent_cli,
        [
            "enroll",
            "--server",
            server.url,
            "--config",
            str(config),
            "--profile",
            PROFILE,
            "--json",
        ],
        env={"EDGEFLEET_ENROLL_TOKEN": server.token(auto_accept=True)},
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["status"] == "accepted" and info["broker_url"] == BROKER
    assert load_config(config).device_id == info["device_id"]
    assert server.device(info["device_id"]) is not None
