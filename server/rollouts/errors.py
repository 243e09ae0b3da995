"""The exceptions of the rollouts package; all derive from :class:`RolloutError`.

::

    RolloutError (ServerError)
    ├── InvalidRolloutError     a spec or a phase list that cannot work        (422)
    ├── RolloutNotFoundError    no rollout with that id                         (404)
    ├── PinNotFoundError        no pin of that device and model                 (404)
    ├── RolloutConflictError    a rollout or pin the registry or the fleet      (409)
    │                           refuses: an ungated version, overlapping
    │                           rollouts, a concurrent change
    ├── RolloutStateError       a command the rollout's status does not allow  (409)
    ├── DesiredStateError       a desired state that cannot be built or signed (409)
    └── PublishError            the broker did not take a desired state        (503)

Bad data and refusals stay apart from the transport fault (:class:`PublishError`):
retrying helps only the last.
"""

from __future__ import annotations

from server.errors import ServerError

__all__ = [
    "DesiredStateError",
    "InvalidRolloutError",
    "PinNotFoundError",
    "PublishError",
    "RolloutConflictError",
    "RolloutError",
    "RolloutNotFoundError",
    "RolloutStateError",
]


class RolloutError(ServerError):
    """Root of every error the rollouts package raises on purpose."""


class InvalidRolloutError(RolloutError):
    """A rollout spec, phase list or gate threshold that cannot work."""

    status_code = 422


class RolloutNotFoundError(RolloutError):
    """No rollout has the id asked for."""

    status_code = 404


class PinNotFoundError(RolloutError):
    """The device has no pin on the model asked for."""

    status_code = 404


class RolloutConflictError(RolloutError):
    """A rollout or pin that cannot be made: the version is not ready or not gated, another
    active rollout of the model covers some of the devices, or the rollout changed
    concurrently."""

    status_code = 409


class RolloutStateError(RolloutError):
    """A command (pause, resume, approve, abort) that the rollout's status does not allow."""

    status_code = 409


class DesiredStateError(RolloutError):
    """A device's desired state cannot be built: no usable artifact, or no valid keyring."""

    status_code = 409


class PublishError(RolloutError):
    """The broker did not acknowledge a desired state in time, or the connection is down."""

    status_code = 503
