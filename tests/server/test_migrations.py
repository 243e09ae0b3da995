"""Alembic migrations: an empty database to head, and the previous release's database --
with data in it -- upgraded to head without losing a row; the newest migrations step back
down (or refuse to, saying so).

Runs on SQLite and, when ``EDGEFLEET_TEST_DATABASE_URL`` is set, on that database too
(``db_url`` in ``tests/server/conftest.py``).

The previous release's rows go in through raw SQL against *its* schema, as that release
wrote them -- never through today's models, which follow head -- and are read back after
the upgrade through today's models and services.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from alembic import command
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, func, inspect, text
from sqlalchemy import select as sql_select
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session, SQLModel, col, select

import server.models  # noqa: F401  (every table on the metadata)
from server import registry
from server.alerts.rules import OfflineCondition
from server.alerts.service import get_alert, get_rule, rule_condition
from server.db import alembic_config, create_db_engine, migrate
from server.drift.layout import (
    Layout,
    merge_moment_stack,
    pack_counts,
    pack_moments,
    unpack_counts,
    unpack_moments,
)
from server.drift.models import DriftFleetRollup, DriftLayout, DriftRollup
from server.feedback.models import FeedbackRecord
from server.fleet.devices import get_device
from server.fleet.groups import get_group, group_device_ids
from server.ingest.models import ModelWindowRecord, TelemetryRecord
from server.models import DatasetVersion, TrainingRun
from server.rollouts.core import DeviceOutcome, RolloutKind, RolloutStatus
from server.rollouts.models import RolloutRecord
from server.rollouts.service import get_rollout
from shared.latency import N_LATENCY_BUCKETS

pytestmark = pytest.mark.database

PREVIOUS_RELEASE = "0008"
"""The head of the last release (the schema users upgrade from). Move it to this
release's head when this release ships; migrations added meanwhile (0009 operator
tokens, ...) are what the upgrade test runs."""

T0 = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)
HOUR = T0.replace(minute=0)
REFERENCE = "7" * 64

SPEC_JSON = (
    '{"rollout_id":"pumps-2-line-a-1","model_name":"pumps","model_version":2,"group":"line-a",'
    '"phases":[{"percent":50.0,"count":null,"approval_required":false,"wait":null,"gates":null},'
    '{"percent":100.0,"count":null,"approval_required":false,"wait":null,"gates":null}],'
    '"wait_between_phases":"PT10M","max_devices_per_minute":60,"device_timeout":"PT30M",'
    '"retry":{"max_attempts":3,"backoff_initial":"PT1M","backoff_max":"PT30M"},'
    '"on_breach":"pause","gates":{"max_activation_failure_rate":0.1,"min_outcomes":1,'
    '"max_error_rate":0.01,"max_latency_sla_ratio":1.0,"max_confidence_drop":0.05,'
    '"max_prediction_psi":0.25,"min_inferences":200,"require_evidence":true},"start_at":null}'
)
"""A rollout spec as release 0008 stored it."""

STATE_JSON = (
    '{"status":"running","status_reason":null,"status_changed_at":"2026-11-20T10:00:00Z",'
    '"created_at":"2026-11-20T10:00:00Z","started_at":"2026-11-20T10:00:00Z",'
    '"finished_at":null,"phase":0,"phase_started_at":"2026-11-20T10:00:00Z",'
    '"phase_settled_at":null,"approved_phase":null,"gate_override_phase":null,'
    '"devices":{"pump-0001":{"device_id":"pump-0001","profile":"edge-arm64-litert",'
    '"phase":0,"targeted_at":"2026-11-20T10:00:00Z","attempts":1,"previous_version":1,'
    '"last_heard_at":null,"next_retry_at":null,"outcome":"activated",'
    '"outcome_at":"2026-11-20T10:00:00Z","reason":null,"detail":null,"confirmed_at":null,'
    '"install_window":null,"staged_at":null}},"recent_targeting":[],"gate_report":null}'
)

LAYOUT_JSON = (
    '{"features":[["temp",5],["vib",5]],"class_counts":2,"confidence_counts":null,'
    '"value_slots":null}'
)
"""Two features of 5 count slots each and two classes: 12 counts, 2 moment rows."""

DEVICE_COUNTS = [3, 10, 40, 9, 2, 0, 12, 30, 20, 1, 41, 23]
DEVICE_MOMENTS = [[64.0, 0.5, 60.0, -2.0, 3.0], [64.0, -0.1, 70.0, -3.0, 2.5]]
LATENCY = [0] * N_LATENCY_BUCKETS
LATENCY[3] = 60
LATENCY[4] = 4


def head_revision(engine: Engine) -> str:
    head = ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def newer_revisions(engine: Engine) -> list[str]:
    """Revisions after PREVIOUS_RELEASE, newest first."""
    script = ScriptDirectory.from_config(alembic_config(engine))
    newer = [r.revision for r in script.iterate_revisions("heads", PREVIOUS_RELEASE)]
    return [r for r in newer if r != PREVIOUS_RELEASE]  # the lower bound is left out already


@pytest.fixture
def db(db_url: str) -> Iterator[Engine]:
    engine = create_db_engine(db_url)
    yield engine
    engine.dispose()


# ----------------------------------------------------------------------------- the old rows


def _ts(connection: Connection, moment: datetime) -> Any:
    """A timestamp as the release stored it: naive UTC text on SQLite, aware elsewhere."""
    if connection.dialect.name == "sqlite":
        return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return moment


def _insert(connection: Connection, table: str, **values: Any) -> None:
    values = {k: _ts(connection, v) if isinstance(v, datetime) else v for k, v in values.items()}
    columns = ", ".join(f'"{k}"' for k in values)
    params = ", ".join(f":{k}" for k in values)
    statement = f"INSERT INTO {table} ({columns}) VALUES ({params})"  # noqa: S608 - our names
    connection.execute(text(statement), values)


def _blob(values: list[int]) -> bytes:
    return np.asarray(values, dtype="<i2").tobytes()  # the release packed small counts as int16


def insert_previous_release_rows(engine: Engine) -> None:
    """Representative rows in every main table, as release PREVIOUS_RELEASE wrote them."""
    with engine.begin() as c:
        _insert(
            c,
            "datasets",
            id=1,
            name="pumps",
            task="classification",
            label="state",
            description="pump readings",
            created_at=T0,
        )
        _insert(
            c,
            "dataset_versions",
            id=1,
            dataset_id=1,
            version=1,
            sha256="a" * 64,
            source_sha256="b" * 64,
            source_format="csv",
            source_name="pumps.csv",
            rows=1200,
            data_schema_json='{"task":"classification","label":"state"}',
            splits_sha256="c" * 64,
            split_seed=7,
            lineage_json="{}",
            created_at=T0,
        )
        _insert(
            c,
            "models",
            id=1,
            name="pumps",
            task="classification",
            description="",
            gates_json='{"max_metric_drop":0.01}',
            created_at=T0,
        )
        for version in (1, 2):
            _insert(
                c,
                "model_versions",
                id=version,
                model_id=1,
                version=version,
                source="trained",
                dataset_version_id=1,
                run_id=None,
                keras_sha256=f"{version}" * 64,
                status="ready",
                metrics_json='{"accuracy":0.9' + str(version) + "}",
                preprocessing_json="[]",
                notes="",
                error=None,
                created_at=T0 + timedelta(minutes=version),
            )
        _insert(
            c, "model_aliases", model_id=1, alias="production", model_version_id=2, updated_at=T0
        )
        _insert(
            c,
            "target_artifacts",
            id=1,
            model_version_id=2,
            target="edge-arm64-litert",
            format="tflite",
            quantization="int8",
            runtime="litert",
            bundle_sha256="d" * 64,
            bundle_length=40_960,
            model_sha256="e" * 64,
            size_bytes=38_000,
            metric_name="accuracy",
            metric_value=0.92,
            metric_delta=-0.002,
            latency_p50_ms=0.041,
            metrics_json="{}",
            ops_json='[["FULLY_CONNECTED",12]]',
            gate_passed=True,
            gate_reasons_json="[]",
            error=None,
            created_at=T0,
        )
        _insert(
            c,
            "training_runs",
            id=1,
            model_name="pumps",
            dataset_version_id=1,
            status="succeeded",
            phase="done",
            spec_json='{"arch":"mlp"}',
            progress_json="{}",
            history_json="[]",
            metrics_json='{"accuracy":0.92}',
            environment_json="{}",
            error=None,
            cancel_requested=False,
            worker="w-1",
            model_version_id=2,
            created_at=T0,
            started_at=T0,
            finished_at=T0 + timedelta(minutes=3),
        )
        _insert(
            c,
            "device_groups",
            id=1,
            name="line-a",
            kind="static",
            selector=None,
            maintenance_window=None,
            description="",
            created_at=T0,
        )
        _insert(
            c,
            "device_groups",
            id=2,
            name="berlin-arm",
            kind="dynamic",
            selector="profile=edge-arm64-litert and site=berlin",
            maintenance_window=None,
            description="",
            created_at=T0,
        )
        _insert(
            c,
            "provisioning_tokens",
            id="tok-line-a",
            secret_hash="f" * 64,
            name="line-a",
            group_id=1,
            profile="edge-arm64-litert",
            expires_at=T0 + timedelta(days=7),
            max_uses=10,
            uses=2,
            auto_accept=True,
            revoked=False,
            created_at=T0,
        )
        for i, status in ((1, "accepted"), (2, "pending")):
            _insert(
                c,
                "devices",
                id=f"pump-000{i}",
                status=status,
                profile="edge-arm64-litert",
                arch="arm64",
                runtime_name="litert",
                runtime_version="2.3.0",
                runtimes_json='{"litert":"2.3.0"}',
                agent_version="0.9.0",
                tags_json='{"site":"berlin"}',
                models_json='[{"name":"pumps","version":2}]' if i == 1 else "[]",
                manifest_version=5 if i == 1 else 0,
                keyring_version=1,
                last_update_json=None,
                last_event_json=None,
                state_reported_at=T0,
                presence_session_at=None,
                online=i == 1,
                last_seen=T0,
                enrolled_at=T0,
                accepted_at=T0 if i == 1 else None,
                status_changed_at=T0,
                token_id="tok-line-a",
            )
        _insert(
            c,
            "device_credentials",
            id=1,
            device_id="pump-0001",
            username="pump-0001",
            password_hash="$7$101$salt$hash",
            created_at=T0,
            revoked_at=None,
        )
        _insert(c, "group_members", group_id=1, device_id="pump-0001", added_at=T0)
        for seq in (1, 2, 3):
            start = T0 + timedelta(minutes=seq)
            _insert(
                c,
                "telemetry_reports",
                device_id="pump-0001",
                seq=seq,
                window_start=start,
                window_end=start + timedelta(minutes=1),
                received_at=start + timedelta(minutes=1, seconds=1),
                dropped_reports=0,
                rss_bytes=60 * 2**20,
                cpu_seconds=1.5,
            )
            _insert(
                c,
                "model_windows",
                id=seq,
                device_id="pump-0001",
                seq=seq,
                model_name="pumps",
                model_version=2,
                target="edge-arm64-litert",
                window_start=start,
                window_end=start + timedelta(minutes=1),
                inferences=64,
                errors=seq - 1,
                latency_json='{"counts":[0,0,0,60,4]}',
                drift_json=None,
            )
        _insert(
            c,
            "ingest_drops",
            device_id="pump-0002",
            reason="unknown_device",
            count=4,
            last_at=T0,
            last_detail="not accepted",
        )
        _insert(
            c,
            "rollouts",
            id="pumps-2-line-a-1",
            model_name="pumps",
            model_version=2,
            model_version_id=2,
            group_name="line-a",
            group_id=1,
            status="running",
            phase=0,
            spec_json=SPEC_JSON,
            state_json=STATE_JSON,
            revision=3,
            created_at=T0,
            updated_at=T0,
        )
        _insert(
            c,
            "issued_manifests",
            id=1,
            device_id="pump-0001",
            manifest_version=5,
            rollout_id="pumps-2-line-a-1",
            reason="rollout",
            content_digest="9" * 64,
            keyring_version=1,
            deployments_json="[]",
            artifacts_json="[]",
            payload=b'{"payloadType":"x"}',
            issued_at=T0,
            expires_at=T0 + timedelta(days=7),
            sent_at=T0,
        )
        _insert(
            c,
            "device_events",
            id=1,
            event_id="ev-0001",
            device_id="pump-0001",
            kind="activated",
            at=T0,
            received_at=T0,
            manifest_version=5,
            rollout_id="pumps-2-line-a-1",
            model_name="pumps",
            model_version=2,
            sha256="d" * 64,
            reason=None,
            detail=None,
        )
        _insert(c, "drift_layouts", reference_id=REFERENCE, layout_json=LAYOUT_JSON, created_at=T0)
        moments = np.asarray(DEVICE_MOMENTS, dtype="<f8").tobytes()
        _insert(
            c,
            "drift_rollups",
            model_name="pumps",
            model_version=2,
            reference_id=REFERENCE,
            period="hour",
            bucket_start=HOUR,
            device_id="pump-0001",
            windows=3,
            inferences=192,
            errors=3,
            latency=_blob(LATENCY),
            counts=_blob(DEVICE_COUNTS),
            moments=moments,
        )
        _insert(
            c,
            "drift_fleet_rollups",
            model_name="pumps",
            model_version=2,
            reference_id=REFERENCE,
            period="hour",
            bucket_start=HOUR,
            windows=3,
            inferences=192,
            errors=3,
            latency=_blob(LATENCY),
            counts=_blob(DEVICE_COUNTS),
            moments=moments,
        )
        _insert(
            c,
            "alert_rules",
            id=1,
            name="line-a-offline",
            kind="offline",
            model_name=None,
            group_name="line-a",
            condition_json='{"kind":"offline","offline_for":"PT15M","min_devices":1}',
            severity="warning",
            enabled=True,
            webhook_url=None,
            description="",
            created_at=T0,
            updated_at=T0,
            last_evaluated_at=T0,
            last_error=None,
        )
        _insert(
            c,
            "alerts",
            id=1,
            rule_id=1,
            rule_name="line-a-offline",
            kind="offline",
            severity="warning",
            subject="group line-a",
            open_key="line-a",
            model_name=None,
            model_version=None,
            group_name="line-a",
            status="open",
            opened_at=T0,
            resolved_at=None,
            last_evaluated_at=T0,
            value=1.0,
            threshold=1.0,
            summary="1 device offline for 15 min",
            evidence_json='{"devices":["pump-0002"]}',
            latest_json="{}",
            resolution=None,
        )
        _insert(
            c,
            "feedback",
            device_id="pump-0001",
            prediction_id="pred-1",
            model_name="pumps",
            model_version=2,
            predicted_label="ok",
            true_label="fault",
            correct=False,
            predicted_at=T0,
            labelled_at=T0,
            at=T0,
            source="server",
            received_at=T0,
        )


def row_counts(engine: Engine, tables: list[str]) -> dict[str, int]:
    metadata = MetaData()
    metadata.reflect(engine, only=tables)
    with engine.connect() as connection:
        return {  # reflection also brings in tables a foreign key names: count only ours
            name: int(connection.execute(sql_select(func.count()).select_from(table)).scalar_one())
            for name, table in metadata.tables.items()
            if name in tables
        }


def check_readable_through_todays_code(engine: Engine) -> None:
    """Every row inserted by insert_previous_release_rows, read through today's code."""
    with Session(engine) as session:
        production = registry.get_version(session, model_name="pumps", version="production")
        assert (production.version, production.status) == (2, "ready")
        (artifact,) = registry.list_artifacts(session, version=production)
        assert (artifact.target, artifact.gate_passed, artifact.size_bytes) == (
            "edge-arm64-litert",
            True,
            38_000,
        )
        assert artifact.created_at == T0
        dataset_version = session.get(DatasetVersion, 1)
        assert dataset_version is not None and dataset_version.rows == 1200
        run = session.get(TrainingRun, 1)
        assert run is not None and run.finished_at == T0 + timedelta(minutes=3)

        device = get_device(session, device_id="pump-0001")
        assert device.tags == {"site": "berlin"} and device.runtimes == {"litert": "2.3.0"}
        assert device.models == [{"name": "pumps", "version": 2}] and device.online
        assert device.last_seen == T0
        assert group_device_ids(session, get_group(session, name="line-a")) == ["pump-0001"]
        dynamic = group_device_ids(session, get_group(session, name="berlin-arm"))
        assert dynamic == ["pump-0001"]  # the pending one is not a member

        rollout = get_rollout(session, rollout_id="pumps-2-line-a-1")
        assert rollout.state.status == RolloutStatus.RUNNING
        assert [p.percent for p in rollout.spec.phases] == [50.0, 100.0]
        assert rollout.state.devices["pump-0001"].outcome == DeviceOutcome.ACTIVATED
        # 0010: a rollout stored before agent rollouts existed is a model rollout.
        assert rollout.kind is RolloutKind.MODEL and rollout.spec.agent_version is None
        record = session.get(RolloutRecord, "pumps-2-line-a-1")
        assert record is not None and (record.kind, record.agent_release_id) == ("model", None)

        reports = session.exec(select(TelemetryRecord).order_by(col(TelemetryRecord.seq))).all()
        assert [r.seq for r in reports] == [1, 2, 3]
        assert reports[0].window_end == T0 + timedelta(minutes=2)
        windows = session.exec(select(ModelWindowRecord)).all()
        assert sorted(w.errors for w in windows) == [0, 1, 2]

        layout_row = session.get(DriftLayout, REFERENCE)
        assert layout_row is not None
        layout = Layout.from_json(layout_row.layout_json)
        for model in (DriftRollup, DriftFleetRollup):
            (rollup,) = session.exec(select(model).where(model.period == "hour")).all()
            assert (rollup.windows, rollup.inferences, rollup.bucket_start) == (3, 192, HOUR)
            # 0011's 6-hour row (06:00-12:00) holds what the hour row holds.
            (six,) = session.exec(select(model).where(model.period == "6h")).all()
            assert six.bucket_start == HOUR.replace(hour=6)
            assert (six.windows, six.inferences) == (rollup.windows, rollup.inferences)
            assert (six.counts, six.latency, six.moments) == (
                rollup.counts,
                rollup.latency,
                rollup.moments,
            )
            assert unpack_counts(rollup.latency, N_LATENCY_BUCKETS).tolist() == LATENCY
            assert unpack_counts(rollup.counts, layout.size).tolist() == DEVICE_COUNTS
            moments = unpack_moments(rollup.moments, layout.moment_rows)
            assert moments.tolist() == DEVICE_MOMENTS
            sketch = layout.to_sketch(REFERENCE, unpack_counts(rollup.counts, layout.size), moments)
            assert [f.name for f in sketch.features] == ["temp", "vib"]

        alert = get_alert(session, alert_id=1)
        assert (alert.status, alert.group_name, alert.opened_at) == ("open", "line-a", T0)
        condition = rule_condition(get_rule(session, name="line-a-offline"))
        assert isinstance(condition, OfflineCondition)
        assert condition.offline_for == timedelta(minutes=15)

        feedback = session.get(FeedbackRecord, ("pump-0001", "pred-1"))
        assert feedback is not None and feedback.correct is False


# ----------------------------------------------------------------------------- the tests


def test_an_empty_database_migrates_to_head(db: Engine) -> None:
    assert current_revision(db) is None
    migrate(db)
    assert current_revision(db) == head_revision(db)
    tables = set(inspect(db).get_table_names())
    assert set(SQLModel.metadata.tables) <= tables, set(SQLModel.metadata.tables) - tables


def test_the_previous_release_is_an_ancestor_of_head(db: Engine) -> None:
    """PREVIOUS_RELEASE names a real revision on head's line (a typo would skip the test)."""
    script = ScriptDirectory.from_config(alembic_config(db))
    chain = [r.revision for r in script.iterate_revisions("heads", "base")]
    assert PREVIOUS_RELEASE in chain
    assert chain[-1] == "0001"


def test_the_previous_release_upgrades_to_head_keeping_every_row(db: Engine) -> None:
    migrate(db, PREVIOUS_RELEASE)
    assert current_revision(db) == PREVIOUS_RELEASE
    old_tables = [t for t in inspect(db).get_table_names() if t != "alembic_version"]
    insert_previous_release_rows(db)
    before = row_counts(db, old_tables)
    assert sum(before.values()) >= 30 and all(before[t] > 0 for t in ("devices", "rollouts"))

    migrate(db)

    assert current_revision(db) == head_revision(db)
    # Every row kept; 0011 adds the 6-hour tier, built from the stored hour rows.
    backfilled = {"drift_rollups": 1, "drift_fleet_rollups": 1}
    assert row_counts(db, old_tables) == {t: n + backfilled.get(t, 0) for t, n in before.items()}
    check_readable_through_todays_code(db)


def test_the_newest_migrations_step_down_to_the_previous_release_with_the_data_kept(
    db: Engine,
) -> None:
    """Each migration after the previous release steps down one at a time, keeping the
    release's rows; a migration that cannot go back must refuse, naming the downgrade."""
    migrate(db, PREVIOUS_RELEASE)
    old_tables = [t for t in inspect(db).get_table_names() if t != "alembic_version"]
    insert_previous_release_rows(db)
    before = row_counts(db, old_tables)
    migrate(db)
    config = alembic_config(db)
    for revision in newer_revisions(db):
        assert current_revision(db) == revision
        try:
            command.downgrade(config, "-1")
        except Exception as e:  # a refusal must say what it refuses
            assert "downgrade" in str(e).lower(), f"{revision}: unclear refusal: {e!r}"
            return
    assert current_revision(db) == PREVIOUS_RELEASE
    assert set(old_tables) <= set(inspect(db).get_table_names())
    assert row_counts(db, old_tables) == before
    migrate(db)  # and up again
    assert current_revision(db) == head_revision(db)
    check_readable_through_todays_code(db)


def test_going_down_from_0013_merges_each_buckets_fleet_shards_into_one_row(db: Engine) -> None:
    """Two workers' shards of one hour (and a bucket only the second worker wrote) become
    the rows one writer would have made: counts added, moments merged with Chan's formula."""
    migrate(db, PREVIOUS_RELEASE)
    insert_previous_release_rows(db)
    migrate(db, "0013")
    other_counts = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    other_moments = [[10.0, 2.0, 5.0, -1.0, 4.0], [10.0, 1.0, 3.0, -4.0, 1.0]]
    latency = [0] * N_LATENCY_BUCKETS
    latency[3] = 7
    with db.begin() as c:
        for bucket, reference_id in ((HOUR, REFERENCE), (HOUR + timedelta(hours=1), "")):
            _insert(
                c,
                "drift_fleet_rollups",
                model_name="pumps",
                model_version=2,
                reference_id=reference_id,
                period="hour",
                bucket_start=bucket,
                shard=1,
                windows=2,
                inferences=100,
                errors=1,
                latency=pack_counts(np.asarray(latency)),
                counts=pack_counts(np.asarray(other_counts)) if reference_id else None,
                moments=pack_moments(np.asarray(other_moments)) if reference_id else None,
            )
    command.downgrade(alembic_config(db), "0012")
    assert current_revision(db) == "0012"
    assert "shard" not in {c["name"] for c in inspect(db).get_columns("drift_fleet_rollups")}
    layout = Layout.from_json(LAYOUT_JSON)
    with db.connect() as c:
        rows = c.execute(
            text(
                "SELECT reference_id, windows, inferences, errors, latency, counts, moments "
                "FROM drift_fleet_rollups WHERE period = 'hour' ORDER BY bucket_start"
            )
        ).all()
    (merged, alone) = rows
    assert tuple(merged[:4]) == (REFERENCE, 5, 292, 4)
    assert unpack_counts(merged.latency, N_LATENCY_BUCKETS).tolist() == [
        a + b for a, b in zip(LATENCY, latency, strict=True)
    ]
    assert unpack_counts(merged.counts, layout.size).tolist() == [
        a + b for a, b in zip(DEVICE_COUNTS, other_counts, strict=True)
    ]
    expected = merge_moment_stack(np.stack([np.asarray(DEVICE_MOMENTS), np.asarray(other_moments)]))
    assert np.allclose(unpack_moments(merged.moments, layout.moment_rows), expected)
    assert tuple(alone[:4]) == ("", 2, 100, 1) and alone.counts is None
    migrate(db)  # and up again: the merged rows are shard 0
    with Session(db) as session:
        shards = session.exec(select(DriftFleetRollup.shard)).all()
    assert set(shards) == {0}
