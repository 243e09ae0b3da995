"""Install windows in the pure rollout core and the desired content: a group with a
maintenance window is targeted at any time, its devices download ahead, and the wait for
the window never counts against the per-device timeout."""

from __future__ import annotations

from datetime import timedelta

from server.rollouts.core import (
    WAITING_FOR_WINDOW,
    DeviceOutcome,
    DeviceSignals,
    RetryDevice,
    RolloutMember,
    RolloutSpec,
    RolloutState,
    RolloutStatus,
    TargetDevice,
    UpdateReport,
    new_rollout,
    parse_phases,
    step,
)
from server.rollouts.desired import ModelClaim, desired_content, rollout_claims
from server.rollouts.eligibility import ArtifactVariant, Pin
from shared.messages import EventKind, InstallWindow
from tests.server.rollouts.conftest import ACTIVATION_ONLY, MODEL, NOW, PROFILE
from tests.server.rollouts.simulation import Behaviour, SimulatedFleet

MINUTE = timedelta(minutes=1)
NIGHT = InstallWindow(start="02:00", end="04:00")
TIMEOUT = timedelta(minutes=15)
# NOW is 12:00 UTC: the window next opens fourteen hours later.
OPENS = NOW.replace(hour=2) + timedelta(days=1)


def spec(**overrides: object) -> RolloutSpec:
    fields: dict[str, object] = {
        "rollout_id": "r-night",
        "model_name": MODEL,
        "model_version": 2,
        "group": "line-2",
        "phases": parse_phases("100"),
        "wait_between_phases": timedelta(0),
        "device_timeout": TIMEOUT,
        "gates": ACTIVATION_ONLY,
    }
    fields.update(overrides)
    return RolloutSpec.build(**fields)


def members(n: int) -> list[RolloutMember]:
    return [RolloutMember(f"cam-{i}", PROFILE) for i in range(n)]


def test_devices_are_targeted_by_day_stage_and_activate_in_the_window() -> None:
    fleet = SimulatedFleet(spec(), members(5), start=NOW, install_window=NIGHT)

    fleet.run(every=MINUTE, until=NOW + timedelta(hours=2))
    # All five were targeted at once, by day, each attempt with the window it was sent.
    assert [t for t, _ in fleet.actions(TargetDevice)] == [NOW] * 5
    devices = fleet.state.devices.values()
    assert all(a.install_window == NIGHT for a in devices)
    # Staged 30 s later, they wait -- hours past the 15-minute timeout, none timed out.
    assert all(a.outcome is None and a.waiting_for_window for a in devices)
    assert all(a.staged_at == NOW + timedelta(seconds=30) for a in devices)
    assert {a.reason for a in devices} == {WAITING_FOR_WINDOW}
    (detail,) = {a.detail for a in devices}
    assert detail is not None and "02:00-04:00 UTC" in detail and "opens" in detail
    counts = fleet.state.counts()
    assert counts["in_progress"] == counts[WAITING_FOR_WINDOW] == 5
    assert fleet.state.status is RolloutStatus.RUNNING
    assert RolloutState.model_validate_json(fleet.state.model_dump_json()) == fleet.state

    fleet.run(every=MINUTE, until=OPENS + timedelta(hours=1))
    assert fleet.state.status is RolloutStatus.COMPLETED
    devices = fleet.state.devices.values()
    assert {a.outcome for a in devices} == {DeviceOutcome.ACTIVATED}
    assert all(a.outcome_at is not None and a.outcome_at >= OPENS for a in devices)
    assert all(a.staged_at is None and a.reason is None for a in devices)
    assert fleet.state.counts()[WAITING_FOR_WINDOW] == 0


def test_the_timeout_of_a_silent_device_runs_from_the_windows_opening() -> None:
    behaviours = {"cam-0": Behaviour(answers=("silent",))}
    fleet = SimulatedFleet(
        spec(retry={"max_attempts": 1}),
        members(2),
        start=NOW,
        install_window=NIGHT,
        behaviours=behaviours,
    )
    fleet.run(every=MINUTE, until=OPENS + TIMEOUT - MINUTE)
    silent = fleet.state.devices["cam-0"]
    assert silent.outcome is None and not silent.waiting_for_window  # it never said staged

    fleet.run(every=MINUTE, until=OPENS + TIMEOUT + MINUTE)
    silent = fleet.state.devices["cam-0"]
    assert silent.outcome is DeviceOutcome.TIMED_OUT
    assert silent.outcome_at == OPENS + TIMEOUT
    assert silent.detail is not None and "install window's opening, 02:00 UTC" in silent.detail
    assert fleet.state.devices["cam-1"].outcome is DeviceOutcome.ACTIVATED


def test_a_device_that_staged_but_misses_its_window_times_out() -> None:
    behaviours = {"cam-0": Behaviour(answers=("stage",))}
    fleet = SimulatedFleet(
        spec(retry={"max_attempts": 1}),
        members(1),
        start=NOW,
        install_window=NIGHT,
        behaviours=behaviours,
    )
    fleet.run(every=MINUTE, until=OPENS - MINUTE)
    assert fleet.state.devices["cam-0"].waiting_for_window

    fleet.run(every=MINUTE, until=OPENS + TIMEOUT + MINUTE)
    device = fleet.state.devices["cam-0"]
    assert device.outcome is DeviceOutcome.TIMED_OUT and device.outcome_at == OPENS + TIMEOUT
    assert not device.waiting_for_window and device.staged_at is None


def test_without_a_window_the_same_silence_times_out_at_once() -> None:
    behaviours = {"cam-0": Behaviour(answers=("silent",))}
    fleet = SimulatedFleet(
        spec(retry={"max_attempts": 1}), members(1), start=NOW, behaviours=behaviours
    )
    fleet.run(every=MINUTE, until=NOW + TIMEOUT + MINUTE)
    device = fleet.state.devices["cam-0"]
    assert device.outcome is DeviceOutcome.TIMED_OUT and device.outcome_at == NOW + TIMEOUT
    assert device.install_window is None


def test_inside_the_window_the_timeout_runs_from_the_last_progress() -> None:
    night = NOW.replace(hour=2, minute=30)
    behaviours = {"cam-0": Behaviour(answers=("silent",))}
    fleet = SimulatedFleet(
        spec(retry={"max_attempts": 1}),
        members(1),
        start=night,
        install_window=NIGHT,
        behaviours=behaviours,
    )
    fleet.run(every=MINUTE, until=night + TIMEOUT + MINUTE)
    device = fleet.state.devices["cam-0"]
    assert device.outcome is DeviceOutcome.TIMED_OUT and device.outcome_at == night + TIMEOUT


def test_a_step_over_a_waiting_device_is_idempotent_and_a_later_report_ends_the_wait() -> None:
    rollout = spec()
    targeted = step(
        rollout, new_rollout(rollout, now=NOW), members(1), {}, now=NOW, install_window=NIGHT
    )
    staged_at = NOW + MINUTE
    staged = UpdateReport(EventKind.STAGED, staged_at, MODEL, 2)
    signals = {"cam-0": DeviceSignals("cam-0", running_version=1, updates=(staged,))}
    later = NOW + timedelta(hours=3)
    first = step(rollout, targeted.state, members(1), signals, now=later, install_window=NIGHT)
    assert first.state.devices["cam-0"].waiting_for_window
    again = step(rollout, first.state, members(1), signals, now=later, install_window=NIGHT)
    assert again.state == first.state and again.actions == ()

    # At the window the agent verifies again and activates: no longer "waiting".
    opened = UpdateReport(EventKind.ACTIVATED, OPENS, MODEL, 2)
    moving = {"cam-0": DeviceSignals("cam-0", running_version=1, updates=(staged, opened))}
    result = step(rollout, first.state, members(1), moving, now=OPENS, install_window=NIGHT)
    device = result.state.devices["cam-0"]
    assert device.outcome is None and not device.waiting_for_window
    assert device.reason is None and device.detail is None


def test_a_retry_sends_the_window_again_and_forgets_the_staging() -> None:
    rollout = spec(retry={"max_attempts": 2, "backoff_initial": "PT1M"})
    targeted = step(
        rollout, new_rollout(rollout, now=NOW), members(1), {}, now=NOW, install_window=NIGHT
    )
    reports = (
        UpdateReport(EventKind.STAGED, NOW + MINUTE, MODEL, 2),
        UpdateReport(EventKind.REJECTED, OPENS, MODEL, 2, reason="self_test_failed"),
    )
    signals = {"cam-0": DeviceSignals("cam-0", running_version=1, updates=reports)}
    failed = step(rollout, targeted.state, members(1), signals, now=OPENS, install_window=NIGHT)
    device = failed.state.devices["cam-0"]
    assert device.next_retry_at is not None and device.staged_at is None
    assert device.reason == "self_test_failed"

    retried = step(
        rollout, failed.state, members(1), signals, now=OPENS + 2 * MINUTE, install_window=NIGHT
    )
    assert [type(a) for a in retried.actions] == [RetryDevice]
    device = retried.state.devices["cam-0"]
    assert device.attempts == 2 and device.install_window == NIGHT and device.staged_at is None


# ----------------------------------------------------------------------------- desired content


def variants(*versions: int) -> list[ArtifactVariant]:
    return [
        ArtifactVariant(
            model_name=MODEL,
            model_version=v,
            target=PROFILE,
            runtime="litert",
            gate_passed=True,
            bundle_sha256=f"{v:064x}",
            bundle_length=1000 + v,
        )
        for v in versions
    ]


def test_the_window_goes_on_the_moved_deployment_and_not_on_reverts_or_pins() -> None:
    rollout = spec()
    targeted = step(
        rollout, new_rollout(rollout, now=NOW), members(2), {}, now=NOW, install_window=NIGHT
    )
    claims = rollout_claims(rollout, targeted.state)
    assert {c.install_window for c in claims.values()} == {NIGHT}

    moved = desired_content("cam-0", PROFILE, claims=claims.values(), variants=variants(1, 2))
    (deployment,) = moved.deployments
    assert (deployment.model_version, deployment.install_window) == (2, NIGHT)
    payload = deployment.model_dump(mode="json")
    assert payload["install_window"] == {"start": "02:00", "end": "04:00"}

    revert = ModelClaim("cam-0", MODEL, 1, "r-night", NOW + timedelta(hours=1))
    reverted = desired_content(
        "cam-0", PROFILE, claims=[*claims.values(), revert], variants=variants(1, 2)
    )
    (deployment,) = reverted.deployments
    assert (deployment.model_version, deployment.install_window) == (1, None)
    assert "install_window" not in deployment.model_dump(mode="json")  # as before the field

    pinned = desired_content(
        "cam-1",
        PROFILE,
        claims=claims.values(),
        pins=[Pin("cam-1", MODEL, 2)],
        variants=variants(1, 2),
    )
    assert pinned.deployments[0].install_window is None
    # The window is part of the content: changing it issues a new manifest version.
    assert (
        pinned.digest()
        != desired_content(
            "cam-1", PROFILE, claims=claims.values(), variants=variants(1, 2)
        ).digest()
    )


def test_content_without_a_window_is_written_as_before_the_field_existed() -> None:
    """So every manifest issued before keeps its digest: no fleet-wide re-issue."""
    content = desired_content(
        "cam-0",
        PROFILE,
        claims=[ModelClaim("cam-0", MODEL, 2, "r-1", NOW)],
        variants=variants(2),
    )
    (deployment,) = content.deployments
    assert deployment.model_dump(mode="json") == {
        "kind": "model",
        "model_name": MODEL,
        "model_version": 2,
        "target": PROFILE,
        "artifact": {
            "sha256": f"{2:064x}",
            "length": 1002,
            "media_type": "application/vnd.edgefleet.bundle",
            "url": None,
        },
    }
