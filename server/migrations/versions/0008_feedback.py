"""feedback labels for past predictions; captured input samples from devices

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from server.db import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("prediction_id", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=False),
        sa.Column("predicted_label", sa.String(length=128), nullable=False),
        sa.Column("true_label", sa.String(length=128), nullable=False),
        sa.Column("correct", sa.Boolean(), nullable=False),
        sa.Column("predicted_at", UTCDateTime(), nullable=True),
        sa.Column("labelled_at", UTCDateTime(), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "prediction_id"),
    )
    op.create_index(
        "ix_feedback_model_at", "feedback", ["model_name", "model_version", "at"], unique=False
    )
    op.create_table(
        "sample_batches",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("part", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("parts", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.Integer(), nullable=False),
        sa.Column("target", sa.String(length=64), nullable=False),
        sa.Column("window_end", UTCDateTime(), nullable=False),
        sa.Column("n_rows", sa.Integer(), nullable=False),
        sa.Column("n_features", sa.Integer(), nullable=False),
        sa.Column("rows", sa.LargeBinary(), nullable=False),
        sa.Column("prediction_ids_json", sa.Text(), nullable=True),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "seq", "model_name", "part"),
    )
    op.create_index(
        "ix_sample_batches_model_end",
        "sample_batches",
        ["model_name", "window_end"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_sample_batches_model_end", table_name="sample_batches")
    op.drop_table("sample_batches")
    op.drop_index("ix_feedback_model_at", table_name="feedback")
    op.drop_table("feedback")
