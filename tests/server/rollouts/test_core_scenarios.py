"""Whole rollouts on a simulated fleet: each scenario the issue names, end to end."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import timedelta

import pytest

from server.rollouts.core import (
    DeviceOutcome,
    Exclusion,
    OnBreach,
    Phase,
    PhaseStarted,
    RetryDevice,
    RevertDevice,
    RollBackDevice,
    RolloutMember,
    RolloutSpec,
    RolloutState,
    RolloutStatus,
    StatusChanged,
    TargetDevice,
    abort,
    approve,
    cumulative_targets,
    parse_phases,
    pause,
    resume,
    step,
)
from server.rollouts.errors import InvalidRolloutError, RolloutStateError
from server.rollouts.gates import HealthThresholds
from tests.server.rollouts.conftest import ACTIVATION_ONLY, MODEL, NOW, PROFILE, SLA_MS, window
from tests.server.rollouts.simulation import Behaviour, SimulatedFleet

MINUTE = timedelta(minutes=1)


def members(n: int, prefix: str = "cam") -> list[RolloutMember]:
    return [RolloutMember(f"{prefix}-{i:03d}", PROFILE, latency_sla_ms=SLA_MS) for i in range(n)]


def spec(**overrides: object) -> RolloutSpec:
    fields: dict[str, object] = {
        "rollout_id": "r-1",
        "model_name": MODEL,
        "model_version": 2,
        "group": "line-2",
        "phases": parse_phases("5,25,100"),
        "wait_between_phases": timedelta(minutes=10),
        "max_devices_per_minute": 100,
        "device_timeout": timedelta(minutes=15),
        "gates": ACTIVATION_ONLY,
    }
    fields.update(overrides)
    return RolloutSpec.build(**fields)


def targeted(fleet: SimulatedFleet) -> list[str]:
    return [a.device_id for _, a in fleet.actions(TargetDevice)]


def statuses(fleet: SimulatedFleet) -> list[RolloutStatus]:
    return [a.status for _, a in fleet.actions(StatusChanged)]


# ----------------------------------------------------------------------------- completion


def test_a_three_phase_rollout_with_healthy_telemetry_completes() -> None:
    gates = HealthThresholds(min_inferences=100)  # every gate on
    fleet = SimulatedFleet(
        spec(gates=gates),
        members(40),
        start=NOW,
        telemetry=lambda device, version: window(version, inferences=60, latency_ms=8.0),
    )
    fleet.run(every=MINUTE, until=NOW + timedelta(hours=3))

    assert fleet.state.status is RolloutStatus.COMPLETED
    started = [a for _, a in fleet.actions(PhaseStarted)]
    assert [(p.phase, p.target) for p in started] == [(0, 2), (1, 10), (2, 40)]
    assert sorted(targeted(fleet)) == sorted(m.device_id for m in members(40))
    assert fleet.state.counts()["activated"] == 40
    phases = Counter(a.phase for a in fleet.state.devices.values())
    assert phases == {0: 2, 1: 8, 2: 30}
    report = fleet.state.gate_report
    assert report is not None and {r.status.value for r in report.results} == {"holds"}
    # Each phase waited its 10 minutes after its devices settled.
    times = [t for t, _ in fleet.actions(PhaseStarted)]
    assert all(b - a >= timedelta(minutes=10) for a, b in itertools.pairwise(times))


def test_targets_follow_a_hash_order_that_is_the_same_every_time() -> None:
    first = SimulatedFleet(spec(), members(40), start=NOW)
    first.run(every=MINUTE, steps=1)
    again = SimulatedFleet(spec(), list(reversed(members(40))), start=NOW)
    again.run(every=MINUTE, steps=1)
    assert targeted(first) == targeted(again) and len(targeted(first)) == 2
    other = SimulatedFleet(spec(rollout_id="r-2"), members(40), start=NOW)
    other.run(every=MINUTE, steps=1)
    assert targeted(other) != targeted(first)  # another rollout, another canary


# ----------------------------------------------------------------------------- gates


def test_a_breached_latency_gate_pauses_and_resume_needs_an_override() -> None:
    gates = HealthThresholds(
        max_error_rate=None,
        max_confidence_drop=None,
        max_prediction_psi=None,
        min_inferences=50,
    )
    fleet = SimulatedFleet(
        spec(gates=gates),
        members(40),
        start=NOW,
        telemetry=lambda device, version: window(version, latency_ms=80.0 if version == 2 else 8.0),
    )
    fleet.run(every=MINUTE, until=NOW + timedelta(hours=1))

    assert fleet.state.status is RolloutStatus.PAUSED
    assert fleet.state.status_reason is not None
    assert fleet.state.status_reason.startswith("latency_p95 breached")
    assert f"vs SLA {SLA_MS:g} ms" in fleet.state.status_reason
    assert len(targeted(fleet)) == 2  # the canary only: nothing more while paused
    assert not fleet.actions(RollBackDevice)

    fleet.apply(resume(fleet.spec, fleet.state, now=fleet.now))
    fleet.step()
    assert fleet.state.status is RolloutStatus.PAUSED  # the evidence has not changed

    fleet.apply(resume(fleet.spec, fleet.state, now=fleet.now, override_gates=True))
    fleet.run(every=MINUTE, until=fleet.now + timedelta(minutes=30))
    # The override let phase 1 end; phase 2 judges the same evidence afresh and stops
    # before it targets anyone.
    assert fleet.state.phase == 1 and fleet.state.status is RolloutStatus.PAUSED
    assert len(targeted(fleet)) == 2


def test_an_error_rate_breach_can_abort_and_roll_the_moved_devices_back() -> None:
    gates = HealthThresholds(
        max_latency_sla_ratio=None,
        max_confidence_drop=None,
        max_prediction_psi=None,
        min_inferences=50,
    )
    fleet = SimulatedFleet(
        spec(gates=gates, on_breach=OnBreach.ABORT, phases=parse_phases("10,100")),
        members(20),
        start=NOW,
        telemetry=lambda device, version: window(version, errors=30 if version == 2 else 0),
    )
    fleet.run(every=MINUTE, until=NOW + timedelta(hours=1))

    moved = targeted(fleet)
    assert len(moved) == 2
    rolled_back = [a for _, a in fleet.actions(RollBackDevice)]
    assert sorted(a.device_id for a in rolled_back) == sorted(moved)
    assert all(a.to_version == 1 for a in rolled_back)
    assert statuses(fleet)[-2:] == [RolloutStatus.ABORTING, RolloutStatus.ABORTED]
    assert "inference_errors breached" in (fleet.state.status_reason or "")
    for device_id in moved:
        assignment = fleet.state.devices[device_id]
        assert assignment.outcome is DeviceOutcome.ROLLED_BACK
        assert assignment.confirmed_at is not None


def test_gates_short_of_data_wait_for_approval_and_resume_when_data_comes() -> None:
    gates = HealthThresholds(
        max_latency_sla_ratio=None, max_prediction_psi=None, min_inferences=500
    )
    traffic = {"on": False}
    fleet = SimulatedFleet(
        spec(gates=gates, phases=parse_phases("50,100")),
        members(4),
        start=NOW,
        telemetry=lambda device, version: window(version) if traffic["on"] else None,
    )
    fleet.run(every=MINUTE, until=NOW + timedelta(minutes=20))
    assert fleet.state.status is RolloutStatus.WAITING_APPROVAL
    assert "gates short of data: inference_errors" in (fleet.state.status_reason or "")

    traffic["on"] = True
    fleet.run(every=MINUTE, until=fleet.now + timedelta(minutes=10))
    assert fleet.state.phase == 1 and fleet.state.status is RolloutStatus.RUNNING


def test_a_phase_that_requires_approval_waits_for_it() -> None:
    phases = (Phase(percent=50, approval_required=True), Phase(percent=100))
    fleet = SimulatedFleet(spec(phases=phases), members(4), start=NOW)
    fleet.run(every=MINUTE, until=NOW + timedelta(hours=2))
    assert fleet.state.status is RolloutStatus.WAITING_APPROVAL and fleet.state.phase == 0
    assert fleet.state.status_reason == "phase 1 requires approval"

    with pytest.raises(RolloutStateError, match="rollout is in phase 1"):
        approve(fleet.spec, fleet.state, now=fleet.now, phase=1)
    fleet.apply(approve(fleet.spec, fleet.state, now=fleet.now, phase=0))
    fleet.run(every=MINUTE, until=fleet.now + timedelta(hours=1))
    assert fleet.state.status is RolloutStatus.COMPLETED


# ----------------------------------------------------------------------------- devices


def test_a_silent_device_times_out_counts_as_failed_and_does_not_hold_the_rollout() -> None:
    group = members(10)
    first = SimulatedFleet(spec(phases=parse_phases("100")), group, start=NOW)
    first.run(every=MINUTE, steps=1)
    silent = targeted(first)[3]
    gates = ACTIVATION_ONLY.model_copy(update={"max_activation_failure_rate": 0.2})
    fleet = SimulatedFleet(
        spec(phases=parse_phases("100"), gates=gates),
        group,
        start=NOW,
        behaviours={silent: Behaviour(answers=("silent",))},
    )
    fleet.run(every=MINUTE, until=NOW + timedelta(minutes=14))
    assert fleet.state.devices[silent].outcome is None  # not yet

    fleet.run(every=MINUTE, until=NOW + timedelta(hours=1))
    assignment = fleet.state.devices[silent]
    assert assignment.outcome is DeviceOutcome.TIMED_OUT
    assert assignment.outcome_at == NOW + timedelta(minutes=15)
    assert [a for _, a in fleet.actions(RevertDevice)] == [RevertDevice(silent, 1, "timed_out")]
    report = fleet.state.gate_report
    assert report is not None
    activation = report.results[0]
    assert activation.evidence["timed_out"] == 1 and activation.value == 0.1
    assert fleet.state.status is RolloutStatus.COMPLETED


def test_progress_events_keep_a_slow_device_from_timing_out() -> None:
    fleet = SimulatedFleet(
        spec(phases=parse_phases("1dev")),
        members(1),
        start=NOW,
        behaviours={"cam-000": Behaviour(answers=("silent",))},
    )
    fleet.step()
    from shared.messages import EventKind

    for minute in (5, 10, 15, 20):
        fleet.now = NOW + timedelta(minutes=minute)
        fleet.report("cam-000", EventKind.DOWNLOADING)
        fleet.step()
    assert fleet.state.devices["cam-000"].outcome is None
    assert fleet.state.devices["cam-000"].last_heard_at == NOW + timedelta(minutes=20)
    fleet.step(NOW + timedelta(minutes=35))
    assert fleet.state.devices["cam-000"].outcome is DeviceOutcome.TIMED_OUT


def test_a_failing_device_is_retried_with_backoff_then_given_up() -> None:
    fleet = SimulatedFleet(
        spec(phases=parse_phases("1dev")),
        members(1),
        start=NOW,
        behaviours={"cam-000": Behaviour(answers=("fail",), delay=timedelta(seconds=10))},
    )
    fleet.run(every=timedelta(seconds=15), until=NOW + timedelta(minutes=10))
    retries = fleet.actions(RetryDevice)
    # Failure seen at 0:15; retry 1 min later (1:15); failure seen at 1:30; retry 2 min later.
    assert [t - NOW for t, _ in retries] == [timedelta(seconds=75), timedelta(seconds=210)]
    assert [a.attempt for _, a in retries] == [2, 3]
    assignment = fleet.state.devices["cam-000"]
    assert assignment.outcome is DeviceOutcome.FAILED and assignment.attempts == 3
    assert assignment.reason == "hash_mismatch"
    assert fleet.state.status is RolloutStatus.PAUSED  # 1 of 1 failed: the gate is breached


def test_a_device_that_recovers_on_a_retry_activates() -> None:
    fleet = SimulatedFleet(
        spec(phases=parse_phases("1dev")),
        members(1),
        start=NOW,
        behaviours={"cam-000": Behaviour(answers=("fail", "activate"))},
    )
    fleet.run(every=MINUTE, until=NOW + timedelta(minutes=30))
    assert fleet.state.devices["cam-000"].outcome is DeviceOutcome.ACTIVATED
    assert fleet.state.devices["cam-000"].attempts == 2
    assert fleet.state.status is RolloutStatus.COMPLETED


def test_an_excluded_device_is_shown_with_its_reason_and_never_targeted() -> None:
    group = members(5)
    group[2] = RolloutMember(
        group[2].device_id,
        "legacy-armv7-tflite",
        exclusion=Exclusion("unsupported_ops", "tflite-runtime 2.14.0 cannot run digits v2"),
    )
    fleet = SimulatedFleet(spec(phases=parse_phases("100")), group, start=NOW)
    fleet.run(every=MINUTE, until=NOW + timedelta(hours=1))
    assert fleet.state.status is RolloutStatus.COMPLETED
    excluded = fleet.state.devices[group[2].device_id]
    assert excluded.outcome is DeviceOutcome.EXCLUDED
    assert (excluded.reason, excluded.detail) == (
        "unsupported_ops",
        "tflite-runtime 2.14.0 cannot run digits v2",
    )
    assert group[2].device_id not in targeted(fleet) and len(targeted(fleet)) == 4


def test_an_exclusion_is_lifted_when_the_device_becomes_able() -> None:
    group = members(2)
    group[1] = RolloutMember(group[1].device_id, PROFILE, exclusion=Exclusion("pinned", "pinned"))
    fleet = SimulatedFleet(spec(phases=parse_phases("1dev,100")), group, start=NOW)
    fleet.step()
    assert fleet.state.devices[group[1].device_id].outcome is DeviceOutcome.EXCLUDED
    fleet.members[1] = RolloutMember(group[1].device_id, PROFILE)
    fleet.run(every=MINUTE, until=NOW + timedelta(hours=1))
    assert fleet.state.devices[group[1].device_id].outcome is DeviceOutcome.ACTIVATED


def test_late_joiners_grow_the_phase_target_and_are_picked_up() -> None:
    fleet = SimulatedFleet(spec(), members(20), start=NOW)
    fleet.step()
    assert len(targeted(fleet)) == 1  # 5 % of 20
    for member in members(20, prefix="late"):
        fleet.join(member)
    fleet.step(NOW + MINUTE)
    assert len(targeted(fleet)) == 2  # 5 % of 40, rounded up
    fleet.run(every=MINUTE, until=NOW + timedelta(hours=2))
    assert fleet.state.status is RolloutStatus.COMPLETED
    # Joined after completion: a completed rollout takes no more devices.
    fleet.join(RolloutMember("after-the-end", PROFILE))
    fleet.step()
    assert "after-the-end" not in fleet.state.devices


def test_a_device_already_running_the_version_counts_as_activated_at_once() -> None:
    fleet = SimulatedFleet(spec(phases=parse_phases("100")), members(2), start=NOW)
    fleet.devices["cam-001"].running_version = 2
    fleet.step()
    assignment = fleet.state.devices["cam-001"]
    assert assignment.outcome is DeviceOutcome.ACTIVATED and assignment.reason == "already_running"
    result = abort(fleet.spec, fleet.state, now=fleet.now)
    assert [a.device_id for a in result.actions if isinstance(a, RollBackDevice)] == ["cam-000"]


# ----------------------------------------------------------------------------- commands


def test_abort_rolls_back_exactly_the_moved_devices() -> None:
    behaviours = {"cam-001": Behaviour(answers=("silent",)), "cam-002": Behaviour(("fail",))}
    no_gates = HealthThresholds(
        max_activation_failure_rate=None,
        max_error_rate=None,
        max_latency_sla_ratio=None,
        max_confidence_drop=None,
        max_prediction_psi=None,
    )
    fleet = SimulatedFleet(
        spec(
            phases=parse_phases("100"),
            max_devices_per_minute=2,
            gates=no_gates,
            retry={"max_attempts": 1},
        ),
        members(6),
        start=NOW,
        behaviours=behaviours,
    )
    fleet.devices["cam-003"].running_version = 2
    fleet.run(every=MINUTE, until=NOW + timedelta(minutes=4))
    before = fleet.state
    assert len(before.devices) == 6
    moved = {d for d, a in before.devices.items() if a.moved(2)}
    # cam-002 failed (reverted already), cam-003 ran v2 before: neither moved.
    assert moved == {"cam-000", "cam-001", "cam-004", "cam-005"}

    result = abort(fleet.spec, before, now=fleet.now, reason="bad canary")
    fleet.apply(result)
    rolled = {a.device_id for a in result.actions if isinstance(a, RollBackDevice)}
    assert rolled == moved
    assert fleet.state.status is RolloutStatus.ABORTING
    assert fleet.state.status_reason == "bad canary"
    fleet.run(every=MINUTE, until=fleet.now + timedelta(hours=1))
    assert fleet.state.status is RolloutStatus.ABORTED
    assert not [
        a
        for t, a in fleet.log
        if t > result.state.status_changed_at and isinstance(a, TargetDevice | RetryDevice)
    ]
    with pytest.raises(RolloutStateError):
        abort(fleet.spec, fleet.state, now=fleet.now)


def test_pause_stops_targeting_and_resume_continues() -> None:
    fleet = SimulatedFleet(
        spec(phases=parse_phases("100"), max_devices_per_minute=2), members(10), start=NOW
    )
    fleet.step()
    fleet.apply(pause(fleet.spec, fleet.state, now=fleet.now))
    fleet.run(every=MINUTE, until=NOW + timedelta(minutes=10))
    assert fleet.state.status is RolloutStatus.PAUSED and len(targeted(fleet)) == 2
    with pytest.raises(RolloutStateError):
        pause(fleet.spec, fleet.state, now=fleet.now)
    fleet.apply(resume(fleet.spec, fleet.state, now=fleet.now))
    fleet.run(every=MINUTE, until=fleet.now + timedelta(hours=1))
    assert fleet.state.status is RolloutStatus.COMPLETED


def test_a_restart_from_the_persisted_state_resumes_where_it_was() -> None:
    fleet = SimulatedFleet(spec(), members(40), start=NOW)
    fleet.run(every=MINUTE, until=NOW + timedelta(minutes=15))
    stored = fleet.state.model_dump_json()
    restored = RolloutState.model_validate_json(stored)
    assert restored == fleet.state
    again = step(fleet.spec, restored, fleet.members, fleet.signals(), now=fleet.now)
    direct = step(fleet.spec, fleet.state, fleet.members, fleet.signals(), now=fleet.now)
    assert again == direct
    assert RolloutSpec.model_validate_json(fleet.spec.model_dump_json()) == fleet.spec


# ----------------------------------------------------------------------------- the spec


def test_parse_phases_and_cumulative_targets() -> None:
    phases = parse_phases("3dev, 7%,100")
    assert [p.describe() for p in phases] == ["3 devices", "7%", "100%"]
    ramp = spec(phases=phases)
    assert cumulative_targets(ramp, 100) == [3, 7, 100]
    assert cumulative_targets(ramp, 20) == [3, 3, 20]  # 7 % of 20 rounds up to 2 < 3
    assert cumulative_targets(ramp, 0) == [0, 0, 0]
    for bad in ("", "5,x", "0", "101", "2.5dev"):
        with pytest.raises(InvalidRolloutError):
            parse_phases(bad)
    with pytest.raises(InvalidRolloutError, match="must increase"):
        spec(phases=parse_phases("25,5"))
    with pytest.raises(InvalidRolloutError, match="rollout_id"):
        spec(rollout_id="no spaces allowed")


def test_a_step_names_the_devices_to_publish_and_those_that_need_a_new_version() -> None:
    fleet = SimulatedFleet(
        spec(phases=parse_phases("100")),
        members(2),
        start=NOW,
        behaviours={"cam-000": Behaviour(answers=("fail", "activate"))},
    )
    first = fleet.step()
    assert sorted(first.device_ids) == ["cam-000", "cam-001"] and first.retried == frozenset()
    assert fleet.step(NOW + MINUTE).device_ids == []  # the failure is seen; the retry waits
    retry = fleet.step(NOW + 2 * MINUTE)
    assert retry.device_ids == ["cam-000"] and retry.retried == {"cam-000"}


def test_a_rollout_with_a_start_time_waits_for_it() -> None:
    fleet = SimulatedFleet(spec(start_at=NOW + timedelta(hours=1)), members(5), start=NOW)
    assert fleet.step().actions == () and fleet.state.status is RolloutStatus.PENDING
    started = fleet.step(NOW + timedelta(hours=1))
    assert fleet.state.status is RolloutStatus.RUNNING and len(started.device_ids) == 1
