"""The broker killed with SIGKILL in the middle of a rollout and of a telemetry stream, then
started again on the same port with the same persistence file.

Everything else is real and keeps running through it: the server with its whole
lifespan (rollout engine, desired-state publisher, block server, ingestion with its
persistent session, inventory) on a file database, three real agents (in-process
:class:`agent.agent.Agent`: durable SQLite outbox, telemetry every second) and four
simulated devices (:mod:`server.simulator`, telemetry every 0.3 s). The rollout goes on
after the restart and completes; every telemetry report a device made is stored exactly
once by ``(device_id, seq)`` -- none lost, none twice.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from agent.agent import Agent
from agent.config import AgentConfig, Limits
from agent.outbox import Outbox
from agent.runtime import available_runtimes
from server.simulator.device import Behaviour
from tests.conftest import MosquittoProcess
from tests.faults.servers import authorize
from tests.server.rollouts.harness import (
    ACTIVATION_ONLY,
    MODEL,
    PROFILE,
    Clock,
    RolloutServer,
    SimFleet,
    publish_versions,
    trained_digits,
    wait_for,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

AGENTS = ["brk-agent-0", "brk-agent-1", "brk-agent-2"]
SIMULATED = ["brk-sim-0", "brk-sim-1", "brk-sim-2", "brk-sim-3"]
GROUP = "hall"


def agent_config(
    folder: Path, device_id: str, server: RolloutServer, broker_url: str, window: float
) -> AgentConfig:
    return AgentConfig.model_validate(
        {
            "device_id": device_id,
            "profile": PROFILE,
            "data_dir": str(folder / device_id),
            "window_seconds": window,
            "trust": {"root_keys": [server.app.state.keys.root_public.to_base64()]},
            "http": {"enabled": False},
            "broker": {"url": broker_url, "keepalive": 5},
            "limits": {
                "health_check_max_seconds": 0.5,
                "backoff_min_seconds": 0.05,
                "backoff_max_seconds": 0.5,
            },
        }
    )


def stored_seqs(server: RolloutServer) -> dict[str, list[int]]:
    with server.app.state.engine.connect() as connection:
        rows = connection.execute(text("SELECT device_id, seq FROM telemetry_reports")).all()
    found: dict[str, list[int]] = {}
    for device_id, seq in rows:
        found.setdefault(device_id, []).append(int(seq))
    return {device_id: sorted(seqs) for device_id, seqs in found.items()}


@pytest.fixture
def server(
    tmp_path: Path, fault_db_url: str, persistent_broker: MosquittoProcess
) -> Iterator[RolloutServer]:
    trained_digits()  # built before the server's clocks start
    with RolloutServer(
        db_url=fault_db_url,
        data_dir=tmp_path / "server",
        broker=persistent_broker.endpoint,
        clock=Clock(),
    ) as running:
        yield authorize(running)


def test_broker_killed_mid_rollout_and_mid_telemetry_nothing_is_lost_or_doubled(
    tmp_path: Path, server: RolloutServer, persistent_broker: MosquittoProcess
) -> None:
    broker = persistent_broker
    (version,) = publish_versions(server.app, 1)
    litert = ("litert", available_runtimes()["litert"])
    for device_id in AGENTS:
        server.enroll(device_id, runtime=litert)
    agents = {d: Agent(agent_config(tmp_path, d, server, broker.endpoint.url, 1.0)) for d in AGENTS}
    behaviours = dict.fromkeys(SIMULATED, Behaviour())
    with SimFleet(server, broker.endpoint, behaviours) as fleet:
        try:
            for agent in agents.values():
                agent.start()
            wait_for(
                lambda: all(
                    server.call("GET", f"/devices/{d}")["state_reported_at"] for d in AGENTS
                ),
                30,
                "the agents' states in the inventory",
            )
            server.group(GROUP, members=[*AGENTS, *SIMULATED])
            rollout_id = server.create_rollout(
                version=version,
                group=GROUP,
                phases="1dev,100",
                wait_between_phases=3,
                device_timeout=600,
                gates=ACTIVATION_ONLY,
            )["id"]
            canary = server.wait_rollout(
                rollout_id,
                lambda r: r["counts"]["activated"] == 1,
                60,
                "the canary activated",
            )
            broker.kill()  # between the phases: the rest of the rollout comes after
            assert canary["status"] == "running" and canary["phase"] == 1, canary
            time.sleep(1.5)  # devices keep making reports (windows close by the clock)
            broker.start()

            done = server.wait_rollout(
                rollout_id, lambda r: r["status"] == "completed", 120, "the rollout completed"
            )
            assert {d["device_id"]: d["state"] for d in done["devices"]} == dict.fromkeys(
                [*AGENTS, *SIMULATED], "activated"
            )
            for device_id, agent in agents.items():
                model = agent.active_model()
                assert model is not None and model.manifest.model_version == version, device_id
            for device_id in SIMULATED:
                assert fleet.running(device_id) == version, device_id
            # A few more windows after the restart, so reports span it.
            restarted = stored_seqs(server)
            after_restart = {d: max(restarted.get(d, [0])) + 2 for d in AGENTS}
            wait_for(
                lambda: all(
                    max(stored_seqs(server).get(d, [0])) >= after_restart[d] for d in AGENTS
                ),
                30,
                "reports made after the restart stored",
            )
        finally:
            for agent in agents.values():
                agent.stop()
        sim_sent = {d: fleet.devices[d].reports_made for d in SIMULATED}

    # The agents' outboxes: what they made (every seq below the next one) and what is still
    # in them. Started again without telemetry windows, they deliver what is left.
    made: dict[str, int] = {}
    for device_id in AGENTS:
        limits = Limits()
        path = tmp_path / device_id / "outbox.sqlite"
        with Outbox(
            path, max_rows=limits.outbox_max_rows, max_bytes=limits.outbox_max_bytes
        ) as outbox:
            made[device_id] = outbox.next_seq()
    drains = [
        Agent(agent_config(tmp_path, d, server, broker.endpoint.url, 86_400.0)) for d in AGENTS
    ]
    try:
        for agent in drains:
            agent.start()
        wait_for(lambda: all(a.outbox.depth() == 0 for a in drains), 30, "the outboxes drained")
    finally:
        for agent in drains:
            agent.stop()

    def all_stored() -> dict[str, list[int]] | None:
        stored = stored_seqs(server)
        complete = all(len(stored.get(d, [])) >= made[d] - 1 for d in AGENTS)
        return stored if complete else None

    with contextlib.suppress(AssertionError):  # what is missing is named below
        wait_for(all_stored, 30, "every agent report stored")
    stored = stored_seqs(server)
    lost: dict[str, Any] = {}
    for device_id in AGENTS:
        # seqs start at 1; next_seq() above reserved made[device_id], never a report
        expected = set(range(1, made[device_id]))
        got = stored.get(device_id, [])
        assert len(got) == len(set(got))  # exactly once: (device_id, seq) is the key
        if set(got) != expected:
            lost[device_id] = sorted(expected - set(got))
    for device_id in SIMULATED:
        got = stored.get(device_id, [])
        # Simulated devices keep unacknowledged reports in paho's memory only (no outbox):
        # the last ones before they stopped may not have arrived, none in the middle may go.
        if got != list(range(len(got))) or len(got) < sim_sent[device_id] - 5:
            lost[device_id] = f"stored {len(got)} of {sim_sent[device_id]}: {got}"
    stats = server.app.state.telemetry_ingestor.stats()
    print(
        f"\nbroker killed and restarted: agents made {made}, simulated devices sent {sim_sent}; "
        f"ingest stats {stats}"
    )
    assert not lost, f"reports lost: {lost}"
    assert MODEL  # the model every device runs
