"""Device groups: static (explicit members) and dynamic (a selector over the inventory).

What always holds:

- Membership is computed when it is asked for, never cached: a device that enrolls,
  is accepted or changes its tags later is a member of every group whose rule it
  meets from that moment on (the rollout engine asks :func:`group_device_ids` on
  every tick).
- Only *accepted* devices are members (:func:`members`, :func:`group_device_ids`);
  ``include_unaccepted=True`` is for showing the operator what a rule matches.
- A dynamic group's selector parses (:mod:`server.fleet.selectors`); a static group
  has none. Members are added to or removed from static groups only.
- A maintenance window is ``HH:MM-HH:MM`` in UTC, may wrap midnight, and is never
  empty (start != end).

Functions that take a session flush but never commit; the caller commits.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from server.errors import ConflictError, InvalidInputError, NotFoundError
from server.fleet.models import (
    Device,
    DeviceGroup,
    DeviceStatus,
    GroupKind,
    GroupMember,
    device_facts,
)
from server.fleet.selectors import Selector, parse

__all__ = [
    "MaintenanceWindow",
    "add_members",
    "check_group_name",
    "create_group",
    "delete_group",
    "device_groups",
    "get_group",
    "group_device_ids",
    "list_groups",
    "members",
    "parse_maintenance_window",
    "remove_members",
    "static_member_ids",
    "update_group",
]

_GROUP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_WINDOW = re.compile(r"(\d{2}):(\d{2})-(\d{2}):(\d{2})")
_FACT_COLUMNS = (
    Device.id,
    Device.profile,
    Device.arch,
    Device.runtime_name,
    Device.runtime_version,
    Device.agent_version,
    Device.status,
    Device.online,
    Device.tags_json,
)


def check_group_name(name: str) -> str:
    if not _GROUP_NAME.fullmatch(name):
        raise InvalidInputError(
            f"invalid group name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


# ----------------------------------------------------------------------------- windows


@dataclass(frozen=True, slots=True)
class MaintenanceWindow:
    """A daily window in UTC; ``end`` before ``start`` means it wraps midnight."""

    start: time
    end: time

    def contains(self, now: datetime) -> bool:
        """Whether ``now`` (an aware datetime) falls in the window; the end is excluded."""
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        moment = now.astimezone(UTC).time().replace(tzinfo=None)
        if self.start < self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


def parse_maintenance_window(text: str) -> MaintenanceWindow:
    """``"02:00-04:00"`` -> :class:`MaintenanceWindow`, or :class:`InvalidInputError`."""
    match = _WINDOW.fullmatch(text.strip())
    problem = None
    if match is None:
        problem = "use HH:MM-HH:MM (UTC), e.g. 02:00-04:00"
    else:
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        if max(h1, h2) > 23 or max(m1, m2) > 59:
            problem = "hours are 00-23 and minutes 00-59"
        elif (h1, m1) == (h2, m2):
            problem = "start and end are the same: the window would be empty"
    if problem is not None or match is None:
        raise InvalidInputError(f"invalid maintenance window {text!r}: {problem}")
    return MaintenanceWindow(time(h1, m1), time(h2, m2))


# ----------------------------------------------------------------------------- membership


def _selector(group: DeviceGroup) -> Selector:
    if group.selector is None:
        raise InvalidInputError(f"dynamic group {group.name!r} has no selector")
    return parse(group.selector)


def members(
    group: DeviceGroup,
    devices: Iterable[Device],
    *,
    static_member_ids: Collection[str] = (),
    include_unaccepted: bool = False,
) -> list[Device]:
    """The devices of ``devices`` that belong to ``group``, sorted by id (pure).

    A static group's rule is ``static_member_ids`` (its ``group_members`` rows); a
    dynamic group's is its selector over :meth:`Device.facts`. Unless
    ``include_unaccepted``, only accepted devices count.
    """
    wanted = set(static_member_ids)
    selector = _selector(group) if group.kind == GroupKind.DYNAMIC else None
    found = []
    for device in devices:
        if not include_unaccepted and device.status != DeviceStatus.ACCEPTED:
            continue
        if selector.matches(device.facts()) if selector else device.id in wanted:
            found.append(device)
    return sorted(found, key=lambda d: d.id)


def static_member_ids(session: Session, group: DeviceGroup) -> list[str]:
    """The explicit members of a static group (any status), sorted."""
    return sorted(
        session.exec(select(GroupMember.device_id).where(GroupMember.group_id == group.id)).all()
    )


def group_device_ids(
    session: Session, group: DeviceGroup, *, include_unaccepted: bool = False
) -> list[str]:
    """The ids of the group's members as the database holds them now, sorted.

    Only accepted devices unless ``include_unaccepted``. A static group is one join;
    a dynamic group reads the inventory columns its selector can see (never whole
    rows) and evaluates the selector on them.
    """
    if group.kind == GroupKind.STATIC:
        query = (
            select(GroupMember.device_id)
            .join(Device, col(Device.id) == col(GroupMember.device_id))
            .where(GroupMember.group_id == group.id)
        )
        if not include_unaccepted:
            query = query.where(Device.status == DeviceStatus.ACCEPTED.value)
        return sorted(session.exec(query).all())
    selector = _selector(group)
    rows_query = select(*_FACT_COLUMNS)  # type: ignore[call-overload]  # 9 columns, no stub
    if not include_unaccepted:
        rows_query = rows_query.where(Device.status == DeviceStatus.ACCEPTED.value)
    return sorted(row.id for row in session.exec(rows_query) if selector.matches(device_facts(row)))


def device_groups(session: Session, device: Device) -> list[str]:
    """Names of the groups whose rule ``device`` meets (whatever its status), sorted."""
    explicit = set(
        session.exec(select(GroupMember.group_id).where(GroupMember.device_id == device.id)).all()
    )
    facts = device.facts()
    names = []
    for group in list_groups(session):
        if group.kind == GroupKind.STATIC:
            if group.id in explicit:
                names.append(group.name)
        elif _selector(group).matches(facts):
            names.append(group.name)
    return sorted(names)


# ----------------------------------------------------------------------------- CRUD


def list_groups(session: Session) -> list[DeviceGroup]:
    return list(session.exec(select(DeviceGroup).order_by(col(DeviceGroup.name))).all())


def get_group(session: Session, *, name: str) -> DeviceGroup:
    group = session.exec(select(DeviceGroup).where(DeviceGroup.name == name)).first()
    if group is None:
        raise NotFoundError(f"no device group named {name!r}")
    return group


def create_group(
    session: Session,
    *,
    name: str,
    selector: str | None = None,
    maintenance_window: str | None = None,
    description: str = "",
) -> DeviceGroup:
    """A new group: dynamic when a selector is given, else static."""
    check_group_name(name)
    if session.exec(select(DeviceGroup.id).where(DeviceGroup.name == name)).first() is not None:
        raise ConflictError(f"a device group named {name!r} already exists")
    group = DeviceGroup(
        name=name,
        kind=(GroupKind.STATIC if selector is None else GroupKind.DYNAMIC).value,
        selector=None if selector is None else str(parse(selector)),
        maintenance_window=(
            None
            if maintenance_window is None
            else str(parse_maintenance_window(maintenance_window))
        ),
        description=description,
    )
    session.add(group)
    _flush(session, f"a device group named {name!r} already exists")
    return group


_UNCHANGED = object()


def update_group(
    session: Session,
    *,
    group: DeviceGroup,
    selector: object = _UNCHANGED,
    maintenance_window: object = _UNCHANGED,
    description: str | None = None,
) -> DeviceGroup:
    """Change a group's selector (dynamic groups only), maintenance window or description.

    ``maintenance_window=None`` removes the window; a selector cannot be removed (a
    dynamic group stays dynamic).
    """
    if selector is not _UNCHANGED:
        if group.kind != GroupKind.DYNAMIC:
            raise ConflictError(
                f"group {group.name!r} is static: it has members, not a selector "
                "(create a dynamic group instead)"
            )
        if not isinstance(selector, str):
            raise InvalidInputError("a dynamic group's selector cannot be removed")
        group.selector = str(parse(selector))
    if maintenance_window is not _UNCHANGED:
        group.maintenance_window = (
            None
            if maintenance_window is None
            else str(parse_maintenance_window(str(maintenance_window)))
        )
    if description is not None:
        group.description = description
    session.add(group)
    session.flush()
    return group


def delete_group(session: Session, *, group: DeviceGroup) -> None:
    """Delete a group and its member list; refused while anything else refers to it."""
    session.exec(delete(GroupMember).where(col(GroupMember.group_id) == group.id))
    session.delete(group)
    _flush(
        session,
        f"group {group.name!r} is still in use (by a provisioning token or a rollout)",
    )


def _static(group: DeviceGroup) -> None:
    if group.kind != GroupKind.STATIC:
        raise ConflictError(
            f"group {group.name!r} is dynamic: its members are the devices its selector "
            f"matches ({group.selector}); change their tags or the selector instead"
        )


def add_members(session: Session, *, group: DeviceGroup, device_ids: Sequence[str]) -> list[str]:
    """Add devices to a static group (all or none); return the ids that were new."""
    _static(group)
    wanted = sorted(set(device_ids))
    if not wanted:
        raise InvalidInputError("name at least one device")
    known = set(session.exec(select(Device.id).where(col(Device.id).in_(wanted))).all())
    missing = [d for d in wanted if d not in known]
    if missing:
        raise NotFoundError(f"no device with id {', '.join(missing)}: nothing was added")
    present = set(static_member_ids(session, group))
    added = [d for d in wanted if d not in present]
    for device_id in added:
        session.add(GroupMember(group_id=group.id, device_id=device_id))  # type: ignore[arg-type]
    _flush(session, f"group {group.name!r} changed at the same time; try again")
    return added


def remove_members(session: Session, *, group: DeviceGroup, device_ids: Sequence[str]) -> list[str]:
    """Remove devices from a static group (all or none); return the ids removed."""
    _static(group)
    wanted = sorted(set(device_ids))
    if not wanted:
        raise InvalidInputError("name at least one device")
    present = set(static_member_ids(session, group))
    missing = [d for d in wanted if d not in present]
    if missing:
        raise NotFoundError(
            f"not members of group {group.name!r}: {', '.join(missing)}; nothing was removed"
        )
    session.exec(
        delete(GroupMember)
        .where(col(GroupMember.group_id) == group.id)
        .where(col(GroupMember.device_id).in_(wanted))
    )
    session.flush()
    return wanted


def _flush(session: Session, conflict: str) -> None:
    try:
        session.flush()
    except IntegrityError as e:
        session.rollback()
        raise ConflictError(conflict) from e
