"""Converting a trained Keras model into the artifact a target runs: TFLite or ONNX bytes.

- TFLite (``tf.lite.TFLiteConverter.from_keras_model``): ``float32``; ``float16``
  (weights stored as float16); ``dynamic-int8`` (int8 weights, activations quantized at
  run time); ``int8`` (full-integer: weights and activations int8, calibrated on a
  representative dataset, with int8 input and output tensors).
- ONNX: ``float32`` through ``tf2onnx.convert.from_function`` with an input signature
  (``from_keras`` fails on Keras 3); ``int8`` by static QDQ quantization of that model
  with ``onnxruntime.quantization.quantize_static`` and a calibration reader.

What always holds: a TFLite artifact uses builtin ops only -- a model that would need
TensorFlow ops (``SELECT_TF_OPS``, "Flex") fails with a :class:`ConversionError` naming
them, because edge runtimes carry no TensorFlow kernels. Every failure of a converter
is a :class:`ConversionError` (the original exception is chained). Temporary files
live in a temporary directory that is removed afterwards. The inputs given here are
model input (preprocessed), not raw rows.
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from server.errors import ServerError

__all__ = [
    "ONNX_INPUT_NAME",
    "ONNX_OPSET",
    "ConversionError",
    "Quantization",
    "convert_onnx",
    "convert_tflite",
]

Quantization = Literal["float32", "float16", "dynamic-int8", "int8"]
ONNX_OPSET = 17
ONNX_INPUT_NAME = "input"
_TFLITE_QUANTIZATIONS = ("float32", "float16", "dynamic-int8", "int8")
_ONNX_QUANTIZATIONS = ("float32", "int8")
_FLEX_OP = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")


class ConversionError(ServerError):
    """A model could not be converted (or read back) for a target."""

    status_code = 422


def _first_lines(error: BaseException, limit: int = 600) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    # The converters print progress ("Saved artifact at ...") with print(); keep it out of
    # the server's stdout, which a CLI may use for JSON. Exceptions still propagate.
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def _check_rows(rows: np.ndarray | None, what: str) -> np.ndarray:
    if rows is None or len(rows) == 0:
        raise ConversionError(f"{what} needs at least one row of model input")
    array = np.asarray(rows, dtype=np.float32)
    if not np.all(np.isfinite(array)):
        raise ConversionError(f"{what} contains NaN or infinite values")
    return array


def convert_tflite(model: Any, *, quantization: str, representative: np.ndarray) -> bytes:
    """A ``.tflite`` flatbuffer of ``model`` at ``quantization``.

    ``representative``: model-input rows (shape ``(rows, *input_shape)``) for calibrating
    full-integer ``int8``; 100-500 training samples are plenty. Ignored otherwise.
    """
    if quantization not in _TFLITE_QUANTIZATIONS:
        raise ConversionError(
            f"TFLite quantization {quantization!r} is not one of {', '.join(_TFLITE_QUANTIZATIONS)}"
        )
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if quantization == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantization == "dynamic-int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif quantization == "int8":
        rows = _check_rows(representative, "int8 calibration (the representative dataset)")

        def representative_dataset() -> Iterator[list[np.ndarray]]:
            for row in rows:
                yield [row[None, ...]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    try:
        with _quiet_stdout(), warnings.catch_warnings():
            # int8 input with a representative dataset needs no input statistics; TF warns anyway.
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
            flatbuffer = bytes(converter.convert())
    except Exception as e:  # the converter raises ConverterError, ValueError, RuntimeError...
        flex = sorted(set(_FLEX_OP.findall(str(e))))
        if flex:
            raise ConversionError(
                f"TFLite {quantization}: the model needs TensorFlow ops that are not TFLite "
                f"builtins ({', '.join(flex)}); they would need SELECT_TF_OPS, which edge "
                "runtimes do not carry"
            ) from e
        raise ConversionError(f"TFLite {quantization} conversion failed: {_first_lines(e)}") from e
    _refuse_flex_ops(flatbuffer, quantization)
    return flatbuffer


def _refuse_flex_ops(flatbuffer: bytes, quantization: str) -> None:
    from server.pipeline.ops import CUSTOM_PREFIX, tflite_ops

    flex = [
        op.name.removeprefix(CUSTOM_PREFIX)
        for op in tflite_ops(flatbuffer)
        if op.name.startswith(CUSTOM_PREFIX + "Flex")
    ]
    if flex:
        raise ConversionError(
            f"TFLite {quantization}: the converted model contains SELECT_TF_OPS (Flex) ops "
            f"{', '.join(flex)}; only builtin ops are allowed"
        )


def convert_onnx(
    model: Any,
    *,
    input_shape: Sequence[int],
    quantization: str,
    calibration: np.ndarray | None,
) -> bytes:
    """An ONNX model (opset 17) of ``model`` at ``quantization`` (``float32`` or ``int8``).

    ``input_shape`` is one sample's shape (the batch dimension stays free). ``int8`` is
    static QDQ quantization (int8 weights, per channel, and int8 activations) calibrated
    on ``calibration`` (model-input rows); inputs and outputs stay float32.
    """
    if quantization not in _ONNX_QUANTIZATIONS:
        raise ConversionError(
            f"ONNX quantization {quantization!r} is not one of {', '.join(_ONNX_QUANTIZATIONS)}"
        )
    rows = _check_rows(calibration, "ONNX int8 calibration") if quantization == "int8" else None
    float_model = _onnx_float32(model, input_shape)
    if rows is None:
        return float_model
    return _onnx_int8(float_model, rows)


def _onnx_float32(model: Any, input_shape: Sequence[int]) -> bytes:
    import tensorflow as tf
    import tf2onnx

    signature = [tf.TensorSpec((None, *input_shape), tf.float32, name=ONNX_INPUT_NAME)]

    @tf.function(input_signature=signature)
    def serve(batch: tf.Tensor) -> tf.Tensor:
        return model(batch, training=False)

    try:
        with _quiet_stdout():
            proto, _ = tf2onnx.convert.from_function(
                serve, input_signature=signature, opset=ONNX_OPSET
            )
    except Exception as e:  # tf2onnx raises whatever its handlers raise
        raise ConversionError(f"ONNX float32 conversion failed: {_first_lines(e)}") from e
    return bytes(proto.SerializeToString())


def _onnx_int8(float_model: bytes, rows: np.ndarray) -> bytes:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        """Feeds the calibration rows one at a time."""

        def __init__(self) -> None:
            self._feeds = iter([{ONNX_INPUT_NAME: row[None, ...]} for row in rows])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    with tempfile.TemporaryDirectory(prefix="edgefleet-onnx-") as tmp:
        source = Path(tmp) / "float32.onnx"
        target = Path(tmp) / "int8.onnx"
        source.write_bytes(float_model)
        try:
            with _quiet_stdout():
                quantize_static(
                    str(source),
                    str(target),
                    Reader(),
                    quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    per_channel=True,
                )
        except Exception as e:  # onnxruntime.quantization raises plain exceptions
            raise ConversionError(f"ONNX int8 quantization failed: {_first_lines(e)}") from e
        return target.read_bytes()
