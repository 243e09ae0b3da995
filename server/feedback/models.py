"""Labelled outcomes of past predictions (SQLModel table; the schema is owned by migration
``0008``).

``feedback`` holds one row per ``(device_id, prediction_id)`` -- its primary key, so a
label posted twice (an HTTP retry, a redelivered MQTT report) is stored once and the
first label a prediction got is the one that counts. ``correct`` is
``predicted_label == true_label``, fixed when the row is written. ``at`` is where the
accuracy views place the outcome in time: when the prediction was served if that is
known (``predicted_at``), else when it was labelled.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import Column, Index
from sqlmodel import Field, SQLModel

from server.db import UTCDateTime, utcnow

__all__ = ["FeedbackRecord", "FeedbackSource"]


class FeedbackSource(StrEnum):
    """Where a label came from."""

    DEVICE = "device"
    """Posted to the agent's local API and forwarded over MQTT."""
    API = "api"
    """Posted to the server's API by any service."""


class FeedbackRecord(SQLModel, table=True):
    """The ground truth for one prediction, and whether the model got it right."""

    __tablename__ = "feedback"
    __table_args__ = (Index("ix_feedback_model_at", "model_name", "model_version", "at"),)

    device_id: str = Field(primary_key=True, max_length=64)
    prediction_id: str = Field(primary_key=True, max_length=64)
    model_name: str = Field(max_length=128)
    model_version: int
    predicted_label: str = Field(max_length=128)
    true_label: str = Field(max_length=128)
    correct: bool
    predicted_at: datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime, nullable=True)
    )
    labelled_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    source: str = Field(max_length=16, description="a FeedbackSource")
    received_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )
