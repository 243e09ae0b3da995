"""Input samples devices captured (SQLModel table; the schema is owned by migration ``0008``).

``sample_batches`` holds one row per ``(device_id, seq, model_name, part)`` -- the key of
a :class:`shared.messages.SampleBatch`, so a batch delivered twice is stored once.
``rows`` is the batch's values as little-endian float64, C order, ``n_rows`` x
``n_features``; ``prediction_ids_json`` the prediction id of each row (JSON list, None
where a row had none; NULL when the batch carried no ids).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, Index, LargeBinary, Text
from sqlmodel import Field, SQLModel

from server.db import UTCDateTime, utcnow

__all__ = ["SampleBatchRecord"]


class SampleBatchRecord(SQLModel, table=True):
    """One captured batch of raw input rows from one device, model and window."""

    __tablename__ = "sample_batches"
    __table_args__ = (Index("ix_sample_batches_model_end", "model_name", "window_end"),)

    device_id: str = Field(primary_key=True, max_length=64)
    seq: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    model_name: str = Field(primary_key=True, max_length=128)
    part: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    parts: int
    model_version: int
    target: str = Field(max_length=64)
    window_end: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    n_rows: int
    n_features: int
    rows: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    prediction_ids_json: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    received_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )
