"""The rollout state machine: which devices move to a model version (or an agent release),
when, and what happens next.

This module does no I/O and reads no clock (like python-tuf's ``trusted_metadata_set``):
:func:`step` and the operator commands (:func:`pause`, :func:`resume`, :func:`approve`,
:func:`abort`) take the spec, the current :class:`RolloutState`, plain data about the
group's members and their signals, and ``now``; they return a new state and the
:data:`Action` list the caller carries out (recompute and publish desired states, log).
The caller persists the state it gets back; running the same step again with the same
inputs changes nothing more, so a restart resumes where the last persisted state was.

Statuses::

    pending -> running <-> waiting_approval        (phases fill, settle, advance)
                  |  ^           |
                  v  |           v
                 paused ---------+--> aborting -> aborted
                  |
    running -> completed

What always holds:

- Phases are cumulative targets over the group's *current* eligible members (members
  without an :class:`Exclusion`), so late joiners are picked up by the phase in force.
  A step never targets a device when the rollout's targeted eligible members already
  reach the current phase's target, and never targets a device twice: each device has
  at most one :class:`Assignment`, and retries reuse it.
- Targets are taken in a fixed pseudo-random order (SHA-256 of rollout id and device
  id), so the canary is a spread of the group, and the same on every replica.
- Targeting, first attempts and retries alike, never exceeds ``max_devices_per_minute``
  in any 60-second window: each step counts the targeting times of the minute before.
  A step told ``may_target=False`` starts no attempt at all.
- Install windows: a step given the group's ``install_window`` targets at any time and
  records the window on each attempt it starts (:attr:`Assignment.install_window`):
  the device downloads ahead and activates only inside it. An attempt's per-device
  timeout runs from the device's last progress or, when the attempt's window was
  closed at that moment, from the window's next opening -- the wait for the window
  never counts. While a device's latest report is ``staged`` it is waiting for its
  window (:attr:`Assignment.waiting_for_window`).
- A device that reports no progress for ``device_timeout`` after it was targeted (as
  counted above) ends ``timed_out``, which the activation gate counts as a failure: no
  device holds a rollout forever. Reported failures are retried with exponential
  backoff up to ``max_attempts``; the last one ends ``failed``. Both are moved back to
  the version they ran before (:class:`RevertDevice`).
- Outcomes ``failed``, ``timed_out`` and ``rolled_back`` are final; ``activated`` turns
  into ``rolled_back`` only by an abort. ``excluded`` is re-decided at every step for
  devices not yet targeted.
- A phase advances only when its target is reached, every targeted device has a final
  outcome, the phase's wait has passed since then, no gate is breached, and -- when the
  phase asks for approval or a gate lacks evidence (``require_evidence``) -- the
  operator approved it. A breached gate pauses or aborts (``on_breach``).
- :func:`abort` emits a :class:`RollBackDevice` for exactly the devices the rollout
  moved (targeted, not yet reverted, and on another version before), and nothing else.
- Two kinds, one machine (:class:`RolloutKind`). A ``model`` rollout moves devices to
  ``model_version`` of ``model_name``. An ``agent`` rollout moves them to the agent
  release ``agent_version``: its ``model_name`` is :data:`AGENT_TARGET` and its
  ``model_version`` the release's id (``agent_releases.id``), so versions are compared
  as numbers exactly as for models -- a device's ``running_version`` is the id of the
  release it runs (None: none, or one never published). A model rollout judges only
  update events without ``agent_version``; an agent rollout only events without a model
  and with its own ``agent_version`` (or none: a refused manifest), so an agent rollout
  and a model rollout to the same devices never read each other's outcomes.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from fractions import Fraction
from typing import Annotated, Self

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from server.rollouts.errors import InvalidRolloutError, RolloutStateError
from server.rollouts.gates import DeviceWindows, HealthReport, HealthThresholds, evaluate_gates
from shared.messages import AgentVersion, EventKind, InstallWindow, ModelWindow

__all__ = [
    "AGENT_TARGET",
    "RATE_WINDOW",
    "WAITING_FOR_WINDOW",
    "Action",
    "Assignment",
    "DeviceOutcome",
    "DeviceSignals",
    "Exclusion",
    "OnBreach",
    "Phase",
    "PhaseStarted",
    "RetryDevice",
    "RetryPolicy",
    "RevertDevice",
    "RollBackDevice",
    "RolloutKind",
    "RolloutMember",
    "RolloutSpec",
    "RolloutState",
    "RolloutStatus",
    "StatusChanged",
    "StepResult",
    "TargetDevice",
    "UpdateReport",
    "abort",
    "approve",
    "cumulative_targets",
    "new_rollout",
    "parse_phases",
    "pause",
    "resume",
    "step",
    "targeting_order",
]

RATE_WINDOW = timedelta(minutes=1)
"""The window ``max_devices_per_minute`` is counted over."""
WAITING_FOR_WINDOW = "waiting_for_window"
"""The ``reason`` of a device that staged its update and waits for its install window."""

AGENT_TARGET = "@agent"
"""The ``model_name`` of an agent rollout: no model can be named so (names start alphanumeric)."""

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

_SUCCESS = frozenset({EventKind.HEALTH_CHECK_PASSED})
_FAILURE = frozenset(
    {EventKind.REJECTED, EventKind.FAILED, EventKind.ROLLED_BACK, EventKind.HEALTH_CHECK_FAILED}
)


class RolloutStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING_APPROVAL = "waiting_approval"
    PAUSED = "paused"
    ABORTING = "aborting"
    ABORTED = "aborted"
    COMPLETED = "completed"

    @property
    def is_final(self) -> bool:
        return self in (RolloutStatus.ABORTED, RolloutStatus.COMPLETED)


class RolloutKind(StrEnum):
    MODEL = "model"
    AGENT = "agent"


class DeviceOutcome(StrEnum):
    ACTIVATED = "activated"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    ROLLED_BACK = "rolled_back"
    EXCLUDED = "excluded"


class OnBreach(StrEnum):
    PAUSE = "pause"
    ABORT = "abort"


# ----------------------------------------------------------------------------- the spec


class Phase(BaseModel):
    """One wave: a cumulative share (``percent``) or number (``count``) of the group."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    percent: float | None = Field(None, gt=0, le=100)
    count: int | None = Field(None, ge=1)
    approval_required: bool = Field(
        False, description="the operator approves this phase's result before the rollout moves on"
    )
    wait: timedelta | None = Field(
        None, description="observation time after the phase settled; default: the spec's"
    )
    gates: HealthThresholds | None = Field(None, description="default: the spec's gates")

    @model_validator(mode="after")
    def _one_size(self) -> Self:
        if (self.percent is None) == (self.count is None):
            raise ValueError("a phase has either a percent or a count")
        if self.wait is not None and self.wait < timedelta(0):
            raise ValueError("a phase's wait cannot be negative")
        return self

    def target(self, eligible: int) -> int:
        """How many of ``eligible`` devices this phase covers (percentages round up)."""
        if self.count is not None:
            return min(self.count, eligible)
        assert self.percent is not None
        # Exact decimal arithmetic: 7 % of 100 is 7, not 8 from 7.000000000000001.
        share = Fraction(str(self.percent)) * eligible / 100
        return min(eligible, -(-share.numerator // share.denominator))

    def describe(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else f"{self.count} devices"


class RetryPolicy(BaseModel):
    """How often a device that reported a failed update is sent it again."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int = Field(3, ge=1, le=20)
    backoff_initial: timedelta = timedelta(minutes=1)
    backoff_max: timedelta = timedelta(minutes=30)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.backoff_initial <= timedelta(0) or self.backoff_max < self.backoff_initial:
            raise ValueError("backoff must be positive and backoff_max at least backoff_initial")
        return self

    def delay(self, failed_attempts: int) -> timedelta:
        """The wait after the ``failed_attempts``-th failure (1, 2, 4, ... x initial, capped)."""
        factor = 1 << min(max(failed_attempts - 1, 0), 30)
        return min(self.backoff_max, self.backoff_initial * factor)


class RolloutSpec(BaseModel):
    """What to roll out where, and how carefully. Immutable once the rollout exists."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rollout_id: Name
    kind: RolloutKind = RolloutKind.MODEL
    model_name: str = Field(
        min_length=1, max_length=128, description=f"the model; {AGENT_TARGET} for an agent rollout"
    )
    model_version: int = Field(ge=1, description="the model version; an agent release's id")
    agent_version: AgentVersion | None = Field(None, description="agent rollouts: the version")
    health_timeout_s: int | None = Field(
        None,
        ge=10,
        le=86_400,
        description="agent rollouts: seconds the new agent has to report healthy",
    )
    group: str = Field(min_length=1, max_length=128)
    phases: tuple[Phase, ...] = Field(
        (Phase(percent=5), Phase(percent=25), Phase(percent=100)), min_length=1, max_length=20
    )
    wait_between_phases: timedelta = timedelta(minutes=10)
    max_devices_per_minute: int = Field(60, ge=1)
    device_timeout: timedelta = timedelta(minutes=30)
    retry: RetryPolicy = RetryPolicy()
    on_breach: OnBreach = OnBreach.PAUSE
    gates: HealthThresholds = HealthThresholds()
    start_at: AwareDatetime | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.kind is RolloutKind.AGENT:
            if self.model_name != AGENT_TARGET or self.agent_version is None:
                raise ValueError(
                    f"an agent rollout has model_name {AGENT_TARGET!r} and an agent_version"
                )
        else:
            if not _MODEL_NAME.fullmatch(self.model_name):
                raise ValueError(f"model_name {self.model_name!r} is not a model name")
            if self.agent_version is not None or self.health_timeout_s is not None:
                raise ValueError("agent_version and health_timeout_s belong to agent rollouts")
        if self.device_timeout <= timedelta(0):
            raise ValueError("device_timeout must be positive")
        if self.wait_between_phases < timedelta(0):
            raise ValueError("wait_between_phases cannot be negative")
        for kind in ("percent", "count"):
            sizes = [getattr(p, kind) for p in self.phases if getattr(p, kind) is not None]
            if any(b <= a for a, b in itertools.pairwise(sizes)):
                raise ValueError(f"phase {kind}s must increase from phase to phase")
        return self

    @classmethod
    def build(cls, **fields: object) -> RolloutSpec:
        """Validate ``fields`` into a spec, or raise :class:`InvalidRolloutError`."""
        try:
            return cls.model_validate(fields)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'spec'}: {err['msg']}" for err in e.errors()
            )
            raise InvalidRolloutError(f"invalid rollout: {problems}") from e

    def phase_wait(self, index: int) -> timedelta:
        wait = self.phases[index].wait
        return self.wait_between_phases if wait is None else wait

    def phase_gates(self, index: int) -> HealthThresholds:
        gates = self.phases[index].gates
        return self.gates if gates is None else gates


_PHASE_TOKEN = re.compile(r"^(?P<number>\d+(?:\.\d+)?)(?P<unit>%|dev|devices)?$")


def parse_phases(text: str, *, approval_required: bool = False) -> tuple[Phase, ...]:
    """``"5,25,100"`` or ``"5%,25%,100%"`` (percentages), ``"3dev,50%,100%"`` (a count first)."""
    phases = []
    for raw in text.split(","):
        token = raw.strip().replace(" ", "")
        match = _PHASE_TOKEN.fullmatch(token)
        if match is None:
            raise InvalidRolloutError(
                f"phase {raw.strip()!r}: write a percentage (5 or 5%) or a count (3dev)"
            )
        number, unit = match["number"], match["unit"]
        try:
            if unit in ("dev", "devices"):
                if "." in number:
                    raise InvalidRolloutError(f"phase {token!r}: a count is a whole number")
                phases.append(Phase(count=int(number), approval_required=approval_required))
            else:
                phases.append(Phase(percent=float(number), approval_required=approval_required))
        except ValidationError as e:
            raise InvalidRolloutError(f"phase {token!r}: {e.errors()[0]['msg']}") from e
    if not phases:
        raise InvalidRolloutError("a rollout needs at least one phase")
    return tuple(phases)


def cumulative_targets(spec: RolloutSpec, eligible: int) -> list[int]:
    """Each phase's cumulative target over ``eligible`` devices (never decreasing)."""
    targets, highest = [], 0
    for phase in spec.phases:
        highest = max(highest, phase.target(eligible))
        targets.append(highest)
    return targets


def targeting_order(rollout_id: str, device_id: str) -> str:
    """The sort key that orders a group's devices for one rollout."""
    return hashlib.sha256(f"{rollout_id}\x00{device_id}".encode()).hexdigest()


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True, slots=True)
class Exclusion:
    """Why a device cannot take the rollout's artifact: a short code and the detail."""

    code: str
    detail: str


@dataclass(frozen=True, slots=True)
class RolloutMember:
    """A current member of the rollout's group, as the rollout needs to see it."""

    device_id: str
    profile: str
    latency_sla_ms: float | None = None
    exclusion: Exclusion | None = None


@dataclass(frozen=True, slots=True)
class UpdateReport:
    """One update event from a device, stamped with the time the *server* received it.

    Server time, not the device's ``at``: device clocks drift, and each attempt's
    events are told apart by comparing with the server's targeting time.
    """

    kind: EventKind
    received_at: datetime
    model_name: str | None = None
    model_version: int | None = None
    reason: str | None = None
    detail: str | None = None
    agent_version: str | None = None


@dataclass(frozen=True, slots=True)
class DeviceSignals:
    """What one device reported about the rollout's model.

    ``running_version``: the version its retained state says it runs (None: none), as
    received at ``state_received_at`` (server time; None when unknown). ``updates``: its
    update events (any order). ``telemetry``: its windows of the model, any version, over
    the span the caller wants the gates to judge.
    """

    device_id: str
    running_version: int | None = None
    state_received_at: datetime | None = None
    updates: Sequence[UpdateReport] = field(default_factory=tuple)
    telemetry: Sequence[ModelWindow] = field(default_factory=tuple)


# ----------------------------------------------------------------------------- the state


class Assignment(BaseModel):
    """One device's part in a rollout."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: str
    profile: str
    phase: int | None = Field(None, description="the phase that targeted it; None if excluded")
    targeted_at: AwareDatetime | None = Field(None, description="start of the latest attempt")
    attempts: int = Field(0, ge=0)
    previous_version: int | None = Field(None, description="what it ran when first targeted")
    last_heard_at: AwareDatetime | None = None
    next_retry_at: AwareDatetime | None = None
    outcome: DeviceOutcome | None = None
    outcome_at: AwareDatetime | None = None
    reason: str | None = Field(None, description="a short code: exclusion, failure or rollback")
    detail: str | None = None
    confirmed_at: AwareDatetime | None = Field(
        None, description="when a rolled-back device was seen on its previous version"
    )
    install_window: InstallWindow | None = Field(
        None, description="the window the latest attempt's desired state names (group's)"
    )
    staged_at: AwareDatetime | None = Field(
        None, description="while it waits for its install window: when it reported staged"
    )

    @property
    def targeted(self) -> bool:
        return self.targeted_at is not None

    @property
    def in_progress(self) -> bool:
        """Targeted, no outcome yet, and not waiting for a retry."""
        return self.targeted and self.outcome is None and self.next_retry_at is None

    @property
    def waiting_for_window(self) -> bool:
        """In progress, with its update staged, waiting for its install window."""
        return self.in_progress and self.staged_at is not None

    def moved(self, model_version: int) -> bool:
        """Its desired state names the rollout's version, which it did not run before."""
        return (
            self.targeted
            and self.outcome in (None, DeviceOutcome.ACTIVATED)
            and self.previous_version != model_version
        )


class RolloutState(BaseModel):
    """Everything a rollout must remember between two steps (persist it whole)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: RolloutStatus = RolloutStatus.PENDING
    status_reason: str | None = None
    status_changed_at: AwareDatetime
    created_at: AwareDatetime
    started_at: AwareDatetime | None = None
    finished_at: AwareDatetime | None = None
    phase: int = Field(0, ge=0)
    phase_started_at: AwareDatetime | None = None
    phase_settled_at: AwareDatetime | None = None
    approved_phase: int | None = None
    gate_override_phase: int | None = None
    devices: dict[str, Assignment] = Field(default_factory=dict)
    recent_targeting: tuple[AwareDatetime, ...] = Field(
        (), description="targeting times within the last rate window"
    )
    gate_report: HealthReport | None = None

    def counts(self) -> dict[str, int]:
        """Devices per outcome, plus ``in_progress`` and ``retry_pending``, and
        ``waiting_for_window``: those of ``in_progress`` that wait for their window."""
        result: dict[str, int] = {o.value: 0 for o in DeviceOutcome}
        result["in_progress"] = result["retry_pending"] = result[WAITING_FOR_WINDOW] = 0
        for a in self.devices.values():
            if a.outcome is not None:
                result[a.outcome.value] += 1
            elif a.next_retry_at is not None:
                result["retry_pending"] += 1
            elif a.targeted:
                result["in_progress"] += 1
                result[WAITING_FOR_WINDOW] += a.waiting_for_window
        return result


def new_rollout(spec: RolloutSpec, *, now: datetime) -> RolloutState:
    """The state of a rollout just created (``pending``; the first step starts it)."""
    del spec  # the spec is validated when built; nothing in it shapes the initial state
    return RolloutState(status_changed_at=now, created_at=now)


# ----------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class TargetDevice:
    """The device's desired state now names the rollout's version: recompute and publish."""

    device_id: str
    model_version: int
    previous_version: int | None
    phase: int


@dataclass(frozen=True, slots=True)
class RetryDevice:
    """Send the same desired content again under a new manifest version (a new attempt)."""

    device_id: str
    model_version: int
    attempt: int


@dataclass(frozen=True, slots=True)
class RevertDevice:
    """The device failed or timed out for good: its desired state goes back to before."""

    device_id: str
    to_version: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class RollBackDevice:
    """Abort: the device's desired state goes back to the version it ran before."""

    device_id: str
    to_version: int | None


@dataclass(frozen=True, slots=True)
class StatusChanged:
    previous: RolloutStatus
    status: RolloutStatus
    reason: str | None
    phase: int


@dataclass(frozen=True, slots=True)
class PhaseStarted:
    phase: int
    target: int
    eligible: int


Action = TargetDevice | RetryDevice | RevertDevice | RollBackDevice | StatusChanged | PhaseStarted
"""Device actions change a desired state; the other two are for logs and ``watch``."""


@dataclass(frozen=True, slots=True)
class StepResult:
    state: RolloutState
    actions: tuple[Action, ...]

    @property
    def device_ids(self) -> list[str]:
        """Devices whose desired state must be recomputed and published, in action order."""
        seen: dict[str, None] = {}
        for action in self.actions:
            if isinstance(action, TargetDevice | RetryDevice | RevertDevice | RollBackDevice):
                seen.setdefault(action.device_id, None)
        return list(seen)

    @property
    def retried(self) -> frozenset[str]:
        """Devices whose new desired state must get a new manifest version even if unchanged."""
        return frozenset(a.device_id for a in self.actions if isinstance(a, RetryDevice))


# ----------------------------------------------------------------------------- the step


class _Work:
    """A mutable working copy of one state for the length of one step or command."""

    def __init__(
        self,
        spec: RolloutSpec,
        state: RolloutState,
        now: datetime,
        install_window: InstallWindow | None = None,
    ) -> None:
        self.spec = spec
        self.now = now
        self.install_window = install_window
        self.version = spec.model_version
        self.fields = state.model_dump(exclude={"devices", "gate_report"})
        self.gate_report = state.gate_report
        self.devices = dict(state.devices)
        self.actions: list[Action] = []

    @property
    def status(self) -> RolloutStatus:
        status: RolloutStatus = self.fields["status"]
        return status

    @property
    def phase(self) -> int:
        phase: int = self.fields["phase"]
        return phase

    def set_status(self, status: RolloutStatus, reason: str | None) -> None:
        previous = self.status
        if previous == status and self.fields["status_reason"] == reason:
            return
        self.fields.update(status=status, status_reason=reason, status_changed_at=self.now)
        if status.is_final:
            self.fields["finished_at"] = self.now
        if previous != status:
            self.actions.append(StatusChanged(previous, status, reason, self.phase))

    def update(self, device_id: str, **changes: object) -> Assignment:
        assignment = self.devices[device_id].model_copy(update=changes)
        self.devices[device_id] = assignment
        return assignment

    def result(self) -> StepResult:
        state = RolloutState(**self.fields, devices=self.devices, gate_report=self.gate_report)
        return StepResult(state=state, actions=tuple(self.actions))


def step(
    spec: RolloutSpec,
    state: RolloutState,
    members: Sequence[RolloutMember],
    signals: Mapping[str, DeviceSignals],
    *,
    now: datetime,
    may_target: bool = True,
    install_window: InstallWindow | None = None,
) -> StepResult:
    """Advance the rollout as far as ``now`` and the signals allow.

    ``members``: the group's current members (excluded ones included, with their
    :class:`Exclusion`). ``signals``: by device id; a device without an entry has
    reported nothing. ``may_target=False`` starts no attempt -- neither new targets nor
    due retries -- while outcomes, gates, timeouts and phase changes go on as usual.
    ``install_window``: the group's maintenance window, recorded on every attempt this
    step starts (see the module docstring for what it changes).
    """
    if state.status.is_final:
        return StepResult(state=state, actions=())
    work = _Work(spec, state, now, install_window)
    if work.status is RolloutStatus.PENDING:
        if spec.start_at is not None and now < spec.start_at:
            return work.result()
        work.fields.update(started_at=now, phase=0, phase_started_at=now)
        work.set_status(RolloutStatus.RUNNING, None)
        eligible = _eligible(members)
        work.actions.append(
            PhaseStarted(0, cumulative_targets(spec, len(eligible))[0], len(eligible))
        )
    _refresh_exclusions(work, members)
    if work.status is RolloutStatus.ABORTING:
        _confirm_rollbacks(work, signals)
        return work.result()
    _observe(work, signals)
    for _ in range(len(spec.phases) + 1):  # each pass may start the next phase
        report = _evaluate(work, members, signals)
        work.gate_report = report
        if _breached(work, report, signals) or work.status not in (
            RolloutStatus.RUNNING,
            RolloutStatus.WAITING_APPROVAL,
        ):
            break
        if may_target:
            _fill(work, members, signals)
        if not _maybe_advance(work, members, report):
            break
    return work.result()


def _breached(work: _Work, report: HealthReport, signals: Mapping[str, DeviceSignals]) -> bool:
    """Pause or abort on a breached gate, unless the operator overrode this phase's gates."""
    if (
        not report.breached
        or work.status not in (RolloutStatus.RUNNING, RolloutStatus.WAITING_APPROVAL)
        or work.fields["gate_override_phase"] == work.phase
    ):
        return False
    reason = "; ".join(f"{r.gate.value} breached: {r.summary}" for r in report.breached)
    if work.spec.on_breach is OnBreach.ABORT:
        if _abort(work, reason):
            _confirm_rollbacks(work, signals)
    else:
        work.set_status(RolloutStatus.PAUSED, reason)
    return True


def _eligible(members: Sequence[RolloutMember]) -> list[RolloutMember]:
    return [m for m in members if m.exclusion is None]


def _refresh_exclusions(work: _Work, members: Sequence[RolloutMember]) -> None:
    excluded = {m.device_id: m for m in members if m.exclusion is not None}
    for device_id, assignment in list(work.devices.items()):
        if assignment.outcome is DeviceOutcome.EXCLUDED and device_id not in excluded:
            del work.devices[device_id]  # eligible again, or gone from the group
    for device_id, member in excluded.items():
        current = work.devices.get(device_id)
        if current is not None and current.outcome is not DeviceOutcome.EXCLUDED:
            continue  # already targeted: an exclusion decided later does not undo that
        assert member.exclusion is not None
        if (
            current is None
            or current.reason != member.exclusion.code
            or current.detail != member.exclusion.detail
        ):
            work.devices[device_id] = Assignment(
                device_id=device_id,
                profile=member.profile,
                outcome=DeviceOutcome.EXCLUDED,
                outcome_at=work.now,
                reason=member.exclusion.code,
                detail=member.exclusion.detail,
            )


def _relevant(work: _Work, update: UpdateReport, since: datetime) -> bool:
    if update.received_at < since:
        return False
    spec = work.spec
    if spec.kind is RolloutKind.AGENT:
        if update.model_name is not None or update.model_version is not None:
            return False  # an event of a model update
        return update.agent_version is None or update.agent_version == spec.agent_version
    if update.agent_version is not None:
        return False  # an event of an agent update
    if update.model_name is not None and update.model_name != spec.model_name:
        return False
    return update.model_version is None or update.model_version == work.version


def _timeout_from(a: Assignment, heard: datetime) -> datetime:
    """When an attempt's timeout starts: at its last progress, unless its install window
    was closed then -- from the window's next opening."""
    return heard if a.install_window is None else a.install_window.next_opening(heard)


def _waiting_detail(window: InstallWindow | None, staged_at: datetime) -> str:
    if window is None:
        return "staged; waits for its install window"
    opening = window.next_opening(staged_at).astimezone(UTC)
    return f"staged; activates in its install window {window} (opens {opening:%Y-%m-%d %H:%M} UTC)"


def _observe(work: _Work, signals: Mapping[str, DeviceSignals]) -> None:
    """Turn signals into outcomes: activation, failure (retry or give up), timeout."""
    spec, now = work.spec, work.now
    for device_id, a in list(work.devices.items()):
        if not a.targeted or a.outcome is not None:
            continue
        assert a.targeted_at is not None
        signal = signals.get(device_id) or DeviceSignals(device_id)
        updates = sorted(
            (u for u in signal.updates if _relevant(work, u, a.targeted_at)),
            key=lambda u: u.received_at,
        )
        heard = max([a.targeted_at, *(u.received_at for u in updates)])
        if signal.running_version == work.version or any(u.kind in _SUCCESS for u in updates):
            work.update(
                device_id,
                outcome=DeviceOutcome.ACTIVATED,
                outcome_at=now,
                last_heard_at=heard,
                next_retry_at=None,
                reason=None,
                detail=None,
                staged_at=None,
            )
            continue
        if a.next_retry_at is not None:
            continue  # this attempt's failure is known; the retry has not started yet
        failure = next((u for u in updates if u.kind in _FAILURE), None)
        timeout_from = _timeout_from(a, heard)
        if failure is not None:
            reason = failure.reason or failure.kind.value
            if a.attempts < spec.retry.max_attempts:
                work.update(
                    device_id,
                    last_heard_at=heard,
                    next_retry_at=now + spec.retry.delay(a.attempts),
                    reason=reason,
                    detail=failure.detail,
                    staged_at=None,
                )
            else:
                work.update(device_id, staged_at=None)
                _give_up(work, a, DeviceOutcome.FAILED, reason, failure.detail, heard)
        elif now >= timeout_from + spec.device_timeout:
            detail = f"no progress reported for {spec.device_timeout} after attempt {a.attempts}"
            if timeout_from != heard:
                opened = timeout_from.astimezone(UTC)
                detail += f" (counted from its install window's opening, {opened:%H:%M} UTC)"
            work.update(device_id, staged_at=None)
            _give_up(work, a, DeviceOutcome.TIMED_OUT, "timed_out", detail, heard)
        else:
            changes: dict[str, object] = {}
            if heard != a.last_heard_at:
                changes["last_heard_at"] = heard
            staged = updates[-1] if updates and updates[-1].kind is EventKind.STAGED else None
            if staged is not None and a.staged_at != staged.received_at:
                changes.update(
                    staged_at=staged.received_at,
                    reason=WAITING_FOR_WINDOW,
                    detail=_waiting_detail(a.install_window, staged.received_at),
                )
            elif staged is None and a.staged_at is not None:  # it moved on (activating)
                changes.update(staged_at=None, reason=None, detail=None)
            if changes:
                work.update(device_id, **changes)


def _give_up(
    work: _Work,
    a: Assignment,
    outcome: DeviceOutcome,
    reason: str,
    detail: str | None,
    heard: datetime,
) -> None:
    work.update(
        a.device_id,
        outcome=outcome,
        outcome_at=work.now,
        reason=reason,
        detail=detail,
        last_heard_at=heard,
        next_retry_at=None,
    )
    work.actions.append(RevertDevice(a.device_id, a.previous_version, reason))


def _evaluate(
    work: _Work, members: Sequence[RolloutMember], signals: Mapping[str, DeviceSignals]
) -> HealthReport:
    sla = {m.profile: m.latency_sla_ms for m in members if m.latency_sla_ms is not None}
    by_outcome: dict[DeviceOutcome, list[str]] = {o: [] for o in DeviceOutcome}
    canary = []
    for a in work.devices.values():
        if a.outcome is None:
            continue
        by_outcome[a.outcome].append(a.device_id)
        if a.outcome is DeviceOutcome.ACTIVATED and a.device_id in signals:
            canary.append(
                DeviceWindows(
                    a.device_id, a.profile, signals[a.device_id].telemetry, sla.get(a.profile)
                )
            )
    baseline = [DeviceWindows(s.device_id, "", s.telemetry) for s in signals.values()]
    return evaluate_gates(
        work.spec.phase_gates(work.phase),
        model_version=work.version,
        activated=by_outcome[DeviceOutcome.ACTIVATED],
        failed=by_outcome[DeviceOutcome.FAILED],
        timed_out=by_outcome[DeviceOutcome.TIMED_OUT],
        canary=canary,
        baseline=baseline,
    )


def _budget(work: _Work) -> int:
    recent = tuple(t for t in work.fields["recent_targeting"] if t > work.now - RATE_WINDOW)
    work.fields["recent_targeting"] = recent
    return work.spec.max_devices_per_minute - len(recent)


def _spend(work: _Work) -> None:
    work.fields["recent_targeting"] = (*work.fields["recent_targeting"], work.now)


def _fill(
    work: _Work, members: Sequence[RolloutMember], signals: Mapping[str, DeviceSignals]
) -> None:
    """Start due retries, then target new devices up to the phase's target and the rate."""
    spec, now = work.spec, work.now
    budget = _budget(work)
    due = sorted(
        (
            a
            for a in work.devices.values()
            if a.outcome is None and a.next_retry_at is not None and a.next_retry_at <= now
        ),
        key=lambda a: (a.next_retry_at, targeting_order(spec.rollout_id, a.device_id)),
    )
    for a in due[: max(budget, 0)]:
        work.update(
            a.device_id,
            targeted_at=now,
            attempts=a.attempts + 1,
            next_retry_at=None,
            last_heard_at=now,
            install_window=work.install_window,
            staged_at=None,
        )
        work.actions.append(RetryDevice(a.device_id, work.version, a.attempts + 1))
        _spend(work)
        budget -= 1
    eligible = _eligible(members)
    target = cumulative_targets(spec, len(eligible))[work.phase]
    targeted = sum(1 for m in eligible if m.device_id in work.devices)
    room = min(target - targeted, budget)
    if room <= 0:
        return
    candidates = sorted(
        (m for m in eligible if m.device_id not in work.devices),
        key=lambda m: (targeting_order(spec.rollout_id, m.device_id), m.device_id),
    )
    for member in candidates[:room]:
        signal = signals.get(member.device_id)
        previous = None if signal is None else signal.running_version
        already = previous == work.version
        work.devices[member.device_id] = Assignment(
            device_id=member.device_id,
            profile=member.profile,
            phase=work.phase,
            targeted_at=now,
            attempts=1,
            previous_version=previous,
            last_heard_at=now,
            outcome=DeviceOutcome.ACTIVATED if already else None,
            outcome_at=now if already else None,
            reason="already_running" if already else None,
            install_window=work.install_window,
        )
        work.actions.append(TargetDevice(member.device_id, work.version, previous, work.phase))
        _spend(work)


def _maybe_advance(work: _Work, members: Sequence[RolloutMember], report: HealthReport) -> bool:
    """Settle, wait, ask for approval, advance or complete. True when a new phase started."""
    spec, now, phase = work.spec, work.now, work.phase
    eligible = _eligible(members)
    target = cumulative_targets(spec, len(eligible))[phase]
    targeted = sum(1 for m in eligible if m.device_id in work.devices)
    unfinished = sum(1 for a in work.devices.values() if a.targeted and a.outcome is None)
    if targeted < target or unfinished:
        work.fields["phase_settled_at"] = None
        if work.status is RolloutStatus.WAITING_APPROVAL:
            work.set_status(RolloutStatus.RUNNING, f"phase {phase + 1} has devices to update")
        return False
    settled_at = work.fields["phase_settled_at"] or now
    work.fields["phase_settled_at"] = settled_at
    if now < settled_at + spec.phase_wait(phase):
        return False
    blockers = []
    if report.insufficient and spec.phase_gates(phase).require_evidence:
        short = ", ".join(f"{r.gate.value} ({r.summary})" for r in report.insufficient)
        blockers.append(f"gates short of data: {short}")
    if spec.phases[phase].approval_required:
        blockers.append(f"phase {phase + 1} requires approval")
    if blockers and work.fields["approved_phase"] != phase:
        work.set_status(RolloutStatus.WAITING_APPROVAL, "; ".join(blockers))
        return False
    if phase == len(spec.phases) - 1:
        work.set_status(RolloutStatus.COMPLETED, None)
        return False
    work.fields.update(
        phase=phase + 1, phase_started_at=now, phase_settled_at=None, approved_phase=None
    )
    work.set_status(RolloutStatus.RUNNING, None)
    work.actions.append(
        PhaseStarted(phase + 1, cumulative_targets(spec, len(eligible))[phase + 1], len(eligible))
    )
    return True


def _confirm_rollbacks(work: _Work, signals: Mapping[str, DeviceSignals]) -> None:
    waiting = 0
    for device_id, a in list(work.devices.items()):
        if a.outcome is not DeviceOutcome.ROLLED_BACK or a.confirmed_at is not None:
            continue
        signal = signals.get(device_id) or DeviceSignals(device_id)
        fresh = (
            signal.state_received_at is None
            or a.outcome_at is None
            or signal.state_received_at >= a.outcome_at
        )
        if fresh and signal.running_version == a.previous_version:
            work.update(device_id, confirmed_at=work.now)
        elif a.outcome_at is not None and work.now >= a.outcome_at + work.spec.device_timeout:
            if a.detail is None:
                work.update(
                    device_id,
                    detail=f"not seen back on its previous version within "
                    f"{work.spec.device_timeout}",
                )
        else:
            waiting += 1
    if waiting == 0:
        work.set_status(RolloutStatus.ABORTED, work.fields["status_reason"])


def _abort(work: _Work, reason: str) -> int:
    """Roll back every moved device; return how many there were."""
    moved = 0
    for device_id, a in sorted(work.devices.items()):
        if not a.moved(work.version):
            continue
        work.update(
            device_id,
            outcome=DeviceOutcome.ROLLED_BACK,
            outcome_at=work.now,
            next_retry_at=None,
            reason="aborted",
            detail=None,
        )
        work.actions.append(RollBackDevice(device_id, a.previous_version))
        moved += 1
    # With nothing to move back there is nothing to wait for.
    work.set_status(RolloutStatus.ABORTING if moved else RolloutStatus.ABORTED, reason)
    return moved


# ----------------------------------------------------------------------------- commands


def _require(state: RolloutState, allowed: Iterable[RolloutStatus], command: str) -> None:
    if state.status not in set(allowed):
        raise RolloutStateError(f"cannot {command} a rollout that is {state.status.value}")


def pause(
    spec: RolloutSpec, state: RolloutState, *, now: datetime, reason: str = "paused by operator"
) -> StepResult:
    """Stop targeting and retrying; devices already updating finish or time out."""
    _require(
        state,
        (RolloutStatus.PENDING, RolloutStatus.RUNNING, RolloutStatus.WAITING_APPROVAL),
        "pause",
    )
    work = _Work(spec, state, now)
    work.set_status(RolloutStatus.PAUSED, reason)
    return work.result()


def resume(
    spec: RolloutSpec, state: RolloutState, *, now: datetime, override_gates: bool = False
) -> StepResult:
    """Continue a paused rollout. ``override_gates`` ignores breaches for the current phase."""
    _require(state, (RolloutStatus.PAUSED,), "resume")
    work = _Work(spec, state, now)
    if override_gates:
        work.fields["gate_override_phase"] = state.phase
    started = state.started_at is not None
    work.set_status(
        RolloutStatus.RUNNING if started else RolloutStatus.PENDING,
        "resumed by operator" + (", gates overridden for this phase" if override_gates else ""),
    )
    return work.result()


def approve(
    spec: RolloutSpec, state: RolloutState, *, now: datetime, phase: int | None = None
) -> StepResult:
    """Let the current phase move on (``phase``, when given, must be the current one).

    Approval covers the phase's own approval requirement and gates short of data; a
    breached gate still pauses.
    """
    _require(state, (RolloutStatus.RUNNING, RolloutStatus.WAITING_APPROVAL), "approve")
    if phase is not None and phase != state.phase:
        raise RolloutStateError(
            f"phase {phase + 1} cannot be approved: the rollout is in phase {state.phase + 1}"
        )
    work = _Work(spec, state, now)
    work.fields["approved_phase"] = state.phase
    work.set_status(RolloutStatus.RUNNING, f"phase {state.phase + 1} approved")
    return work.result()


def abort(
    spec: RolloutSpec, state: RolloutState, *, now: datetime, reason: str = "aborted by operator"
) -> StepResult:
    """Move every device the rollout moved back to its previous version."""
    _require(
        state,
        (
            RolloutStatus.PENDING,
            RolloutStatus.RUNNING,
            RolloutStatus.WAITING_APPROVAL,
            RolloutStatus.PAUSED,
        ),
        "abort",
    )
    work = _Work(spec, state, now)
    _abort(work, reason)
    return work.result()
