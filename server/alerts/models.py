"""The alerts' tables (SQLModel); the schema is owned by the Alembic migration ``0007``.

=====================  ===================================================================
table                  what a row is
=====================  ===================================================================
``alert_rules``        one rule: a condition (:mod:`server.alerts.rules`, JSON) over a
                       model and/or a group, its severity and optional webhook
``alerts``             one alert: a rule's condition fired for one subject (a model
                       version in a scope, or a scope's devices) -- from opening to
                       resolution, with the evidence of both
``alert_deliveries``   one webhook call to make about an alert (opened / resolved): its
                       payload, attempts, when it is tried next, how it ended
=====================  ===================================================================

What always holds:

- At most one *open* alert per rule and subject: ``open_key`` holds the subject while
  the alert is open and is NULL once it is resolved, and ``(rule_id, open_key)`` is
  unique (NULLs never collide, on SQLite and PostgreSQL alike). Two evaluators racing
  to open the same alert cannot both succeed.
- An alert is resolved once, by a conditional ``UPDATE ... WHERE status = 'open'``;
  only the writer that resolved it queues the ``resolved`` webhook.
- ``evidence_json`` is what the condition showed when the alert opened and never
  changes; ``latest_json`` is the latest evaluation (the one that resolved it, at the end).
- A delivery is ``pending`` until it is ``delivered`` (2xx) or ``failed`` (out of
  attempts, or an answer that retrying cannot change); ``claimed_until`` keeps two
  senders from posting the same attempt.
- Times are aware UTC (:class:`~server.db.UTCDateTime`); ``*_json`` columns hold JSON text.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Index, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from server.db import UTCDateTime, utcnow

__all__ = ["AlertDeliveryRecord", "AlertRecord", "AlertRuleRecord"]


class AlertRuleRecord(SQLModel, table=True):
    """A rule: what to watch, where, how loudly, and whom to tell."""

    __tablename__ = "alert_rules"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True, index=True)
    kind: str = Field(max_length=16, index=True, description="the condition's kind")
    model_name: str | None = Field(default=None, max_length=128, index=True)
    group_name: str | None = Field(default=None, max_length=64, description="None: the fleet")
    condition_json: str = Field(sa_column=Column(Text, nullable=False))
    severity: str = Field(default="warning", max_length=16)
    enabled: bool = True
    webhook_url: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    description: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )
    updated_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )
    last_evaluated_at: datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime, nullable=True)
    )
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class AlertRecord(SQLModel, table=True):
    """One firing of a rule for one subject, open until the condition clears."""

    __tablename__ = "alerts"
    __table_args__ = (
        UniqueConstraint("rule_id", "open_key"),
        Index("ix_alerts_status_opened", "status", "opened_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    rule_id: int | None = Field(
        default=None, foreign_key="alert_rules.id", index=True, description="None: rule deleted"
    )
    rule_name: str = Field(max_length=64, index=True)
    kind: str = Field(max_length=16)
    severity: str = Field(max_length=16)
    subject: str = Field(max_length=256, description="what fired: a model version in a scope")
    open_key: str | None = Field(
        default=None, max_length=256, description="the subject while open, NULL once resolved"
    )
    model_name: str | None = Field(default=None, max_length=128, index=True)
    model_version: int | None = None
    group_name: str | None = Field(default=None, max_length=64, index=True)
    status: str = Field(default="open", max_length=16, description="open or resolved")
    opened_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    resolved_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
    last_evaluated_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    value: float | None = None
    threshold: float | None = None
    summary: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    evidence_json: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))
    latest_json: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))
    resolution: str | None = Field(default=None, sa_column=Column(Text, nullable=True))


class AlertDeliveryRecord(SQLModel, table=True):
    """One webhook notification about an alert, with its attempts."""

    __tablename__ = "alert_deliveries"
    __table_args__ = (Index("ix_alert_deliveries_due", "status", "next_attempt_at"),)

    id: int | None = Field(default=None, primary_key=True)
    alert_id: int = Field(foreign_key="alerts.id", index=True)
    event: str = Field(max_length=16, description="opened or resolved")
    url: str = Field(sa_column=Column(Text, nullable=False))
    payload_json: str = Field(sa_column=Column(Text, nullable=False))
    status: str = Field(default="pending", max_length=16, description="pending, delivered, failed")
    attempts: int = 0
    next_attempt_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    claimed_until: datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime, nullable=True)
    )
    last_status_code: int | None = None
    last_error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(UTCDateTime, nullable=False)
    )
    delivered_at: datetime | None = Field(
        default=None, sa_column=Column(UTCDateTime, nullable=True)
    )
