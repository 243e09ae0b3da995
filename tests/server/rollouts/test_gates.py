from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from server.rollouts.gates import (
    DeviceWindows,
    GateName,
    GateStatus,
    HealthThresholds,
    activation_gate,
    confidence_gate,
    error_rate_gate,
    evaluate_gates,
    latency_gate,
    prediction_drift_gate,
)
from shared.latency import latency_counts, latency_quantile
from shared.messages import LatencyHistogram, ModelWindow
from tests.server.rollouts.conftest import MODEL, PROFILE, SLA_MS, window


def test_activation_counts_timeouts_as_failures_and_names_the_devices() -> None:
    result = activation_gate(
        activated=["a", "b", "c"], failed=["d"], timed_out=["e"], limit=0.3, min_outcomes=1
    )
    assert result.status is GateStatus.BREACHED
    assert result.value == 2 / 5
    assert result.evidence["failed"] == 1 and result.evidence["timed_out"] == 1
    assert result.evidence["failed_devices"] == ["d", "e"]
    assert "2 of 5" in result.summary
    holding = activation_gate(activated=["a"] * 9, failed=[], timed_out=["e"], limit=0.1)
    assert holding.status is GateStatus.HOLDS  # 10 % is not above 10 %


def test_activation_needs_enough_finished_devices() -> None:
    result = activation_gate(activated=[], failed=["x"], timed_out=[], limit=0.1, min_outcomes=3)
    assert result.status is GateStatus.INSUFFICIENT_DATA and result.value is None


def test_error_rate_sums_windows_and_waits_for_enough_inferences() -> None:
    windows = [window(2, inferences=150, errors=3), window(2, inferences=150, errors=0)]
    result = error_rate_gate(windows, limit=0.005, min_inferences=200)
    assert result.status is GateStatus.BREACHED and result.value == 3 / 300
    assert result.evidence == {"inferences": 300, "errors": 3}
    short = error_rate_gate(windows[:1], limit=0.5, min_inferences=200)
    assert short.status is GateStatus.INSUFFICIENT_DATA


@given(
    st.lists(
        st.lists(st.floats(0.01, 500.0, allow_nan=False), min_size=1, max_size=40),
        min_size=1,
        max_size=6,
    )
)
def test_latency_p95_of_merged_windows_equals_the_p95_of_the_pooled_latencies(
    per_window: list[list[float]],
) -> None:
    windows = [
        ModelWindow(
            model_name=MODEL,
            model_version=2,
            target=PROFILE,
            inferences=len(values),
            latency_ms=LatencyHistogram(counts=latency_counts(values).tolist()),
        )
        for values in per_window
    ]
    pooled = latency_quantile(latency_counts([v for values in per_window for v in values]), 0.95)
    assert pooled is not None
    result = latency_gate(
        [DeviceWindows("d1", PROFILE, windows, SLA_MS)],
        model_version=2,
        limit=1.0,
        min_inferences=1,
    )
    assert result.value == pooled / SLA_MS
    expected = GateStatus.BREACHED if pooled / SLA_MS > 1.0 else GateStatus.HOLDS
    assert result.status is expected


def test_latency_judges_each_profile_against_its_own_sla() -> None:
    fast = DeviceWindows("d1", "gpu", [window(2, latency_ms=20.0)], latency_sla_ms=15.0)
    slow_ok = DeviceWindows("d2", PROFILE, [window(2, latency_ms=20.0)], latency_sla_ms=SLA_MS)
    result = latency_gate([fast, slow_ok], model_version=2, limit=1.0, min_inferences=50)
    assert result.status is GateStatus.BREACHED
    assert result.summary.startswith("gpu: p95")
    assert PROFILE not in result.summary  # within its SLA, so not blamed
    profiles = result.evidence["profiles"]
    assert isinstance(profiles, dict) and set(profiles) == {"gpu", PROFILE}


def test_latency_ignores_other_versions_and_profiles_without_an_sla() -> None:
    old_and_slow = DeviceWindows("d1", PROFILE, [window(1, latency_ms=900.0)], SLA_MS)
    no_sla = DeviceWindows("d2", "lab", [window(2, latency_ms=900.0)], None)
    result = latency_gate([old_and_slow, no_sla], model_version=2, limit=1.0, min_inferences=1)
    assert result.status is GateStatus.INSUFFICIENT_DATA  # nothing judged


def test_latency_in_the_overflow_bucket_breaches() -> None:
    device = DeviceWindows("d1", PROFILE, [window(2, latency_ms=10**6)], SLA_MS)
    result = latency_gate([device], model_version=2, limit=1.0, min_inferences=1)
    assert result.status is GateStatus.BREACHED and result.value is None
    assert "p95 >" in result.summary


def test_confidence_drop_compares_canary_with_the_previous_version() -> None:
    canary = [window(2, inferences=300, confidence=0.62)]
    baseline = [window(1, inferences=300, confidence=0.91)]
    result = confidence_gate(canary, baseline, limit=0.05, min_inferences=200)
    assert result.status is GateStatus.BREACHED
    assert result.value is not None and abs(result.value - 0.3) < 1e-9  # bin centres .65 / .95
    assert result.evidence["canary_mean"] == 0.65
    better = confidence_gate(baseline, canary, limit=0.05, min_inferences=200)
    assert better.status is GateStatus.HOLDS and better.value is not None and better.value < 0
    assert (
        confidence_gate(canary, [], limit=0.05, min_inferences=1).status
        is GateStatus.INSUFFICIENT_DATA
    )


def test_prediction_drift_is_the_psi_of_class_counts() -> None:
    same = prediction_drift_gate(
        [window(2, inferences=400, classes=[200, 200])],
        [window(1, inferences=400, classes=[190, 210])],
        limit=0.25,
        min_inferences=100,
    )
    assert same.status is GateStatus.HOLDS and same.value is not None and same.value < 0.01
    shifted = prediction_drift_gate(
        [window(2, inferences=400, classes=[380, 20])],
        [window(1, inferences=400, classes=[200, 200])],
        limit=0.25,
        min_inferences=100,
    )
    assert shifted.status is GateStatus.BREACHED
    other_classes = prediction_drift_gate(
        [window(2, inferences=400, classes=[100, 100, 200])],
        [window(1, inferences=400, classes=[200, 200])],
        limit=0.25,
        min_inferences=100,
    )
    assert other_classes.status is GateStatus.INSUFFICIENT_DATA


def test_evaluate_splits_versions_and_skips_disabled_gates() -> None:
    thresholds = HealthThresholds(max_prediction_psi=None, min_inferences=100)
    canary = [DeviceWindows("c1", PROFILE, [window(2, errors=5), window(1, errors=99)], SLA_MS)]
    baseline = [DeviceWindows("b1", PROFILE, [window(1), window(2, errors=99)])]
    report = evaluate_gates(
        thresholds,
        model_version=2,
        activated=["c1"],
        failed=[],
        timed_out=[],
        canary=canary,
        baseline=baseline,
    )
    names = [r.gate for r in report.results]
    assert names == [
        GateName.ACTIVATION_FAILURES,
        GateName.INFERENCE_ERRORS,
        GateName.LATENCY_P95,
        GateName.CONFIDENCE_DROP,
    ]
    errors = report.results[1]
    assert errors.evidence == {"inferences": 100, "errors": 5}  # only c1's v2 window
    assert report.status is GateStatus.BREACHED and report.breached == (errors,)
    confidence = report.results[3]
    assert confidence.evidence["baseline_predictions"] == 100  # only b1's v1 window
    assert np.isclose(confidence.value or 0.0, 0.0)
