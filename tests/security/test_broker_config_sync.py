"""Broker credentials kept in step across API processes: a change made through any API
process reaches the Mosquitto configuration folder kept by another.

With real processes: a Mosquitto on the configuration ``edgefleet broker-config`` writes,
API process A (``edgefleet server``) with the configuration folder and Mosquitto's pid
file, API process B on the same database without them. A device enrolled and accepted
through B logs in to Mosquitto -- confined to its own topics -- once A's follower has
seen the change; revoked through B, it is dropped and refused. On SQLite (one file) and
on PostgreSQL (when ``EDGEFLEET_TEST_DATABASE_URL`` names one).

In process: a poll costs one query while nothing changed and renders only when the
revision moved.
"""

from __future__ import annotations

import getpass
import os
import secrets
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.brokerconf.follow import CredentialsFollower
from server.brokerconf.render import DEVICE_ACL, DEVICE_PASSWORDS, Listener, MosquittoLayout
from server.brokerconf.revision import credentials_revision
from server.brokerconf.writer import BrokerConfigWriter, write_broker_config
from server.commands.client import ApiClient
from server.db import create_db_engine, migrate
from server.fleet.enrollment import DeviceFacts, change_status, create_token, enroll
from server.fleet.models import Device
from shared.topics import Channel, device_topic, fleet_filter
from tests.conftest import MosquittoProcess, free_port, mosquitto_binary
from tests.scaleout.test_scaleout import Process, wait_for
from tests.security.conftest import PROFILE, SERVICE_PASSWORD, SERVICE_USER, Probe
from tests.server.conftest import database_url, private_schema

pytestmark = [pytest.mark.broker, pytest.mark.database]

EXTERNAL_URL = os.environ.get("EDGEFLEET_TEST_DATABASE_URL", "")
POLL_SECONDS = 0.5
PATIENCE = 60.0  # generous: a slow machine waits longer, a broken follower never gets there


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a PostgreSQL schema of this test's own."""
    if request.param == "sqlite":
        yield database_url("sqlite", tmp_path, None)
        return
    if not EXTERNAL_URL.startswith("postgresql"):
        pytest.skip("set EDGEFLEET_TEST_DATABASE_URL to a PostgreSQL URL")
    with private_schema("edgefleet_brokersync") as schema:
        yield database_url("external", tmp_path, schema)


@pytest.fixture
def migrated(db_url: str) -> Iterator[Engine]:
    engine = create_db_engine(db_url)
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def started() -> Iterator[Callable[[Process], Process]]:
    """Processes to stop at the end (newest first); their log tails are printed."""
    processes: list[Process] = []

    def keep(process: Process) -> Process:
        processes.append(process)
        return process

    yield keep
    for process in reversed(processes):
        process.stop()
        print(process.tail())


def logs_in(port: int, device_id: str, password: str) -> bool:
    probe = Probe(port, client_id=device_id, username=device_id, password=password)
    try:
        return probe.connected
    finally:
        probe.close()


def start_api(
    started: Callable[[Process], Process], name: str, env: dict[str, str], log: Path
) -> ApiClient:
    port = free_port()
    process = started(
        Process(name, [sys.executable, "-m", "server.cli", "server", "--port", str(port)], env, log)
    )
    client = ApiClient(f"http://127.0.0.1:{port}", token=env["EDGEFLEET_ADMIN_TOKEN"])

    def healthy() -> bool:
        assert process.popen.poll() is None, process.tail()
        try:
            client.get("/devices")
        except Exception:
            return False
        return True

    wait_for(healthy, 120, f"{name} answering")
    return client


def test_a_device_enrolled_and_revoked_through_another_api_process_reaches_mosquitto(
    tmp_path: Path,
    db_url: str,
    migrated: Engine,
    started: Callable[[Process], Process],
) -> None:
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("needs a mosquitto binary")
    out = tmp_path / "mosquitto"
    device_port, service_port = free_port(), free_port()
    layout = MosquittoLayout(
        directory=out,
        device_listeners=(Listener(device_port, "127.0.0.1"),),
        service_listener=Listener(service_port, "127.0.0.1"),
        pid_file=out / "mosquitto.pid",
        user=getpass.getuser(),
    )
    write_broker_config(
        migrated, layout, service_username=SERVICE_USER, service_password=SERVICE_PASSWORD
    )
    mosquitto = MosquittoProcess(binary, tmp_path / "mosquitto-run", device_port)
    mosquitto.conf_file = out / "mosquitto.conf"
    mosquitto.port = service_port  # the last listener opened: start() waits for it
    mosquitto.start()
    try:
        base_env = {
            **os.environ,
            "EDGEFLEET_DATA_DIR": str(tmp_path / "shared-data"),
            "EDGEFLEET_DATABASE_URL": db_url,
            "EDGEFLEET_BROKER_URL": f"mqtt://127.0.0.1:{service_port}",
            "EDGEFLEET_BROKER_USERNAME": SERVICE_USER,
            "EDGEFLEET_BROKER_PASSWORD": SERVICE_PASSWORD,
            "EDGEFLEET_ADMIN_TOKEN": secrets.token_urlsafe(32),
            "EDGEFLEET_RUN_JOBS": "false",
            "EDGEFLEET_ROLLOUT_ENGINE": "false",
            "EDGEFLEET_INVENTORY_CONSUMER": "false",
            "EDGEFLEET_ALERT_EVALUATOR": "false",
            "EDGEFLEET_TELEMETRY_INGESTOR": "false",
            "EDGEFLEET_LOG_LEVEL": "INFO",
        }
        for leaked in ("EDGEFLEET_BROKER_CONFIG_DIR", "EDGEFLEET_BROKER_PID_FILE"):
            base_env.pop(leaked, None)
        start_api(
            started,
            "api-a",
            {
                **base_env,
                "EDGEFLEET_BROKER_CONFIG_DIR": str(out),
                "EDGEFLEET_BROKER_PID_FILE": str(out / "mosquitto.pid"),
                "EDGEFLEET_BROKER_CONFIG_POLL_SECONDS": str(POLL_SECONDS),
            },
            tmp_path / "api-a.log",
        )
        api_b = start_api(started, "api-b", base_env, tmp_path / "api-b.log")

        # -- enrolled through B: pending, so no login yet; accepted through B: a login
        token = api_b.post("/provisioning-tokens", json={"profile": PROFILE})["token"]
        enrolled = api_b.post(
            "/enroll",
            json={
                "token": token,
                "device_id": "sync-1",
                "profile": PROFILE,
                "arch": "x86_64",
                "runtime": {"name": "litert", "version": "2.3.0"},
                "runtimes": {"litert": "2.3.0"},
                "agent_version": "0.1.0",
            },
        )
        password = enrolled["credentials"]["password"]
        assert enrolled["status"] == "pending"
        assert not logs_in(device_port, "sync-1", password)
        api_b.post("/devices/sync-1/accept", json={})
        wait_for(lambda: logs_in(device_port, "sync-1", password), PATIENCE, "sync-1 logs in")
        assert "user sync-1" in (out / DEVICE_ACL).read_text().splitlines()

        # -- confined to its own topics (absence asserted up to a sentinel on delivery)
        server = Probe(
            service_port, client_id="srv-sync", username=SERVICE_USER, password=SERVICE_PASSWORD
        )
        device = Probe(device_port, client_id="sync-1", username="sync-1", password=password)
        try:
            assert server.connected and device.connected, (server.outcome, device.outcome)
            assert server.subscribe(fleet_filter(Channel.TELEMETRY)) == [True]
            device.subscribe("#", device_topic("sync-1", Channel.DESIRED))
            device.publish(device_topic("someone-else", Channel.TELEMETRY), b"forged")
            device.publish(device_topic("sync-1", Channel.DESIRED), b"forged", retain=True)
            device.publish(device_topic("sync-1", Channel.TELEMETRY), b"telemetry-1")
            assert [m.payload for m in server.until(b"telemetry-1")] == [b"telemetry-1"]
            server.publish(device_topic("someone-else", Channel.DESIRED), b"not-yours")
            server.publish(device_topic("sync-1", Channel.DESIRED), b"desired-1")
            got = device.until(b"desired-1")
            assert {m.topic for m in got} == {device_topic("sync-1", Channel.DESIRED)}
            assert b"not-yours" not in [m.payload for m in got]

            # -- revoked through B: dropped, then refused
            api_b.post("/devices/sync-1/revoke", json={})
            assert device.disconnected.wait(PATIENCE), "Mosquitto kept the revoked device"
        finally:
            server.close()
            device.close()
        assert not logs_in(device_port, "sync-1", password)
        assert "sync-1:" not in (out / DEVICE_PASSWORDS).read_text()
    finally:
        mosquitto.stop()


# ----------------------------------------------------------------------------- in process

FACTS = {
    "profile": PROFILE,
    "arch": "x86_64",
    "runtime_name": "litert",
    "runtime_version": "2.3.0",
    "agent_version": "0.1.0",
}


def add_device(engine: Engine, device_id: str, *, auto_accept: bool) -> None:
    now = datetime.now(UTC)
    with Session(engine) as session:
        issued = create_token(
            session, now=now, expires_in=timedelta(hours=1), auto_accept=auto_accept
        )
        enroll(
            session, token=issued.token, facts=DeviceFacts(device_id=device_id, **FACTS), now=now
        )
        session.commit()


def set_status(engine: Engine, device_id: str, action: str) -> None:
    with Session(engine) as session:
        device = session.get(Device, device_id)
        assert device is not None
        change_status(session, device=device, action=action, now=datetime.now(UTC))  # type: ignore[arg-type]
        session.commit()


def test_a_poll_renders_only_when_the_credentials_revision_moved(
    tmp_path: Path, migrated: Engine
) -> None:
    out = tmp_path / "conf"
    writer = BrokerConfigWriter(
        migrated, out, service_username=SERVICE_USER, service_password=SERVICE_PASSWORD
    )
    follower = CredentialsFollower(writer, poll_seconds=60)
    statements: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        statements.append(statement)

    first = follower.check()  # nothing rendered yet: renders the empty fleet
    assert first is not None and first.devices == 0 and DEVICE_PASSWORDS in first.changed
    event.listen(migrated, "before_cursor_execute", count)
    try:
        for _ in range(3):
            assert follower.check() is None
        assert len(statements) == 3 and all("device_credentials" not in s for s in statements)
    finally:
        event.remove(migrated, "before_cursor_execute", count)

    with Session(migrated) as session:
        start = credentials_revision(session)
    add_device(migrated, "pend-1", auto_accept=False)  # no broker login: nothing moves
    add_device(migrated, "auto-1", auto_accept=True)
    set_status(migrated, "pend-1", "accept")
    with Session(migrated) as session:
        assert credentials_revision(session) == start + 2
    moved = follower.check()
    assert moved is not None and moved.devices == 2
    assert {
        line.partition(":")[0] for line in (out / DEVICE_PASSWORDS).read_text().splitlines()[1:]
    } == {
        "auto-1",
        "pend-1",
    }
    assert follower.check() is None

    set_status(migrated, "auto-1", "revoke")
    revoked = follower.check()
    assert revoked is not None and revoked.changed and revoked.devices == 1
    assert "user auto-1" not in (out / DEVICE_ACL).read_text().splitlines()
