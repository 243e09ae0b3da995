"""Fleet test helpers: an app on the test database with a clock the test moves, a live
server in a thread (for the CLIs), and the shapes of tokens and enrollment requests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.api.deps import get_now
from server.app import create_app
from server.settings import Settings
from tests.conftest import operator_client

PROFILE = "edge-x86_64-litert"
OTHER_PROFILE = "edge-arm64-litert"
START = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)


@dataclass
class Clock:
    now: datetime = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


@dataclass
class Fleet:
    """An app with its test client and clock, and small helpers for its API."""

    app: FastAPI
    client: TestClient
    clock: Clock

    def token(self, **body: Any) -> dict[str, Any]:
        response = self.client.post("/api/v1/provisioning-tokens", json=body)
        assert response.status_code == 201, response.text
        token: dict[str, Any] = response.json()
        return token

    def enroll(self, token: str, device_id: str, **facts: Any) -> Any:
        return self.client.post("/api/v1/enroll", json=enroll_body(token, device_id, **facts))

    def enrolled(self, device_id: str, *, accept: bool = True, **facts: Any) -> dict[str, Any]:
        """A device enrolled with its own one-use token (and accepted unless told not to)."""
        token = self.token(auto_accept=accept, profile=facts.get("profile", PROFILE))
        response = self.enroll(token["token"], device_id, **facts)
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    def device(self, device_id: str) -> dict[str, Any]:
        response = self.client.get(f"/api/v1/devices/{device_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


def enroll_body(token: str, device_id: str, **facts: Any) -> dict[str, Any]:
    body = {
        "token": token,
        "device_id": device_id,
        "profile": PROFILE,
        "arch": "x86_64",
        "runtime": {"name": "litert", "version": "2.3.0"},
        "runtimes": {"litert": "2.3.0"},
        "agent_version": "0.1.0",
        "tags": {},
    }
    body.update(facts)
    return body


def fleet_settings(db_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=db_url, **overrides)


@pytest.fixture
def fleet(db_url: str, tmp_path: Path) -> Iterator[Fleet]:
    app = create_app(fleet_settings(db_url, tmp_path, run_jobs=False))
    clock = Clock()
    app.dependency_overrides[get_now] = clock
    with operator_client(app) as client:
        yield Fleet(app, client, clock)


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free loopback port in a thread; yield its URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="fleet-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # uvicorn offers no readiness event to wait on
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
