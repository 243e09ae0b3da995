"""FastAPI dependencies of operator access: who a request is, and whether its role may.

- :func:`authenticate` reads ``Authorization: Bearer <token>``; no token, or an unknown,
  revoked or expired one, is a 401 with ``WWW-Authenticate: Bearer``. Failed attempts
  are counted per source address; past the limit every attempt from there is a 429
  with ``Retry-After`` until the bucket refills.
- :func:`operator_access` is the router-level rule: GET / HEAD / OPTIONS need
  ``viewer``, every other method ``operator``.
- :func:`require_role` adds a stricter need to one route (``require_admin``); too low a
  role is a 403 whose detail names the role needed.

The limiters and the verifier live on ``app.state`` (built by
:func:`server.auth.install`), so each app -- and each test -- has its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.api.deps import NowDep, SessionDep
from server.auth.models import Principal, Role
from server.auth.ratelimit import RateLimiter
from server.auth.tokens import Verifier

__all__ = [
    "AdminDep",
    "OperatorDep",
    "PrincipalDep",
    "authenticate",
    "client_address",
    "operator_access",
    "rate_limited",
    "require_admin",
    "require_operator",
    "require_role",
]

_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Declares the bearer scheme in the OpenAPI document (the docs' "Authorize" button); the
# header itself is read below, so a wrong scheme gets its own message.
_bearer_scheme = HTTPBearer(auto_error=False, description="an operator token (ef_op_...)")
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="edgefleet"'}


def client_address(request: Request) -> str:
    """The peer's address (behind a proxy: run uvicorn with ``--forwarded-allow-ips``)."""
    return request.client.host if request.client is not None else "unknown"


def rate_limited(seconds: int, what: str) -> HTTPException:
    return HTTPException(
        status.HTTP_429_TOO_MANY_REQUESTS,
        detail=f"too many {what}; try again in {seconds} s",
        headers={"Retry-After": str(seconds)},
    )


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail, headers=_CHALLENGE)


def authenticate(
    request: Request,
    session: SessionDep,
    now: NowDep,
    _declared: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)],
) -> Principal:
    failures: RateLimiter = request.app.state.auth_failures
    verifier: Verifier = request.app.state.operator_verifier
    address = client_address(request)
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    wait = failures.retry_after(address)
    if wait is not None:
        raise rate_limited(wait, "failed token attempts from this address")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    well_formed = scheme.lower() == "bearer" and bool(token)
    principal = verifier.verify(session, token, now=now) if well_formed else None
    if principal is None:
        failures.hit(address)
        if not well_formed:
            raise _unauthorized("the Authorization header must be 'Bearer <token>'")
        raise _unauthorized("invalid, expired or revoked token")
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(authenticate)]


def _check(principal: Principal, needed: Role) -> Principal:
    if not principal.role.allows(needed):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            detail=f"this needs the {needed.value} role; "
            f"{principal.name!r} has the {principal.role.value} role",
        )
    return principal


def require_role(needed: Role) -> Callable[[Principal], Principal]:
    """A dependency admitting ``needed`` and the roles above it."""

    def dependency(principal: PrincipalDep) -> Principal:
        return _check(principal, needed)

    dependency.__name__ = f"require_{needed.value}"
    return dependency


require_operator = require_role(Role.OPERATOR)
require_admin = require_role(Role.ADMIN)
OperatorDep = Annotated[Principal, Depends(require_operator)]
AdminDep = Annotated[Principal, Depends(require_admin)]


def operator_access(request: Request, principal: PrincipalDep) -> Principal:
    """Reads need ``viewer``; anything that changes something needs ``operator``."""
    needed = Role.VIEWER if request.method in _READ_METHODS else Role.OPERATOR
    return _check(principal, needed)
