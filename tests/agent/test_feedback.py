"""Feedback and samples on the device: prediction ids, labels posted to the local API and
forwarded through the outbox, captured samples sent with their prediction ids -- and the
whole loop through a real broker into the server's ingestion, accuracy and a dataset
version with lineage."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.agent import Agent
from agent.config import AgentConfig, CaptureConfig, HttpConfig, Limits
from agent.errors import AgentError
from agent.feedback import (
    PredictionLog,
    UnknownLabelError,
    UnknownPredictionError,
    sample_batches,
    samples_fit,
)
from agent.http_api import LocalApi
from agent.monitoring import CapturedSamples, WindowMonitor
from shared.bundle import Bundle
from shared.messages import LabelledOutcome, SampleBatch
from shared.signing import SigningKey
from shared.topics import Channel, device_topic
from tests.agent.test_agent_e2e import DEVICE, PROFILE, Fleet, bundle_bytes
from tests.agent.test_monitoring import InterpreterModel, digits

LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def wait_for(condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


# ----------------------------------------------------------------------------- the log


def test_ids_follow_the_rows_and_name_the_model_and_class() -> None:
    manifest = digits().manifest
    log = PredictionLog(100, token="abc123abc123", wall_clock=lambda: 1_800_000_000.0)
    ids = log.record(manifest, np.array([3, 7, 7]), rows=3, n_classes=10)
    assert ids == ["abc123abc123-1", "abc123abc123-2", "abc123abc123-3"]
    found = log.lookup(ids[1])
    assert (found.model_name, found.model_version, found.target) == ("digits", 3, manifest.target)
    assert (found.predicted_class, found.predicted_label) == (7, "seven")
    assert found.predicted_at == datetime.fromtimestamp(1_800_000_000, UTC)
    assert found.class_of("seven") == 7 and found.class_of(2) == 2
    with pytest.raises(UnknownLabelError, match=r"'seventy' is not a label of digits v3.*'zero'"):
        found.class_of("seventy")
    with pytest.raises(UnknownLabelError):
        found.class_of(10)
    with pytest.raises(UnknownLabelError):
        found.class_of(True)


def test_an_id_is_forgotten_after_capacity_and_ids_of_another_run_are_unknown() -> None:
    manifest = digits().manifest
    log = PredictionLog(4)
    first = log.record(manifest, np.array([1]), rows=1)[0]
    later = log.record(manifest, np.arange(4), rows=4)
    with pytest.raises(UnknownPredictionError, match="last 4 predictions"):
        log.lookup(first)
    assert log.lookup(later[0]).predicted_class == 0
    other = PredictionLog(4)
    with pytest.raises(UnknownPredictionError, match="not served by this agent"):
        other.lookup(later[0])
    for bad in ("", "nope", f"{log.token}-0", f"{log.token}-99", f"{log.token}-x"):
        with pytest.raises(UnknownPredictionError):
            log.lookup(bad)
    big = log.record(manifest, np.arange(10) % 10, rows=10)  # more rows than the log holds
    assert [log.lookup(i).predicted_class for i in big[-4:]] == [6, 7, 8, 9]
    with pytest.raises(UnknownPredictionError):
        log.lookup(big[5])


def test_a_regression_prediction_takes_no_label() -> None:
    manifest = digits().manifest.model_copy(update={"task": "regression", "labels": None})
    log = PredictionLog(8)
    (pid,) = log.record(manifest, None, rows=1)
    with pytest.raises(UnknownLabelError, match="not a classifier"):
        log.lookup(pid).class_of("1")


# ----------------------------------------------------------------------------- samples


def captured(rows: np.ndarray, ids: tuple[str | None, ...] | None) -> CapturedSamples:
    return CapturedSamples(
        "digits", 3, "edge-x86_64-litert", 41, datetime(2026, 11, 2, tzinfo=UTC), rows, ids
    )


def test_samples_split_into_parts_that_fit_and_keep_their_ids() -> None:
    rows = np.arange(40 * 64, dtype=np.float64).reshape(40, 64) / 7
    rows[5, 3] = np.nan
    ids = tuple(f"t-{i}" for i in range(40))
    batches, skipped = sample_batches("cam-1", captured(rows, ids), max_bytes=8 * 1024)
    assert skipped == 1
    assert len(batches) > 1 and all(len(b.to_bytes()) <= 8 * 1024 for b in batches)
    assert {b.parts for b in batches} == {len(batches)}
    assert [b.part for b in batches] == list(range(len(batches)))
    back = [SampleBatch.from_bytes(b.to_bytes()) for b in batches]
    got_rows = np.concatenate([np.asarray(b.rows) for b in back])
    got_ids = [i for b in back for i in (b.prediction_ids or [])]
    keep = [i for i in range(40) if i != 5]
    assert np.array_equal(got_rows, rows[keep])  # exact: JSON carries float64 round trip
    assert got_ids == [ids[i] for i in keep]
    with pytest.raises(AgentError, match="do not fit"):
        sample_batches("cam-1", captured(rows[:2], None), max_bytes=300)


def test_samples_keep_to_half_of_the_outbox() -> None:
    assert samples_fit(rows=4, bytes_stored=400, max_rows=10, max_bytes=1000, size=100)
    assert not samples_fit(rows=5, bytes_stored=0, max_rows=10, max_bytes=1000, size=1)
    assert not samples_fit(rows=0, bytes_stored=450, max_rows=10, max_bytes=1000, size=51)


# ----------------------------------------------------------------------------- the local API


class Forwarder:
    def __init__(self) -> None:
        self.sent: list[list[LabelledOutcome]] = []
        self.fail = False

    def __call__(self, outcomes: list[LabelledOutcome]) -> None:
        if self.fail:
            raise AgentError("cannot store a message in outbox.sqlite: disk I/O error")
        self.sent.append(outcomes)


@pytest.fixture
def local_api() -> Iterator[tuple[Any, Forwarder, WindowMonitor]]:
    d = digits()
    model = InterpreterModel(d.manifest, d.tflite)
    monitor = WindowMonitor(
        device_id="cam-7",
        window_seconds=60,
        capture=CaptureConfig(enabled=True, max_per_window=100),
    )
    monitor.set_model(model.manifest)
    forwarder = Forwarder()
    api = LocalApi(
        lambda: model,
        monitor,
        config=HttpConfig(port=0),
        limits=Limits(prediction_log_size=64),
        status_provider=dict,
        on_feedback=forwarder,
    )
    address = api.start()
    yield address, forwarder, monitor
    api.stop()


def call(address: Any, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request(
            "POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_predictions_get_ids_and_labels_posted_for_them_are_forwarded(local_api: Any) -> None:
    address, forwarder, monitor = local_api
    x = digits().x[:3]
    status, answer = call(address, "/v1/predict", {"instances": x.tolist()})
    assert status == 200
    ids = answer["prediction_ids"]
    assert len(ids) == 3 and len(set(ids)) == 3
    predicted = [p["label"] for p in answer["predictions"]]
    wrong = next(label for label in LABELS if label != predicted[1])

    status, reply = call(
        address, "/v1/feedback", {"prediction_id": ids[0], "true_label": predicted[0]}
    )
    assert status == 202 and reply["forwarded"] == 1 and reply["outcomes"][0]["correct"] is True
    (sent,) = forwarder.sent
    assert (sent[0].prediction_id, sent[0].model_name, sent[0].model_version) == (
        ids[0],
        "digits",
        3,
    )
    assert sent[0].predicted_label == sent[0].true_label == predicted[0]
    assert sent[0].predicted_at is not None and sent[0].predicted_at <= sent[0].labelled_at

    # a batch: a class index is a label too; the first item again is not forwarded twice
    status, reply = call(
        address,
        "/v1/feedback",
        {
            "feedback": [
                {"prediction_id": ids[0], "true_label": predicted[0]},
                {"prediction_id": ids[1], "true_label": LABELS.index(wrong)},
            ]
        },
    )
    assert status == 202 and (reply["forwarded"], reply["already_forwarded"]) == (1, 1)
    assert [o.true_label for o in forwarder.sent[1]] == [wrong]
    assert reply["outcomes"][1]["correct"] is False

    # the rows captured for the window carry the ids they were answered under
    monitor.close_window(seq=9)
    (samples,) = monitor.take_samples()
    assert samples.prediction_ids is not None
    assert sorted(samples.prediction_ids) == sorted(ids)
    for row, pid in zip(samples.rows, samples.prediction_ids, strict=True):
        assert np.array_equal(row, x[ids.index(pid)])


@pytest.mark.parametrize(
    ("body", "status", "error", "message"),
    [
        ({"prediction_id": "{other}", "true_label": "one"}, 409, "label_conflict", "already"),
        ({"prediction_id": "{id}", "true_label": "eleven"}, 422, "unknown_label", "'eleven'"),
        (
            {"prediction_id": "ffffffffffff-1", "true_label": "one"},
            404,
            "unknown_prediction",
            "not served",
        ),
        ({"prediction_id": "{id}"}, 400, "invalid_input", "true_label"),
        ({"prediction_id": "{id}", "true_label": "one", "x": 1}, 400, "invalid_input", '"x"'),
        ({"feedback": []}, 400, "invalid_input", "non-empty"),
        (
            {"feedback": [{"prediction_id": "{id}", "true_label": "one"}] * 2},
            400,
            "invalid_input",
            "twice",
        ),
    ],
)
def test_bad_feedback_forwards_nothing_and_names_the_problem(
    local_api: Any, body: dict[str, Any], status: int, error: str, message: str
) -> None:
    address, forwarder, _ = local_api
    _, answer = call(address, "/v1/predict", {"instances": digits().x[:2].tolist()})
    fresh, other = answer["prediction_ids"]
    predicted = answer["predictions"][1]["label"]
    labelled = next(label for label in LABELS if label not in ("one", predicted))
    assert call(address, "/v1/feedback", {"prediction_id": other, "true_label": labelled})[0] == 202
    forwarder.sent.clear()
    text = json.dumps(body).replace("{id}", fresh).replace("{other}", other)
    got, reply = call(address, "/v1/feedback", json.loads(text))
    assert (got, reply["error"]) == (status, error)
    assert message in reply["message"]
    assert forwarder.sent == []


def test_a_label_the_outbox_could_not_store_can_be_posted_again(local_api: Any) -> None:
    address, forwarder, _ = local_api
    _, answer = call(address, "/v1/predict", {"instance": digits().x[0].tolist()})
    (pid,) = answer["prediction_ids"]
    forwarder.fail = True
    status, reply = call(address, "/v1/feedback", {"prediction_id": pid, "true_label": "one"})
    assert (status, reply["error"]) == (503, "feedback_not_stored")
    forwarder.fail = False
    status, reply = call(address, "/v1/feedback", {"prediction_id": pid, "true_label": "two"})
    assert status == 202 and reply["forwarded"] == 1


def test_without_a_forwarder_feedback_is_unavailable() -> None:
    d = digits()
    model = InterpreterModel(d.manifest, d.tflite)
    api = LocalApi(
        lambda: model,
        WindowMonitor(device_id="cam-8", window_seconds=60),
        config=HttpConfig(port=0),
        limits=Limits(),
        status_provider=dict,
    )
    address = api.start()
    try:
        status, reply = call(address, "/v1/feedback", {"prediction_id": "a-1", "true_label": "one"})
    finally:
        api.stop()
    assert (status, reply["error"]) == (503, "feedback_unavailable")


# ----------------------------------------------------------------------------- the whole loop


@pytest.mark.broker
def test_labels_and_samples_go_from_the_agent_through_the_broker_into_accuracy_and_a_dataset(
    tmp_path: Path,
    mqtt_broker: Any,
    mqtt_client: Any,
    make_digits_bundle: Callable[..., Bundle],
    bundle_key: SigningKey,
    digits_rows: Any,
) -> None:
    from sqlmodel import Session, select

    from server.artifacts import ArtifactStore
    from server.datasets.ingest import from_arrays
    from server.datasets.service import add_dataset_version
    from server.db import create_db_engine, migrate
    from server.feedback.models import FeedbackRecord
    from server.feedback.service import accuracy
    from server.fleet.models import Device, DeviceStatus
    from server.ingest.telemetry import TelemetryIngestor
    from server.ingest.workers import device_consumers
    from server.models import Model, ModelVersion
    from server.samples.models import SampleBatchRecord
    from server.samples.service import add_samples_version

    # the server: a database with the device, the model and the dataset it was trained on
    engine = create_db_engine(f"sqlite:///{tmp_path / 'server.db'}")
    migrate(engine)
    store = ArtifactStore(tmp_path / "server-store")
    with Session(engine) as session:
        train = from_arrays(
            digits_rows.x_train,
            digits_rows.y_train,
            label="digit",
            feature_names=[f"pixel_{i // 8}_{i % 8}" for i in range(64)],
            class_names=LABELS,
        )
        dataset_version = add_dataset_version(session, store=store, name="digits", parsed=train)
        model = Model(name="digits", task="classification")
        session.add(model)
        session.add(
            Device(
                id=DEVICE,
                status=DeviceStatus.ACCEPTED.value,
                profile=PROFILE,
                arch="x86_64",
                runtime_name="litert",
                runtime_version="2.3.0",
                agent_version="test",
            )
        )
        session.flush()
        session.add(
            ModelVersion(
                model_id=model.id,  # type: ignore[arg-type]
                version=1,
                source="trained",
                dataset_version_id=dataset_version.id,  # type: ignore[arg-type]
                keras_sha256="0" * 64,
                status="ready",
            )
        )
        session.commit()
    ingestor = TelemetryIngestor(
        engine,
        host=mqtt_broker.host,
        port=mqtt_broker.port,
        client_id=f"test-ingest-loop@{time.time_ns()}",
        flush_interval=0.05,
        consumers=device_consumers(),
    )
    ingestor.start()

    # the device: a real agent with capture on, its model delivered as a signed update
    fleet = Fleet(tmp_path, mqtt_broker, bundle_key)
    good = fleet.add(bundle_bytes(make_digits_bundle("tflite-float32"), bundle_key))
    mqtt_client("server").publish(
        device_topic(DEVICE, Channel.DESIRED), fleet.desired(5, good), retain=True
    )
    config = AgentConfig.model_validate(
        {
            "device_id": DEVICE,
            "profile": PROFILE,
            "data_dir": str(tmp_path / "device"),
            "window_seconds": 1,
            "trust": {"root_keys": [fleet.root.public.to_base64()]},
            "http": {"port": 0},
            "broker": {"url": mqtt_broker.url},
            "capture": {"enabled": True, "max_per_window": 64},
            "limits": {"health_check_max_seconds": 1},
        }
    )
    agent = Agent(config)
    agent.start()
    try:
        wait_for(agent.active_model)
        x, y = digits_rows.x_test[:40], digits_rows.y_test[:40]
        status, answer = call(agent.api_address, "/v1/predict", {"instances": x.tolist()})
        assert status == 200
        ids = answer["prediction_ids"]
        predicted = [p["label"] for p in answer["predictions"]]
        truth = [LABELS[int(c)] for c in y]
        labelled = 30  # the last ten stay unlabelled
        status, reply = call(
            agent.api_address,
            "/v1/feedback",
            {
                "feedback": [
                    {"prediction_id": pid, "true_label": label}
                    for pid, label in zip(ids[:labelled], truth[:labelled], strict=True)
                ]
            },
        )
        assert status == 202 and reply["forwarded"] == labelled

        def arrived() -> bool:
            with Session(engine) as session:
                labels = len(session.exec(select(FeedbackRecord)).all())
                rows = sum(b.n_rows for b in session.exec(select(SampleBatchRecord)).all())
            return labels == labelled and rows == len(x)

        wait_for(arrived, timeout=30)
    finally:
        agent.stop()
        ingestor.stop()
        fleet.blocks.stop()

    expected_correct = sum(p == t for p, t in zip(predicted[:labelled], truth, strict=False))
    now = datetime.now(UTC)
    with Session(engine) as session:
        assert accuracy(
            session,
            model_name="digits",
            model_version=1,
            device_ids=[DEVICE],
            since=now - timedelta(hours=1),
            until=now + timedelta(minutes=1),
        ) == (expected_correct, labelled)
        assert accuracy(
            session,
            model_name="digits",
            model_version=1,
            device_ids=["someone-else"],
            since=now - timedelta(hours=1),
            until=now + timedelta(minutes=1),
        ) == (0, 0)
        result = add_samples_version(
            session,
            store=store,
            model="digits",
            version=None,
            group=None,
            devices=None,
            since="1h",
            until=None,
            base=None,
            split_seed=0,
            now=now + timedelta(minutes=1),
        )
    assert (result.dataset, result.version, result.created) == ("digits", 2, True)
    assert result.rows == len(digits_rows.x_train) + labelled
    lineage = result.lineage
    assert lineage["kind"] == "device_samples" and lineage["devices"] == [DEVICE]
    assert lineage["base"] == {"dataset": "digits", "version": 1, "rows": len(digits_rows.x_train)}
    assert (lineage["added_rows"], lineage["unlabelled_rows"]) == (labelled, len(x) - labelled)
    # the rows in the new version are the device's raw rows, with the labels posted for them
    from server.datasets.service import load_dataset_version, resolve_version

    with Session(engine) as session:
        version = resolve_version(session, "digits@2")
        loaded = load_dataset_version(session, store=store, dataset_version_id=version.id)  # type: ignore[arg-type]
    all_x = np.concatenate([loaded.x_train, loaded.x_val, loaded.x_test])
    all_y = np.concatenate([loaded.y_train, loaded.y_val, loaded.y_test])
    for row, label in zip(x[:labelled], y[:labelled], strict=True):
        matches = np.flatnonzero((all_x == row.astype(np.float32)).all(axis=1))
        assert matches.size and label in all_y[matches]
