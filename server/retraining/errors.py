"""The retraining policies' and decisions' exceptions. Each derives from a :mod:`server.errors`
class, so the API answers it with that class's status::

    ServerError
    ├── InvalidInputError (422)
    │   └── PolicyInvalidError        a policy that cannot work as written (the field named)
    ├── NotFoundError (404)
    │   ├── PolicyNotFoundError       no policy of that name
    │   └── DecisionNotFoundError     no decision of that id
    └── ConflictError (409)
        ├── PolicyConflictError       a policy name that is taken
        └── DecisionStateError        approve / reject a decision that is not pending

What goes wrong *after* a decision was taken -- a run that fails, a version that passes
no gate, a rollout the fleet refuses -- is not raised: the decision ends ``failed``
with that reason.
"""

from __future__ import annotations

from server.errors import ConflictError, InvalidInputError, NotFoundError

__all__ = [
    "DecisionNotFoundError",
    "DecisionStateError",
    "PolicyConflictError",
    "PolicyInvalidError",
    "PolicyNotFoundError",
]


class PolicyInvalidError(InvalidInputError):
    """A policy that cannot work: no groups, an offline condition, a bad canary, ..."""


class PolicyNotFoundError(NotFoundError):
    """No retraining policy of that name."""


class DecisionNotFoundError(NotFoundError):
    """No retraining decision of that id."""


class PolicyConflictError(ConflictError):
    """A retraining policy of that name exists already."""


class DecisionStateError(ConflictError):
    """The decision is not in a status the command applies to."""
