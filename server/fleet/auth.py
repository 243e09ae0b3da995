"""Device secrets: generating, hashing and checking them, and device authentication.

What always holds:

- Secrets are made by :mod:`secrets` (256 bits) and only their hashes are stored.
- A device password is hashed with PBKDF2-HMAC-SHA512 and a random 12-byte salt, and
  stored in Mosquitto's own password-file format ``$7$<iterations>$<salt>$<hash>``
  (standard base64), so a broker configuration can be written from the database
  without ever knowing a password. The iteration count lives in each hash, so it can
  be raised later without invalidating old ones.
- Every comparison of secrets is constant-time (:func:`hmac.compare_digest`), and an
  unknown username costs as much as a wrong password.
- :func:`authenticate_device` admits only an *accepted* device with its *active*
  credential; a revoked device has no active credential, so its old password fails
  like any wrong one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from server.fleet.errors import DeviceAuthError, DeviceNotAcceptedError
from server.fleet.models import Device, DeviceCredential, DeviceStatus

__all__ = [
    "PASSWORD_ITERATIONS",
    "DeviceAuthenticator",
    "authenticate_device",
    "hash_password",
    "hash_token_secret",
    "new_secret",
    "verify_password",
]

PASSWORD_ITERATIONS = 10_000
"""PBKDF2 rounds for device passwords. They are 256-bit random strings, so the rounds
only slow down an attacker who stole the table; the broker checks a hash on every
CONNECT, which is why this is not in the hundreds of thousands meant for human
passwords."""

_SALT_BYTES = 12  # what mosquitto_passwd uses
_MAX_PASSWORD_BYTES = 1024
_MIN_ITERATIONS = 1
_MAX_ITERATIONS = 10_000_000
# Verified against when the username is unknown, so that costs the same as a wrong password.
_DUMMY_HASH = (
    f"$7${PASSWORD_ITERATIONS}$"
    + base64.b64encode(b"\0" * _SALT_BYTES).decode()
    + "$"
    + base64.b64encode(b"\0" * 64).decode()
)


def new_secret() -> str:
    """A fresh 256-bit secret, URL-safe base64 (43 characters, no '.')."""
    return secrets.token_urlsafe(32)


def hash_token_secret(secret: str) -> str:
    """SHA-256 hex of a provisioning token's secret (a 256-bit random value needs no KDF)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def hash_password(
    password: str, *, iterations: int = PASSWORD_ITERATIONS, salt: bytes | None = None
) -> str:
    """``$7$<iterations>$<salt>$<hash>``: PBKDF2-HMAC-SHA512, as Mosquitto's password file."""
    if not _MIN_ITERATIONS <= iterations <= _MAX_ITERATIONS:
        raise ValueError(f"iterations must be between {_MIN_ITERATIONS} and {_MAX_ITERATIONS}")
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches ``encoded``; a malformed hash never matches."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except (ValueError, binascii.Error):
        return False
    if not _MIN_ITERATIONS <= iterations <= _MAX_ITERATIONS or len(expected) != 64:
        return False
    raw = password.encode("utf-8", "surrogatepass")
    if len(raw) > _MAX_PASSWORD_BYTES:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", raw, salt, iterations)
    return hmac.compare_digest(digest, expected)


def authenticate_device(session: Session, username: str, password: str) -> Device:
    """The accepted device whose active credential ``username`` / ``password`` is.

    Raises :class:`DeviceAuthError` (401) for an unknown username, a wrong password or
    a revoked credential -- one message for all three -- and
    :class:`DeviceNotAcceptedError` (403) when the password is right but the device is
    pending or rejected.
    """
    credential = session.exec(
        select(DeviceCredential)
        .where(DeviceCredential.username == username)
        .where(col(DeviceCredential.revoked_at).is_(None))
    ).first()
    if credential is None:
        verify_password(password, _DUMMY_HASH)
        raise DeviceAuthError("invalid device credentials")
    if not verify_password(password, credential.password_hash):
        raise DeviceAuthError("invalid device credentials")
    device = session.get(Device, credential.device_id)
    if device is None or device.status == DeviceStatus.REVOKED:
        raise DeviceAuthError("invalid device credentials")
    if device.status != DeviceStatus.ACCEPTED:
        why = (
            "was rejected by an operator"
            if device.status == DeviceStatus.REJECTED
            else "is pending: an operator has not accepted it yet"
        )
        raise DeviceNotAcceptedError(f"device {device.id} {why}", status=device.status)
    return device


class DeviceAuthenticator:
    """``authenticate(device_id, password) -> bool`` over the fleet's tables, for code that
    asks only yes or no (the HTTP artifact route's ``ArtifactAuthority``, a broker hook).
    Each call opens its own short session."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def authenticate(self, device_id: str, password: str) -> bool:
        with Session(self.engine) as session:
            try:
                device = authenticate_device(session, device_id, password)
            except (DeviceAuthError, DeviceNotAcceptedError):
                return False
            return device.id == device_id
