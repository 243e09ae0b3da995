"""Feedback in the database: one label per prediction, validated against the model's labels,
and accuracy per version, device list and time range that equals counting by hand."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from server.artifacts import ArtifactStore
from server.feedback.errors import (
    FeedbackConflictError,
    FeedbackInvalidError,
    FeedbackNotFoundError,
)
from server.feedback.models import FeedbackRecord, FeedbackSource
from server.feedback.service import (
    accuracy,
    accuracy_by_version,
    accuracy_report,
    record_feedback,
    store_device_feedback,
)
from tests.server.feedback.conftest import (
    LABELS,
    MODEL,
    T0,
    add_device,
    add_fleet,
    add_model,
    outcome,
)

pytestmark = pytest.mark.database


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")


@pytest.fixture
def seeded(engine: Engine, store: ArtifactStore) -> Engine:
    with Session(engine) as session:
        add_model(session, store)
        add_fleet(session)
    return engine


def rows(engine: Engine) -> list[FeedbackRecord]:
    with Session(engine) as session:
        return list(session.exec(select(FeedbackRecord)).all())


def test_a_label_is_stored_once_and_another_one_is_a_conflict(seeded: Engine) -> None:
    first = outcome("a-0", "p-1", "ok", "dent")
    with Session(seeded) as session:
        ((record, created),) = record_feedback(session, [first], now=T0)
        session.commit()
        assert created and record.correct is False and record.source == "api"
        assert record.at == first.predicted_at
    with Session(seeded) as session:  # the same again: idempotent
        ((record, created),) = record_feedback(session, [first], now=T0)
        session.commit()
        assert not created and record.true_label == "dent"
    with Session(seeded) as session, pytest.raises(FeedbackConflictError, match="first label"):
        record_feedback(session, [outcome("a-0", "p-1", "ok", "scratch")], now=T0)
    assert [(r.prediction_id, r.true_label) for r in rows(seeded)] == [("p-1", "dent")]


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (outcome("a-0", "p-9", "ok", "crack"), FeedbackInvalidError, "'crack' is not a label"),
        (outcome("a-0", "p-9", "bent", "ok"), FeedbackInvalidError, "predicted_label 'bent'"),
        (outcome("a-0", "p-9", "ok", "ok", version=7), FeedbackNotFoundError, "no version"),
        (outcome("nobody", "p-9", "ok", "ok"), FeedbackNotFoundError, "no device 'nobody'"),
        (outcome("a-0", "p-1", "ok", "ok"), FeedbackInvalidError, "twice"),
    ],
)
def test_a_bad_item_refuses_the_whole_request_and_names_the_problem(
    seeded: Engine, bad: object, error: type[Exception], message: str
) -> None:
    good = outcome("a-0", "p-1", "ok", "ok")
    with Session(seeded) as session, pytest.raises(error, match=message):
        record_feedback(session, [good, bad], now=T0)  # type: ignore[list-item]
    assert rows(seeded) == []


def test_a_regression_model_takes_no_feedback(engine: Engine, store: ArtifactStore) -> None:
    with Session(engine) as session:
        add_model(session, store)
        add_device(session, "a-0")
        session.commit()
    with Session(engine) as session:  # a regression dataset behind the version
        from server.datasets.ingest import from_arrays
        from server.datasets.service import add_dataset_version
        from server.models import Model, ModelVersion

        values = np.linspace(0, 1, 20)
        parsed = from_arrays(values[:, None], values, label="y", task="regression")
        dataset = add_dataset_version(session, store=store, name="levels", parsed=parsed)
        model = Model(name="level", task="regression")
        session.add(model)
        session.flush()
        session.add(
            ModelVersion(
                model_id=model.id,  # type: ignore[arg-type]
                version=1,
                source="trained",
                dataset_version_id=dataset.id,  # type: ignore[arg-type]
                keras_sha256="0" * 64,
            )
        )
        session.commit()
    from server.feedback.service import FeedbackInput

    regression = FeedbackInput(
        device_id="a-0",
        prediction_id="p-1",
        model_name="level",
        model_version=1,
        predicted_label="0.5",
        true_label="0.4",
        labelled_at=T0,
    )
    with Session(engine) as session, pytest.raises(FeedbackInvalidError, match="not a classif"):
        record_feedback(session, [regression], now=T0)


def test_accuracy_equals_counting_by_hand_per_version_devices_and_range(seeded: Engine) -> None:
    rng = np.random.default_rng(7)
    devices = ["a-0", "a-1", "a-2", "b-0", "b-1"]
    items = []
    for i in range(400):
        predicted, true = rng.choice(LABELS), rng.choice(LABELS)
        if rng.random() < 0.5:
            true = predicted
        items.append(
            outcome(
                devices[i % 5],
                f"p-{i}",
                str(predicted),
                str(true),
                version=1 + i % 2,
                minutes=float(rng.integers(0, 600)),
                predicted_at=bool(i % 7),  # some only know when they were labelled
            )
        )
    with Session(seeded) as session:
        record_feedback(session, items, now=T0)
        session.commit()

    def by_hand(
        version: int, ids: list[str] | None, since: object, until: object
    ) -> tuple[int, int]:
        chosen = [
            o
            for o in items
            if o.model_version == version
            and (ids is None or o.device_id in ids)
            and since <= (o.predicted_at or o.labelled_at) < until  # type: ignore[operator]
        ]
        return sum(o.predicted_label == o.true_label for o in chosen), len(chosen)

    with Session(seeded) as session:
        for version in (1, 2):
            for ids in (None, ["a-0", "a-1", "a-2"], ["b-1"], []):
                for since, until in (
                    (T0 - timedelta(days=1), T0 + timedelta(days=1)),
                    (T0 + timedelta(hours=1), T0 + timedelta(hours=3, minutes=17)),
                ):
                    got = accuracy(
                        session,
                        model_name=MODEL,
                        model_version=version,
                        device_ids=ids,
                        since=since,
                        until=until,
                    )
                    assert got == by_hand(version, ids, since, until), (version, ids, since)
        whole = (T0 - timedelta(days=1), T0 + timedelta(days=1))
        assert accuracy_by_version(
            session, model_name=MODEL, device_ids=None, since=whole[0], until=whole[1]
        ) == {v: by_hand(v, None, *whole) for v in (1, 2)}
        # a device list longer than one query takes gives the same answer
        many = [f"x-{i}" for i in range(12_000)] + devices
        assert accuracy(
            session,
            model_name=MODEL,
            model_version=1,
            device_ids=many,
            since=whole[0],
            until=whole[1],
        ) == by_hand(1, None, *whole)

        report = accuracy_report(
            session,
            model=MODEL,
            version="1",
            group="line-a",
            devices=None,
            since="2026-11-01T00:00:00Z",
            until="2026-11-03T00:00:00Z",
            now=T0,
        )
    expected = by_hand(1, ["a-0", "a-1", "a-2"], *whole)
    assert (report.overall.correct, report.overall.total) == expected
    assert report.devices_in_scope == 3 and report.group == "line-a"
    assert sum(label.total for label in report.labels) == expected[1]
    assert {label.label for label in report.labels} <= set(LABELS)


def test_device_feedback_keeps_the_valid_outcomes_and_refuses_the_rest(seeded: Engine) -> None:
    with Session(seeded) as session:
        record_feedback(session, [outcome("a-0", "p-1", "ok", "ok")], now=T0)
        session.commit()
    batch = [
        outcome("a-0", "p-1", "ok", "ok"),  # stored before: a duplicate
        outcome("a-0", "p-1", "ok", "ok"),  # twice in the batch
        outcome("a-0", "p-2", "ok", "dent"),
        outcome("a-1", "p-2", "dent", "dent"),  # same prediction id, another device: its own
        outcome("a-0", "p-3", "ok", "crack"),
        outcome("a-0", "p-4", "ok", "ok", version=9),
    ]
    batch.append(outcome("a-0", "p-1", "ok", "scratch"))
    with Session(seeded) as session:
        result = store_device_feedback(session, batch, now=T0)
        session.commit()
    assert (result.stored, result.duplicates) == (2, 2)
    assert sorted((r.prediction_id, r.reason) for r in result.refused) == [
        ("p-1", "feedback_conflict"),
        ("p-3", "bad_label"),
        ("p-4", "unknown_model"),
    ]
    stored = {(r.device_id, r.prediction_id): r for r in rows(seeded)}
    assert set(stored) == {("a-0", "p-1"), ("a-0", "p-2"), ("a-1", "p-2")}
    assert stored[("a-0", "p-2")].source == FeedbackSource.DEVICE.value
    with Session(seeded) as session:
        conflict = store_device_feedback(session, [outcome("a-0", "p-2", "ok", "scratch")], now=T0)
    assert [r.reason for r in conflict.refused] == ["feedback_conflict"]
