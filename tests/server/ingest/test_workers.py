"""``edgefleet ingest --workers 2`` against a real Mosquitto: the shared subscription splits
the stream between the two worker processes, every report is stored exactly once
(duplicates included), and a worker killed mid-stream comes back and loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.drift.rollups import fleet_table
from server.fleet.models import DeviceStatus
from server.ingest.models import TelemetryRecord
from server.ingest.workers import worker_client_id
from shared.latency import latency_counts
from shared.messages import LatencyHistogram, ModelWindow, TelemetryReport
from shared.topics import Channel, device_topic
from tests.conftest import operator_client
from tests.server.conftest import PRODUCTION_DATABASE
from tests.server.ingest.test_telemetry import add_device

pytestmark = [pytest.mark.database, pytest.mark.broker, pytest.mark.slow]

DEVICES = [f"dev-{i:02d}" for i in range(20)]
T0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
INFERENCES = 7


def report(device_id: str, seq: int) -> TelemetryReport:
    start = T0 + timedelta(seconds=seq)
    return TelemetryReport(
        device_id=device_id,
        seq=seq,
        window_start=start,
        window_end=start + timedelta(seconds=1),
        models=[
            ModelWindow(
                model_name="digits",
                model_version=1,
                target="edge-x86_64-litert",
                inferences=INFERENCES,
                latency_ms=LatencyHistogram(counts=latency_counts([1.0] * INFERENCES).tolist()),
            )
        ],
    )


class Workers:
    """``edgefleet ingest`` as a child process, with its stderr followed on a thread."""

    def __init__(self, broker: Any, db_url: str, tmp_path: Path, name: str) -> None:
        env = {
            **os.environ,
            "EDGEFLEET_DATA_DIR": str(tmp_path / "data"),
            "EDGEFLEET_LOG_LEVEL": "WARNING",
        }
        self.name = name
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server.cli",
                "ingest",
                "--workers",
                "2",
                "--broker",
                broker.url,
                "--db",
                db_url,
                "--name",
                name,
                # a group of its own: the persistent sessions of an earlier test's workers
                # stay members of theirs and keep getting their share while away
                "--share-group",
                name,
                "--batch-size",
                "50",
                "--json",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if line.startswith("ready:"):
                self.ready.set()

    def worker_pids(self) -> list[int]:
        line = next(line for line in self.lines if line.startswith("ready:"))
        return [int(p) for p in line.split("(processes ")[1].rstrip(")\n").split(", ")]

    def stop(self) -> dict[str, Any]:
        self.process.send_signal(signal.SIGTERM)
        out, _ = self.process.communicate(timeout=60)
        self._thread.join(5)
        assert self.process.returncode == 0, "".join(self.lines)[-3000:]
        summary: dict[str, Any] = json.loads(out)
        return summary


@pytest.fixture
def workers(engine: Engine, db_url: str, tmp_path: Path, mqtt_broker: Any) -> Iterator[Workers]:
    if mqtt_broker.kind != "mosquitto":
        pytest.skip("shared subscriptions are checked against Mosquitto")
    with Session(engine) as session:
        for device_id in DEVICES:
            add_device(session, device_id, DeviceStatus.ACCEPTED)
        session.commit()
    running = Workers(mqtt_broker, db_url, tmp_path, name=f"t{time.time_ns() % 10**12}")
    try:
        assert running.ready.wait(60), "".join(running.lines)[-3000:]
        yield running
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait(10)
        for i in (0, 1):  # end the workers' persistent sessions: nothing queues for them later
            client_id = worker_client_id(f"edgefleet-ingest@{running.name}", i)
            cleaner = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
            cleaner.connect(mqtt_broker.host, mqtt_broker.port)
            cleaner.disconnect()


def publisher(broker: Any) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{time.time_ns()}")
    client.max_inflight_messages_set(100)
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


def publish_all(client: mqtt.Client, reports: list[TelemetryReport]) -> None:
    infos = [
        client.publish(device_topic(r.device_id, Channel.TELEMETRY), r.to_bytes(), qos=1)
        for r in reports
    ]
    for info in infos:
        info.wait_for_publish(30)
        assert info.is_published()


def stored(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.execute(select(func.count()).select_from(TelemetryRecord)).scalar_one())


def wait_stored(engine: Engine, expected: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while stored(engine) < expected:
        assert time.monotonic() < deadline, f"{stored(engine)} of {expected} stored"
        time.sleep(0.1)


def rolled_up_inferences(engine: Engine) -> int:
    table = fleet_table()
    with Session(engine) as session:
        return int(
            session.execute(
                select(func.coalesce(func.sum(table.c.inferences), 0)).where(
                    table.c.period == "hour"
                )
            ).scalar_one()
        )


def test_two_workers_split_the_stream_and_store_every_report_once(
    engine: Engine, workers: Workers, mqtt_broker: Any
) -> None:
    reports = [report(d, seq) for seq in range(25) for d in DEVICES]  # 500
    replays = reports[::10]  # 50 sent twice, as an outbox replays after a lost PUBACK
    client = publisher(mqtt_broker)
    try:
        publish_all(client, reports + replays)
    finally:
        client.loop_stop()
        client.disconnect()
    wait_stored(engine, len(reports))
    time.sleep(0.5)  # the replays arrive after their originals; let the last batch commit
    summary = workers.stop()
    per_worker = {w["index"]: w for w in summary["workers"]}
    assert {w["client_id"] for w in per_worker.values()} == {
        worker_client_id(f"edgefleet-ingest@{workers.name}", i) for i in (0, 1)
    }
    assert all("@" in w["client_id"] for w in per_worker.values())
    # the broker split the stream: each worker took a real share of it
    received = [per_worker[i]["received"] for i in (0, 1)]
    assert sum(received) == len(reports) + len(replays)
    assert min(received) >= 0.2 * sum(received), received
    assert summary["total"]["stored"] == len(reports)
    assert summary["total"]["duplicates"] == len(replays)
    assert summary["total"]["dropped"] == 0
    assert stored(engine) == len(reports)
    assert rolled_up_inferences(engine) == len(reports) * INFERENCES  # counted once, too
    table = fleet_table()  # each worker added to fleet rows of its own shard (its index)
    with Session(engine) as session:
        shards = set(session.execute(select(table.c.shard).distinct()).scalars())
    assert shards == {0, 1}


# SQLite's two-worker path is covered by the split-stream test; the kill costs a minute.
@pytest.mark.parametrize("db_url", [PRODUCTION_DATABASE], indirect=True)
def test_a_worker_killed_mid_stream_comes_back_and_nothing_is_lost_or_doubled(
    engine: Engine, workers: Workers, mqtt_broker: Any
) -> None:
    victim = workers.worker_pids()[0]
    reports = [report(d, seq) for seq in range(60) for d in DEVICES]  # 1,200
    client = publisher(mqtt_broker)
    try:
        publish_all(client, reports[:400])
        os.kill(victim, signal.SIGKILL)  # no goodbye: its unacknowledged reports stay queued
        publish_all(client, reports[400:])
    finally:
        client.loop_stop()
        client.disconnect()
    wait_stored(engine, len(reports), timeout=90)
    summary = workers.stop()
    restarts = {w["index"]: w["restarts"] for w in summary["workers"]}
    assert restarts == {0: 1, 1: 0}
    assert stored(engine) == len(reports)
    assert rolled_up_inferences(engine) == len(reports) * INFERENCES


def test_the_server_runs_its_ingestion_as_worker_processes_when_asked(
    engine: Engine, db_url: str, tmp_path: Path, mqtt_broker: Any
) -> None:
    if mqtt_broker.kind != "mosquitto":
        pytest.skip("shared subscriptions are checked against Mosquitto")

    from server.app import create_app
    from server.ingest.workers import IngestWorkers
    from server.settings import Settings

    with Session(engine) as session:
        add_device(session, DEVICES[0], DeviceStatus.ACCEPTED)
        session.commit()
    name = f"s{time.time_ns() % 10**12}"
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        broker_url=mqtt_broker.url,
        run_jobs=False,
        rollout_engine=False,
        block_server=False,
        inventory_consumer=False,
        ingest_workers=2,
        ingest_client_id=f"edgefleet-ingest@{name}",
        ingest_share_group=name,
    )
    with operator_client(create_app(settings)) as client:
        workers = client.app.state.ingest_workers  # type: ignore[attr-defined]
        assert isinstance(workers, IngestWorkers)
        assert client.app.state.telemetry_ingestor is None  # type: ignore[attr-defined]
        deadline = time.monotonic() + 60
        while not workers.subscribed():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert {s.client_id for s in workers.specs} == {
            f"edgefleet-ingest-0@{name}",
            f"edgefleet-ingest-1@{name}",
        }
        client_ = publisher(mqtt_broker)
        try:
            publish_all(client_, [report(DEVICES[0], seq) for seq in range(10)])
        finally:
            client_.loop_stop()
            client_.disconnect()
        wait_stored(engine, 10)
        pids = [p for p in workers.pids().values() if p is not None]
    for pid in pids:  # the lifespan stopped and reaped them
        assert not Path(f"/proc/{pid}").exists()
    for i in (0, 1):
        cleaner = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edgefleet-ingest-{i}@{name}")
        cleaner.connect(mqtt_broker.host, mqtt_broker.port)
        cleaner.disconnect()


def test_workers_do_not_outlive_a_supervisor_killed_with_sigkill(workers: Workers) -> None:
    pids = workers.worker_pids()
    workers.process.kill()  # no chance to stop them
    workers.process.wait(10)

    def running(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        return state != "Z"

    deadline = time.monotonic() + 15
    while any(running(pid) for pid in pids):
        assert time.monotonic() < deadline, "a worker outlived its supervisor"
        time.sleep(0.1)
