"""Running an artifact in the runtime it targets, and measuring it there.

:class:`LiteRTRunner` (ai-edge-litert) and :class:`OnnxRunner` (onnxruntime) are the
device's own runners (:func:`agent.runtime.open_model`), so an artifact is evaluated by
exactly the code that will serve it on a device. They share one interface:
``predict(model_input)`` takes and returns float32, whatever the tensors inside are --
an int8 input is quantized with the tensor's own scale and zero point
(``q = round(x / scale) + zero_point``, saturated), an int8 output dequantized
(``x = scale * (q - zero_point)``) -- and any batch size works (the interpreter is
resized when the batch changes; a model built for one batch size runs in pieces of
it). ``inputs``/``outputs`` describe the tensors as a bundle states them
(:class:`~shared.bundle.TensorSpec`, -1 for the free batch). Whatever the device's
runtime raises becomes an :class:`EvaluationError` here.

:func:`evaluate` gives the metrics of a task on a labelled split; accuracy and the
other scores are fractions (0-1), not percent. :func:`latency_p50_ms` is the median
time of one single-sample ``predict`` on this machine.
"""

from __future__ import annotations

import statistics
import time
from typing import Protocol

import numpy as np
import numpy.typing as npt

from agent.runtime import ModelRunner, ModelRuntimeError, open_model
from server.datasets.types import Task
from server.errors import ServerError
from shared.bundle import TensorSpec

__all__ = [
    "EvaluationError",
    "LiteRTRunner",
    "OnnxRunner",
    "Runner",
    "evaluate",
    "latency_p50_ms",
    "score",
]


class EvaluationError(ServerError):
    """An artifact could not be run, or its outputs do not fit the task."""

    status_code = 422


class Runner(Protocol):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def predict(self, model_input: np.ndarray) -> np.ndarray: ...


class _DeviceRunner:
    """A model opened by the device's runtime layer; its errors become EvaluationErrors."""

    format: str
    runtime: str

    def __init__(self, model_bytes: bytes, *, num_threads: int | None = None) -> None:
        try:
            self._runner: ModelRunner = open_model(
                self.format, model_bytes, runtime=self.runtime, num_threads=num_threads
            )
        except ModelRuntimeError as e:
            raise EvaluationError(str(e)) from e
        self.inputs = self._runner.inputs
        self.outputs = self._runner.outputs

    def predict(self, model_input: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Float32 outputs of the first output tensor for a float32 batch of model input."""
        try:
            return self._runner.predict(model_input)
        except ModelRuntimeError as e:
            raise EvaluationError(str(e)) from e


class LiteRTRunner(_DeviceRunner):
    """A ``.tflite`` model in ai-edge-litert (the edge runtime), one input."""

    format = "tflite"
    runtime = "litert"


class OnnxRunner(_DeviceRunner):
    """An ONNX model in an onnxruntime CPU session, one input."""

    format = "onnx"
    runtime = "onnxruntime"


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
