"""Sustained ingestion of telemetry reports with two consumers, against a bare paho
subscriber reading the same stream in the same run.

The stream: N telemetry reports (60,000; 3,000 with ``--quick``) from D devices (10,000;
1,000), one report per device per minute, so that a batch holds about one report per
device as in a large fleet. Each report carries one model window with a drift sketch
of 32 features x 20 bins (plus 10 classes and the confidence histogram): about 7 kB of
JSON, what a real agent sends. They go through a Mosquitto of the bench's own (no
persistence; ``max_inflight_messages 0``, so the broker never holds messages back from a
consumer that acknowledges only after its commit -- ``--max-inflight 20``, Mosquitto's
default, measured the same within noise here) into:

- **ingestion**: two worker processes (:class:`server.ingest.workers.IngestWorkers`,
  what ``edgefleet ingest --workers 2`` runs) on the shared subscription
  ``$share/<group>/ef/v1/dev/+/telemetry``, each validating with ``shared``'s schema,
  storing the reports, their model windows and the drift rollups in batches, and
  acknowledging after the commit;
- **baseline**: one bare paho subscriber (MQTT 3.1.1, QoS 1) that receives the same
  messages and does nothing with them.

Both read a backlog the broker holds for their persistent sessions, one after the
other, so they never compete for the machine's two cores and the publisher does not
run meanwhile: each figure is how fast that consumer drains the stream, counted from
its first message (or first commit) to its last, startup excluded. The ingestion run
is then checked: every report stored exactly once, the rollups' inference count equal
to the reports' sum.

Both figures are wall-clock rates, so they move with whatever else runs on the machine;
beside them, the CPU each consumer spent per report over the same stretch (the workers'
processes, all threads, from ``/proc``; the bare subscriber's process), which does not.
Also printed for reference, per CPU second of one process: ``parse_report`` alone and
``store_reports`` alone on what it parsed (its preparation included, no broker). On
SQLite the workers' transactions run one at a time (SQLite has one writer); what
``prepare_reports`` and the parsing do runs before the transaction, in parallel.

    python bench/ingest.py [--quick] [--reports N] [--devices D] [--workers W]
                           [--batch-size B] [--db postgresql+psycopg://...]

``--db`` names a PostgreSQL database; the bench works in a schema of its own there and
drops it at the end. The default is a SQLite file in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import brokers
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from results import BenchResults, add_results_argument
from sqlalchemy import func, select, text
from sqlmodel import Session

from server.db import create_db_engine, migrate
from server.drift.rollups import fleet_table
from server.fleet.models import Device, DeviceStatus
from server.ingest.models import TelemetryRecord
from server.ingest.telemetry import parse_report, store_reports
from server.ingest.workers import IngestWorkers, WorkerSpec, worker_client_id
from shared.drift import DriftAccumulator, DriftReference
from shared.latency import latency_counts
from shared.messages import LatencyHistogram, ModelWindow, TelemetryReport
from shared.topics import Channel, device_topic, fleet_filter

FEATURES, BINS, CLASSES = 32, 20, 10
INFERENCES = 120
SKETCHES = 64
"""Distinct sketches the reports cycle through (building one per report would take minutes)."""
GROUP = "bench"
WORKERS = 2


def start_mosquitto(
    work: Path, backlog: int, max_inflight: int
) -> tuple[subprocess.Popen[bytes], int]:
    return brokers.start_mosquitto(
        work,
        f"max_inflight_messages {max_inflight}\nmax_queued_messages {backlog + 1000}\n"
        "max_queued_bytes 0\nset_tcp_nodelay true\n",
    )


# ----------------------------------------------------------------------------- the stream


def build_payloads(
    n_reports: int, n_devices: int, start: datetime
) -> tuple[list[tuple[str, bytes]], list[TelemetryReport]]:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(20_000, FEATURES))
    logits = rng.normal(size=(20_000, CLASSES))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    reference = DriftReference.from_data(
        train,
        feature_names=[f"f{i}" for i in range(FEATURES)],
        n_bins=BINS,
        probabilities=probabilities,
    )
    sketches = []
    for i in range(SKETCHES):
        accumulator = DriftAccumulator(reference)
        accumulator.update(
            rng.normal(0.02 * i, 1.0, size=(INFERENCES, FEATURES)),
            probabilities=probabilities[i * INFERENCES : (i + 1) * INFERENCES],
        )
        sketches.append(accumulator.sketch())
    latency = LatencyHistogram(counts=latency_counts(rng.lognormal(1.5, 0.4, INFERENCES)).tolist())
    devices = [f"bench-{i:05d}" for i in range(n_devices)]
    reports = []
    for k in range(n_reports):
        device, minute = devices[k % n_devices], k // n_devices
        window_start = start + timedelta(minutes=minute)
        reports.append(
            TelemetryReport(
                device_id=device,
                seq=minute + 1,
                window_start=window_start,
                window_end=window_start + timedelta(minutes=1),
                models=[
                    ModelWindow(
                        model_name="bench",
                        model_version=1,
                        target="edge-x86_64-litert",
                        inferences=INFERENCES,
                        latency_ms=latency,
                        drift=sketches[k % SKETCHES],
                    )
                ],
            )
        )
    payloads = [(device_topic(r.device_id, Channel.TELEMETRY), r.to_bytes()) for r in reports]
    return payloads, reports


def publish(port: int, payloads: list[tuple[str, bytes]]) -> float:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-publisher")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    started = time.perf_counter()
    infos = [client.publish(topic, payload, qos=1) for topic, payload in payloads]
    for info in infos:
        info.wait_for_publish(120)
        if not info.is_published():
            raise SystemExit("the broker did not acknowledge every report")
    elapsed = time.perf_counter() - started
    client.loop_stop()
    client.disconnect()
    return elapsed


# ----------------------------------------------------------------------------- the consumers


class BareSubscriber:
    """A paho subscriber that counts what it receives (its session persists)."""

    def __init__(self, port: int, expected: int) -> None:
        self.port, self.expected = port, expected
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.done = threading.Event()
        self.subscribed = threading.Event()

    def _client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id="bench-baseline@bench",
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        client.on_connect = lambda c, *_: c.subscribe(fleet_filter(Channel.TELEMETRY), qos=1)
        client.on_subscribe = lambda *_: self.subscribed.set()
        client.on_message = self._on_message
        return client

    def _on_message(self, _c: Any, _u: Any, _message: Any) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.count += 1
        self.last = now
        if self.count >= self.expected:
            self.done.set()

    def subscribe_and_leave(self) -> None:
        client = self._client()
        client.connect("127.0.0.1", self.port)
        client.loop_start()
        if not self.subscribed.wait(10):
            raise SystemExit("the baseline subscriber was not subscribed")
        client.disconnect()
        client.loop_stop()

    def drain(self, timeout: float) -> tuple[float, float]:
        """Messages per second from the first to the last, and CPU seconds per message
        (this process's, while draining: paho's thread does the work)."""
        client = self._client()
        client.connect("127.0.0.1", self.port)
        started = time.process_time()
        client.loop_start()
        finished = self.done.wait(timeout)
        cpu = time.process_time() - started
        client.disconnect()
        client.loop_stop()
        if not finished or self.first is None or self.last is None:
            raise SystemExit(f"the baseline received {self.count} of {self.expected} reports")
        return (self.count - 1) / max(self.last - self.first, 1e-9), cpu / self.count


def stored(engine: Any) -> int:
    with Session(engine) as session:
        return int(session.execute(select(func.count()).select_from(TelemetryRecord)).scalar_one())


def run_workers(
    specs: list[WorkerSpec], engine: Any, expected: int, timeout: float
) -> tuple[float, float, IngestWorkers]:
    """Start the workers on their waiting backlog; reports per second from the first commit
    to the last (the count at the first commit is not counted), and the workers' CPU
    seconds per report over the same stretch."""
    workers = IngestWorkers(specs)
    workers.start()
    deadline = time.monotonic() + timeout
    first_at, first_count, first_cpu = None, 0, 0.0
    pids = [pid for pid in workers.pids().values() if pid is not None]
    try:
        while True:
            count, now = stored(engine), time.perf_counter()
            if first_at is None and count > 0:
                first_at, first_count, first_cpu = now, count, cpu_seconds(pids)
            if count >= expected:
                last_cpu = cpu_seconds(pids)
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"ingestion stored {count} of {expected} reports in time")
            time.sleep(0.1)
    finally:
        workers.stop()
    assert first_at is not None
    done = max(count - first_count, 1)
    return (count - first_count) / max(now - first_at, 1e-9), (last_cpu - first_cpu) / done, workers


def subscribe_workers_and_leave(specs: list[WorkerSpec], timeout: float = 60) -> None:
    """Start the workers until their subscriptions are granted, then stop them: their
    persistent sessions stay members of the group and collect their share meanwhile."""
    workers = IngestWorkers(specs)
    workers.start()
    deadline = time.monotonic() + timeout
    try:
        while not workers.subscribed():
            if time.monotonic() > deadline:
                raise SystemExit("the ingest workers did not subscribe")
            time.sleep(0.05)
    finally:
        workers.stop()


# ----------------------------------------------------------------------------- reference figures


def in_memory_figures(payloads: list[tuple[str, bytes]], url: str, n: int) -> tuple[float, float]:
    """``parse_report`` alone, then ``store_reports`` alone on what it parsed (batches of
    500, the drift layouts cached as the ingestor caches them): reports per CPU second
    of this process (the database's own CPU, on PostgreSQL, not included)."""
    started = time.process_time()
    parsed = [parse_report(topic, payload) for topic, payload in payloads[:n]]
    parse_rate = n / (time.process_time() - started)
    engine = create_db_engine(url)
    layouts: dict[str, Any] = {}
    started = time.process_time()
    for start in range(0, n, 500):
        with Session(engine) as session:
            batch_layouts = dict(layouts)
            store_reports(session, parsed[start : start + 500], layouts=batch_layouts)
            session.commit()
        layouts = batch_layouts
    store_rate = n / (time.process_time() - started)
    engine.dispose()
    return parse_rate, store_rate


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU the processes used so far (from /proc; 0 for a gone process)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


def add_devices(engine: Any, n_devices: int) -> None:
    with Session(engine) as session:
        session.add_all(
            Device(
                id=f"bench-{i:05d}",
                status=DeviceStatus.ACCEPTED.value,
                profile="edge-x86_64-litert",
                arch="x86_64",
                runtime_name="litert",
                runtime_version="2.3.0",
                agent_version="bench",
            )
            for i in range(n_devices)
        )
        session.commit()


def database(url: str | None, work: Path, name: str) -> tuple[str, Any]:
    """A fresh database URL (SQLite file, or a PostgreSQL schema of the bench's own)."""
    if url is None:
        return f"sqlite:///{work / name}", None
    if not url.startswith("postgresql"):
        raise SystemExit("--db takes a PostgreSQL URL (the default is a SQLite file)")
    schema = f"edgefleet_bench_{os.getpid()}_{name.split('.')[0]}"
    admin = create_db_engine(url)
    with admin.begin() as connection:
        connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    separator = "&" if "?" in url else "?"

    def drop() -> None:
        with admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        admin.dispose()

    return f"{url}{separator}options=-csearch_path%3D{schema}", drop


def row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3,000 reports, 1,000 devices (CI)")
    parser.add_argument("--reports", type=int, help="reports in the stream (default 60,000)")
    parser.add_argument("--devices", type=int, help="devices sending them (default 10,000)")
    parser.add_argument("--db", help="a PostgreSQL URL (default: a SQLite file)")
    parser.add_argument("--workers", type=int, default=WORKERS, help="ingest worker processes")
    parser.add_argument("--batch-size", type=int, default=500, help="reports per transaction")
    parser.add_argument(
        "--max-inflight",
        type=int,
        default=0,
        help="the broker's max_inflight_messages (0: no limit; Mosquitto's default is 20)",
    )
    add_results_argument(parser)
    args = parser.parse_args()
    n_reports = args.reports or (3_000 if args.quick else 60_000)
    n_devices = args.devices or (1_000 if args.quick else 10_000)
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(
        minutes=n_reports // n_devices + 60
    )
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-ingest-"))
    cleanups: list[Any] = []
    mosquitto = None
    try:
        t0 = time.perf_counter()
        payloads, _reports = build_payloads(n_reports, n_devices, start)
        build_seconds = time.perf_counter() - t0
        size = sum(len(p) for _, p in payloads) / len(payloads)

        url, drop = database(args.db, work, "ingest.db")
        if drop:
            cleanups.append(drop)
        engine = create_db_engine(url)
        migrate(engine)
        add_devices(engine, n_devices)
        mosquitto, port = start_mosquitto(work, n_reports, args.max_inflight)
        broker_url = f"mqtt://127.0.0.1:{port}"
        specs = [
            WorkerSpec(
                index=i,
                database_url=url,
                broker_url=broker_url,
                client_id=worker_client_id("edgefleet-ingest@bench", i),
                share_group=GROUP,
                batch_size=args.batch_size,
                log_level="WARNING",
            )
            for i in range(args.workers)
        ]
        subscribe_workers_and_leave(specs)
        baseline = BareSubscriber(port, n_reports)
        baseline.subscribe_and_leave()
        publish_seconds = publish(port, payloads)

        baseline_rate, baseline_cpu = baseline.drain(timeout=300)
        ingest_rate, ingest_cpu, workers = run_workers(specs, engine, n_reports, timeout=1800)
        stats = workers.stats()

        # exactly once: every report stored once, and the rollups counted each once
        table = fleet_table()
        with Session(engine) as session:
            inferences = int(
                session.execute(
                    select(func.coalesce(func.sum(table.c.inferences), 0)).where(
                        table.c.period == "hour"
                    )
                ).scalar_one()
            )
        exactly_once = stored(engine) == n_reports and inferences == n_reports * INFERENCES
        dialect = engine.dialect.name
        engine.dispose()

        reference_n = min(n_reports, 3_000)
        ref_url, ref_drop = database(args.db, work, "reference.db")
        if ref_drop:
            cleanups.append(ref_drop)
        ref_engine = create_db_engine(ref_url)
        migrate(ref_engine)
        ref_engine.dispose()
        parse_rate, store_rate = in_memory_figures(payloads, ref_url, reference_n)
    finally:
        if mosquitto is not None:
            mosquitto.terminate()
            mosquitto.wait(10)
        for cleanup in cleanups:
            cleanup()
        shutil.rmtree(work, ignore_errors=True)

    received = {i: s.received for i, s in stats.items()}
    ratio = ingest_rate / baseline_rate
    print(
        f"\ningestion benchmark ({'quick' if args.quick else 'full'}): {n_reports:,} telemetry "
        f"reports from {n_devices:,} devices, {size / 1024:.1f} kB each ({FEATURES} features x "
        f"{BINS} bins + {CLASSES} classes), into {dialect}; {os.cpu_count()} cores; "
        f"stream built in {build_seconds:.1f} s and published in {publish_seconds:.1f} s "
        f"({n_reports / publish_seconds:,.0f}/s)\n"
    )
    lines = [
        row("figure", "value", "baseline", "ratio", "goal", "pass/short"),
        row("---", "---", "---", "---", "---", "---"),
        row(
            f"sustained ingestion, {args.workers} worker processes (shared subscription)",
            f"{ingest_rate:,.0f} reports/s",
            f"{baseline_rate:,.0f} reports/s (bare paho subscriber)",
            f"{ratio:.2f}",
            "≥ 5,000/s; ratio ≥ 0.5",
            "pass" if ingest_rate >= 5_000 and ratio >= 0.5 else "short",
        ),
        row(
            "CPU per report: the ingest workers (all threads) vs the bare paho subscriber",
            f"{ingest_cpu * 1e6:,.0f} µs",
            f"{baseline_cpu * 1e6:,.0f} µs",
            f"{ingest_cpu / max(baseline_cpu, 1e-9):.1f}",
            "—",
            "info",
        ),
        row(
            "split between the workers (messages received)",
            " / ".join(f"{received[i]:,}" for i in sorted(received)),
            "",
            f"{min(received.values()) / max(max(received.values()), 1):.2f}",
            "both busy",
            "pass" if min(received.values()) > 0 else "short",
        ),
        row(
            "stored exactly once (reports, rollup inferences)",
            f"{n_reports:,} of {n_reports:,}" if exactly_once else "NO",
            "",
            "1.0" if exactly_once else "-",
            "1.0",
            "pass" if exactly_once else "short",
        ),
        row(
            "store_reports alone, one process, no broker (per CPU second)",
            f"{store_rate:,.0f} reports/s",
            "",
            "",
            "—",
            "info",
        ),
        row(
            "parse_report alone: parse + validation (per CPU second)",
            f"{parse_rate:,.0f} reports/s",
            "",
            "",
            "—",
            "info",
        ),
    ]
    results = BenchResults("ingest", quick=args.quick, path=args.results)
    for line in lines[2:]:  # the table's rows, header and rule left out
        results.add_row(*(cell.strip() for cell in line.strip()[2:-2].split(" | ")))
    results.finish()
    if not exactly_once:
        raise SystemExit("ingestion did not store every report exactly once")


if __name__ == "__main__":
    main()
