"""A simulated device honours install windows as the agent does: outside its window it
fetches and verifies, reports ``staged`` and waits; :meth:`SimulatedDevice.tick` activates
it once its wall clock is inside; a newer desired state replaces what waits.

Pure: the test answers the device's block requests from the signed bundle itself (the
block protocol over a real broker is covered by ``test_simulator.py`` and the e2e test).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from server.keys import FleetKeys, init_keys
from server.simulator.device import Outgoing, SimulatedDevice
from shared.messages import (
    ArtifactRef,
    BlockHeader,
    BlockRequest,
    Deployment,
    DesiredMessage,
    DesiredState,
    DeviceState,
    Event,
    InstallWindow,
    encode_block,
)
from shared.signing import PayloadType, sign_envelope
from tests.server.simulator.test_simulator import TARGET, signed_bundle

DEVICE = "sim-night"
NIGHT = InstallWindow(start="02:00", end="04:00")
NOON = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def keys(tmp_path: Path) -> FleetKeys:
    return init_keys(tmp_path / "keys", now=NOON - timedelta(hours=1), lifetime=timedelta(days=2))


def desired(keys: FleetKeys, version: int, bundle: bytes, model_version: int) -> bytes:
    state = DesiredState(
        device_id=DEVICE,
        manifest_version=version,
        issued_at=NOON,
        expires_at=NOON + timedelta(days=1),
        rollout_id=f"r{version}",
        deployments=[
            Deployment(
                model_name="sensor",
                model_version=model_version,
                target=TARGET,
                artifact=ArtifactRef(sha256=hashlib.sha256(bundle).hexdigest(), length=len(bundle)),
                install_window=NIGHT,
            )
        ],
    )
    manifest = sign_envelope(state.to_bytes(), PayloadType.DESIRED_STATE, keys.signing_keys)
    return DesiredMessage(keyring=keys.keyring_envelope, manifest=manifest).to_bytes()


def serve(device: SimulatedDevice, out: list[Outgoing], bundle: bytes) -> list[Outgoing]:
    """Answer every block request in ``out`` (and those the answers lead to)."""
    published: list[Outgoing] = []
    queue = list(out)
    while queue:
        message = queue.pop(0)
        published.append(message)
        if not message.topic.endswith("/artifact/req"):
            continue
        request = BlockRequest.from_bytes(message.payload)
        for index in range(request.count):
            offset = request.offset + index * request.block_size
            if offset >= len(bundle):
                break
            data = bundle[offset : offset + request.block_size]
            header = BlockHeader(
                request_id=request.request_id,
                sha256=request.sha256,
                offset=offset,
                length=len(data),
                total_length=len(bundle),
                block_sha256=hashlib.sha256(data).hexdigest(),
            )
            queue.extend(device.on_block(encode_block(header, data), 0.0))
    return published


def kinds(published: list[Outgoing]) -> list[str]:
    return [
        Event.from_bytes(m.payload).kind.value for m in published if m.topic.endswith("/events")
    ]


def last_state(published: list[Outgoing]) -> DeviceState:
    states = [m for m in published if m.topic.endswith("/state")]
    return DeviceState.from_bytes(states[-1].payload)


def test_a_simulated_device_stages_outside_its_window_and_activates_inside(
    keys: FleetKeys,
) -> None:
    first, _ = signed_bundle(keys, 20_000)
    clock = Clock(NOON)
    device = SimulatedDevice(
        DEVICE,
        profile=TARGET,
        runtime=("litert", "2.3.0"),
        root_keys=[keys.root_public],
        block_size=8 * 1024,
        wall_clock=clock,
    )

    published = serve(device, device.on_desired(desired(keys, 1, first, 1), 0.0), first)
    assert kinds(published) == ["downloading", "downloaded", "verified", "staged"]
    state = last_state(published)
    assert state.models == [] and state.last_update is not None
    assert state.last_update.outcome == "staged"
    assert list(device.staged) == ["sensor"] and device.active == {}
    assert device.tick(1.0) == []  # noon: the window is closed

    clock.now = NOON.replace(hour=2, minute=1) + timedelta(days=1)
    published = device.tick(2.0)
    assert kinds(published) == ["activated", "health_check_passed"]
    assert [m.model_version for m in last_state(published).models] == [1]
    assert device.staged == {} and device.installs == 1


def test_a_newer_desired_state_replaces_what_the_simulated_device_staged(
    keys: FleetKeys,
) -> None:
    first, _ = signed_bundle(keys, 20_000)
    second, _ = signed_bundle(keys, 24_000)
    clock = Clock(NOON)
    device = SimulatedDevice(
        DEVICE,
        profile=TARGET,
        runtime=("litert", "2.3.0"),
        root_keys=[keys.root_public],
        block_size=8 * 1024,
        wall_clock=clock,
    )
    serve(device, device.on_desired(desired(keys, 1, first, 1), 0.0), first)
    # The same desired state again (a reconnect) leaves it staged and fetches nothing.
    assert device.on_desired(desired(keys, 1, first, 1), 0.0) == []
    assert list(device.staged) == ["sensor"]

    published = serve(device, device.on_desired(desired(keys, 2, second, 1), 0.0), second)
    assert kinds(published)[-1] == "staged"
    (staged,) = device.staged.values()
    assert staged.artifact.sha256 == hashlib.sha256(second).hexdigest()

    clock.now = NOON.replace(hour=3) + timedelta(days=1)
    assert kinds(device.tick(3.0)) == ["activated", "health_check_passed"]
    assert device.active["sensor"].deployment.artifact.length == len(second)
