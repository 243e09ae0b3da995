"""The agent's exceptions: everything it raises on purpose derives from :class:`AgentError`.

Failures of the wire contract (bad signatures, hash mismatches, malformed
payloads) stay :class:`shared.errors.ContractError`s; the agent reports their
``reason`` as is.
"""

from __future__ import annotations

__all__ = ["AgentError", "ConfigError"]


class AgentError(Exception):
    """Root of the agent's own errors."""


class ConfigError(AgentError):
    """The agent's configuration or key files cannot be used."""
