"""The device inventory: list with filters, show, accept / reject / revoke, tags, delete.

Filters combine with "and"; ``tag`` and ``selector`` use the dynamic-group rules
(:mod:`server.fleet.selectors`). An unknown device answers 404, a status change that
is not possible from the device's status 409, bad tags or a bad selector 422.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session

from server.api.deps import NowDep, SessionDep
from server.auth import audit
from server.auth.deps import PrincipalDep
from server.auth.models import Principal
from server.brokerconf.hooks import BrokerConfigDep
from server.brokerconf.writer import BrokerConfigWriter
from server.fleet import devices as inventory
from server.fleet import enrollment
from server.fleet.groups import device_groups
from server.fleet.models import DevicePublic, DeviceStatus

__all__ = ["TagChange", "router"]

router = APIRouter(prefix="/devices", tags=["devices"])


class TagChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    set: dict[str, str] = Field(default_factory=dict, description="tags to add or overwrite")
    remove: list[str] = Field(default_factory=list, description="tags to remove")


@router.get("", response_model=list[DevicePublic], summary="List devices, filtered by inventory")
def list_devices(
    session: SessionDep,
    status_: Annotated[DeviceStatus | None, Query(alias="status")] = None,
    profile: str | None = None,
    arch: str | None = None,
    runtime: Annotated[str | None, Query(description="runtime name, e.g. litert")] = None,
    runtime_version: str | None = None,
    agent_version: str | None = None,
    online: bool | None = None,
    tag: Annotated[
        list[str] | None, Query(description="NAME=VALUE, or NAME to have the tag; repeatable")
    ] = None,
    group: Annotated[str | None, Query(description="devices the group's rule matches")] = None,
    model: Annotated[str | None, Query(description="runs model NAME or NAME@VERSION")] = None,
    selector: Annotated[str | None, Query(description="a group selector expression")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[DevicePublic]:
    model_name, model_version = None, None
    if model is not None:
        model_name, model_version = inventory.parse_model_filter(model)
    filters = inventory.DeviceFilter(
        status=status_,
        profile=profile,
        arch=arch,
        runtime=runtime,
        runtime_version=runtime_version,
        agent_version=agent_version,
        online=online,
        tags=dict(inventory.parse_tag_filter(t) for t in tag or []),
        group=group,
        model=model_name,
        model_version=model_version,
        selector=selector,
    )
    found = inventory.list_devices(session, filters=filters, limit=limit, offset=offset)
    return [DevicePublic.of(d) for d in found]


@router.get("/{device_id}", response_model=DevicePublic, summary="One device and its groups")
def show_device(device_id: str, session: SessionDep) -> DevicePublic:
    device = inventory.get_device(session, device_id=device_id)
    return DevicePublic.of(device, groups=device_groups(session, device))


def _change(
    session: Session,
    device_id: str,
    action: enrollment.Action,
    now: datetime,
    broker_config: BrokerConfigWriter | None,
    who: Principal,
) -> DevicePublic:
    device = inventory.get_device(session, device_id=device_id)
    before = device.status
    enrollment.change_status(session, device=device, action=action, now=now)
    audit.record(
        session,
        actor=who.name,
        action=f"device.{action}",
        target=f"device:{device_id}",
        detail={"from": str(before), "to": str(device.status)},
        at=now,
    )
    session.commit()
    if broker_config is not None:  # the broker's password and ACL files follow the change
        broker_config.credentials_changed()
    return DevicePublic.of(device, groups=device_groups(session, device))


@router.post("/{device_id}/accept", response_model=DevicePublic, summary="Accept a pending device")
def accept_device(
    device_id: str,
    session: SessionDep,
    now: NowDep,
    broker_config: BrokerConfigDep,
    who: PrincipalDep,
) -> DevicePublic:
    return _change(session, device_id, "accept", now, broker_config, who)


@router.post(
    "/{device_id}/reject",
    response_model=DevicePublic,
    summary="Reject a pending device (its credentials stop working)",
)
def reject_device(
    device_id: str,
    session: SessionDep,
    now: NowDep,
    broker_config: BrokerConfigDep,
    who: PrincipalDep,
) -> DevicePublic:
    return _change(session, device_id, "reject", now, broker_config, who)


@router.post(
    "/{device_id}/revoke",
    response_model=DevicePublic,
    summary="Revoke a device (its credentials stop working)",
)
def revoke_device(
    device_id: str,
    session: SessionDep,
    now: NowDep,
    broker_config: BrokerConfigDep,
    who: PrincipalDep,
) -> DevicePublic:
    return _change(session, device_id, "revoke", now, broker_config, who)


@router.patch(
    "/{device_id}/tags", response_model=DevicePublic, summary="Set and remove tags, in one change"
)
def change_tags(device_id: str, body: TagChange, session: SessionDep) -> DevicePublic:
    device = inventory.get_device(session, device_id=device_id)
    inventory.set_tags(session, device=device, set_=body.set, remove=body.remove)
    session.commit()
    return DevicePublic.of(device, groups=device_groups(session, device))


@router.delete(
    "/{device_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Forget a rejected or revoked device, so its id may enroll again",
)
def delete_device(device_id: str, session: SessionDep, now: NowDep, who: PrincipalDep) -> Response:
    inventory.delete_device(session, device=inventory.get_device(session, device_id=device_id))
    audit.record(
        session, actor=who.name, action="device.delete", target=f"device:{device_id}", at=now
    )
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
