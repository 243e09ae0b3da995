"""Rollouts in the database: keyword-only functions on a session, and the adapters around them.

What this module is responsible for:

- **Rollouts** -- :func:`create_rollout` (resolving a version number or alias),
  :func:`create_agent_rollout` (a published agent release),
  :func:`list_rollouts`, :func:`get_rollout`, and the operator commands
  :func:`pause_rollout`, :func:`resume_rollout`, :func:`approve_rollout`,
  :func:`abort_rollout`, which run the pure commands of :mod:`server.rollouts.core` and
  save the state they return (:func:`save_state`).
- **Pins** -- :func:`set_pin`, :func:`clear_pin`, :func:`list_pins`.
- **What the rollouts read** -- :func:`rollout_members` (the group with each device's
  exclusion), :func:`model_variants`, :func:`update_reports` (device events since a
  time), :func:`running_versions`; and what they write about devices:
  :func:`record_device_message`, fed by the inventory's hook.
- **Issued manifests** -- :func:`record_manifest`, :func:`mark_sent`,
  :func:`latest_manifests`, :func:`unsent_manifests`, and :class:`ManifestAuthority`,
  which answers "may this device fetch this artifact" for both delivery paths.

What always holds:

- No rollout of an unevaluated or ungated model: :func:`create_rollout` refuses a
  version that is not ``ready`` or has no artifact that passed its gates and has a
  signed bundle.
- At most one active rollout of a model covers any device: :func:`create_rollout`
  refuses a rollout whose group is that of an active rollout of the same model, or
  shares a device with it now (dynamic groups are compared by the devices they select
  at that moment). The same holds for the agent: at most one active agent rollout
  covers any device (:func:`create_agent_rollout`); agent and model rollouts to the
  same devices run side by side.
- A state is written only over the revision it was computed from (:func:`save_state`
  returns ``None`` otherwise), so concurrent writers never both apply a step; the
  commands re-read and retry on such a conflict.
- A pin names a version the device can run: it is refused otherwise, with the reason.
- An artifact is authorized for a device only if the device is accepted and its latest
  issued manifest names it.

Functions that take a session flush but never commit; the caller commits.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col, select

from server.agent_releases.models import AgentRelease
from server.agent_releases.service import get_release
from server.fleet.auth import DeviceAuthenticator
from server.fleet.groups import (
    MaintenanceWindow,
    get_group,
    group_device_ids,
    parse_maintenance_window,
)
from server.fleet.inventory import DeviceMessage
from server.fleet.models import Device, DeviceGroup, DeviceStatus
from server.models import Model, ModelVersion, TargetArtifact
from server.registry import get_version
from server.rollouts.core import (
    AGENT_TARGET,
    DeviceOutcome,
    Exclusion,
    OnBreach,
    Phase,
    RetryPolicy,
    RolloutKind,
    RolloutMember,
    RolloutSpec,
    RolloutState,
    RolloutStatus,
    StepResult,
    UpdateReport,
    abort,
    approve,
    new_rollout,
    parse_phases,
    pause,
    resume,
)
from server.rollouts.desired import AgentWheel, DesiredContent, IssuedManifest, IssueReason
from server.rollouts.eligibility import (
    ArtifactVariant,
    DeviceFacts,
    ExclusionCode,
    Pin,
    exclusion_for,
    group_members,
)
from server.rollouts.errors import (
    InvalidRolloutError,
    PinNotFoundError,
    RolloutConflictError,
    RolloutNotFoundError,
)
from server.rollouts.gates import HealthThresholds
from server.rollouts.models import (
    DeviceEventRecord,
    DevicePin,
    DeviceStateReceipt,
    IssuedManifestRecord,
    RolloutRecord,
)
from shared.messages import DeviceState, Event, EventKind, InstallWindow, UpdateOutcome
from shared.topics import Channel

__all__ = [
    "ACTIVE_STATUSES",
    "LoadedRollout",
    "ManifestAuthority",
    "Members",
    "abort_rollout",
    "agent_wheels",
    "approve_rollout",
    "channel_matters",
    "clear_pin",
    "create_agent_rollout",
    "create_rollout",
    "device_message_recorder",
    "devices_by_id",
    "get_rollout",
    "issued_manifest",
    "latest_manifests",
    "list_pins",
    "list_rollouts",
    "load_rollout",
    "mark_sent",
    "model_variants",
    "pause_rollout",
    "record_device_message",
    "record_manifest",
    "resume_rollout",
    "rollout_members",
    "running_agent_releases",
    "running_versions",
    "save_state",
    "set_pin",
    "state_receipts",
    "targeted_devices",
    "unsent_manifests",
    "update_reports",
]

ACTIVE_STATUSES = tuple(s for s in RolloutStatus if not s.is_final)
"""Statuses of a rollout that may still change devices."""

_COMMAND_RETRIES = 5
_IN_CHUNK = 2000  # ids per IN (...) clause, well inside every backend's limit
_ROLLOUT_ID = re.compile(r"[^A-Za-z0-9._-]+")


def _chunks(items: Sequence[str]) -> Iterable[list[str]]:
    for start in range(0, len(items), _IN_CHUNK):
        yield list(items[start : start + _IN_CHUNK])


# ----------------------------------------------------------------------------- rollouts


@dataclass(frozen=True, slots=True)
class LoadedRollout:
    """A rollout as read at one revision: its row's values with spec and state parsed
    (plain values, usable after the session is gone)."""

    id: str
    revision: int
    group_id: int
    group_name: str
    created_at: datetime
    updated_at: datetime
    spec: RolloutSpec
    state: RolloutState

    @property
    def model_name(self) -> str:
        return self.spec.model_name

    @property
    def model_version(self) -> int:
        return self.spec.model_version

    @property
    def kind(self) -> RolloutKind:
        return self.spec.kind


def load_rollout(record: RolloutRecord) -> LoadedRollout:
    return LoadedRollout(
        id=record.id,
        revision=record.revision,
        group_id=record.group_id,
        group_name=record.group_name,
        created_at=record.created_at,
        updated_at=record.updated_at,
        spec=RolloutSpec.model_validate_json(record.spec_json),
        state=RolloutState.model_validate_json(record.state_json),
    )


def get_rollout(session: Session, *, rollout_id: str) -> LoadedRollout:
    record = session.get(RolloutRecord, rollout_id)
    if record is None:
        raise RolloutNotFoundError(f"no rollout with id {rollout_id!r}")
    return load_rollout(record)


def list_rollouts(
    session: Session,
    *,
    status: RolloutStatus | None = None,
    model_name: str | None = None,
    group: str | None = None,
    active: bool | None = None,
    kind: RolloutKind | None = None,
) -> list[LoadedRollout]:
    """Rollouts, newest first, narrowed by status, model, group, kind and whether still
    active (``model_name`` :data:`~server.rollouts.core.AGENT_TARGET`: agent rollouts)."""
    query = select(RolloutRecord)
    if kind is not None:
        query = query.where(RolloutRecord.kind == kind.value)
    if status is not None:
        query = query.where(RolloutRecord.status == status.value)
    if model_name is not None:
        query = query.where(RolloutRecord.model_name == model_name)
    if group is not None:
        query = query.where(RolloutRecord.group_name == group)
    if active is not None:
        states = [s.value for s in ACTIVE_STATUSES]
        condition = col(RolloutRecord.status).in_(states)
        query = query.where(condition if active else ~condition)
    query = query.order_by(col(RolloutRecord.created_at).desc(), col(RolloutRecord.id))
    return [load_rollout(r) for r in session.exec(query)]


def _new_rollout_id(model_name: str, version: int) -> str:
    stem = _ROLLOUT_ID.sub("-", model_name).strip("-._")[:100] or "rollout"
    return f"{stem}-v{version}-{secrets.token_hex(3)}"


def _check_deliverable(session: Session, model_name: str, version: ModelVersion) -> None:
    if version.status != "ready":
        raise RolloutConflictError(
            f"{model_name} v{version.version} is {version.status}: only a ready version "
            "(evaluated, with gated artifacts) can be rolled out"
        )
    artifacts = session.exec(
        select(TargetArtifact).where(TargetArtifact.model_version_id == version.id)
    ).all()
    if not any(a.gate_passed and a.bundle_sha256 and a.bundle_length for a in artifacts):
        raise RolloutConflictError(
            f"{model_name} v{version.version} has no artifact that passed its gates with a "
            "signed bundle: no rollout of an unevaluated or ungated model"
        )


def _check_overlap(session: Session, *, model_name: str, group: DeviceGroup) -> None:
    mine: set[str] | None = None
    what = "the agent" if model_name == AGENT_TARGET else model_name
    for other in list_rollouts(session, model_name=model_name, active=True):
        if other.group_id == group.id:
            raise RolloutConflictError(
                f"rollout {other.id} of {what} to group {group.name!r} is still "
                f"{other.state.status.value}: pause it, abort it or let it finish first"
            )
        if mine is None:
            mine = set(group_device_ids(session, group, include_unaccepted=True))
        theirs = session.get(DeviceGroup, other.group_id)
        shared = (
            set()
            if theirs is None
            else mine & set(group_device_ids(session, theirs, include_unaccepted=True))
        )
        if shared:
            listed = ", ".join(sorted(shared)[:5]) + (" ..." if len(shared) > 5 else "")
            raise RolloutConflictError(
                f"rollout {other.id} of {what} (group {other.group_name!r}) is "
                f"still {other.state.status.value} and covers {len(shared)} device(s) of "
                f"group {group.name!r}: {listed}"
            )


def _spec_fields(
    *,
    phases: str | Sequence[Phase] | None,
    approval: bool,
    wait_between_phases: timedelta | None,
    max_devices_per_minute: int | None,
    device_timeout: timedelta | None,
    retry: RetryPolicy | None,
    on_breach: OnBreach | None,
    gates: HealthThresholds | None,
    start_at: datetime | None,
) -> dict[str, Any]:
    """The spec fields every kind of rollout shares, from the operator's options."""
    chosen: tuple[Phase, ...] | None
    if phases is None:
        chosen = None
    elif isinstance(phases, str):
        chosen = parse_phases(phases)
    else:
        chosen = tuple(phases)
    if approval:
        base = chosen if chosen is not None else RolloutSpec.model_fields["phases"].default
        chosen = tuple(
            p.model_copy(update={"approval_required": index < len(base) - 1})
            for index, p in enumerate(base)
        )
    return {
        "phases": chosen,
        "wait_between_phases": wait_between_phases,
        "max_devices_per_minute": max_devices_per_minute,
        "device_timeout": device_timeout,
        "retry": retry,
        "on_breach": on_breach,
        "gates": gates,
        "start_at": start_at,
    }


def create_rollout(
    session: Session,
    *,
    model_name: str,
    version: str | int,
    group: str,
    now: datetime,
    phases: str | Sequence[Phase] | None = None,
    approval: bool = False,
    wait_between_phases: timedelta | None = None,
    max_devices_per_minute: int | None = None,
    device_timeout: timedelta | None = None,
    retry: RetryPolicy | None = None,
    on_breach: OnBreach | None = None,
    gates: HealthThresholds | None = None,
    start_at: datetime | None = None,
    rollout_id: str | None = None,
) -> LoadedRollout:
    """A new ``pending`` rollout of ``model_name`` ``version`` (number, alias or ``latest``)
    to ``group``; the engine starts it at its next step.

    ``phases``: ``"5,25,100"`` (see :func:`~server.rollouts.core.parse_phases`) or
    :class:`Phase` objects; default 5 %, 25 %, 100 %. ``approval``: every phase but the
    last waits for the operator's approval before the next one starts. Options left
    ``None`` take the spec's defaults.
    """
    found = get_version(session, model_name=model_name, version=version)
    _check_deliverable(session, model_name, found)
    device_group = get_group(session, name=group)
    _check_overlap(session, model_name=model_name, group=device_group)
    fields = _spec_fields(
        phases=phases,
        approval=approval,
        wait_between_phases=wait_between_phases,
        max_devices_per_minute=max_devices_per_minute,
        device_timeout=device_timeout,
        retry=retry,
        on_breach=on_breach,
        gates=gates,
        start_at=start_at,
    )
    fields.update(
        rollout_id=rollout_id or _new_rollout_id(model_name, found.version),
        model_name=model_name,
        model_version=found.version,
        group=device_group.name,
    )
    return _insert_rollout(
        session,
        fields,
        now=now,
        group=device_group,
        model_name=model_name,
        model_version=found.version,
        model_version_id=found.id,
    )


def _insert_rollout(
    session: Session,
    fields: dict[str, object],
    *,
    now: datetime,
    group: DeviceGroup,
    **columns: object,
) -> LoadedRollout:
    """Build the spec from ``fields`` (``None`` takes its default), refuse a taken id, and
    store the new rollout with ``columns`` (what it rolls out) beside its spec and state."""
    spec = RolloutSpec.build(**{k: v for k, v in fields.items() if v is not None})
    if session.get(RolloutRecord, spec.rollout_id) is not None:
        raise RolloutConflictError(f"a rollout with id {spec.rollout_id!r} already exists")
    state = new_rollout(spec, now=now)
    record = RolloutRecord(
        id=spec.rollout_id,
        group_name=group.name,
        group_id=group.id,
        status=state.status.value,
        phase=state.phase,
        spec_json=spec.model_dump_json(),
        state_json=state.model_dump_json(),
        revision=0,
        created_at=now,
        updated_at=now,
        **columns,
    )
    session.add(record)
    session.flush()
    return load_rollout(record)


def create_agent_rollout(
    session: Session,
    *,
    agent_version: str,
    group: str,
    now: datetime,
    health_timeout_s: int | None = None,
    phases: str | Sequence[Phase] | None = None,
    approval: bool = False,
    wait_between_phases: timedelta | None = None,
    max_devices_per_minute: int | None = None,
    device_timeout: timedelta | None = None,
    retry: RetryPolicy | None = None,
    on_breach: OnBreach | None = None,
    gates: HealthThresholds | None = None,
    start_at: datetime | None = None,
    rollout_id: str | None = None,
) -> LoadedRollout:
    """A new ``pending`` rollout of the published agent release ``agent_version`` to
    ``group``, with the same phases, gates and commands as a model rollout.

    ``health_timeout_s``: how long the new agent has to report healthy before the device
    goes back by itself (default 300 s). Refused while another active agent rollout
    covers a device of the group.
    """
    release = get_release(session, version=agent_version)
    assert release.id is not None
    device_group = get_group(session, name=group)
    _check_overlap(session, model_name=AGENT_TARGET, group=device_group)
    fields = _spec_fields(
        phases=phases,
        approval=approval,
        wait_between_phases=wait_between_phases,
        max_devices_per_minute=max_devices_per_minute,
        device_timeout=device_timeout,
        retry=retry,
        on_breach=on_breach,
        gates=gates,
        start_at=start_at,
    )
    fields.update(
        rollout_id=rollout_id
        or f"agent-{_ROLLOUT_ID.sub('-', release.version)}-{secrets.token_hex(3)}",
        kind=RolloutKind.AGENT,
        model_name=AGENT_TARGET,
        model_version=release.id,
        agent_version=release.version,
        health_timeout_s=health_timeout_s,
        group=device_group.name,
    )
    return _insert_rollout(
        session,
        fields,
        now=now,
        group=device_group,
        kind=RolloutKind.AGENT.value,
        model_name=AGENT_TARGET,
        model_version=release.id,
        model_version_id=None,
        agent_release_id=release.id,
        agent_version=release.version,
    )


def agent_wheels(session: Session) -> dict[int, AgentWheel]:
    """Every published agent release by id, as desired states name it."""
    return {
        r.id: AgentWheel(version=r.version, sha256=r.sha256, length=r.length)
        for r in session.exec(select(AgentRelease))
        if r.id is not None
    }


def save_state(
    session: Session, *, rollout: LoadedRollout, state: RolloutState, now: datetime
) -> LoadedRollout | None:
    """Write ``state`` over the revision ``rollout`` was read at; ``None`` if it moved on."""
    revision = rollout.revision + 1
    result = session.execute(
        update(RolloutRecord)
        .where(col(RolloutRecord.id) == rollout.id)
        .where(col(RolloutRecord.revision) == rollout.revision)
        .values(
            state_json=state.model_dump_json(),
            status=state.status.value,
            phase=state.phase,
            revision=revision,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    return dataclasses.replace(rollout, revision=revision, updated_at=now, state=state)


Command = Callable[[RolloutSpec, RolloutState], StepResult]


def _command(
    session: Session, rollout_id: str, command: Command, now: datetime
) -> tuple[LoadedRollout, StepResult]:
    for _ in range(_COMMAND_RETRIES):
        session.expire_all()
        rollout = get_rollout(session, rollout_id=rollout_id)
        result = command(rollout.spec, rollout.state)  # raises RolloutStateError (409)
        saved = save_state(session, rollout=rollout, state=result.state, now=now)
        if saved is not None:
            return saved, result
        session.rollback()
    raise RolloutConflictError(
        f"rollout {rollout_id} kept changing while the command ran; try again"
    )


def pause_rollout(
    session: Session, *, rollout_id: str, now: datetime, reason: str | None = None
) -> tuple[LoadedRollout, StepResult]:
    """Stop targeting and retrying; devices already updating finish or time out."""
    text = reason or "paused by operator"
    return _command(session, rollout_id, lambda s, st: pause(s, st, now=now, reason=text), now)


def resume_rollout(
    session: Session, *, rollout_id: str, now: datetime, override_gates: bool = False
) -> tuple[LoadedRollout, StepResult]:
    """Continue a paused rollout; ``override_gates`` ignores breaches for the current phase."""
    return _command(
        session,
        rollout_id,
        lambda s, st: resume(s, st, now=now, override_gates=override_gates),
        now,
    )


def approve_rollout(
    session: Session, *, rollout_id: str, now: datetime, phase: int | None = None
) -> tuple[LoadedRollout, StepResult]:
    """Let the current phase move on; ``phase`` (1-based, optional) must be the current one."""
    if phase is not None and phase < 1:
        raise InvalidRolloutError(f"phase {phase}: phases are numbered from 1")
    index = None if phase is None else phase - 1
    return _command(session, rollout_id, lambda s, st: approve(s, st, now=now, phase=index), now)


def abort_rollout(
    session: Session, *, rollout_id: str, now: datetime, reason: str | None = None
) -> tuple[LoadedRollout, StepResult]:
    """Stop the rollout and move every device it moved back to its previous version."""
    text = reason or "aborted by operator"
    return _command(session, rollout_id, lambda s, st: abort(s, st, now=now, reason=text), now)


# ----------------------------------------------------------------------------- registry reads


def model_variants(
    session: Session, *, model_name: str, model_version: int
) -> list[ArtifactVariant]:
    """Every artifact of one model version, as :class:`ArtifactVariant` (gated or not)."""
    rows = session.exec(
        select(TargetArtifact)
        .join(ModelVersion, col(ModelVersion.id) == col(TargetArtifact.model_version_id))
        .join(Model, col(Model.id) == col(ModelVersion.model_id))
        .where(Model.name == model_name)
        .where(ModelVersion.version == model_version)
        .where(ModelVersion.status == "ready")
    ).all()
    return [
        ArtifactVariant.from_target_artifact(r, model_name=model_name, model_version=model_version)
        for r in rows
    ]


# ----------------------------------------------------------------------------- members


@dataclass(frozen=True, slots=True)
class Members:
    """A rollout's group as the database holds it now."""

    group: DeviceGroup
    members: list[RolloutMember]
    devices: dict[str, Device]
    window: MaintenanceWindow | None

    @property
    def install_window(self) -> InstallWindow | None:
        """The group's maintenance window, as the install window its devices are sent."""
        if self.window is None:
            return None
        return InstallWindow(start=f"{self.window.start:%H:%M}", end=f"{self.window.end:%H:%M}")


def devices_by_id(session: Session, device_ids: Collection[str]) -> dict[str, Device]:
    found: dict[str, Device] = {}
    for chunk in _chunks(sorted(device_ids)):
        for device in session.exec(select(Device).where(col(Device.id).in_(chunk))):
            found[device.id] = device
    return found


def _facts(device: Device) -> DeviceFacts:
    return DeviceFacts(
        device_id=device.id,
        profile=device.profile,
        status=device.status,
        runtime=device.runtime_name or None,
        runtime_version=device.runtime_version or None,
        runtimes=tuple(sorted(device.runtimes.items())),
    )


def rollout_members(
    session: Session,
    *,
    spec: RolloutSpec,
    group_id: int,
    variants: Sequence[ArtifactVariant],
    latency_sla_ms: Mapping[str, float],
    also: Collection[str] = (),
) -> Members:
    """The group's accepted devices with their exclusions, and the ``Device`` rows of them
    and of ``also`` (devices the rollout targeted that may have left the group)."""
    group = session.get(DeviceGroup, group_id)
    if group is None:  # a foreign key keeps it; only a hand-edited database lacks it
        raise RolloutConflictError(f"rollout {spec.rollout_id}: its group no longer exists")
    ids = group_device_ids(session, group)
    devices = devices_by_id(session, set(ids) | set(also))
    window = (
        None
        if group.maintenance_window is None
        else parse_maintenance_window(group.maintenance_window)
    )
    if spec.kind is RolloutKind.AGENT:
        # The wheel is pure Python: every accepted device can take it, whatever its profile.
        agent_members = [
            RolloutMember(
                device_id=device.id,
                profile=device.profile,
                latency_sla_ms=latency_sla_ms.get(device.profile),
                exclusion=None
                if device.status == DeviceStatus.ACCEPTED
                else Exclusion(ExclusionCode.NOT_ACCEPTED, f"the device is {device.status}"),
            )
            for device in (devices[i] for i in ids if i in devices)
        ]
        return Members(group=group, members=agent_members, devices=devices, window=window)
    pins = [
        Pin(p.device_id, p.model_name, p.model_version)
        for p in list_pins(session, model_name=spec.model_name, device_ids=ids)
    ]
    members = group_members(
        (_facts(devices[i]) for i in ids if i in devices),
        model_name=spec.model_name,
        model_version=spec.model_version,
        variants=variants,
        pins=pins,
        latency_sla_ms=latency_sla_ms,
    )
    return Members(group=group, members=members, devices=devices, window=window)


def running_versions(devices: Iterable[Device], model_name: str) -> dict[str, int | None]:
    """The version of ``model_name`` each device's retained state says it runs."""
    versions: dict[str, int | None] = {}
    for device in devices:
        versions[device.id] = next(
            (int(m["model_version"]) for m in device.models if m.get("model_name") == model_name),
            None,
        )
    return versions


def running_agent_releases(
    devices: Iterable[Device],
    release_ids: Mapping[str, int],
    *,
    confirm: Mapping[str, str] | None = None,
) -> dict[str, int | None]:
    """The release id of the agent each device's retained state says it runs (None: a
    version never published).

    ``confirm`` maps device ids to the version an agent rollout is moving them to: such
    a device counts as running it only once its ``agent_update`` says that version was
    ``activated`` -- a new agent on probation, not yet healthy, does not count.
    """
    confirm = confirm or {}
    found: dict[str, int | None] = {}
    for device in devices:
        version = device.agent_version
        wanted = confirm.get(device.id)
        if wanted is not None and version == wanted:
            update = device.agent_update or {}
            if update.get("version") != wanted or update.get("outcome") != UpdateOutcome.ACTIVATED:
                found[device.id] = None
                continue
        found[device.id] = release_ids.get(version)
    return found


def state_receipts(
    session: Session, *, device_ids: Collection[str]
) -> dict[str, DeviceStateReceipt]:
    found: dict[str, DeviceStateReceipt] = {}
    for chunk in _chunks(sorted(device_ids)):
        query = select(DeviceStateReceipt).where(col(DeviceStateReceipt.device_id).in_(chunk))
        found.update((r.device_id, r) for r in session.exec(query))
    return found


def update_reports(
    session: Session, *, device_ids: Collection[str], model_name: str, since: datetime
) -> dict[str, list[UpdateReport]]:
    """Update events of ``device_ids`` about ``model_name`` (or no model), received since
    ``since`` (server time), oldest first, by device. ``model_name``
    :data:`~server.rollouts.core.AGENT_TARGET`: the events of no model (agent updates
    and refused manifests)."""
    reports: dict[str, list[UpdateReport]] = {}
    about: ColumnElement[bool] = col(DeviceEventRecord.model_name).is_(None)
    if model_name != AGENT_TARGET:
        about = about | (col(DeviceEventRecord.model_name) == model_name)
    for chunk in _chunks(sorted(device_ids)):
        query = (
            select(DeviceEventRecord)
            .where(col(DeviceEventRecord.device_id).in_(chunk))
            .where(col(DeviceEventRecord.received_at) >= since)
            .where(about)
            .order_by(col(DeviceEventRecord.received_at), col(DeviceEventRecord.id))
        )
        for row in session.exec(query):
            try:
                kind = EventKind(row.kind)
            except ValueError:
                continue  # a kind from a newer agent: not one the rollout judges
            reports.setdefault(row.device_id, []).append(
                UpdateReport(
                    kind=kind,
                    received_at=row.received_at,
                    model_name=row.model_name,
                    model_version=row.model_version,
                    reason=row.reason,
                    detail=row.detail,
                    agent_version=row.agent_version,
                )
            )
    return reports


# ----------------------------------------------------------------------------- device messages


def _insert_ignore(session: Session, table: Any, row: dict[str, Any], keys: list[str]) -> bool:
    """Insert ``row`` unless its ``keys`` exist; True if it was inserted (rowcount is not
    reliable across drivers for ``ON CONFLICT DO NOTHING``: ``RETURNING`` is)."""
    module = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    statement = (
        module.insert(table)
        .values(**row)
        .on_conflict_do_nothing(index_elements=keys)
        .returning(*(table.c[k] for k in keys))
    )
    return session.execute(statement).first() is not None


def record_device_message(session: Session, *, message: DeviceMessage) -> bool:
    """Log an update event (once per ``event_id``) or a state receipt; True if it was new."""
    body = message.message
    if isinstance(body, Event):
        return _insert_ignore(
            session,
            DeviceEventRecord.__table__,  # type: ignore[attr-defined]
            {
                "event_id": body.event_id,
                "device_id": body.device_id,
                "kind": body.kind.value,
                "at": body.at,
                "received_at": message.received_at,
                "manifest_version": body.manifest_version,
                "rollout_id": body.rollout_id,
                "model_name": body.model_name,
                "model_version": body.model_version,
                "agent_version": body.agent_version,
                "sha256": body.sha256,
                "reason": body.reason,
                "detail": body.detail,
            },
            ["event_id"],
        )
    if isinstance(body, DeviceState):
        # Insert, or move forward only: several replicas may record the same report.
        row = {
            "device_id": body.device_id,
            "reported_at": body.reported_at,
            "received_at": message.received_at,
        }
        table = DeviceStateReceipt.__table__  # type: ignore[attr-defined]
        if _insert_ignore(session, table, row, ["device_id"]):
            return True
        result = session.execute(
            update(DeviceStateReceipt)
            .where(col(DeviceStateReceipt.device_id) == body.device_id)
            .where(col(DeviceStateReceipt.reported_at) < body.reported_at)
            .values(reported_at=body.reported_at, received_at=message.received_at)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]
    return False


# ----------------------------------------------------------------------------- pins


def list_pins(
    session: Session,
    *,
    device_id: str | None = None,
    model_name: str | None = None,
    device_ids: Collection[str] | None = None,
) -> list[DevicePin]:
    query = select(DevicePin)
    if device_id is not None:
        query = query.where(DevicePin.device_id == device_id)
    if model_name is not None:
        query = query.where(DevicePin.model_name == model_name)
    if device_ids is None:
        return list(session.exec(query.order_by(col(DevicePin.device_id))))
    found: list[DevicePin] = []
    for chunk in _chunks(sorted(device_ids)):
        found.extend(session.exec(query.where(col(DevicePin.device_id).in_(chunk))))
    return found


def set_pin(
    session: Session,
    *,
    device_id: str,
    model_name: str,
    version: str | int,
    note: str = "",
) -> DevicePin:
    """Hold ``device_id`` on ``model_name`` ``version`` (number or alias); a pin wins over
    every rollout. Refused when the device could not run that version."""
    device = session.get(Device, device_id)
    if device is None:
        raise PinNotFoundError(f"no device with id {device_id!r}")
    found = get_version(session, model_name=model_name, version=version)
    _check_deliverable(session, model_name, found)
    variants = model_variants(session, model_name=model_name, model_version=found.version)
    exclusion = exclusion_for(
        _facts(device), model_name=model_name, model_version=found.version, variants=variants
    )
    if exclusion is not None and exclusion.code != ExclusionCode.PINNED:
        raise RolloutConflictError(
            f"cannot pin {device_id} to {model_name} v{found.version}: "
            f"{exclusion.code} ({exclusion.detail})"
        )
    pin = session.get(DevicePin, (device_id, model_name))
    if pin is None:
        pin = DevicePin(
            device_id=device_id,
            model_name=model_name,
            model_version=found.version,
            model_version_id=found.id,  # type: ignore[arg-type]
            note=note,
        )
    else:
        pin.model_version = found.version
        pin.model_version_id = found.id  # type: ignore[assignment]
        pin.note = note
    session.add(pin)
    session.flush()
    return pin


def clear_pin(session: Session, *, device_id: str, model_name: str) -> None:
    pin = session.get(DevicePin, (device_id, model_name))
    if pin is None:
        raise PinNotFoundError(f"device {device_id!r} has no pin on model {model_name!r}")
    session.delete(pin)
    session.flush()


# ----------------------------------------------------------------------------- manifests


def _manifest_row(record: IssuedManifestRecord) -> IssuedManifest:
    return IssuedManifest(
        device_id=record.device_id,
        manifest_version=record.manifest_version,
        content_digest=record.content_digest,
        keyring_version=record.keyring_version,
        issued_at=record.issued_at,
        expires_at=record.expires_at,
        artifacts=frozenset(json.loads(record.artifacts_json)),
        payload=bytes(record.payload),
    )


def issued_manifest(record: IssuedManifestRecord | None) -> IssuedManifest | None:
    """The :class:`IssuedManifest` a stored row holds (``None`` stays ``None``)."""
    return None if record is None else _manifest_row(record)


def record_manifest(
    session: Session,
    *,
    manifest: IssuedManifest,
    content: DesiredContent,
    reason: IssueReason | None,
) -> IssuedManifestRecord:
    """Persist a manifest before it is published (the unique key refuses a reused version)."""
    row = IssuedManifestRecord(
        device_id=manifest.device_id,
        manifest_version=manifest.manifest_version,
        rollout_id=content.rollout_id,
        reason=(reason or IssueReason.FIRST).value,
        content_digest=manifest.content_digest,
        keyring_version=manifest.keyring_version,
        deployments_json=json.dumps(
            [d.model_dump(mode="json") for d in content.deployments], sort_keys=True
        ),
        artifacts_json=json.dumps(sorted(manifest.artifacts)),
        agent_json=None
        if content.agent is None
        else json.dumps(content.agent.model_dump(mode="json"), sort_keys=True),
        payload=manifest.payload,
        issued_at=manifest.issued_at,
        expires_at=manifest.expires_at,
    )
    session.add(row)
    session.flush()
    return row


def mark_sent(session: Session, *, device_id: str, manifest_version: int, at: datetime) -> None:
    session.execute(
        update(IssuedManifestRecord)
        .where(col(IssuedManifestRecord.device_id) == device_id)
        .where(col(IssuedManifestRecord.manifest_version) == manifest_version)
        .values(sent_at=at)
        .execution_options(synchronize_session=False)
    )


def latest_manifests(
    session: Session, *, device_ids: Collection[str] | None = None
) -> dict[str, IssuedManifestRecord]:
    """Each device's latest issued manifest (all devices that have one when ``None``)."""
    latest = (
        select(
            col(IssuedManifestRecord.device_id).label("device_id"),
            func.max(IssuedManifestRecord.manifest_version).label("manifest_version"),
        )
        .group_by(col(IssuedManifestRecord.device_id))
        .subquery()
    )
    query = select(IssuedManifestRecord).join(
        latest,
        (col(IssuedManifestRecord.device_id) == latest.c.device_id)
        & (col(IssuedManifestRecord.manifest_version) == latest.c.manifest_version),
    )
    if device_ids is None:
        return {r.device_id: r for r in session.exec(query)}
    found: dict[str, IssuedManifestRecord] = {}
    for chunk in _chunks(sorted(device_ids)):
        rows = session.exec(query.where(col(IssuedManifestRecord.device_id).in_(chunk)))
        found.update((r.device_id, r) for r in rows)
    return found


def unsent_manifests(session: Session) -> list[IssuedManifestRecord]:
    """Latest manifests the broker never acknowledged (a publish failed after recording)."""
    return [r for r in latest_manifests(session).values() if r.sent_at is None]


class ManifestAuthority:
    """Who may fetch what: accepted devices with their credentials, and only the artifacts
    their latest issued manifest names -- the ``artifact_authority`` of the HTTP range
    endpoint, and (:meth:`allowed`) the block server's ``authorize``.

    A "yes" is remembered for ``cache_seconds`` (block requests come in bursts); a "no"
    is asked of the database again every time, so an artifact a new manifest names is
    served at once, and one a manifest no longer names stops within ``cache_seconds``.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        cache_seconds: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self._authenticator = DeviceAuthenticator(engine)
        self._cache_seconds = cache_seconds
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}

    def authenticate(self, device_id: str, password: str) -> bool:
        return self._authenticator.authenticate(device_id, password)

    def allowed(self, device_id: str, sha256: str) -> bool:
        now = self._monotonic()
        with self._lock:
            cached = self._cache.get(device_id)
        if cached is not None and cached[0] > now and sha256 in cached[1]:
            return True
        with Session(self.engine) as session:
            device = session.get(Device, device_id)
            if device is None or device.status != DeviceStatus.ACCEPTED:
                return False
            record = latest_manifests(session, device_ids=[device_id]).get(device_id)
        artifacts = frozenset() if record is None else frozenset(json.loads(record.artifacts_json))
        with self._lock:
            self._cache[device_id] = (now + self._cache_seconds, artifacts)
        return sha256 in artifacts

    def forget(self, device_id: str) -> None:
        with self._lock:
            self._cache.pop(device_id, None)


def targeted_devices(state: RolloutState) -> set[str]:
    """Devices a rollout has claimed (targeted at some point), whatever their outcome."""
    return {
        device_id
        for device_id, a in state.devices.items()
        if a.targeted and a.outcome is not DeviceOutcome.EXCLUDED
    }


def channel_matters(message: DeviceMessage) -> bool:
    """Whether a device message can change a rollout's next step (state or events)."""
    return message.channel in (Channel.STATE, Channel.EVENTS)


def device_message_recorder(engine: Engine) -> Callable[[DeviceMessage], None]:
    """An inventory hook that logs each update event and state receipt in its own
    transaction (:func:`record_device_message`)."""

    def record(message: DeviceMessage) -> None:
        if not channel_matters(message):
            return
        with Session(engine) as session:
            record_device_message(session, message=message)
            session.commit()

    return record
