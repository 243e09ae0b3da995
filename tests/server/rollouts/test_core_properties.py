"""Invariants of the rollout core over random fleets, behaviours, timings and commands."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from hypothesis import event, given, settings
from hypothesis import strategies as st

from server.rollouts.core import (
    RATE_WINDOW,
    DeviceOutcome,
    Exclusion,
    OnBreach,
    Phase,
    RetryDevice,
    RollBackDevice,
    RolloutMember,
    RolloutSpec,
    RolloutState,
    RolloutStatus,
    TargetDevice,
    abort,
    approve,
    cumulative_targets,
    pause,
    resume,
    step,
)
from server.rollouts.errors import RolloutStateError
from server.rollouts.gates import GateName
from tests.server.rollouts.conftest import ACTIVATION_ONLY, MODEL, NOW, PROFILE
from tests.server.rollouts.simulation import Behaviour, SimulatedFleet

Command = Literal["abort", "pause", "resume", "approve"]


@dataclass(frozen=True)
class Scenario:
    spec: RolloutSpec
    members: list[RolloutMember]
    late: list[tuple[int, RolloutMember]]
    behaviours: dict[str, Behaviour]
    ticks: list[timedelta]
    commands: dict[int, Command]


answers = st.sampled_from(["activate", "fail", "silent"])
behaviours = st.builds(
    Behaviour,
    answers=st.lists(answers, min_size=1, max_size=3).map(tuple),
    delay=st.integers(0, 600).map(lambda s: timedelta(seconds=s)),
)


@st.composite
def phase_lists(draw: st.DrawFn) -> tuple[Phase, ...]:
    percents = sorted(draw(st.sets(st.integers(1, 100), min_size=1, max_size=4)))
    if draw(st.booleans()):
        percents[-1] = 100
    phases = [
        Phase(percent=p, approval_required=draw(st.booleans()) and draw(st.booleans()))
        for p in percents
    ]
    if draw(st.booleans()):
        phases.insert(0, Phase(count=draw(st.integers(1, 3))))
    return tuple(phases)


@st.composite
def scenarios(draw: st.DrawFn, *, commands: bool = True, behave: bool = False) -> Scenario:
    n = draw(st.integers(1, 25))
    n_late = draw(st.integers(0, 8))
    ids = [f"d{i:02d}" for i in range(n + n_late)]
    excluded = draw(st.sets(st.sampled_from(ids), max_size=max(1, len(ids) // 4)))

    def member(device_id: str) -> RolloutMember:
        exclusion = Exclusion("unsupported_ops", "cannot") if device_id in excluded else None
        return RolloutMember(device_id, PROFILE, exclusion=exclusion)

    ticks = draw(st.lists(st.integers(1, 400), min_size=20, max_size=80))
    late = [(draw(st.integers(0, len(ticks) - 1)), member(d)) for d in ids[n:]]
    limit = draw(st.one_of(st.none(), st.floats(0, 1)))
    spec = RolloutSpec.build(
        rollout_id="r-prop",
        model_name=MODEL,
        model_version=2,
        group="g",
        phases=draw(phase_lists()),
        wait_between_phases=timedelta(seconds=draw(st.integers(0, 900))),
        max_devices_per_minute=draw(st.integers(1, 8)),
        device_timeout=timedelta(seconds=draw(st.integers(30, 1800))),
        retry={
            "max_attempts": draw(st.integers(1, 4)),
            "backoff_initial": timedelta(seconds=draw(st.integers(1, 300))),
            "backoff_max": timedelta(seconds=600),
        },
        on_breach=draw(st.sampled_from(list(OnBreach))),
        gates=ACTIVATION_ONLY.model_copy(
            update={"max_activation_failure_rate": limit, "require_evidence": False}
        ),
    )
    chosen = (
        {d: Behaviour() for d in ids}
        if behave
        else draw(st.dictionaries(st.sampled_from(ids), behaviours))
    )
    command_map: dict[int, Command] = (
        draw(
            st.dictionaries(
                st.integers(0, len(ticks) - 1),
                st.sampled_from(["abort", "pause", "resume", "approve", "approve"]),
                max_size=4,
            )
        )
        if commands and draw(st.booleans())
        else {}
    )
    return Scenario(
        spec=spec,
        members=[member(d) for d in ids[:n]],
        late=late,
        behaviours=chosen,
        ticks=[timedelta(seconds=t) for t in ticks],
        commands=command_map,
    )


def run_command(fleet: SimulatedFleet, command: Command) -> None:
    spec, state, now = fleet.spec, fleet.state, fleet.now
    try:
        if command == "abort":
            moved = {d for d, a in state.devices.items() if a.moved(spec.model_version)}
            result = abort(spec, state, now=now)
            rolled = [a.device_id for a in result.actions if isinstance(a, RollBackDevice)]
            assert sorted(rolled) == sorted(moved), "abort must roll back exactly the moved"
            assert all(result.state.devices[d].outcome is DeviceOutcome.ROLLED_BACK for d in moved)
        elif command == "pause":
            result = pause(spec, state, now=now)
        elif command == "resume":
            result = resume(spec, state, now=now)
        else:
            result = approve(spec, state, now=now)
    except RolloutStateError:
        return
    fleet.apply(result)


def check_state(fleet: SimulatedFleet, before: RolloutState) -> None:
    spec, state = fleet.spec, fleet.state
    eligible = [m for m in fleet.members if m.exclusion is None]
    target = cumulative_targets(spec, len(eligible))[state.phase]
    targeted = [m for m in eligible if m.device_id in state.devices]
    assert len(targeted) <= target, "more devices than the phase's cumulative target"
    for device_id, a in state.devices.items():
        old = before.devices.get(device_id)
        if old is not None and old.outcome in (
            DeviceOutcome.FAILED,
            DeviceOutcome.TIMED_OUT,
            DeviceOutcome.ROLLED_BACK,
        ):
            assert a.outcome == old.outcome, f"{device_id}: a final outcome changed"
        if a.outcome is DeviceOutcome.TIMED_OUT:
            assert a.outcome_at is not None and a.last_heard_at is not None
            assert a.outcome_at - a.last_heard_at >= spec.device_timeout
        if a.outcome is DeviceOutcome.EXCLUDED:
            assert not a.targeted
    report = state.gate_report
    if report is not None and state.status not in (RolloutStatus.ABORTING, RolloutStatus.ABORTED):
        activation = [r for r in report.results if r.gate is GateName.ACTIVATION_FAILURES]
        if activation:
            outcomes = Counter(a.outcome for a in state.devices.values())
            evidence = activation[0].evidence
            assert evidence["timed_out"] == outcomes[DeviceOutcome.TIMED_OUT]
            assert evidence["failed"] == outcomes[DeviceOutcome.FAILED]
            if activation[0].value is not None:
                finished = sum(
                    outcomes[o]
                    for o in (
                        DeviceOutcome.ACTIVATED,
                        DeviceOutcome.FAILED,
                        DeviceOutcome.TIMED_OUT,
                    )
                )
                failures = outcomes[DeviceOutcome.FAILED] + outcomes[DeviceOutcome.TIMED_OUT]
                assert activation[0].value == failures / finished  # timed out counts as failed


def drive(scenario: Scenario) -> SimulatedFleet:
    fleet = SimulatedFleet(
        scenario.spec, scenario.members, start=NOW, behaviours=scenario.behaviours
    )
    for index, tick in enumerate(scenario.ticks):
        for at, member in scenario.late:
            if at == index:
                fleet.join(member)
        before = fleet.state
        fleet.step()
        check_state(fleet, before)
        # The same inputs at the same time: nothing more happens.
        again = step(fleet.spec, fleet.state, fleet.members, fleet.signals(), now=fleet.now)
        assert again.state == fleet.state and again.actions == ()
        if index in scenario.commands:
            run_command(fleet, scenario.commands[index])
        fleet.now += tick
    return fleet


@settings(max_examples=150)
@given(scenarios())
def test_rollout_invariants_hold_on_random_fleets(scenario: Scenario) -> None:
    fleet = drive(scenario)

    targets = [a.device_id for _, a in fleet.actions(TargetDevice)]
    assert len(targets) == len(set(targets)), "a device was targeted twice"
    excluded = {m.device_id for m in fleet.members if m.exclusion is not None}
    assert not excluded & set(targets), "an excluded device was targeted"

    times = sorted(t for t, a in fleet.log if isinstance(a, TargetDevice | RetryDevice))
    for i, t in enumerate(times):
        in_window = [u for u in times[: i + 1] if u > t - RATE_WINDOW]
        assert len(in_window) <= scenario.spec.max_devices_per_minute, "rate limit exceeded"

    assert RolloutState.model_validate_json(fleet.state.model_dump_json()) == fleet.state
    event(f"final status {fleet.state.status.value}")
    for outcome, count in fleet.state.counts().items():
        if count:
            event(f"some {outcome}")
    if fleet.actions(RetryDevice):
        event("retried")


@settings(max_examples=60)
@given(scenarios(commands=False, behave=True))
def test_a_rollout_of_healthy_devices_always_completes(scenario: Scenario) -> None:
    spec = scenario.spec.model_copy(
        update={
            "phases": tuple(
                p.model_copy(update={"approval_required": False}) for p in scenario.spec.phases
            )
        }
    )
    if spec.phases[-1].percent != 100:
        spec = spec.model_copy(update={"phases": (*spec.phases, Phase(percent=100))})
    fleet = SimulatedFleet(spec, scenario.members, start=NOW, behaviours=scenario.behaviours)
    for _, member in scenario.late:
        fleet.join(member)
    fleet.run(every=timedelta(minutes=1), steps=24 * 60)
    eligible = {m.device_id for m in fleet.members if m.exclusion is None}
    if not eligible:
        # Nobody to update: the activation gate has no evidence, so the operator decides.
        assert fleet.state.status in (RolloutStatus.COMPLETED, RolloutStatus.RUNNING)
        return
    assert fleet.state.status is RolloutStatus.COMPLETED
    activated = {d for d, a in fleet.state.devices.items() if a.outcome is DeviceOutcome.ACTIVATED}
    assert activated == eligible
