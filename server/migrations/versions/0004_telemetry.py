"""ingested telemetry: reports, per-model windows, drop counters

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from server.db import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "telemetry_reports",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("window_start", UTCDateTime(), nullable=False),
        sa.Column("window_end", UTCDateTime(), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("dropped_reports", sa.Integer(), nullable=False),
        sa.Column("rss_bytes", sa.BigInteger(), nullable=True),
        sa.Column("cpu_seconds", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("device_id", "seq"),
    )
    op.create_index(
        "ix_telemetry_reports_window_end", "telemetry_reports", ["window_end"], unique=False
    )
    op.create_table(
        "model_windows",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=False),
        sa.Column("target", sa.String(length=64), nullable=False),
        sa.Column("window_start", UTCDateTime(), nullable=False),
        sa.Column("window_end", UTCDateTime(), nullable=False),
        sa.Column("inferences", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("latency_json", sa.Text(), nullable=False),
        sa.Column("drift_json", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("device_id", "seq", "model_name"),
    )
    op.create_index("ix_model_windows_device_id", "model_windows", ["device_id"], unique=False)
    op.create_index(
        "ix_model_windows_version_end",
        "model_windows",
        ["model_name", "model_version", "window_end"],
        unique=False,
    )
    op.create_table(
        "ingest_drops",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("last_at", UTCDateTime(), nullable=False),
        sa.Column("last_detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "reason"),
    )


def downgrade() -> None:
    op.drop_table("ingest_drops")
    op.drop_index("ix_model_windows_version_end", table_name="model_windows")
    op.drop_index("ix_model_windows_device_id", table_name="model_windows")
    op.drop_table("model_windows")
    op.drop_index("ix_telemetry_reports_window_end", table_name="telemetry_reports")
    op.drop_table("telemetry_reports")
