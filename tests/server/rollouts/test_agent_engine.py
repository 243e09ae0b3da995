"""Agent rollouts with the whole server around them, on a real broker: devices that follow
their signed desired state and answer agent updates with the real contract messages
(events with ``agent_version``, state with ``agent_version`` and ``agent_update``), and a
clock the test moves instead of waiting.

The devices are :class:`~tests.server.rollouts.agent_harness.AgentUpdateDevice`: they do
not install anything -- the real agent's self-update is tested on the device side -- but
every message they send is what an agent sends.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session

from server.rollouts.service import ManifestAuthority
from tests.conftest import BrokerEndpoint, TestClient
from tests.server.rollouts.agent_harness import (
    AgentUpdateDevice,
    publish_agent_release,
    start_agent_rollout,
)
from tests.server.rollouts.conftest import window
from tests.server.rollouts.harness import (
    ACTIVATION_ONLY,
    MODEL,
    PROFILE,
    Clock,
    RolloutServer,
    desired_of,
    register_version,
    wait_for,
)

pytestmark = [pytest.mark.broker, pytest.mark.database]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(
    db_url: str, tmp_path: Path, mqtt_broker: BrokerEndpoint, clock: Clock
) -> Iterator[RolloutServer]:
    with RolloutServer(
        db_url=db_url, data_dir=tmp_path / "data", broker=mqtt_broker, clock=clock
    ) as server:
        yield server


@pytest.fixture
def fleet(
    server: RolloutServer, mqtt_client: Callable[..., TestClient], clock: Clock
) -> Iterator[Callable[..., dict[str, AgentUpdateDevice]]]:
    """``make(ids, fail_agent=...)``: enrolled devices on agent 0.1.0, in group ``line``."""
    started: list[AgentUpdateDevice] = []

    def make(ids: list[str], **options: Any) -> dict[str, AgentUpdateDevice]:
        devices = {}
        for device_id in ids:
            server.enroll(device_id)
            device = AgentUpdateDevice(
                device_id, mqtt_client(device_id), clock=clock, profile=PROFILE, **options
            )
            devices[device_id] = device.start()
            started.append(device)
        wait_for(
            lambda: all(
                server.call("GET", f"/devices/{d}")["agent_version"] == "0.1.0" for d in ids
            ),
            15,
            "device states in the inventory",
        )
        server.group("line", members=ids)
        return devices

    yield make
    for device in started:
        device.stop()


def device_ids(n: int) -> list[str]:
    """Ids of this test's own: the session's broker keeps other tests' retained messages."""
    run = uuid.uuid4().hex[:6]
    return [f"gw-{run}-{i}" for i in range(n)]


def settled(rollout: dict[str, Any]) -> bool:
    return rollout["status"] in ("completed", "paused", "aborted")


def test_a_model_rollout_and_an_agent_rollout_to_one_group_both_complete(
    server: RolloutServer, fleet: Callable[..., dict[str, AgentUpdateDevice]]
) -> None:
    devices = fleet(device_ids(4))
    publish_agent_release(server.call, "0.1.0")
    wheel = publish_agent_release(server.call, "0.2.0")
    with Session(server.app.state.engine) as session:
        register_version(session)
        session.commit()

    model = server.create_rollout(
        version=1, group="line", phases="50,100", wait_between_phases=0, gates=ACTIVATION_ONLY
    )
    agent = start_agent_rollout(
        server.call,
        "0.2.0",
        "line",
        phases="1dev,100",
        wait_between_phases=0,
        gates=ACTIVATION_ONLY,
        health_timeout_s=60,
    )
    for created in (model, agent):
        done = server.wait_rollout(created["id"], settled, 60, f"{created['id']} settles")
        assert done["status"] == "completed", done
        assert done["counts"]["activated"] == 4

    authority = ManifestAuthority(server.app.state.engine)
    for device_id, device in devices.items():
        latest = server.issued(device_id)[-1]
        desired = desired_of(latest)
        assert {d.model_name: d.model_version for d in desired.deployments} == {MODEL: 1}
        assert desired.agent is not None
        assert (desired.agent.version, desired.agent.health_timeout_s) == ("0.2.0", 60)
        assert desired.agent.artifact.sha256 == wheel["sha256"]
        assert desired.agent.artifact.length == wheel["length"]
        assert json.loads(latest.agent_json or "{}")["version"] == "0.2.0"
        assert authority.allowed(device_id, wheel["sha256"])
        assert device.agent_version == "0.2.0"
        shown = server.call("GET", f"/devices/{device_id}")
        assert shown["agent_version"] == "0.2.0"
        assert shown["agent_update"]["outcome"] == "activated"
        assert shown["agent_update"]["previous_version"] == "0.1.0"


def test_agents_that_roll_back_by_themselves_trip_the_budget_and_go_back_on_abort(
    server: RolloutServer, fleet: Callable[..., dict[str, AgentUpdateDevice]]
) -> None:
    ids = device_ids(4)
    devices = fleet(ids, fail_agent=frozenset({"0.2.0"}))
    old = publish_agent_release(server.call, "0.1.0")
    new = publish_agent_release(server.call, "0.2.0")
    created = start_agent_rollout(
        server.call,
        "0.2.0",
        "line",
        phases="2dev,100",
        wait_between_phases=0,
        gates=ACTIVATION_ONLY,
        retry={"max_attempts": 1},
    )
    paused = server.wait_rollout(created["id"], settled, 60, "the budget trips")
    assert paused["status"] == "paused", paused
    assert "activation" in paused["status_reason"]
    failed = [d for d in paused["devices"] if d["state"] == "failed"]
    # The first failure can trip the budget before the second canary reports.
    assert 1 <= len(failed) <= 2 and len(paused["devices"]) == 2  # phase 2 never started
    assert {d["reason"] for d in failed} == {"health_timeout"}
    assert {d["previous_agent_version"] for d in failed} == {"0.1.0"}
    for d in failed:
        # A failed device is sent its previous agent back, and it still runs it.
        def sent_back(device_id: str = d["device_id"]) -> Any:
            issued = server.issued(device_id)
            agent = desired_of(issued[-1]).agent if issued else None
            return agent if agent is not None and agent.version == "0.1.0" else None

        agent = wait_for(sent_back, 15, f"{d['device_id']} sent 0.1.0 back")
        assert agent.artifact.sha256 == old["sha256"] != new["sha256"]
        assert devices[d["device_id"]].agent_version == "0.1.0"

        # ... and the inventory learns it from the device's state, which may come later.
        def inventoried(device_id: str = d["device_id"]) -> Any:
            update = server.call("GET", f"/devices/{device_id}")["agent_update"]
            return update if update is not None else None

        update = wait_for(inventoried, 15, f"{d['device_id']}'s agent update in the inventory")
        assert update["outcome"] == "rolled_back"
    # The devices of phase 2 were never targeted: nothing was ever sent to them. (A
    # second canary that had not reported when the budget tripped was targeted.)
    untouched = set(ids) - {d["device_id"] for d in paused["devices"]}
    assert len(untouched) == 2
    for device_id in untouched:
        assert server.issued(device_id) == []  # no rollout ever named it: nothing sent

    aborted = server.call("POST", f"/rollouts/{created['id']}/abort", json={"reason": "bad build"})
    final = server.wait_rollout(
        aborted["id"], lambda r: r["status"] == "aborted", 30, "the abort settles"
    )
    assert final["counts"]["failed"] + final["counts"]["rolled_back"] == 2


def test_an_agent_whose_devices_start_failing_inferences_breaches_the_error_gate(
    server: RolloutServer,
    fleet: Callable[..., dict[str, AgentUpdateDevice]],
    clock: Clock,
) -> None:
    """The new agent activates fine but its model inferences fail: the telemetry the
    canary sends after the switch judges it, the rollout pauses before phase 2."""
    devices = fleet(device_ids(4))
    publish_agent_release(server.call, "0.1.0")
    publish_agent_release(server.call, "0.2.0")
    gates = {**ACTIVATION_ONLY, "max_error_rate": 0.05, "min_inferences": 150}
    created = start_agent_rollout(
        server.call, "0.2.0", "line", phases="2dev,100", wait_between_phases=0, gates=gates
    )
    short = server.wait_rollout(
        created["id"], lambda r: r["status"] == "waiting_approval", 30, "canary activated"
    )
    assert short["counts"]["activated"] == 2
    assert "gates short of data" in short["status_reason"]

    clock.advance(minutes=5)  # windows that start now began after the switch
    start = clock()
    clock.advance(minutes=1)
    for device in devices.values():
        failing = device.agent_version == "0.2.0"
        sample = window(1, inferences=100, errors=30 if failing else 0)
        device.send_telemetry([sample], start=start, end=clock())
    paused = server.wait_rollout(created["id"], lambda r: r["status"] == "paused", 30, "breach")
    assert "inference_errors breached" in paused["status_reason"]
    errors = next(g for g in paused["gates"] if g["gate"] == "inference_errors")
    assert errors["value"] == pytest.approx(0.3)  # only the canary's windows, 60 of 200
    assert len(paused["devices"]) == 2
