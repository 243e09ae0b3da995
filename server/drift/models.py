"""Drift rollups (SQLModel tables; the schema is owned by migration ``0006``).

``drift_rollups`` holds, per device, the sum of everything the device reported for one
model version in one time bucket (an hour, six hours or a day): windows, inferences, errors, the
latency histogram and -- for windows that carried a drift sketch -- the drift counts
and moments. ``drift_fleet_rollups`` holds the same sums over every device, one row
per (model version, bucket, shard): each ingestion worker adds to the rows of its own
``shard`` (its index; 0 for the in-server consumer, and every row stored before
migration ``0013``), so workers never wait on each other's row locks, and readers add
up the shards of a bucket like any other rows. ``drift_layouts`` records the layout of each drift
reference's counts, and ``retention_marks`` how far back each tier has been deleted.

What always holds:

- A row's counts are the exact integer sum of the reports it covers; its moments are
  those reports' moments merged with Chan's formula. Blobs are packed by
  :mod:`server.drift.packing`: counts in the layout recorded in ``drift_layouts`` for
  the row's ``reference_id`` (``""``: windows without a sketch, so no counts).
- A window belongs to the hour, the 6-hour block (00, 06, 12, 18 h) and the day (UTC)
  in which it *started*.
- A fleet bucket's sums are the sum of its shards' rows, whichever worker stored what.
- Every report adds to each tier exactly once (see :mod:`server.drift.rollups`), and
  nothing older than a tier's retention mark is ever added to it again.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Index, Integer, LargeBinary, String, Text
from sqlmodel import Field, SQLModel

from server.db import UTCDateTime, utcnow

__all__ = ["DriftFleetRollup", "DriftLayout", "DriftRollup", "RetentionMark"]


class DriftRollup(SQLModel, table=True):
    """One device's sums for one model version in one bucket."""

    __tablename__ = "drift_rollups"
    __table_args__ = (Index("ix_drift_rollups_period_bucket", "period", "bucket_start"),)

    model_name: str = Field(primary_key=True, max_length=128)
    model_version: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    reference_id: str = Field(primary_key=True, max_length=64)
    period: str = Field(primary_key=True, max_length=8, description="hour, 6h or day")
    bucket_start: datetime = Field(sa_column=Column(UTCDateTime, primary_key=True))
    device_id: str = Field(primary_key=True, max_length=64)
    windows: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    inferences: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    errors: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    latency: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    counts: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    moments: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))


class DriftFleetRollup(SQLModel, table=True):
    """Every device's sums for one model version in one bucket."""

    __tablename__ = "drift_fleet_rollups"
    __table_args__ = (Index("ix_drift_fleet_rollups_period_bucket", "period", "bucket_start"),)

    model_name: str = Field(primary_key=True, max_length=128)
    model_version: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    reference_id: str = Field(primary_key=True, max_length=64)
    period: str = Field(primary_key=True, max_length=8, description="hour, 6h or day")
    bucket_start: datetime = Field(sa_column=Column(UTCDateTime, primary_key=True))
    shard: int = Field(
        default=0,
        sa_column=Column(Integer, primary_key=True, autoincrement=False, server_default="0"),
        description="the ingestion worker that wrote the row (0: the in-server consumer)",
    )
    windows: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    inferences: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    errors: int = Field(default=0, sa_column=Column(BigInteger, nullable=False))
    latency: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    counts: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))
    moments: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))


class DriftLayout(SQLModel, table=True):
    """How one drift reference's counts are laid out in a rollup's ``counts`` blob."""

    __tablename__ = "drift_layouts"

    reference_id: str = Field(sa_column=Column(String(64), primary_key=True))
    layout_json: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )


class RetentionMark(SQLModel, table=True):
    """Data of ``tier`` (raw, hour or day) before ``before`` has been deleted for good."""

    __tablename__ = "retention_marks"

    tier: str = Field(sa_column=Column(String(8), primary_key=True))
    before: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    updated_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )
