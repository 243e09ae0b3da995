"""A simulated fleet around the pure rollout core: devices answer the actions a step emits.

Each device follows a :class:`Behaviour`: per attempt it activates, reports a failure or
stays silent, some time after it was targeted. Rolled-back and reverted devices report
their previous version afterwards. With an ``install_window``, a device that answers
outside it reports ``staged`` and activates (``activate``) or stays silent (``stage``)
once the window opens, as an agent does. The simulation keeps every action with its time, so
tests check invariants over a whole run. Time only moves when a test says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, TypeVar

from server.rollouts.core import (
    Action,
    DeviceSignals,
    RetryDevice,
    RevertDevice,
    RollBackDevice,
    RolloutMember,
    RolloutSpec,
    RolloutState,
    StepResult,
    TargetDevice,
    UpdateReport,
    new_rollout,
    step,
)
from shared.messages import EventKind, InstallWindow, ModelWindow

Answer = Literal["activate", "fail", "silent", "stage"]
A = TypeVar("A")


@dataclass(frozen=True)
class Behaviour:
    answers: tuple[Answer, ...] = ("activate",)
    """One per attempt; the last repeats."""
    delay: timedelta = timedelta(seconds=30)

    def answer(self, attempt: int) -> Answer:
        return self.answers[min(attempt, len(self.answers)) - 1]


@dataclass
class _Device:
    running_version: int | None
    state_received_at: datetime | None = None
    updates: list[UpdateReport] = field(default_factory=list)
    telemetry: list[ModelWindow] = field(default_factory=list)


Telemetry = Callable[[str, int], ModelWindow | None]
"""(device id, running version) -> one window, added at every step for each device."""


class SimulatedFleet:
    def __init__(
        self,
        spec: RolloutSpec,
        members: Sequence[RolloutMember],
        *,
        start: datetime,
        behaviours: dict[str, Behaviour] | None = None,
        running_version: int | None = 1,
        telemetry: Telemetry | None = None,
        install_window: InstallWindow | None = None,
    ) -> None:
        self.spec = spec
        self.install_window = install_window
        self.members = list(members)
        self.now = start
        self.state: RolloutState = new_rollout(spec, now=start)
        self.behaviours = behaviours or {}
        self.devices = {m.device_id: _Device(running_version) for m in members}
        self.default_version = running_version
        self.telemetry = telemetry
        self.scheduled: list[tuple[datetime, str, Callable[[], None]]] = []
        self.log: list[tuple[datetime, Action]] = []

    # -- the world

    def join(self, member: RolloutMember) -> None:
        self.members.append(member)
        self.devices.setdefault(member.device_id, _Device(self.default_version))

    def signals(self) -> dict[str, DeviceSignals]:
        return {
            device_id: DeviceSignals(
                device_id,
                running_version=d.running_version,
                state_received_at=d.state_received_at,
                updates=tuple(d.updates),
                telemetry=tuple(d.telemetry),
            )
            for device_id, d in self.devices.items()
        }

    def report(self, device_id: str, kind: EventKind, *, reason: str | None = None) -> None:
        """The device reports an update event now."""
        self.devices[device_id].updates.append(
            UpdateReport(
                kind,
                received_at=self.now,
                model_name=self.spec.model_name,
                model_version=self.spec.model_version,
                reason=reason,
            )
        )

    def _deliver(self) -> None:
        due = [s for s in self.scheduled if s[0] <= self.now]
        self.scheduled = [s for s in self.scheduled if s[0] > self.now]
        for _, _, effect in sorted(due, key=lambda s: (s[0], s[1])):
            effect()

    def _react(self, action: Action) -> None:
        if isinstance(action, TargetDevice | RetryDevice):
            attempt = action.attempt if isinstance(action, RetryDevice) else 1
            behaviour = self.behaviours.get(action.device_id, Behaviour())
            answer = behaviour.answer(attempt)
            device = self.devices[action.device_id]
            at = self.now + behaviour.delay
            version = action.model_version

            def activate() -> None:
                device.running_version, device.state_received_at = version, at
                device.updates.append(
                    UpdateReport(EventKind.HEALTH_CHECK_PASSED, at, self.spec.model_name, version)
                )

            def fail() -> None:
                device.updates.append(
                    UpdateReport(
                        EventKind.REJECTED, at, self.spec.model_name, version, "hash_mismatch"
                    )
                )

            window = self.install_window
            if answer in ("activate", "stage") and window is not None and not window.contains(at):

                def stage(staged_at: datetime = at) -> None:
                    device.updates.append(
                        UpdateReport(EventKind.STAGED, staged_at, self.spec.model_name, version)
                    )

                self.scheduled.append((at, action.device_id, stage))
                at = window.next_opening(at) + behaviour.delay  # ``activate`` reads it then
            if answer == "activate":
                self.scheduled.append((at, action.device_id, activate))
            elif answer == "fail":
                self.scheduled.append((at, action.device_id, fail))
        elif isinstance(action, RollBackDevice | RevertDevice):
            device = self.devices[action.device_id]
            to_version = action.to_version
            behaviour = self.behaviours.get(action.device_id, Behaviour())
            if behaviour.answers[-1] == "silent":
                return

            back_at = self.now + behaviour.delay

            def go_back() -> None:
                device.running_version, device.state_received_at = to_version, back_at

            self.scheduled.append((back_at, action.device_id, go_back))

    # -- driving the core

    def step(self, now: datetime | None = None) -> StepResult:
        if now is not None:
            self.now = now
        self._deliver()
        if self.telemetry is not None:
            for device_id, device in self.devices.items():
                if device.running_version is not None:
                    window = self.telemetry(device_id, device.running_version)
                    if window is not None:
                        device.telemetry.append(window)
        result = step(
            self.spec,
            self.state,
            self.members,
            self.signals(),
            now=self.now,
            install_window=self.install_window,
        )
        self.apply(result)
        return result

    def apply(self, result: StepResult) -> None:
        """Take a step's or a command's result: keep its state, answer its actions."""
        self.state = result.state
        for action in result.actions:
            self.log.append((self.now, action))
            self._react(action)

    def run(self, *, every: timedelta, until: datetime | None = None, steps: int = 1000) -> None:
        """Step every ``every`` until the rollout is final, ``until`` or ``steps`` steps."""
        for _ in range(steps):
            if self.state.status.is_final or (until is not None and self.now >= until):
                return
            self.step()
            self.now += every

    def actions(self, kind: type[A]) -> list[tuple[datetime, A]]:
        return [(t, a) for t, a in self.log if isinstance(a, kind)]
