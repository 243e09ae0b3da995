"""The feedback package's exceptions, rooted at :class:`FeedbackError`::

FeedbackError                 (a ServerError)
├── FeedbackInvalidError      422: a label, range or request that is not valid
├── FeedbackNotFoundError     404: no such device, model or version
└── FeedbackConflictError     409: the prediction was already labelled otherwise
"""

from __future__ import annotations

from server.errors import ConflictError, InvalidInputError, NotFoundError, ServerError

__all__ = [
    "FeedbackConflictError",
    "FeedbackError",
    "FeedbackInvalidError",
    "FeedbackNotFoundError",
]


class FeedbackError(ServerError):
    """Root of the feedback package's errors."""


class FeedbackInvalidError(FeedbackError, InvalidInputError):
    """A label, time range or request that is not valid; the message names it."""


class FeedbackNotFoundError(FeedbackError, NotFoundError):
    """No such device, model or model version."""


class FeedbackConflictError(FeedbackError, ConflictError):
    """The prediction already has another label (the first one stays)."""
