"""Running an artifact in the runtime it targets, and measuring it there.

:class:`LiteRTRunner` (ai-edge-litert) and :class:`OnnxRunner` (onnxruntime) share one
interface: ``predict(model_input)`` takes and returns float32, whatever the tensors
inside are -- an int8 input is quantized with the tensor's own scale and zero point
(``q = round(x / scale) + zero_point``, saturated), an int8 output dequantized
(``x = scale * (q - zero_point)``) -- and any batch size works (the interpreter is
resized when the batch changes). ``inputs``/``outputs`` describe the tensors as a
bundle states them (:class:`~shared.bundle.TensorSpec`, -1 for the free batch).

:func:`evaluate` gives the metrics of a task on a labelled split; accuracy and the
other scores are fractions (0-1), not percent. :func:`latency_p50_ms` is the median
time of one single-sample ``predict`` on this machine.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Protocol

import numpy as np

from server.datasets.types import Task
from server.errors import ServerError
from shared.bundle import QuantizationParams, TensorSpec, dequantize, quantize

__all__ = [
    "EvaluationError",
    "LiteRTRunner",
    "OnnxRunner",
    "Runner",
    "evaluate",
    "latency_p50_ms",
    "score",
]

_BATCH = 512
_DTYPES = {
    "float32",
    "float16",
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
}
_ONNX_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
}


class EvaluationError(ServerError):
    """An artifact could not be run, or its outputs do not fit the task."""

    status_code = 422


class Runner(Protocol):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def predict(self, model_input: np.ndarray) -> np.ndarray: ...


def _dtype_name(dtype: Any) -> str:
    name = np.dtype(dtype).name
    if name not in _DTYPES:
        raise EvaluationError(f"tensor type {name} is not one a bundle can state")
    return name


def _tflite_spec(detail: dict[str, Any]) -> TensorSpec:
    dtype = _dtype_name(detail["dtype"])
    signature = detail.get("shape_signature")
    shape = [
        int(d) for d in (signature if signature is not None and len(signature) else detail["shape"])
    ]
    scale, zero_point = detail.get("quantization", (0.0, 0))
    quantization = None
    if dtype in ("int8", "uint8", "int16") and scale > 0:
        quantization = QuantizationParams(scale=float(scale), zero_point=int(zero_point))
    return TensorSpec(
        name=detail["name"][:256], dtype=dtype, shape=shape, quantization=quantization
    )


def _batches(model_input: np.ndarray) -> list[np.ndarray]:
    x = np.asarray(model_input, dtype=np.float32)
    return [x[i : i + _BATCH] for i in range(0, len(x), _BATCH)] or [x]


class LiteRTRunner:
    """A ``.tflite`` model in ai-edge-litert (the edge runtime), one input and one output."""

    def __init__(self, model_bytes: bytes, *, num_threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        try:
            self._interpreter = Interpreter(model_content=model_bytes, num_threads=num_threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise EvaluationError(f"ai-edge-litert cannot load the model: {e}") from e
        input_details = self._interpreter.get_input_details()
        output_details = self._interpreter.get_output_details()
        if len(input_details) != 1 or not output_details:
            raise EvaluationError(
                f"expected one input and at least one output, the model has "
                f"{len(input_details)} and {len(output_details)}"
            )
        self._input_index = int(input_details[0]["index"])
        self._output_index = int(output_details[0]["index"])
        self.inputs = [_tflite_spec(d) for d in input_details]
        self.outputs = [_tflite_spec(d) for d in output_details]
        self._rows = int(input_details[0]["shape"][0])
        self._fixed_batch = False

    def _batch_fits(self, rows: int) -> bool:
        """Resize the input to ``rows`` when the model allows it (a free batch dimension)."""
        if rows == self._rows:
            return True
        if self._fixed_batch:
            return False
        shape = list(self._interpreter.get_input_details()[0]["shape"])
        shape[0] = rows
        try:
            self._interpreter.resize_tensor_input(self._input_index, shape, strict=True)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError):
            self._fixed_batch = True  # built for one batch size only: run in pieces of it
            self._interpreter.allocate_tensors()
            return False
        self._rows = rows
        return True

    def _invoke(self, batch: np.ndarray) -> np.ndarray:
        self._interpreter.set_tensor(self._input_index, quantize(batch, self.inputs[0]))
        self._interpreter.invoke()
        return dequantize(self._interpreter.get_tensor(self._output_index), self.outputs[0])

    def predict(self, model_input: np.ndarray) -> np.ndarray:
        """Float32 outputs of the first output tensor for a float32 batch of model input."""
        outputs = []
        for batch in _batches(model_input):
            if self._batch_fits(len(batch)):
                outputs.append(self._invoke(batch))
            elif self._rows == 1:
                outputs.extend(self._invoke(batch[i : i + 1]) for i in range(len(batch)))
            else:
                raise EvaluationError(
                    f"the model takes batches of exactly {self._rows} rows, not {len(batch)}"
                )
        return np.concatenate(outputs, axis=0)


class OnnxRunner:
    """An ONNX model in an onnxruntime CPU session, one input and one output."""

    def __init__(self, model_bytes: bytes, *, num_threads: int | None = None) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        try:
            self._session = onnxruntime.InferenceSession(
                model_bytes, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime's pybind exceptions have no common base
            raise EvaluationError(f"onnxruntime cannot load the model: {e}") from e
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise EvaluationError(
                f"expected one input and at least one output, the model has "
                f"{len(inputs)} and {len(outputs)}"
            )
        self.inputs = [self._spec(arg) for arg in inputs]
        self.outputs = [self._spec(arg) for arg in outputs]
        self._input_name = inputs[0].name
        self._output_name = outputs[0].name

    @staticmethod
    def _spec(arg: Any) -> TensorSpec:
        dtype = _ONNX_DTYPES.get(arg.type)
        if dtype is None:
            raise EvaluationError(
                f"tensor {arg.name} is of type {arg.type}, not one a bundle can state"
            )
        shape = [d if isinstance(d, int) and d > 0 else -1 for d in arg.shape]
        return TensorSpec(name=arg.name[:256], dtype=dtype, shape=shape)

    def predict(self, model_input: np.ndarray) -> np.ndarray:
        """Float32 outputs of the first output for a float32 batch of model input."""
        outputs = []
        for batch in _batches(model_input):
            feed = {self._input_name: batch.astype(self.inputs[0].dtype, copy=False)}
            (raw,) = self._session.run([self._output_name], feed)
            outputs.append(np.asarray(raw, dtype=np.float32))
        return np.concatenate(outputs, axis=0)


def _predicted_classes(outputs: np.ndarray) -> np.ndarray:
    flat = outputs.reshape(len(outputs), -1)
    if flat.shape[1] == 1:  # a single sigmoid unit: probability of class 1
        return (flat[:, 0] >= 0.5).astype(np.int64)
    return flat.argmax(axis=1)


def evaluate(
    runner: Runner, *, x_model_input: np.ndarray, y: np.ndarray, task: Task
) -> dict[str, float]:
    """Metrics of ``runner`` on a labelled split (``x_model_input`` is preprocessed).

    classification: ``accuracy``, ``macro_f1``; regression: ``rmse``, ``mae``, ``r2``.
    """
    if len(x_model_input) == 0 or len(x_model_input) != len(y):
        raise EvaluationError(f"cannot evaluate on {len(x_model_input)} inputs and {len(y)} labels")
    return score(runner.predict(x_model_input), y=y, task=task)


def score(outputs: np.ndarray, *, y: np.ndarray, task: Task) -> dict[str, float]:
    """The metrics of :func:`evaluate` for outputs already computed (e.g. by Keras)."""
    from sklearn.metrics import f1_score, mean_absolute_error, mean_squared_error, r2_score

    outputs = np.asarray(outputs, dtype=np.float32)
    if len(outputs) != len(y):
        raise EvaluationError(f"{len(outputs)} outputs for {len(y)} labels")
    if not np.all(np.isfinite(outputs)):
        raise EvaluationError("the model produced NaN or infinite outputs")
    if task == "classification":
        predicted = _predicted_classes(outputs)
        truth = np.asarray(y).astype(np.int64)
        return {
            "accuracy": float(np.mean(predicted == truth)),
            "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0)),
        }
    flat = outputs.reshape(len(outputs), -1)
    if flat.shape[1] != 1:
        raise EvaluationError(f"a regression model needs one output value, it has {flat.shape[1]}")
    predicted = flat[:, 0].astype(np.float64)
    truth = np.asarray(y, dtype=np.float64).reshape(-1)
    return {
        "rmse": float(np.sqrt(mean_squared_error(truth, predicted))),
        "mae": float(mean_absolute_error(truth, predicted)),
        "r2": float(r2_score(truth, predicted)),
    }


def latency_p50_ms(runner: Runner, sample: np.ndarray, repeats: int = 100) -> float:
    """Median wall time of ``predict`` on one sample, in milliseconds, after a warm-up."""
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    one = np.asarray(sample, dtype=np.float32)
    if one.ndim == len(runner.inputs[0].shape) - 1:
        one = one[None, ...]
    one = one[:1]
    for _ in range(min(10, repeats)):
        runner.predict(one)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        runner.predict(one)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000.0
