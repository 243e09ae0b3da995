"""fleet rollup shards: each ingestion worker adds to fleet rollup rows of its own

``drift_fleet_rollups`` gets a ``shard`` column in its primary key (``0`` for every row
stored so far). Each ingestion worker writes the fleet rows of its own shard (its index;
the in-server consumer writes shard 0), so two workers storing windows of the same
model, version and bucket no longer wait on each other's row locks until commit; readers
add up a bucket's shards like any other rows. Downgrading merges each bucket's shards
into one row, exactly as ingestion would have (counts added, moments merged with Chan's
formula), then drops the column.

Revision ID: 0013
Revises: 0012
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC
from typing import Any

import numpy as np
import sqlalchemy as sa
from alembic import op

from server.drift.layout import (
    Layout,
    merge_moment_stack,
    pack_counts,
    pack_moments,
    unpack_counts,
    unpack_moments,
)
from shared.latency import N_LATENCY_BUCKETS

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_TABLE = "drift_fleet_rollups"
_KEY = ["model_name", "model_version", "reference_id", "period", "bucket_start"]
_PK = "drift_fleet_rollups_pkey"  # PostgreSQL's name for the key 0006 made


def _shard_column() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column(
        "shard",
        sa.Integer(),
        primary_key=True,
        autoincrement=False,
        nullable=False,
        server_default="0",
    )


def upgrade() -> None:
    connection = op.get_bind()
    if connection.dialect.name == "sqlite":  # a new key: SQLite copies the table
        with op.batch_alter_table(_TABLE, recreate="always") as batch:
            batch.add_column(_shard_column())
            batch.create_primary_key(_PK, [*_KEY, "shard"])
        return
    name = sa.inspect(connection).get_pk_constraint(_TABLE)["name"] or _PK
    op.add_column(_TABLE, _shard_column())
    op.drop_constraint(name, _TABLE, type_="primary")
    op.create_primary_key(_PK, _TABLE, [*_KEY, "shard"])


def _merged(rows: list[Any], layout: Layout | None) -> dict[str, Any]:
    latency = np.sum([unpack_counts(r["latency"], N_LATENCY_BUCKETS) for r in rows], axis=0)
    out: dict[str, Any] = {
        "windows": sum(r["windows"] for r in rows),
        "inferences": sum(r["inferences"] for r in rows),
        "errors": sum(r["errors"] for r in rows),
        "latency": pack_counts(latency),
        "counts": None,
        "moments": None,
    }
    with_counts = [r for r in rows if r["counts"] is not None and r["moments"] is not None]
    if layout is not None and with_counts:
        counts = np.sum([unpack_counts(r["counts"], layout.size) for r in with_counts], axis=0)
        moments = merge_moment_stack(
            np.stack([unpack_moments(r["moments"], layout.moment_rows) for r in with_counts])
        )
        out["counts"], out["moments"] = pack_counts(counts), pack_moments(moments)
    return out


def downgrade() -> None:
    connection = op.get_bind()
    metadata = sa.MetaData()
    table = sa.Table(_TABLE, metadata, autoload_with=connection)
    layouts_table = sa.Table("drift_layouts", metadata, autoload_with=connection)
    layouts = {
        row.reference_id: Layout.from_json(row.layout_json)
        for row in connection.execute(sa.select(layouts_table))
    }
    c = table.c
    sharded = (
        sa.select(*(c[k] for k in _KEY))
        .group_by(*(c[k] for k in _KEY))
        .having(sa.or_(sa.func.count() > 1, sa.func.max(c.shard) != 0))
    ).subquery()
    rows = connection.execute(
        sa.select(table).join(sharded, sa.and_(*(c[k] == sharded.c[k] for k in _KEY)))
    ).mappings()
    groups: dict[tuple[Any, ...], list[Any]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[k] for k in _KEY)].append(row)
    for key, group in groups.items():
        where = [c[k] == v for k, v in zip(_KEY, key, strict=True)]
        connection.execute(sa.delete(table).where(*where))
        start = key[4]
        if connection.dialect.name == "sqlite" and start.tzinfo is not None:
            start = start.astimezone(UTC).replace(tzinfo=None)  # stored as naive UTC there
        merged = dict(zip(_KEY, key, strict=True)) | {"bucket_start": start, "shard": 0}
        reference_id = key[2]
        merged |= _merged(group, layouts.get(reference_id) if reference_id else None)
        connection.execute(sa.insert(table), [merged])
    if connection.dialect.name == "sqlite":
        with op.batch_alter_table(_TABLE, recreate="always") as batch:
            batch.drop_column("shard")
            batch.create_primary_key(_PK, _KEY)
        return
    op.drop_constraint(_PK, _TABLE, type_="primary")
    op.drop_column(_TABLE, "shard")
    op.create_primary_key(_PK, _TABLE, _KEY)
