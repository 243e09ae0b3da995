"""The check an agent wheel passes before it is published: :func:`shared.wheel.inspect_wheel`,
the very rules a device applies before it installs the wheel, on the uploaded bytes.

What always holds for a wheel :func:`inspect_wheel` accepts: everything
:mod:`shared.wheel` says, under its default limits (:data:`shared.wheel.DEFAULT_LIMITS`,
no larger than a device's own), and -- when the upload names a file -- the name is
``edgefleet-<version>-…`` of the version inside. Anything else raises
:class:`~server.agent_releases.errors.InvalidWheelError` (HTTP 422) with the
:class:`~shared.wheel.WheelError`'s message, naming the first problem found.
"""

from __future__ import annotations

import io

from server.agent_releases.errors import InvalidWheelError
from shared.wheel import DISTRIBUTION, WheelError, WheelFacts, open_wheel
from shared.wheel import inspect_wheel as check_wheel

__all__ = ["DISTRIBUTION", "WheelFacts", "inspect_wheel"]


def inspect_wheel(data: bytes, *, filename: str | None = None) -> WheelFacts:
    """Check ``data`` as an agent wheel (see the module docstring) and describe it."""
    try:
        with open_wheel(io.BytesIO(data)) as archive:
            facts = check_wheel(archive)
    except WheelError as e:
        raise InvalidWheelError(e.message) from e
    if filename is not None and not filename.startswith(f"{DISTRIBUTION}-{facts.version}-"):
        raise InvalidWheelError(
            f"the file is named {filename!r} but holds {DISTRIBUTION} {facts.version}"
        )
    return facts
