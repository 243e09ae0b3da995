"""Scale-out: two API processes and two ingestion workers on one PostgreSQL and one Mosquitto.

The production topology of docs/deploy.md, in miniature and with real processes:

- API #1: ``edgefleet server`` with the rollout engine, the inventory consumer and the
  alert evaluator; API #2: ``edgefleet server`` as an API-only replica (engine, inventory
  and evaluator off). Both serve artifact blocks on one shared subscription and share
  the data folder (keys, artifacts) -- the shared-volume layout;
- ``edgefleet ingest --workers 2``: two worker processes on the shared telemetry
  subscription, the servers' own ingestors off;
- simulated devices enrolled through both APIs, reporting twice a second.

Checked: both APIs answer the same; a rollout created through API #1 is paused, resumed
and approved through API #2 and completes, the engine in API #1 acting on it; every
report the devices sent is stored once, and both workers took a share.

PostgreSQL only (SQLite has one writer and lives on one machine): skipped unless
``EDGEFLEET_TEST_DATABASE_URL`` names a PostgreSQL database.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MosquittoProcess

EXTERNAL_URL = os.environ.get("EDGEFLEET_TEST_DATABASE_URL", "")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.broker,
    pytest.mark.database,
    pytest.mark.skipif(
        not EXTERNAL_URL.startswith("postgresql"),
        reason="scale-out runs on PostgreSQL only: set EDGEFLEET_TEST_DATABASE_URL to a "
        "PostgreSQL URL (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test)",
    ),
]

PROFILE = "edge-x86_64-litert"
DEVICES = 12
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll across processes (no event crosses them): the condition's first truthy value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"{what} not met within {timeout:g} s (last: {last!r})")


class Process:
    """A child process whose output goes to a log file shown when a test fails."""

    def __init__(
        self, name: str, args: list[str], env: dict[str, str], log: Path, out: Path | None = None
    ) -> None:
        """Stderr (and stdout, unless ``out`` names a file of its own) go to ``log``."""
        self.name, self.log, self.out = name, log, out
        with log.open("wb") as err, (out or log).open("ab") as stdout:
            self.popen = subprocess.Popen(args, env=env, cwd=ROOT, stdout=stdout, stderr=err)

    def tail(self, lines: int = 30) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} ---\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self, signum: int = signal.SIGINT, timeout: float = 30) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return int(self.popen.returncode)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL schema of this test's own, dropped afterwards."""
    from sqlalchemy import text

    from server.db import create_db_engine

    schema = f"edgefleet_scaleout_{os.getpid()}"
    admin = create_db_engine(EXTERNAL_URL)
    with admin.begin() as connection:
        connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    separator = "&" if "?" in EXTERNAL_URL else "?"
    yield f"{EXTERNAL_URL}{separator}options=-csearch_path%3D{schema}"
    with admin.begin() as connection:
        connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
    admin.dispose()


@pytest.fixture
def started() -> Iterator[Callable[[Process], Process]]:
    """Processes to stop at the end (newest first); the tails of their logs are printed,
    which pytest shows when the test failed."""
    processes: list[Process] = []

    def keep(process: Process) -> Process:
        processes.append(process)
        return process

    yield keep
    for process in reversed(processes):
        process.stop()
        print(process.tail())


def publish_model(data_dir: Path, db_url: str) -> int:
    """A small digits classifier through the real pipeline, signed with the fleet's keys
    into the shared store and database; returns its version number."""
    from sqlmodel import Session

    from server.artifacts import ArtifactStore
    from server.db import create_db_engine, session_scope
    from server.keys import load_fleet_keys
    from server.pipeline.publish import publish_model_version
    from server.profiles import load_profiles
    from tests.server.conftest import add_dataset_row
    from tests.server.rollouts.harness import MODEL, trained_digits

    trained = trained_digits()
    engine = create_db_engine(db_url)
    try:
        with session_scope(engine) as session:
            dataset_version_id = add_dataset_row(session, name="scaleout-digits").id
        with Session(engine) as session:
            version = publish_model_version(
                session,
                store=ArtifactStore(data_dir / "artifacts"),
                keys=load_fleet_keys(data_dir / "keys", now=datetime.now(UTC)),
                profiles={PROFILE: load_profiles()[PROFILE]},
                model_name=MODEL,
                dataset=trained.data,
                dataset_version_id=dataset_version_id,  # type: ignore[arg-type]
                keras_model=trained.model,
                preprocessing=trained.steps,
                float_metrics={"accuracy": trained.accuracy},
                source="trained",
                run_id=None,
                build=lambda *_a, **_k: [b for b in trained.builds if b.profile == PROFILE],
            )
            return int(version.version)
    finally:
        engine.dispose()


def telemetry_stored(db_url: str) -> int:
    from sqlalchemy import func, select
    from sqlmodel import Session

    from server.db import create_db_engine
    from server.ingest.models import TelemetryRecord

    engine = create_db_engine(db_url)
    try:
        with Session(engine) as session:
            count = session.execute(select(func.count()).select_from(TelemetryRecord))
            return int(count.scalar_one())
    finally:
        engine.dispose()


def test_two_apis_and_two_ingest_workers_share_one_database(
    tmp_path: Path,
    pg_url: str,
    mosquitto_factory: Callable[[], MosquittoProcess],
    started: Callable[[Process], Process],
) -> None:
    from server.commands.client import ApiClient
    from server.profiles import get_profile
    from server.simulator import FleetSimulator, SimulatedDevice
    from server.simulator.enroll import enroll_devices
    from shared.signing import VerifyKey
    from tests.server.rollouts.harness import ACTIVATION_ONLY, MODEL

    broker = mosquitto_factory()
    data_dir = tmp_path / "shared-data"
    admin_token = secrets.token_urlsafe(32)
    base_env = {
        **os.environ,
        "EDGEFLEET_DATA_DIR": str(data_dir),
        "EDGEFLEET_DATABASE_URL": pg_url,
        "EDGEFLEET_BROKER_URL": broker.endpoint.url,
        "EDGEFLEET_ADMIN_TOKEN": admin_token,
        "EDGEFLEET_RUN_JOBS": "false",
        "EDGEFLEET_TELEMETRY_INGESTOR": "false",  # the ingest workers store telemetry
        "EDGEFLEET_BLOCK_SHARE_GROUP": "blocks",
        "EDGEFLEET_ROLLOUT_TICK_SECONDS": "0.3",
        "EDGEFLEET_LOG_LEVEL": "WARNING",
    }
    ports = [free_port(), free_port()]
    roles = [
        {},  # API #1: rollout engine, inventory, alert evaluator
        {
            "EDGEFLEET_ROLLOUT_ENGINE": "false",
            "EDGEFLEET_INVENTORY_CONSUMER": "false",
            "EDGEFLEET_ALERT_EVALUATOR": "false",
        },
    ]
    apis: list[ApiClient] = []
    for i, (port, role) in enumerate(zip(ports, roles, strict=True)):
        # One after the other: the first migrates the empty database, the second finds it
        # current (two migrations racing on one empty schema would collide).
        process = started(
            Process(
                f"api-{i + 1}",
                [sys.executable, "-m", "server.cli", "server", "--port", str(port)],
                {**base_env, **role},
                tmp_path / f"api-{i + 1}.log",
            )
        )
        client = ApiClient(f"http://127.0.0.1:{port}", token=admin_token)

        def healthy(client: ApiClient = client, process: Process = process) -> bool:
            assert process.popen.poll() is None, process.tail()
            try:
                client.get("/groups")
            except Exception:
                return False
            return True

        wait_for(healthy, 120, f"API #{i + 1} answering")
        apis.append(client)
    api1, api2 = apis
    ingest = started(
        Process(
            "ingest",
            [
                sys.executable,
                "-m",
                "server.cli",
                "ingest",
                "--workers",
                "2",
                "--name",
                "scaleout",
                "--json",
            ],
            base_env,
            tmp_path / "ingest.log",
            out=tmp_path / "ingest.json",
        )
    )
    wait_for(lambda: "ready:" in ingest.log.read_text(errors="replace"), 60, "workers subscribed")

    # -- the fleet, half enrolled through each API
    api1.post("/groups", json={"name": "line-a"})
    profile = get_profile(PROFILE)
    enrolled = []
    for api, ids in (
        (api1, [f"so-{i:03d}" for i in range(0, DEVICES, 2)]),
        (api2, [f"so-{i:03d}" for i in range(1, DEVICES, 2)]),
    ):
        token = api.post(
            "/provisioning-tokens",
            json={"group": "line-a", "profile": PROFILE, "max_uses": len(ids), "auto_accept": True},
        )["token"]
        enrolled += enroll_devices(api, token=token, device_ids=ids, profile=profile)
    root = VerifyKey.from_base64(enrolled[0].root_public_key)
    credentials = {e.device_id: (e.username, e.password) for e in enrolled}
    fleet = [
        SimulatedDevice(
            e.device_id,
            profile=PROFILE,
            runtime=(profile.runtime.name, profile.runtime.version),
            root_keys=[root],
            wall_clock=lambda: datetime.now(UTC),
        )
        for e in enrolled
    ]
    simulator = FleetSimulator(
        fleet,
        host=broker.endpoint.host,
        port=broker.endpoint.port,
        credentials=credentials.get,
        report_interval=0.5,
    )
    simulator.start()
    try:
        wait_for(lambda: simulator.stats().connected == DEVICES, 60, "devices connected")

        # -- both APIs see the same fleet (the inventory runs in API #1 only)
        def device_view(api: ApiClient) -> list[tuple[str, str, bool]]:
            return sorted((d["id"], d["status"], d["online"]) for d in api.get("/devices"))

        wait_for(lambda: all(online for *_, online in device_view(api2)), 60, "every device online")
        assert device_view(api1) == device_view(api2)
        assert len(device_view(api1)) == DEVICES

        # -- a rollout made through API #1, steered through API #2
        version = publish_model(data_dir, pg_url)
        rollout = api1.post(
            "/rollouts",
            json={
                "model": MODEL,
                "version": version,
                "group": "line-a",
                "phases": "50,100",
                "approval": True,
                "wait_between_phases": 0,
                "max_devices_per_minute": 10_000,
                "gates": ACTIVATION_ONLY,
            },
        )
        path = f"/rollouts/{rollout['id']}"
        wait_for(lambda: api2.get(path)["status"] == "waiting_approval", 120, "first phase settled")
        assert simulator.stats().installs == DEVICES // 2
        paused = api2.post(f"{path}/pause", json={"reason": "checked from API #2"})
        assert paused["status"] == "paused"
        assert api1.get(path)["status"] == "paused"
        api2.post(f"{path}/resume", json={})
        wait_for(lambda: api1.get(path)["status"] == "waiting_approval", 30, "back to waiting")
        api2.post(f"{path}/approve", json={})
        wait_for(lambda: api1.get(path)["status"] == "completed", 120, "rollout completed")
        assert simulator.stats().installs == DEVICES
        one, two = api1.get(path), api2.get(path)
        assert (one["status"], one["revision"], one["counts"]) == (
            two["status"],
            two["revision"],
            two["counts"],
        )
        assert one["counts"].get("activated") == DEVICES, one["counts"]
    finally:
        simulator.stop()

    # -- every report stored exactly once, split between the two workers
    sent = simulator.stats().telemetry_sent
    assert sent > DEVICES
    wait_for(lambda: telemetry_stored(pg_url) >= sent, 60, f"{sent} reports stored")
    assert telemetry_stored(pg_url) == sent
    assert ingest.stop(signal.SIGINT) == 0, ingest.tail()
    assert ingest.out is not None
    summary = json.loads(ingest.out.read_text())
    workers = summary["workers"]
    assert len(workers) == 2
    assert all(w["received"] > 0 for w in workers), workers
    assert sum(w["stored"] for w in workers) == sent, summary
    assert summary["total"]["dropped"] == 0, summary
