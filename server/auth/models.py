"""The operator-access tables (SQLModel) and what the API returns for them.

Tables: ``operator_tokens`` (one row per named operator token: its role, the SHA-256
of its secret, when it expires and whether it was revoked) and ``audit_log`` (who did
what, when, to what). The schema is owned by the Alembic migration ``0009``.

What always holds:

- An operator token's secret is never stored: only its SHA-256 (:mod:`server.auth.tokens`).
- Roles are ordered ``viewer < operator < admin``; :func:`Role.allows` says whether one
  role covers another.
- Audit rows are only ever added, never changed.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel
from sqlalchemy import Column, Text
from sqlmodel import Field, SQLModel

from server.db import UTCDateTime, utcnow

__all__ = [
    "AuditEntry",
    "AuditPublic",
    "OperatorPublic",
    "OperatorToken",
    "Principal",
    "Role",
]


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, needed: Role) -> bool:
        """Whether this role may do what ``needed`` may."""
        return self.rank >= needed.rank


_RANKS = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


class OperatorToken(SQLModel, table=True):
    """A named bearer token of a person or a script, with one role."""

    __tablename__ = "operator_tokens"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True, index=True)
    role: str = Field(max_length=16)
    token_hash: str = Field(max_length=64, unique=True, index=True)
    hint: str = Field(max_length=16, description="the token's first characters, to tell it apart")
    created_by: str = Field(max_length=64)
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )
    expires_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    revoked_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    last_used_at: datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime, nullable=True)
    )


class OperatorPublic(BaseModel):
    name: str
    role: Role
    hint: str
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    state: str  # active | expired | revoked

    @classmethod
    def of(cls, token: OperatorToken, *, now: datetime) -> OperatorPublic:
        if token.revoked_at is not None:
            state = "revoked"
        elif token.expires_at is not None and token.expires_at <= now:
            state = "expired"
        else:
            state = "active"
        return cls(
            name=token.name,
            role=Role(token.role),
            hint=token.hint,
            created_by=token.created_by,
            created_at=token.created_at,
            expires_at=token.expires_at,
            revoked_at=token.revoked_at,
            last_used_at=token.last_used_at,
            state=state,
        )


class AuditEntry(SQLModel, table=True):
    """One operator action: who (``actor``), what (``action``), to what (``target``), when."""

    __tablename__ = "audit_log"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False, index=True))
    actor: str = Field(max_length=64, index=True)
    action: str = Field(max_length=64, index=True)
    target: str = Field(max_length=256)
    detail: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))


class AuditPublic(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    detail: str


class Principal(BaseModel):
    """Who a request acts as: a token's name and role."""

    name: str
    role: Role
