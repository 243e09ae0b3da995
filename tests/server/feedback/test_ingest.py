"""Feedback and samples through a real broker into the ingestor: stored once however often
they come, bad payloads dropped and counted per device and reason, telemetry unaffected."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.artifacts import ArtifactStore
from server.feedback.models import FeedbackRecord
from server.fleet.models import DeviceStatus
from server.ingest.models import IngestDrop, TelemetryRecord
from server.ingest.telemetry import TelemetryIngestor
from server.ingest.workers import device_consumers
from server.samples.models import SampleBatchRecord
from shared.messages import FeedbackReport, LabelledOutcome, SampleBatch, TelemetryReport
from shared.topics import Channel, device_topic
from tests.server.feedback.conftest import MODEL, T0, add_device, add_fleet, add_model

pytestmark = [pytest.mark.database, pytest.mark.broker]


def feedback(device: str, *pairs: tuple[str, str, str]) -> bytes:
    return FeedbackReport(
        device_id=device,
        outcomes=[
            LabelledOutcome(
                prediction_id=pid,
                model_name=MODEL,
                model_version=1,
                predicted_label=predicted,
                true_label=true,
                predicted_at=T0,
                labelled_at=T0 + timedelta(minutes=1),
            )
            for pid, predicted, true in pairs
        ],
    ).to_bytes()


def sample_batch(device: str, seq: int, part: int = 0, parts: int = 1) -> bytes:
    return SampleBatch(
        device_id=device,
        seq=seq,
        part=part,
        parts=parts,
        model_name=MODEL,
        model_version=1,
        target="edge-x86_64-litert",
        window_end=T0,
        rows=[[0.5, 1.0, 1.5, 2.0]] * 3,
        prediction_ids=["p-1", "p-2", None],
    ).to_bytes()


def count(engine: Engine, table: type) -> int:
    with Session(engine) as session:
        return int(session.execute(select(func.count()).select_from(table)).scalar_one())


def test_feedback_and_samples_are_ingested_once_and_bad_ones_counted(
    engine: Engine, tmp_path: Path, mqtt_broker: Any, mqtt_client: Callable[..., Any]
) -> None:
    if mqtt_broker.kind != "mosquitto":
        pytest.skip("manual acknowledgements are checked against Mosquitto")
    with Session(engine) as session:
        add_model(session, ArtifactStore(tmp_path / "store"))
        add_fleet(session)
        add_device(session, "pending-0", DeviceStatus.PENDING)
        session.commit()
    ingestor = TelemetryIngestor(
        engine,
        host=mqtt_broker.host,
        port=mqtt_broker.port,
        client_id=f"test-ingest-feedback@{time.time_ns()}",
        flush_interval=0.05,
        consumers=device_consumers(),
    )
    ingestor.start()
    try:
        deadline = time.monotonic() + 10
        while not ingestor._client.is_connected():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.2)  # the subscriptions are in place
        device = mqtt_client("a-0")
        labels = device_topic("a-0", Channel.FEEDBACK)
        good = feedback("a-0", ("p-1", "ok", "ok"), ("p-2", "ok", "dent"), ("p-3", "ok", "crack"))
        published = [
            (labels, good),
            (labels, good),  # an outbox replaying what the broker had already
            (labels, feedback("a-0", ("p-2", "ok", "scratch"))),  # p-2 has a label already
            (labels, b'{"schema":"ef.feedback"'),
            (labels, feedback("a-1", ("p-9", "ok", "ok"))),  # about another device
            (device_topic("pending-0", Channel.FEEDBACK), feedback("pending-0", ("p", "ok", "ok"))),
            (device_topic("a-0", Channel.SAMPLES), sample_batch("a-0", 7)),
            (device_topic("a-0", Channel.SAMPLES), sample_batch("a-0", 7)),
            (device_topic("a-0", Channel.SAMPLES), sample_batch("a-0", 8, part=1, parts=2)),
            (device_topic("a-0", Channel.SAMPLES), b"x" * (300 * 1024)),
            (
                device_topic("a-0", Channel.TELEMETRY),
                TelemetryReport(
                    device_id="a-0", seq=1, window_start=T0, window_end=T0 + timedelta(minutes=1)
                ).to_bytes(),
            ),
        ]
        for topic, payload in published:
            device.publish(topic, payload)
        deadline = time.monotonic() + 15
        while ingestor.stats().received < len(published):
            assert time.monotonic() < deadline, ingestor.stats()
            time.sleep(0.05)
    finally:
        ingestor.stop()
    assert count(engine, FeedbackRecord) == 2  # p-1 and p-2; p-3's label is not the model's
    assert count(engine, SampleBatchRecord) == 2
    assert count(engine, TelemetryRecord) == 1
    with Session(engine) as session:
        drops = {
            (d.device_id, d.reason): d.count for d in session.execute(select(IngestDrop)).scalars()
        }
        stored = {
            r.prediction_id: r.true_label for r in session.execute(select(FeedbackRecord)).scalars()
        }
    assert stored == {"p-1": "ok", "p-2": "dent"}
    assert drops == {
        ("a-0", "bad_label"): 2,  # p-3, in the report and in its replay
        ("a-0", "feedback_conflict"): 1,
        ("a-0", "malformed"): 1,
        ("a-0", "wrong_device"): 1,
        ("a-0", "oversized"): 1,
        ("pending-0", "unknown_device"): 1,
    }
