"""Device groups: create (static, or dynamic with a selector), list, show, change, delete,
and add or remove the members of static groups.

``members`` are the accepted devices the group's rule selects now -- what a rollout
targets; ``unaccepted_matches`` are the devices the rule selects that are not
accepted (yet). A selector that does not parse answers 422 with its position;
changing the members of a dynamic group, or a group name that is taken, 409.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Response, status
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session

from server.api.deps import SessionDep
from server.fleet import groups as service
from server.fleet.models import DeviceGroup, GroupKind

__all__ = ["GroupCreate", "GroupDetail", "GroupMembers", "GroupPublic", "GroupUpdate", "router"]

router = APIRouter(prefix="/groups", tags=["groups"])


class GroupCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64)
    selector: str | None = Field(
        None,
        description="makes the group dynamic, e.g. 'profile=edge-arm64-litert and site=berlin'",
    )
    maintenance_window: str | None = Field(None, description="HH:MM-HH:MM in UTC")
    description: str = Field("", max_length=2000)


class GroupUpdate(BaseModel):
    """Only the fields given change; ``maintenance_window: null`` removes the window."""

    model_config = ConfigDict(extra="forbid")

    selector: str | None = None
    maintenance_window: str | None = None
    description: str | None = Field(None, max_length=2000)


class GroupMembers(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device_ids: list[str] = Field(min_length=1, max_length=10_000)


class GroupPublic(BaseModel):
    name: str
    kind: GroupKind
    selector: str | None
    maintenance_window: str | None
    description: str
    member_count: int = Field(description="accepted devices in the group now")
    created_at: datetime


class GroupDetail(GroupPublic):
    members: list[str] = Field(description="accepted devices in the group now (rollout targets)")
    unaccepted_matches: list[str] = Field(
        description="devices the group's rule selects that are not accepted"
    )


def _public(session: Session, group: DeviceGroup) -> GroupPublic:
    return GroupPublic(
        name=group.name,
        kind=GroupKind(group.kind),
        selector=group.selector,
        maintenance_window=group.maintenance_window,
        description=group.description,
        member_count=len(service.group_device_ids(session, group)),
        created_at=group.created_at,
    )


def _detail(session: Session, group: DeviceGroup) -> GroupDetail:
    members = service.group_device_ids(session, group)
    matched = service.group_device_ids(session, group, include_unaccepted=True)
    public = _public(session, group)
    return GroupDetail(
        **public.model_dump(),
        members=members,
        unaccepted_matches=sorted(set(matched) - set(members)),
    )


@router.post(
    "",
    response_model=GroupDetail,
    status_code=status.HTTP_201_CREATED,
    summary="Create a group: static, or dynamic with a selector",
)
def create_group(body: GroupCreate, session: SessionDep) -> GroupDetail:
    group = service.create_group(
        session,
        name=body.name,
        selector=body.selector,
        maintenance_window=body.maintenance_window,
        description=body.description,
    )
    session.commit()
    return _detail(session, group)


@router.get("", response_model=list[GroupPublic], summary="List groups")
def list_groups(session: SessionDep) -> list[GroupPublic]:
    return [_public(session, g) for g in service.list_groups(session)]


@router.get("/{name}", response_model=GroupDetail, summary="A group and its members now")
def show_group(name: str, session: SessionDep) -> GroupDetail:
    return _detail(session, service.get_group(session, name=name))


@router.patch("/{name}", response_model=GroupDetail, summary="Change selector, window, description")
def update_group(name: str, body: GroupUpdate, session: SessionDep) -> GroupDetail:
    group = service.get_group(session, name=name)
    given = body.model_fields_set
    changes: dict[str, object] = {}
    if "selector" in given:
        changes["selector"] = body.selector
    if "maintenance_window" in given:
        changes["maintenance_window"] = body.maintenance_window
    service.update_group(session, group=group, description=body.description, **changes)
    session.commit()
    return _detail(session, group)


@router.delete(
    "/{name}", status_code=status.HTTP_204_NO_CONTENT, summary="Delete a group (not its devices)"
)
def delete_group(name: str, session: SessionDep) -> Response:
    service.delete_group(session, group=service.get_group(session, name=name))
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{name}/members",
    response_model=GroupDetail,
    summary="Add devices to a static group (all or none)",
)
def add_members(name: str, body: GroupMembers, session: SessionDep) -> GroupDetail:
    group = service.get_group(session, name=name)
    service.add_members(session, group=group, device_ids=body.device_ids)
    session.commit()
    return _detail(session, group)


@router.post(
    "/{name}/members/remove",
    response_model=GroupDetail,
    summary="Remove devices from a static group (all or none)",
)
def remove_members(name: str, body: GroupMembers, session: SessionDep) -> GroupDetail:
    group = service.get_group(session, name=name)
    service.remove_members(session, group=group, device_ids=body.device_ids)
    session.commit()
    return _detail(session, group)
