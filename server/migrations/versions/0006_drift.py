"""drift rollups: per device and fleet-wide, per hour and day; layouts; retention marks

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from server.db import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _sums() -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column("windows", sa.BigInteger(), nullable=False),
        sa.Column("inferences", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("latency", sa.LargeBinary(), nullable=False),
        sa.Column("counts", sa.LargeBinary(), nullable=True),
        sa.Column("moments", sa.LargeBinary(), nullable=True),
    ]


def upgrade() -> None:
    op.create_table(
        "drift_rollups",
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("reference_id", sa.String(length=64), nullable=False),
        sa.Column("period", sa.String(length=8), nullable=False),
        sa.Column("bucket_start", UTCDateTime(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        *_sums(),
        sa.PrimaryKeyConstraint(
            "model_name", "model_version", "reference_id", "period", "bucket_start", "device_id"
        ),
    )
    op.create_index(
        "ix_drift_rollups_period_bucket", "drift_rollups", ["period", "bucket_start"], unique=False
    )
    op.create_table(
        "drift_fleet_rollups",
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("reference_id", sa.String(length=64), nullable=False),
        sa.Column("period", sa.String(length=8), nullable=False),
        sa.Column("bucket_start", UTCDateTime(), nullable=False),
        *_sums(),
        sa.PrimaryKeyConstraint(
            "model_name", "model_version", "reference_id", "period", "bucket_start"
        ),
    )
    op.create_index(
        "ix_drift_fleet_rollups_period_bucket",
        "drift_fleet_rollups",
        ["period", "bucket_start"],
        unique=False,
    )
    op.create_table(
        "drift_layouts",
        sa.Column("reference_id", sa.String(length=64), nullable=False),
        sa.Column("layout_json", sa.Text(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("reference_id"),
    )
    marks = op.create_table(
        "retention_marks",
        sa.Column("tier", sa.String(length=8), nullable=False),
        sa.Column("before", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("tier"),
    )
    # One row per tier from the start: ingestion share-locks them and a purge locks them
    # for update, so the two never interleave -- not even before the first purge.
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    op.bulk_insert(
        marks,
        [{"tier": tier, "before": epoch, "updated_at": epoch} for tier in ("raw", "hour", "day")],
    )


def downgrade() -> None:
    op.drop_table("retention_marks")
    op.drop_table("drift_layouts")
    op.drop_index("ix_drift_fleet_rollups_period_bucket", table_name="drift_fleet_rollups")
    op.drop_table("drift_fleet_rollups")
    op.drop_index("ix_drift_rollups_period_bucket", table_name="drift_rollups")
    op.drop_table("drift_rollups")
