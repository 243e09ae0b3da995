"""A canary rollout to a device group with real agents, driven through the operator CLI.

The server runs with its whole lifespan (engine, publisher, block server, ingestion,
inventory) behind uvicorn on a real Mosquitto; the model versions come from the real
pipeline; each device is an :class:`agent.agent.Agent` enrolled with
``edgefleet-agent enroll`` -- it verifies the signed desired state, fetches the bundle by
blocks, self-tests, activates and reports, exactly as on a device. One agent takes the
ONNX artifact, one fetches over HTTP with its enrolled credentials instead of by blocks.
A box enrolled with an onnxruntime older than anything the server can vouch for is left
out of the rollout, which says why.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from agent.agent import Agent
from agent.cli import app as agent_cli
from agent.config import DownloadConfig, HttpConfig, Limits, load_config
from server.app import create_app
from server.cli import app as edgefleet
from server.settings import Settings
from tests.conftest import BrokerEndpoint, admin_token
from tests.server.fleet.conftest import serve
from tests.server.rollouts.harness import (
    MODEL,
    ONNX,
    PROFILE,
    Clock,
    publish_versions,
    trained_digits,
    wait_for,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]
runner = CliRunner()
DEVICES = {"cam-1": PROFILE, "cam-2": PROFILE, "cam-3": PROFILE, "box-1": ONNX}
HTTP_DEVICE = "cam-3"
OLD_BOX = "old-box"


def cli(url: str, *args: str, code: int = 0) -> str:
    result = runner.invoke(edgefleet, [*args, "--server", url])
    assert result.exit_code == code, f"edgefleet {' '.join(args)}: {result.output}"
    return result.stdout


def cli_json(url: str, *args: str) -> Any:
    return json.loads(cli(url, *args, "--json"))


@pytest.fixture
def fleet(
    tmp_path: Path, mqtt_broker: BrokerEndpoint, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, Any, dict[str, Agent]]]:
    trained_digits()  # built before the server starts its clocks
    settings = Settings(
        data_dir=tmp_path / "server",
        broker_url=mqtt_broker.url,
        run_jobs=False,
        rollout_tick_seconds=0.2,
        ingest_client_id=f"ingest-{tmp_path.name[-40:]}",
    )
    app = create_app(settings, clock=Clock())
    with ExitStack() as stack:
        url = stack.enter_context(serve(app))
        operator = {"Authorization": f"Bearer {admin_token(settings)}"}
        monkeypatch.setenv("EDGEFLEET_TOKEN", admin_token(settings))  # for the CLI
        cli(url, "groups", "create", "plant")
        agents: dict[str, Agent] = {}
        for device_id, profile in DEVICES.items():
            token = cli_json(
                url, "tokens", "create", "--auto-accept", "--profile", profile, "--group", "plant"
            )["token"]
            folder = tmp_path / device_id
            folder.mkdir()
            enrolled = runner.invoke(
                agent_cli,
                [
                    "enroll",
                    "--server",
                    url,
                    "--token",
                    token,
                    "--config",
                    str(folder / "agent.toml"),
                    "--device-id",
                    device_id,
                    "--profile",
                    profile,
                    "--data-dir",
                    str(folder / "data"),
                    "--root-key",
                    str(settings.keys_dir / "root.pub"),
                ],
            )
            assert enrolled.exit_code == 0, enrolled.output
            update: dict[str, Any] = {
                "window_seconds": 1.0,
                "http": HttpConfig(port=0),
                # No traffic here: the health check passes on its self-test replay.
                "limits": Limits(health_check_max_seconds=1),
            }
            if device_id == HTTP_DEVICE:  # fetches over HTTP, with its enrolled credentials
                update["download"] = DownloadConfig(method="http", http_base_url=url)
            config = load_config(folder / "agent.toml").model_copy(update=update)
            agent = Agent(config)
            agent.start()
            stack.callback(agent.stop)
            agents[device_id] = agent

        # An old box: enrolled with its facts, it never connects (no process behind it).
        token = cli_json(
            url, "tokens", "create", "--auto-accept", "--profile", ONNX, "--group", "plant"
        )["token"]
        body = {
            "token": token,
            "device_id": OLD_BOX,
            "profile": ONNX,
            "arch": "x86_64",
            "runtime": {"name": "onnxruntime", "version": "1.12.1"},
            "runtimes": {"onnxruntime": "1.12.1"},
            "agent_version": "0.1.0",
        }
        assert httpx.post(f"{url}/api/v1/enroll", json=body).status_code == 201

        def reported() -> bool:
            devices = httpx.get(
                f"{url}/api/v1/devices", params={"group": "plant"}, headers=operator
            ).json()
            live = [d for d in devices if d["id"] != OLD_BOX]
            return len(live) == 4 and all(d["state_reported_at"] for d in live)

        wait_for(reported, 20, "every agent's state in the inventory")
        yield url, app, agents


def running(agent: Agent) -> int | None:
    model = agent.active_model()
    return None if model is None else model.manifest.model_version


def wait_status(url: str, rollout_id: str, status: str, timeout: float = 40.0) -> Any:
    def check() -> Any:
        shown = cli_json(url, "rollouts", "show", rollout_id)
        return shown if shown["status"] == status else None

    return wait_for(check, timeout, f"rollout {rollout_id} {status}")


def test_three_phases_to_real_agents_then_an_abort_rolls_the_canary_back(
    fleet: tuple[str, Any, dict[str, Agent]],
) -> None:
    url, app, agents = fleet
    first, second = publish_versions(app, 2)

    created = cli_json(
        url, "rollouts", "create", "--model", MODEL, "--version", str(first), "--group",
        "plant", "--phases", "1dev,2dev,100", "--wait", "0s", "--timeout", "2m",
    )  # fmt: skip
    rollout_id = created["id"]
    # The agents serve no traffic, so the telemetry gates lack evidence: every phase waits
    # for the operator, who approves it once its devices have activated.
    for phase, activated in ((1, 1), (2, 2), (3, 4)):
        waiting = wait_status(url, rollout_id, "waiting_approval")
        assert waiting["phase"] == phase
        assert waiting["counts"]["activated"] == activated
        assert "gates short of data" in waiting["status_reason"]
        cli(url, "rollouts", "approve", rollout_id, "--phase", str(phase))
    done = wait_status(url, rollout_id, "completed")
    assert [p["targeted"] for p in done["phase_progress"]] == [1, 1, 2]
    assert {d["device_id"]: d["state"] for d in done["devices"]} == {
        "cam-1": "activated",
        "cam-2": "activated",
        "cam-3": "activated",
        "box-1": "activated",
    }
    (excluded,) = done["excluded"]
    assert excluded["device_id"] == OLD_BOX and excluded["state"] == "excluded"
    assert excluded["reason"] == "runtime_unknown", excluded
    assert "onnxruntime 1.12.1" in excluded["detail"], excluded
    assert {d: running(a) for d, a in agents.items()} == {
        "cam-1": first,
        "cam-2": first,
        "cam-3": first,
        "box-1": first,
    }
    assert agents["box-1"].active_model().runtime == "onnxruntime"  # type: ignore[union-attr]
    assert app.state.transfer_limiter.served >= 1  # cam-3 fetched over HTTP
    shown = cli(url, "rollouts", "show", rollout_id)
    assert "excluded devices" in shown and excluded["reason"] in shown and "completed" in shown
    assert cli(url, "rollouts", "watch", rollout_id).count("completed") >= 1

    # The next version: the canary takes it, then the operator aborts.
    created = cli_json(
        url, "rollouts", "create", "--model", MODEL, "--version", str(second), "--group",
        "plant", "--phases", "1dev,100", "--wait", "0s",
    )  # fmt: skip
    rollout_id = created["id"]
    waiting = wait_status(url, rollout_id, "waiting_approval")
    (canary,) = waiting["devices"]
    assert canary["state"] == "activated" and canary["previous_version"] == first
    assert running(agents[canary["device_id"]]) == second
    cli(url, "rollouts", "abort", rollout_id, "--reason", "operator saw enough")
    aborted = wait_status(url, rollout_id, "aborted")
    (rolled_back,) = aborted["devices"]
    assert rolled_back["state"] == "rolled_back" and rolled_back["confirmed_at"] is not None
    assert aborted["status_reason"] == "operator saw enough"
    assert {d: running(a) for d, a in agents.items()} == dict.fromkeys(DEVICES, first)
    # Only the canary ever heard of the aborted version.
    others = [d for d in DEVICES if d != canary["device_id"]]
    for device_id in others:
        assert agents[device_id].trust.manifest_version == 1
    cli(url, "rollouts", "watch", rollout_id, code=1)
    listed = cli_json(url, "rollouts", "list", "--model", MODEL)
    assert [(r["id"], r["status"]) for r in listed] == [
        (rollout_id, "aborted"),
        (done["id"], "completed"),
    ]
