"""Retention on a real database: old raw telemetry and hourly rollups go, daily rollups stay
longer; nothing deleted is ever counted again; queries over deleted hours say so."""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.drift.errors import TimeRangeError
from server.drift.models import DriftFleetRollup, DriftRollup, RetentionMark
from server.drift.retention import RetentionJob, RetentionPolicy, purge_expired
from server.drift.rollups import retention_marks
from server.errors import ConfigurationError
from server.ingest.models import IngestDrop, ModelWindowRecord, TelemetryRecord
from server.ingest.telemetry import store_reports
from tests.server.drift.conftest import T0, make_reference, report, sketch_of
from tests.server.drift.test_rollups import REFERENCE, assert_pooled, query

pytestmark = pytest.mark.database

NOW = T0 + timedelta(hours=12)
POLICY = RetentionPolicy(raw_days=1, hour_days=1, day_days=1)


def count(engine: Engine, table: type, *where: object) -> int:
    with Session(engine) as session:
        statement = select(func.count()).select_from(table)
        if where:
            statement = statement.where(*where)  # type: ignore[arg-type]
        return int(session.execute(statement).scalar_one())


@pytest.fixture
def history(engine: Engine) -> dict[int, tuple[datetime, object]]:
    """Three days of 30-minute windows from two devices, up to NOW."""
    rng = np.random.default_rng(11)
    sketches = {}
    reports = []
    moment, seq = T0 - timedelta(days=2), 0
    while moment < NOW:
        for device_id in ("a", "b"):
            sketch = sketch_of(REFERENCE, rng, 40)
            reports.append(report(device_id, seq, moment, sketch, minutes=30))
            sketches[seq] = (moment, sketch)
            seq += 1
        moment += timedelta(minutes=30)
    with Session(engine) as session:
        store_reports(session, reports)
        session.commit()
    return sketches


def purge(engine: Engine, now: datetime = NOW) -> None:
    with Session(engine) as session:
        purge_expired(session, policy=POLICY, now=now)
        session.commit()


def test_purge_deletes_each_tier_at_its_own_age(engine: Engine, history: dict) -> None:
    raw_mark, hour_mark, day_mark = (
        NOW - timedelta(days=1),
        NOW - timedelta(days=1),
        T0 - timedelta(days=1),
    )
    before = count(engine, TelemetryRecord)
    purge(engine)
    with Session(engine) as session:
        assert retention_marks(session) == {"raw": raw_mark, "hour": hour_mark, "day": day_mark}
    assert count(engine, TelemetryRecord, TelemetryRecord.window_end < raw_mark) == 0
    assert count(engine, ModelWindowRecord, ModelWindowRecord.window_end < raw_mark) == 0
    assert 0 < count(engine, TelemetryRecord) < before
    for table in (DriftRollup, DriftFleetRollup):
        assert count(engine, table, table.period == "hour", table.bucket_start < hour_mark) == 0
        assert count(engine, table, table.period == "hour") > 0
        assert count(engine, table, table.period == "day", table.bucket_start < day_mark) == 0
        # the day before yesterday's hours are gone, yesterday's day row is kept
        assert count(engine, table, table.period == "day", table.bucket_start == day_mark) > 0
    # marks only move forward
    purge(engine, now=NOW - timedelta(days=5))
    with Session(engine) as session:
        assert retention_marks(session)["raw"] == raw_mark


def test_queries_after_a_purge_widen_or_clip_and_stay_exact(engine: Engine, history: dict) -> None:
    purge(engine)

    def pooled(since: datetime, until: datetime) -> list:
        return [s for moment, s in history.values() if since <= moment < until]

    # yesterday as its day row, this morning from hour rows: not affected
    kept = query(engine, T0 - timedelta(days=1), NOW)
    assert not kept.widened and not kept.clipped
    assert_pooled(kept, pooled(T0 - timedelta(days=1), NOW))
    # from yesterday 03:00: those hours are deleted, so the whole day answers
    widened = query(engine, T0 - timedelta(hours=21), T0 + timedelta(hours=1))
    assert widened.widened and widened.since == T0 - timedelta(days=1)
    assert_pooled(widened, pooled(T0 - timedelta(days=1), T0 + timedelta(hours=1)))
    # the day before yesterday is deleted at every tier: the range starts later
    clipped = query(engine, T0 - timedelta(days=2), T0)
    assert clipped.clipped and clipped.since == T0 - timedelta(days=1)
    assert_pooled(clipped, pooled(T0 - timedelta(days=1), T0))


def test_a_replayed_report_older_than_the_mark_is_not_counted_twice(
    engine: Engine, history: dict
) -> None:
    purge(engine)
    before = query(engine, T0 - timedelta(days=1), T0)
    rng = np.random.default_rng(1)
    old = report("a", 0, T0 - timedelta(days=1, hours=-1), sketch_of(REFERENCE, rng, 500))
    replay = report("a", 2, T0 - timedelta(days=1), sketch_of(REFERENCE, rng, 500))
    fresh = report("a", 10_000, NOW, sketch_of(REFERENCE, rng, 40), minutes=30)
    with Session(engine) as session:
        assert store_reports(session, [old, replay, fresh]) == 1
        session.commit()
    after = query(engine, T0 - timedelta(days=1), T0)
    assert after.features == before.features and after.sla == before.sla
    with Session(engine) as session:
        drop = session.get(IngestDrop, ("a", "expired"))
        assert drop is not None and drop.count == 2 and "retention mark" in drop.last_detail
    assert count(engine, TelemetryRecord, TelemetryRecord.seq == 10_000) == 1


def test_an_hourly_series_before_the_hour_mark_is_refused(engine: Engine, history: dict) -> None:
    from server.drift.report import Thresholds
    from server.drift.service import Scope, timeseries_report

    purge(engine)
    with Session(engine) as session, pytest.raises(TimeRangeError, match="bucket=day"):
        timeseries_report(
            session,
            reference=REFERENCE,
            model_name="sensor",
            model_version=1,
            scope=Scope(None, None),
            since=T0 - timedelta(days=1),
            until=T0 - timedelta(hours=20),
            features=None,
            bucket="hour",
            thresholds=Thresholds(),
        )


def test_policy_from_the_setting() -> None:
    assert RetentionPolicy.from_days({}) == RetentionPolicy(raw_days=7, hour_days=30, day_days=400)
    assert RetentionPolicy.from_days({"raw": 3}).raw_days == 3
    with pytest.raises(ConfigurationError, match="unknown tier"):
        RetentionPolicy.from_days({"weekly": 3})
    with pytest.raises(ConfigurationError, match="hour must be a whole number of days >= 1"):
        RetentionPolicy.from_days({"hour": 0})


def test_the_job_purges_on_its_thread(engine: Engine, history: dict) -> None:
    job = RetentionJob(engine, policy=POLICY, interval=3600, clock=lambda: NOW)
    job.start()
    try:
        deadline = time.monotonic() + 10
        while job.runs == 0:  # a thread gives no event to wait on: poll its counter
            assert time.monotonic() < deadline, "the job never ran"
            time.sleep(0.01)
    finally:
        job.stop()
    assert job.last is not None and job.last.hour_rows > 0 and job.last.reports > 0
    with Session(engine) as session:
        marks = session.execute(select(RetentionMark)).scalars().all()
    assert {m.tier for m in marks} == {"raw", "hour", "day"}
    assert make_reference().reference_id == REFERENCE.reference_id
