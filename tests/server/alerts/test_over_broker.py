"""Alerts end to end over a real broker: simulated devices install a signed bundle and send
telemetry (real drift sketches, slow or fast inferences) through Mosquitto to a real
:class:`TelemetryIngestor`; a running :class:`AlertEvaluator` opens the drift and latency
alerts of the drifted, slow group -- none for the control group -- and resolves the
latency alert once the devices are fast again. The clock is real time plus an offset the
test moves, shared by the devices and the evaluator."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from server.alerts import service
from server.alerts.evaluate import EvaluationContext
from server.alerts.evaluator import AlertEvaluator
from server.alerts.rules import DriftCondition, LatencyCondition
from server.artifacts import ArtifactStore
from server.db import session_scope
from server.delivery.blocks import BlockServer
from server.fleet.groups import add_members, create_group
from server.ingest.telemetry import TelemetryIngestor
from server.keys import init_keys
from server.models import TargetArtifact
from server.profiles import load_profiles
from server.simulator.device import Behaviour, SimulatedDevice
from server.simulator.fleet import FleetSimulator
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
from tests.server.drift.test_fleet_drift import desired
from tests.server.rollouts.harness import Clock, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.database]

SLOW = Behaviour(drift={DRIFTED_FEATURE: 3.0}, latency_ms=60.0)  # the profile's SLA: 20 ms
FAST = Behaviour(drift={DRIFTED_FEATURE: 3.0}, latency_ms=4.0)


def test_drifted_slow_devices_open_alerts_and_fast_ones_resolve_them(
    engine: Engine, mqtt_broker: object, mqtt_client: Callable[..., Any], tmp_path: Path
) -> None:
    host, port = mqtt_broker.host, mqtt_broker.port  # type: ignore[attr-defined]
    clock = Clock()
    keys = init_keys(tmp_path / "keys", now=datetime.now(UTC), lifetime=timedelta(days=1))
    store = ArtifactStore(tmp_path / "artifacts")
    canary, control = CANARY[:2], CONTROL[:2]
    with Session(engine) as session:
        add_devices(session, canary + control)
        for name, members in (("canary", canary), ("control", control)):
            add_members(session, group=create_group(session, name=name), device_ids=members)
        register_version(session, store=store, keys=keys, reference=make_reference())
        session.commit()
        artifact = session.exec(select(TargetArtifact)).one()
    with session_scope(engine) as session:
        drift = DriftCondition(windows=1, min_samples=300, min_devices=2)
        for group in ("canary", "control"):
            service.create_rule(
                session,
                name=f"{group}-drift",
                condition=drift,
                model_name=MODEL,
                group=group,
                now=clock(),
            )
        service.create_rule(
            session,
            name="canary-latency",
            condition=LatencyCondition(min_inferences=300),
            model_name=MODEL,
            group="canary",
            now=clock(),
        )

    devices = [
        SimulatedDevice(
            device_id,
            profile=TARGET,
            runtime=("litert", "2.3.0"),
            root_keys=[keys.root_public],
            behaviour=SLOW if device_id in canary else Behaviour(),
            seed=index,
            wall_clock=clock,
        )
        for index, device_id in enumerate(canary + control)
    ]
    profiles = load_profiles()
    evaluator = AlertEvaluator(
        engine,
        context=EvaluationContext(
            store=store,
            keys=keys,
            latency_sla_ms={n: p.latency_sla_ms_p95 for n, p in profiles.items()},
        ),
        clock=clock,
        interval=0.1,
    )
    blocks = BlockServer(store, authorize=lambda device_id, sha256: True, host=host, port=port)
    ingestor = TelemetryIngestor(
        engine, host=host, port=port, client_id="alerts-test-ingest", flush_interval=0.05
    )
    simulator = FleetSimulator(
        devices, host=host, port=port, report_interval=0.2, inferences_per_report=200
    )
    publisher = mqtt_client("alerts-test-server")

    def open_alerts() -> dict[str, Any]:
        with Session(engine) as session:
            return {a.rule_name: a for a in service.list_alerts(session, status="open")}

    blocks.start()
    ingestor.start()
    simulator.start()
    evaluator.start()
    try:
        wait_for(lambda: simulator.stats().connected == len(devices), 30, "devices connected")
        for device in devices:
            publisher.publish(
                device_topic(device.device_id, Channel.DESIRED),
                desired(keys, device.device_id, artifact),
                retain=True,
            )
        opened = wait_for(
            lambda: (found := open_alerts()).keys() >= {"canary-drift", "canary-latency"} and found,
            60,
            "the canary's drift and latency alerts",
        )
        drift_evidence = json.loads(opened["canary-drift"].evidence_json)
        assert {d["device_id"] for d in drift_evidence["devices"]} == set(canary)
        assert drift_evidence["features"][0] == DRIFTED_FEATURE
        assert opened["canary-latency"].value > 20.0  # p95 in ms, above the SLA
        # the control group reported as much and stayed quiet
        wait_for(
            lambda: ingestor.stats().stored > 8 * len(devices), 30, "more telemetry from everyone"
        )
        evaluator.wake()
        rounds = evaluator.rounds
        wait_for(lambda: evaluator.rounds > rounds + 1, 30, "two more evaluator rounds")
        assert set(open_alerts()) == {"canary-drift", "canary-latency"}

        for device in devices[: len(canary)]:
            device.behaviour = FAST  # read at each report
        clock.advance(hours=1)  # a new window: only fast reports in it
        wait_for(lambda: "canary-latency" not in open_alerts(), 60, "the latency alert resolved")
        assert "canary-drift" in open_alerts()  # still drifted
    finally:
        evaluator.stop()
        simulator.stop()
        ingestor.stop()
        blocks.stop()
        for device in devices:  # leave no retained desired state for other tests
            publisher.publish(device_topic(device.device_id, Channel.DESIRED), b"", retain=True)

    with Session(engine) as session:
        (resolved,) = service.list_alerts(session, status="resolved")
    assert resolved.rule_name == "canary-latency"
    assert resolved.resolution is not None and "within the limit of 20 ms" in resolved.resolution
    assert ingestor.stats().dropped == 0
