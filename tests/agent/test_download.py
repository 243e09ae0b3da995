"""Artifact downloads end to end: a real Mosquitto, a real BlockServer and ArtifactStore, a real
uvicorn for HTTP ranges; faults made real where they can be (broker killed, process SIGKILLed,
store file altered) and by small lying responders where they cannot."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import uvicorn

from agent.config import DownloadConfig, Limits
from agent.download import (
    ArtifactRejected,
    BlockDownloader,
    DownloadCancelled,
    DownloadTimeout,
    FrameSource,
    PahoFrameSource,
    TransportFrameSource,
    http_download,
)
from server.artifacts import ArtifactStore
from server.delivery.blocks import BlockServer
from shared.errors import HashMismatchError, LengthMismatchError
from shared.messages import ArtifactRef, BlockHeader, BlockRequest, encode_block
from shared.topics import Channel, device_topic
from tests.conftest import BrokerEndpoint, MosquittoProcess, TestClient

REPO = Path(__file__).resolve().parents[2]
SIZE = 1024 * 1024 + 12_345  # ~1 MB, not a whole number of blocks
FAST_LIMITS = Limits(backoff_min_seconds=0.02, backoff_max_seconds=0.2)
WAIT = 30.0


class Artifact:
    def __init__(self, store: ArtifactStore, data: bytes) -> None:
        self.store = store
        self.data = data
        stored = store.put_bytes(data)
        self.ref = ArtifactRef(sha256=stored.sha256, length=stored.length)
        self.path = stored.path


@pytest.fixture
def artifact(tmp_path: Path) -> Artifact:
    return Artifact(ArtifactStore(tmp_path / "store"), os.urandom(SIZE))


@pytest.fixture
def device_id() -> str:
    return f"dl-{uuid.uuid4().hex[:8]}"


class Requests:
    """An ``authorize`` that allows everything and lets a test wait for the n-th request."""

    def __init__(self, *, stall_at: int | None = None) -> None:
        self.count = 0
        self.stall_at = stall_at
        self.stalled = threading.Event()
        self.release = threading.Event()
        self._changed = threading.Condition()

    def __call__(self, device_id: str, sha256: str) -> bool:
        with self._changed:
            self.count += 1
            number = self.count
            self._changed.notify_all()
        if number == self.stall_at:
            self.stalled.set()
            self.release.wait(WAIT)
            return False  # its asker is gone by then
        return True

    def wait_for(self, count: int, timeout: float = WAIT) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: self.count >= count, timeout), (
                f"only {self.count} block requests within {timeout} s"
            )


@contextlib.contextmanager
def block_server(
    store: ArtifactStore, endpoint: BrokerEndpoint, authorize: Callable[[str, str], bool]
) -> Iterator[BlockServer]:
    server = BlockServer(
        store,
        authorize=authorize,
        host=endpoint.host,
        port=endpoint.port,
        publish_timeout=2.0,
        reconnect_delay=(0.05, 0.2),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def frame_source(device_id: str, endpoint: BrokerEndpoint) -> Iterator[PahoFrameSource]:
    with PahoFrameSource(
        device_id, endpoint.host, endpoint.port, reconnect_delay=(0.05, 0.2)
    ) as source:
        yield source


def downloader(
    source: FrameSource, device_id: str, *, timeout: float = 5.0, **config: Any
) -> BlockDownloader:
    settings = {"block_size": 64 * 1024, "blocks_per_request": 8} | config
    return BlockDownloader(
        source,
        device_id,
        DownloadConfig(request_timeout_seconds=timeout, **settings),
        FAST_LIMITS,
    )


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


# ----------------------------------------------------------------------------- MQTT blocks


@pytest.mark.broker
def test_a_complete_download_is_verified_and_synced_into_place(
    mqtt_broker: BrokerEndpoint, artifact: Artifact, device_id: str, tmp_path: Path
) -> None:
    dest = tmp_path / "device"
    with (
        block_server(artifact.store, mqtt_broker, lambda d, s: d == device_id) as server,
        frame_source(device_id, mqtt_broker) as source,
    ):
        started = time.perf_counter()
        path = downloader(source, device_id).download(artifact.ref, dest)
        elapsed = time.perf_counter() - started
        served = server.stats()["bytes_served"]

    assert path == dest / artifact.ref.sha256
    assert path.read_bytes() == artifact.data
    assert leftovers(dest) == [artifact.ref.sha256]  # no .part, no sidecar
    assert served == SIZE  # every byte exactly once
    print(f"\nblock download: {SIZE / elapsed / 1e6:.1f} MB/s over loopback Mosquitto")


@pytest.mark.broker
def test_the_agent_transport_carries_a_download(
    mqtt_broker: BrokerEndpoint, artifact: Artifact, device_id: str, tmp_path: Path
) -> None:
    """The same downloader over ``agent.transport.MqttTransport``, the device's own connection."""
    from agent.config import BrokerConfig
    from agent.transport import MqttTransport

    transport = MqttTransport(
        BrokerConfig(url=mqtt_broker.url), device_id=device_id, limits=FAST_LIMITS
    )
    source = TransportFrameSource(transport, device_id)
    stop = threading.Event()

    def dispatch() -> None:  # what the agent's main loop does with the transport's inbox
        while not stop.is_set():
            with contextlib.suppress(queue.Empty):
                message = transport.inbox.get(timeout=0.05)
                if message.topic == source.topic:
                    source.deliver(message.payload)

    dispatcher = threading.Thread(target=dispatch, daemon=True)
    dispatcher.start()
    transport.start()
    try:
        assert transport.subscribe(source.topic).wait(WAIT)
        with block_server(artifact.store, mqtt_broker, lambda d, s: d == device_id):
            path = downloader(source, device_id).download(artifact.ref, tmp_path / "device")
    finally:
        stop.set()
        transport.stop()
        dispatcher.join(5)
    assert path.read_bytes() == artifact.data


class PausingFrames(queue.Queue[bytes]):
    """The device's frame queue, pausing the downloader after chosen frames until released.

    It makes "the broker dies while an answer is half delivered" happen every time: the
    test kills the broker while the downloader waits here, and the frames of that answer
    that had not yet been taken are lost with it (on loopback they would otherwise already
    sit in this queue, and the kill would cost nothing).
    """

    def __init__(self, pause_after: set[int]) -> None:
        super().__init__()
        self.pause_after = pause_after
        self.taken = 0
        self.lost = 0
        self.paused = threading.Event()
        self.resume = threading.Event()

    def get(self, block: bool = True, timeout: float | None = None) -> bytes:
        frame = super().get(block, timeout)
        self.taken += 1
        if self.taken in self.pause_after:
            self.resume.clear()
            self.paused.set()
            self.resume.wait(WAIT)
            with self.mutex:
                self.lost += len(self.queue)
                self.queue.clear()
        return frame


@pytest.mark.broker
@pytest.mark.parametrize("where", ["as a request arrives", "mid-answer"])
def test_a_flapping_broker_costs_little_more_than_the_artifact(
    where: str,
    mosquitto_factory: Callable[[], MosquittoProcess],
    artifact: Artifact,
    device_id: str,
    tmp_path: Path,
) -> None:
    broker = mosquitto_factory()
    requests = Requests()
    dest = tmp_path / "device"
    result: dict[str, Any] = {}
    finished = threading.Event()
    # 16 KiB blocks, 4 per request: 65 frames in 17 answers, so every kill lands mid-transfer.
    kill_points = (3, 7, 11) if where == "as a request arrives" else (6, 26, 46)
    frames = PausingFrames(set(kill_points) if where == "mid-answer" else set())

    with (
        block_server(artifact.store, broker.endpoint, requests) as server,
        frame_source(device_id, broker.endpoint) as source,
    ):
        source.frames = frames
        blocks = downloader(
            source, device_id, timeout=0.5, block_size=16 * 1024, blocks_per_request=4
        )

        def run() -> None:
            try:
                result["path"] = blocks.download(artifact.ref, dest)
            except BaseException as e:
                result["error"] = e
            finally:
                finished.set()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        for at in kill_points:
            if where == "mid-answer":
                assert frames.paused.wait(WAIT), f"frame {at} never came"
                frames.paused.clear()
            else:
                requests.wait_for(at)
            assert not finished.is_set()
            broker.kill()
            broker.start()
            frames.resume.set()
        assert finished.wait(WAIT), "the download did not finish after the broker came back"
        thread.join(5)
        served = server.stats()["bytes_served"]

    assert "error" not in result, result.get("error")
    assert result["path"].read_bytes() == artifact.data
    ratio = served / SIZE
    print(
        f"\nflapping broker, killed 3 times {where}: served {served} bytes for {SIZE} "
        f"(ratio {ratio:.3f}); {frames.lost} frames lost; {blocks.last_stats}"
    )
    assert ratio < 1.5, f"resuming re-sent too much: {ratio:.2f}x the artifact"


@pytest.mark.broker
@pytest.mark.parametrize("damage", ["same length", "truncated"])
def test_a_store_file_altered_after_indexing_is_rejected_and_nothing_kept(
    damage: str, mqtt_broker: BrokerEndpoint, artifact: Artifact, device_id: str, tmp_path: Path
) -> None:
    os.chmod(artifact.path, 0o644)  # the store makes its files read-only
    if damage == "same length":
        artifact.path.write_bytes(os.urandom(SIZE))
    else:
        artifact.path.write_bytes(artifact.data[: SIZE // 2])
    expected = HashMismatchError if damage == "same length" else LengthMismatchError
    dest = tmp_path / "device"
    with (
        block_server(artifact.store, mqtt_broker, lambda d, s: True),
        frame_source(device_id, mqtt_broker) as source,
        pytest.raises(expected),
    ):
        downloader(source, device_id).download(artifact.ref, dest)
    assert leftovers(dest) == []


@pytest.mark.broker
def test_unknown_artifact_is_a_typed_rejection(
    mqtt_broker: BrokerEndpoint, artifact: Artifact, device_id: str, tmp_path: Path
) -> None:
    missing = ArtifactRef(sha256=hashlib.sha256(b"never stored").hexdigest(), length=10)
    with (
        block_server(artifact.store, mqtt_broker, lambda d, s: True),
        frame_source(device_id, mqtt_broker) as source,
        pytest.raises(ArtifactRejected) as caught,
    ):
        downloader(source, device_id).download(missing, tmp_path / "device")
    assert caught.value.detail == "unknown artifact"


@pytest.mark.broker
def test_a_silent_server_is_a_timeout_after_retries(
    mqtt_broker: BrokerEndpoint, artifact: Artifact, device_id: str, tmp_path: Path
) -> None:
    with frame_source(device_id, mqtt_broker) as source:
        blocks = downloader(source, device_id, timeout=0.2)
        blocks.max_attempts = 3
        with pytest.raises(DownloadTimeout, match="no progress after 3 attempts"):
            blocks.download(artifact.ref, tmp_path / "device")
    assert blocks.last_stats.requests == 3


@pytest.mark.broker
def test_stopping_cancels_a_download_at_once_and_keeps_the_partial(
    mqtt_broker: BrokerEndpoint, artifact: Artifact, device_id: str, tmp_path: Path
) -> None:
    """A silent server would hold the request for its whole timeout (an hour here): the
    cancel event ends it within a poll; what arrived stays as a resumable partial."""
    with frame_source(device_id, mqtt_broker) as source:
        blocks = downloader(source, device_id, timeout=3600.0)
        threading.Timer(0.3, blocks.cancelled.set).start()
        with pytest.raises(DownloadCancelled, match="resumes later"):
            blocks.download(artifact.ref, tmp_path / "device")
    assert blocks.last_stats.requests == 1
    # nothing but a resumable partial (none at all when no byte had arrived)
    assert all(n.endswith((".part", ".part.json")) for n in leftovers(tmp_path / "device"))


@pytest.mark.broker
def test_a_responder_sending_past_the_signed_length_is_cut_off(
    mqtt_broker: BrokerEndpoint,
    mqtt_client: Callable[..., TestClient],
    artifact: Artifact,
    device_id: str,
    tmp_path: Path,
) -> None:
    """Its blocks carry the right bytes, then go on and on; the device stops at once."""
    liar = mqtt_client(f"{device_id}-liar")
    liar.subscribe(device_topic(device_id, Channel.ARTIFACT_REQUEST))
    stop = threading.Event()
    sent: list[int] = []

    def respond() -> None:
        request = BlockRequest.from_bytes(liar.expect(timeout=WAIT).payload)
        offset = request.offset
        while not stop.is_set() and len(sent) < 10_000:
            data = (artifact.data[offset : offset + 4096] or b"x" * 4096).ljust(4096, b"y")
            header = BlockHeader(
                request_id=request.request_id,
                sha256=request.sha256,
                offset=offset,
                length=len(data),
                total_length=2**40,  # "there is much more"
                block_sha256=hashlib.sha256(data).hexdigest(),
            )
            liar.publish(
                device_topic(device_id, Channel.ARTIFACT_BLOCK), encode_block(header, data)
            )
            sent.append(offset)
            offset += len(data)

    responder = threading.Thread(target=respond, daemon=True)
    responder.start()
    dest = tmp_path / "device"
    try:
        with (
            frame_source(device_id, mqtt_broker) as source,
            pytest.raises(LengthMismatchError, match="signed"),
        ):
            downloader(source, device_id, block_size=4096).download(artifact.ref, dest)
        assert responder.is_alive(), "the responder gave up before the device did"
    finally:
        stop.set()
        responder.join(10)
    assert leftovers(dest) == []
    assert len(sent) < 10_000


_CHILD = """
import sys
from pathlib import Path

from agent.config import DownloadConfig, Limits
from agent.download import BlockDownloader, PahoFrameSource
from shared.messages import ArtifactRef

host, port, device_id, sha256, length, dest = sys.argv[1:]
config = DownloadConfig(block_size=16384, blocks_per_request=4, request_timeout_seconds=60)
with PahoFrameSource(device_id, host, int(port)) as source:
    BlockDownloader(source, device_id, config, Limits()).download(
        ArtifactRef(sha256=sha256, length=int(length)), Path(dest)
    )
"""


@pytest.mark.broker
def test_after_sigkill_the_download_asks_only_for_the_missing_blocks(
    mqtt_broker: BrokerEndpoint,
    mqtt_client: Callable[..., TestClient],
    artifact: Artifact,
    device_id: str,
    tmp_path: Path,
) -> None:
    dest = tmp_path / "device"
    requests = Requests(stall_at=5)  # requests 1-4 (4 x 64 KiB) are answered, then silence
    per_request = 4 * 16384
    watcher = mqtt_client(f"{device_id}-watcher")
    watcher.subscribe(device_topic(device_id, Channel.ARTIFACT_REQUEST))
    with block_server(artifact.store, mqtt_broker, requests) as server:
        child = subprocess.Popen(
            [
                *(sys.executable, "-c", _CHILD, mqtt_broker.host, str(mqtt_broker.port)),
                *(device_id, artifact.ref.sha256, str(artifact.ref.length), str(dest)),
            ],
            cwd=REPO,
        )
        try:
            assert requests.stalled.wait(WAIT), "the child never got to its 5th request"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(WAIT)
            requests.release.set()
        assert child.returncode == -signal.SIGKILL
        sidecar = json.loads((dest / f"{artifact.ref.sha256}.part.json").read_text())
        assert sidecar["verified_bytes"] == 4 * per_request
        assert (dest / f"{artifact.ref.sha256}.part").stat().st_size >= 4 * per_request
        before = server.stats()["bytes_served"]
        watcher.drain()  # the child's requests

        with frame_source(device_id, mqtt_broker) as source:
            blocks = downloader(source, device_id, block_size=16384, blocks_per_request=4)
            path = blocks.download(artifact.ref, dest)
        served = server.stats()["bytes_served"] - before

    assert path.read_bytes() == artifact.data
    assert blocks.last_stats.resumed_from == 4 * per_request
    offsets = [BlockRequest.from_bytes(m.payload).offset for m in watcher.drain()]
    assert offsets[0] == 4 * per_request and min(offsets) == 4 * per_request
    assert served == SIZE - 4 * per_request  # only the missing blocks
    assert leftovers(dest) == [artifact.ref.sha256]


# ----------------------------------------------------------------------------- HTTP ranges


@pytest.fixture
def api(tmp_path: Path, artifact: Artifact) -> Iterator[tuple[str, str]]:
    """The real server app on uvicorn, with one model version whose edge bundle is the artifact.

    Returns the base URL and the bundle's path.
    """
    from server.app import create_app
    from server.db import create_db_engine, migrate, session_scope
    from server.models import Model, ModelVersion, TargetArtifact
    from server.settings import Settings
    from tests.server.conftest import add_dataset_row

    settings = Settings(data_dir=tmp_path / "server", run_jobs=False)
    ArtifactStore(settings.artifacts_dir).put_bytes(artifact.data)
    engine = create_db_engine(settings.resolved_database_url)
    migrate(engine)
    with session_scope(engine) as session:
        dataset_version = add_dataset_row(session, name="d", rows=1)
        model = Model(name="m", task="classification")
        session.add(model)
        session.flush()
        version = ModelVersion(
            model_id=model.id,
            version=1,
            source="imported",
            dataset_version_id=dataset_version.id,
            keras_sha256="0" * 64,
            status="ready",
        )
        session.add(version)
        session.flush()
        session.add(
            TargetArtifact(
                model_version_id=version.id,
                target="edge",
                format="tflite",
                quantization="int8",
                runtime="litert",
                bundle_sha256=artifact.ref.sha256,
                bundle_length=artifact.ref.length,
                gate_passed=True,
            )
        )
    engine.dispose()

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)  # clients may connect now; uvicorn answers once started
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), log_config=None, log_level="warning")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    host, port = listener.getsockname()
    try:
        yield f"http://{host}:{port}", "/api/v1/models/m/versions/1/artifacts/edge/bundle"
    finally:
        server.should_exit = True
        thread.join(WAIT)
        listener.close()


class _Bearer(urllib.request.BaseHandler):
    """Sends an operator token: the bundle route is an operator (viewer) route."""

    def __init__(self, token: str) -> None:
        self.token = token

    def http_request(self, request: urllib.request.Request) -> urllib.request.Request:
        request.add_unredirected_header("Authorization", f"Bearer {self.token}")
        return request


@pytest.fixture
def viewer(api: tuple[str, str], tmp_path: Path) -> _Bearer:
    """The dev-mode server's admin token (written when the ``api`` server started)."""
    from server.auth.tokens import read_admin_token

    deadline = time.monotonic() + WAIT
    while (token := read_admin_token(tmp_path / "server")) is None:
        # uvicorn answers only once started; its lifespan writes the token first
        assert time.monotonic() < deadline, "the server wrote no admin token"
        time.sleep(0.02)
    return _Bearer(token)


class _CutResponse:
    def __init__(self, response: Any, budget: list[int]) -> None:
        self._response = response
        self._budget = budget
        self.status = response.status
        self.headers = response.headers

    def read(self, size: int) -> bytes:
        if self._budget[0] <= 0:
            raise ConnectionResetError("cut by the test")
        data: bytes = self._response.read(min(size, self._budget[0]))
        self._budget[0] -= len(data)
        return data

    def __enter__(self) -> _CutResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self._response.close()


class Network(urllib.request.BaseHandler):
    """Records Range headers; can cut the connection after some bytes, then stay down."""

    handler_order = 1100  # after urllib's HTTPErrorProcessor: sees successful responses only

    def __init__(self, *, cut_after: int | None = None) -> None:
        self.ranges: list[str | None] = []
        self.budget = [cut_after if cut_after is not None else 2**62]
        self.down = False

    def http_request(self, request: urllib.request.Request) -> urllib.request.Request:
        if self.down:
            raise urllib.error.URLError("network is down (test)")
        self.ranges.append(request.get_header("Range"))
        return request

    def http_response(self, request: urllib.request.Request, response: Any) -> Any:
        if self.budget[0] < 2**62:
            self.down = True  # after this response the network goes away
        return _CutResponse(response, self.budget)


def test_http_range_download_resumes_where_an_earlier_process_stopped(
    api: tuple[str, str], viewer: _Bearer, artifact: Artifact, tmp_path: Path
) -> None:
    base_url, path = api
    dest = tmp_path / "device"
    flaky = Network(cut_after=300_000)
    with pytest.raises(DownloadTimeout):
        http_download(
            base_url,
            path,
            artifact.ref,
            dest,
            opener=urllib.request.build_opener(flaky, viewer),
            limits=FAST_LIMITS,
            max_attempts=2,
        )
    assert flaky.ranges == [f"bytes=0-{SIZE - 1}"]
    sidecar = json.loads((dest / f"{artifact.ref.sha256}.part.json").read_text())
    assert sidecar["verified_bytes"] == 300_000
    assert not (dest / artifact.ref.sha256).exists()

    healthy = Network()
    got = http_download(
        base_url, path, artifact.ref, dest, opener=urllib.request.build_opener(healthy, viewer)
    )
    assert healthy.ranges == [f"bytes=300000-{SIZE - 1}"]  # the missing bytes only
    assert got.read_bytes() == artifact.data
    assert leftovers(dest) == [artifact.ref.sha256]


def test_http_download_completes_across_repeated_cuts(
    api: tuple[str, str], viewer: _Bearer, artifact: Artifact, tmp_path: Path
) -> None:
    base_url, path = api

    class CutEvery(Network):
        def http_response(self, request: urllib.request.Request, response: Any) -> Any:
            return _CutResponse(response, [400_000])  # every connection dies after 400 kB

    network = CutEvery()
    got = http_download(
        base_url,
        path,
        artifact.ref,
        tmp_path / "device",
        opener=urllib.request.build_opener(network, viewer),
        limits=FAST_LIMITS,
    )
    assert got.read_bytes() == artifact.data
    assert network.ranges == [f"bytes={n}-{SIZE - 1}" for n in (0, 400_000, 800_000)]


def test_http_errors_are_typed(
    api: tuple[str, str], viewer: _Bearer, artifact: Artifact, tmp_path: Path
) -> None:
    base_url, path = api
    opener = urllib.request.build_opener(viewer)
    with pytest.raises(ArtifactRejected) as caught:
        http_download(
            base_url, path.replace("edge", "cloud"), artifact.ref, tmp_path / "d", opener=opener
        )
    assert caught.value.detail == "HTTP 404"
    with pytest.raises(ArtifactRejected) as caught:  # no operator token: refused, not served
        http_download(base_url, path, artifact.ref, tmp_path / "d")
    assert caught.value.detail == "HTTP 401"
    wrong = ArtifactRef(sha256=artifact.ref.sha256, length=SIZE - 1)
    with pytest.raises(LengthMismatchError):
        http_download(base_url, path, wrong, tmp_path / "d", opener=opener)
    assert leftovers(tmp_path / "d") == []


class _EndlessHandler(http.server.BaseHTTPRequestHandler):
    """Ignores Range, answers 200 and streams the artifact followed by endless junk."""

    data: ClassVar[bytes] = b""
    sent: ClassVar[list[int]] = [0]

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(self.data)
            while self.sent[0] < 64 * 1024 * 1024:
                self.wfile.write(b"z" * 65536)
                self.sent[0] += 65536

    def log_message(self, *args: Any) -> None:
        pass


def test_an_http_body_past_the_signed_length_is_cut_off(artifact: Artifact, tmp_path: Path) -> None:
    handler = type("Endless", (_EndlessHandler,), {"data": artifact.data, "sent": [0]})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    dest = tmp_path / "device"
    try:
        with pytest.raises(LengthMismatchError):
            http_download(f"http://127.0.0.1:{httpd.server_address[1]}", "/a", artifact.ref, dest)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert leftovers(dest) == []
    assert handler.sent[0] < 64 * 1024 * 1024  # the device hung up long before the end
