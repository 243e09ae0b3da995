"""the broker-credentials revision: one counter that every change of broker logins moves

- ``broker_credentials_revision``: one row (``id`` 1). Enrollment of an accepted device,
  accept, reject and revoke add one to ``revision`` in their own transaction; every API
  process with a broker configuration folder polls it and re-renders its files when it
  moved (:mod:`server.brokerconf.revision`, :mod:`server.brokerconf.follow`).

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "broker_credentials_revision",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(table, [{"id": 1, "revision": 0}])


def downgrade() -> None:
    op.drop_table("broker_credentials_revision")
