"""What a fleet drift query answers: the API's response models, built by
:mod:`server.drift.compute`.

Every share is a fraction in [0, 1]; every distance is computed on exact merged
counts with :mod:`shared.drift`'s functions; a figure that cannot be computed (no data)
is ``null``, never a made-up zero.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, Field

__all__ = [
    "DeviceDrift",
    "DeviceSummary",
    "DistributionShift",
    "DriftReport",
    "DriftTimeseries",
    "FeatureDrift",
    "FeatureSeries",
    "Level",
    "PredictionShift",
    "SeriesPoint",
    "SlaSummary",
    "Thresholds",
]


class Level(StrEnum):
    OK = "ok"
    WARN = "warn"
    ACT = "act"


class Thresholds(BaseModel):
    """PSI thresholds (ARCHITECTURE.md: 0.1 warn, 0.25 act) and the per-device sample floor."""

    warn: float = Field(0.1, gt=0)
    act: float = Field(0.25, gt=0)
    min_samples: int = Field(
        500,
        ge=1,
        description="a device's feature counts toward the device shares only with at least "
        "this many values in the range (PSI of a few rows is noise)",
    )

    def level(self, psi: float) -> Level:
        if psi >= self.act:
            return Level.ACT
        return Level.WARN if psi >= self.warn else Level.OK


class FeatureDrift(BaseModel):
    """One feature over the whole scope, from the merged counts."""

    name: str
    n: int = Field(description="values counted (including NaN)")
    psi: float
    js_distance: float = Field(description="Jensen-Shannon distance, base 2, in [0, 1]")
    ks: float = Field(description="Kolmogorov-Smirnov statistic from the binned CDFs")
    chi_squared: float
    degrees_of_freedom: int
    nan_share: float
    out_of_range_share: float = Field(description="below the first or above the last edge")
    mean_shift: float = Field(description="live mean - reference mean, in reference std devs")
    level: Level
    devices_act_share: float | None = Field(
        description="share of evaluated devices whose own PSI on this feature is at 'act'"
    )
    devices_warn_share: float | None = Field(
        description="share of evaluated devices whose own PSI on this feature is warn or act"
    )


class DeviceDrift(BaseModel):
    """One device, from its own merged counts."""

    device_id: str
    n: int = Field(description="values counted per feature (the largest)")
    psi: float = Field(description="its largest PSI over the features it has enough values for")
    feature: str = Field(description="the feature with that PSI")
    level: Level
    features_act: int
    features_warn: int = Field(description="features at warn or act")


class DeviceSummary(BaseModel):
    in_scope: int | None = Field(
        description="devices the group or list names (null: the whole fleet)"
    )
    with_drift_data: int = Field(description="devices that sent drift counts in the range")
    evaluated: int = Field(description="of those, devices with enough values (min_samples)")
    act: int
    warn: int = Field(description="at warn but not act")
    drifted_share: float | None = Field(description="act / evaluated")
    warning_share: float | None = Field(description="(warn + act) / evaluated")


class DistributionShift(BaseModel):
    """A predicted distribution (classes, confidence, value bins) against the reference."""

    n: int
    psi: float
    js_distance: float
    level: Level
    reference: list[float] = Field(description="reference proportions")
    live: list[float] = Field(description="live proportions")


class PredictionShift(BaseModel):
    classes: DistributionShift | None = None
    confidence: DistributionShift | None = None
    value: DistributionShift | None = None


class SlaSummary(BaseModel):
    """Latency and errors from the devices' latency histograms and counters."""

    windows: int
    inferences: int
    errors: int
    error_rate: float | None = Field(description="errors / (inferences + errors)")
    p50_ms: float | None = Field(description="upper bound of the bucket holding it")
    p95_ms: float | None
    p99_ms: float | None
    over_max: int = Field(description="requests slower than the largest bucket (about 60 s)")


class DriftReport(BaseModel):
    model: str
    version: int
    reference_id: str
    group: str | None
    since: datetime = Field(description="start of the range answered (whole hours, UTC)")
    until: datetime = Field(description="end of the range answered (exclusive)")
    widened: bool = Field(
        description="the range grew to whole days: its end hours' hourly rows were deleted"
    )
    clipped: bool = Field(description="the range's start was deleted by retention")
    thresholds: Thresholds
    devices: DeviceSummary
    features: list[FeatureDrift] = Field(description="in the reference's order")
    top_features: list[str] = Field(description="features at warn or act, largest PSI first")
    top_devices: list[DeviceDrift] = Field(description="evaluated devices, largest PSI first")
    predictions: PredictionShift | None
    sla: SlaSummary
    rows_read: dict[str, int] = Field(description="rollup rows read, per period")


class SeriesPoint(BaseModel):
    start: datetime
    end: datetime
    n: int
    psi: float | None
    js_distance: float | None
    ks: float | None
    level: Level | None


class FeatureSeries(BaseModel):
    feature: str
    points: list[SeriesPoint]


class DriftTimeseries(BaseModel):
    model: str
    version: int
    reference_id: str
    group: str | None
    bucket: str = Field(description="hour or day")
    since: datetime
    until: datetime
    series: list[FeatureSeries]
