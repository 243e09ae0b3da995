"""The ``agent_releases`` table (SQLModel); the schema is owned by the Alembic migration ``0010``.

What always holds:

- ``version`` is unique: a version names one wheel, for ever.
- ``sha256`` names a row of ``artifacts`` (media type
  :data:`~shared.messages.AGENT_WHEEL_MEDIA_TYPE`) whose file is in the artifact store.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Text
from sqlmodel import Field, SQLModel

from server.db import UTCDateTime, utcnow

__all__ = ["AgentRelease"]


class AgentRelease(SQLModel, table=True):
    """One published version of the agent: its wheel, pinned by hash and length."""

    __tablename__ = "agent_releases"

    id: int | None = Field(default=None, primary_key=True)
    version: str = Field(max_length=64, unique=True, index=True)
    sha256: str = Field(foreign_key="artifacts.sha256", max_length=64)
    length: int = Field(ge=1)
    filename: str = Field(max_length=255)
    requires_python: str | None = Field(default=None, max_length=64)
    notes: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    published_by: str = Field(max_length=64)
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )
