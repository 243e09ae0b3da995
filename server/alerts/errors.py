"""The alerts' exceptions. Each derives from a :mod:`server.errors` class, so the API answers
it with that class's status::

    ServerError
    ├── InvalidInputError (422)
    │   └── RuleInvalidError       a rule that cannot be evaluated as written (the field named)
    ├── NotFoundError (404)
    │   ├── RuleNotFoundError      no alert rule of that name
    │   └── AlertNotFoundError     no alert of that id
    └── ConflictError (409)
        └── RuleConflictError      a rule name that is taken

A webhook that cannot be reached or answers an error is not an exception anyone sees:
its delivery row records the failure and when it is tried again
(:mod:`server.alerts.webhook`). Unknown models and groups are the registry's and the
fleet's :class:`~server.errors.NotFoundError` (404).
"""

from __future__ import annotations

from server.errors import ConflictError, InvalidInputError, NotFoundError

__all__ = ["AlertNotFoundError", "RuleConflictError", "RuleInvalidError", "RuleNotFoundError"]


class RuleInvalidError(InvalidInputError):
    """A rule that cannot work: a model on an offline rule, none on a drift rule, ..."""


class RuleNotFoundError(NotFoundError):
    """No alert rule of that name."""


class AlertNotFoundError(NotFoundError):
    """No alert of that id."""


class RuleConflictError(ConflictError):
    """An alert rule of that name exists already."""
