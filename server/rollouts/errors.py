"""The exceptions of the rollouts package; all derive from :class:`RolloutError`.

::

    RolloutError (ServerError)
    ├── InvalidRolloutError     a spec or a phase list that cannot work        (422)
    ├── RolloutStateError       a command the rollout's status does not allow  (409)
    ├── DesiredStateError       a desired state that cannot be built or signed (409)
    └── PublishError            the broker did not take a desired state        (503)

Bad data (the first three) stays apart from the transport fault (:class:`PublishError`):
retrying helps only the last.
"""

from __future__ import annotations

from server.errors import ServerError

__all__ = [
    "DesiredStateError",
    "InvalidRolloutError",
    "PublishError",
    "RolloutError",
    "RolloutStateError",
]


class RolloutError(ServerError):
    """Root of every error the rollouts package raises on purpose."""


class InvalidRolloutError(RolloutError):
    """A rollout spec, phase list or gate threshold that cannot work."""

    status_code = 422


class RolloutStateError(RolloutError):
    """A command (pause, resume, approve, abort) that the rollout's status does not allow."""

    status_code = 409


class DesiredStateError(RolloutError):
    """A device's desired state cannot be built: no usable artifact, or no valid keyring."""

    status_code = 409


class PublishError(RolloutError):
    """The broker did not acknowledge a desired state in time, or the connection is down."""

    status_code = 503
