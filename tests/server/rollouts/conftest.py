"""Shared data for the rollout tests: a fixed clock, telemetry windows, gate presets."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np

from server.rollouts.gates import HealthThresholds
from shared.drift import CONFIDENCE_BINS, DriftSketch, PredictionSketch
from shared.latency import latency_counts
from shared.messages import LatencyHistogram, ModelWindow

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
MODEL = "digits"
PROFILE = "edge-arm64-litert"
SLA_MS = 50.0

ACTIVATION_ONLY = HealthThresholds(
    max_error_rate=None,
    max_latency_sla_ratio=None,
    max_confidence_drop=None,
    max_prediction_psi=None,
)
"""Only the activation gate: for tests about phases, timing and devices."""


def window(
    version: int,
    *,
    inferences: int = 100,
    errors: int = 0,
    latency_ms: float = 5.0,
    confidence: float = 0.9,
    classes: Sequence[int] | None = None,
) -> ModelWindow:
    """One telemetry window: every inference at ``latency_ms`` and ``confidence``.

    ``classes``: predicted-class counts (default: all in class 0).
    """
    confidence_counts = np.zeros(CONFIDENCE_BINS, dtype=np.int64)
    confidence_counts[min(int(confidence * CONFIDENCE_BINS), CONFIDENCE_BINS - 1)] = inferences
    return ModelWindow(
        model_name=MODEL,
        model_version=version,
        target=PROFILE,
        inferences=inferences,
        errors=errors,
        latency_ms=LatencyHistogram(counts=latency_counts([latency_ms] * inferences).tolist()),
        drift=DriftSketch(
            reference_id="ab" * 32,
            features=[],
            predictions=PredictionSketch(
                class_counts=list(classes) if classes is not None else [inferences, 0],
                confidence_counts=confidence_counts.tolist(),
            ),
        ),
    )
