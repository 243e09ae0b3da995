"""The fleet drift view's exceptions. Each derives from a :mod:`server.errors` class, so the
API answers it with that class's status::

    ServerError
    ├── InvalidInputError (422)
    │   └── TimeRangeError          a since / until / bucket that cannot be read or is empty
    ├── NotFoundError (404)
    │   └── NoReferenceError        the model version carries no drift reference
    ├── ConflictError (409)
    │   └── LayoutMismatchError     stored counts were laid out unlike the version's reference
    └── RollupMismatchError (500)   a day's rollup row is not the sum of its hours' rows

Unknown models, versions and groups are the registry's and the fleet's
:class:`~server.errors.NotFoundError` (404).
"""

from __future__ import annotations

from server.errors import ConflictError, InvalidInputError, NotFoundError, ServerError

__all__ = ["LayoutMismatchError", "NoReferenceError", "RollupMismatchError", "TimeRangeError"]


class TimeRangeError(InvalidInputError):
    """A time or range the drift view cannot use; the message names the parameter."""


class NoReferenceError(NotFoundError):
    """No bundle of the model version carries a drift reference to compare against."""


class LayoutMismatchError(ConflictError):
    """Rollups under this reference id were stored in another layout than the reference's."""


class RollupMismatchError(ServerError):
    """Rollup rows that must agree do not: a bug or a hand-edited database, never bad input."""
