"""Retraining policies' rules, pure: what a policy holds, when it may fire, what it trains on.

A policy watches one model on each of its groups with a condition of
:mod:`server.alerts.rules` (``drift``, ``accuracy``, ``latency_p95`` or ``error_rate``
-- an offline device is no reason to retrain). When the condition fires for a group,
a decision is taken (:mod:`server.retraining.service`).

What always holds:

- A policy fires for a group at most once per ``cooldown`` (counted from its last
  decision for that group, whatever came of it -- a rejected one too), and never while
  a decision of it for that group is still pending approval or training
  (:func:`may_fire`).
- Of the versions firing in a group, the newest is retrained (:func:`pick_firing`).
- A retraining trains on the newest version of the drifted version's dataset: the
  original (its lineage) or a newer one -- e.g. captured device samples added to it --
  and the decision says which, and why (:func:`choose_dataset`).
- No clock is read and nothing is stored here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from server.alerts.conditions import Verdict
from server.alerts.evaluate import Finding
from server.alerts.rules import (
    AccuracyCondition,
    DriftCondition,
    ErrorRateCondition,
    LatencyCondition,
)
from server.rollouts.gates import HealthThresholds

__all__ = [
    "ACTIVE",
    "CanarySpec",
    "DatasetChoice",
    "DecisionStatus",
    "RetrainingCondition",
    "TrainingOverrides",
    "choose_dataset",
    "may_fire",
    "pick_firing",
]


class DecisionStatus(StrEnum):
    PENDING_APPROVAL = "pending_approval"
    TRAINING = "training"
    COMPLETED = "completed"
    FAILED = "failed"
    REJECTED = "rejected"


ACTIVE = (DecisionStatus.PENDING_APPROVAL, DecisionStatus.TRAINING)
"""A decision in one of these is still under way."""

RetrainingCondition = Annotated[
    DriftCondition | AccuracyCondition | LatencyCondition | ErrorRateCondition,
    Field(discriminator="kind"),
]


class TrainingOverrides(BaseModel):
    """What the retraining run changes in the spec of the run that made the drifted version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int | None = Field(None, ge=1, le=500)
    spec: dict[str, JsonValue] = Field(
        default_factory=dict,
        description="other spec fields: hidden_units, dropout, batch_size, learning_rate, ...",
    )

    def as_overrides(self) -> dict[str, Any]:
        fields: dict[str, Any] = dict(self.spec)
        if self.epochs is not None:
            fields["epochs"] = self.epochs
        return fields


class CanarySpec(BaseModel):
    """The canary rollout of the candidate to the group the policy fired for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    phases: str = Field(
        "10,100", max_length=200, description="as rollouts take them: '10,100', '1dev,50,100'"
    )
    approval: bool = Field(
        True, description="every phase but the last waits for the operator's approval"
    )
    wait_between_phases: timedelta | None = Field(
        None,
        description="observation time after a phase settled (seconds or ISO 8601); "
        "default: the rollouts' default",
    )
    device_timeout: timedelta | None = Field(
        None, description="how long a device may take to install; default: the rollouts'"
    )
    gates: HealthThresholds | None = Field(
        None, description="the canary's health gates; default: the rollouts' defaults"
    )


def may_fire(
    now: datetime,
    *,
    last_fired_at: datetime | None,
    cooldown: timedelta,
    active: bool,
) -> tuple[bool, str]:
    """Whether a policy may fire for a group now, and if not, why."""
    if active:
        return False, "a decision for this group is still under way"
    if last_fired_at is not None and now < last_fired_at + cooldown:
        return False, f"cooling down until {(last_fired_at + cooldown).isoformat()}"
    return True, ""


def pick_firing(findings: Sequence[Finding]) -> Finding | None:
    """The finding to act on: the newest version that fires."""
    firing = [f for f in findings if f.verdict is Verdict.FIRING and f.model_version is not None]
    return max(firing, key=lambda f: f.model_version or 0, default=None)


@dataclass(frozen=True)
class DatasetChoice:
    dataset_version_id: int
    version: int
    note: str


def choose_dataset(
    *,
    dataset: str,
    original_id: int,
    original_version: int,
    newest_id: int,
    newest_version: int,
    newest_lineage: dict[str, Any],
) -> DatasetChoice:
    """The newest version of the dataset, saying whether it is the original or newer."""
    if newest_version <= original_version:
        return DatasetChoice(
            original_id,
            original_version,
            f"{dataset} v{original_version}: the drifted version's own training data "
            "(no newer version of the dataset exists)",
        )
    origin = _lineage_origin(newest_lineage)
    return DatasetChoice(
        newest_id,
        newest_version,
        f"{dataset} v{newest_version}, newer than v{original_version} the drifted version was "
        f"trained on{origin}: the newest data, e.g. captured device samples",
    )


def _lineage_origin(lineage: dict[str, Any]) -> str:
    """What a newer dataset version holds, in a few words: `` (v1 + 281 labelled device
    samples from 3 devices)`` for a samples version, its scalar lineage fields otherwise."""
    if not lineage:
        return ""
    if lineage.get("kind") == "device_samples":
        base = lineage.get("base") or {}
        devices = lineage.get("device_count", len(lineage.get("devices") or []))
        return (
            f" (v{base.get('version', '?')} + {lineage.get('added_rows', '?')} labelled device "
            f"samples from {devices} device{'s' if devices != 1 else ''})"
        )
    scalars = [
        f"{k}={v}" for k, v in sorted(lineage.items()) if isinstance(v, str | int | float | bool)
    ]
    return f" ({', '.join(scalars[:6])})" if scalars else ""
