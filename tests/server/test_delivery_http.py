"""HTTP range download: only the named artifact, only to its device, resumable, bounded."""

from __future__ import annotations

import base64
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient

from agent.download import http_download
from server.app import create_app
from server.settings import Settings
from shared.integrity import sha256_hex
from shared.messages import ArtifactRef
from tests.conftest import operator_client

pytestmark = pytest.mark.database

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class Authority:
    """The two questions the route asks, answered from plain data (the fleet answers them
    from its tables; tests/server/fleet covers that side)."""

    def __init__(self) -> None:
        self.passwords = {"dev-a": "secret-a", "dev-b": "secret-b"}
        self.named: dict[str, set[str]] = {"dev-a": set(), "dev-b": set()}

    def authenticate(self, device_id: str, password: str) -> bool:
        return self.passwords.get(device_id) == password

    def allowed(self, device_id: str, sha256: str) -> bool:
        return sha256 in self.named.get(device_id, set())


@pytest.fixture
def served(db_url: str, tmp_path: Path) -> Iterator[tuple[TestClient, Authority, str]]:
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, max_concurrent_transfers=2)
    app = create_app(settings)
    with operator_client(app) as client:
        authority = Authority()
        app.state.artifact_authority = authority
        sha = app.state.artifacts.put_bytes(PAYLOAD).sha256
        authority.named["dev-a"].add(sha)
        yield client, authority, sha


def url(device: str, sha: str) -> str:
    return f"/api/v1/devices/{device}/artifacts/{sha}"


def test_whole_file_and_ranges(served: tuple[TestClient, Authority, str]) -> None:
    client, _, sha = served
    auth = ("dev-a", "secret-a")
    whole = client.get(url("dev-a", sha), auth=auth)
    assert whole.status_code == 200
    assert sha256_hex(whole.content) == sha
    part = client.get(url("dev-a", sha), auth=auth, headers={"Range": "bytes=1000-"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 1000-{len(PAYLOAD) - 1}/{len(PAYLOAD)}"
    assert part.content == PAYLOAD[1000:]
    past = client.get(url("dev-a", sha), auth=auth, headers={"Range": f"bytes={len(PAYLOAD)}-"})
    assert past.status_code == 416


@pytest.mark.parametrize(
    ("device", "auth", "code", "says"),
    [
        ("dev-a", None, 401, "credentials required"),
        ("dev-a", ("dev-a", "wrong"), 401, "wrong password"),
        ("dev-a", ("dev-b", "secret-b"), 401, "not those of device 'dev-a'"),
        ("dev-b", ("dev-b", "secret-b"), 403, "does not name artifact"),
    ],
)
def test_refusals_name_the_problem(
    served: tuple[TestClient, Authority, str],
    device: str,
    auth: tuple[str, str] | None,
    code: int,
    says: str,
) -> None:
    client, _, sha = served
    response = client.get(url(device, sha), auth=auth)
    assert response.status_code == code
    assert says in response.json()["detail"]
    if code == 401:
        assert response.headers["www-authenticate"].startswith("Basic")


def test_a_named_but_missing_artifact_is_404(served: tuple[TestClient, Authority, str]) -> None:
    client, authority, _ = served
    authority.named["dev-a"].add("ab" * 32)
    response = client.get(url("dev-a", "ab" * 32), auth=("dev-a", "secret-a"))
    assert response.status_code == 404


def test_transfers_past_the_cap_get_503_with_retry_after(
    served: tuple[TestClient, Authority, str],
) -> None:
    client, _, sha = served
    limiter = client.app.state.transfer_limiter  # type: ignore[attr-defined]
    assert limiter.try_acquire() and limiter.try_acquire()  # two transfers in flight
    busy = client.get(url("dev-a", sha), auth=("dev-a", "secret-a"))
    assert busy.status_code == 503
    assert busy.headers["retry-after"] == "5"
    limiter.release()
    assert client.get(url("dev-a", sha), auth=("dev-a", "secret-a")).status_code == 200
    assert limiter.in_flight == 1  # the served transfer gave its slot back


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_agent_downloads_over_http_with_its_credentials(db_url: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url)
    app = create_app(settings)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        authority = Authority()
        app.state.artifact_authority = authority
        sha = app.state.artifacts.put_bytes(PAYLOAD).sha256
        authority.named["dev-a"].add(sha)
        dest = tmp_path / "device"
        dest.mkdir()
        ref = ArtifactRef(sha256=sha, length=len(PAYLOAD))
        opener = urllib.request.build_opener()
        token = base64.b64encode(b"dev-a:secret-a").decode()
        opener.addheaders = [("Authorization", f"Basic {token}")]
        path = http_download(
            f"http://127.0.0.1:{port}", url("dev-a", sha), ref, dest, opener=opener
        )
        assert path.read_bytes() == PAYLOAD
    finally:
        server.should_exit = True
        thread.join(10)
