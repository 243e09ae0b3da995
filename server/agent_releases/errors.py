"""The agent releases' exceptions (HTTP status in ``status_code``)."""

from __future__ import annotations

from server.errors import ConflictError, InvalidInputError, NotFoundError, ServerError

__all__ = [
    "AgentReleaseError",
    "AgentReleaseExistsError",
    "AgentReleaseNotFoundError",
    "InvalidWheelError",
]


class AgentReleaseError(ServerError):
    """The root of this package's errors."""


class InvalidWheelError(AgentReleaseError, InvalidInputError):
    """The file is not a wheel of the agent the devices can install; the message says why."""


class AgentReleaseExistsError(AgentReleaseError, ConflictError):
    """That version is published already (a version names one wheel, for ever)."""


class AgentReleaseNotFoundError(AgentReleaseError, NotFoundError):
    """No release of that version."""
