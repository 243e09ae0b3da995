"""Several ingestion workers: N processes, each a
:class:`~server.ingest.telemetry.TelemetryIngestor` on the same shared subscription, so
ingestion uses N cores.

``edgefleet ingest --workers N`` runs them on their own; ``edgefleet server`` runs them
in place of its in-process ingestor when ``EDGEFLEET_INGEST_WORKERS`` is above 1.

What always holds:

- Every worker subscribes to the device channels it consumes (telemetry, and
  :func:`device_consumers`: feedback and samples) through
  ``$share/<group>/ef/v1/dev/+/<channel>``, so the broker hands each message to one
  worker of the group. Mosquitto (2.x) and EMQX offer shared subscriptions to MQTT
  3.1.1 clients, the baseline.
- Worker ``i`` has the persistent client id :func:`worker_client_id` (``clean_session``
  false): a worker that restarts resumes its session and gets what the broker queued
  for it meanwhile, including messages it had not acknowledged. The id contains an
  ``@``, which no device id may contain, so no device can take its session over. Note
  that a persistent member keeps getting its share while it is away (Mosquitto queues
  it): running fewer workers than before leaves the missing ones' share waiting until
  a worker with their id connects again.
- Exactly once is the ingestor's: unique keys in the database, a PUBACK only after
  the commit. Workers share nothing but the database and the broker; SQLite serialises
  their writes (WAL, busy timeout), PostgreSQL row locks order them.
- A worker process that dies is started again after a pause (1 s, doubling to 30 s);
  a worker whose supervisor died (even by SIGKILL) notices within 0.2 s and stops;
  stopping the supervisor sends every worker SIGTERM (each finishes and acknowledges
  the batch in hand) and waits for them. Workers share no lock with the supervisor or
  each other (counters go through a lock-free shared array), so a worker killed at any
  moment cannot wedge the others.
- Processes are spawned, not forked: a server process has threads, and forking one
  copies their locks.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import multiprocessing
import os
import signal
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from multiprocessing.context import SpawnProcess
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import event

from server.errors import ConfigurationError
from server.ingest.consumers import ChannelConsumer
from server.ingest.telemetry import IngestStats, TelemetryIngestor
from server.settings import Settings

__all__ = [
    "DEFAULT_SHARE_GROUP",
    "IngestWorkers",
    "WorkerSpec",
    "device_consumers",
    "mqtt_client_factory",
    "run_worker",
    "server_worker_specs",
    "sqlite_write_lock",
    "worker_client_id",
]

log = logging.getLogger(__name__)

DEFAULT_SHARE_GROUP = "ingest"
_STATS_SECONDS = 0.2
_RESTART_MIN, _RESTART_MAX = 1.0, 30.0
_GC_THRESHOLDS = (50_000, 20, 100)
_MAX_CLIENT_ID = 64


def device_consumers(*, samples_retention_days: int = 30) -> list[ChannelConsumer]:
    """The channels every ingestor consumes besides telemetry: feedback and samples."""
    from server.feedback.ingest import FeedbackConsumer
    from server.samples.ingest import SamplesConsumer

    return [
        FeedbackConsumer(),
        SamplesConsumer(retention=timedelta(days=samples_retention_days)),
    ]


def worker_client_id(base: str, index: int) -> str:
    """Worker ``index``'s client id from a base id: ``edgefleet-ingest@host`` ->
    ``edgefleet-ingest-0@host``. The result always contains an ``@``."""
    name, at, host = base.partition("@")
    client_id = f"{name}-{index}@{host}" if at else f"{base}-{index}@ingest"
    if len(client_id) > _MAX_CLIENT_ID:
        raise ConfigurationError(
            f"ingest client id {client_id!r} is longer than {_MAX_CLIENT_ID} characters"
        )
    return client_id


def mqtt_client_factory(broker_url: str, client_id: str) -> Callable[[], mqtt.Client]:
    """Makes the ingestor's MQTT 3.1.1 clients for ``mqtt[s]://[user:pw@]host[:port]``:
    a persistent session, manual acknowledgements, credentials and TLS from the URL."""
    parsed = urlparse(broker_url)
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise ConfigurationError(f"broker URL must look like mqtt://host:port, not {broker_url!r}")

    def make() -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=False,
            manual_ack=True,
        )
        if parsed.username is not None:
            password = None if parsed.password is None else unquote(parsed.password)
            client.username_pw_set(unquote(parsed.username), password)
        if parsed.scheme == "mqtts":
            client.tls_set_context(ssl.create_default_context())
        return client

    return make


def broker_address(broker_url: str) -> tuple[str, int]:
    parsed = urlparse(broker_url)
    if not parsed.hostname:
        raise ConfigurationError(f"broker URL must look like mqtt://host:port, not {broker_url!r}")
    return parsed.hostname, parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)


class _FileLock:
    """An exclusive ``flock`` on a file, held for one ``with`` block (one process at a time;
    a waiter wakes the moment the holder lets go, and a dead holder's lock goes with it)."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def __call__(self) -> _FileLock:
        return self

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *_exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)


def sqlite_write_lock(database_url: str) -> Callable[[], Any] | None:
    """For a SQLite file, a lock that lets one worker at a time write: SQLite allows one
    writer anyway, and its busy handler makes a waiting writer sleep in steps of up to
    100 ms, while a lock hands over at once. None for other databases."""
    if not database_url.startswith("sqlite") or "///" not in database_url:
        return None
    path = database_url.split("///", 1)[1].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return _FileLock(Path(f"{path}.ingest-lock"))


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything one worker process needs (it crosses the process boundary: plain data)."""

    index: int
    database_url: str
    broker_url: str
    client_id: str
    share_group: str
    batch_size: int = 500
    flush_interval: float = 0.2
    samples_retention_days: int = 30
    log_level: str = "INFO"
    log_format: str = "console"


_SQLITE_CACHE_KIB = 128 * 1024
"""SQLite page cache of a worker's connections: the rollup rows of a large fleet's current
hour, 6 hours and day (about 10 kB per device and model) stay in memory between batches
instead of being read back from the OS on every one (measured: 10% less CPU per report
at 10,000 devices than SQLite's default of 2 MB)."""


def _worker_sqlite_cache(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA cache_size=-{_SQLITE_CACHE_KIB}")
    cursor.close()


_FIELDS = tuple(IngestStats.__dataclass_fields__)
_WIDTH = len(_FIELDS) + 1  # the counters, then "subscribed"


def run_worker(spec: WorkerSpec, board: Any) -> None:
    """A worker process's body: ingest until SIGTERM, writing its counters and whether it is
    subscribed into its own row of ``board`` (a shared int64 array) every 0.2 s."""
    from server.db import create_db_engine
    from server.logs import configure_logging

    supervisor = os.getppid()
    terminated = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: terminated.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which stops us
    configure_logging(spec.log_level, spec.log_format)
    engine = create_db_engine(spec.database_url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _worker_sqlite_cache)
    host, port = broker_address(spec.broker_url)
    ingestor = TelemetryIngestor(
        engine,
        host=host,
        port=port,
        share_group=spec.share_group,
        batch_size=spec.batch_size,
        flush_interval=spec.flush_interval,
        client_factory=mqtt_client_factory(spec.broker_url, spec.client_id),
        consumers=device_consumers(samples_retention_days=spec.samples_retention_days),
        write_lock=sqlite_write_lock(spec.database_url),
        shard=spec.index,  # its own fleet rollup rows: no lock waits on the other workers
    )
    row = spec.index * _WIDTH

    def publish(subscribed: bool) -> None:
        stats = ingestor.stats()
        for i, name in enumerate(_FIELDS):
            board[row + i] = getattr(stats, name)
        board[row + _WIDTH - 1] = int(subscribed)

    # A batch of parsed reports is hundreds of thousands of young container objects (a
    # sketch's count lists) that hold no reference cycles: with the default thresholds
    # the cycle collector runs every 700 allocations and took ~40% of parsing time
    # (measured). Startup objects are frozen out of its sight; it still runs, rarely.
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_GC_THRESHOLDS)
    ingestor.start()
    log.info("ingest worker %d started as %s", spec.index, spec.client_id)
    try:
        while not terminated.wait(_STATS_SECONDS):
            publish(ingestor.subscribed.is_set())
            if os.getppid() != supervisor:  # it died without stopping us: do not linger
                log.error("ingest worker %d: the supervisor is gone; stopping", spec.index)
                break
    finally:
        ingestor.stop()
        publish(False)
        engine.dispose()


@dataclass
class _Slot:
    spec: WorkerSpec
    process: SpawnProcess | None = None
    started_at: float = 0.0
    restarts: int = 0
    next_start: float | None = None
    """When a dead worker is started again (None: it is not dead, or not noticed yet)."""
    backoff: float = _RESTART_MIN


class IngestWorkers:
    """Runs and supervises one process per :class:`WorkerSpec` (see the module docstring).

    Workers share nothing with the supervisor that a killed one could leave locked: each
    writes its counters into its own row of a lock-free shared array, and is stopped by
    SIGTERM.
    """

    def __init__(
        self,
        specs: Sequence[WorkerSpec],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not specs:
            raise ConfigurationError("at least one ingest worker is needed")
        if len({s.client_id for s in specs}) != len(specs):
            raise ConfigurationError("every ingest worker needs its own client id")
        if sorted(s.index for s in specs) != list(range(len(specs))):
            raise ConfigurationError("ingest workers are numbered 0 to N-1")
        self._context = multiprocessing.get_context("spawn")
        self._slots = [_Slot(spec) for spec in sorted(specs, key=lambda s: s.index)]
        self._board: Any = self._context.RawArray("q", len(specs) * _WIDTH)
        self._offset: dict[int, IngestStats] = {}
        self._clock = clock
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def specs(self) -> list[WorkerSpec]:
        return [slot.spec for slot in self._slots]

    def start(self) -> None:
        for slot in self._slots:
            self._spawn(slot)
        self._thread = threading.Thread(target=self._supervise, name="ingest-workers", daemon=True)
        self._thread.start()

    def _spawn(self, slot: _Slot) -> None:
        process = self._context.Process(
            target=run_worker,
            args=(slot.spec, self._board),
            name=f"edgefleet-ingest-{slot.spec.index}",
            daemon=False,
        )
        process.start()
        slot.process = process
        slot.started_at = self._clock()
        log.info("ingest worker %d: process %s", slot.spec.index, process.pid)

    def _supervise(self) -> None:
        while not self._stopping.wait(0.5):
            now = self._clock()
            for slot in self._slots:
                with self._lock:
                    if self._stopping.is_set():
                        return
                    process = slot.process
                    if process is None or process.is_alive():
                        continue
                    if slot.next_start is None:
                        if now - slot.started_at > 60:
                            slot.backoff = _RESTART_MIN  # it ran a while: not a crash loop
                        log.error(
                            "ingest worker %d exited with code %s; starting it again in %.0f s",
                            slot.spec.index,
                            process.exitcode,
                            slot.backoff,
                        )
                        slot.next_start = now + slot.backoff
                        slot.backoff = min(slot.backoff * 2, _RESTART_MAX)
                    if now >= slot.next_start:
                        self._keep_counts(slot.spec.index)
                        slot.restarts += 1
                        slot.next_start = None
                        self._spawn(slot)

    def _row(self, index: int) -> tuple[IngestStats, bool]:
        values = self._board[index * _WIDTH : (index + 1) * _WIDTH]
        return IngestStats(**dict(zip(_FIELDS, values[:-1], strict=True))), bool(values[-1])

    def _keep_counts(self, index: int) -> None:
        """A restarted worker counts from zero again: keep what the dead one wrote last."""
        last, _ = self._row(index)
        self._offset[index] = _add(self._offset.get(index, IngestStats()), last)
        for i in range(index * _WIDTH, (index + 1) * _WIDTH):
            self._board[i] = 0

    def stats(self) -> dict[int, IngestStats]:
        """Per worker index, what it did since :meth:`start` (a restarted worker's counts
        include its predecessors' up to their last report)."""
        with self._lock:
            return {
                slot.spec.index: _add(
                    self._offset.get(slot.spec.index, IngestStats()), self._row(slot.spec.index)[0]
                )
                for slot in self._slots
            }

    def subscribed(self) -> bool:
        """Whether every worker is running with its subscriptions granted by the broker."""
        with self._lock:
            return all(
                slot.process is not None
                and slot.process.is_alive()
                and self._row(slot.spec.index)[1]
                for slot in self._slots
            )

    def pids(self) -> dict[int, int | None]:
        return {
            slot.spec.index: None if slot.process is None else slot.process.pid
            for slot in self._slots
        }

    def restarts(self) -> dict[int, int]:
        return {slot.spec.index: slot.restarts for slot in self._slots}

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every worker (each finishes and acknowledges the batch in hand), wait up
        to ``timeout`` s, then kill stragglers."""
        with self._lock:
            self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        for slot in self._slots:
            if slot.process is not None and slot.process.is_alive():
                slot.process.terminate()
        deadline = self._clock() + timeout
        for slot in self._slots:
            if slot.process is None:
                continue
            slot.process.join(max(0.0, deadline - self._clock()))
            if slot.process.is_alive():
                log.error("ingest worker %d did not stop in time; killing it", slot.spec.index)
                slot.process.kill()
                slot.process.join(5)


def _add(a: IngestStats, b: IngestStats) -> IngestStats:
    return IngestStats(**{k: getattr(a, k) + getattr(b, k) for k in asdict(a)})


def server_worker_specs(settings: Settings) -> list[WorkerSpec]:
    """The workers ``edgefleet server`` starts when ``ingest_workers`` is above 1."""
    return [
        WorkerSpec(
            index=i,
            database_url=settings.resolved_database_url,
            broker_url=settings.service_broker_url,
            client_id=worker_client_id(settings.ingest_client_id, i),
            share_group=settings.ingest_share_group or DEFAULT_SHARE_GROUP,
            samples_retention_days=settings.samples_retention_days,
            log_level=settings.log_level,
            log_format=settings.log_format,
        )
        for i in range(settings.ingest_workers)
    ]
