"""Health gates of a rollout phase: pure evaluation of device signals against thresholds.

Five gates, each disabled by setting its threshold to ``None``:

=========================  ==========================================================
gate                       value compared with its threshold
=========================  ==========================================================
``activation_failures``    share of the rollout's devices whose update finished in
                           failure -- reported (rejected, failed, rolled back on the
                           device) or silent past the per-device timeout
``inference_errors``       errors / inferences of the new version on the canary devices
``latency_p95``            per profile: p95 of the merged latency histograms of the
                           new version, divided by the profile's SLA
``confidence_drop``        mean top-class confidence of the devices still on the
                           previous version minus that of the canary devices
``prediction_drift``       PSI of the canary's predicted-class distribution against
                           that of the devices still on the previous version
=========================  ==========================================================

What always holds:

- Every function is pure: data in, :class:`HealthGateResult` out; no clock, no I/O.
- A gate is ``breached`` only on enough evidence (``min_outcomes`` finished devices,
  ``min_inferences`` inferences on each side it compares); with less it is
  ``insufficient_data``, never ``holds``. Each result names its value, its threshold
  and the evidence it was computed from.
- Counts merge by addition (:mod:`shared.latency`, :mod:`shared.drift`), so a gate over
  many devices and windows equals the gate over their pooled raw data -- up to the
  latency bucket width: ``latency_p95`` reads the upper bound of the bucket holding the
  95th percentile, at most one bucket (about 19 %) above the exact value, so it errs
  towards breaching.
- Confidence means come from the confidence histogram (:data:`shared.drift.CONFIDENCE_BINS`
  equal bins over [0, 1], each counted at its centre): within half a bin (0.05) of the
  exact mean, and exact for the difference when both sides fall in the same bins.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from shared.drift import CONFIDENCE_BINS, psi
from shared.latency import LATENCY_BOUNDS_MS, N_LATENCY_BUCKETS, latency_quantile
from shared.messages import ModelWindow

__all__ = [
    "DeviceWindows",
    "GateName",
    "GateStatus",
    "HealthGateResult",
    "HealthReport",
    "HealthThresholds",
    "activation_gate",
    "confidence_gate",
    "error_rate_gate",
    "evaluate_gates",
    "latency_gate",
    "prediction_drift_gate",
]

_MAX_LISTED_DEVICES = 20
IntArray = npt.NDArray[np.int64]


class GateStatus(StrEnum):
    HOLDS = "holds"
    BREACHED = "breached"
    INSUFFICIENT_DATA = "insufficient_data"


class GateName(StrEnum):
    ACTIVATION_FAILURES = "activation_failures"
    INFERENCE_ERRORS = "inference_errors"
    LATENCY_P95 = "latency_p95"
    CONFIDENCE_DROP = "confidence_drop"
    PREDICTION_DRIFT = "prediction_drift"


class HealthThresholds(BaseModel):
    """The limits a phase must stay within; ``None`` turns a gate off."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_activation_failure_rate: float | None = Field(
        0.1, ge=0, le=1, description="failed or timed-out devices / finished devices"
    )
    min_outcomes: int = Field(1, ge=1, description="finished devices needed to judge activation")
    max_error_rate: float | None = Field(
        0.01, ge=0, le=1, description="inference errors / inferences on the new version"
    )
    max_latency_sla_ratio: float | None = Field(
        1.0, gt=0, description="p95 latency of the new version / the profile's SLA"
    )
    max_confidence_drop: float | None = Field(
        0.05, ge=0, le=1, description="mean confidence: previous version minus new version"
    )
    max_prediction_psi: float | None = Field(
        0.25, ge=0, description="PSI of predicted classes, new version vs previous version"
    )
    min_inferences: int = Field(
        200, ge=1, description="inferences needed on each side a telemetry gate compares"
    )
    require_evidence: bool = Field(
        True,
        description="a phase with a gate short of data waits for the operator's approval "
        "instead of advancing",
    )


class HealthGateResult(BaseModel):
    """One gate's verdict, with the numbers it rests on."""

    model_config = ConfigDict(frozen=True)

    gate: GateName
    status: GateStatus
    value: float | None = None
    threshold: float
    summary: str
    evidence: dict[str, JsonValue] = Field(default_factory=dict)


class HealthReport(BaseModel):
    """Every enabled gate of one evaluation."""

    model_config = ConfigDict(frozen=True)

    results: tuple[HealthGateResult, ...] = ()

    @property
    def breached(self) -> tuple[HealthGateResult, ...]:
        return tuple(r for r in self.results if r.status is GateStatus.BREACHED)

    @property
    def insufficient(self) -> tuple[HealthGateResult, ...]:
        return tuple(r for r in self.results if r.status is GateStatus.INSUFFICIENT_DATA)

    @property
    def status(self) -> GateStatus:
        if self.breached:
            return GateStatus.BREACHED
        if self.insufficient:
            return GateStatus.INSUFFICIENT_DATA
        return GateStatus.HOLDS


@dataclass(frozen=True, slots=True)
class DeviceWindows:
    """Telemetry windows of one model from one device, any version."""

    device_id: str
    profile: str
    windows: Sequence[ModelWindow] = field(default_factory=tuple)
    latency_sla_ms: float | None = None


# ----------------------------------------------------------------------------- the gates


def activation_gate(
    *,
    activated: Iterable[str],
    failed: Iterable[str],
    timed_out: Iterable[str],
    limit: float,
    min_outcomes: int = 1,
) -> HealthGateResult:
    """Failed plus timed-out devices over every finished device."""
    ok, bad, silent = sorted(activated), sorted(failed), sorted(timed_out)
    finished = len(ok) + len(bad) + len(silent)
    failures = len(bad) + len(silent)
    evidence: dict[str, JsonValue] = {
        "activated": len(ok),
        "failed": len(bad),
        "timed_out": len(silent),
        "failed_devices": list((bad + silent)[:_MAX_LISTED_DEVICES]),
    }
    if finished < min_outcomes:
        return HealthGateResult(
            gate=GateName.ACTIVATION_FAILURES,
            status=GateStatus.INSUFFICIENT_DATA,
            threshold=limit,
            summary=f"{finished} of the {min_outcomes} finished device(s) needed",
            evidence=evidence,
        )
    rate = failures / finished
    status = GateStatus.BREACHED if rate > limit else GateStatus.HOLDS
    return HealthGateResult(
        gate=GateName.ACTIVATION_FAILURES,
        status=status,
        value=rate,
        threshold=limit,
        summary=f"{failures} of {finished} device(s) failed or timed out "
        f"({rate:.1%}, limit {limit:.1%})",
        evidence=evidence,
    )


def error_rate_gate(
    windows: Iterable[ModelWindow], *, limit: float, min_inferences: int
) -> HealthGateResult:
    """Inference errors over inferences, summed over ``windows`` (the new version's)."""
    inferences = errors = 0
    for window in windows:
        inferences += window.inferences
        errors += window.errors
    evidence: dict[str, JsonValue] = {"inferences": inferences, "errors": errors}
    if inferences < min_inferences:
        return HealthGateResult(
            gate=GateName.INFERENCE_ERRORS,
            status=GateStatus.INSUFFICIENT_DATA,
            threshold=limit,
            summary=f"{inferences} of the {min_inferences} inferences needed",
            evidence=evidence,
        )
    rate = errors / inferences
    return HealthGateResult(
        gate=GateName.INFERENCE_ERRORS,
        status=GateStatus.BREACHED if rate > limit else GateStatus.HOLDS,
        value=rate,
        threshold=limit,
        summary=f"{errors} error(s) in {inferences} inferences ({rate:.2%}, limit {limit:.2%})",
        evidence=evidence,
    )


def _merged_latency(windows: Iterable[ModelWindow]) -> IntArray:
    counts = np.zeros(N_LATENCY_BUCKETS, dtype=np.int64)
    for window in windows:
        counts += np.asarray(window.latency_ms.counts, dtype=np.int64)
    return counts


def latency_gate(
    devices: Iterable[DeviceWindows], *, model_version: int, limit: float, min_inferences: int
) -> HealthGateResult:
    """Per profile, p95 of the merged histograms over the profile's SLA; the worst counts.

    Profiles without an SLA are listed and skipped. The gate is breached when any
    profile with at least ``min_inferences`` timed inferences is over the limit; short of
    data when none is over but some profile has fewer (it might be) or none was judged.
    """
    by_profile: dict[str, list[ModelWindow]] = {}
    sla_of: dict[str, float] = {}
    for device in devices:
        by_profile.setdefault(device.profile, []).extend(
            w for w in device.windows if w.model_version == model_version
        )
        if device.latency_sla_ms is not None:
            sla_of.setdefault(device.profile, device.latency_sla_ms)
    profiles: dict[str, JsonValue] = {}
    judged: list[str] = []
    over: list[str] = []
    short: list[str] = []
    worst: float | None = None
    for profile in sorted(by_profile):
        counts = _merged_latency(by_profile[profile])
        timed = int(counts.sum())
        sla = sla_of.get(profile)
        p95 = latency_quantile(counts, 0.95)
        # The overflow bucket has no upper bound: that p95 is only "above the largest bound".
        overflow = p95 is not None and math.isinf(p95)
        profiles[profile] = {
            "inferences": timed,
            "sla_ms": sla,
            "p95_ms": None if p95 is None or overflow else p95,
            "p95_above_largest_bucket": overflow,
        }
        if sla is None:
            continue
        if timed < min_inferences or p95 is None:
            short.append(profile)
            continue
        shown = f"> {LATENCY_BOUNDS_MS[-1]:g}" if overflow else f"{p95:g}"
        ratio = p95 / sla
        worst = ratio if worst is None else max(worst, ratio)
        line = f"{profile}: p95 {shown} ms vs SLA {sla:g} ms"
        judged.append(line)
        if ratio > limit:
            over.append(line)
    evidence: dict[str, JsonValue] = {"profiles": profiles}
    value = None if worst is None or math.isinf(worst) else worst
    if over:
        status, summary = GateStatus.BREACHED, "; ".join(over)
    elif short or not judged:
        status = GateStatus.INSUFFICIENT_DATA
        summary = (
            f"fewer than {min_inferences} timed inferences on {', '.join(short)}"
            if short
            else "no profile with a latency SLA has reported"
        )
    else:
        status, summary = GateStatus.HOLDS, "; ".join(judged)
    return HealthGateResult(
        gate=GateName.LATENCY_P95,
        status=status,
        value=value,
        threshold=limit,
        summary=summary,
        evidence=evidence,
    )


def _confidence(windows: Iterable[ModelWindow]) -> IntArray:
    total = np.zeros(CONFIDENCE_BINS, dtype=np.int64)
    for window in windows:
        predictions = None if window.drift is None else window.drift.predictions
        if predictions is None or predictions.confidence_counts is None:
            continue
        if len(predictions.confidence_counts) != CONFIDENCE_BINS:
            continue  # not the fixed histogram: cannot be compared
        total += np.asarray(predictions.confidence_counts, dtype=np.int64)
    return total


def _mean_confidence(counts: IntArray) -> float:
    centres = (np.arange(CONFIDENCE_BINS) + 0.5) / CONFIDENCE_BINS
    return float((counts * centres).sum() / counts.sum())


def confidence_gate(
    canary: Iterable[ModelWindow],
    baseline: Iterable[ModelWindow],
    *,
    limit: float,
    min_inferences: int,
) -> HealthGateResult:
    """Mean confidence of the previous version minus that of the new one."""
    new, old = _confidence(canary), _confidence(baseline)
    n_new, n_old = int(new.sum()), int(old.sum())
    evidence: dict[str, JsonValue] = {
        "canary_predictions": n_new,
        "baseline_predictions": n_old,
        "canary_histogram": [int(c) for c in new],
        "baseline_histogram": [int(c) for c in old],
    }
    if n_new < min_inferences or n_old < min_inferences:
        return HealthGateResult(
            gate=GateName.CONFIDENCE_DROP,
            status=GateStatus.INSUFFICIENT_DATA,
            threshold=limit,
            summary=f"{n_new} canary and {n_old} baseline prediction(s); "
            f"{min_inferences} needed on each side",
            evidence=evidence,
        )
    mean_new, mean_old = _mean_confidence(new), _mean_confidence(old)
    drop = mean_old - mean_new
    evidence["canary_mean"] = mean_new
    evidence["baseline_mean"] = mean_old
    return HealthGateResult(
        gate=GateName.CONFIDENCE_DROP,
        status=GateStatus.BREACHED if drop > limit else GateStatus.HOLDS,
        value=drop,
        threshold=limit,
        summary=f"mean confidence {mean_new:.3f} on the new version vs {mean_old:.3f} on the "
        f"previous one (drop {drop:+.3f}, limit {limit:.3f})",
        evidence=evidence,
    )


def _class_counts(windows: Iterable[ModelWindow]) -> list[int] | None:
    """Summed predicted-class counts; None when the windows disagree on the class count."""
    total: IntArray | None = None
    for window in windows:
        predictions = None if window.drift is None else window.drift.predictions
        if predictions is None or predictions.class_counts is None:
            continue
        counts = np.asarray(predictions.class_counts, dtype=np.int64)
        if total is None:
            total = counts.copy()
        elif total.size != counts.size:
            return None
        else:
            total += counts
    return [] if total is None else [int(c) for c in total]


def prediction_drift_gate(
    canary: Iterable[ModelWindow],
    baseline: Iterable[ModelWindow],
    *,
    limit: float,
    min_inferences: int,
) -> HealthGateResult:
    """PSI of the canary's predicted-class counts against the previous version's."""
    new, old = _class_counts(canary), _class_counts(baseline)
    evidence: dict[str, JsonValue] = {
        "canary_classes": None if new is None else [*new],
        "baseline_classes": None if old is None else [*old],
    }
    if new is None or old is None or (new and old and len(new) != len(old)):
        return HealthGateResult(
            gate=GateName.PREDICTION_DRIFT,
            status=GateStatus.INSUFFICIENT_DATA,
            threshold=limit,
            summary="the two versions report different class counts: no comparison",
            evidence=evidence,
        )
    n_new, n_old = sum(new), sum(old)
    if n_new < min_inferences or n_old < min_inferences:
        return HealthGateResult(
            gate=GateName.PREDICTION_DRIFT,
            status=GateStatus.INSUFFICIENT_DATA,
            threshold=limit,
            summary=f"{n_new} canary and {n_old} baseline prediction(s); "
            f"{min_inferences} needed on each side",
            evidence=evidence,
        )
    value = psi(old, new)
    return HealthGateResult(
        gate=GateName.PREDICTION_DRIFT,
        status=GateStatus.BREACHED if value >= limit else GateStatus.HOLDS,
        value=value,
        threshold=limit,
        summary=f"PSI of predicted classes, new vs previous version: {value:.3f} "
        f"(limit {limit:.3f})",
        evidence=evidence,
    )


def evaluate_gates(
    thresholds: HealthThresholds,
    *,
    model_version: int,
    activated: Iterable[str],
    failed: Iterable[str],
    timed_out: Iterable[str],
    canary: Sequence[DeviceWindows],
    baseline: Sequence[DeviceWindows],
) -> HealthReport:
    """Every enabled gate.

    ``canary``: devices of the rollout that run the new version; only their windows of
    ``model_version`` count. ``baseline``: devices whose windows of *other* versions of
    the model count as the previous version's behaviour.
    """
    new_windows = [w for d in canary for w in d.windows if w.model_version == model_version]
    old_windows = [w for d in baseline for w in d.windows if w.model_version != model_version]
    results = []
    if thresholds.max_activation_failure_rate is not None:
        results.append(
            activation_gate(
                activated=activated,
                failed=failed,
                timed_out=timed_out,
                limit=thresholds.max_activation_failure_rate,
                min_outcomes=thresholds.min_outcomes,
            )
        )
    if thresholds.max_error_rate is not None:
        results.append(
            error_rate_gate(
                new_windows,
                limit=thresholds.max_error_rate,
                min_inferences=thresholds.min_inferences,
            )
        )
    if thresholds.max_latency_sla_ratio is not None:
        results.append(
            latency_gate(
                canary,
                model_version=model_version,
                limit=thresholds.max_latency_sla_ratio,
                min_inferences=thresholds.min_inferences,
            )
        )
    if thresholds.max_confidence_drop is not None:
        results.append(
            confidence_gate(
                new_windows,
                old_windows,
                limit=thresholds.max_confidence_drop,
                min_inferences=thresholds.min_inferences,
            )
        )
    if thresholds.max_prediction_psi is not None:
        results.append(
            prediction_drift_gate(
                new_windows,
                old_windows,
                limit=thresholds.max_prediction_psi,
                min_inferences=thresholds.min_inferences,
            )
        )
    return HealthReport(results=tuple(results))
