"""Conversion for every quantization, each artifact run in the runtime it targets."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.errors import ServerError
from server.pipeline.convert import ConversionError, convert_onnx, convert_tflite
from server.pipeline.evaluate import LiteRTRunner, OnnxRunner, evaluate
from server.pipeline.ops import onnx_ops, tflite_ops

from .conftest import Prepared

# Accuracy points (0-100) each artifact may lose on the digits test split here.
ALLOWED_DROP = {"float32": 0.0, "float16": 0.5, "dynamic-int8": 2.0, "int8": 3.0}


@pytest.mark.parametrize("quantization", ["float32", "float16", "dynamic-int8", "int8"])
def test_tflite_quantizations_keep_accuracy_in_ai_edge_litert(
    quantization: str,
    tflite_models: dict[str, bytes],
    digits: Prepared,
    digits_float_accuracy: float,
) -> None:
    runner = LiteRTRunner(tflite_models[quantization])
    metrics = evaluate(
        runner,
        x_model_input=digits.model_input(digits.data.x_test),
        y=digits.data.y_test,
        task="classification",
    )
    assert digits_float_accuracy > 0.85  # the model learned something worth quantizing
    drop = 100 * (digits_float_accuracy - metrics["accuracy"])
    assert drop <= ALLOWED_DROP[quantization] + 1e-9, (quantization, metrics)
    assert 0 < metrics["macro_f1"] <= 1


def test_full_integer_int8_has_int8_input_and_output_with_quantization_params(
    tflite_models: dict[str, bytes],
) -> None:
    runner = LiteRTRunner(tflite_models["int8"])
    (spec_in,), (spec_out,) = runner.inputs, runner.outputs
    assert spec_in.dtype == "int8" and spec_out.dtype == "int8"
    assert spec_in.quantization is not None and spec_in.quantization.scale > 0
    assert spec_out.quantization is not None and spec_out.quantization.scale > 0
    assert -128 <= spec_in.quantization.zero_point <= 127
    assert spec_in.shape == [-1, 8, 8, 1] and spec_out.shape == [-1, 10]
    float_runner = LiteRTRunner(tflite_models["float32"])
    assert float_runner.inputs[0].dtype == "float32" and float_runner.inputs[0].quantization is None


def test_quantized_artifacts_are_smaller(tflite_models: dict[str, bytes]) -> None:
    float32 = len(tflite_models["float32"])
    assert len(tflite_models["float16"]) < 0.75 * float32
    assert len(tflite_models["dynamic-int8"]) < 0.5 * float32
    assert len(tflite_models["int8"]) < 0.5 * float32
    ops = {q: {op.name for op in tflite_ops(m)} for q, m in tflite_models.items()}
    assert "DEQUANTIZE" in ops["float16"]  # float16 weights are expanded at load time


def test_tflite_float32_matches_keras(
    tflite_models: dict[str, bytes], digits: Prepared, digits_cnn: Any
) -> None:
    x = digits.model_input(digits.data.x_test[:50])
    expected = digits_cnn.predict(x, verbose=0)
    np.testing.assert_allclose(
        LiteRTRunner(tflite_models["float32"]).predict(x), expected, atol=1e-5
    )


def test_onnx_float32_matches_keras_in_onnxruntime(
    onnx_models: dict[str, bytes], digits: Prepared, digits_cnn: Any
) -> None:
    runner = OnnxRunner(onnx_models["float32"])
    x = digits.model_input(digits.data.x_test)
    np.testing.assert_allclose(runner.predict(x), digits_cnn.predict(x, verbose=0), atol=1e-5)
    assert runner.inputs[0].name == "input" and runner.inputs[0].shape == [-1, 8, 8, 1]
    assert runner.inputs[0].dtype == "float32" and runner.outputs[0].shape == [-1, 10]


def test_onnx_int8_is_qdq_and_keeps_accuracy(
    onnx_models: dict[str, bytes], digits: Prepared, digits_float_accuracy: float
) -> None:
    names = {op.name for op in onnx_ops(onnx_models["int8"])}
    assert {"QuantizeLinear", "DequantizeLinear"} <= names
    assert len(onnx_models["int8"]) < 0.75 * len(onnx_models["float32"])
    runner = OnnxRunner(onnx_models["int8"])
    assert runner.inputs[0].dtype == "float32"  # QDQ keeps float input and output
    metrics = evaluate(
        runner,
        x_model_input=digits.model_input(digits.data.x_test),
        y=digits.data.y_test,
        task="classification",
    )
    assert 100 * (digits_float_accuracy - metrics["accuracy"]) <= 3.0


def test_onnx_int8_leaves_no_temporary_files(
    digits_cnn: Any, representative: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    convert_onnx(digits_cnn, input_shape=[8, 8, 1], quantization="int8", calibration=representative)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("edgefleet-")]


def _needs_tensorflow_ops() -> Any:
    import keras
    import tensorflow as tf

    class Determinant(keras.layers.Layer):
        """A TensorFlow op (MatrixDeterminant) that TFLite has no builtin for; ONNX has Det."""

        def call(self, x: Any) -> Any:
            square = tf.reshape(x[:, :4], (-1, 2, 2))
            return tf.concat([x, tf.expand_dims(tf.linalg.det(square), -1)], axis=-1)

    return keras.Sequential(
        [keras.Input((8,)), Determinant(), keras.layers.Dense(3, activation="softmax")]
    )


def test_a_model_needing_select_tf_ops_fails_with_the_op_named() -> None:
    with pytest.raises(ConversionError, match=r"MatrixDeterminant.*SELECT_TF_OPS") as caught:
        convert_tflite(_needs_tensorflow_ops(), quantization="float32", representative=np.zeros(0))
    assert isinstance(caught.value, ServerError) and caught.value.__cause__ is not None


def test_bad_requests_are_conversion_errors(digits_cnn: Any) -> None:
    with pytest.raises(ConversionError, match="not one of"):
        convert_tflite(digits_cnn, quantization="int4", representative=np.zeros((1, 8, 8, 1)))
    with pytest.raises(ConversionError, match="at least one row"):
        convert_tflite(digits_cnn, quantization="int8", representative=np.zeros((0, 8, 8, 1)))
    with pytest.raises(ConversionError, match="not one of"):
        convert_onnx(digits_cnn, input_shape=[8, 8, 1], quantization="float16", calibration=None)
    with pytest.raises(ConversionError, match="at least one row"):
        convert_onnx(digits_cnn, input_shape=[8, 8, 1], quantization="int8", calibration=None)
