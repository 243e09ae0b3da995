"""The broker rules checked live against the database: what the embedded broker enforces.

Mosquitto gets files (:mod:`server.brokerconf.writer`); the embedded broker asks a
:class:`FleetAccess` instead. It admits:

- the server's **service identity** (``service_username`` with ``service_password``),
  with any client id, under :func:`~server.brokerconf.rules.service_rules`;
- an **accepted device** whose password matches its live credential
  (:func:`server.fleet.auth.authenticate_device`), only with its device id as client id
  (Mosquitto's device listener rewrites the client id to the username instead; refusing
  is the closest amqtt can do), under :func:`~server.brokerconf.rules.device_rules`.

Nobody else: no anonymous client, no username that is not a device id, no pending,
rejected or revoked device, no wrong password.

A login is not forever: :meth:`FleetAccess.still_allowed` re-reads the device's
credential at most every ``recheck_seconds`` (default 2 s), so a device revoked while
connected loses every topic within that time, on its next publish or delivery.

Methods that may touch the database block (``login``, ``still_allowed``); the embedded
broker calls them off its event loop. :meth:`FleetAccess.cached_verdict` never blocks.
All methods are thread-safe.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from server.brokerconf.rules import Rules, device_rules, service_rules
from server.fleet.auth import authenticate_device
from server.fleet.errors import DeviceAuthError, DeviceNotAcceptedError
from server.fleet.models import Device, DeviceCredential, DeviceStatus
from shared.errors import TopicError
from shared.topics import check_device_id

__all__ = ["DEFAULT_RECHECK_SECONDS", "FleetAccess", "Identity"]

DEFAULT_RECHECK_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a connection logged in as, and what it may do."""

    username: str
    rules: Rules
    credential_id: int | None
    """The device credential it logged in with (``None`` for the service identity)."""

    @property
    def is_service(self) -> bool:
        return self.credential_id is None


class FleetAccess:
    """Logins and live re-checks over the fleet's tables (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        *,
        service_username: str,
        service_password: str,
        recheck_seconds: float = DEFAULT_RECHECK_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not service_username or not service_password:
            raise ValueError("the service identity needs a username and a password")
        self.engine = engine
        self.service_username = service_username
        self.recheck_seconds = recheck_seconds
        self._service_password = service_password.encode("utf-8")
        self._service_rules = service_rules()
        self._clock = clock
        self._lock = threading.Lock()
        self._verdicts: dict[int, tuple[bool, float]] = {}  # credential id -> (ok, checked at)

    def login(
        self, username: str | None, password: str | None, client_id: str | None
    ) -> Identity | None:
        """The identity these CONNECT fields log in as, or ``None`` (refused). Blocks."""
        if username is None or password is None:
            return None
        if username == self.service_username:
            given = password.encode("utf-8", "surrogatepass")
            if hmac.compare_digest(given, self._service_password):
                return Identity(username, self._service_rules, None)
            return None
        try:
            check_device_id(username)
        except TopicError:
            return None
        if client_id != username:
            return None
        try:
            with Session(self.engine) as session:
                device = authenticate_device(session, username, password)
                credential_id = session.exec(
                    select(DeviceCredential.id)
                    .where(DeviceCredential.device_id == device.id)
                    .where(DeviceCredential.username == username)
                    .where(col(DeviceCredential.revoked_at).is_(None))
                    .order_by(col(DeviceCredential.created_at).desc())
                ).first()
        except (DeviceAuthError, DeviceNotAcceptedError, SQLAlchemyError):
            return None
        if credential_id is None:
            return None
        with self._lock:
            self._verdicts[credential_id] = (True, self._clock())
        return Identity(username, device_rules(username), credential_id)

    def cached_verdict(self, identity: Identity) -> bool | None:
        """Whether ``identity`` may still act, if known without the database; never blocks."""
        if identity.is_service:
            return True
        assert identity.credential_id is not None
        with self._lock:
            verdict = self._verdicts.get(identity.credential_id)
        if verdict is None or self._clock() - verdict[1] >= self.recheck_seconds:
            return None
        return verdict[0]

    def still_allowed(self, identity: Identity) -> bool:
        """Whether ``identity``'s device is still accepted with that same credential. Blocks
        (at most one query per device every ``recheck_seconds``)."""
        cached = self.cached_verdict(identity)
        if cached is not None:
            return cached
        assert identity.credential_id is not None
        try:
            with Session(self.engine) as session:
                credential = session.get(DeviceCredential, identity.credential_id)
                device = session.get(Device, identity.username)
                allowed = (
                    credential is not None
                    and credential.revoked_at is None
                    and device is not None
                    and device.status == DeviceStatus.ACCEPTED
                )
        except SQLAlchemyError:
            allowed = False  # fail closed; the next check asks again
        with self._lock:
            self._verdicts[identity.credential_id] = (allowed, self._clock())
        return allowed
