"""The server killed with SIGKILL in the middle of a rollout, then started again.

A real ``edgefleet server`` process (rollout engine, desired-state publisher, block
server, ingestion, inventory) on a file database -- PostgreSQL when
``EDGEFLEET_TEST_DATABASE_URL`` is set, else SQLite -- and a real Mosquitto; eight
simulated devices (:mod:`server.simulator`, enrolled through the API, verifying every
signed desired state with the agent's own rules and every bundle by hash and signature).
Version 1 runs everywhere; the rollout of version 2 goes in three waves with a wait
between them, and the server is killed once some devices have it and others do not. At the
kill every device runs version 1 or 2, verified; after the restart the rollout resumes
from the database and completes; every device's manifests only ever went up, and no
device was sent a manifest it had to refuse.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from sqlmodel import Session, col, select

from server.artifacts import ArtifactStore
from server.db import create_db_engine
from server.keys import load_fleet_keys
from server.profiles import get_profile
from server.rollouts.models import IssuedManifestRecord
from server.simulator import FleetSimulator, SimulatedDevice
from shared.signing import VerifyKey
from tests.conftest import BrokerEndpoint, free_port
from tests.server.rollouts.harness import (
    ACTIVATION_ONLY,
    MODEL,
    PROFILE,
    deployed,
    publish_versions,
    trained_digits,
    wait_for,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DEVICES = [f"srv-kill-{i}" for i in range(8)]
GROUP = "yard"


class ServerProcess:
    """``python -m server.cli server`` on a data folder and database that outlive it."""

    def __init__(self, data_dir: Path, db_url: str, broker: BrokerEndpoint) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_file = data_dir.parent / "server.log"
        self.env = {
            **os.environ,
            "EDGEFLEET_DATA_DIR": str(data_dir),
            "EDGEFLEET_DATABASE_URL": db_url,
            "EDGEFLEET_RUN_JOBS": "false",
            "EDGEFLEET_ROLLOUT_TICK_SECONDS": "0.2",
            "EDGEFLEET_INGEST_CLIENT_ID": f"ingest-{data_dir.parent.name[-40:]}",
            "TF_CPP_MIN_LOG_LEVEL": "3",
        }
        self.broker = broker
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "server.cli",
                    "server",
                    "--broker",
                    self.broker.url,
                    "--port",
                    str(self.port),
                    "--host",
                    "127.0.0.1",
                ],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._healthy, 90, f"edgefleet server on port {self.port}\n{self.log_tail()}")

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"the server exited ({self.process.returncode}):\n{self.log_tail()}"
            )
        try:
            return httpx.get(f"{self.url}/api/v1/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(10) == -signal.SIGKILL

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        token = (self.data_dir / "admin-token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        response = httpx.request(
            method, f"{self.url}/api/v1{path}", headers=headers, timeout=30, **kwargs
        )
        assert response.is_success, f"{method} {path}: {response.status_code} {response.text}"
        return response.json() if response.content else None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


@pytest.fixture
def server(
    tmp_path: Path, fault_db_url: str, mqtt_broker: BrokerEndpoint
) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path / "server", fault_db_url, mqtt_broker)
    try:
        yield process
    finally:
        process.stop()


def registry(data_dir: Path, db_url: str) -> Any:
    """What :func:`publish_versions` needs of an app, on the server process's files."""
    return SimpleNamespace(
        state=SimpleNamespace(
            engine=create_db_engine(db_url),
            artifacts=ArtifactStore(data_dir / "artifacts"),
            keys=load_fleet_keys(data_dir / "keys", now=datetime.now(UTC)),
        )
    )


def test_server_killed_mid_rollout_resumes_and_no_device_is_left_half_updated(
    tmp_path: Path, server: ServerProcess, fault_db_url: str, mqtt_broker: BrokerEndpoint
) -> None:
    trained_digits()
    server.start()
    app = registry(server.data_dir, fault_db_url)
    first, second = publish_versions(app, 2)

    profile = get_profile(PROFILE)
    server.call("POST", "/groups", json={"name": GROUP})
    token = server.call(
        "POST",
        "/provisioning-tokens",
        json={"group": GROUP, "profile": PROFILE, "max_uses": len(DEVICES), "auto_accept": True},
    )["token"]
    root = None
    for device_id in DEVICES:
        answer = server.call(
            "POST",
            "/enroll",
            json={
                "token": token,
                "device_id": device_id,
                "profile": PROFILE,
                "arch": profile.arch,
                "runtime": {"name": profile.runtime.name, "version": profile.runtime.version},
                "runtimes": {profile.runtime.name: profile.runtime.version},
                "agent_version": "sim-1",
            },
        )
        root = VerifyKey.from_base64(answer["root_public_key"])
    assert root is not None
    devices = {
        d: SimulatedDevice(
            d,
            profile=PROFILE,
            runtime=(profile.runtime.name, profile.runtime.version),
            root_keys=[root],
            block_size=16 * 1024,
            blocks_per_request=8,
            wall_clock=lambda: datetime.now(UTC),
        )
        for d in DEVICES
    }
    simulator = FleetSimulator(
        list(devices.values()), host=mqtt_broker.host, port=mqtt_broker.port, report_interval=1.0
    )

    def running() -> dict[str, int | None]:
        return {
            d: (None if (a := device.active.get(MODEL)) is None else a.deployment.model_version)
            for d, device in devices.items()
        }

    def rollout(version: int, **spec: Any) -> str:
        body = {
            "model": MODEL,
            "version": version,
            "group": GROUP,
            "device_timeout": 600,
            "gates": ACTIVATION_ONLY,
            **spec,
        }
        return str(server.call("POST", "/rollouts", json=body)["id"])

    def wait_status(rollout_id: str, status: str, timeout: float) -> dict[str, Any]:
        found: dict[str, Any] = wait_for(
            lambda: (r := server.call("GET", f"/rollouts/{rollout_id}"))["status"] == status and r,
            timeout,
            f"rollout {rollout_id} {status}",
        )
        return found

    simulator.start()
    try:
        wait_for(
            lambda: all(server.call("GET", f"/devices/{d}")["state_reported_at"] for d in DEVICES),
            30,
            "every device's state in the inventory",
        )
        wait_status(rollout(first, phases="100", wait_between_phases=0), "completed", 60)
        assert running() == dict.fromkeys(DEVICES, first)

        # Three waves with a wait between them: the kill lands in the rollout's middle.
        rollout_id = rollout(second, phases="2dev,4dev,100", wait_between_phases=4)
        wait_for(
            lambda: 3 <= sum(v == second for v in running().values()) < len(DEVICES),
            60,
            "some devices on version 2, others not yet",
        )
        server.kill()
        at_kill = running()
        # Nothing half-way: each device runs a verified version 1 or 2.
        assert set(at_kill.values()) == {first, second}, at_kill
        shown_before = sum(v == second for v in at_kill.values())

        server.start()
        done = wait_status(rollout_id, "completed", 120)
        assert {d["device_id"]: d["state"] for d in done["devices"]} == dict.fromkeys(
            DEVICES, "activated"
        )
        assert running() == dict.fromkeys(DEVICES, second)
        stats = simulator.stats()
        assert stats.rejections == 0, "a device was sent a manifest it had to refuse"
    finally:
        simulator.stop()

    # Every device's manifests, as issued: versions only go up, the model version never goes
    # back, and the last one names version 2.
    with Session(app.state.engine) as session:
        records = list(
            session.exec(
                select(IssuedManifestRecord).order_by(
                    col(IssuedManifestRecord.device_id), col(IssuedManifestRecord.manifest_version)
                )
            )
        )
    app.state.engine.dispose()
    by_device: dict[str, list[IssuedManifestRecord]] = {}
    for record in records:
        by_device.setdefault(record.device_id, []).append(record)
    assert set(by_device) == set(DEVICES)
    for device_id, issued in by_device.items():
        numbers = [r.manifest_version for r in issued]
        assert numbers == sorted(set(numbers)), (device_id, numbers)
        models = [deployed(r)[MODEL] for r in issued]
        assert models == sorted(models), (device_id, models)
        assert models[-1] == second, (device_id, models)
    print(
        f"\nkilled with {shown_before} of {len(DEVICES)} devices on v{second}; after the restart "
        f"all {len(DEVICES)} on v{second}; manifests per device: "
        f"{sorted({len(v) for v in by_device.values()})}"
    )
