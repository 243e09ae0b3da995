"""The operator-access exceptions; all derive from :class:`server.errors.ServerError`."""

from __future__ import annotations

from server.errors import ConflictError, InvalidInputError, NotFoundError, ServerError

__all__ = [
    "AuthError",
    "OperatorExistsError",
    "OperatorNotFoundError",
    "OperatorTokenError",
]


class AuthError(ServerError):
    """Root of the operator-access errors."""


class OperatorTokenError(AuthError, InvalidInputError):
    """A bad operator-token request (name, role, lifetime)."""


class OperatorExistsError(AuthError, ConflictError):
    """An operator token of that name exists already (revoked ones too: names are not reused)."""


class OperatorNotFoundError(AuthError, NotFoundError):
    """No operator token of that name."""
