"""The broker configuration's one exception."""

from __future__ import annotations

from server.errors import ConfigurationError

__all__ = ["BrokerConfigError"]


class BrokerConfigError(ConfigurationError):
    """A broker configuration cannot be made, written or applied as asked.

    Bad input (a path or name Mosquitto could not parse safely, a missing TLS file),
    an unreadable database, an unwritable folder, or a broker that cannot be told to
    reload.
    """
