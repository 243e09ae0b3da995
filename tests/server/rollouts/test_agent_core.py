"""Agent rollouts in the pure core and the desired content: the same state machine as
models, with agent release ids for versions and agent events for outcomes, and an agent
deployment beside the model deployments in each device's desired state."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

import pytest

from server.rollouts.core import (
    AGENT_TARGET,
    DeviceOutcome,
    DeviceSignals,
    RolloutKind,
    RolloutMember,
    RolloutSpec,
    RolloutState,
    RolloutStatus,
    UpdateReport,
    abort,
    new_rollout,
    parse_phases,
    step,
)
from server.rollouts.desired import (
    AgentWheel,
    DesiredContent,
    ModelClaim,
    allowed_artifacts,
    build_desired_state,
    desired_content,
    rollout_claims,
)
from server.rollouts.errors import InvalidRolloutError
from shared.messages import AGENT_WHEEL_MEDIA_TYPE, EventKind, Keyring
from tests.server.rollouts.conftest import ACTIVATION_ONLY, MODEL, NOW
from tests.server.rollouts.test_desired import PROFILE, fleet_keys, variant

MINUTE = timedelta(minutes=1)
OLD, NEW = 1, 2  # agent release ids
WHEELS = {
    OLD: AgentWheel(version="0.1.0", sha256="a1" * 32, length=40_000),
    NEW: AgentWheel(version="0.2.0", sha256="b2" * 32, length=41_000),
}
VERSION_OF = {w.version: i for i, w in WHEELS.items()}


def agent_spec(**overrides: object) -> RolloutSpec:
    fields: dict[str, object] = {
        "rollout_id": "agent-0.2.0-r1",
        "kind": RolloutKind.AGENT,
        "model_name": AGENT_TARGET,
        "model_version": NEW,
        "agent_version": "0.2.0",
        "health_timeout_s": 120,
        "group": "line-2",
        "phases": parse_phases("25,100"),
        "wait_between_phases": timedelta(0),
        "max_devices_per_minute": 100,
        "device_timeout": timedelta(minutes=15),
        "gates": ACTIVATION_ONLY,
    }
    fields.update(overrides)
    return RolloutSpec.build(**fields)


def members(n: int) -> list[RolloutMember]:
    return [RolloutMember(f"gw-{i:02d}", PROFILE) for i in range(n)]


class AgentFleet:
    """Devices that answer agent updates, as recorded signals (server receive times)."""

    def __init__(self, n: int, *, failing: set[str] = frozenset(), running: int | None = OLD):
        self.members = members(n)
        self.running: dict[str, int | None] = {m.device_id: running for m in self.members}
        self.updates: dict[str, list[UpdateReport]] = {m.device_id: [] for m in self.members}
        self.failing = set(failing)

    def signals(self) -> dict[str, DeviceSignals]:
        return {
            d: DeviceSignals(d, running_version=v, state_received_at=NOW, updates=tuple(u))
            for d, v, u in ((d, self.running[d], self.updates[d]) for d in self.running)
        }

    def answer(self, state: RolloutState, now: object) -> None:
        """Every device with an attempt in progress reports how its agent update ended."""
        for device_id, a in state.devices.items():
            if not a.in_progress or self.updates[device_id]:
                continue
            if device_id in self.failing:
                self.updates[device_id].append(
                    UpdateReport(
                        EventKind.ROLLED_BACK,
                        received_at=now,  # type: ignore[arg-type]
                        reason="health_timeout",
                        detail="0.2.0 did not report healthy within 120 s",
                        agent_version="0.2.0",
                    )
                )
            else:
                self.running[device_id] = NEW

    def run(self, spec: RolloutSpec, *, minutes: int = 30) -> RolloutState:
        state = new_rollout(spec, now=NOW)
        for minute in range(minutes):
            now = NOW + minute * MINUTE
            state = step(spec, state, self.members, self.signals(), now=now).state
            if state.status is not RolloutStatus.RUNNING:
                return state
            self.answer(state, now)
        return state


def test_an_agent_spec_names_the_agent_and_a_model_spec_a_model() -> None:
    assert agent_spec().kind is RolloutKind.AGENT
    with pytest.raises(InvalidRolloutError, match="agent rollout"):
        agent_spec(agent_version=None)
    with pytest.raises(InvalidRolloutError, match="agent rollout"):
        agent_spec(model_name=MODEL)
    with pytest.raises(InvalidRolloutError, match="not a model name"):
        agent_spec(kind=RolloutKind.MODEL, agent_version=None, health_timeout_s=None)
    with pytest.raises(InvalidRolloutError, match="belong to agent rollouts"):
        agent_spec(kind=RolloutKind.MODEL, model_name=MODEL)


def test_an_agent_rollout_moves_through_its_phases_and_completes() -> None:
    fleet = AgentFleet(8)
    state = fleet.run(agent_spec())
    assert state.status is RolloutStatus.COMPLETED, state.status_reason
    assert state.phase == 1
    assert state.counts()["activated"] == 8
    phases = sorted(a.phase for a in state.devices.values())
    assert phases == [0, 0, 1, 1, 1, 1, 1, 1]  # 25 % of 8 first, then the rest
    assert all(a.previous_version == OLD for a in state.devices.values())


def test_a_rolled_back_agent_update_is_a_failure_that_trips_the_budget_and_pauses() -> None:
    fleet = AgentFleet(8)
    spec = agent_spec(retry={"max_attempts": 1}, phases=parse_phases("4dev,100"))
    first = step(spec, new_rollout(spec, now=NOW), fleet.members, fleet.signals(), now=NOW)
    canary = sorted(first.state.devices)
    fleet.failing = set(canary[:2])  # half the canary goes back by itself
    state = fleet.run(spec)
    assert state.status is RolloutStatus.PAUSED
    assert "activation" in (state.status_reason or "")
    failed = {d: a for d, a in state.devices.items() if a.outcome is DeviceOutcome.FAILED}
    assert set(failed) == set(canary[:2])
    assert {a.reason for a in failed.values()} == {"health_timeout"}
    assert len(state.devices) == 4  # phase 2 never started


def test_with_on_breach_abort_every_moved_device_goes_back_to_its_published_agent() -> None:
    fleet = AgentFleet(8)
    spec = agent_spec(retry={"max_attempts": 1}, phases=parse_phases("4dev,100"), on_breach="abort")
    first = step(spec, new_rollout(spec, now=NOW), fleet.members, fleet.signals(), now=NOW)
    fleet.failing = set(sorted(first.state.devices)[:2])
    state = fleet.run(spec)
    assert state.status in (RolloutStatus.ABORTING, RolloutStatus.ABORTED)
    claims = rollout_claims(spec, state, agent_wheels=WHEELS)
    for device_id in state.devices:
        content = desired_content(device_id, PROFILE, claims=claims.values(), variants=[])
        assert content.agent is not None and content.agent.version == "0.1.0", device_id
        assert content.agent.install_window is None  # a roll-back applies at once


def test_a_device_on_an_unpublished_agent_gets_no_agent_field_back_after_an_abort() -> None:
    fleet = AgentFleet(2, running=None)  # its agent version was never published here
    spec = agent_spec(phases=parse_phases("100"))
    state = step(spec, new_rollout(spec, now=NOW), fleet.members, fleet.signals(), now=NOW).state
    claims = rollout_claims(spec, state, agent_wheels=WHEELS)
    moving = desired_content("gw-00", PROFILE, claims=claims.values(), variants=[])
    assert moving.agent is not None and moving.agent.version == "0.2.0"
    aborted = abort(spec, state, now=NOW + MINUTE).state
    claims = rollout_claims(spec, aborted, agent_wheels=WHEELS)
    back = desired_content("gw-00", PROFILE, claims=claims.values(), variants=[])
    assert back.agent is None and back.rollout_id == spec.rollout_id


def test_agent_and_model_events_never_judge_each_others_rollout() -> None:
    """A rolled-back model update does not fail an agent rollout, nor the reverse."""
    agent = agent_spec(phases=parse_phases("100"), retry={"max_attempts": 1})
    model = RolloutSpec.build(
        rollout_id="digits-v3",
        model_name=MODEL,
        model_version=3,
        group="line-2",
        phases=parse_phases("100"),
        retry={"max_attempts": 1},
        gates=ACTIVATION_ONLY,
    )
    group = members(1)
    device = group[0].device_id
    later = NOW + MINUTE
    model_failure = UpdateReport(
        EventKind.ROLLED_BACK, later, model_name=MODEL, model_version=3, reason="crash"
    )
    agent_failure = UpdateReport(
        EventKind.ROLLED_BACK, later, reason="health_timeout", agent_version="0.2.0"
    )
    other_agent = UpdateReport(EventKind.ROLLED_BACK, later, reason="x", agent_version="0.3.0")
    for spec, foreign, own in (
        (agent, model_failure, agent_failure),
        (model, agent_failure, model_failure),
    ):
        start = step(spec, new_rollout(spec, now=NOW), group, {}, now=NOW).state
        noisy = {device: DeviceSignals(device, updates=(foreign, other_agent))}
        assert step(spec, start, group, noisy, now=later).state.devices[device].outcome is None
        failing = {device: DeviceSignals(device, updates=(foreign, own))}
        failed = step(spec, start, group, failing, now=later).state.devices[device]
        assert failed.outcome is DeviceOutcome.FAILED, spec.kind
        assert failed.reason == own.reason


def test_a_device_desired_state_carries_model_deployments_and_the_agent_side_by_side() -> None:
    agent = agent_spec(phases=parse_phases("100"))
    state = step(agent, new_rollout(agent, now=NOW), members(1), {}, now=NOW).state
    bundle = variant(3)
    assert bundle.bundle_sha256 is not None
    model_claim = ModelClaim("gw-00", MODEL, 3, "digits-v3", NOW + MINUTE)
    claims = [*rollout_claims(agent, state, agent_wheels=WHEELS).values(), model_claim]
    content = desired_content(
        "gw-00", PROFILE, claims=claims, variants=[bundle], artifact_url=lambda s: f"/a/{s}"
    )
    assert [(d.model_name, d.model_version) for d in content.deployments] == [(MODEL, 3)]
    assert content.agent is not None
    assert (content.agent.version, content.agent.health_timeout_s) == ("0.2.0", 120)
    assert content.agent.artifact.media_type == AGENT_WHEEL_MEDIA_TYPE
    assert content.agent.artifact.url == f"/a/{'b2' * 32}"
    assert content.rollout_id == "digits-v3"  # the later claim
    assert content.artifacts == {bundle.bundle_sha256, "b2" * 32}
    keyring = _keyring()
    desired = build_desired_state(content, manifest_version=4, keyring=keyring, now=NOW)
    assert allowed_artifacts(desired) == {bundle.bundle_sha256, "b2" * 32}


def test_content_without_an_agent_digests_and_serializes_as_before_agents_existed() -> None:
    bundle = variant(3)
    assert bundle.bundle_sha256 is not None
    claim = ModelClaim("gw-00", MODEL, 3, "digits-v3", NOW)
    content = desired_content("gw-00", PROFILE, claims=[claim], variants=[bundle])
    assert content.agent is None
    before = {  # the digest's document as it was before agent deployments
        "rollout_id": "digits-v3",
        "deployments": [d.model_dump(mode="json") for d in content.deployments],
    }
    canonical = json.dumps(before, sort_keys=True, separators=(",", ":")).encode()
    assert content.digest() == hashlib.sha256(canonical).hexdigest()
    desired = build_desired_state(content, manifest_version=1, keyring=_keyring(), now=NOW)
    assert b'"agent"' not in desired.to_bytes()
    with_agent = DesiredContent(
        device_id="gw-00",
        rollout_id="digits-v3",
        deployments=content.deployments,
        agent=desired_content(
            "gw-00",
            PROFILE,
            claims=rollout_claims(
                agent_spec(phases=parse_phases("100")),
                step(
                    agent_spec(phases=parse_phases("100")),
                    new_rollout(agent_spec(), now=NOW),
                    members(1),
                    {},
                    now=NOW,
                ).state,
                agent_wheels=WHEELS,
            ).values(),
            variants=[],
        ).agent,
    )
    assert with_agent.digest() != content.digest()


def _keyring() -> Keyring:
    return fleet_keys().keyring
