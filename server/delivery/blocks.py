"""The MQTT block server: answers ``artifact/req`` with ``artifact/blk`` frames from the store.

Protocol (docs/protocol.md, "Artifact block transfer"): a device publishes a
:class:`~shared.messages.BlockRequest` on ``ef/v1/dev/{id}/artifact/req``; the
server answers on ``ef/v1/dev/{id}/artifact/blk`` with up to ``count`` frames in
order, the last one cut short at the end of the artifact, or with one *error
block* (no data) when it cannot serve the request.

What always holds:

- A request is served only if it parses, the ``device_id`` in its payload equals
  the one in its topic, and ``authorize(device_id, sha256)`` returns true. A
  request that fails the first two checks is dropped (and counted): the server
  never answers on a topic the payload chose.
- Data is read from the content-addressed store and never past the file's end;
  every data frame carries the SHA-256 of its block.
- Unknown artifact, not authorized, offset at or past the end, a full work queue,
  an object store that cannot be reached ("busy, retry") and a damaged artifact
  ("read failed") each get one error block echoing ``request_id`` and ``sha256``. As the
  protocol asks, ``offset`` and ``total_length`` of an error block are 0, except
  for "offset past the end", which echoes the offset and gives the real length.
  "not authorized" and "unknown artifact" are distinct only to an authorized
  caller: authorization is checked first, so existence never leaks.
- paho's network thread only enqueues. Requests wait on a bounded queue for a
  fixed pool of workers; at most ``max_concurrent_transfers`` requests are
  accepted and unanswered at any time, at most ``max_requests_per_device`` of them
  from one device. When a bound is reached the request is answered "busy, retry"
  at once -- the only work done on paho's thread besides parsing the (at most
  1 KiB) request: handing one small frame to paho, without waiting.
- A worker answers one request at a time and waits for the broker's PUBACKs of
  its frames (up to ``publish_timeout``) before it takes the next one, so
  memory held in paho's outgoing queue is bounded by workers x one request
  (at most 64 x 256 KiB), and paho's queue itself is capped.

Counters (``stats()``) feed the metrics endpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from server.artifacts import ArtifactStore, ArtifactStoreUnavailableError
from server.errors import ArtifactError, ConfigurationError, NotFoundError
from shared.errors import ContractError
from shared.messages import BlockHeader, BlockRequest, encode_block
from shared.topics import Channel, device_topic, fleet_filter, parse_topic

__all__ = [
    "ERROR_BUSY",
    "ERROR_NOT_AUTHORIZED",
    "ERROR_OFFSET_PAST_END",
    "ERROR_READ_FAILED",
    "ERROR_UNKNOWN_ARTIFACT",
    "REJECT_REASONS",
    "BlockServer",
    "plan_blocks",
]

log = logging.getLogger(__name__)

# The error texts of error blocks. Devices retry "busy" after a backoff; the others are final
# for that request.
ERROR_UNKNOWN_ARTIFACT = "unknown artifact"
ERROR_NOT_AUTHORIZED = "not authorized"
ERROR_OFFSET_PAST_END = "offset past the end"
ERROR_BUSY = "busy, retry"
ERROR_READ_FAILED = "read failed"

REJECT_REASONS = (
    "bad_topic",  # not a device artifact/req topic (cannot happen with our subscription)
    "malformed",  # not a valid BlockRequest: dropped
    "device_mismatch",  # payload device_id differs from the topic's: dropped
    "busy",  # max_concurrent_transfers reached: answered "busy, retry"
    "device_busy",  # max_requests_per_device reached: answered "busy, retry"
    "not_authorized",  # answered with an error block
    "unknown_artifact",  # answered with an error block
    "offset_past_end",  # answered with an error block
    "read_failed",  # the store file was shorter than it said, or damaged: error block
    "store_unavailable",  # the object store could not be reached: answered "busy, retry"
    "publish_failed",  # the broker connection was lost while answering
)

Authorize = Callable[[str, str], bool]
ClientFactory = Callable[[], mqtt.Client]


def plan_blocks(
    total_length: int, offset: int, block_size: int, count: int
) -> list[tuple[int, int]]:
    """The ``(offset, length)`` of each block answering a request, in order.

    Block *i* covers ``[offset + i*block_size, offset + (i+1)*block_size)`` clipped to
    ``total_length``; the list stops at the end of the artifact, so it is empty when
    ``offset >= total_length``. Every block has a length of at least 1.
    """
    if total_length < 0 or offset < 0:
        raise ValueError("total_length and offset must not be negative")
    if block_size <= 0 or count <= 0:
        raise ValueError("block_size and count must be positive")
    blocks = []
    for index in range(count):
        start = offset + index * block_size
        if start >= total_length:
            break
        blocks.append((start, min(block_size, total_length - start)))
    return blocks


class _Job:
    __slots__ = ("device_id", "request")

    def __init__(self, device_id: str, request: BlockRequest) -> None:
        self.device_id = device_id
        self.request = request


class BlockServer:
    """Serve artifact blocks over MQTT from an :class:`ArtifactStore`.

    ``client_factory`` returns a configured, unconnected paho client (credentials,
    TLS); by default an MQTT 3.1.1 client with a clean session is made. ``username`` /
    ``password``, when given, are the broker login (over any the factory set). The server
    connects it to ``host``:``port``, re-subscribes on every (re)connection and lets
    paho reconnect on its own. With ``share_group`` set it subscribes to
    ``$share/{group}/ef/v1/dev/+/artifact/req``, so several server processes split
    the requests between them.
    """

    def __init__(
        self,
        store: ArtifactStore,
        *,
        authorize: Authorize,
        host: str = "127.0.0.1",
        port: int = 1883,
        client_factory: ClientFactory | None = None,
        username: str | None = None,
        password: str | None = None,
        max_concurrent_transfers: int = 32,
        max_requests_per_device: int = 2,
        workers: int = 4,
        share_group: str | None = None,
        publish_timeout: float = 10.0,
        reconnect_delay: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        if min(max_concurrent_transfers, max_requests_per_device, workers) < 1:
            raise ValueError(
                "max_concurrent_transfers, max_requests_per_device and workers must be at least 1"
            )
        self.store = store
        self.host = host
        self.port = port
        self.topic_filter = fleet_filter(Channel.ARTIFACT_REQUEST, share_group=share_group)
        self.max_concurrent_transfers = max_concurrent_transfers
        self.max_requests_per_device = max_requests_per_device
        self.publish_timeout = publish_timeout
        self._authorize = authorize
        self._client_factory = client_factory or _default_client
        self._login = None if username is None else (username, password)
        self._reconnect_delay = reconnect_delay
        self._worker_count = min(workers, max_concurrent_transfers)
        # The semaphore bounds accepted-but-unanswered requests (queued or being served);
        # the queue's own bound can therefore never be hit.
        self._slots = threading.BoundedSemaphore(max_concurrent_transfers)
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=max_concurrent_transfers)
        self._lock = threading.Lock()
        self._counters = {"requests": 0, "blocks": 0, "bytes_served": 0, "error_blocks": 0}
        self._rejected = dict.fromkeys(REJECT_REASONS, 0)
        self._per_device: dict[str, int] = {}
        self._subscribed = threading.Event()
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._subscribe_mid: int | None = None
        self._threads: list[threading.Thread] = []
        self._client: mqtt.Client | None = None

    # ----------------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 10.0) -> None:
        """Connect, subscribe and start the workers; return once the broker acknowledged."""
        if self._client is not None:
            raise RuntimeError("BlockServer already started")
        client = self._client_factory()
        if self._login is not None:
            client.username_pw_set(*self._login)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_socket_open = _no_delay
        client.reconnect_delay_set(*self._reconnect_delay)  # type: ignore[arg-type]
        # paho's own queue is capped too; past it publish() fails and the request is dropped.
        client.max_queued_messages_set(self._worker_count * 64 * 2)
        self._client = client
        for index in range(self._worker_count):
            thread = threading.Thread(target=self._work, name=f"block-server-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        try:
            client.connect_async(self.host, self.port, keepalive=30)
        except (OSError, ValueError) as e:
            self.stop()
            raise ConfigurationError(f"block server: bad broker address: {e}") from e
        client.loop_start()
        if not self._subscribed.wait(timeout):
            self.stop()
            raise ConfigurationError(
                f"block server: not subscribed at {self.host}:{self.port} within {timeout:g} s"
            )

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the requests being served, then disconnect. Queued requests are dropped."""
        self._stopping.set()
        with contextlib.suppress(queue.Empty):
            while True:  # drop what waits, so the sentinels fit
                if (job := self._jobs.get_nowait()) is not None:
                    self._release(job.device_id)
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def __enter__(self) -> BlockServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """``requests``, ``blocks``, ``bytes_served``, ``error_blocks``, ``rejected`` by reason."""
        with self._lock:
            return {**self._counters, "rejected": dict(self._rejected)}

    # ----------------------------------------------------------------------- paho's thread

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            log.warning("block server: broker refused the connection: %s", reason)
            return
        self._connected.set()
        # A clean session forgets subscriptions: subscribe on every connection.
        result, mid = client.subscribe(self.topic_filter, qos=1)
        if result == mqtt.MQTT_ERR_SUCCESS:
            self._subscribe_mid = mid

    def _on_disconnect(self, *args: Any) -> None:
        self._connected.clear()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        if mid == self._subscribe_mid and codes and not codes[0].is_failure:
            self._subscribed.set()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self._accept(message)
        except Exception:  # an exception here would stop paho's network thread
            log.exception("block server: unexpected error on a request")

    def _accept(self, message: mqtt.MQTTMessage) -> None:
        self._count("requests")
        if self._stopping.is_set():
            return
        try:
            device_id = parse_topic(message.topic).device_id
        except (ContractError, UnicodeDecodeError):
            self._reject("bad_topic")
            return
        try:
            request = BlockRequest.from_bytes(bytes(message.payload))
        except ContractError:
            self._reject("malformed")
            return
        if request.device_id != device_id:
            self._reject("device_mismatch")
            return
        with self._lock:
            accepted = self._per_device.get(device_id, 0)
            busy = "device_busy" if accepted >= self.max_requests_per_device else None
            if busy is None and not self._slots.acquire(blocking=False):
                busy = "busy"
            if busy is None:
                self._per_device[device_id] = accepted + 1
            else:
                self._rejected[busy] += 1
        if busy is not None:
            self._send_error(device_id, request, ERROR_BUSY)
            return
        self._jobs.put_nowait(_Job(device_id, request))

    # ----------------------------------------------------------------------- workers

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._serve(job.device_id, job.request)
            except Exception:
                log.exception("block server: failed to serve %s", job.request.request_id)
            finally:
                self._release(job.device_id)

    def _release(self, device_id: str) -> None:
        with self._lock:
            left = self._per_device.pop(device_id, 1) - 1
            if left > 0:
                self._per_device[device_id] = left
        self._slots.release()

    def _serve(self, device_id: str, request: BlockRequest) -> None:
        try:
            allowed = bool(self._authorize(device_id, request.sha256))
        except Exception:
            log.exception("block server: authorize() failed; refusing")
            allowed = False
        if not allowed:
            self._reject("not_authorized")
            self._send_error(device_id, request, ERROR_NOT_AUTHORIZED)
            return
        try:
            artifact = self.store.open(request.sha256)
        except NotFoundError:
            self._reject("unknown_artifact")
            self._send_error(device_id, request, ERROR_UNKNOWN_ARTIFACT)
            return
        except ArtifactStoreUnavailableError:
            # An object store that is down now may answer later: the device retries.
            log.warning("block server: artifact store unavailable", exc_info=True)
            self._reject("store_unavailable")
            self._send_error(device_id, request, ERROR_BUSY)
            return
        except ArtifactError:
            log.error("block server: artifact %s unreadable", request.sha256[:16], exc_info=True)
            self._reject("read_failed")
            self._send_error(device_id, request, ERROR_READ_FAILED)
            return
        with artifact:
            total_length = os.fstat(artifact.fileno()).st_size
            blocks = plan_blocks(total_length, request.offset, request.block_size, request.count)
            if not blocks:
                self._reject("offset_past_end")
                self._send_error(
                    device_id,
                    request,
                    ERROR_OFFSET_PAST_END,
                    offset=request.offset,
                    total_length=total_length,
                )
                return
            topic = device_topic(device_id, Channel.ARTIFACT_BLOCK)
            pending: list[mqtt.MQTTMessageInfo] = []
            for offset, length in blocks:
                if self._stopping.is_set():
                    break
                artifact.seek(offset)
                data = artifact.read(length)
                if len(data) != length:
                    self._reject("read_failed")
                    self._send_error(device_id, request, ERROR_READ_FAILED)
                    break
                header = BlockHeader(
                    request_id=request.request_id,
                    sha256=request.sha256,
                    offset=offset,
                    length=length,
                    total_length=total_length,
                    block_sha256=hashlib.sha256(data).hexdigest(),
                )
                info = self._publish(topic, encode_block(header, data))
                if info is None:
                    self._reject("publish_failed")
                    break
                pending.append(info)
                with self._lock:
                    self._counters["blocks"] += 1
                    self._counters["bytes_served"] += length
        self._await_acks(pending)

    def _await_acks(self, pending: list[mqtt.MQTTMessageInfo]) -> None:
        deadline = time.monotonic() + self.publish_timeout
        for info in pending:
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                return  # not connected: paho re-sends after reconnecting; do not wait for it

    def _publish(self, topic: str, frame: bytes) -> mqtt.MQTTMessageInfo | None:
        client = self._client
        if client is None or not self._connected.is_set():
            return None
        info = client.publish(topic, frame, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return None
        return info

    def _send_error(
        self,
        device_id: str,
        request: BlockRequest,
        error: str,
        *,
        offset: int = 0,
        total_length: int = 0,
    ) -> None:
        header = BlockHeader(
            request_id=request.request_id,
            sha256=request.sha256,
            offset=offset,
            length=0,
            total_length=total_length,
            block_sha256=None,
            error=error,
        )
        if self._publish(device_topic(device_id, Channel.ARTIFACT_BLOCK), encode_block(header)):
            self._count("error_blocks")

    # ----------------------------------------------------------------------- counters

    def _count(self, name: str) -> None:
        with self._lock:
            self._counters[name] += 1

    def _reject(self, reason: str) -> None:
        with self._lock:
            self._rejected[reason] += 1


def _no_delay(client: Any, userdata: Any, sock: Any) -> None:
    # paho leaves Nagle's algorithm on: small packets (error blocks, SUBSCRIBE) would wait
    # for the broker's delayed ACK.
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _default_client() -> mqtt.Client:
    return mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"edgefleet-blocks@{uuid.uuid4().hex[:12]}",
        protocol=mqtt.MQTTv311,
        clean_session=True,
    )
