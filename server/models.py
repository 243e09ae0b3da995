"""Database tables (SQLModel). The schema itself is owned by Alembic migrations.

Tables follow the FastAPI full-stack template's layers: a ``*Base`` with the
shared fields, the ``table=True`` class, and ``*Public`` for what the API returns.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Text
from sqlmodel import Field, SQLModel

from server.db import UTCDateTime, utcnow

__all__ = ["Artifact", "ArtifactPublic", "KeyringPublic", "KeyringRecord"]


class ArtifactBase(SQLModel):
    sha256: str = Field(primary_key=True, min_length=64, max_length=64)
    length: int = Field(ge=0)
    media_type: str = Field(max_length=128)


class Artifact(ArtifactBase, table=True):
    """A content-addressed file in the artifact store (bundles, datasets)."""

    __tablename__ = "artifacts"

    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )


class ArtifactPublic(ArtifactBase):
    created_at: datetime


class KeyringBase(SQLModel):
    version: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    issued_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    expires_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))


class KeyringRecord(KeyringBase, table=True):
    """Every root-signed keyring the fleet has been given; the highest version is current."""

    __tablename__ = "keyrings"

    envelope: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )


class KeyringPublic(KeyringBase):
    envelope: str
