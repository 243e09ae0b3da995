"""The fleet simulator speaks the real protocol through a real broker.

Simulated devices accept a signed desired state with the agent's own rules, fetch the
bundle from the server's :class:`BlockServer` by blocks, verify it, report events and
state, and send telemetry whose drift sketches show the drift they were told to
simulate -- and only on those features.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from server.artifacts import ArtifactStore
from server.delivery.blocks import BlockServer
from server.keys import FleetKeys, init_keys
from server.simulator.device import Behaviour, SimulatedDevice
from server.simulator.fleet import FleetSimulator
from shared.bundle import BundleManifest, FileRef, TensorSpec, build_bundle
from shared.drift import DriftReference, compare, merge_sketches
from shared.messages import (
    ArtifactRef,
    Deployment,
    DesiredMessage,
    DesiredState,
    DeviceState,
    Event,
    EventKind,
    TelemetryReport,
)
from shared.signing import PayloadType, sign_envelope
from shared.topics import Channel, device_topic, fleet_filter

pytestmark = pytest.mark.broker

FEATURES = [f"f{i}" for i in range(6)]
TARGET = "edge-x86_64-litert"


@pytest.fixture
def keys(tmp_path: Path) -> FleetKeys:
    return init_keys(tmp_path / "keys", now=datetime.now(UTC), lifetime=timedelta(days=1))


def signed_bundle(keys: FleetKeys, size: int) -> tuple[bytes, DriftReference]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, len(FEATURES)))
    probabilities = rng.dirichlet(np.ones(3), size=2000)
    # Opaque model bytes: simulated devices verify the bundle but never run its model.
    model = rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()
    reference = DriftReference.from_data(x, feature_names=FEATURES, probabilities=probabilities)
    manifest = BundleManifest(
        model_name="sensor",
        model_version=1,
        target=TARGET,
        runtime="litert",
        min_runtime_version="2.0.0",
        format="tflite",
        task="classification",
        model_file=FileRef(name="model.tflite", sha256="0" * 64, length=len(model)),
        inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, len(FEATURES)])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[-1, 3])],
        feature_names=FEATURES,
        labels=["a", "b", "c"],
        drift_reference=reference,
        created_at=datetime.now(UTC),
    )
    return build_bundle(manifest, model, keys.signing_keys), reference


def desired(keys: FleetKeys, device_id: str, bundle: bytes, sha256: str, version: int) -> bytes:
    now = datetime.now(UTC)
    state = DesiredState(
        device_id=device_id,
        manifest_version=version,
        issued_at=now,
        expires_at=now + timedelta(hours=1),
        rollout_id="r1",
        deployments=[
            Deployment(
                model_name="sensor",
                model_version=1,
                target=TARGET,
                artifact=ArtifactRef(sha256=sha256, length=len(bundle)),
            )
        ],
    )
    manifest = sign_envelope(state.to_bytes(), PayloadType.DESIRED_STATE, keys.signing_keys)
    return DesiredMessage(keyring=keys.keyring_envelope, manifest=manifest).to_bytes()


@pytest.fixture
def block_server(
    tmp_path: Path, mqtt_broker: object
) -> Iterator[tuple[ArtifactStore, BlockServer]]:
    store = ArtifactStore(tmp_path / "artifacts")
    server = BlockServer(
        store,
        authorize=lambda device_id, sha256: True,
        host=mqtt_broker.host,  # type: ignore[attr-defined]
        port=mqtt_broker.port,  # type: ignore[attr-defined]
    )
    server.start()
    try:
        yield store, server
    finally:
        server.stop()


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_simulated_fleet_installs_a_signed_bundle_by_blocks_and_reports_drift(
    keys: FleetKeys,
    block_server: tuple[ArtifactStore, BlockServer],
    mqtt_broker: object,
    mqtt_client: Callable[..., object],
) -> None:
    store, _ = block_server
    bundle, reference = signed_bundle(keys, size=300_000)
    sha256 = store.put_bytes(bundle).sha256
    behaviours = {
        "sim-0": Behaviour(),
        "sim-1": Behaviour(),
        "sim-2": Behaviour(drift={"f2": 3.0}),
        "sim-3": Behaviour(reject_installs=True),
    }
    devices = [
        SimulatedDevice(
            device_id,
            profile=TARGET,
            runtime=("litert", "2.3.0"),
            root_keys=[keys.root_public],
            behaviour=behaviour,
            block_size=32 * 1024,
            blocks_per_request=4,
            wall_clock=lambda: datetime.now(UTC),
        )
        for device_id, behaviour in behaviours.items()
    ]
    watcher = mqtt_client("watcher")
    for channel in (Channel.EVENTS, Channel.STATE, Channel.TELEMETRY):
        watcher.subscribe(fleet_filter(channel))  # type: ignore[attr-defined]
    simulator = FleetSimulator(
        devices,
        host=mqtt_broker.host,  # type: ignore[attr-defined]
        port=mqtt_broker.port,  # type: ignore[attr-defined]
        report_interval=0.5,
        inferences_per_report=400,
    )
    simulator.start()
    try:
        wait_for(lambda: simulator.stats().connected == len(devices))
        publisher = mqtt_client("server")
        for device_id in behaviours:
            publisher.publish(  # type: ignore[attr-defined]
                device_topic(device_id, Channel.DESIRED),
                desired(keys, device_id, bundle, sha256, version=1),
                retain=True,
            )
        wait_for(lambda: simulator.stats().installs == 3 and simulator.stats().rejections == 1)
        time.sleep(1.5)  # a few telemetry windows with the model active
        stats = simulator.stats()
    finally:
        simulator.stop()

    assert stats.active_versions == {"sensor@1": 3}
    # nothing fetched twice: each of the four devices pulled the bundle once
    assert stats.bytes_received == 4 * len(bundle)

    received = watcher.drain(wait=0.5)  # type: ignore[attr-defined]
    events = [Event.from_bytes(r.payload) for r in received if r.topic.endswith("/events")]
    kinds = {(e.device_id, e.kind) for e in events}
    for device_id in ("sim-0", "sim-1", "sim-2"):
        assert (device_id, EventKind.ACTIVATED) in kinds
    assert ("sim-3", EventKind.REJECTED) in kinds
    assert ("sim-3", EventKind.ACTIVATED) not in kinds
    states = {
        s.device_id: s
        for s in (DeviceState.from_bytes(r.payload) for r in received if r.topic.endswith("/state"))
    }
    assert [m.model_version for m in states["sim-0"].models] == [1]
    assert states["sim-3"].models == []
    assert states["sim-3"].last_update is not None
    assert states["sim-3"].last_update.reason == "self_test_failed"

    reports = [
        TelemetryReport.from_bytes(r.payload) for r in received if r.topic.endswith("/telemetry")
    ]
    by_device: dict[str, list[TelemetryReport]] = {}
    for report in reports:
        by_device.setdefault(report.device_id, []).append(report)
    for device_reports in by_device.values():
        seqs = [r.seq for r in device_reports]
        assert seqs == sorted(set(seqs))  # strictly increasing

    def drift_of(device_id: str) -> dict[str, float]:
        sketches = [m.drift for r in by_device[device_id] for m in r.models if m.drift]
        merged = merge_sketches(sketches)
        return {d.name: d.psi for d in compare(reference, merged)}

    healthy, drifted = drift_of("sim-0"), drift_of("sim-2")
    assert max(healthy.values()) < 0.1
    assert drifted["f2"] > 0.25
    assert max(v for k, v in drifted.items() if k != "f2") < 0.1
