"""6-hour rollups: ingestion writes them, migration 0011 makes the same from stored hour
rows, and rolling ranges that start mid-day read them -- with the pooled answer."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from alembic import command
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.db import alembic_config, migrate
from server.drift.layout import Layout, unpack_counts, unpack_moments
from server.drift.report import Thresholds
from server.drift.rollups import device_table, fleet_table
from server.drift.service import Scope, drift_report
from server.drift.timerange import Period
from server.ingest.telemetry import store_reports
from shared.drift import compare, merge_sketches
from shared.latency import N_LATENCY_BUCKETS
from tests.server.drift.conftest import MODEL, T0, make_reference, report, sketch_of

pytestmark = pytest.mark.database

REFERENCE = make_reference()
LAYOUT = Layout.of_reference(REFERENCE)


def six_hour_rows(engine: Engine) -> dict[tuple[Any, ...], dict[str, Any]]:
    rows: dict[tuple[Any, ...], dict[str, Any]] = {}
    with Session(engine) as session:
        for table, per_device in ((device_table(), True), (fleet_table(), False)):
            columns = [c for c in table.c if c.name != "shard"]  # 0013's, read at 0011 too
            for row in session.execute(
                select(*columns).where(table.c.period == Period.SIX_HOURS.value)
            ).mappings():
                key = (
                    table.name,
                    row["reference_id"],
                    row["bucket_start"],
                    row["device_id"] if per_device else "",
                )
                rows[key] = dict(row)
    return rows


def test_the_migration_makes_the_6_hour_rows_ingestion_writes(engine: Engine) -> None:
    rng = np.random.default_rng(3)
    reports = [
        report(device, seq, T0 + timedelta(hours=seq * 2.5), sketch_of(REFERENCE, rng, 40 + seq))
        for device in ("a", "b")
        for seq in range(9)  # 20 hours: four 6-hour blocks, some with several windows
    ]
    reports.append(report("c", 0, T0 + timedelta(hours=7), None))  # no sketch: no counts
    with Session(engine) as session:
        store_reports(session, reports)
        session.commit()
    written = six_hour_rows(engine)
    assert len([k for k in written if k[0] == "drift_rollups"]) == 4 + 4 + 1
    command.downgrade(alembic_config(engine), "0010")  # before the 6-hour rows: deleted
    assert six_hour_rows(engine) == {}
    migrate(engine, "0011")
    rebuilt = six_hour_rows(engine)
    assert rebuilt.keys() == written.keys()
    for key, ours in written.items():
        theirs = rebuilt[key]
        for column in ("windows", "inferences", "errors"):
            assert theirs[column] == ours[column], (key, column)
        assert np.array_equal(
            unpack_counts(theirs["latency"], N_LATENCY_BUCKETS),
            unpack_counts(ours["latency"], N_LATENCY_BUCKETS),
        )
        assert (theirs["counts"] is None) == (ours["counts"] is None)
        if ours["counts"] is not None:
            assert np.array_equal(
                unpack_counts(theirs["counts"], LAYOUT.size),
                unpack_counts(ours["counts"], LAYOUT.size),
            )
            assert np.allclose(
                unpack_moments(theirs["moments"], LAYOUT.moment_rows),
                unpack_moments(ours["moments"], LAYOUT.moment_rows),
            )


@pytest.mark.parametrize("start_hour", [1, 3, 9, 12, 15, 23])
def test_a_rolling_day_from_any_hour_reads_few_rows_and_equals_the_pool(
    engine: Engine, start_hour: int
) -> None:
    rng = np.random.default_rng(start_hour)
    sketches = {}
    reports = []
    for device in ("a", "b", "c"):
        for hour in range(48):
            sketch = sketch_of(REFERENCE, rng, 30, {"f1": 2.0} if device == "c" else None)
            sketches[(device, hour)] = sketch
            reports.append(report(device, hour, T0 + timedelta(hours=hour), sketch, minutes=30))
    with Session(engine) as session:
        store_reports(session, reports)
        session.commit()
    since = T0 + timedelta(hours=start_hour)
    with Session(engine) as session:
        result = drift_report(
            session,
            reference=REFERENCE,
            model_name=MODEL,
            model_version=1,
            scope=Scope(None, None),
            since=since,
            until=since + timedelta(days=1),
            thresholds=Thresholds(min_samples=200),
        )
    inside = [s for (_, hour), s in sketches.items() if start_hour <= hour < start_hour + 24]
    pooled = compare(REFERENCE, merge_sketches(inside))
    assert [f.n for f in result.features] == [p.n for p in pooled]
    assert [f.psi for f in result.features] == [p.psi for p in pooled]
    assert result.devices.with_drift_data == 3
    assert result.devices.act == 1  # device c, on f1
    device_rows = sum(v for k, v in result.rows_read.items() if not k.startswith("fleet_"))
    assert device_rows <= 9 * 3  # at most 9 rows per device, where hour rows alone were 24
    if start_hour == 12:
        assert result.rows_read.get("6h") == 4 * 3 and "hour" not in result.rows_read
