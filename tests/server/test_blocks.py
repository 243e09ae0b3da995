"""The MQTT block server: the planning arithmetic, and its answers through a real broker."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.artifacts import ArtifactStore, StoredArtifact
from server.delivery.blocks import (
    ERROR_BUSY,
    ERROR_NOT_AUTHORIZED,
    ERROR_OFFSET_PAST_END,
    ERROR_UNKNOWN_ARTIFACT,
    BlockServer,
    plan_blocks,
)
from shared.messages import BlockHeader, BlockRequest, decode_block
from shared.topics import Channel, device_topic
from tests.conftest import BrokerEndpoint, TestClient

# ----------------------------------------------------------------------------- plan_blocks


@given(
    total_length=st.integers(0, 10**7),
    offset=st.integers(0, 10**7),
    block_size=st.integers(1, 262144),
    count=st.integers(1, 64),
)
def test_plan_blocks_covers_the_range_in_order_and_stops_at_the_end(
    total_length: int, offset: int, block_size: int, count: int
) -> None:
    blocks = plan_blocks(total_length, offset, block_size, count)
    end = min(total_length, offset + block_size * count)
    if offset >= total_length:
        assert blocks == []
        return
    assert 1 <= len(blocks) <= count
    assert blocks[0][0] == offset
    position = offset
    for index, (start, length) in enumerate(blocks):
        assert start == position == offset + index * block_size  # contiguous, protocol offsets
        assert 1 <= length <= block_size
        if index < len(blocks) - 1:
            assert length == block_size  # only the last one may be cut short
        position += length
    assert position == end  # never past the artifact's end, nothing missing before it


@pytest.mark.parametrize(
    "args", [(-1, 0, 1, 1), (10, -1, 1, 1), (10, 0, 0, 1), (10, 0, 1, 0), (10, 0, -4, 1)]
)
def test_plan_blocks_refuses_nonsense(args: tuple[int, int, int, int]) -> None:
    with pytest.raises(ValueError):
        plan_blocks(*args)


# ----------------------------------------------------------------------------- over a broker


class Device:
    """A device's side of the conversation, on a raw paho test client."""

    def __init__(self, client: TestClient, device_id: str) -> None:
        self.client = client
        self.device_id = device_id
        client.subscribe(device_topic(device_id, Channel.ARTIFACT_BLOCK))

    def ask(
        self,
        sha256: str,
        *,
        offset: int = 0,
        block_size: int = 4096,
        count: int = 1,
        request_id: str | None = None,
        device_id: str | None = None,
    ) -> str:
        request_id = request_id or uuid.uuid4().hex[:12]
        request = BlockRequest(
            device_id=device_id or self.device_id,
            request_id=request_id,
            sha256=sha256,
            offset=offset,
            block_size=block_size,
            count=count,
        )
        self.client.publish(
            device_topic(self.device_id, Channel.ARTIFACT_REQUEST), request.to_bytes()
        )
        return request_id

    def frame(self) -> tuple[BlockHeader, bytes]:
        received = self.client.expect(timeout=10)
        assert received.topic == device_topic(self.device_id, Channel.ARTIFACT_BLOCK)
        return decode_block(received.payload)


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def artifact(store: ArtifactStore) -> tuple[StoredArtifact, bytes]:
    data = os.urandom(300_000 + 123)
    return store.put_bytes(data), data


@pytest.fixture
def make_server(
    mqtt_broker: BrokerEndpoint, store: ArtifactStore
) -> Iterator[Callable[..., BlockServer]]:
    servers: list[BlockServer] = []

    def make(authorize: Callable[[str, str], bool], **options: Any) -> BlockServer:
        server = BlockServer(
            store,
            authorize=authorize,
            host=mqtt_broker.host,
            port=mqtt_broker.port,
            reconnect_delay=(0.1, 1.0),
            **options,
        )
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def device(mqtt_client: Callable[..., TestClient]) -> Device:
    device_id = f"blk-{uuid.uuid4().hex[:8]}"
    return Device(mqtt_client(f"{device_id}-client"), device_id)


def allow(*pairs: tuple[str, str]) -> Callable[[str, str], bool]:
    allowed = set(pairs)
    return lambda device_id, sha256: (device_id, sha256) in allowed


@pytest.mark.broker
def test_serves_exactly_the_requested_bytes_and_stops_at_the_end(
    make_server: Callable[..., BlockServer],
    device: Device,
    artifact: tuple[StoredArtifact, bytes],
) -> None:
    stored, data = artifact
    # One worker: answers come in request order, so the next answer marks the end of one.
    server = make_server(allow((device.device_id, stored.sha256)), workers=1)

    first = device.ask(stored.sha256, offset=1000, block_size=8192, count=5)
    received = b""
    for index in range(5):
        header, block = device.frame()
        assert header.request_id == first and header.error is None
        assert (header.offset, header.length) == (1000 + index * 8192, 8192)
        assert header.total_length == len(data)
        assert header.block_sha256 == hashlib.sha256(block).hexdigest()
        received += block
    assert received == data[1000 : 1000 + 5 * 8192]

    # Near the end: 4 blocks asked, 2 exist; the second is cut short at the end.
    tail = device.ask(stored.sha256, offset=len(data) - 5000, block_size=4096, count=4)
    frames = [device.frame(), device.frame()]
    assert [(h.request_id, h.offset, h.length) for h, _ in frames] == [
        (tail, len(data) - 5000, 4096),
        (tail, len(data) - 904, 904),
    ]
    assert b"".join(block for _, block in frames) == data[-5000:]

    barrier = device.ask("0" * 64)  # authorized for nothing: one error block
    header, _ = device.frame()
    assert header.request_id == barrier, "a third block was sent past the end"

    stats = server.stats()
    assert stats["requests"] == 3
    assert stats["blocks"] == 7
    assert stats["bytes_served"] == 5 * 8192 + 5000


@pytest.mark.broker
def test_error_blocks_for_unknown_unauthorized_and_past_the_end(
    make_server: Callable[..., BlockServer],
    device: Device,
    artifact: tuple[StoredArtifact, bytes],
) -> None:
    stored, data = artifact
    missing = hashlib.sha256(b"not in the store").hexdigest()
    other = f"{device.device_id}-other"
    server = make_server(
        allow((device.device_id, stored.sha256), (device.device_id, missing), (other, "x")),
        workers=1,
    )

    expectations = [
        (device.ask(missing, offset=4096), ERROR_UNKNOWN_ARTIFACT, 0, 0),
        (device.ask(stored.sha256, offset=len(data)), ERROR_OFFSET_PAST_END, len(data), len(data)),
        (
            device.ask(stored.sha256, offset=10 * len(data)),
            ERROR_OFFSET_PAST_END,
            10 * len(data),
            len(data),
        ),
    ]
    for request_id, error, offset, total_length in expectations:
        header, block = device.frame()
        assert (header.request_id, header.error) == (request_id, error)
        assert (header.offset, header.total_length, header.length) == (offset, total_length, 0)
        assert header.block_sha256 is None and block == b""

    # Another device may not fetch this artifact, and learns nothing about it.
    intruder = Device(device.client, other)
    refused = intruder.ask(stored.sha256)
    header, _ = intruder.frame()
    assert (header.request_id, header.error) == (refused, ERROR_NOT_AUTHORIZED)
    assert (header.offset, header.total_length) == (0, 0)

    rejected = server.stats()["rejected"]
    assert rejected["unknown_artifact"] == 1
    assert rejected["offset_past_end"] == 2
    assert rejected["not_authorized"] == 1
    assert server.stats()["blocks"] == 0


@pytest.mark.broker
def test_a_request_speaking_for_another_device_is_dropped_and_counted(
    make_server: Callable[..., BlockServer],
    device: Device,
    mqtt_client: Callable[..., TestClient],
    artifact: tuple[StoredArtifact, bytes],
) -> None:
    stored, _ = artifact
    victim = f"{device.device_id}-victim"
    server = make_server(
        allow((device.device_id, stored.sha256), (victim, stored.sha256)), workers=1
    )
    watcher = mqtt_client(f"{victim}-watcher")
    watcher.subscribe(device_topic(victim, Channel.ARTIFACT_BLOCK))

    # On its own topic, but the payload claims to be the victim: no answer on either topic.
    device.ask(stored.sha256, device_id=victim)
    # Not a BlockRequest at all.
    device.client.publish(device_topic(device.device_id, Channel.ARTIFACT_REQUEST), b"{}")
    device.client.publish(
        device_topic(device.device_id, Channel.ARTIFACT_REQUEST),
        json.dumps({"schema": "ef.block-request", "schema_version": 1}).encode(),
    )

    barrier = device.ask(stored.sha256, count=1)
    header, _ = device.frame()
    assert header.request_id == barrier and header.error is None  # nothing came before it
    # the frame can arrive before the worker counts it: wait for the count, briefly
    deadline = time.monotonic() + 10
    while server.stats()["blocks"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = server.stats()
    assert stats["rejected"]["device_mismatch"] == 1
    assert stats["rejected"]["malformed"] == 2
    assert stats["requests"] == 4 and stats["blocks"] == 1
    assert watcher.drain() == []


@pytest.mark.broker
def test_a_full_queue_answers_busy_at_once(
    make_server: Callable[..., BlockServer],
    device: Device,
    artifact: tuple[StoredArtifact, bytes],
) -> None:
    stored, data = artifact
    entered = threading.Event()
    release = threading.Event()

    def slow_authorize(device_id: str, sha256: str) -> bool:
        entered.set()
        assert release.wait(20)
        return device_id == device.device_id

    server = make_server(
        slow_authorize, workers=1, max_concurrent_transfers=2, max_requests_per_device=8
    )
    try:
        served = device.ask(stored.sha256)
        assert entered.wait(10)  # the only worker is busy with the first request
        queued = device.ask(stored.sha256, offset=4096)  # waits in the queue
        refused = device.ask(stored.sha256, offset=8192)  # over the bound: "busy, retry"
        header, _ = device.frame()
        assert (header.request_id, header.error) == (refused, ERROR_BUSY)
        assert header.length == 0
    finally:
        release.set()
    answered = [device.frame(), device.frame()]
    assert [(h.request_id, h.offset, b) for h, b in answered] == [
        (served, 0, data[:4096]),
        (queued, 4096, data[4096:8192]),
    ]
    assert server.stats()["rejected"]["busy"] == 1


@pytest.mark.broker
def test_one_device_cannot_take_every_slot(
    make_server: Callable[..., BlockServer],
    device: Device,
    mqtt_client: Callable[..., TestClient],
    artifact: tuple[StoredArtifact, bytes],
) -> None:
    stored, _ = artifact
    other = Device(mqtt_client(f"{device.device_id}-b-client"), f"{device.device_id}-b")
    entered = threading.Event()
    release = threading.Event()

    def slow_authorize(device_id: str, sha256: str) -> bool:
        entered.set()
        assert release.wait(20)
        return True

    server = make_server(slow_authorize, workers=1, max_requests_per_device=2)
    try:
        first = device.ask(stored.sha256)
        assert entered.wait(10)
        second = device.ask(stored.sha256, offset=4096)
        third = device.ask(stored.sha256, offset=8192)  # a third one from the same device
        header, _ = device.frame()
        assert (header.request_id, header.error) == (third, ERROR_BUSY)
        fair = other.ask(stored.sha256)  # another device still gets in
    finally:
        release.set()
    assert [device.frame()[0].request_id for _ in range(2)] == [first, second]
    assert other.frame()[0].request_id == fair
    rejected = server.stats()["rejected"]
    assert (rejected["device_busy"], rejected["busy"]) == (1, 0)
