"""The retraining tables (SQLModel); the schema is owned by the Alembic migration ``0007``.

=========================  ===============================================================
table                      what a row is
=========================  ===============================================================
``retraining_policies``    a policy for one model: a condition (:mod:`server.alerts.rules`)
                           watched on each of its groups, and what a firing does --
                           wait for approval or train at once, promote to an alias,
                           start a canary rollout
``retraining_decisions``   one firing of a policy for one group: the evidence, the data
                           it trains on, the run, the candidate, the rollout, and each
                           step with its time (``history_json``)
=========================  ===============================================================

What always holds:

- One decision per firing: ``(policy_id, group_name, window_end)`` is unique, where
  ``window_end`` is the end of the newest window the firing judged -- two evaluators
  judging the same windows insert one decision.
- A decision moves only forward, ``pending_approval -> training -> completed | failed``
  or ``pending_approval -> rejected``, each move one conditional ``UPDATE ... WHERE
  status = <expected>`` (so an approval and a rejection, or two servers advancing the
  same decision, cannot both win).
- Times are aware UTC (:class:`~server.db.UTCDateTime`); ``*_json`` columns hold JSON text.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from server.db import UTCDateTime, utcnow

__all__ = ["RetrainingDecisionRecord", "RetrainingPolicyRecord"]


class RetrainingPolicyRecord(SQLModel, table=True):
    """When to retrain a model, and what to do with the result."""

    __tablename__ = "retraining_policies"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True, index=True)
    model_name: str = Field(max_length=128, index=True)
    groups_json: str = Field(sa_column=Column(Text, nullable=False), description="group names")
    condition_json: str = Field(sa_column=Column(Text, nullable=False))
    approval: bool = Field(default=True, description="a firing waits for an operator")
    cooldown_seconds: float = Field(default=86400.0, description="between firings per group")
    training_json: str = Field(
        default="{}",
        sa_column=Column(Text, nullable=False, default="{}"),
        description="overrides of the retraining run's spec",
    )
    alias: str = Field(default="candidate", max_length=64)
    canary_json: str | None = Field(
        default=None,
        sa_column=Column(Text, nullable=True),
        description="the canary rollout to start (None: none)",
    )
    enabled: bool = True
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


class RetrainingDecisionRecord(SQLModel, table=True):
    """A policy fired for a group: what it saw, and what came of it."""

    __tablename__ = "retraining_decisions"
    __table_args__ = (UniqueConstraint("policy_id", "group_name", "window_end"),)

    id: int | None = Field(default=None, primary_key=True)
    policy_id: int | None = Field(
        default=None,
        foreign_key="retraining_policies.id",
        index=True,
        description="None: the policy was deleted",
    )
    policy_name: str = Field(max_length=64)
    model_name: str = Field(max_length=128, index=True)
    model_version: int = Field(description="the version that drifted (whose lineage it retrains)")
    group_name: str = Field(max_length=64, index=True)
    window_end: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    status: str = Field(max_length=24, index=True)
    status_reason: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    summary: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    evidence_json: str = Field(default="{}", sa_column=Column(Text, nullable=False, default="{}"))
    plan_json: str = Field(
        default="{}",
        sa_column=Column(Text, nullable=False, default="{}"),
        description="what the firing does, fixed when it fired: the data (original and chosen "
        "dataset version, and why), the run's spec overrides, the alias, the canary",
    )
    run_id: int | None = Field(default=None, foreign_key="training_runs.id")
    candidate_version: int | None = None
    rollout_id: str | None = Field(default=None, max_length=128)
    note: str = Field(default="", sa_column=Column(Text, nullable=False, default=""))
    history_json: str = Field(default="[]", sa_column=Column(Text, nullable=False, default="[]"))
    created_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    updated_at: datetime = Field(sa_column=Column(UTCDateTime, nullable=False))
    decided_at: datetime | None = Field(default=None, sa_column=Column(UTCDateTime, nullable=True))
