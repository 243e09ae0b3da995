"""End to end over a real broker: simulated devices install a signed bundle, count drift
with the agent's accumulator and send telemetry; a real :class:`TelemetryIngestor` stores
it; the fleet drift view then shows the drifted group drifting on the right feature and
the control group not drifting at all."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from server.artifacts import ArtifactStore
from server.delivery.blocks import BlockServer
from server.drift.reference import version_reference
from server.drift.report import Level, Thresholds
from server.drift.service import drift_report, resolve_scope
from server.drift.timerange import Period, ceil_to, floor_to
from server.fleet.groups import add_members, create_group
from server.ingest.telemetry import TelemetryIngestor
from server.keys import FleetKeys, init_keys
from server.models import TargetArtifact
from server.registry import get_version
from server.simulator.device import Behaviour, SimulatedDevice
from server.simulator.fleet import FleetSimulator
from shared.messages import ArtifactRef, Deployment, DesiredMessage, DesiredState
from shared.signing import PayloadType, sign_envelope
from shared.topics import Channel, device_topic
from tests.server.drift.conftest import (
    CANARY,
    CONTROL,
    DRIFTED_FEATURE,
    MODEL,
    TARGET,
    add_devices,
    make_reference,
    register_version,
)

pytestmark = [pytest.mark.broker, pytest.mark.database]

REPORTS_PER_DEVICE = 5


def desired(keys: FleetKeys, device_id: str, artifact: TargetArtifact) -> bytes:
    now = datetime.now(UTC)
    assert artifact.bundle_sha256 is not None and artifact.bundle_length is not None
    state = DesiredState(
        device_id=device_id,
        manifest_version=1,
        issued_at=now,
        expires_at=now + timedelta(hours=1),
        rollout_id="drift-test",
        deployments=[
            Deployment(
                model_name=MODEL,
                model_version=1,
                target=TARGET,
                artifact=ArtifactRef(sha256=artifact.bundle_sha256, length=artifact.bundle_length),
            )
        ],
    )
    manifest = sign_envelope(state.to_bytes(), PayloadType.DESIRED_STATE, keys.signing_keys)
    return DesiredMessage(keyring=keys.keyring_envelope, manifest=manifest).to_bytes()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # threads and a broker give no event to wait on: poll
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_drifted_group_drifts_on_its_feature_and_the_control_group_does_not(
    engine: Engine, mqtt_broker: object, mqtt_client: Callable[..., object], tmp_path: Path
) -> None:
    host, port = mqtt_broker.host, mqtt_broker.port  # type: ignore[attr-defined]
    keys = init_keys(tmp_path / "keys", now=datetime.now(UTC), lifetime=timedelta(days=1))
    store = ArtifactStore(tmp_path / "artifacts")
    reference = make_reference()
    with Session(engine) as session:
        add_devices(session, CANARY[:2] + CONTROL[:2])
        for name, members in (("canary", CANARY[:2]), ("control", CONTROL[:2])):
            add_members(session, group=create_group(session, name=name), device_ids=members)
        register_version(session, store=store, keys=keys, reference=reference)
        session.commit()
        artifact = session.exec(select(TargetArtifact)).one()

    started = datetime.now(UTC)
    devices = [
        SimulatedDevice(
            device_id,
            profile=TARGET,
            runtime=("litert", "2.3.0"),
            root_keys=[keys.root_public],
            behaviour=Behaviour(drift={DRIFTED_FEATURE: 3.0} if device_id in CANARY else {}),
            seed=index,
            wall_clock=lambda: datetime.now(UTC),
        )
        for index, device_id in enumerate(CANARY[:2] + CONTROL[:2])
    ]
    blocks = BlockServer(store, authorize=lambda device_id, sha256: True, host=host, port=port)
    ingestor = TelemetryIngestor(
        engine, host=host, port=port, client_id="drift-test-ingest", flush_interval=0.05
    )
    simulator = FleetSimulator(
        devices, host=host, port=port, report_interval=0.2, inferences_per_report=400
    )
    blocks.start()
    ingestor.start()
    simulator.start()
    try:
        wait_for(lambda: simulator.stats().connected == len(devices), "devices to connect")
        publisher = mqtt_client("drift-test-server")
        for device in devices:
            publisher.publish(  # type: ignore[attr-defined]
                device_topic(device.device_id, Channel.DESIRED),
                desired(keys, device.device_id, artifact),
                retain=True,
            )
        wait_for(lambda: simulator.stats().installs == len(devices), "installs")
        installed = simulator.stats().telemetry_sent
        wait_for(
            lambda: ingestor.stats().stored >= installed + REPORTS_PER_DEVICE * len(devices),
            "telemetry with drift counts",
        )
    finally:
        simulator.stop()
        ingestor.stop()
        blocks.stop()
        for device in devices:  # leave no retained desired state for other tests
            publisher.publish(device_topic(device.device_id, Channel.DESIRED), b"", retain=True)  # type: ignore[attr-defined]

    assert ingestor.stats().dropped == 0
    thresholds = Thresholds(min_samples=400)
    with Session(engine) as session:
        version = get_version(session, model_name=MODEL, version=1)
        loaded = version_reference(
            session, store=store, keys=keys, model_name=MODEL, version=version
        )
        assert loaded == reference  # read back from the signed bundle

        def view(group: str) -> object:
            return drift_report(
                session,
                reference=loaded,
                model_name=MODEL,
                model_version=1,
                scope=resolve_scope(session, group=group, devices=None),
                since=floor_to(started, Period.HOUR),
                until=ceil_to(datetime.now(UTC), Period.HOUR) + timedelta(hours=1),
                thresholds=thresholds,
            )

        canary, control = view("canary"), view("control")

    canary_levels = {f.name: f.level for f in canary.features}  # type: ignore[attr-defined]
    assert canary_levels.pop(DRIFTED_FEATURE) is Level.ACT
    assert set(canary_levels.values()) == {Level.OK}
    assert canary.devices.evaluated == 2 and canary.devices.drifted_share == 1.0  # type: ignore[attr-defined]
    assert {d.feature for d in canary.top_devices} == {DRIFTED_FEATURE}  # type: ignore[attr-defined]
    assert {f.level for f in control.features} == {Level.OK}  # type: ignore[attr-defined]
    assert control.devices.evaluated == 2 and control.devices.drifted_share == 0.0  # type: ignore[attr-defined]
    assert control.top_features == []  # type: ignore[attr-defined]
    assert control.sla.inferences > 0 and control.sla.p50_ms is not None  # type: ignore[attr-defined]
