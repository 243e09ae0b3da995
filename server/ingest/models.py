"""Ingested telemetry (SQLModel tables; the schema is owned by migration ``0004``).

``telemetry_reports`` has one row per ``(device_id, seq)`` -- its primary key, so a
report delivered twice (QoS 1 redelivery, a replayed outbox) is stored once.
``model_windows`` holds each model's share of a report: counts, errors, the latency
histogram (JSON text), and of the drift sketch its reference id and prediction sketch
(a :class:`~shared.drift.DriftSketch` with no features: the drift rollups hold the
feature counts; rows stored before keep every feature, and readers take both).
``ingest_drops`` counts what was refused, per device and reason.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from server.db import UTCDateTime, utcnow

__all__ = ["IngestDrop", "ModelWindowRecord", "TelemetryRecord"]


class TelemetryRecord(SQLModel, table=True):
    """One telemetry report: the device's window and its resource use."""

    __tablename__ = "telemetry_reports"

    device_id: str = Field(primary_key=True, max_length=64)
    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    window_start: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    window_end: datetime = Field(sa_column=Column(UTCDateTime, nullable=False, index=True))
    received_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )
    dropped_reports: int = 0
    rss_bytes: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    cpu_seconds: float | None = None


class ModelWindowRecord(SQLModel, table=True):
    """One model's counts in one report."""

    __tablename__ = "model_windows"
    __table_args__ = (
        UniqueConstraint("device_id", "seq", "model_name"),
        Index("ix_model_windows_version_end", "model_name", "model_version", "window_end"),
    )

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(max_length=64, index=True)
    seq: int = Field(sa_column=Column(BigInteger, nullable=False))
    model_name: str = Field(max_length=128)
    model_version: int
    target: str = Field(max_length=64)
    window_start: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    window_end: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    inferences: int = 0
    errors: int = 0
    latency_json: str = Field(sa_column=Column(Text, nullable=False))
    drift_json: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class IngestDrop(SQLModel, table=True):
    """Payloads refused from one device for one reason: how many, and the last one's story."""

    __tablename__ = "ingest_drops"

    device_id: str = Field(primary_key=True, max_length=64)
    reason: str = Field(primary_key=True, max_length=32)
    count: int = 0
    last_at: datetime = Field(default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False))
    last_detail: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
