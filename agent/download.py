"""Fetching artifacts: MQTT block transfer and HTTP range download, both resumable and verified.

Both paths write into ``<dest_dir>/<sha256>.part`` and keep a sidecar
``<sha256>.part.json`` recording how many leading bytes of that file are written,
fsynced and were checked on arrival::

    {"schema": "ef.partial-download", "schema_version": 1,
     "sha256": "<signed sha256>", "length": <signed length>, "verified_bytes": 786432}

What always holds:

- Nothing is read past the signed length (``ArtifactRef.length``): a block or a
  response body that would go past it raises
  :class:`~shared.errors.LengthMismatchError` and the transfer stops there, as it
  does when the server states another total length than the signed one.
- Data is fed to a :class:`~shared.integrity.StreamVerifier` as it arrives and
  written in order; the file appears at ``<dest_dir>/<sha256>`` only after the
  whole-file SHA-256 matched, the file was fsynced, renamed and the folder fsynced.
- A verification failure (hash or length) removes the partial file and its
  sidecar: nothing unverified is kept for the next attempt to build on.
- Resuming re-hashes the prefix the sidecar vouches for (simple, and safe against
  a sidecar that lies) and asks only for the bytes after it. Without a usable
  sidecar the download starts from byte 0.
- Room on the disk: a transfer starts only when the bytes still to fetch plus
  :data:`STORAGE_RESERVE_BYTES` are free, and ENOSPC at any write removes the partial
  file and its sidecar; both raise :class:`InsufficientStorage` naming the disk. A full
  disk must not take the room the outbox, markers and pointers need.
- Every failure is a :class:`DownloadError` (an :class:`~agent.errors.AgentError`),
  except hash and length mismatches, which stay the shared
  :class:`~shared.errors.VerificationError`s so their ``reason`` is reported as is.
- One download of a given artifact into a given folder at a time (the caller's
  update loop guarantees it; nothing here locks).

The block path talks to the broker through a :class:`FrameSource`: something that
publishes a :class:`~shared.messages.BlockRequest` and puts every frame received on
``ef/v1/dev/{id}/artifact/blk`` on a queue. :class:`TransportFrameSource` adapts the
agent's MQTT transport; :class:`PahoFrameSource` is a small self-contained paho client.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import random
import secrets
import shutil
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NoReturn, Protocol

from agent.config import DownloadConfig, Limits
from agent.errors import AgentError
from shared.errors import ContractError, LengthMismatchError, VerificationError
from shared.integrity import StreamVerifier
from shared.messages import MAX_BLOCKS_PER_REQUEST, BlockRequest, decode_block
from shared.topics import Channel, device_topic

__all__ = [
    "ArtifactRejected",
    "ArtifactTooLarge",
    "BlockDownloader",
    "DownloadCancelled",
    "DownloadError",
    "DownloadStats",
    "DownloadTimeout",
    "FrameSource",
    "InsufficientStorage",
    "PahoFrameSource",
    "SourceUnavailable",
    "TransportFrameSource",
    "http_download",
]

_CHUNK = 64 * 1024
_CHECKPOINT_BYTES = 1024 * 1024  # HTTP: fsync + sidecar at least this often
_SIDECAR_SCHEMA = "ef.partial-download"
_BUSY_PREFIX = "busy"  # the server's "busy, retry" error block: back off, then ask again
STORAGE_RESERVE_BYTES = 64 * 1024
"""Room a download leaves free on the device's disk: the outbox, markers and pointers."""


# ----------------------------------------------------------------------------- errors


_CANCEL_POLL_SECONDS = 0.25


class DownloadError(AgentError):
    """An artifact could not be fetched (hash and length mismatches are not this)."""


class ArtifactRejected(DownloadError):
    """The server refused to serve the artifact; ``detail`` is its error text."""

    def __init__(self, message: str, *, detail: str) -> None:
        super().__init__(message)
        self.detail = detail


class ArtifactTooLarge(DownloadError):
    """The signed length is above ``Limits.max_bundle_bytes``; nothing was fetched."""


class InsufficientStorage(DownloadError):
    """No room on the device for the artifact (ENOSPC): before the transfer, less is free
    than the bytes still to fetch plus :data:`STORAGE_RESERVE_BYTES`; during it, a write
    failed for lack of space. What was written of it is removed either way, so the rest
    of the device (outbox, markers, pointers) keeps room to work; a retry starts afresh."""


class DownloadTimeout(DownloadError):
    """No progress after every retry (server silent, broker or network down)."""


class SourceUnavailable(DownloadError):
    """A frame source cannot send a request now (e.g. not connected); the caller retries."""


class DownloadCancelled(DownloadError):
    """The agent is stopping: the partial file is checkpointed and resumes at the next start."""


# ----------------------------------------------------------------------------- frame sources


class FrameSource(Protocol):
    """Sends block requests and collects the raw frames that answer them, in arrival order."""

    frames: queue.Queue[bytes]

    def request(self, req: BlockRequest) -> None:
        """Publish ``req`` (QoS 1) on the device's ``artifact/req`` topic.

        Raise :class:`SourceUnavailable` when it cannot be sent now.
        """
        ...


class _Publisher(Protocol):
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> Any: ...


class TransportFrameSource:
    """Adapts the agent's transport (``publish(topic, payload, *, qos, retain)``).

    The caller subscribes the transport to :attr:`topic` and, for each message received
    on it, calls :meth:`deliver` -- which never blocks and never raises, so it is safe
    on a network thread. A full queue drops the frame; the downloader asks again. If the
    transport has a ``connected`` event (``agent.transport.MqttTransport`` does), no
    request is sent while it is clear: one queued in paho until the next connect would
    only be answered twice.
    """

    def __init__(self, transport: _Publisher, device_id: str, *, max_frames: int = 128) -> None:
        self.transport = transport
        self.device_id = device_id
        self.topic = device_topic(device_id, Channel.ARTIFACT_BLOCK)
        self.frames: queue.Queue[bytes] = queue.Queue(maxsize=max_frames)
        self.dropped = 0

    def request(self, req: BlockRequest) -> None:
        connected = getattr(self.transport, "connected", None)
        if isinstance(connected, threading.Event) and not connected.is_set():
            raise SourceUnavailable("not connected to the broker")
        try:
            self.transport.publish(
                device_topic(self.device_id, Channel.ARTIFACT_REQUEST),
                req.to_bytes(),
                qos=1,
                retain=False,
            )
        except AgentError as e:
            raise SourceUnavailable(f"cannot send a block request: {e}") from e

    def deliver(self, payload: bytes) -> None:
        try:
            self.frames.put_nowait(bytes(payload))
        except queue.Full:
            self.dropped += 1


class PahoFrameSource:
    """A small paho client (MQTT 3.1.1, clean session) for block transfers alone.

    It reconnects on its own and subscribes to the device's ``artifact/blk`` topic on
    every connection; its callbacks only enqueue. ``client_factory`` may return a
    configured, unconnected client (credentials, TLS).
    """

    def __init__(
        self,
        device_id: str,
        host: str,
        port: int,
        *,
        client_factory: Callable[[], Any] | None = None,
        max_frames: int = 2 * MAX_BLOCKS_PER_REQUEST,
        reconnect_delay: tuple[float, float] = (0.5, 30.0),
        keepalive: int = 30,
    ) -> None:
        import paho.mqtt.client as mqtt  # the agent's MQTT dependency, loaded only when used
        from paho.mqtt.enums import CallbackAPIVersion

        self._mqtt = mqtt
        self.device_id = device_id
        self.host = host
        self.port = port
        self.keepalive = keepalive
        self.topic = device_topic(device_id, Channel.ARTIFACT_BLOCK)
        self.frames: queue.Queue[bytes] = queue.Queue(maxsize=max_frames)
        self.dropped = 0
        self._ready = threading.Event()
        self._subscribe_mid: int | None = None
        if client_factory is None:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=f"{device_id[:40]}-dl-{uuid.uuid4().hex[:8]}",
                protocol=mqtt.MQTTv311,
                clean_session=True,
            )
        else:
            client = client_factory()
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_socket_open = _no_delay
        client.reconnect_delay_set(*reconnect_delay)  # type: ignore[arg-type]  # floats work
        self._client = client
        self._started = False

    def start(self, timeout: float = 10.0) -> PahoFrameSource:
        """Connect and subscribe; return once the broker acknowledged the subscription."""
        self._client.connect_async(self.host, self.port, keepalive=self.keepalive)
        self._client.loop_start()
        self._started = True
        if not self._ready.wait(timeout):
            self.close()
            raise SourceUnavailable(f"not subscribed at {self.host}:{self.port} in {timeout:g} s")
        return self

    def close(self) -> None:
        if self._started:
            self._started = False
            self._client.disconnect()
            self._client.loop_stop()

    def __enter__(self) -> PahoFrameSource:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until connected and subscribed (after a reconnect too)."""
        return self._ready.wait(timeout)

    def request(self, req: BlockRequest) -> None:
        if not self._ready.is_set():
            raise SourceUnavailable("not connected to the broker")
        info = self._client.publish(
            device_topic(self.device_id, Channel.ARTIFACT_REQUEST), req.to_bytes(), qos=1
        )
        if info.rc != self._mqtt.MQTT_ERR_SUCCESS:
            raise SourceUnavailable(f"block request not sent: {self._mqtt.error_string(info.rc)}")

    # paho's thread: record and enqueue, never raise

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            return
        result, mid = client.subscribe(self.topic, qos=1)
        if result == self._mqtt.MQTT_ERR_SUCCESS:
            self._subscribe_mid = mid

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        if mid == self._subscribe_mid and codes and not codes[0].is_failure:
            self._ready.set()

    def _on_disconnect(self, *args: Any) -> None:
        self._ready.clear()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            self.frames.put_nowait(bytes(message.payload))
        except queue.Full:
            self.dropped += 1
        except Exception:  # an exception here would stop paho's network thread
            self.dropped += 1


def _no_delay(client: Any, userdata: Any, sock: Any) -> None:
    """Send small packets (requests, PUBACKs) at once.

    paho leaves Nagle's algorithm on; a request written while a PUBACK is unacknowledged
    then waits for the broker's delayed ACK (40 ms on Linux) -- a request round trip of
    ~45 ms instead of ~1 ms on loopback.
    """
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# ----------------------------------------------------------------------------- partial files


class _ArtifactLike(Protocol):
    @property
    def sha256(self) -> str: ...
    @property
    def length(self) -> int: ...


class _PartialFile:
    """``<sha256>.part`` plus its sidecar: the verified, durable prefix of one artifact."""

    def __init__(self, ref: _ArtifactLike, dest_dir: Path) -> None:
        self.sha256 = ref.sha256
        self.length = ref.length
        self.dest_dir = dest_dir
        self.final = dest_dir / ref.sha256
        self.part = dest_dir / f"{ref.sha256}.part"
        self.sidecar = dest_dir / f"{ref.sha256}.part.json"
        self.verifier = StreamVerifier(ref.length, ref.sha256)
        self.resumed_from = 0
        self._durable = 0
        self._file: BinaryIO | None = None

    @property
    def offset(self) -> int:
        """Bytes written and checked so far; the next byte to fetch."""
        return self.verifier.received

    def is_complete(self) -> bool:
        return self.verifier.received == self.length

    def open(self) -> _PartialFile:
        try:
            self.dest_dir.mkdir(parents=True, exist_ok=True)
            prefix = min(self._sidecar_bytes(), self._part_size(), self.length)
            handle = self.part.open("r+b" if prefix > 0 else "w+b")
            self._file = handle
            if prefix > 0:
                handle.seek(0)
                remaining = prefix
                while remaining:
                    chunk = handle.read(min(_CHUNK, remaining))
                    if not chunk:
                        break
                    self.verifier.update(chunk)
                    remaining -= len(chunk)
            handle.truncate(self.verifier.received)
            handle.seek(self.verifier.received)
            free = shutil.disk_usage(self.dest_dir).free
        except OSError as e:
            self._fail(e, f"cannot open {self.part}")
        self.resumed_from = self._durable = self.verifier.received
        needed = self.length - self.verifier.received
        if free < needed + STORAGE_RESERVE_BYTES:
            self.discard()
            raise InsufficientStorage(
                f"no space left on device (ENOSPC) for artifact {self.sha256[:16]}...: "
                f"{needed} bytes still to fetch and {STORAGE_RESERVE_BYTES} to keep free, "
                f"{free} free in {self.dest_dir}"
            )
        return self

    def _fail(self, error: OSError, doing: str) -> NoReturn:
        """Raise ``error`` as a :class:`DownloadError`; for ENOSPC, first free what was
        written (a full disk must not stop the rest of the device)."""
        if error.errno == errno.ENOSPC:
            self.discard()
            raise InsufficientStorage(
                f"no space left on device (ENOSPC) for artifact {self.sha256[:16]}...: "
                f"{doing}: {error}; the partial download was removed"
            ) from error
        self.close()
        raise DownloadError(f"{doing}: {error}") from error

    def restart(self) -> None:
        """Throw the prefix away (a server that ignored a range request sends from 0)."""
        assert self._file is not None
        self.verifier = StreamVerifier(self.length, self.sha256)
        try:
            self._file.seek(0)
            self._file.truncate(0)
        except OSError as e:
            self._fail(e, f"cannot truncate {self.part}")
        self._durable = 0
        self._write_sidecar()

    def append(self, data: bytes) -> None:
        """Check ``data`` (raises past the signed length) and write it after the prefix."""
        assert self._file is not None
        self.verifier.update(data)  # first: nothing past the signed length reaches the disk
        try:
            self._file.write(data)
        except OSError as e:
            self._fail(e, f"cannot write {self.part}")

    def checkpoint(self) -> None:
        """Make the prefix durable and record it in the sidecar."""
        if self._file is None or self.verifier.received == self._durable:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:
            self._fail(e, f"cannot sync {self.part}")
        self._durable = self.verifier.received
        self._write_sidecar()

    def finish(self) -> Path:
        """Verify the whole file, then fsync, rename into place and fsync the folder."""
        assert self._file is not None
        try:
            self.verifier.finish()
        except VerificationError:
            self.discard()
            raise
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(self.part, self.final)
            _fsync_dir(self.dest_dir)
            self.sidecar.unlink(missing_ok=True)
        except OSError as e:
            self._fail(e, f"cannot move {self.part} into place")
        return self.final

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(OSError):
            self.part.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.sidecar.unlink(missing_ok=True)

    def close(self) -> None:
        handle, self._file = self._file, None
        if handle is not None:
            with contextlib.suppress(OSError):
                handle.close()

    def _part_size(self) -> int:
        try:
            return self.part.stat().st_size
        except FileNotFoundError:
            return 0

    def _sidecar_bytes(self) -> int:
        try:
            state = json.loads(self.sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return 0
        if not isinstance(state, dict):
            return 0
        verified = state.get("verified_bytes")
        if (
            state.get("schema") != _SIDECAR_SCHEMA
            or state.get("schema_version") != 1
            or state.get("sha256") != self.sha256
            or state.get("length") != self.length
            or not isinstance(verified, int)
            or isinstance(verified, bool)
            or verified < 0
        ):
            return 0
        return verified

    def _write_sidecar(self) -> None:
        state = {
            "schema": _SIDECAR_SCHEMA,
            "schema_version": 1,
            "sha256": self.sha256,
            "length": self.length,
            "verified_bytes": self._durable,
        }
        tmp = self.sidecar.with_name(self.sidecar.name + ".tmp")
        try:
            with tmp.open("w", encoding="utf-8") as out:
                json.dump(state, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.sidecar)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self._fail(e, f"cannot write {self.sidecar}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _existing(part: _PartialFile) -> Path | None:
    """The final file if an earlier download already put it in place and it still verifies."""
    if not part.final.is_file():
        return None
    verifier = StreamVerifier(part.length, part.sha256)
    try:
        with part.final.open("rb") as f:
            while chunk := f.read(_CHUNK):
                verifier.update(chunk)
        verifier.finish()
    except (OSError, VerificationError):
        with contextlib.suppress(OSError):
            part.final.unlink()
        return None
    return part.final


def _check_size(ref: _ArtifactLike, limits: Limits) -> None:
    if ref.length > limits.max_bundle_bytes:
        raise ArtifactTooLarge(
            f"artifact {ref.sha256[:16]}... is {ref.length} bytes, "
            f"over the limit of {limits.max_bundle_bytes}"
        )


class _Backoff:
    """Exponential backoff with equal jitter between ``limits`` min and max."""

    def __init__(self, limits: Limits, rng: Callable[[], float]) -> None:
        self.minimum = limits.backoff_min_seconds
        self.maximum = limits.backoff_max_seconds
        self.rng = rng
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        ceiling = min(self.maximum, self.minimum * 2 ** (self.failures - 1))
        return float(ceiling / 2 + self.rng() * ceiling / 2)

    def reset(self) -> None:
        self.failures = 0


# ----------------------------------------------------------------------------- block download


@dataclass
class DownloadStats:
    """What one download did; for events, logs and tests."""

    resumed_from: int = 0
    requests: int = 0
    frames: int = 0
    frames_dropped: int = 0
    bytes_written: int = 0
    retries: int = 0


class BlockDownloader:
    """Fetch artifacts over MQTT in blocks (``artifact/req`` → ``artifact/blk``).

    Flow: ask for ``config.blocks_per_request`` blocks of ``config.block_size`` from the
    first byte not yet held; take a frame only if it is valid, for this artifact and
    starts exactly at that byte (duplicates and stale answers fall through); after the
    request's last block, checkpoint and ask for the next range. A silent source
    (``config.request_timeout_seconds`` without a useful frame), a gap in the current
    answer, a "busy" error block or an unavailable source lead to another request
    after a backoff; after ``max_attempts`` of those in a row without progress the
    download fails with :class:`DownloadTimeout`. Any other error block raises
    :class:`ArtifactRejected`.
    """

    def __init__(
        self,
        source: FrameSource,
        device_id: str,
        config: DownloadConfig,
        limits: Limits,
        *,
        max_attempts: int = 10,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: Callable[[], float] = random.random,
        cancelled: threading.Event | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.cancelled = cancelled or threading.Event()
        self.source = source
        self.device_id = device_id
        self.config = config
        self.limits = limits
        self.max_attempts = max_attempts
        self.clock = clock
        self.sleep = sleep
        self.rng = rng
        self.last_stats = DownloadStats()

    def download(self, ref: _ArtifactLike, dest_dir: Path) -> Path:
        """Fetch ``ref`` into ``dest_dir/<sha256>``, resuming a partial file; return its path."""
        _check_size(ref, self.limits)
        part = _PartialFile(ref, dest_dir)
        self.last_stats = stats = DownloadStats()
        if (done := _existing(part)) is not None:
            stats.resumed_from = ref.length
            part.discard()  # leftovers of an earlier attempt, if any
            return done
        part.open()
        stats.resumed_from = part.resumed_from
        try:
            self._fetch(part, stats)
            return part.finish()
        except VerificationError:
            part.discard()
            raise
        finally:
            with contextlib.suppress(DownloadError):
                part.checkpoint()
            part.close()

    def _fetch(self, part: _PartialFile, stats: DownloadStats) -> None:
        backoff = _Backoff(self.limits, self.rng)
        session = secrets.token_hex(4)  # answers to an earlier process are told apart
        block_size = self.config.block_size
        while not part.is_complete():
            blocks = -(-(part.length - part.offset) // block_size)
            req = BlockRequest(
                device_id=self.device_id,
                request_id=f"{part.sha256[:8]}-{session}-{stats.requests}",
                sha256=part.sha256,
                offset=part.offset,
                block_size=block_size,
                count=min(self.config.blocks_per_request, blocks),
            )
            stats.requests += 1
            failure: str | None = "source unavailable"
            try:
                self.source.request(req)
                failure = self._receive(part, req, stats)
            except SourceUnavailable:
                pass
            if failure is None:
                backoff.reset()
                part.checkpoint()
                continue
            if backoff.failures + 1 >= self.max_attempts:
                part.checkpoint()
                raise DownloadTimeout(
                    f"artifact {part.sha256[:16]}...: no progress after {self.max_attempts} "
                    f"attempts ({failure}); {part.offset} of {part.length} bytes held"
                )
            stats.retries += 1
            part.checkpoint()
            self.sleep(backoff.next_delay())

    def _receive(self, part: _PartialFile, req: BlockRequest, stats: DownloadStats) -> str | None:
        """Take frames until ``req`` is answered (None) or it failed (why, as text)."""
        end = min(part.length, req.offset + req.count * req.block_size)
        start = part.offset
        timeout = self.config.request_timeout_seconds
        deadline = self.clock() + timeout
        while part.offset < end:
            if self.cancelled.is_set():  # checked often: stopping must not wait a timeout out
                raise DownloadCancelled(
                    f"stopped with {part.offset} of {part.length} bytes held; resumes later"
                )
            remaining = deadline - self.clock()
            if remaining <= 0:
                return "timed out" if part.offset == start else None
            try:
                frame = self.source.frames.get(timeout=min(remaining, _CANCEL_POLL_SECONDS))
            except queue.Empty:
                continue
            stats.frames += 1
            try:
                header, data = decode_block(frame)
            except ContractError:
                stats.frames_dropped += 1
                continue
            if header.sha256 != part.sha256:
                stats.frames_dropped += 1
                continue
            if header.error is not None:
                if header.request_id != req.request_id:
                    stats.frames_dropped += 1  # an answer to an earlier request
                    continue
                if header.error.startswith(_BUSY_PREFIX):
                    return f"server busy ({header.error})"
                raise ArtifactRejected(
                    f"server refused artifact {part.sha256[:16]}...: {header.error}",
                    detail=header.error,
                )
            if header.total_length != part.length:
                raise LengthMismatchError(
                    f"server says the artifact is {header.total_length} bytes, "
                    f"{part.length} were signed"
                )
            if header.offset != part.offset or not data:
                stats.frames_dropped += 1
                if header.request_id == req.request_id and header.offset > part.offset:
                    # A gap in this answer: frames were lost. Ask again at once.
                    return None if part.offset > start else "lost frames"
                continue
            part.append(data)
            stats.bytes_written += len(data)
            deadline = self.clock() + timeout
        return None


# ----------------------------------------------------------------------------- HTTP download


def http_download(
    base_url: str,
    path: str,
    ref: _ArtifactLike,
    dest_dir: Path,
    *,
    opener: urllib.request.OpenerDirector | None = None,
    limits: Limits | None = None,
    timeout: float = 30.0,
    max_attempts: int = 5,
    sleep: Callable[[float], None] = time.sleep,
    rng: Callable[[], float] = random.random,
) -> Path:
    """Fetch ``base_url + path`` into ``dest_dir/<sha256>`` with HTTP Range requests.

    Asks for ``bytes={held}-{length-1}``; a ``206`` must start at the byte asked
    for and state the signed total, a ``200`` (range ignored) starts over from
    byte 0. Reading stops at the signed length. Connection errors, timeouts and
    5xx answers are retried after a backoff (``max_attempts`` in a row without
    progress, then :class:`DownloadTimeout`); other 4xx are
    :class:`ArtifactRejected`. ``opener`` carries credentials or TLS settings.
    """
    limits = limits or Limits()
    _check_size(ref, limits)
    url = base_url.rstrip("/") + "/" + path.lstrip("/")
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise DownloadError(f"{url!r}: only http and https URLs are fetched")
    opener = opener or urllib.request.build_opener()
    part = _PartialFile(ref, dest_dir)
    if (done := _existing(part)) is not None:
        part.discard()
        return done
    part.open()
    backoff = _Backoff(limits, rng)
    try:
        while not part.is_complete():
            before = part.offset
            try:
                _http_fetch(opener, url, part, timeout)
                failure = None
            except (urllib.error.URLError, OSError, _RetryableHTTP) as e:
                failure = str(e)
            part.checkpoint()
            if part.is_complete():
                break
            if part.offset > before:
                backoff.reset()
                continue
            if backoff.failures + 1 >= max_attempts:
                raise DownloadTimeout(
                    f"{url}: no progress after {max_attempts} attempts ({failure}); "
                    f"{part.offset} of {part.length} bytes held"
                )
            sleep(backoff.next_delay())
        return part.finish()
    except VerificationError:
        part.discard()
        raise
    finally:
        with contextlib.suppress(DownloadError):
            part.checkpoint()
        part.close()


class _RetryableHTTP(Exception):
    pass


def _http_fetch(
    opener: urllib.request.OpenerDirector, url: str, part: _PartialFile, timeout: float
) -> None:
    start = part.offset
    # The scheme was checked in http_download: only http or https get here.
    request = urllib.request.Request(  # noqa: S310
        url, headers={"Range": f"bytes={start}-{part.length - 1}"}
    )
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        with contextlib.suppress(OSError):
            e.close()
        if e.code == 416:
            raise LengthMismatchError(
                f"{url}: the server has no byte {start}; {part.length} bytes were signed"
            ) from e
        if e.code >= 500 or e.code in (408, 429):
            raise _RetryableHTTP(f"HTTP {e.code}") from e
        raise ArtifactRejected(f"{url}: HTTP {e.code} {e.reason}", detail=f"HTTP {e.code}") from e
    with response:
        if response.status == 206:
            first, total = _content_range(response.headers.get("Content-Range", ""))
            if total is not None and total != part.length:
                raise LengthMismatchError(
                    f"{url}: the server says {total} bytes, {part.length} were signed"
                )
            if first != start:
                raise _RetryableHTTP(f"asked for byte {start}, got a range from {first}")
        elif response.status == 200:
            if start:
                part.restart()  # the server ignored the range: the body starts at byte 0
        else:
            raise _RetryableHTTP(f"unexpected HTTP {response.status}")
        since_checkpoint = 0
        while not part.is_complete():
            # One byte more than is left: a body that goes on past the signed length is caught.
            chunk = response.read(min(_CHUNK, part.length - part.offset + 1))
            if not chunk:
                return
            part.append(chunk)
            since_checkpoint += len(chunk)
            if since_checkpoint >= _CHECKPOINT_BYTES:
                part.checkpoint()
                since_checkpoint = 0


def _content_range(value: str) -> tuple[int, int | None]:
    """``bytes 100-199/1000`` → ``(100, 1000)``; ``*`` as the total → ``None``."""
    try:
        unit, _, spec = value.strip().partition(" ")
        span, _, total = spec.partition("/")
        first = int(span.split("-", 1)[0])
        if unit.lower() != "bytes":
            raise ValueError(unit)
        return first, None if total.strip() == "*" else int(total)
    except ValueError:
        raise _RetryableHTTP(f"unreadable Content-Range {value!r}") from None
