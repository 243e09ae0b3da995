"""The fleet simulator's account of what it sent is exact, and it never bursts.

Over a real broker: every report a device made is acknowledged before :meth:`stop`
returns and reaches a subscriber once, with the device's seqs 0..n-1; a fleet whose
clock jumps past several report windows skips them (and counts them) instead of sending
them all at once. The clock is the only fake.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from server.keys import init_keys
from server.simulator.device import SimulatedDevice
from server.simulator.fleet import FleetSimulator
from shared.messages import TelemetryReport
from shared.topics import Channel, fleet_filter

pytestmark = pytest.mark.broker


def fleet(tmp_path: Path, prefix: str, count: int) -> list[SimulatedDevice]:
    keys = init_keys(tmp_path / "keys", now=datetime.now(UTC), lifetime=timedelta(days=1))
    return [
        SimulatedDevice(
            f"{prefix}-{i}",
            profile="edge-x86_64-litert",
            runtime=("litert", "2.3.0"),
            root_keys=[keys.root_public],
            wall_clock=lambda: datetime.now(UTC),
        )
        for i in range(count)
    ]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # a broker and a thread give no event to wait on: poll
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_every_report_made_is_acknowledged_and_arrives_once(
    tmp_path: Path, mqtt_broker: object, mqtt_client: Callable[..., object]
) -> None:
    devices = fleet(tmp_path, "pace", 12)
    watcher = mqtt_client("pace-watcher")
    watcher.subscribe(fleet_filter(Channel.TELEMETRY))  # type: ignore[attr-defined]
    simulator = FleetSimulator(
        devices,
        host=mqtt_broker.host,  # type: ignore[attr-defined]
        port=mqtt_broker.port,  # type: ignore[attr-defined]
        report_interval=0.1,
        inferences_per_report=10,
    )
    simulator.start()
    try:
        wait_for(lambda: simulator.stats().telemetry_sent >= 10 * len(devices), "reports")
    finally:
        simulator.stop()
    stats = simulator.stats()
    made = {d.device_id: d.reports_made for d in devices}

    assert stats.telemetry_sent == sum(made.values())
    assert stats.telemetry_acked == stats.telemetry_sent  # stop() waited for every PUBACK
    assert stats.disconnects == 0  # the disconnects stop() asked for are not losses
    assert stats.cpu_seconds > 0
    received: list[tuple[str, int]] = []
    while len(received) < stats.telemetry_sent:
        batch = watcher.drain(wait=5.0)  # type: ignore[attr-defined]
        if not batch:
            break
        for message in batch:
            if message.topic.startswith("ef/v1/dev/pace-"):
                report = TelemetryReport.from_bytes(message.payload)
                received.append((report.device_id, report.seq))
    assert len(received) == len(set(received)) == stats.telemetry_sent
    assert set(received) == {(d, seq) for d, n in made.items() for seq in range(n)}


def test_a_fleet_behind_its_schedule_skips_windows_and_never_bursts(
    tmp_path: Path, mqtt_broker: object
) -> None:
    jump = [0.0]
    devices = fleet(tmp_path, "late", 6)
    interval = 0.5
    simulator = FleetSimulator(
        devices,
        host=mqtt_broker.host,  # type: ignore[attr-defined]
        port=mqtt_broker.port,  # type: ignore[attr-defined]
        report_interval=interval,
        inferences_per_report=5,
        clock=lambda: time.monotonic() + jump[0],
    )
    simulator.start()
    try:
        wait_for(lambda: all(d.reports_made >= 2 for d in devices), "two reports each")
        before = simulator.stats()
        jump[0] += 10 * interval  # the loop stalled for ten windows, say
        wait_for(
            lambda: simulator.stats().telemetry_skipped >= before.telemetry_skipped + 9 * 6,
            "the missed windows counted",
        )
        after = simulator.stats()
    finally:
        simulator.stop()
    # each device sent at most one report for the ten windows it missed, then kept pace
    assert after.telemetry_sent - before.telemetry_sent <= 2 * len(devices)
    assert after.telemetry_skipped - before.telemetry_skipped >= 9 * len(devices)
