"""The fleet's tables (SQLModel) and what the API returns for them.

Tables: ``devices`` (one row per device id: enrollment status and the inventory the
device reports), ``provisioning_tokens`` (what a device shows to enroll),
``device_credentials`` (its MQTT / HTTP identity), ``device_groups`` and
``group_members`` (explicit members of static groups). The schema is owned by the
Alembic migration ``0003``.

What always holds:

- A device id follows :func:`shared.topics.check_device_id`; it is the device's MQTT
  username and the only key of its record.
- Secrets are never stored: a token keeps the SHA-256 of its secret, a credential a
  salted PBKDF2-SHA512 hash (:mod:`server.fleet.auth`).
- ``tags_json``, ``models_json``, ``runtimes_json``, ``last_update_json``,
  ``agent_update_json`` and ``last_event_json`` hold JSON text (as every ``*_json``
  column in this schema); read them through the properties (``tags``, ``models``,
  ...), which never fail on an empty value.
- A dynamic group's members are not stored anywhere: they are computed from its
  selector whenever they are asked for (:mod:`server.fleet.groups`).
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel
from pydantic import Field as PydanticField
from sqlalchemy import Column, Text
from sqlmodel import Field, SQLModel

from server.db import UTCDateTime, utcnow
from shared.messages import AgentUpdateResult, RunningModel, UpdateResult

__all__ = [
    "Device",
    "DeviceCredential",
    "DeviceGroup",
    "DevicePublic",
    "DeviceStatus",
    "GroupKind",
    "GroupMember",
    "ProvisioningToken",
    "RuntimeFacts",
    "device_facts",
]


class DeviceStatus(StrEnum):
    PENDING = "pending"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    REVOKED = "revoked"


class GroupKind(StrEnum):
    STATIC = "static"
    DYNAMIC = "dynamic"


def _loads(text: str | None, empty: Any) -> Any:
    return json.loads(text) if text else empty


def _json_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# ----------------------------------------------------------------------------- groups


class DeviceGroup(SQLModel, table=True):
    """A named set of devices: explicit members (static) or those a selector matches (dynamic)."""

    __tablename__ = "device_groups"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True, index=True)
    kind: str = Field(max_length=16, description="static or dynamic")
    selector: str | None = Field(
        default=None,
        sa_column=Column(Text, nullable=True),
        description="dynamic groups: the selector over inventory and tags",
    )
    maintenance_window: str | None = Field(
        default=None, max_length=16, description="HH:MM-HH:MM in UTC, e.g. 02:00-04:00"
    )
    description: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )


class GroupMember(SQLModel, table=True):
    """One explicit member of a static group."""

    __tablename__ = "group_members"

    group_id: int = Field(foreign_key="device_groups.id", primary_key=True)
    device_id: str = Field(foreign_key="devices.id", primary_key=True, max_length=64, index=True)
    added_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )


# ----------------------------------------------------------------------------- tokens


class ProvisioningToken(SQLModel, table=True):
    """What a device presents to enroll: scoped, expiring, limited in uses.

    The token a device is given is ``efp.<id>.<secret>``; only the SHA-256 of the
    secret is kept.
    """

    __tablename__ = "provisioning_tokens"

    id: str = Field(primary_key=True, max_length=16)
    secret_hash: str = Field(max_length=64)
    name: str = Field(default="", max_length=128)
    group_id: int | None = Field(default=None, foreign_key="device_groups.id")
    profile: str | None = Field(default=None, max_length=64)
    expires_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    max_uses: int = Field(ge=1)
    uses: int = Field(default=0, ge=0)
    auto_accept: bool = False
    revoked: bool = False
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )


# ----------------------------------------------------------------------------- devices


def device_facts(device: Any) -> dict[str, str]:
    """The selector's view of a :class:`Device`, or of a row holding the same columns."""
    return {
        **_loads(device.tags_json, {}),
        "id": device.id,
        "profile": device.profile,
        "arch": device.arch,
        "runtime": device.runtime_name,
        "runtime_version": device.runtime_version,
        "agent_version": device.agent_version,
        "status": device.status,
        "online": "true" if device.online else "false",
    }


class Device(SQLModel, table=True):
    """One device: its enrollment status and its inventory (what it reported last)."""

    __tablename__ = "devices"

    id: str = Field(primary_key=True, max_length=64, description="the device id")
    status: str = Field(default=DeviceStatus.PENDING.value, max_length=16, index=True)
    profile: str = Field(max_length=64, index=True)
    arch: str = Field(max_length=32)
    runtime_name: str = Field(max_length=64)
    runtime_version: str = Field(max_length=64)
    runtimes_json: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))
    agent_version: str = Field(max_length=64)
    tags_json: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))
    models_json: str = Field(default="[]", sa_column=Column(Text, nullable=False, default="[]"))
    manifest_version: int = Field(default=0, ge=0)
    keyring_version: int = Field(default=0, ge=0)
    last_update_json: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    agent_update_json: str | None = Field(
        default=None,
        sa_column=Column(Text, nullable=True),
        description="the AgentUpdateResult it reported last (migration 0010)",
    )
    last_event_json: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    state_reported_at: datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime, nullable=True)
    )
    presence_session_at: datetime | None = Field(
        default=None,
        sa_column=Column(UTCDateTime, nullable=True),
        description="session_started_at of the presence message applied last",
    )
    online: bool = False
    last_seen: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    enrolled_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )
    accepted_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    status_changed_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )
    token_id: str | None = Field(default=None, foreign_key="provisioning_tokens.id", max_length=16)

    @property
    def tags(self) -> dict[str, str]:
        tags: dict[str, str] = _loads(self.tags_json, {})
        return tags

    @tags.setter
    def tags(self, value: dict[str, str]) -> None:
        self.tags_json = _json_text(dict(value))

    @property
    def runtimes(self) -> dict[str, str]:
        runtimes: dict[str, str] = _loads(self.runtimes_json, {})
        return runtimes

    @property
    def models(self) -> list[dict[str, Any]]:
        """The running models as the device reported them (``RunningModel`` dicts)."""
        models: list[dict[str, Any]] = _loads(self.models_json, [])
        return models

    @property
    def last_update(self) -> dict[str, Any] | None:
        update: dict[str, Any] | None = _loads(self.last_update_json, None)
        return update

    @property
    def agent_update(self) -> dict[str, Any] | None:
        """How its latest agent update ended (an ``AgentUpdateResult`` dict), if reported."""
        update: dict[str, Any] | None = _loads(self.agent_update_json, None)
        return update

    @property
    def last_event(self) -> dict[str, Any] | None:
        event: dict[str, Any] | None = _loads(self.last_event_json, None)
        return event

    def facts(self) -> dict[str, str]:
        """What a group selector sees: the inventory fields as text, plus every tag."""
        return device_facts(self)


class DeviceCredential(SQLModel, table=True):
    """A device's password for the broker and the HTTP artifact endpoint.

    At most one credential of a device is active (``revoked_at`` empty); the
    username is the device id.
    """

    __tablename__ = "device_credentials"

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="devices.id", max_length=64, index=True)
    username: str = Field(max_length=64, index=True)
    password_hash: str = Field(max_length=256, description="$7$iterations$salt$hash (PBKDF2)")
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )
    revoked_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))


# ----------------------------------------------------------------------------- API views


class RuntimeFacts(BaseModel):
    name: str = PydanticField(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    version: str = PydanticField(pattern=r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")


class DevicePublic(BaseModel):
    """A device as the API shows it."""

    id: str
    status: DeviceStatus
    profile: str
    arch: str
    runtime: RuntimeFacts
    runtimes: dict[str, str] = PydanticField(description="every runtime it reported at enrollment")
    agent_version: str
    tags: dict[str, str]
    groups: list[str] | None = PydanticField(
        None, description="groups it belongs to (by their rule; shown by 'show' only)"
    )
    models: list[RunningModel] = PydanticField(description="models it runs (state topic)")
    manifest_version: int
    keyring_version: int
    last_update: UpdateResult | None = PydanticField(description="result of its last update")
    agent_update: AgentUpdateResult | None = PydanticField(
        None, description="how its latest agent update ended (agent_version: what it runs now)"
    )
    last_event: dict[str, Any] | None = PydanticField(description="its last update event")
    online: bool
    last_seen: datetime | None
    state_reported_at: datetime | None
    enrolled_at: datetime
    accepted_at: datetime | None
    status_changed_at: datetime

    @classmethod
    def of(cls, device: Device, *, groups: list[str] | None = None) -> DevicePublic:
        return cls(
            id=device.id,
            status=DeviceStatus(device.status),
            profile=device.profile,
            arch=device.arch,
            runtime=RuntimeFacts.model_construct(
                name=device.runtime_name, version=device.runtime_version
            ),
            runtimes=device.runtimes,
            agent_version=device.agent_version,
            tags=device.tags,
            groups=groups,
            models=[RunningModel.model_validate(m) for m in device.models],
            manifest_version=device.manifest_version,
            keyring_version=device.keyring_version,
            last_update=(
                None
                if device.last_update is None
                else UpdateResult.model_validate(device.last_update)
            ),
            agent_update=(
                None
                if device.agent_update is None
                else AgentUpdateResult.model_validate(device.agent_update)
            ),
            last_event=device.last_event,
            online=device.online,
            last_seen=device.last_seen,
            state_reported_at=device.state_reported_at,
            enrolled_at=device.enrolled_at,
            accepted_at=device.accepted_at,
            status_changed_at=device.status_changed_at,
        )
