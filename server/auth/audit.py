"""The audit log of operator actions: who did what, when, to what, with a detail.

:func:`record` adds one row to the caller's session, so an action and its record
commit (or roll back) together; it never commits by itself. Call it from any place
that acts on an operator's behalf -- the API's route handlers with the request's
principal, the ``edgefleet keys`` and ``edgefleet operators`` commands with the
local user -- as

    audit.record(session, actor=principal.name, action="rollout.pause",
                 target=f"rollout:{rollout_id}", detail="...")

Actions are dotted, ``<thing>.<verb>`` (``rollout.create``, ``device.revoke``,
``key.rotate``, ...). Over-long values are cut to the columns' sizes, never refused:
an audit record must not be the reason an action fails.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select

from server.auth.models import AuditEntry, AuditPublic
from server.db import utcnow

__all__ = ["MAX_LIST", "list_entries", "local_actor", "public", "record"]

MAX_LIST = 1000
_MAX_DETAIL = 4000


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    target: str,
    detail: str | Mapping[str, Any] = "",
    at: datetime | None = None,
) -> AuditEntry:
    """Add an audit row to ``session`` (the caller commits); ``detail`` may be a mapping (JSON)."""
    if not isinstance(detail, str):
        detail = json.dumps(dict(detail), sort_keys=True, separators=(",", ":"), default=str)
    entry = AuditEntry(
        at=at or utcnow(),
        actor=actor[:64],
        action=action[:64],
        target=target[:256],
        detail=detail[:_MAX_DETAIL],
    )
    session.add(entry)
    return entry


def list_entries(
    session: Session,
    *,
    actor: str | None = None,
    action: str | None = None,
    target: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[AuditEntry]:
    """The newest entries first, filtered; an ``action`` ending in ``.`` is a prefix."""
    query = select(AuditEntry)
    if actor is not None:
        query = query.where(AuditEntry.actor == actor)
    if action is not None:
        if action.endswith("."):
            query = query.where(col(AuditEntry.action).startswith(action, autoescape=True))
        else:
            query = query.where(AuditEntry.action == action)
    if target is not None:
        query = query.where(AuditEntry.target == target)
    if since is not None:
        query = query.where(col(AuditEntry.at) >= since)
    limit = max(1, min(limit, MAX_LIST))
    query = query.order_by(col(AuditEntry.at).desc(), col(AuditEntry.id).desc()).limit(limit)
    return list(session.exec(query).all())


def public(entry: AuditEntry) -> AuditPublic:
    assert entry.id is not None
    return AuditPublic(
        id=entry.id,
        at=entry.at,
        actor=entry.actor,
        action=entry.action,
        target=entry.target,
        detail=entry.detail,
    )


def local_actor() -> str:
    """Who runs a command on the server's host, for commands that act on the database directly."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"local:{user}"
