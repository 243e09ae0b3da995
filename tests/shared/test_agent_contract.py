"""The wire contract of agent updates: the desired agent version, the events and the
device's report of how its last agent update ended -- all absent from payloads that
don't use them, so those stay byte for byte what they were before the fields."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest

from shared.errors import MessageError
from shared.messages import (
    AGENT_WHEEL_MEDIA_TYPE,
    AgentDeployment,
    AgentUpdateResult,
    DesiredState,
    DeviceState,
    Event,
    EventKind,
    UpdateOutcome,
)
from tests.shared.conftest import NOW, make_desired

WHEEL = {"sha256": "cd" * 32, "length": 181_000, "media_type": AGENT_WHEEL_MEDIA_TYPE}


def test_without_an_agent_version_the_desired_state_has_no_agent_field() -> None:
    raw = make_desired().to_bytes()
    assert b'"agent"' not in raw
    assert DesiredState.from_bytes(raw).agent is None


def test_a_desired_agent_version_round_trips() -> None:
    desired = make_desired().model_copy(
        update={"agent": AgentDeployment(version="0.2.0", artifact=WHEEL, health_timeout_s=60)}
    )
    again = DesiredState.from_bytes(desired.to_bytes())
    assert again.agent is not None
    assert again.agent.version == "0.2.0"
    assert again.agent.artifact.media_type == AGENT_WHEEL_MEDIA_TYPE
    assert again.agent.health_timeout_s == 60
    raw = json.loads(desired.to_bytes())["agent"]
    assert raw["kind"] == "agent" and "install_window" not in raw


@pytest.mark.parametrize("version", ["0.2.0", "1.0.0rc1", "0.2.0+fix.1", "2!1.0"])
def test_agent_versions_as_wheels_name_them(version: str) -> None:
    assert AgentDeployment(version=version, artifact=WHEEL).version == version


@pytest.mark.parametrize("version", ["", "v1.0", "../../etc", "1.0/x", "1 .0", "9" * 65])
def test_a_version_that_could_not_name_a_folder_safely_is_refused(version: str) -> None:
    desired = make_desired().to_dict()
    desired["agent"] = {"version": version, "artifact": WHEEL}
    with pytest.raises(MessageError, match="agent"):
        DesiredState.from_dict(desired)


@pytest.mark.parametrize("timeout", [0, 9, 86_401])
def test_the_health_timeout_is_bounded(timeout: int) -> None:
    desired = make_desired().to_dict()
    desired["agent"] = {"version": "0.2.0", "artifact": WHEEL, "health_timeout_s": timeout}
    with pytest.raises(MessageError, match="health_timeout_s"):
        DesiredState.from_dict(desired)


def _event(**fields: object) -> Event:
    return Event(
        device_id="cam-1", event_id=uuid.uuid4().hex, kind=EventKind.ROLLED_BACK, at=NOW, **fields
    )


def test_events_name_the_agent_version_only_when_they_are_about_one() -> None:
    assert b"agent_version" not in _event().to_bytes()
    event = _event(agent_version="0.2.0", reason="agent_crashed")
    assert Event.from_bytes(event.to_bytes()).agent_version == "0.2.0"


def _state(**fields: object) -> DeviceState:
    return DeviceState(
        device_id="cam-1",
        agent_version="0.1.0",
        profile="edge-x86_64-litert",
        arch="x86_64",
        runtime={"name": "litert", "version": "2.3.0"},
        reported_at=NOW,
        **fields,
    )


def test_the_state_reports_the_last_agent_update_only_after_one() -> None:
    assert b"agent_update" not in _state().to_bytes()
    result = AgentUpdateResult(
        manifest_version=7,
        rollout_id="agent-0.2.0-abc",
        version="0.2.0",
        previous_version="0.1.0",
        outcome=UpdateOutcome.ROLLED_BACK,
        reason="agent_unhealthy",
        detail="no healthy report within 60 s",
        at=NOW + timedelta(minutes=2),
    )
    again = DeviceState.from_bytes(_state(agent_update=result).to_bytes())
    assert again.agent_update == result
