"""Rollouts: create, list, show (progress per phase, gates, every device's outcome and every
exclusion with its reason), pause, resume, approve, abort -- and per-device pins.

A rollout moves a model version (``model`` + ``version``) or, with ``agent_version``, a
published agent release (``kind`` agent) -- same phases, gates and commands.

Phases are numbered from 1 here, as operators count them. A rollout is created
``pending``; the rollout engine starts it at its next step and the commands wake it, so
their effect on devices follows at once. An unknown rollout, device, model, version or
group answers 404; a rollout the registry or the fleet refuses (an unevaluated or
ungated version, an overlapping active rollout of the same model) and a command the
rollout's status does not allow, 409; a spec that cannot work, 422 naming the field.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response, status
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue, model_validator
from sqlmodel import Session

from server.api.deps import NowDep, SessionDep
from server.auth import audit
from server.auth.deps import PrincipalDep
from server.auth.models import Principal
from server.fleet.devices import get_device
from server.fleet.groups import group_device_ids
from server.fleet.models import DeviceGroup
from server.rollouts import service
from server.rollouts.core import (
    Assignment,
    DeviceOutcome,
    OnBreach,
    Phase,
    RetryPolicy,
    RolloutKind,
    RolloutSpec,
    RolloutStatus,
    cumulative_targets,
)
from server.rollouts.gates import GateName, GateStatus, HealthThresholds
from server.rollouts.models import DevicePin
from server.rollouts.service import agent_wheels

__all__ = [
    "AbortRequest",
    "ApproveRequest",
    "DeviceOutcomeView",
    "GateView",
    "PauseRequest",
    "PhaseProgress",
    "PinPublic",
    "PinSet",
    "ResumeRequest",
    "RolloutCreate",
    "RolloutDetail",
    "RolloutPublic",
    "pins_router",
    "router",
]

router = APIRouter(prefix="/rollouts", tags=["rollouts"])
pins_router = APIRouter(prefix="/devices", tags=["pins"])


# ----------------------------------------------------------------------------- bodies


class RolloutCreate(BaseModel):
    """What to roll out where, and how carefully (options left out take the defaults)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=128, description="model name")
    version: int | str | None = Field(
        None, description="version number, alias (e.g. production) or 'latest'"
    )
    agent_version: str | None = Field(
        None, max_length=64, description="roll out this published agent release instead of a model"
    )
    health_timeout_s: int | None = Field(
        None,
        ge=10,
        le=86_400,
        description="agent rollouts: seconds the new agent has to report healthy",
    )
    group: str = Field(max_length=64, description="device group (static or dynamic)")
    phases: str | list[Phase] = Field(
        "5,25,100",
        description="cumulative waves: '5,25,100' (percent), '3dev,50,100' (a count first), "
        "or phase objects",
    )
    approval: bool = Field(
        False, description="every phase but the last waits for the operator's approval"
    )
    wait_between_phases: timedelta | None = Field(
        None, description="observation time after a phase settled (seconds or ISO 8601)"
    )
    max_devices_per_minute: int | None = Field(None, ge=1, description="targeting rate limit")
    device_timeout: timedelta | None = Field(
        None, description="a device silent this long after targeting counts as failed"
    )
    retry: RetryPolicy | None = None
    on_breach: OnBreach | None = Field(None, description="pause (default) or abort")
    gates: HealthThresholds | None = None
    start_at: AwareDatetime | None = Field(None, description="do not start before this time")
    id: str | None = Field(
        None, max_length=128, description="rollout id; default <model>-v<version>-<random>"
    )

    @model_validator(mode="after")
    def _one_kind(self) -> RolloutCreate:
        if self.agent_version is not None:
            if self.model is not None or self.version is not None:
                raise ValueError("give either model and version, or agent_version, not both")
        elif self.model is None or self.version is None:
            raise ValueError("give model and version (or agent_version for an agent rollout)")
        elif self.health_timeout_s is not None:
            raise ValueError("health_timeout_s is for agent rollouts")
        return self


class PauseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, max_length=500)


class ResumeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    override_gates: bool = Field(False, description="ignore breached gates for the current phase")


class ApproveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    phase: int | None = Field(None, ge=1, description="the phase approved (must be the current)")


class AbortRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, max_length=500)


class PinSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int | str = Field(description="version number or alias")
    note: str = Field("", max_length=2000)


# ----------------------------------------------------------------------------- views


class PhaseProgress(BaseModel):
    phase: int = Field(description="1-based")
    size: str = Field(description="as written: '5%' or '3 devices'")
    target: int = Field(description="cumulative devices this phase covers, of the eligible now")
    state: Literal["done", "current", "upcoming"]
    approval_required: bool
    wait_seconds: float
    targeted: int = Field(description="devices this phase targeted")
    activated: int
    failed: int
    timed_out: int
    rolled_back: int
    in_progress: int
    retry_pending: int


class GateView(BaseModel):
    gate: GateName
    status: GateStatus
    value: float | None
    threshold: float
    summary: str
    evidence: dict[str, JsonValue]


class DeviceOutcomeView(BaseModel):
    device_id: str
    profile: str
    state: str = Field(
        description="in_progress, waiting_for_window (staged, it activates in its group's "
        "maintenance window), retry_pending, activated, failed, timed_out, rolled_back, excluded"
    )
    phase: int | None = Field(description="1-based phase that targeted it")
    attempts: int
    previous_version: int | None = Field(
        description="the model version it ran before (agent rollouts: the release id)"
    )
    previous_agent_version: str | None = Field(
        None, description="agent rollouts: the agent version it ran before (if published)"
    )
    targeted_at: datetime | None
    outcome_at: datetime | None
    next_retry_at: datetime | None
    confirmed_at: datetime | None
    reason: str | None = Field(description="a short code: exclusion, failure or rollback")
    detail: str | None


class RolloutPublic(BaseModel):
    id: str
    kind: RolloutKind = Field(description="model or agent")
    model_name: str | None = Field(description="the model (None for an agent rollout)")
    model_version: int | None
    agent_version: str | None = Field(description="the agent release (agent rollouts)")
    group: str
    status: RolloutStatus
    status_reason: str | None
    phase: int = Field(description="current phase, 1-based")
    phases: int
    counts: dict[str, int] = Field(
        description="devices per outcome, in_progress, retry_pending, and waiting_for_window "
        "(those of in_progress staged and waiting for their maintenance window)"
    )
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    revision: int


class RolloutDetail(RolloutPublic):
    spec: RolloutSpec
    group_members: int = Field(description="accepted devices in the group now")
    eligible: int = Field(description="members not excluded (the phases' percentages apply)")
    phase_progress: list[PhaseProgress]
    gates: list[GateView] = Field(description="the last gate evaluation, values vs thresholds")
    devices: list[DeviceOutcomeView] = Field(description="every device the rollout targeted")
    excluded: list[DeviceOutcomeView] = Field(description="members it cannot target, and why")


class PinPublic(BaseModel):
    device_id: str
    model_name: str
    model_version: int
    note: str
    created_at: datetime

    @classmethod
    def of(cls, pin: DevicePin) -> PinPublic:
        return cls(
            device_id=pin.device_id,
            model_name=pin.model_name,
            model_version=pin.model_version,
            note=pin.note,
            created_at=pin.created_at,
        )


def _public(rollout: service.LoadedRollout) -> RolloutPublic:
    state = rollout.state
    agent = rollout.kind is RolloutKind.AGENT
    return RolloutPublic(
        id=rollout.id,
        kind=rollout.kind,
        model_name=None if agent else rollout.model_name,
        model_version=None if agent else rollout.model_version,
        agent_version=rollout.spec.agent_version,
        group=rollout.group_name,
        status=state.status,
        status_reason=state.status_reason,
        phase=state.phase + 1,
        phases=len(rollout.spec.phases),
        counts=state.counts(),
        created_at=rollout.created_at,
        updated_at=rollout.updated_at,
        started_at=state.started_at,
        finished_at=state.finished_at,
        revision=rollout.revision,
    )


def _device_view(a: Assignment, agent_versions: dict[int, str] | None = None) -> DeviceOutcomeView:
    if a.outcome is not None:
        shown = a.outcome.value
    elif a.next_retry_at is not None:
        shown = "retry_pending"
    elif a.waiting_for_window:
        shown = "waiting_for_window"
    else:
        shown = "in_progress"
    return DeviceOutcomeView(
        device_id=a.device_id,
        profile=a.profile,
        state=shown,
        phase=None if a.phase is None else a.phase + 1,
        attempts=a.attempts,
        previous_version=a.previous_version,
        previous_agent_version=None
        if agent_versions is None or a.previous_version is None
        else agent_versions.get(a.previous_version),
        targeted_at=a.targeted_at,
        outcome_at=a.outcome_at,
        next_retry_at=a.next_retry_at,
        confirmed_at=a.confirmed_at,
        reason=a.reason,
        detail=a.detail,
    )


def _detail(session: Session, rollout: service.LoadedRollout) -> RolloutDetail:
    spec, state = rollout.spec, rollout.state
    group = session.get(DeviceGroup, rollout.group_id)
    members = set() if group is None else set(group_device_ids(session, group))
    excluded = [a for a in state.devices.values() if a.outcome is DeviceOutcome.EXCLUDED]
    eligible = len(members - {a.device_id for a in excluded})
    targets = cumulative_targets(spec, eligible)
    progress = []
    for index, phase in enumerate(spec.phases):
        mine = [a for a in state.devices.values() if a.targeted and a.phase == index]
        tally = {o: sum(1 for a in mine if a.outcome is o) for o in DeviceOutcome}
        if state.status is RolloutStatus.COMPLETED or index < state.phase:
            where: Literal["done", "current", "upcoming"] = "done"
        elif index == state.phase:
            where = "current"
        else:
            where = "upcoming"
        progress.append(
            PhaseProgress(
                phase=index + 1,
                size=phase.describe(),
                target=targets[index],
                state=where,
                approval_required=phase.approval_required,
                wait_seconds=spec.phase_wait(index).total_seconds(),
                targeted=len(mine),
                activated=tally[DeviceOutcome.ACTIVATED],
                failed=tally[DeviceOutcome.FAILED],
                timed_out=tally[DeviceOutcome.TIMED_OUT],
                rolled_back=tally[DeviceOutcome.ROLLED_BACK],
                in_progress=sum(1 for a in mine if a.in_progress),
                retry_pending=sum(
                    1 for a in mine if a.outcome is None and a.next_retry_at is not None
                ),
            )
        )
    report = state.gate_report
    gates = (
        []
        if report is None
        else [
            GateView(
                gate=r.gate,
                status=r.status,
                value=r.value,
                threshold=r.threshold,
                summary=r.summary,
                evidence=r.evidence,
            )
            for r in report.results
        ]
    )
    targeted = sorted((a for a in state.devices.values() if a.targeted), key=lambda a: a.device_id)
    versions = (
        {i: w.version for i, w in agent_wheels(session).items()}
        if spec.kind is RolloutKind.AGENT
        else None
    )
    return RolloutDetail(
        **_public(rollout).model_dump(),
        spec=spec,
        group_members=len(members),
        eligible=eligible,
        phase_progress=progress,
        gates=gates,
        devices=[_device_view(a, versions) for a in targeted],
        excluded=[_device_view(a, versions) for a in sorted(excluded, key=lambda a: a.device_id)],
    )


def _wake(request: Request, device_ids: list[str] | None = None) -> None:
    engine = getattr(request.app.state, "rollout_engine", None)
    if engine is None:
        return  # an API-only replica: the engine elsewhere sees the new revision
    if device_ids:
        engine.request(device_ids)
    else:
        engine.wake()


# ----------------------------------------------------------------------------- rollouts


@router.post(
    "",
    response_model=RolloutDetail,
    status_code=status.HTTP_201_CREATED,
    summary="Create a rollout of a model version (number or alias), or of an agent release, "
    "to a device group",
    responses={
        404: {"description": "unknown model, version, alias, agent release or group"},
        409: {"description": "version not ready or not gated; an overlapping active rollout"},
        422: {"description": "a spec that cannot work (the field is named)"},
    },
)
def create_rollout(
    body: RolloutCreate, session: SessionDep, now: NowDep, request: Request, who: PrincipalDep
) -> RolloutDetail:
    options: dict[str, Any] = {
        "group": body.group,
        "now": now,
        "phases": body.phases,
        "approval": body.approval,
        "wait_between_phases": body.wait_between_phases,
        "max_devices_per_minute": body.max_devices_per_minute,
        "device_timeout": body.device_timeout,
        "retry": body.retry,
        "on_breach": body.on_breach,
        "gates": body.gates,
        "start_at": body.start_at,
        "rollout_id": body.id,
    }
    if body.agent_version is not None:
        created = service.create_agent_rollout(
            session,
            agent_version=body.agent_version,
            health_timeout_s=body.health_timeout_s,
            **options,
        )
        detail: dict[str, object] = {"agent_version": body.agent_version, "group": body.group}
    else:
        assert body.model is not None and body.version is not None
        created = service.create_rollout(
            session,
            model_name=body.model,
            version=body.version,
            **options,
        )
        detail = {"model": body.model, "version": body.version, "group": body.group}
    audit.record(
        session,
        actor=who.name,
        action="rollout.create",
        target=f"rollout:{created.id}",
        detail=detail,
        at=now,
    )
    session.commit()
    _wake(request)
    return _detail(session, created)


@router.get("", response_model=list[RolloutPublic], summary="List rollouts, newest first")
def list_rollouts(
    session: SessionDep,
    status_: Annotated[RolloutStatus | None, Query(alias="status")] = None,
    model: Annotated[str | None, Query(description="model name")] = None,
    kind: Annotated[RolloutKind | None, Query(description="model or agent")] = None,
    group: Annotated[str | None, Query(description="device group name")] = None,
    active: Annotated[
        bool | None, Query(description="true: not yet completed or aborted; false: finished")
    ] = None,
) -> list[RolloutPublic]:
    found = service.list_rollouts(
        session, status=status_, model_name=model, group=group, active=active, kind=kind
    )
    return [_public(r) for r in found]


@router.get(
    "/{rollout_id}",
    response_model=RolloutDetail,
    summary="A rollout: phases, gates vs thresholds, every device's outcome and exclusion",
)
def show_rollout(rollout_id: str, session: SessionDep) -> RolloutDetail:
    return _detail(session, service.get_rollout(session, rollout_id=rollout_id))


def _after_command(
    session: Session,
    request: Request,
    rollout: service.LoadedRollout,
    *,
    who: Principal,
    action: str,
    now: datetime,
    detail: dict[str, object],
) -> RolloutDetail:
    audit.record(
        session,
        actor=who.name,
        action=f"rollout.{action}",
        target=f"rollout:{rollout.id}",
        detail=detail,
        at=now,
    )
    session.commit()
    _wake(request)
    return _detail(session, rollout)


@router.post(
    "/{rollout_id}/pause",
    response_model=RolloutDetail,
    summary="Pause: no new targets or retries; devices already updating finish",
)
def pause_rollout(
    rollout_id: str,
    session: SessionDep,
    now: NowDep,
    request: Request,
    who: PrincipalDep,
    body: PauseRequest | None = None,
) -> RolloutDetail:
    reason = None if body is None else body.reason
    rollout, _ = service.pause_rollout(session, rollout_id=rollout_id, now=now, reason=reason)
    return _after_command(
        session, request, rollout, who=who, action="pause", now=now, detail={"reason": reason}
    )


@router.post(
    "/{rollout_id}/resume",
    response_model=RolloutDetail,
    summary="Resume a paused rollout (optionally overriding breached gates for this phase)",
)
def resume_rollout(
    rollout_id: str,
    session: SessionDep,
    now: NowDep,
    request: Request,
    who: PrincipalDep,
    body: ResumeRequest | None = None,
) -> RolloutDetail:
    override = False if body is None else body.override_gates
    rollout, _ = service.resume_rollout(
        session, rollout_id=rollout_id, now=now, override_gates=override
    )
    return _after_command(
        session,
        request,
        rollout,
        who=who,
        action="resume",
        now=now,
        detail={"override_gates": override},
    )


@router.post(
    "/{rollout_id}/approve",
    response_model=RolloutDetail,
    summary="Approve the current phase so the rollout moves on",
)
def approve_rollout(
    rollout_id: str,
    session: SessionDep,
    now: NowDep,
    request: Request,
    who: PrincipalDep,
    body: ApproveRequest | None = None,
) -> RolloutDetail:
    phase = None if body is None else body.phase
    rollout, _ = service.approve_rollout(session, rollout_id=rollout_id, now=now, phase=phase)
    return _after_command(
        session, request, rollout, who=who, action="approve", now=now, detail={"phase": phase}
    )


@router.post(
    "/{rollout_id}/abort",
    response_model=RolloutDetail,
    summary="Abort: every device the rollout moved goes back to its previous version",
)
def abort_rollout(
    rollout_id: str,
    session: SessionDep,
    now: NowDep,
    request: Request,
    who: PrincipalDep,
    body: AbortRequest | None = None,
) -> RolloutDetail:
    reason = None if body is None else body.reason
    rollout, _ = service.abort_rollout(session, rollout_id=rollout_id, now=now, reason=reason)
    return _after_command(
        session, request, rollout, who=who, action="abort", now=now, detail={"reason": reason}
    )


# ----------------------------------------------------------------------------- pins


@pins_router.get("/{device_id}/pins", response_model=list[PinPublic], summary="A device's pins")
def list_pins(device_id: str, session: SessionDep) -> list[PinPublic]:
    get_device(session, device_id=device_id)
    return [PinPublic.of(p) for p in service.list_pins(session, device_id=device_id)]


@pins_router.put(
    "/{device_id}/pins/{model_name}",
    response_model=PinPublic,
    summary="Pin a device to a version of a model (a pin wins over every rollout)",
    responses={409: {"description": "the device cannot run that version (the reason is named)"}},
)
def set_pin(
    device_id: str,
    model_name: str,
    body: PinSet,
    session: SessionDep,
    request: Request,
    who: PrincipalDep,
    now: NowDep,
) -> PinPublic:
    pin = service.set_pin(
        session, device_id=device_id, model_name=model_name, version=body.version, note=body.note
    )
    audit.record(
        session,
        actor=who.name,
        action="pin.set",
        target=f"device:{device_id}",
        detail={"model": model_name, "version": body.version, "note": body.note},
        at=now,
    )
    session.commit()
    _wake(request, [device_id])
    return PinPublic.of(pin)


@pins_router.delete(
    "/{device_id}/pins/{model_name}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Remove a pin; the device follows the rollouts again",
)
def clear_pin(
    device_id: str,
    model_name: str,
    session: SessionDep,
    request: Request,
    who: PrincipalDep,
    now: NowDep,
) -> Response:
    service.clear_pin(session, device_id=device_id, model_name=model_name)
    audit.record(
        session,
        actor=who.name,
        action="pin.clear",
        target=f"device:{device_id}",
        detail={"model": model_name},
        at=now,
    )
    session.commit()
    _wake(request, [device_id])
    return Response(status_code=status.HTTP_204_NO_CONTENT)
