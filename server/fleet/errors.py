"""The fleet's exceptions. Each derives from a :mod:`server.errors` class, so the API
answers it with that class's status::

    ServerError
    ├── InvalidInputError (422)
    │   └── SelectorError              a selector that does not parse; ``position`` says where
    ├── ConflictError (409)
    │   ├── DuplicateDeviceError       enrolling an id that is already registered
    │   └── StatusChangeError          accept / reject / revoke not possible from this status
    ├── TokenError (401)               an unknown or mistyped provisioning token
    ├── TokenRefusedError (403)        a real token that cannot enroll this device;
    │                                  ``reason``: revoked, expired, used_up, profile_mismatch
    ├── DeviceAuthError (401)          unknown device, wrong or revoked password
    └── DeviceNotAcceptedError (403)   right password, but the device is pending or rejected
"""

from __future__ import annotations

from server.errors import ConflictError, InvalidInputError, ServerError

__all__ = [
    "DeviceAuthError",
    "DeviceNotAcceptedError",
    "DuplicateDeviceError",
    "SelectorError",
    "StatusChangeError",
    "TokenError",
    "TokenRefusedError",
]


class SelectorError(InvalidInputError):
    """A selector expression that does not parse or names an impossible value.

    ``position`` is the 0-based index in ``text`` where the problem starts.
    """

    def __init__(self, problem: str, *, text: str, position: int) -> None:
        self.problem = problem
        self.text = text
        self.position = position
        shown = text if len(text) <= 200 else text[:197] + "..."
        caret = " " * min(position, len(shown)) + "^"
        super().__init__(
            f"invalid selector: {problem} at position {position}\n  {shown}\n  {caret}"
        )


class DuplicateDeviceError(ConflictError):
    """A device with this id is already registered; enrolling again must not take it over."""


class StatusChangeError(ConflictError):
    """The requested status change is not possible from the device's current status."""


class TokenError(ServerError):
    """The provisioning token is unknown or malformed (the message never says which)."""

    status_code = 401


class TokenRefusedError(ServerError):
    """A valid provisioning token that cannot enroll this device now."""

    status_code = 403

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class DeviceAuthError(ServerError):
    """Device credentials that do not authenticate (unknown, wrong or revoked)."""

    status_code = 401


class DeviceNotAcceptedError(ServerError):
    """The credentials are right, but the device is not accepted (pending or rejected)."""

    status_code = 403

    def __init__(self, message: str, *, status: str) -> None:
        super().__init__(message)
        self.status = status
