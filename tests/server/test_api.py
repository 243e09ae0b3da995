from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from shared.signing import Envelope, VerifyKey
from shared.trust import TrustState, accept_keyring

pytestmark = pytest.mark.database


@pytest.fixture
def client(db_url: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url)
    with TestClient(create_app(settings)) as client:
        yield client


def test_health(client: TestClient) -> None:
    response = client.get("/api/v1/health")
    assert response.status_code == 200
    assert response.json() | {"version": "x"} == {
        "status": "ok",
        "version": "x",
        "protocol": "ef/v1",
        "database": "ok",
        "broker": "embedded",
    }


def test_keyring_is_served_and_verifies_against_the_root(client: TestClient) -> None:
    from datetime import UTC, datetime

    body = client.get("/api/v1/keyring").json()
    root = VerifyKey.from_base64(body["root_public_key"])
    assert root.keyid == body["root_keyid"]
    envelope = Envelope.model_validate(body["envelope"])
    state = accept_keyring(TrustState.from_root_keys([root]), envelope, now=datetime.now(UTC))
    assert state.keyring is not None and state.keyring.version == body["version"] == 1


def test_openapi_and_docs(client: TestClient) -> None:
    spec = client.get("/api/v1/openapi.json").json()
    assert {"/api/v1/health", "/api/v1/keyring"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


def test_prod_mode_needs_keys_made_beforehand(tmp_path: Path) -> None:
    from server.errors import ConfigurationError

    settings = Settings(mode="prod", secret_key="s" * 40, data_dir=tmp_path)  # type: ignore[arg-type]
    with (
        pytest.raises(ConfigurationError, match="edgefleet keys init"),
        TestClient(create_app(settings)),
    ):
        pass
