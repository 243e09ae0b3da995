"""The agent killed with SIGKILL at each step of an update, then started again.

A real ``edgefleet-agent run`` process, enrolled with the real server (its whole lifespan:
rollout engine, desired-state publisher, block server, inventory) on a real Mosquitto,
takes one rollout per step. Each time it runs under a breakpoint (:mod:`tests.faults.stop_at`)
that stops it at the step -- in the middle of the block download, before the downloaded
bundle is verified, before the pointer moves to the staged bundle, on probation, and in
the middle of a rollback its health check decided -- and the test kills it there. After
each kill the disk holds a complete, verified model (old or new, never a mix, never
none); the restarted agent finishes the update (or the rollback), and the server's
rollout and inventory learn the final outcome from the device itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.runtime import available_runtimes
from tests.agent.test_kill import Device
from tests.conftest import BrokerEndpoint, free_port
from tests.faults.agents import AgentProcess, write_agent_config
from tests.faults.servers import authorize
from tests.server.rollouts.harness import (
    ACTIVATION_ONLY,
    MODEL,
    Clock,
    RolloutServer,
    publish_versions,
    trained_digits,
    wait_for,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

AGENT = "kill-steps"
GROUP = "line"
# (step, breakpoint, what the pointer names when the process is killed there)
STEPS = [
    ("download", "agent.download:_PartialFile.checkpoint@3", "old"),
    ("verify", "agent.agent:Agent._read_verified", "old"),
    ("swap", "agent.store:ModelStore.activate", "old"),
    ("health check", "agent.agent:Probation.verdict", "new"),
]
ROLLBACK = ("rollback", "agent.store:ModelStore.rollback", "new")


@pytest.fixture
def server(
    tmp_path: Path, fault_db_url: str, mqtt_broker: BrokerEndpoint
) -> Iterator[RolloutServer]:
    trained_digits()  # built before the server's clocks start
    with RolloutServer(
        db_url=fault_db_url, data_dir=tmp_path / "server", broker=mqtt_broker, clock=Clock()
    ) as running:
        yield authorize(running)


def roll_out(server: RolloutServer, version: int) -> str:
    created = server.create_rollout(
        version=version,
        group=GROUP,
        phases="100",
        wait_between_phases=0,
        device_timeout=600,
        gates=ACTIVATION_ONLY,
        retry={"max_attempts": 1},  # a rollback is final: the outcome the server must learn
    )
    return str(created["id"])


def outcome(server: RolloutServer, rollout_id: str, state: str) -> dict[str, Any]:
    def device_state(rollout: dict[str, Any]) -> bool:
        return [d["state"] for d in rollout["devices"]] == [state]

    return server.wait_rollout(rollout_id, device_state, 60, f"{AGENT} {state} in {rollout_id}")


def inventory(server: RolloutServer) -> dict[str, Any]:
    shown: dict[str, Any] = server.call("GET", f"/devices/{AGENT}")
    return shown


def reported(server: RolloutServer, version: int, rollout_id: str, outcome: str) -> dict[str, Any]:
    """The inventory once it shows the device on ``version`` after ``rollout_id``, with
    ``outcome`` as its last update (a restarted device may first report the model it went
    back to before it reports the rollback itself)."""

    def check() -> dict[str, Any] | None:
        shown = inventory(server)
        last = shown["last_update"]
        models = shown["models"]
        if models and models[0]["model_version"] == version and last is not None:
            done = last["rollout_id"] == rollout_id and last["outcome"] == outcome
            return shown if done else None
        return None

    found: dict[str, Any] = wait_for(
        check, 30, f"the inventory showing v{version} and its update {outcome}"
    )
    return found


def test_killed_at_each_step_of_an_update_it_ends_complete_and_the_server_knows(
    tmp_path: Path, server: RolloutServer, mqtt_broker: BrokerEndpoint
) -> None:
    versions = publish_versions(server.app, len(STEPS) + 2)
    server.enroll(AGENT, runtime=("litert", available_runtimes()["litert"]))
    server.group(GROUP, members=[AGENT])
    folder = tmp_path / "agent"
    port = free_port()

    def configure(**changes: Any) -> Path:
        return write_agent_config(
            folder,
            device_id=AGENT,
            broker_url=mqtt_broker.url,
            root_public_b64=server.app.state.keys.root_public.to_base64(),
            api_port=port,
            **changes,
        )

    config = configure()
    agent = AgentProcess(config, port, tmp_path / "agent.log")
    device = Device(folder / "device", server.app.state.keys.online[0])
    try:
        agent.start()
        first = outcome(server, roll_out(server, versions[0]), "activated")
        assert first["status"] == "completed", first
        wait_for(lambda: agent.status()["probation"] is None, 30, "v1 judged healthy")
        old = versions[0]
        landed = []
        for (step, breakpoint, at_kill), new in zip([*STEPS, ROLLBACK], versions[1:], strict=True):
            if step == "rollback":  # an SLA no model meets: the health check fails
                agent.stop()
                configure(latency_sla_ms_p95=1e-6)
                agent = AgentProcess(config, port, tmp_path / "agent.log")
            else:
                agent.kill()
            agent.start(stop_at=breakpoint)
            rollout_id = roll_out(server, new)
            agent.wait_stopped(60, f"the agent stopped at {step}")
            before_kill = device.store.current(MODEL)
            agent.kill()
            assert device.store.current(MODEL) == before_kill  # nothing ran past the stop

            # On disk: a complete, verified model; the one the step leaves in place.
            _, running = device.verified_current()
            expected = old if at_kill == "old" else new
            assert running == expected, f"killed at {step}: v{running} on disk, not v{expected}"
            marker = device.store.probation(MODEL)
            pending = device.tmp()
            if step == "download":
                assert pending and all(n.endswith((".part", ".part.json")) for n in pending), (
                    pending
                )
                assert marker is None
            elif step == "verify":
                (whole,) = pending  # downloaded, hash checked while streaming, not yet read
                assert not whole.endswith((".part", ".json")) and marker is None, pending
            elif step == "swap":
                assert marker is not None and marker.failed is None, marker
                assert marker.ref.model_version == new
                assert device.store.has_bundle(marker.ref.sha256, marker.ref.length)
            elif step == "health check":
                assert marker is not None and marker.failed is None, marker
                assert marker.ref.model_version == new
            else:  # given up, reported, the pointer not yet moved back
                assert marker is not None and marker.failed is not None, marker
                assert marker.ref.model_version == new and "latency" in marker.failed, marker
            left = sorted(name.partition(".")[2] or "bundle" for name in pending)
            landed.append(f"{step}: v{running} on disk, marker {marker is not None}, tmp/ {left}")

            agent.start()
            if step == "rollback":  # the device's own rollback is a failed install there
                done = outcome(server, rollout_id, "failed")
                assert done["devices"][0]["reason"] == "health_check_failed", done["devices"]
                final = old
            else:
                done = outcome(server, rollout_id, "activated")
                assert done["status"] == "completed", done
                final = new
            wait_for(lambda a=agent: a.status()["probation"] is None, 30, f"{step}: judged")
            assert agent.status()["models"][MODEL]["version"] == final
            assert device.verified_current()[1] == final
            assert device.tmp() == []
            # The server learns it from the device: its retained state and last update.
            expected_outcome = "rolled_back" if step == "rollback" else "activated"
            shown = reported(server, final, rollout_id, expected_outcome)
            assert shown["last_update"]["outcome"] == expected_outcome, shown["last_update"]
            (device_row,) = done["devices"]
            assert device_row["outcome_at"] is not None
            old = final
        print("\n" + "\n".join(landed))
        agent.stop()
        assert device.verified_current()[1] == versions[-2]  # the last one was rolled back
        assert device.store.probations() == [] or all(
            m.failed is not None for m in device.store.probations()
        )
    finally:
        agent.stop()
