"""The gates as a pure function of a hand-built TargetBuild, its profile and config."""

from __future__ import annotations

import math

import pytest

from server.pipeline.gates import check_gates, metric_delta
from server.pipeline.types import GateConfig, TargetBuild
from server.profiles import Profile, load_profiles
from shared.bundle import OpRequirement

PROFILES = load_profiles()
EDGE = PROFILES["edge-arm64-litert"]
LEGACY = PROFILES["legacy-armv7-tflite"]
ONNX = PROFILES["onprem-x86_64-onnx-int8"]


def build(
    *,
    profile: Profile = EDGE,
    value: float | None = 0.95,
    size: int = 1000,
    ops: list[OpRequirement] | None = None,
    model: bytes | None = b"model",
    error: str | None = None,
) -> TargetBuild:
    return TargetBuild(
        profile=profile.name,
        format=profile.formats[0],
        quantization=profile.quantization,
        runtime=profile.runtime.name,
        min_runtime_version=profile.runtime.version,
        model=model,
        metric_name="accuracy",
        metric_value=value,
        size_bytes=size,
        ops=ops if ops is not None else [OpRequirement(name="FULLY_CONNECTED", version=4)],
        error=error,
    )


def test_a_good_build_passes() -> None:
    result = check_gates(
        build=build(), profile=EDGE, config=GateConfig(), float_metric=0.955, task="classification"
    )
    assert result.passed and result.reasons == []


def test_metric_gate_counts_accuracy_points() -> None:
    result = check_gates(
        build=build(value=0.93),
        profile=EDGE,
        config=GateConfig(),
        float_metric=0.95,
        task="classification",
    )
    assert not result.passed
    (reason,) = result.reasons
    assert "accuracy dropped 2.00 points" in reason and "95.00% -> 93.00%" in reason
    assert "the limit is 1.00 points" in reason
    # Exactly at the limit passes; a better artifact passes; the limit is configurable.
    at_limit = check_gates(
        build=build(value=0.94),
        profile=EDGE,
        config=GateConfig(),
        float_metric=0.95,
        task="classification",
    )
    assert at_limit.passed
    relaxed = GateConfig(max_metric_drop=2.5)
    assert check_gates(
        build=build(value=0.93),
        profile=EDGE,
        config=relaxed,
        float_metric=0.95,
        task="classification",
    ).passed
    assert check_gates(
        build=build(value=0.99),
        profile=EDGE,
        config=GateConfig(),
        float_metric=0.95,
        task="classification",
    ).passed


def test_metric_gate_counts_percent_rmse_for_regression() -> None:
    worse = build(value=2.06)
    result = check_gates(
        build=worse, profile=EDGE, config=GateConfig(), float_metric=2.0, task="regression"
    )
    (reason,) = result.reasons
    assert "RMSE rose 3.00%" in reason and "the limit is 1.00%" in reason
    assert check_gates(
        build=worse,
        profile=EDGE,
        config=GateConfig(max_metric_drop=5),
        float_metric=2.0,
        task="regression",
    ).passed
    assert metric_delta("regression", float_metric=2.0, value=1.9) == pytest.approx(-5.0)
    assert metric_delta("classification", float_metric=0.9, value=0.88) == pytest.approx(2.0)
    assert math.isinf(metric_delta("regression", float_metric=0.0, value=0.1))


def test_a_build_without_a_metric_fails() -> None:
    result = check_gates(
        build=build(value=None),
        profile=EDGE,
        config=GateConfig(),
        float_metric=0.9,
        task="classification",
    )
    assert result.reasons == ["accuracy was not measured in the target runtime"]


def test_size_gate_names_size_and_budget() -> None:
    too_big = build(size=EDGE.max_model_bytes + 1)
    result = check_gates(
        build=too_big, profile=EDGE, config=GateConfig(), float_metric=0.95, task="classification"
    )
    (reason,) = result.reasons
    assert f"{EDGE.max_model_bytes + 1:,} bytes" in reason
    assert f"{EDGE.max_model_bytes:,} bytes" in reason and EDGE.name in reason
    off = GateConfig(enforce_size_budget=False)
    assert check_gates(
        build=too_big, profile=EDGE, config=off, float_metric=0.95, task="classification"
    ).passed
    at_budget = build(size=EDGE.max_model_bytes)
    assert check_gates(
        build=at_budget, profile=EDGE, config=GateConfig(), float_metric=0.95, task="classification"
    ).passed


def test_op_gate_fails_the_legacy_profile_with_the_op_named() -> None:
    newer = build(profile=LEGACY, ops=[OpRequirement(name="FULLY_CONNECTED", version=12)])
    result = check_gates(
        build=newer, profile=LEGACY, config=GateConfig(), float_metric=0.95, task="classification"
    )
    assert result.reasons == [
        "op not supported by tflite-runtime 2.14.0: FULLY_CONNECTED version 12: "
        "tflite-runtime 2.14.0 supports FULLY_CONNECTED only up to version 10"
    ]
    # The same build is fine for ai-edge-litert 2.3, and with the op gate off.
    assert check_gates(
        build=newer, profile=EDGE, config=GateConfig(), float_metric=0.95, task="classification"
    ).passed
    off = GateConfig(enforce_op_support=False)
    assert check_gates(
        build=newer, profile=LEGACY, config=off, float_metric=0.95, task="classification"
    ).passed


def test_op_gate_fails_closed_for_a_runtime_version_without_a_table() -> None:
    older = LEGACY.model_copy(
        update={"runtime": LEGACY.runtime.model_copy(update={"version": "2.13.0"})}
    )
    result = check_gates(
        build=build(profile=older),
        profile=older,
        config=GateConfig(),
        float_metric=0.95,
        task="classification",
    )
    (reason,) = result.reasons
    assert reason.startswith(
        "op support cannot be checked: no op-support table for tflite-runtime 2.13.0"
    )


def test_onnx_ops_are_gated_on_their_opset() -> None:
    new_opset = build(profile=ONNX, ops=[OpRequirement(name="Conv", version=23)])
    result = check_gates(
        build=new_opset, profile=ONNX, config=GateConfig(), float_metric=0.95, task="classification"
    )
    (reason,) = result.reasons
    assert "Conv at ai.onnx opset 23" in reason and "up to opset 21" in reason


def test_every_failure_is_reported_at_once() -> None:
    bad = build(
        profile=LEGACY,
        value=0.5,
        size=LEGACY.max_model_bytes * 2,
        ops=[OpRequirement(name="GELU", version=3)],
    )
    result = check_gates(
        build=bad, profile=LEGACY, config=GateConfig(), float_metric=0.95, task="classification"
    )
    assert not result.passed and len(result.reasons) == 3


def test_a_build_without_a_model_or_with_an_error_fails() -> None:
    missing = build(model=None, error="TFLite float32 conversion failed: boom", ops=[])
    result = check_gates(
        build=missing, profile=EDGE, config=GateConfig(), float_metric=0.95, task="classification"
    )
    assert result.reasons == ["no artifact: TFLite float32 conversion failed: boom"]
    broken = build(error="ai-edge-litert cannot load the model: bad op")
    result = check_gates(
        build=broken, profile=EDGE, config=GateConfig(), float_metric=0.95, task="classification"
    )
    assert result.reasons == [
        "the artifact failed in its runtime: ai-edge-litert cannot load the model: bad op"
    ]
