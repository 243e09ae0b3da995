"""build_targets over the shipped profiles, with real conversions and runtimes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from server.pipeline.evaluate import LiteRTRunner, OnnxRunner
from server.pipeline.targets import build_targets
from server.pipeline.types import GateConfig, TargetBuild
from server.profiles import Profile, load_profiles

from .conftest import Prepared

PROFILES = load_profiles()


@pytest.fixture(scope="module")
def shipped_builds(
    digits: Prepared, digits_cnn: Any, digits_float_accuracy: float
) -> tuple[list[TargetBuild], list[str]]:
    messages: list[str] = []
    builds = build_targets(
        digits_cnn,
        data=digits.data,
        preprocessing=digits.steps,
        profiles=list(PROFILES.values()),
        gates=GateConfig(max_metric_drop=3.0),  # a model trained for seconds, on 447 test rows
        float_metrics={"accuracy": digits_float_accuracy},
        on_progress=messages.append,
    )
    return builds, messages


def runner_for(build: TargetBuild) -> LiteRTRunner | OnnxRunner:
    assert build.model is not None
    return LiteRTRunner(build.model) if build.format == "tflite" else OnnxRunner(build.model)


def test_one_gated_build_per_shipped_profile(
    shipped_builds: tuple[list[TargetBuild], list[str]], digits_float_accuracy: float
) -> None:
    builds, _ = shipped_builds
    assert [b.profile for b in builds] == list(PROFILES)
    for build in builds:
        profile = PROFILES[build.profile]
        assert (build.format, build.quantization) == (profile.formats[0], profile.quantization)
        assert build.runtime == profile.runtime.name
        assert build.min_runtime_version == profile.runtime.version
        assert build.error is None and build.model is not None
        assert build.gate.passed, (build.profile, build.gate.reasons)
        assert build.metric_name == "accuracy" and build.metric_value is not None
        assert set(build.metrics) == {"accuracy", "macro_f1"}
        assert build.metric_delta == pytest.approx(
            100 * (digits_float_accuracy - build.metric_value)
        )
        assert build.size_bytes == len(build.model)
        assert build.latency_p50_ms is not None and build.latency_p50_ms > 0
        assert build.ops and all(op.version >= 1 for op in build.ops)
        assert build.inputs and build.outputs and build.outputs[0].shape == [-1, 10]


def test_each_distinct_artifact_is_converted_once(
    shipped_builds: tuple[list[TargetBuild], list[str]],
) -> None:
    builds, messages = shipped_builds
    by_profile = {b.profile: b for b in builds}
    conversions = [m for m in messages if m.startswith("converting")]
    assert len(conversions) == len({(p.formats[0], p.quantization) for p in PROFILES.values()})
    # The legacy profile reuses the edge int8 artifact; it was evaluated in ai-edge-litert.
    assert by_profile["legacy-armv7-tflite"].model is by_profile["edge-arm64-litert"].model
    assert by_profile["legacy-armv7-tflite"].runtime == "tflite-runtime"
    assert by_profile["edge-arm64-litert"].inputs[0].quantization is not None
    assert (
        by_profile["edge-gpu-litert-fp16"].size_bytes < by_profile["edge-x86_64-litert"].size_bytes
    )


def test_self_tests_are_raw_rows_the_target_runtime_reproduces(
    shipped_builds: tuple[list[TargetBuild], list[str]], digits: Prepared
) -> None:
    builds, _ = shipped_builds
    for build in builds:
        (self_test,) = build.self_tests
        rows = np.asarray(self_test.input, dtype=np.float32)
        assert rows.shape == (4, 64)
        np.testing.assert_array_equal(rows, digits.data.x_test[:4])  # raw, not preprocessed
        out = runner_for(build).predict(digits.model_input(rows)).reshape(4, -1)
        np.testing.assert_allclose(out, np.asarray(self_test.expected), atol=self_test.atol)
        assert 0 < self_test.atol <= 0.05
    by_quantization = {b.quantization: b.self_tests[0].atol for b in builds if b.format == "tflite"}
    assert by_quantization["float32"] < by_quantization["float16"] < by_quantization["int8"]


def test_legacy_gate_fails_a_tf_2_21_model_with_the_op_named(
    digits: Prepared, digits_cnn: Any, digits_float_accuracy: float
) -> None:
    legacy = PROFILES["legacy-armv7-tflite"]
    legacy_dynamic = Profile.model_validate(
        legacy.model_dump() | {"name": "legacy-dynamic", "quantization": "dynamic-int8"}
    )
    (build,) = build_targets(
        digits_cnn,
        data=digits.data,
        preprocessing=digits.steps,
        profiles=[legacy_dynamic],
        gates=GateConfig(max_metric_drop=3.0),
        float_metrics={"accuracy": digits_float_accuracy},
    )
    assert build.model is not None and build.error is None  # kept, with its measurements
    assert build.metric_value is not None and build.size_bytes > 0
    assert not build.gate.passed
    assert build.gate.reasons == [
        "op not supported by tflite-runtime 2.14.0: FULLY_CONNECTED version 12: "
        "tflite-runtime 2.14.0 supports FULLY_CONNECTED only up to version 10"
    ]


def test_size_gate_in_a_real_build(
    digits: Prepared, digits_cnn: Any, digits_float_accuracy: float
) -> None:
    tiny = PROFILES["edge-x86_64-litert"].model_copy(update={"max_model_bytes": 1024})
    (build,) = build_targets(
        digits_cnn,
        data=digits.data,
        preprocessing=digits.steps,
        profiles=[tiny],
        gates=GateConfig(),
        float_metrics={"accuracy": digits_float_accuracy},
    )
    assert build.model is not None and not build.gate.passed
    (reason,) = build.gate.reasons
    assert "exceeds the budget" in reason and "1,024 bytes" in reason


def test_a_conversion_failure_stays_with_its_target(digits: Prepared) -> None:
    import keras
    import tensorflow as tf

    class Determinant(keras.layers.Layer):
        def call(self, x: Any) -> Any:  # MatrixDeterminant: no TFLite builtin, ONNX has Det
            square = tf.reshape(x[:, :4], (-1, 2, 2))
            return tf.concat([x, tf.expand_dims(tf.linalg.det(square), -1)], axis=-1)

    keras.utils.set_random_seed(0)
    flat = keras.Sequential(
        [keras.Input((64,)), Determinant(), keras.layers.Dense(10, activation="softmax")]
    )
    data = digits.data
    flat_data = type(data)(
        **{**data.__dict__, "schema": data.schema.model_copy(update={"input_shape": [64]})}
    )
    builds = build_targets(
        flat,
        data=flat_data,
        preprocessing=[digits.steps[0]],  # scale only: the model takes flat rows
        profiles=[PROFILES["edge-x86_64-litert"], PROFILES["cloud-x86_64-onnx"]],
        gates=GateConfig(),
        float_metrics={},  # measured with Keras here
    )
    tflite, onnx = builds
    assert tflite.model is None and tflite.size_bytes == 0
    assert tflite.error is not None and "MatrixDeterminant" in tflite.error
    assert not tflite.gate.passed and "MatrixDeterminant" in tflite.gate.reasons[0]
    assert onnx.model is not None and onnx.error is None
    assert onnx.gate.passed, onnx.gate.reasons
    assert onnx.metric_delta == pytest.approx(0.0, abs=1e-9)  # ONNX float32 is the float model
    assert "Det" in {op.name for op in onnx.ops}


def test_regression_targets_are_gated_on_rmse(regression: Prepared, regression_mlp: Any) -> None:
    profiles = [
        PROFILES["edge-x86_64-litert"],
        PROFILES["edge-arm64-litert"],
        PROFILES["onprem-x86_64-onnx-int8"],
    ]
    builds = build_targets(
        regression_mlp,
        data=regression.data,
        preprocessing=regression.steps,
        profiles=profiles,
        gates=GateConfig(max_metric_drop=25.0),  # percent of the float RMSE
        float_metrics={},
        self_test_rows=3,
    )
    float32, int8, onnx_int8 = builds
    for build in builds:
        assert build.metric_name == "rmse" and set(build.metrics) == {"rmse", "mae", "r2"}
        assert build.gate.passed, (build.profile, build.gate.reasons)
        assert build.outputs[0].shape == [-1, 1]
        assert len(build.self_tests[0].input) == 3 and len(build.self_tests[0].expected[0]) == 1
    assert float32.metric_delta == pytest.approx(0.0, abs=1e-3)
    assert int8.metrics["r2"] > 0.8 and onnx_int8.metrics["r2"] > 0.8
    assert int8.self_tests[0].atol >= float32.self_tests[0].atol
