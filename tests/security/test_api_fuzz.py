"""The API fuzzed from its own OpenAPI document (schemathesis), as an admin.

Every operation gets a bounded number of generated requests -- valid ones and ones that
break the schema -- and none may answer 5xx or crash the app; every answer must have a
documented content type and, where the document gives one, a body that fits its schema.
Answers the document does not list (401/403/404/409/429 ...) are allowed: the refusal
is the point, and the auth tests pin those down.

Without an operator token every operator route must refuse: schemathesis's
``ignored_auth`` check sends each request once more with no credentials and fails on a
success.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
)

from server.app import create_app
from server.auth.tokens import read_admin_token
from server.settings import Settings

pytestmark = [pytest.mark.database, pytest.mark.slow]

EXAMPLES_PER_OPERATION = 12
CHECKS = [
    not_a_server_error,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    ignored_auth,
]


# Built at import, since schemathesis parametrizes from the document at collection; the app
# starts once for the module (the ``admin`` fixture runs its lifespan).
_DATA_DIR = Path(tempfile.mkdtemp(prefix="edgefleet-fuzzed-api-")) / "data"
_APP = create_app(
    Settings(
        data_dir=_DATA_DIR,
        run_jobs=False,
        alert_evaluator=False,
        # Limits high enough that generated enrollments test the route, not the limiter.
        enroll_per_minute_per_address=100_000,
        enroll_per_minute_per_token=100_000,
    )
)


async def _requests_only(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The app without its lifespan: schemathesis starts and stops an app's lifespan around
    every test, and this one's start (migrations, keys) is not what is fuzzed here."""
    if scope["type"] != "lifespan":
        await _APP(scope, receive, send)
        return
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


fuzzed = schemathesis.openapi.from_dict(_APP.openapi())
fuzzed.app = _requests_only  # requests go to the app in-process


@pytest.fixture(scope="module")
def admin() -> Iterator[dict[str, str]]:
    """The admin token's header, while the app runs (once, for the whole module)."""
    try:
        with TestClient(_APP):
            token = read_admin_token(_DATA_DIR)
            assert token is not None, "the app wrote no admin token"
            headers = {"Authorization": f"Bearer {token}"}
            # The fuzzed requests do act as the admin (else every answer would be a 401).
            me = fuzzed["/api/v1/auth/me"]["GET"].Case().call(headers=headers)
            assert me.status_code == 200 and me.json()["role"] == "admin", me.text
            yield headers
    finally:
        shutil.rmtree(_DATA_DIR.parent, ignore_errors=True)


@fuzzed.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same requests every run: a failure reproduces
)
def test_no_operation_answers_5xx_or_off_its_schema(
    case: schemathesis.Case, admin: dict[str, str]
) -> None:
    case.call_and_validate(headers=admin, checks=CHECKS)
