"""Provisioning tokens, enrollment, and the operator's accept / reject / revoke.

A device enrolls by presenting a provisioning token and its facts (id, profile, arch,
runtime, agent version, tags); it gets its own credentials back, once.

What always holds:

- A token is ``efp.<id>.<secret>``; only the SHA-256 of the secret is stored and the
  secret is shown once, when the token is made. An unknown id and a wrong secret are
  refused alike (401); a real token that is revoked, expired, used up or scoped to
  another profile is refused with that reason (403).
- A token's use is claimed with one conditional ``UPDATE`` (not revoked, not expired,
  uses below max), so concurrent enrollments can never use a token more often than
  allowed, on SQLite or PostgreSQL.
- An id that is already registered is never enrolled again, whatever its status: a
  second device cannot take over an identity (409). The operator deletes a rejected or
  revoked record first to let the id enroll anew.
- A device is ``pending`` until an operator accepts it, unless its token says
  ``auto_accept``. Rejecting or revoking it revokes its credentials in the same
  transaction. Allowed changes (:func:`next_status`): pending -> accepted | rejected |
  revoked, accepted -> revoked; asking for the status a device already has is a no-op.
- Every change of who may log in to the broker (an accepted enrollment, an accept,
  reject or revoke) moves the broker-credentials revision in the same transaction
  (:mod:`server.brokerconf.revision`), so every broker configuration folder follows it.
- Functions that take a session flush but never commit; the caller commits, so a
  failure anywhere leaves nothing behind.
"""

from __future__ import annotations

import hmac
import json
import re
import secrets
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from server.brokerconf.revision import bump_credentials_revision
from server.errors import ConflictError, InvalidInputError, NotFoundError
from server.fleet.auth import hash_password, hash_token_secret, new_secret
from server.fleet.errors import (
    DuplicateDeviceError,
    StatusChangeError,
    TokenError,
    TokenRefusedError,
)
from server.fleet.groups import get_group
from server.fleet.models import (
    Device,
    DeviceCredential,
    DeviceGroup,
    DeviceStatus,
    GroupKind,
    GroupMember,
    ProvisioningToken,
)
from server.fleet.selectors import check_tags
from server.profiles import Profile
from shared.errors import TopicError
from shared.topics import check_device_id

__all__ = [
    "MAX_TOKEN_LIFETIME",
    "MAX_TOKEN_USES",
    "TOKEN_PREFIX",
    "Action",
    "DeviceFacts",
    "Enrollment",
    "IssuedToken",
    "TokenState",
    "change_status",
    "check_facts",
    "check_token",
    "create_token",
    "enroll",
    "get_token",
    "list_tokens",
    "next_status",
    "revoke_token",
    "split_token",
    "token_state",
]

TOKEN_PREFIX = "efp"  # noqa: S105 - a prefix, not a secret
MAX_TOKEN_LIFETIME = timedelta(days=365)
MIN_TOKEN_LIFETIME = timedelta(minutes=1)
MAX_TOKEN_USES = 1_000_000
_TOKEN = re.compile(rf"{TOKEN_PREFIX}\.([0-9a-f]{{12}})\.([A-Za-z0-9_-]{{43}})")
_PROFILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

Action = Literal["accept", "reject", "revoke"]
TokenState = Literal["active", "revoked", "expired", "used_up"]


# ----------------------------------------------------------------------------- tokens


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A new token's row and the full token text (the only time the secret exists)."""

    record: ProvisioningToken
    token: str


def split_token(text: str) -> tuple[str, str]:
    """``(id, secret)`` of a token's text, or :class:`TokenError`."""
    match = _TOKEN.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise TokenError("unknown provisioning token")
    return match.group(1), match.group(2)


def token_state(token: ProvisioningToken, *, now: datetime) -> TokenState:
    """What the token can do now (pure); revoked wins over expired over used up."""
    if token.revoked:
        return "revoked"
    if now >= token.expires_at:
        return "expired"
    if token.uses >= token.max_uses:
        return "used_up"
    return "active"


def check_token(token: ProvisioningToken, *, profile: str, now: datetime) -> None:
    """Raise :class:`TokenRefusedError` unless ``token`` can enroll a ``profile`` device now."""
    state = token_state(token, now=now)
    if state == "revoked":
        raise TokenRefusedError(f"provisioning token {token.id} was revoked", reason="revoked")
    if state == "expired":
        raise TokenRefusedError(
            f"provisioning token {token.id} expired at {token.expires_at.isoformat()}",
            reason="expired",
        )
    if state == "used_up":
        raise TokenRefusedError(
            f"provisioning token {token.id} is used up ({token.uses} of {token.max_uses} uses)",
            reason="used_up",
        )
    if token.profile is not None and token.profile != profile:
        raise TokenRefusedError(
            f"provisioning token {token.id} is for profile {token.profile!r}, not {profile!r}",
            reason="profile_mismatch",
        )


def create_token(
    session: Session,
    *,
    now: datetime,
    expires_in: timedelta,
    name: str = "",
    group: str | None = None,
    profile: str | None = None,
    max_uses: int = 1,
    auto_accept: bool = False,
    known_profiles: Collection[str] | None = None,
) -> IssuedToken:
    """A new provisioning token; ``group`` must be a static group, ``profile`` a known one."""
    problems = []
    if not MIN_TOKEN_LIFETIME <= expires_in <= MAX_TOKEN_LIFETIME:
        problems.append("a token lives between 1 minute and 365 days")
    if not 1 <= max_uses <= MAX_TOKEN_USES:
        problems.append(f"max_uses must be between 1 and {MAX_TOKEN_USES}")
    if len(name) > 128:
        problems.append("the name is longer than 128 characters")
    if profile is not None and known_profiles is not None and profile not in known_profiles:
        problems.append(
            f"unknown profile {profile!r}; the profiles are {', '.join(sorted(known_profiles))}"
        )
    if problems:
        raise InvalidInputError("; ".join(problems))
    group_row: DeviceGroup | None = None
    if group is not None:
        group_row = get_group(session, name=group)
        if group_row.kind != GroupKind.STATIC:
            raise ConflictError(
                f"group {group!r} is dynamic: its members follow its selector, so a token "
                "cannot place devices in it (use a static group, or tags the selector matches)"
            )
    secret = new_secret()
    record = ProvisioningToken(
        id=secrets.token_hex(6),
        secret_hash=hash_token_secret(secret),
        name=name,
        group_id=None if group_row is None else group_row.id,
        profile=profile,
        expires_at=now + expires_in,
        max_uses=max_uses,
        auto_accept=auto_accept,
        created_at=now,
    )
    session.add(record)
    session.flush()
    return IssuedToken(record, f"{TOKEN_PREFIX}.{record.id}.{secret}")


def list_tokens(session: Session) -> list[ProvisioningToken]:
    return list(
        session.exec(select(ProvisioningToken).order_by(col(ProvisioningToken.created_at))).all()
    )


def get_token(session: Session, *, token_id: str) -> ProvisioningToken:
    token = session.get(ProvisioningToken, token_id)
    if token is None:
        raise NotFoundError(f"no provisioning token {token_id!r}")
    return token


def revoke_token(session: Session, *, token_id: str) -> ProvisioningToken:
    """Revoke a token (idempotent); devices it enrolled keep their credentials."""
    token = get_token(session, token_id=token_id)
    token.revoked = True
    session.add(token)
    session.flush()
    return token


# ----------------------------------------------------------------------------- enrollment


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What a device says about itself when it enrolls."""

    device_id: str
    profile: str
    arch: str
    runtime_name: str
    runtime_version: str
    agent_version: str
    runtimes: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Enrollment:
    """A registered device and its credentials (the password exists only here)."""

    device: Device
    username: str
    password: str
    group: str | None


def check_facts(facts: DeviceFacts, *, profiles: Mapping[str, Profile] | None) -> DeviceFacts:
    """The facts, or :class:`InvalidInputError` naming every problem (pure).

    With ``profiles`` the profile must be one of them and the device must have the
    runtime that profile runs (as ``runtime`` or among ``runtimes``).
    """
    problems = []
    try:
        check_device_id(facts.device_id)
    except TopicError as e:
        problems.append(str(e))
    if not _PROFILE.fullmatch(facts.profile):
        problems.append(f"invalid profile name {facts.profile!r}")
    elif profiles is not None:
        profile = profiles.get(facts.profile)
        if profile is None:
            problems.append(
                f"unknown profile {facts.profile!r}; the profiles are {', '.join(sorted(profiles))}"
            )
        else:
            have = {**facts.runtimes, facts.runtime_name: facts.runtime_version}
            if profile.runtime.name not in have:
                problems.append(
                    f"profile {facts.profile!r} runs {profile.runtime.name}, which this device "
                    f"does not have (it has {', '.join(sorted(have)) or 'no runtime'})"
                )
    try:
        check_tags(facts.tags)
    except InvalidInputError as e:
        problems.append(str(e))
    if problems:
        raise InvalidInputError("; ".join(problems))
    return facts


def enroll(
    session: Session,
    *,
    token: str,
    facts: DeviceFacts,
    now: datetime,
    profiles: Mapping[str, Profile] | None = None,
) -> Enrollment:
    """Register a device with a provisioning token; return it with its new credentials.

    The order of checks: the token is real (401), the facts are valid (422), the token
    may enroll this device now (403), the id is free (409). Nothing is written unless
    every check passes.
    """
    token_id, secret = split_token(token)
    record = session.get(ProvisioningToken, token_id)
    if record is None or not hmac.compare_digest(record.secret_hash, hash_token_secret(secret)):
        raise TokenError("unknown provisioning token")
    check_facts(facts, profiles=profiles)
    check_token(record, profile=facts.profile, now=now)
    existing = session.get(Device, facts.device_id)
    if existing is not None:
        raise DuplicateDeviceError(
            f"device id {facts.device_id!r} is already registered (status {existing.status}); "
            "a second device cannot take it over. Use another id, or have an operator "
            "revoke and delete the old record first"
        )
    claimed = session.exec(
        update(ProvisioningToken)
        .where(col(ProvisioningToken.id) == record.id)
        .where(col(ProvisioningToken.revoked).is_(False))
        .where(col(ProvisioningToken.uses) < col(ProvisioningToken.max_uses))
        .where(col(ProvisioningToken.expires_at) > now)
        .values(uses=col(ProvisioningToken.uses) + 1)
    )
    if claimed.rowcount != 1:  # another enrollment took the last use (or a revoke) meanwhile
        session.refresh(record)
        check_token(record, profile=facts.profile, now=now)
        raise TokenRefusedError(f"provisioning token {record.id} is used up", reason="used_up")
    session.refresh(record)
    status = DeviceStatus.ACCEPTED if record.auto_accept else DeviceStatus.PENDING
    device = Device(
        id=facts.device_id,
        status=status.value,
        profile=facts.profile,
        arch=facts.arch,
        runtime_name=facts.runtime_name,
        runtime_version=facts.runtime_version,
        agent_version=facts.agent_version,
        enrolled_at=now,
        accepted_at=now if status == DeviceStatus.ACCEPTED else None,
        status_changed_at=now,
        token_id=record.id,
    )
    device.tags = dict(facts.tags)
    device.runtimes_json = _runtimes_json(facts)
    password = new_secret()
    session.add(device)
    _flush_new_device(session, facts.device_id)
    session.add(
        DeviceCredential(
            device_id=device.id,
            username=device.id,
            password_hash=hash_password(password),
            created_at=now,
        )
    )
    group_name = None
    if record.group_id is not None:
        group = session.get(DeviceGroup, record.group_id)
        if group is not None:
            session.add(GroupMember(group_id=record.group_id, device_id=device.id, added_at=now))
            group_name = group.name
    if status == DeviceStatus.ACCEPTED:  # a login for the broker: every broker folder follows
        bump_credentials_revision(session)
    session.flush()
    return Enrollment(device=device, username=device.id, password=password, group=group_name)


def _runtimes_json(facts: DeviceFacts) -> str:
    runtimes = {**facts.runtimes, facts.runtime_name: facts.runtime_version}
    return json.dumps(dict(sorted(runtimes.items())), separators=(",", ":"))


def _flush_new_device(session: Session, device_id: str) -> None:
    try:
        session.flush()
    except IntegrityError as e:  # the same id enrolled concurrently
        session.rollback()
        raise DuplicateDeviceError(
            f"device id {device_id!r} is already registered; a second device cannot take it over"
        ) from e


# ----------------------------------------------------------------------------- status


_TRANSITIONS: dict[tuple[DeviceStatus, Action], DeviceStatus] = {
    (DeviceStatus.PENDING, "accept"): DeviceStatus.ACCEPTED,
    (DeviceStatus.PENDING, "reject"): DeviceStatus.REJECTED,
    (DeviceStatus.PENDING, "revoke"): DeviceStatus.REVOKED,
    (DeviceStatus.ACCEPTED, "accept"): DeviceStatus.ACCEPTED,
    (DeviceStatus.ACCEPTED, "revoke"): DeviceStatus.REVOKED,
    (DeviceStatus.REJECTED, "reject"): DeviceStatus.REJECTED,
    (DeviceStatus.REVOKED, "revoke"): DeviceStatus.REVOKED,
}
_WHY_NOT: dict[tuple[DeviceStatus, Action], str] = {
    (DeviceStatus.ACCEPTED, "reject"): "it is accepted; revoke it instead",
    (DeviceStatus.REJECTED, "accept"): (
        "it was rejected and its credentials are revoked; delete it and let it enroll again"
    ),
    (DeviceStatus.REJECTED, "revoke"): "it was rejected: its credentials are revoked already",
    (DeviceStatus.REVOKED, "accept"): (
        "it is revoked; delete it and let it enroll again with a new token"
    ),
    (DeviceStatus.REVOKED, "reject"): "it is revoked already",
}


def next_status(
    current: DeviceStatus | str, action: Action, *, device_id: str = "the device"
) -> DeviceStatus:
    """The status after ``action`` (pure), or :class:`StatusChangeError` saying why not."""
    status = DeviceStatus(current)
    new = _TRANSITIONS.get((status, action))
    if new is None:
        why = _WHY_NOT.get((status, action), f"it is {status.value}")
        raise StatusChangeError(f"cannot {action} {device_id}: {why}")
    return new


def change_status(session: Session, *, device: Device, action: Action, now: datetime) -> Device:
    """Accept, reject or revoke ``device``; reject and revoke also revoke its credentials."""
    new = next_status(device.status, action, device_id=f"device {device.id}")
    if new == device.status:
        return device
    device.status = new.value
    device.status_changed_at = now
    if new == DeviceStatus.ACCEPTED:
        device.accepted_at = now
    if new in (DeviceStatus.REJECTED, DeviceStatus.REVOKED):
        for credential in session.exec(
            select(DeviceCredential)
            .where(DeviceCredential.device_id == device.id)
            .where(col(DeviceCredential.revoked_at).is_(None))
        ).all():
            credential.revoked_at = now
            session.add(credential)
    session.add(device)
    bump_credentials_revision(session)  # last: the revision row is held until the commit
    session.flush()
    return device
