"""The inventory as the operator sees it: find devices, filter them, tag them, forget them.

What always holds:

- Filters combine with "and". Plain inventory fields are filtered in SQL; tags,
  groups, running models and selectors are matched on the rows that remain, with the
  same rules as dynamic groups (:mod:`server.fleet.selectors`).
- Tags are validated (:func:`~server.fleet.selectors.check_tags`) before anything is
  written; a change that would leave invalid tags changes nothing.
- Only a rejected or revoked device can be deleted, and its credentials and static
  group memberships go with it in one transaction.

Functions that take a session flush but never commit; the caller commits.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from server.errors import ConflictError, InvalidInputError, NotFoundError
from server.fleet.groups import get_group, group_device_ids
from server.fleet.models import Device, DeviceCredential, DeviceStatus, GroupMember
from server.fleet.selectors import check_tag_key, check_tags, parse

__all__ = [
    "DeviceFilter",
    "delete_device",
    "get_device",
    "list_devices",
    "parse_model_filter",
    "parse_tag_filter",
    "set_tags",
]


@dataclass(frozen=True, slots=True)
class DeviceFilter:
    """What ``devices list`` narrows by; ``None`` (or empty) means "any"."""

    status: DeviceStatus | None = None
    profile: str | None = None
    arch: str | None = None
    runtime: str | None = None
    runtime_version: str | None = None
    agent_version: str | None = None
    online: bool | None = None
    tags: Mapping[str, str | None] = field(default_factory=dict)
    """tag -> value it must have, or ``None``: it must have the tag at all."""
    group: str | None = None
    model: str | None = None
    model_version: int | None = None
    selector: str | None = None


def parse_tag_filter(text: str) -> tuple[str, str | None]:
    """``"site=berlin"`` -> ``("site", "berlin")``; ``"site"`` -> ``("site", None)``."""
    key, sep, value = text.partition("=")
    check_tag_key(key.strip())
    if sep and not value:
        raise InvalidInputError(f"tag filter {text!r}: give a value after '=', or just the name")
    return key.strip(), (value if sep else None)


def parse_model_filter(text: str) -> tuple[str, int | None]:
    """``"digits"`` -> ``("digits", None)``; ``"digits@3"`` -> ``("digits", 3)``."""
    name, sep, version = text.partition("@")
    if not name or (sep and not version.isdigit()):
        raise InvalidInputError(f"model filter {text!r}: use NAME or NAME@VERSION")
    return name, (int(version) if sep else None)


def list_devices(
    session: Session,
    *,
    filters: DeviceFilter | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[Device]:
    """Devices matching every filter, sorted by id; ``limit`` / ``offset`` page the result."""
    f = filters or DeviceFilter()
    selector = None if f.selector is None else parse(f.selector)
    query = select(Device).order_by(col(Device.id))
    for column, wanted in (
        (Device.status, None if f.status is None else DeviceStatus(f.status).value),
        (Device.profile, f.profile),
        (Device.arch, f.arch),
        (Device.runtime_name, f.runtime),
        (Device.runtime_version, f.runtime_version),
        (Device.agent_version, f.agent_version),
        (Device.online, f.online),
    ):
        if wanted is not None:
            query = query.where(column == wanted)
    in_group = (
        None
        if f.group is None
        else set(
            group_device_ids(session, get_group(session, name=f.group), include_unaccepted=True)
        )
    )
    found = []
    for device in session.exec(query):
        if in_group is not None and device.id not in in_group:
            continue
        if f.tags and not _has_tags(device.tags, f.tags):
            continue
        if f.model is not None and not _runs(device, f.model, f.model_version):
            continue
        if selector is not None and not selector.matches(device.facts()):
            continue
        found.append(device)
    return found[offset:] if limit is None else found[offset : offset + limit]


def _has_tags(tags: Mapping[str, str], wanted: Mapping[str, str | None]) -> bool:
    return all(
        key in tags and (value is None or tags[key] == value) for key, value in wanted.items()
    )


def _runs(device: Device, model: str, version: int | None) -> bool:
    return any(
        m.get("model_name") == model and (version is None or m.get("model_version") == version)
        for m in device.models
    )


def get_device(session: Session, *, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"no device with id {device_id!r}")
    return device


def set_tags(
    session: Session,
    *,
    device: Device,
    set_: Mapping[str, str] | None = None,
    remove: Collection[str] = (),
) -> Device:
    """Set (add or overwrite) and remove tags in one change; all of it or nothing."""
    set_ = dict(set_ or {})
    both = sorted(set(set_) & set(remove))
    if both:
        raise InvalidInputError(f"tag {', '.join(both)} is both set and removed")
    tags = device.tags
    absent = sorted(k for k in remove if k not in tags)
    if absent:
        raise InvalidInputError(f"device {device.id} has no tag {', '.join(map(repr, absent))}")
    tags.update(set_)
    for key in remove:
        del tags[key]
    device.tags = check_tags(tags)
    session.add(device)
    session.flush()
    return device


def delete_device(session: Session, *, device: Device) -> None:
    """Forget a rejected or revoked device, so its id may enroll again."""
    if device.status not in (DeviceStatus.REJECTED, DeviceStatus.REVOKED):
        raise ConflictError(
            f"device {device.id} is {device.status}: reject or revoke it before deleting it"
        )
    session.exec(delete(GroupMember).where(col(GroupMember.device_id) == device.id))
    session.exec(delete(DeviceCredential).where(col(DeviceCredential.device_id) == device.id))
    session.delete(device)
    try:
        session.flush()
    except IntegrityError as e:
        session.rollback()
        raise ConflictError(
            f"device {device.id} is still referred to (by a rollout's history); "
            "it stays revoked instead"
        ) from e
