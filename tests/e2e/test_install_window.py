"""A rollout to a group whose maintenance window is closed: the devices download ahead and
wait, the per-device timeout does not count the wait, and when the clock enters the window
they activate and the rollout completes.

The whole server runs (engine, publisher, block server, ingestion, inventory) on a real
Mosquitto with a clock the test moves; the model version comes from the real pipeline.
One device is a real :class:`agent.agent.Agent` in-process -- it verifies the signed desired
state, fetches the bundle by blocks, self-tests, stages, and activates by its wall clock,
which is the same clock -- and one a :class:`~server.simulator.device.SimulatedDevice`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.agent import Agent
from agent.config import AgentConfig
from agent.runtime import available_runtimes
from server.simulator.device import Behaviour
from shared.messages import InstallWindow
from tests.conftest import BrokerEndpoint
from tests.server.rollouts.harness import (
    ACTIVATION_ONLY,
    MODEL,
    PROFILE,
    Clock,
    RolloutServer,
    SimFleet,
    desired_of,
    publish_versions,
    trained_digits,
    wait_for,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]
AGENT = "night-agent"
SIMULATED = "night-sim"
TIMEOUT = timedelta(minutes=10)


def agent_config(tmp_path: Path, server: RolloutServer, broker: BrokerEndpoint) -> AgentConfig:
    return AgentConfig.model_validate(
        {
            "device_id": AGENT,
            "profile": PROFILE,
            "data_dir": str(tmp_path / "agent"),
            "window_seconds": 1,
            "trust": {"root_keys": [server.app.state.keys.root_public.to_base64()]},
            "http": {"port": 0},
            "broker": {"url": broker.url},
            # No traffic: the health check passes on its self-test replay within a second.
            "limits": {"health_check_max_seconds": 1},
        }
    )


def last_outcome(server: RolloutServer, device_id: str) -> str | None:
    last = server.call("GET", f"/devices/{device_id}")["last_update"]
    return None if last is None else str(last["outcome"])


def states(rollout: dict[str, Any]) -> dict[str, str]:
    return {d["device_id"]: d["state"] for d in rollout["devices"]}


def test_devices_stage_outside_the_window_and_activate_when_it_opens(
    tmp_path: Path, mqtt_broker: BrokerEndpoint
) -> None:
    trained_digits()  # built before the server's clocks start
    clock = Clock()
    with RolloutServer(
        db_url=f"sqlite:///{tmp_path / 'server.sqlite'}",
        data_dir=tmp_path / "server",
        broker=mqtt_broker,
        clock=clock,
    ) as server:
        (version,) = publish_versions(server.app, 1)
        server.enroll(AGENT, runtime=("litert", available_runtimes()["litert"]))
        agent = Agent(agent_config(tmp_path, server, mqtt_broker), wall_clock=clock)
        agent.start()
        try:
            with SimFleet(server, mqtt_broker, {SIMULATED: Behaviour()}) as fleet:
                wait_for(
                    lambda: server.call("GET", f"/devices/{AGENT}")["state_reported_at"],
                    20,
                    "the agent's state in the inventory",
                )
                opens = (clock() + timedelta(hours=2)).replace(second=0, microsecond=0)
                window = InstallWindow(
                    start=f"{opens:%H:%M}", end=f"{opens + timedelta(hours=1):%H:%M}"
                )
                server.call(
                    "POST",
                    "/groups",
                    201,
                    json={"name": "night", "maintenance_window": f"{window.start}-{window.end}"},
                )
                server.call(
                    "POST", "/groups/night/members", json={"device_ids": [AGENT, SIMULATED]}
                )
                created = server.create_rollout(
                    version=version,
                    group="night",
                    phases="100",
                    wait_between_phases=0,
                    device_timeout=TIMEOUT.total_seconds(),
                    gates=ACTIVATION_ONLY,
                )
                rollout_id = created["id"]

                # Targeted at once, by day: both download ahead, stage, and wait.
                waiting = server.wait_rollout(
                    rollout_id,
                    lambda r: set(states(r).values()) == {"waiting_for_window"},
                    60,
                    "both devices waiting for their window",
                )
                assert waiting["status"] == "running"
                assert waiting["counts"]["waiting_for_window"] == 2
                for device in waiting["devices"]:
                    assert device["reason"] == "waiting_for_window"
                    assert f"{window.start}-{window.end} UTC" in device["detail"]
                (issued,) = server.issued(AGENT)
                (deployment,) = desired_of(issued).deployments
                assert deployment.install_window == window
                assert agent.active_model() is None
                assert fleet.running(SIMULATED) is None
                assert [w["model_version"] for w in agent.status()["waiting"]] == [version]
                wait_for(
                    lambda: last_outcome(server, AGENT) == "staged",
                    10,
                    "the inventory's last update: staged",
                )

                # Well past the device timeout, still before the window: nobody times out.
                clock.advance(minutes=30)
                engine = server.app.state.rollout_engine
                ticks = engine.stats()["ticks"]
                wait_for(
                    lambda: engine.stats()["ticks"] >= ticks + 3,
                    10,
                    "the engine stepping with the clock past the timeout",
                )
                still = server.rollout(rollout_id)
                assert set(states(still).values()) == {"waiting_for_window"}, still
                assert agent.active_model() is None

                # The clock enters the window: they activate and the rollout completes.
                clock.advance(seconds=(window.next_opening(clock()) - clock()).total_seconds())
                clock.advance(minutes=1)
                done = server.wait_rollout(
                    rollout_id, lambda r: r["status"] == "completed", 60, "completed"
                )
                assert states(done) == {AGENT: "activated", SIMULATED: "activated"}
                assert all(
                    d["outcome_at"] is not None and d["reason"] is None for d in done["devices"]
                )
                model = agent.active_model()
                assert model is not None and model.manifest.model_name == MODEL
                assert model.manifest.model_version == version
                assert fleet.running(SIMULATED) == version
                assert agent.status()["waiting"] == []
                # The devices moved by their own clocks: no new desired state was needed.
                assert len(server.issued(AGENT)) == len(server.issued(SIMULATED)) == 1
        finally:
            agent.stop()
