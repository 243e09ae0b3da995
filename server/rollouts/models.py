"""The rollouts' tables (SQLModel); the schema is owned by the Alembic migrations ``0005``
and ``0010`` (agent rollouts).

==========================  ==============================================================
table                       what a row is
==========================  ==============================================================
``rollouts``                one rollout of a model version or (``kind`` agent) of an agent
                            release: its spec and its whole state (JSON of
                            :class:`~server.rollouts.core.RolloutSpec` and
                            :class:`~server.rollouts.core.RolloutState`), with ``status``
                            and ``phase`` copied out for filtering
``issued_manifests``        one signed desired state issued to one device, byte for byte
``device_pins``             an operator's pin: this device runs this version of this model
``device_events``           one update event a device reported, stamped with the time the
                            *server* received it (de-duplicated by ``event_id``)
``device_state_receipts``   when the server last received each device's retained state
==========================  ==============================================================

What always holds:

- ``rollouts.revision`` counts the writes of a rollout's state. A state is written only
  with ``WHERE revision = <the revision it was computed from>`` and bumps it, so two
  replicas (or the engine and an operator command) never both apply a step: the one
  that loses sees no row updated and drops its result.
- ``(device_id, manifest_version)`` is unique in ``issued_manifests``: a manifest
  version names one payload, for ever. A row is written *before* its payload is
  published; ``sent_at`` is set once the broker acknowledged it, so a row without it is
  one to send again.
- ``device_events.event_id`` is unique: an event delivered twice is stored once.
- Times are aware UTC (:class:`~server.db.UTCDateTime`); ``*_json`` columns hold JSON text.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Index, LargeBinary, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from server.agent_releases.models import AgentRelease
from server.db import UTCDateTime, utcnow

__all__ = [
    "AgentRelease",
    "DeviceEventRecord",
    "DevicePin",
    "DeviceStateReceipt",
    "IssuedManifestRecord",
    "RolloutRecord",
]


class RolloutRecord(SQLModel, table=True):
    """One rollout of one model version, or of one agent release, to one device group.

    An agent rollout (``kind`` agent) stores ``model_name``
    :data:`~server.rollouts.core.AGENT_TARGET` and ``model_version`` the release's id,
    as its spec does; ``model_version_id`` is NULL and ``agent_release_id`` names it.
    """

    __tablename__ = "rollouts"

    id: str = Field(primary_key=True, max_length=128, description="the rollout id")
    kind: str = Field(default="model", max_length=16, index=True, description="model | agent")
    model_name: str = Field(max_length=128, index=True)
    model_version: int = Field(ge=1)
    model_version_id: int | None = Field(default=None, foreign_key="model_versions.id")
    agent_release_id: int | None = Field(default=None, foreign_key="agent_releases.id")
    agent_version: str | None = Field(default=None, max_length=64)
    group_name: str = Field(max_length=64, index=True)
    group_id: int = Field(foreign_key="device_groups.id", index=True)
    status: str = Field(max_length=32, index=True, description="RolloutStatus, as in state_json")
    phase: int = Field(default=0, ge=0, description="current phase index, as in state_json")
    spec_json: str = Field(sa_column=Column(Text, nullable=False))
    state_json: str = Field(sa_column=Column(Text, nullable=False))
    revision: int = Field(default=0, ge=0, description="bumped by every state write")
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )
    updated_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )


class IssuedManifestRecord(SQLModel, table=True):
    """One signed desired state as issued to a device (the payload exactly as published)."""

    __tablename__ = "issued_manifests"
    __table_args__ = (UniqueConstraint("device_id", "manifest_version"),)

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="devices.id", max_length=64, index=True)
    manifest_version: int = Field(ge=1)
    rollout_id: str | None = Field(default=None, max_length=128)
    reason: str = Field(max_length=32, description="why it was issued (IssueReason)")
    content_digest: str = Field(max_length=64)
    keyring_version: int
    deployments_json: str = Field(sa_column=Column(Text, nullable=False))
    artifacts_json: str = Field(sa_column=Column(Text, nullable=False))
    agent_json: str | None = Field(
        default=None,
        sa_column=Column(Text, nullable=True),
        description="the AgentDeployment the manifest named (NULL: none)",
    )
    payload: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    issued_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    expires_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    sent_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))


class DevicePin(SQLModel, table=True):
    """The operator holds one device on one version of one model, whatever rolls out."""

    __tablename__ = "device_pins"

    device_id: str = Field(foreign_key="devices.id", primary_key=True, max_length=64)
    model_name: str = Field(primary_key=True, max_length=128)
    model_version: int = Field(ge=1)
    model_version_id: int = Field(foreign_key="model_versions.id")
    note: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )


class DeviceEventRecord(SQLModel, table=True):
    """One update event from a device (``ef/v1/dev/{id}/events``), kept for the rollouts."""

    __tablename__ = "device_events"
    __table_args__ = (Index("ix_device_events_device_received", "device_id", "received_at"),)

    id: int | None = Field(default=None, primary_key=True)
    event_id: str = Field(max_length=32, unique=True)
    device_id: str = Field(max_length=64)
    kind: str = Field(max_length=32)
    at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    received_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    manifest_version: int | None = None
    rollout_id: str | None = Field(default=None, max_length=128)
    model_name: str | None = Field(default=None, max_length=128)
    model_version: int | None = None
    agent_version: str | None = Field(default=None, max_length=64)
    sha256: str | None = Field(default=None, max_length=64)
    reason: str | None = Field(default=None, max_length=64)
    detail: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class DeviceStateReceipt(SQLModel, table=True):
    """When the server received the device's latest applied state report (server time)."""

    __tablename__ = "device_state_receipts"

    device_id: str = Field(primary_key=True, max_length=64)
    reported_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    received_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
