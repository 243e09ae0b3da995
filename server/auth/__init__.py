"""Operator access: named bearer tokens with roles, the audit log, and rate limits.

- :mod:`server.auth.tokens` makes, hashes, checks and revokes operator tokens, and
  keeps the bootstrap admin token (``EDGEFLEET_ADMIN_TOKEN``, or in dev mode
  ``<data_dir>/admin-token``).
- :mod:`server.auth.deps` holds the FastAPI dependencies: :func:`authenticate`, the
  router-level :func:`operator_access` (reads need ``viewer``, changes ``operator``) and
  :func:`require_role`.
- :mod:`server.auth.audit` records operator actions (:func:`audit.record`).
- :mod:`server.auth.ratelimit` is the token bucket behind the 429s.

Device credentials are a different thing altogether (:mod:`server.fleet.auth`): an
operator token never opens a device route, nor a device password an operator one.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from server.auth.models import AuditEntry, OperatorToken, Principal, Role
from server.auth.ratelimit import RateLimiter
from server.auth.tokens import (
    Verifier,
    admin_token_path,
    ensure_dev_admin_token,
    read_admin_token,
)
from server.errors import ConfigurationError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from server.settings import Settings

__all__ = ["AuditEntry", "OperatorToken", "Principal", "Role", "install"]

log = logging.getLogger(__name__)


def install(app: FastAPI, settings: Settings) -> None:
    """Put the token verifier and the rate limiters on ``app.state`` (at the app's start).

    The bootstrap admin token is ``EDGEFLEET_ADMIN_TOKEN``; unset in dev mode, it is the
    one in ``<data_dir>/admin-token``, made at the first start. In prod mode there is
    none unless set, and the dev file's token is refused as ``EDGEFLEET_ADMIN_TOKEN``.
    """
    bootstrap = None if settings.admin_token is None else settings.admin_token.get_secret_value()
    path = admin_token_path(settings.data_dir)
    if bootstrap is None and settings.mode == "dev":
        bootstrap, created = ensure_dev_admin_token(settings.data_dir)
        log.warning(
            "dev mode: the admin token is in %s (%s); use it as EDGEFLEET_TOKEN, or open "
            "the dashboard at /#token=<token>",
            path,
            "new" if created else "kept from an earlier start",
        )
    elif settings.mode != "dev":
        dev_token = read_admin_token(settings.data_dir)
        if dev_token is not None and dev_token == bootstrap:
            raise ConfigurationError(
                f"EDGEFLEET_ADMIN_TOKEN is the development token from {path}; "
                "set a token of your own in prod mode"
            )
        if dev_token is not None:
            log.warning("prod mode: ignoring the development admin token in %s", path)
    app.state.operator_verifier = Verifier(bootstrap)
    app.state.auth_failures = RateLimiter(settings.auth_failures_per_minute)
    app.state.enroll_by_address = RateLimiter(settings.enroll_per_minute_per_address)
    app.state.enroll_by_token = RateLimiter(settings.enroll_per_minute_per_token)
