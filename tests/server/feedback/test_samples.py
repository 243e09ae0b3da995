"""Samples in the database: stored once, purged after their retention, and turned into a
dataset version only with labels the dataset knows and rows of its width."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.artifacts import ArtifactStore
from server.feedback.service import record_feedback
from server.samples.errors import SamplesInvalidError, SamplesNotFoundError
from server.samples.ingest import SamplesConsumer
from server.samples.models import SampleBatchRecord
from server.samples.service import add_samples_version, samples_summary
from shared.messages import SampleBatch
from tests.server.feedback.conftest import MODEL, T0, add_fleet, add_model, outcome

pytestmark = pytest.mark.database


def batch(
    device: str, seq: int, ids: list[str | None], *, width: int = 4, minutes: float = 0
) -> SampleBatch:
    return SampleBatch(
        device_id=device,
        seq=seq,
        model_name=MODEL,
        model_version=1,
        target="edge-x86_64-litert",
        window_end=T0 + timedelta(minutes=minutes),
        rows=(np.arange(len(ids) * width).reshape(len(ids), width) / 3).tolist(),
        prediction_ids=ids,
    )


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")


@pytest.fixture
def seeded(engine: Engine, store: ArtifactStore) -> Engine:
    with Session(engine) as session:
        add_model(session, store)
        add_fleet(session)
    return engine


def batches(engine: Engine) -> int:
    with Session(engine) as session:
        return int(
            session.execute(select(func.count()).select_from(SampleBatchRecord)).scalar_one()
        )


def test_the_consumer_stores_once_and_purges_what_outlived_its_retention(seeded: Engine) -> None:
    consumer = SamplesConsumer(retention=timedelta(days=2))
    new = batch("a-0", 2, ["p-2"])
    with Session(seeded) as session:
        result = consumer.store(session, [new, new], now=T0)
        session.commit()
    assert (result.stored, result.duplicates, batches(seeded)) == (1, 1, 1)
    with Session(seeded) as session:  # a batch from a window three days back comes late
        late = batch("a-0", 1, ["p-1"], minutes=-3 * 24 * 60)
        consumer.store(session, [late], now=T0 + timedelta(minutes=30))
        session.commit()
    assert batches(seeded) == 2  # purged at most once an hour
    with Session(seeded) as session:
        consumer.store(session, [batch("a-1", 4, ["p-4"])], now=T0 + timedelta(hours=1))
        session.commit()
    assert (batches(seeded), consumer.purged) == (2, 1)  # the three-day-old one went
    with pytest.raises(ValueError, match="positive"):
        SamplesConsumer(retention=timedelta(0))


def test_only_rows_the_dataset_can_take_are_added_and_the_rest_is_accounted_for(
    seeded: Engine, store: ArtifactStore
) -> None:
    with Session(seeded) as session:
        SamplesConsumer().store(
            session,
            [
                batch("a-0", 1, ["p-1", "p-2", "p-3", None]),
                batch("a-1", 1, ["p-1", "p-2"], width=5),  # another model's width: refused
            ],
            now=T0,
        )
        record_feedback(
            session,
            [
                outcome("a-0", "p-1", "ok", "dent"),
                outcome("a-0", "p-2", "ok", "ok"),
                outcome("a-1", "p-1", "ok", "ok"),
                outcome("a-1", "p-2", "ok", "dent"),
            ],
            now=T0,
        )
        session.commit()
    with Session(seeded) as session:
        summary = samples_summary(
            session, model=MODEL, version=None, group=None, devices=None, since="30d",
            until=None, now=T0 + timedelta(hours=1),
        )  # fmt: skip
        assert (summary.rows, summary.labelled_rows, summary.unlabelled_rows) == (6, 4, 1)
        assert summary.rows_without_prediction_id == 1
        result = add_samples_version(
            session, store=store, model=MODEL, version="1", group=None, devices=["a-0", "a-1"],
            since="30d", until=None, base="parts-data@1", split_seed=3, now=T0 + timedelta(hours=1),
        )  # fmt: skip
    assert (result.version, result.added_rows, result.rows) == (2, 2, 62)
    assert result.lineage["refused_rows"] == {"feature_count": 2, "label_not_in_dataset": 0}
    assert result.lineage["devices"] == ["a-0"]  # a-1's rows did not fit: it gave nothing
    assert result.lineage["scope"] == {"group": None, "devices": ["a-0", "a-1"]}
    with Session(seeded) as session:
        for kwargs, error, message in (
            ({"model": "nope"}, SamplesNotFoundError, "no model named 'nope'"),
            ({"base": "nope@1"}, SamplesNotFoundError, "no dataset named 'nope'"),
            ({"devices": ["b-0"]}, SamplesInvalidError, "none of the 0 sample rows"),
            ({"since": "soon"}, SamplesInvalidError, "since='soon'"),
        ):
            arguments = {
                "store": store, "model": MODEL, "version": None, "group": None, "devices": None,
                "since": "30d", "until": None, "base": None, "split_seed": 0,
                "now": T0 + timedelta(hours=1),
            }  # fmt: skip
            with pytest.raises(error, match=message):
                add_samples_version(session, **{**arguments, **kwargs})  # type: ignore[arg-type]
