"""agent releases, and rollouts of the agent itself next to rollouts of models

- ``agent_releases``: one published agent wheel per version.
- ``rollouts.kind`` (``model``, the default every existing row gets, or ``agent``),
  ``rollouts.agent_release_id`` and ``rollouts.agent_version``; ``model_version_id``
  becomes nullable (an agent rollout names no model version).
- ``device_events.agent_version``: set on the events of an agent update.
- ``issued_manifests.agent_json``: the agent deployment a manifest named (NULL: none).
- ``devices.agent_update_json``: how the device's latest agent update ended.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from server.db import UTCDateTime

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "agent_releases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("length", sa.Integer(), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("requires_python", sa.String(length=64), nullable=True),
        sa.Column("notes", sa.Text(), nullable=False),
        sa.Column("published_by", sa.String(length=64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["sha256"], ["artifacts.sha256"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("agent_releases", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_agent_releases_version"), ["version"], unique=True)
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), nullable=False, server_default="model")
        )
        batch_op.add_column(sa.Column("agent_release_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("agent_version", sa.String(length=64), nullable=True))
        batch_op.alter_column("model_version_id", existing_type=sa.Integer(), nullable=True)
        batch_op.create_foreign_key(
            "fk_rollouts_agent_release_id", "agent_releases", ["agent_release_id"], ["id"]
        )
        batch_op.create_index(batch_op.f("ix_rollouts_kind"), ["kind"], unique=False)
    with op.batch_alter_table("device_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("agent_version", sa.String(length=64), nullable=True))
    with op.batch_alter_table("issued_manifests", schema=None) as batch_op:
        batch_op.add_column(sa.Column("agent_json", sa.Text(), nullable=True))
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("agent_update_json", sa.Text(), nullable=True))


def downgrade() -> None:
    """Refused while agent rollouts exist: their rows cannot be told from model rollouts
    once ``kind`` is gone. Delete them first (they are the operator's to keep or drop)."""
    bind = op.get_bind()
    agent_rollouts = bind.execute(
        sa.text("SELECT COUNT(*) FROM rollouts WHERE kind = 'agent'")
    ).scalar_one()
    if agent_rollouts:
        raise RuntimeError(
            f"cannot downgrade below 0010: {agent_rollouts} agent rollout(s) exist; "
            "delete them before the downgrade"
        )
    # Plain DROP COLUMN (SQLite >= 3.35 has it): a batch copy of ``devices`` would drop
    # a table other tables' foreign keys name.
    op.drop_column("devices", "agent_update_json")
    op.drop_column("issued_manifests", "agent_json")
    op.drop_column("device_events", "agent_version")
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_rollouts_kind"))
        batch_op.drop_constraint("fk_rollouts_agent_release_id", type_="foreignkey")
        batch_op.alter_column("model_version_id", existing_type=sa.Integer(), nullable=False)
        batch_op.drop_column("agent_version")
        batch_op.drop_column("agent_release_id")
        batch_op.drop_column("kind")
    with op.batch_alter_table("agent_releases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_agent_releases_version"))
    op.drop_table("agent_releases")
