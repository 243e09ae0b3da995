"""Telemetry ingestion: validated, stored once per (device_id, seq), bad payloads counted."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.fleet.models import Device, DeviceStatus
from server.ingest.models import IngestDrop, ModelWindowRecord, TelemetryRecord
from server.ingest.telemetry import IngestRejected, TelemetryIngestor, parse_report, store_reports
from shared.latency import latency_counts
from shared.messages import LatencyHistogram, ModelWindow, TelemetryReport
from shared.topics import Channel, device_topic

pytestmark = pytest.mark.database

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def report(device_id: str, seq: int, inferences: int = 10) -> TelemetryReport:
    return TelemetryReport(
        device_id=device_id,
        seq=seq,
        window_start=T0 + timedelta(minutes=seq),
        window_end=T0 + timedelta(minutes=seq + 1),
        models=[
            ModelWindow(
                model_name="digits",
                model_version=2,
                target="edge-x86_64-litert",
                inferences=inferences,
                errors=1,
                latency_ms=LatencyHistogram(counts=latency_counts([1.0] * inferences).tolist()),
            )
        ],
    )


def add_device(session: Session, device_id: str, status: DeviceStatus) -> None:
    session.add(
        Device(
            id=device_id,
            status=status.value,
            profile="edge-x86_64-litert",
            arch="x86_64",
            runtime_name="litert",
            runtime_version="2.3.0",
            agent_version="test",
        )
    )


def count(engine: Engine, table: type) -> int:
    with Session(engine) as session:
        return int(session.execute(select(func.count()).select_from(table)).scalar_one())


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("ef/v1/dev/a/state", report("a", 0).to_bytes(), "bad_topic"),
        ("something/else", report("a", 0).to_bytes(), "bad_topic"),
        (device_topic("a", Channel.TELEMETRY), b"{not json", "malformed"),
        (device_topic("a", Channel.TELEMETRY), b"x" * (600 * 1024), "oversized"),
        (device_topic("a", Channel.TELEMETRY), report("b", 0).to_bytes(), "wrong_device"),
    ],
)
def test_bad_payloads_are_refused_with_a_reason(topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(IngestRejected) as refused:
        parse_report(topic, payload)
    assert refused.value.reason == reason
    assert str(refused.value)


def test_a_report_is_stored_once_however_often_it_comes(engine: Engine) -> None:
    with Session(engine) as session:
        assert store_reports(session, [report("a", 0), report("a", 1), report("a", 0)]) == 2
        session.commit()
    with Session(engine) as session:
        assert store_reports(session, [report("a", 1), report("a", 2)]) == 1
        session.commit()
    assert count(engine, TelemetryRecord) == 3
    assert count(engine, ModelWindowRecord) == 3
    with Session(engine) as session:
        window = session.execute(
            select(ModelWindowRecord).where(ModelWindowRecord.seq == 2)  # type: ignore[arg-type]
        ).scalar_one()
        assert (window.inferences, window.errors, window.model_version) == (10, 1, 2)
        assert sum(LatencyHistogram.model_validate_json(window.latency_json).counts) == 10


@pytest.mark.broker
def test_ingestor_over_the_broker_stores_once_and_counts_drops(
    engine: Engine, mqtt_broker: object, mqtt_client: Callable[..., object]
) -> None:
    with Session(engine) as session:
        add_device(session, "dev-1", DeviceStatus.ACCEPTED)
        add_device(session, "dev-pending", DeviceStatus.PENDING)
        session.commit()
    ingestor = TelemetryIngestor(
        engine,
        host=mqtt_broker.host,  # type: ignore[attr-defined]
        port=mqtt_broker.port,  # type: ignore[attr-defined]
        client_id="test-ingest",
        flush_interval=0.05,
    )
    ingestor.start()
    try:
        deadline = time.monotonic() + 10
        while not ingestor._client.is_connected():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.2)  # the subscription is in place
        device = mqtt_client("dev-1")
        topic = device_topic("dev-1", Channel.TELEMETRY)
        for seq in range(20):
            device.publish(topic, report("dev-1", seq).to_bytes())  # type: ignore[attr-defined]
        for seq in (3, 7, 7):  # an outbox replaying what the broker already had
            device.publish(topic, report("dev-1", seq).to_bytes())  # type: ignore[attr-defined]
        device.publish(topic, b'{"schema": "ef.telemetry"')  # type: ignore[attr-defined]
        device.publish(topic, report("dev-2", 0).to_bytes())  # type: ignore[attr-defined]
        pending = device_topic("dev-pending", Channel.TELEMETRY)
        device.publish(pending, report("dev-pending", 0).to_bytes())  # type: ignore[attr-defined]
        deadline = time.monotonic() + 15
        while ingestor.stats().received < 26:
            assert time.monotonic() < deadline, ingestor.stats()
            time.sleep(0.05)
    finally:
        ingestor.stop()
    stats = ingestor.stats()
    assert (stats.stored, stats.duplicates, stats.dropped) == (20, 3, 3)
    assert count(engine, TelemetryRecord) == 20
    with Session(engine) as session:
        drops = {
            (d.device_id, d.reason): d.count for d in session.execute(select(IngestDrop)).scalars()
        }
    assert drops == {
        ("dev-1", "malformed"): 1,
        ("dev-1", "wrong_device"): 1,
        ("dev-pending", "unknown_device"): 1,
    }


@pytest.mark.broker
def test_ingested_drift_sketches_roll_up_to_the_pooled_counts_batch_after_batch(
    engine: Engine, mqtt_broker: object, mqtt_client: Callable[..., object]
) -> None:
    """Sketches are flattened before the transaction with the layouts the ingestor has
    seen committed; the first batch records the layout, later ones reuse it. Whatever
    the path, the rollups hold the pooled counts, and a misfit or a stranger is refused."""
    import numpy as np

    from server.drift.report import Thresholds
    from server.drift.service import Scope, drift_report
    from shared.drift import compare, merge_sketches
    from tests.server.drift.conftest import make_reference, sketch_of
    from tests.server.drift.conftest import report as drift_report_of

    reference = make_reference()
    rng = np.random.default_rng(11)
    with Session(engine) as session:
        for device_id in ("dev-1", "dev-2"):
            add_device(session, device_id, DeviceStatus.ACCEPTED)
        add_device(session, "dev-pending", DeviceStatus.PENDING)
        session.commit()
    ingestor = TelemetryIngestor(
        engine,
        host=mqtt_broker.host,  # type: ignore[attr-defined]
        port=mqtt_broker.port,  # type: ignore[attr-defined]
        client_id="test-ingest-drift",
        flush_interval=0.05,
    )
    sketches = []
    ingestor.start()
    try:
        deadline = time.monotonic() + 10
        while not ingestor.subscribed.is_set():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        device = mqtt_client("dev-1")
        other = mqtt_client("dev-2")
        sent = 0
        for round_ in range(3):  # one batch at a time: the layout is known from round 2
            for seq in range(round_ * 10, round_ * 10 + 10):
                sketch = sketch_of(reference, rng, 50)
                sketches.append(sketch)
                client, device_id = (device, "dev-1") if seq % 2 else (other, "dev-2")
                start = T0 + timedelta(minutes=seq)
                client.publish(  # type: ignore[attr-defined]
                    device_topic(device_id, Channel.TELEMETRY),
                    drift_report_of(device_id, seq, start, sketch).to_bytes(),
                )
                sent += 1
            if round_ == 2:
                misfit = sketch_of(reference, rng, 50)
                misfit = misfit.model_copy(update={"features": misfit.features[:3]})
                device.publish(  # type: ignore[attr-defined]
                    device_topic("dev-1", Channel.TELEMETRY),
                    drift_report_of("dev-1", 99, T0, misfit).to_bytes(),
                )
                stranger = mqtt_client("dev-pending")
                stranger.publish(  # type: ignore[attr-defined]
                    device_topic("dev-pending", Channel.TELEMETRY),
                    drift_report_of("dev-pending", 0, T0, sketch_of(reference, rng, 50)).to_bytes(),
                )
                sent += 2
            deadline = time.monotonic() + 15
            while ingestor.stats().received < sent:
                assert time.monotonic() < deadline, ingestor.stats()
                time.sleep(0.05)
    finally:
        ingestor.stop()
    stats = ingestor.stats()
    assert (stats.stored, stats.dropped, stats.errors) == (31, 1, 0)
    with Session(engine) as session:
        drops = {
            (d.device_id, d.reason): d.count for d in session.execute(select(IngestDrop)).scalars()
        }
        result = drift_report(
            session,
            reference=reference,
            model_name="sensor",
            model_version=1,
            scope=Scope(None, None),
            since=T0,
            until=T0 + timedelta(hours=1),
            thresholds=Thresholds(min_samples=10),
        )
    assert drops == {("dev-1", "drift_layout"): 1, ("dev-pending", "unknown_device"): 1}
    pooled = compare(reference, merge_sketches(sketches))
    assert [(f.n, f.psi) for f in result.features] == [(d.n, d.psi) for d in pooled]
    assert result.sla.windows == 31 and result.devices.with_drift_data == 2
