"""``/auth/me``, the operator-token admin API (``/operators``) and the audit log (``/audit``).

``router`` (``/auth/me``) sits behind :func:`server.auth.deps.operator_access`, and
``admin_router`` (``/operators``, ``/audit``) behind :func:`server.auth.deps.require_admin`
(included so by :mod:`server.app`). A new token's secret is in the 201 answer and
nowhere else, ever.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, status
from pydantic import BaseModel, ConfigDict, Field

from server.api.deps import NowDep, SessionDep
from server.auth import audit, tokens
from server.auth.deps import AdminDep, PrincipalDep, require_admin
from server.auth.models import AuditPublic, OperatorPublic, Principal, Role

__all__ = ["OperatorCreate", "OperatorCreated", "admin_router", "router"]

router = APIRouter(tags=["auth"])
admin_router = APIRouter(tags=["auth"], dependencies=[Depends(require_admin)])


class OperatorCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, description="who or what the token is for")
    role: Role
    expires_days: float | None = Field(
        None, gt=0, le=tokens.MAX_EXPIRES_DAYS, description="lifetime; none: until revoked"
    )


class OperatorCreated(OperatorPublic):
    token: str = Field(description="the bearer token; shown this once, stored only hashed")


@router.get("/auth/me", response_model=Principal, summary="Who this token is, and its role")
def me(principal: PrincipalDep) -> Principal:
    return principal


@admin_router.post(
    "/operators",
    response_model=OperatorCreated,
    status_code=status.HTTP_201_CREATED,
    summary="Create an operator token (admin; its secret is shown once)",
)
def create_operator(
    body: OperatorCreate, session: SessionDep, now: NowDep, admin: AdminDep
) -> OperatorCreated:
    issued = tokens.create_operator(
        session,
        name=body.name,
        role=body.role,
        now=now,
        created_by=admin.name,
        expires_days=body.expires_days,
    )
    audit.record(
        session,
        actor=admin.name,
        action="operator.create",
        target=f"operator:{body.name}",
        detail={"role": body.role.value, "expires_days": body.expires_days},
        at=now,
    )
    session.commit()
    public = OperatorPublic.of(issued.record, now=now)
    return OperatorCreated(**public.model_dump(), token=issued.token)


@admin_router.get(
    "/operators",
    response_model=list[OperatorPublic],
    summary="List operator tokens (admin; never their secrets)",
)
def list_operators(session: SessionDep, now: NowDep, _admin: AdminDep) -> list[OperatorPublic]:
    return [OperatorPublic.of(t, now=now) for t in tokens.list_operators(session)]


@admin_router.get("/operators/{name}", response_model=OperatorPublic, summary="One operator token")
def show_operator(name: str, session: SessionDep, now: NowDep, _admin: AdminDep) -> OperatorPublic:
    return OperatorPublic.of(tokens.get_operator(session, name=name), now=now)


@admin_router.post(
    "/operators/{name}/revoke",
    response_model=OperatorPublic,
    summary="Revoke an operator token (admin); it fails from the next request on",
)
def revoke_operator(name: str, session: SessionDep, now: NowDep, admin: AdminDep) -> OperatorPublic:
    record = tokens.revoke_operator(session, name=name, now=now)
    audit.record(
        session, actor=admin.name, action="operator.revoke", target=f"operator:{name}", at=now
    )
    session.commit()
    return OperatorPublic.of(record, now=now)


@admin_router.get(
    "/audit",
    response_model=list[AuditPublic],
    summary="The audit log of operator actions, newest first (admin)",
)
def list_audit(
    session: SessionDep,
    _admin: AdminDep,
    actor: str | None = None,
    action: Annotated[
        str | None, Query(description="an action, or a prefix ending in '.' (rollout.)")
    ] = None,
    target: str | None = None,
    since: datetime | None = None,
    limit: Annotated[int, Query(ge=1, le=audit.MAX_LIST)] = 100,
) -> list[AuditPublic]:
    entries = audit.list_entries(
        session, actor=actor, action=action, target=target, since=since, limit=limit
    )
    return [audit.public(e) for e in entries]
