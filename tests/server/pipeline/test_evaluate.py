"""Runtime adapters: transparent int8 quantization, batch resizing, metrics, latency."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from server.pipeline.evaluate import (
    EvaluationError,
    LiteRTRunner,
    OnnxRunner,
    evaluate,
    latency_p50_ms,
    score,
)

from .conftest import Prepared


def test_int8_runner_quantizes_inputs_and_dequantizes_outputs_with_the_tensor_params(
    tflite_models: dict[str, bytes], digits: Prepared
) -> None:
    from ai_edge_litert.interpreter import Interpreter

    runner = LiteRTRunner(tflite_models["int8"])
    x = digits.model_input(digits.data.x_test[:1])
    spec_in, spec_out = runner.inputs[0], runner.outputs[0]
    assert spec_in.quantization is not None and spec_out.quantization is not None

    # The same computation by hand, straight on the interpreter.
    interpreter = Interpreter(model_content=tflite_models["int8"])
    interpreter.allocate_tensors()
    q_in = np.clip(
        np.round(x / spec_in.quantization.scale) + spec_in.quantization.zero_point, -128, 127
    ).astype(np.int8)
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], q_in)
    interpreter.invoke()
    q_out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    by_hand = (q_out.astype(np.float32) - spec_out.quantization.zero_point) * (
        spec_out.quantization.scale
    )

    out = runner.predict(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, by_hand, rtol=0, atol=1e-7)
    assert abs(float(out.sum()) - 1.0) < 0.05  # dequantized softmax probabilities


@pytest.mark.parametrize("kind", ["tflite", "onnx"])
def test_runners_take_any_batch_size(
    kind: str, tflite_models: dict[str, bytes], onnx_models: dict[str, bytes], digits: Prepared
) -> None:
    runner = (
        LiteRTRunner(tflite_models["float32"])
        if kind == "tflite"
        else OnnxRunner(onnx_models["float32"])
    )
    x = digits.model_input(digits.data.x_test[:1300])
    whole = runner.predict(x)  # more rows than one internal batch
    assert whole.shape == (len(x), 10)
    for rows in (1, 7, 1):
        np.testing.assert_allclose(runner.predict(x[:rows]), whole[:rows], atol=1e-6)


def test_evaluate_regression_metrics(regression: Prepared, regression_mlp: Any) -> None:
    from server.pipeline.convert import convert_tflite

    model = convert_tflite(regression_mlp, quantization="float32", representative=np.zeros(0))
    metrics = evaluate(
        LiteRTRunner(model),
        x_model_input=regression.model_input(regression.data.x_test),
        y=regression.data.y_test,
        task="regression",
    )
    assert set(metrics) == {"rmse", "mae", "r2"}
    assert metrics["r2"] > 0.9 and 0 < metrics["mae"] <= metrics["rmse"]


def test_score_by_hand() -> None:
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], np.float32)
    metrics = score(probabilities, y=np.array([0, 1, 1, 1]), task="classification")
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    sigmoid = np.array([[0.2], [0.7]], np.float32)  # one unit: probability of class 1
    assert score(sigmoid, y=np.array([0, 1]), task="classification")["accuracy"] == 1.0
    values = score(np.array([[1.0], [3.0]]), y=np.array([2.0, 3.0]), task="regression")
    assert values["rmse"] == pytest.approx(np.sqrt(0.5)) and values["mae"] == pytest.approx(0.5)
    with pytest.raises(EvaluationError, match="NaN"):
        score(np.array([[np.nan]]), y=np.array([1.0]), task="regression")
    with pytest.raises(EvaluationError, match="one output value"):
        score(probabilities, y=np.zeros(4), task="regression")


def test_latency_is_a_positive_single_sample_median(
    tflite_models: dict[str, bytes], digits: Prepared
) -> None:
    runner = LiteRTRunner(tflite_models["int8"])
    sample = digits.model_input(digits.data.x_test[:1])
    latency = latency_p50_ms(runner, sample, repeats=20)
    assert 0 < latency < 100
    assert latency_p50_ms(runner, sample[0], repeats=3) > 0  # one row without its batch axis


def test_runners_refuse_what_they_cannot_load() -> None:
    with pytest.raises(EvaluationError, match="ai-edge-litert cannot load"):
        LiteRTRunner(b"not a flatbuffer at all, just some bytes")
    with pytest.raises(EvaluationError, match="onnxruntime cannot load"):
        OnnxRunner(b"not a protobuf")


@pytest.mark.parametrize("kind", ["tflite", "onnx"])
def test_runners_run_the_devices_code(
    kind: str, tflite_models: dict[str, bytes], onnx_models: dict[str, bytes], digits: Prepared
) -> None:
    from agent.runtime import open_model

    model = tflite_models["int8"] if kind == "tflite" else onnx_models["int8"]
    runner = LiteRTRunner(model) if kind == "tflite" else OnnxRunner(model)
    device = open_model(kind, model)
    assert (runner.inputs, runner.outputs) == (device.inputs, device.outputs)
    x = digits.model_input(digits.data.x_test[:9])
    np.testing.assert_array_equal(runner.predict(x), device.predict(x))


def test_the_devices_errors_become_evaluation_errors(tflite_models: dict[str, bytes]) -> None:
    runner = LiteRTRunner(tflite_models["float32"])
    with pytest.raises(EvaluationError, match="cannot run on input of shape"):
        runner.predict(np.zeros((2, 64), np.float32))  # not the model's input shape
    assert runner.predict(np.zeros((2, 8, 8, 1), np.float32)).shape == (2, 10)


def test_a_model_built_for_one_batch_size_is_evaluated_in_pieces(digits: Prepared) -> None:
    keras = pytest.importorskip("keras")
    from server.pipeline.convert import convert_tflite

    keras.utils.set_random_seed(0)
    fixed = keras.Sequential(
        [
            keras.Input((8, 8, 1), batch_size=4),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    runner = LiteRTRunner(convert_tflite(fixed, quantization="float32", representative=None))
    assert runner.inputs[0].shape[0] == 4
    x = digits.model_input(digits.data.x_test[:7])  # a full piece and a padded one
    out = runner.predict(x)
    assert out.shape == (7, 10)
    np.testing.assert_allclose(out, fixed.predict(x, verbose=0), atol=1e-5)
    metrics = evaluate(runner, x_model_input=x, y=digits.data.y_test[:7], task="classification")
    assert 0.0 <= metrics["accuracy"] <= 1.0
