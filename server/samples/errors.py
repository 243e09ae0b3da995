"""The samples package's exceptions, rooted at :class:`SamplesError`::

SamplesError                 (a ServerError)
├── SamplesInvalidError      422: a request that cannot be answered as asked
└── SamplesNotFoundError     404: no such model, version or dataset
"""

from __future__ import annotations

from server.errors import InvalidInputError, NotFoundError, ServerError

__all__ = ["SamplesError", "SamplesInvalidError", "SamplesNotFoundError"]


class SamplesError(ServerError):
    """Root of the samples package's errors."""


class SamplesInvalidError(SamplesError, InvalidInputError):
    """The request cannot be answered as asked; the message says why and what to do."""


class SamplesNotFoundError(SamplesError, NotFoundError):
    """No such model, model version or dataset version."""
