"""Operator tokens: making them, storing their hashes, checking them, revoking them.

What always holds:

- A token is ``ef_op_`` and 43 URL-safe characters of :func:`secrets.token_urlsafe`
  (256 bits). It is shown once, when created; the database keeps only its SHA-256.
  A plain hash suffices because the secret is random and long: there is nothing to
  guess, so a slow password hash would only slow down every request.
- Lookup is by the hash (an index), and the bootstrap admin token is compared with
  :func:`hmac.compare_digest`; a revoked or expired token fails like an unknown one.
- Names are unique forever (a revoked token keeps its name), so the audit log's
  actors stay unambiguous.
- The bootstrap admin token: ``EDGEFLEET_ADMIN_TOKEN``, or in dev mode a random one
  written once to ``<data_dir>/admin-token`` (mode 0600) and reused at later starts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from server.auth.errors import OperatorExistsError, OperatorNotFoundError, OperatorTokenError
from server.auth.models import OperatorToken, Principal, Role

__all__ = [
    "ADMIN_TOKEN_FILE",
    "BOOTSTRAP_ADMIN",
    "TOKEN_PREFIX",
    "IssuedToken",
    "Verifier",
    "admin_token_path",
    "create_operator",
    "ensure_dev_admin_token",
    "get_operator",
    "hash_token",
    "list_operators",
    "new_token",
    "read_admin_token",
    "revoke_operator",
]

TOKEN_PREFIX = "ef_op_"  # noqa: S105 - a prefix, not a secret
ADMIN_TOKEN_FILE = "admin-token"  # noqa: S105 - a file name
BOOTSTRAP_ADMIN = "admin"
"""The name the bootstrap admin token acts under (in the audit log, ``/auth/me``)."""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
_MAX_TOKEN_CHARS = 512
_HINT_CHARS = len(TOKEN_PREFIX) + 4
MAX_EXPIRES_DAYS = 3650
_LAST_USED_RESOLUTION = timedelta(minutes=1)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def check_name(name: str) -> str:
    if name == BOOTSTRAP_ADMIN or not _NAME.match(name):
        raise OperatorTokenError(
            f"operator name {name!r} must be 1-64 letters, digits or ._@+- (starting with a "
            f"letter or digit) and not {BOOTSTRAP_ADMIN!r}, which the bootstrap token uses"
        )
    return name


@dataclass(frozen=True)
class IssuedToken:
    record: OperatorToken
    token: str


def create_operator(
    session: Session,
    *,
    name: str,
    role: Role | str,
    now: datetime,
    created_by: str,
    expires_days: float | None = None,
) -> IssuedToken:
    """A new token named ``name`` with ``role``; the caller commits. The secret is returned once."""
    check_name(name)
    try:
        role = Role(role)
    except ValueError:
        raise OperatorTokenError(
            f"role {role!r} is not one of {', '.join(r.value for r in Role)}"
        ) from None
    if expires_days is not None and not 0 < expires_days <= MAX_EXPIRES_DAYS:
        raise OperatorTokenError(f"expires_days must be in (0, {MAX_EXPIRES_DAYS}]")
    if session.exec(select(OperatorToken).where(OperatorToken.name == name)).first():
        raise OperatorExistsError(f"an operator token named {name!r} exists already")
    token = new_token()
    record = OperatorToken(
        name=name,
        role=role.value,
        token_hash=hash_token(token),
        hint=token[:_HINT_CHARS],
        created_by=created_by[:64],
        created_at=now,
        expires_at=None if expires_days is None else now + timedelta(days=expires_days),
    )
    session.add(record)
    try:
        session.flush()
    except IntegrityError as e:  # a concurrent create of the same name
        session.rollback()
        raise OperatorExistsError(f"an operator token named {name!r} exists already") from e
    return IssuedToken(record, token)


def list_operators(session: Session) -> list[OperatorToken]:
    return list(session.exec(select(OperatorToken).order_by(col(OperatorToken.id))).all())


def get_operator(session: Session, *, name: str) -> OperatorToken:
    found = session.exec(select(OperatorToken).where(OperatorToken.name == name)).first()
    if found is None:
        raise OperatorNotFoundError(f"no operator token named {name!r}")
    return found


def revoke_operator(session: Session, *, name: str, now: datetime) -> OperatorToken:
    """Revoke the token named ``name`` (again is a no-op); the caller commits."""
    record = get_operator(session, name=name)
    if record.revoked_at is None:
        record.revoked_at = now
        session.add(record)
    return record


class Verifier:
    """Who a bearer token is: the bootstrap admin, an active operator token, or nobody."""

    def __init__(self, bootstrap_token: str | None) -> None:
        self._bootstrap_hash = None if bootstrap_token is None else hash_token(bootstrap_token)

    def verify(self, session: Session, token: str, *, now: datetime) -> Principal | None:
        """The principal ``token`` stands for, or None (unknown, revoked or expired).

        Refreshes the token's ``last_used_at`` (at most once a minute) and commits that.
        """
        if not token or len(token) > _MAX_TOKEN_CHARS:
            return None
        digest = hash_token(token)
        if self._bootstrap_hash is not None and hmac.compare_digest(digest, self._bootstrap_hash):
            return Principal(name=BOOTSTRAP_ADMIN, role=Role.ADMIN)
        record = session.exec(
            select(OperatorToken).where(OperatorToken.token_hash == digest)
        ).first()
        if record is None or record.revoked_at is not None:
            return None
        if record.expires_at is not None and record.expires_at <= now:
            return None
        if record.last_used_at is None or now - record.last_used_at >= _LAST_USED_RESOLUTION:
            record.last_used_at = now
            session.add(record)
            session.commit()
        return Principal(name=record.name, role=Role(record.role))


def admin_token_path(data_dir: Path) -> Path:
    return data_dir / ADMIN_TOKEN_FILE


def read_admin_token(data_dir: Path) -> str | None:
    """The dev-mode bootstrap token written under ``data_dir``, if there is one."""
    try:
        token = admin_token_path(data_dir).read_text().strip()
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    return token or None


def ensure_dev_admin_token(data_dir: Path) -> tuple[str, bool]:
    """The token in ``<data_dir>/admin-token``, made (mode 0600) if missing; (token, created)."""
    existing = read_admin_token(data_dir)
    if existing is not None:
        return existing, False
    data_dir.mkdir(parents=True, exist_ok=True)
    token = new_token()
    path = admin_token_path(data_dir)
    # O_EXCL: two processes starting at once never both write; the loser reads the winner's.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        again = read_admin_token(data_dir)
        if again is None:
            raise OperatorTokenError(f"{path} exists but holds no token") from None
        return again, False
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token, True
