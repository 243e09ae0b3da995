"""What a rule watches: the conditions alerts and retraining policies are written in.

A *condition* is one of five kinds, told apart by ``kind``:

==============  ==============================================================  =========
kind            holds in a window when ...                                      windows
==============  ==============================================================  =========
``latency_p95`` the p95 latency of a device profile's devices is above its      1
                SLA (``firmware_images/<profile>/profile.toml``) times
                ``sla_ratio`` -- or above ``sla_ms`` when given
``error_rate``  errors / (inferences + errors) is above ``max_error_rate``      1
``drift``       at least ``min_device_share`` of the evaluated devices have     3
                PSI (or JS distance) at or above ``threshold`` on a feature,
                each device from its own counts
``accuracy``    accuracy from labelled feedback is below ``min_accuracy``       1
``offline``     (no windows) at least ``min_devices`` devices have been         --
                offline for longer than ``offline_for``
==============  ==============================================================  =========

A windowed condition *fires* when it holds in ``windows`` consecutive windows of
``window_hours`` whole hours each (UTC, as the drift rollups are kept): see
:func:`server.alerts.conditions.evaluate_windows` for which windows those are.

What always holds: a condition is validated when built -- ranges, and bounds so that an
evaluation reads a bounded amount (at most :data:`MAX_LOOKBACK_HOURS` hours back); each
field left out takes the default shown in its description. Pure pydantic, no I/O.
"""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

__all__ = [
    "DEFAULT_THRESHOLDS",
    "MAX_LOOKBACK_HOURS",
    "AccuracyCondition",
    "AnyCondition",
    "Condition",
    "ConditionKind",
    "DriftCondition",
    "ErrorRateCondition",
    "LatencyCondition",
    "OfflineCondition",
    "Severity",
    "WindowedCondition",
    "parse_condition",
]

MAX_LOOKBACK_HOURS = 7 * 24
"""``windows * window_hours`` may reach this far back at most (hourly rollups last 30 days)."""

DEFAULT_THRESHOLDS = {"psi": 0.25, "js": 0.1}
"""ARCHITECTURE.md: PSI 0.25 means act; a Jensen-Shannon distance of 0.1 likewise."""


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class ConditionKind(StrEnum):
    LATENCY_P95 = "latency_p95"
    ERROR_RATE = "error_rate"
    DRIFT = "drift"
    ACCURACY = "accuracy"
    OFFLINE = "offline"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WindowedCondition(_Strict):
    """Fires when it holds in ``windows`` consecutive windows of ``window_hours`` each."""

    window_hours: int = Field(1, ge=1, le=24, description="length of one window, whole hours")
    windows: int = Field(1, ge=1, le=48, description="consecutive windows it must hold in")

    @model_validator(mode="after")
    def _bounded_lookback(self) -> WindowedCondition:
        if self.window_hours * self.windows > MAX_LOOKBACK_HOURS:
            raise ValueError(
                f"windows x window_hours is {self.windows * self.window_hours} hours; "
                f"at most {MAX_LOOKBACK_HOURS} (a week) can be looked back on"
            )
        return self

    @property
    def lookback(self) -> timedelta:
        return timedelta(hours=self.window_hours * self.windows)


class LatencyCondition(WindowedCondition):
    kind: Literal["latency_p95"] = "latency_p95"
    sla_ms: float | None = Field(
        None, gt=0, le=600_000, description="a fixed limit; default: each profile's latency SLA"
    )
    sla_ratio: float = Field(
        1.0, gt=0, le=100, description="the limit is the SLA times this (1.0: the SLA itself)"
    )
    min_inferences: int = Field(
        100, ge=1, le=10**9, description="inferences a profile needs in a window to be judged"
    )


class ErrorRateCondition(WindowedCondition):
    kind: Literal["error_rate"] = "error_rate"
    max_error_rate: float = Field(gt=0, lt=1, description="errors / (inferences + errors)")
    min_requests: int = Field(
        100, ge=1, le=10**9, description="inferences + errors a window needs to be judged"
    )


class DriftCondition(WindowedCondition):
    kind: Literal["drift"] = "drift"
    metric: Literal["psi", "js"] = Field("psi", description="psi, or js (Jensen-Shannon distance)")
    threshold: float | None = Field(
        None, gt=0, le=100, description="a device drifted at or above this; default 0.25 / 0.1"
    )
    min_device_share: float = Field(
        0.3, gt=0, le=1, description="share of the evaluated devices that must have drifted"
    )
    windows: int = Field(3, ge=1, le=48, description="consecutive windows it must hold in")
    features: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        None, max_length=256, description="only these features count (default: every feature)"
    )
    min_samples: int = Field(
        500,
        ge=1,
        le=10**12,
        description="values a device needs on a feature in a window before its score counts",
    )
    min_devices: int = Field(
        1, ge=1, le=100_000, description="evaluated devices a window needs to be judged"
    )

    @model_validator(mode="after")
    def _js_is_a_distance(self) -> DriftCondition:
        if self.metric == "js" and self.threshold is not None and self.threshold > 1:
            raise ValueError("a Jensen-Shannon distance lies in [0, 1]; threshold must be <= 1")
        if self.features is not None and not self.features:
            raise ValueError("features: name at least one, or leave it out for every feature")
        return self

    @property
    def limit(self) -> float:
        return self.threshold if self.threshold is not None else DEFAULT_THRESHOLDS[self.metric]


class AccuracyCondition(WindowedCondition):
    kind: Literal["accuracy"] = "accuracy"
    min_accuracy: float = Field(gt=0, le=1, description="the accuracy SLA, as a fraction")
    min_labels: int = Field(
        50, ge=1, le=10**9, description="labelled predictions a window needs to be judged"
    )
    window_hours: int = Field(24, ge=1, le=24, description="length of one window, whole hours")


class OfflineCondition(_Strict):
    kind: Literal["offline"] = "offline"
    offline_for: timedelta = Field(
        description="seconds or ISO 8601 (PT30M): offline at least this long"
    )
    min_devices: int = Field(1, ge=1, le=1_000_000, description="offline devices that fire it")

    @model_validator(mode="after")
    def _sensible_duration(self) -> OfflineCondition:
        if not timedelta(minutes=1) <= self.offline_for <= timedelta(days=365):
            raise ValueError("offline_for must be between one minute and a year")
        return self


AnyCondition = (
    LatencyCondition | ErrorRateCondition | DriftCondition | AccuracyCondition | OfflineCondition
)
Condition = Annotated[AnyCondition, Field(discriminator="kind")]
"""Any condition, told apart by ``kind`` (what request bodies declare)."""


_ADAPTER: TypeAdapter[AnyCondition] = TypeAdapter(Condition)


def parse_condition(text: str) -> AnyCondition:
    """A stored condition (JSON text) back as its class; it was validated when stored."""
    return _ADAPTER.validate_json(text)
