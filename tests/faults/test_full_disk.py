"""A full disk on the device during a download: a clean failure that names the disk, the old
model stays, and the update completes once there is room again.

The agent's data folder is a real, small filesystem -- a tmpfs mounted for the test (we
run as root) -- and the test fills it with a file of its own until less room is left
than the new bundle needs; the download then meets ENOSPC for real. The agent (in
process, on a real Mosquitto, enrolled with the real server) reports the failure with
its reason, keeps serving the old model, verified; when the test deletes its file the
agent's own retry resumes the download and the rollout completes.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.agent import Agent
from agent.config import AgentConfig
from agent.runtime import available_runtimes
from tests.agent.test_kill import Device
from tests.conftest import BrokerEndpoint
from tests.faults.netproxy import FlakyProxy
from tests.faults.servers import authorize
from tests.server.rollouts.harness import (
    ACTIVATION_ONLY,
    MODEL,
    PROFILE,
    Clock,
    RolloutServer,
    publish_versions,
    trained_digits,
    wait_for,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

AGENT = "full-disk"
DISK_BYTES = 4 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of DISK_BYTES mounted at a fresh folder (unmounted afterwards)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES},mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for a real full disk: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def server(
    tmp_path: Path, fault_db_url: str, mqtt_broker: BrokerEndpoint
) -> Iterator[RolloutServer]:
    trained_digits()  # built before the server's clocks start
    with RolloutServer(
        db_url=fault_db_url, data_dir=tmp_path / "server", broker=mqtt_broker, clock=Clock()
    ) as running:
        yield authorize(running)


@pytest.fixture
def proxy(mqtt_broker: BrokerEndpoint) -> Iterator[FlakyProxy]:
    """The device's link to the broker, slowed on demand."""
    with FlakyProxy(mqtt_broker.host, mqtt_broker.port) as running:
        yield running


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def fill(disk: Path, leave: int) -> Path:
    """A file of the test's own that leaves about ``leave`` bytes free on ``disk``."""
    filler = disk / f"filler-{len(list(disk.glob('filler-*')))}"
    with filler.open("wb") as f, contextlib.suppress(OSError):  # full to the last byte
        f.write(b"\0" * max(0, free_bytes(disk) - leave))
        f.flush()
        os.fsync(f.fileno())
    return filler


def failed_install(caplog: pytest.LogCaptureFixture, text: str) -> str:
    """The agent's log line of a failed install that says ``text`` (each retry replaces the
    last update the agent reports, so its log is where every failure stays)."""

    def find() -> str | None:
        for record in list(caplog.records):
            message = record.getMessage()
            if record.name == "agent.agent" and "not installed" in message and text in message:
                return message
        return None

    found: str = wait_for(find, 60, f"the agent logging a failed install: {text}")
    return found


def test_a_full_disk_fails_the_download_cleanly_and_the_update_completes_after(
    small_disk: Path,
    server: RolloutServer,
    proxy: FlakyProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = publish_versions(server.app, 2)
    server.enroll(AGENT, runtime=("litert", available_runtimes()["litert"]))
    server.group("cellar", members=[AGENT])
    config = AgentConfig.model_validate(
        {
            "device_id": AGENT,
            "profile": PROFILE,
            "data_dir": str(small_disk / "device"),
            "window_seconds": 3600,  # no telemetry: the outbox carries events only
            "trust": {"root_keys": [server.app.state.keys.root_public.to_base64()]},
            "http": {"enabled": False},
            "broker": {"url": proxy.url},
            "download": {"block_size": 4096, "blocks_per_request": 2},
            "limits": {
                "health_check_max_seconds": 0.5,
                "backoff_min_seconds": 0.05,
                "backoff_max_seconds": 0.5,
            },
        }
    )
    agent = Agent(config)
    device = Device(small_disk / "device", server.app.state.keys.online[0])

    def roll_out(version: int) -> str:
        return str(
            server.create_rollout(
                version=version,
                group="cellar",
                phases="100",
                wait_between_phases=0,
                device_timeout=600,
                gates=ACTIVATION_ONLY,
                retry={"max_attempts": 5, "backoff_initial": 1, "backoff_max": 1},
            )["id"]
        )

    def failure(rollout_id: str, text: str) -> dict[str, Any]:
        """The device's last update as the server has it, once it is a failure saying ``text``."""

        def check() -> dict[str, Any] | None:
            last: dict[str, Any] | None = server.call("GET", f"/devices/{AGENT}")["last_update"]
            if last is None or last["rollout_id"] != rollout_id or last["outcome"] != "failed":
                return None
            return last if text in (last["detail"] or "").lower() else None

        found: dict[str, Any] = wait_for(check, 60, f"the server learning: {text}")
        # Refused before the download (download_failed), or even before, when the disk
        # cannot take the new trust state (store_failed): a clean failure either way.
        assert found["reason"] in ("download_failed", "store_failed"), found
        return found

    def held() -> int:
        for sidecar in device.store.tmp_dir.glob("*.part.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                return int(json.loads(sidecar.read_text())["verified_bytes"])
        return 0

    def assert_old_model_serves() -> None:
        assert device.verified_current()[1] == first
        model = agent.active_model()
        assert model is not None and model.manifest.model_version == first
        assert len(agent.predict(np.full((1, 64), 8.0)).outputs) == 1

    agent.start()
    try:
        wait_for(
            lambda: server.call("GET", f"/devices/{AGENT}")["state_reported_at"],
            30,
            "the agent's state in the inventory",
        )
        server.wait_rollout(
            roll_out(first), lambda r: r["status"] == "completed", 60, "version 1 everywhere"
        )
        wait_for(lambda: agent.status()["probation"] is None, 30, "v1 judged healthy")
        (bundle_length,) = {r.length for r in [device.store.current(MODEL)] if r is not None}

        # No room at all: not even the new trust state can be saved, so nothing starts.
        filler = fill(small_disk, leave=0)
        rollout_id = roll_out(second)
        no_room = failure(rollout_id, "no space left on device")
        assert_old_model_serves()

        # Less room than the bundle needs: refused before a byte of it is written.
        os.truncate(filler, filler.stat().st_size - (bundle_length - 4096))
        assert 0 < free_bytes(small_disk) < bundle_length
        refused = failed_install(caplog, "still to fetch")
        assert "download_failed" in refused and "no space left on device (ENOSPC)" in refused
        assert device.tmp() == [], device.tmp()  # nothing of it written
        assert_old_model_serves()

        # Room at the start, none in the middle: a slow link, and the disk fills meanwhile.
        proxy.rate = 6000.0  # bytes/s towards the device
        filler.unlink()
        wait_for(lambda: held() >= 8192, 60, "part of version 2 on disk")
        fill(small_disk, leave=0)
        cut = failed_install(caplog, "the partial download was removed")
        assert "download_failed" in cut and "[Errno 28] No space left on device" in cut, cut
        failure(rollout_id, "no space left on device")  # what the server has names the disk
        assert device.tmp() == [], device.tmp()  # the partial is gone: room for the rest
        assert_old_model_serves()
        print(
            f"\nno room: {no_room['reason']}: {no_room['detail']}\nbefore: {refused}\nduring: {cut}"
        )

        proxy.rate = None
        for made in small_disk.glob("filler-*"):
            made.unlink()  # room again: the agent's own retry finishes the update
        done = server.wait_rollout(
            rollout_id, lambda r: r["status"] == "completed", 60, "version 2 after room was made"
        )
        assert [d["state"] for d in done["devices"]] == ["activated"], done["devices"]
        wait_for(lambda: agent.status()["probation"] is None, 30, "v2 judged healthy")
        model = agent.active_model()
        assert model is not None and model.manifest.model_version == second
        assert device.verified_current()[1] == second
        assert device.tmp() == []
    finally:
        with contextlib.suppress(Exception):
            agent.stop()
