"""The server's exceptions. Everything raised on purpose derives from :class:`ServerError`.

The API turns each into an HTTP status (``status_code``) with the message as the
detail; the CLI prints the message. Foreign exceptions are translated at the
boundary with ``raise ... from e``.
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "ConfigurationError",
    "ConflictError",
    "InvalidInputError",
    "NotFoundError",
    "ServerError",
]


class ServerError(Exception):
    status_code = 500


class ConfigurationError(ServerError):
    """The server cannot start as configured (bad URL, missing key, busy port)."""


class InvalidInputError(ServerError):
    status_code = 422


class NotFoundError(ServerError):
    status_code = 404


class ConflictError(ServerError):
    status_code = 409


class ArtifactError(ServerError):
    """An artifact could not be stored or read back intact."""

    status_code = 422
