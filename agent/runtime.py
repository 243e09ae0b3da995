"""Running a model: on the device, and on the server, which evaluates with this same code.

Two layers.

**A model in its runtime.** :func:`open_model` loads a ``.tflite`` model in ai-edge-litert
(or ``tflite_runtime`` where only that is installed: legacy devices) or an ``.onnx`` model
in onnxruntime, and returns a :class:`ModelRunner`. Its ``inputs``/``outputs`` describe
the tensors as a bundle states them (:class:`~shared.bundle.TensorSpec`, read from the
model itself, -1 for a free batch dimension). Its ``predict(model_input)`` takes and
returns float32 whatever the tensors inside are: an int8 input is quantized with the
tensor's own scale and zero point (``q = round(x / scale) + zero_point``, saturated), an
int8 output dequantized (``x = scale * (q - zero_point)``), by
:func:`shared.bundle.quantize` / :func:`~shared.bundle.dequantize`. Any batch size works:
the interpreter is resized when the batch changes, a model built for one batch size runs
in pieces of it (the last one padded), and a large batch runs 512 rows at a time. The
server's evaluation (``server.pipeline.evaluate``) is a thin use of it, so the server
measures exactly the code the device runs.

**A bundle, served.** :meth:`LoadedModel.load` opens a verified bundle's model in the best
runtime this device has for its format (a bundle it has none for is a
:class:`RuntimeUnavailableError` naming what is installed).
:meth:`LoadedModel.predict` takes *raw* feature rows -- what a client sends, before
preprocessing -- and returns float32 outputs (plus class, label and confidence for a
classifier). Between the two, always in this order:

1. the rows are validated before the interpreter is touched: a numeric array, one row
   (1-D) or a batch ``(rows, features)``, 1 to ``limits.max_batch_rows`` rows, exactly
   the bundle's feature count, every value finite once it is float32. Anything else is
   an :class:`InputError` whose message says what was expected and what came; the
   model keeps serving.
2. the bundle's preprocessing runs (:func:`shared.preprocessing.apply_preprocessing`,
   the very code training used), so serving cannot skew from training;
3. the runner quantizes, runs the model and dequantizes, as above.

One row given as a numpy array takes a shorter path, compiled at load: the
preprocessing steps become in-place numpy operations on a preallocated row, int8
quantization writes into a preallocated tensor, and nothing is re-checked that the load
already checked. It performs the same float32 operations in the same order as the
general path, so its answers are bit for bit the general path's; a row it cannot vouch
for (a non-finite value, an unusual dtype) goes down the general path, which says what
is wrong with it.

NaN policy: NaN and infinities are refused, never passed on. A bundle carries no
imputation step, nothing in training saw a NaN, and an int8 model would turn one into
an arbitrary integer -- a confident wrong answer is worse than a 4xx. (Monitoring
counts NaN inputs for drift before it calls :meth:`~LoadedModel.predict`.)

Which runtimes exist: :func:`available_runtimes` looks them up without importing them
(importing onnxruntime alone costs tens of MB of memory); only the runtime a model needs
is imported, when it is opened. A runtime whose import fails (a broken install) is a
:class:`RuntimeUnavailableError` and is not listed again in this process.

What always holds: a :class:`ModelRunner` exists only if its runtime loaded the model
and the model has one input and at least one output, each of a type a bundle can
state. A :class:`LoadedModel` exists only if, besides, the model's first input and
output match the manifest's dtype and quantization, and the preprocessing turns one row
of the stated feature count into the model's input shape. Each runner's lock
serializes every use of its interpreter and buffers, so the local API may call
:meth:`~LoadedModel.predict` from several threads. Only the first output tensor is
served. Latency is not measured here (monitoring does that).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import math
import re
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, get_args

import numpy as np
import numpy.typing as npt

from agent.config import Limits
from agent.errors import AgentError
from shared.bundle import (
    Bundle,
    BundleManifest,
    QuantizationParams,
    TensorSpec,
    dequantize,
    quantize,
)
from shared.errors import MessageError
from shared.preprocessing import Clip, Scale, Standardize, apply_preprocessing

__all__ = [
    "InferenceError",
    "InputError",
    "LoadedModel",
    "ModelLoadError",
    "ModelRunner",
    "ModelRuntimeError",
    "Prediction",
    "RuntimeUnavailableError",
    "SelfTestError",
    "available_runtimes",
    "open_model",
]

# name -> (module to import, distribution whose version is reported)
_RUNTIME_MODULES = {
    "litert": ("ai_edge_litert.interpreter", "ai-edge-litert"),
    "tflite-runtime": ("tflite_runtime.interpreter", "tflite-runtime"),
    "onnxruntime": ("onnxruntime", "onnxruntime"),
}
# The runtimes that can run each format, best first.
_BACKENDS_FOR_FORMAT = {"tflite": ("litert", "tflite-runtime"), "onnx": ("onnxruntime",)}
# Runtimes found installed whose import failed in this process: name -> the failure.
_BROKEN_RUNTIMES: dict[str, str] = {}
_BUNDLE_DTYPES = frozenset(get_args(TensorSpec.model_fields["dtype"].annotation))
_NUMERIC_KINDS = "biuf"  # bool, signed, unsigned, float
# Softmax outputs dequantized from int8 sum to 1 only within a few quantization steps.
# Held as the float32 value 0.05 rounds to, so that a float32 comparison (batches) and a
# Python float one (single rows) draw the line in the same place.
_PROBABILITY_SUM_TOLERANCE = float(np.float32(0.05))
# Bounds the interpreter's tensors when the server evaluates thousands of rows at once.
_MAX_ROWS_PER_INVOKE = 512
_INTP_IS_INT64 = np.dtype(np.intp) == np.dtype(np.int64)


# ----------------------------------------------------------------------------- errors


class ModelRuntimeError(AgentError):
    """Root of the runtime's errors."""


class RuntimeUnavailableError(ModelRuntimeError):
    """The bundle needs a runtime (or a runtime version) this device does not have."""


class ModelLoadError(ModelRuntimeError):
    """The runtime cannot load the model, or the model does not match its manifest."""


class InferenceError(ModelRuntimeError):
    """The runtime failed to run the model on an input (e.g. a shape the model cannot take)."""


class InputError(ModelRuntimeError, ValueError):
    """A request's rows cannot be served as given (the local API answers 4xx)."""


class SelfTestError(ModelRuntimeError):
    """The model's outputs on the bundle's self-test vectors are outside its tolerance."""


# ----------------------------------------------------------------------------- runtimes


def available_runtimes() -> dict[str, str]:
    """The model runtimes installed here: name -> version, e.g. ``{"litert": "2.3.0"}``.

    Nothing is imported: a runtime is there when the import system finds its package,
    and its version is its distribution's. A runtime whose import has failed in this
    process is left out.
    """
    found = {}
    for name, (module, distribution) in _RUNTIME_MODULES.items():
        if name in _BROKEN_RUNTIMES or not _installed(module.partition(".")[0]):
            continue
        try:
            found[name] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            try:  # installed without metadata (vendored): the module knows its version
                imported = _import_runtime(name)
            except RuntimeUnavailableError:
                continue
            found[name] = str(getattr(imported, "__version__", "unknown"))
    return found


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # ValueError: in sys.modules without a spec
        return package in sys.modules


def _import_runtime(name: str) -> ModuleType:
    try:
        return importlib.import_module(_RUNTIME_MODULES[name][0])
    except Exception as e:  # an ImportError, or a broken binary install (e.g. numpy ABI)
        _BROKEN_RUNTIMES[name] = f"{type(e).__name__}: {e}"
        raise RuntimeUnavailableError(f"{name} is installed but cannot be imported: {e}") from e


def _version_tuple(text: str) -> tuple[int, ...] | None:
    match = re.match(r"\d+(?:\.\d+)*", text.strip())
    return tuple(int(part) for part in match.group(0).split(".")) if match else None


def _describe(runtimes: Mapping[str, str]) -> str:
    described = ", ".join(f"{n} {v}" for n, v in sorted(runtimes.items())) or "no model runtime"
    broken = [f"{n} ({why})" for n, why in sorted(_BROKEN_RUNTIMES.items())]
    return described + (f"; installed but broken: {', '.join(broken)}" if broken else "")


def _choose_runtime(manifest: BundleManifest, runtimes: Mapping[str, str]) -> str:
    candidates = [
        n
        for n in _BACKENDS_FOR_FORMAT[manifest.format]
        if n in runtimes and n not in _BROKEN_RUNTIMES
    ]
    if not candidates:
        wanted = " or ".join(_BACKENDS_FOR_FORMAT[manifest.format])
        raise RuntimeUnavailableError(
            f"{manifest.model_name} v{manifest.model_version} is a {manifest.format} bundle "
            f"and needs {wanted}; this device has {_describe(runtimes)}"
        )
    chosen = candidates[0]
    # min_runtime_version speaks of the bundle's own runtime; another one of the same
    # format family (litert for a tflite-runtime bundle) is judged by loading the model.
    if chosen == manifest.runtime:
        needed = _version_tuple(manifest.min_runtime_version)
        have = _version_tuple(runtimes[chosen])
        if needed is not None and have is not None and have < needed:
            raise RuntimeUnavailableError(
                f"{manifest.model_name} v{manifest.model_version} needs {chosen} >= "
                f"{manifest.min_runtime_version}; this device has {_describe(runtimes)}"
            )
    return chosen


# ----------------------------------------------------------------------------- runners


def open_model(
    format: str,
    model_bytes: bytes,
    *,
    runtime: str | None = None,
    num_threads: int | None = None,
) -> ModelRunner:
    """Load a ``tflite`` or ``onnx`` model in a runtime of this machine.

    ``runtime`` names one (``litert``, ``tflite-runtime``, ``onnxruntime``); by default
    the best installed one for the format. Raises :class:`RuntimeUnavailableError` when
    there is none (or it cannot be imported) and :class:`ModelLoadError` when it cannot
    load the model, or the model has other than one input and at least one output, or a
    tensor of a type a bundle cannot state.
    """
    names = _BACKENDS_FOR_FORMAT.get(format)
    if names is None:
        raise ModelLoadError(f"unknown model format {format!r}; expected tflite or onnx")
    if runtime is not None and runtime not in names:
        raise RuntimeUnavailableError(f"{runtime} does not run {format} models")
    if runtime is None:
        installed = available_runtimes()
        candidates = [n for n in names if n in installed]
        if not candidates:
            raise RuntimeUnavailableError(
                f"a {format} model needs {' or '.join(names)}; this machine has "
                f"{_describe(installed)}"
            )
        for name in candidates[:-1]:  # a broken install gives way to the next runtime
            try:
                return _open(name, model_bytes, num_threads)
            except RuntimeUnavailableError:
                continue
        runtime = candidates[-1]
    return _open(runtime, model_bytes, num_threads)


def _open(runtime: str, model_bytes: bytes, num_threads: int | None) -> ModelRunner:
    module = _import_runtime(runtime)
    if runtime == "onnxruntime":
        return _OnnxRunner(module, model_bytes, num_threads)
    return _TFLiteRunner(runtime, module.Interpreter, model_bytes, num_threads)


ArrayFunction = Callable[[np.ndarray], np.ndarray]


class ModelRunner(ABC):
    """One model in one runtime's interpreter (made by :func:`open_model`).

    ``predict`` serves any number of rows of float32 *model input* (preprocessed, in
    the model's input shape with the batch first) and returns the first output tensor
    as float32, batch first. Thread-safe.
    """

    format: str
    runtime: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    fixed_batch: int | None
    """The only batch size the model takes, or None for any."""

    def __init__(self, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
        self.inputs = inputs
        self.outputs = outputs
        first = inputs[0].shape[0] if inputs[0].shape else -1
        self.fixed_batch = first if first > 0 else None
        self._lock = threading.Lock()

    def predict(self, model_input: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Float32 outputs of the first output tensor for a float32 batch of model input.

        Raises :class:`InferenceError` when the runtime cannot run it (e.g. the wrong
        shape for the model).
        """
        x = np.asarray(model_input, dtype=np.float32)
        if x.ndim == 0 or len(x) == 0:
            raise InferenceError(
                f"expected a batch of model input, got an array of shape {x.shape}"
            )
        q = quantize(x, self.inputs[0])
        fixed, rows = self.fixed_batch, len(q)
        step = fixed or _MAX_ROWS_PER_INVOKE
        with self._lock:
            if rows == fixed or (fixed is None and rows <= step):
                raw = self._invoke(q)
            else:
                pieces = []
                for start in range(0, rows, step):
                    piece = q[start : start + step]
                    short = step - len(piece) if fixed else 0
                    if short:  # a model built for one batch size: pad the last piece
                        piece = np.concatenate([piece, np.repeat(piece[-1:], short, axis=0)])
                    pieces.append(self._invoke(piece)[: step - short])
                raw = np.concatenate(pieces, axis=0)
        return dequantize(raw, self.outputs[0])

    @abstractmethod
    def _invoke(self, batch: np.ndarray) -> np.ndarray:
        """The raw first output for one batch in the input tensor's dtype (lock held)."""

    @abstractmethod
    def _one_row_runner(self, shape: tuple[int, ...]) -> ArrayFunction:
        """A function serving one row of float32 model input of ``shape`` (batch 1).

        It does what :meth:`predict` does, with preallocated buffers and no checks; its
        caller holds the runner's lock and passes arrays of exactly ``shape``.
        """


def _quantizer(spec: TensorSpec, shape: tuple[int, ...]) -> ArrayFunction | None:
    """In place, into a buffer of ``shape``: what :func:`shared.bundle.quantize` computes."""
    params = spec.quantization
    if params is None:
        if spec.dtype == "float32":
            return None
        cast = np.empty(shape, dtype=spec.dtype)

        def cast_into(x: np.ndarray) -> np.ndarray:
            np.copyto(cast, x, casting="unsafe")
            return cast

        return cast_into
    info = np.iinfo(spec.dtype)
    scale, zero_point = np.float32(params.scale), np.float32(params.zero_point)
    low, high = np.float32(info.min), np.float32(info.max)
    scratch = np.empty(shape, dtype=np.float32)
    quantized = np.empty(shape, dtype=spec.dtype)

    def quantize_into(x: np.ndarray) -> np.ndarray:
        np.divide(x, scale, out=scratch)
        np.rint(scratch, out=scratch)  # what np.round does with no decimals
        np.add(scratch, zero_point, out=scratch)
        # np.clip's bounds: maximum/minimum differ from it only in the sign of a zero,
        # which the cast to integers below erases.
        np.maximum(scratch, low, out=scratch)
        np.minimum(scratch, high, out=scratch)
        np.copyto(quantized, scratch, casting="unsafe")
        return quantized

    return quantize_into


def _dequantizer(spec: TensorSpec) -> ArrayFunction | None:
    """What :func:`shared.bundle.dequantize` computes, in two operations."""
    params = spec.quantization
    if params is None:
        return None if spec.dtype == "float32" else (lambda raw: raw.astype(np.float32))
    scale, zero_point = np.float32(params.scale), np.float32(params.zero_point)

    def dequantize_into(raw: np.ndarray) -> np.ndarray:
        x = np.subtract(raw, zero_point, dtype=np.float32)
        np.multiply(x, scale, out=x)
        return x

    return dequantize_into


def _one_input(n_inputs: int, n_outputs: int) -> None:
    if n_inputs != 1 or not n_outputs:
        raise ModelLoadError(
            f"expected one input and at least one output, the model has {n_inputs} and {n_outputs}"
        )


def _bundle_dtype(name: str, dtype: str) -> str:
    if dtype not in _BUNDLE_DTYPES:
        raise ModelLoadError(f"tensor {name} is of type {dtype}, not one a bundle can state")
    return dtype


def _tflite_spec(detail: Mapping[str, Any]) -> TensorSpec:
    dtype = _bundle_dtype(detail["name"], np.dtype(detail["dtype"]).name)
    signature = detail.get("shape_signature")
    stated = signature if signature is not None and len(signature) else detail["shape"]
    scale, zero_point = detail.get("quantization", (0.0, 0))
    quantization = None
    if dtype in ("int8", "uint8", "int16") and scale > 0:
        quantization = QuantizationParams(scale=float(scale), zero_point=int(zero_point))
    return TensorSpec(
        name=detail["name"][:256],
        dtype=dtype,  # type: ignore[arg-type]  # checked against the Literal above
        shape=[int(d) for d in stated],
        quantization=quantization,
    )


class _TFLiteRunner(ModelRunner):
    format = "tflite"

    def __init__(
        self, runtime: str, interpreter_class: Any, model: bytes, num_threads: int | None
    ) -> None:
        self.runtime = runtime
        distribution = _RUNTIME_MODULES[runtime][1]
        try:
            interpreter = interpreter_class(model_content=model, num_threads=num_threads)
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise ModelLoadError(f"{distribution} cannot load the model: {e}") from e
        inputs = interpreter.get_input_details()
        outputs = interpreter.get_output_details()
        _one_input(len(inputs), len(outputs))
        super().__init__([_tflite_spec(d) for d in inputs], [_tflite_spec(d) for d in outputs])
        self._interpreter = interpreter
        self._input_index = int(inputs[0]["index"])
        self._output_index = int(outputs[0]["index"])
        shape = [int(d) for d in inputs[0]["shape"]]
        if not shape:
            raise ModelLoadError("the model's input has no batch dimension")
        self._rows, self._sample = shape[0], shape[1:]

    def _resize(self, rows: int) -> None:
        interpreter = self._interpreter
        try:
            interpreter.resize_tensor_input(self._input_index, [rows, *self._sample], strict=True)
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            try:  # leave the interpreter as it was, still able to serve
                interpreter.resize_tensor_input(self._input_index, [self._rows, *self._sample])
                interpreter.allocate_tensors()
            except (ValueError, RuntimeError):
                pass
            raise InferenceError(f"cannot resize the model's input to {rows} rows: {e}") from e
        self._rows = rows

    def _invoke(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) != self._rows:
            self._resize(len(batch))
        try:
            self._interpreter.set_tensor(self._input_index, batch)
            self._interpreter.invoke()
        except (ValueError, RuntimeError) as e:
            raise InferenceError(
                f"the model cannot run on input of shape {batch.shape}: {e}"
            ) from e
        return np.asarray(self._interpreter.get_tensor(self._output_index))

    def _one_row_runner(self, shape: tuple[int, ...]) -> ArrayFunction:
        quantize_into = _quantizer(self.inputs[0], shape)
        dequantize_into = _dequantizer(self.outputs[0])
        interpreter = self._interpreter
        set_tensor, invoke, get_tensor = (
            interpreter.set_tensor,
            interpreter.invoke,
            interpreter.get_tensor,
        )
        input_index, output_index = self._input_index, self._output_index

        def run(sample: np.ndarray) -> np.ndarray:
            if self._rows != 1:
                self._resize(1)
            if quantize_into is not None:
                sample = quantize_into(sample)
            try:
                # set_tensor copies: the interpreter's own buffer is never exposed, so
                # nothing can hold a view of it across invoke().
                set_tensor(input_index, sample)
                invoke()
            except (ValueError, RuntimeError) as e:
                raise InferenceError(f"the model cannot run on one row: {e}") from e
            raw = get_tensor(output_index)
            return raw if dequantize_into is None else dequantize_into(raw)

        return run


_ONNX_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
}


def _onnx_spec(arg: Any) -> TensorSpec:
    dtype = _bundle_dtype(arg.name, _ONNX_DTYPES.get(arg.type, arg.type))
    shape = [d if isinstance(d, int) and d > 0 else -1 for d in arg.shape]
    return TensorSpec(name=arg.name[:256], dtype=dtype, shape=shape)  # type: ignore[arg-type]


class _OnnxRunner(ModelRunner):
    format = "onnx"
    runtime = "onnxruntime"

    def __init__(self, onnxruntime: Any, model: bytes, num_threads: int | None) -> None:
        options = onnxruntime.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        try:
            session = onnxruntime.InferenceSession(
                model, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime's pybind exceptions share no useful base
            raise ModelLoadError(f"onnxruntime cannot load the model: {e}") from e
        inputs, outputs = session.get_inputs(), session.get_outputs()
        _one_input(len(inputs), len(outputs))
        super().__init__([_onnx_spec(a) for a in inputs], [_onnx_spec(a) for a in outputs])
        self._session = session
        self._input_name = inputs[0].name
        self._output_names = [outputs[0].name]

    def _invoke(self, batch: np.ndarray) -> np.ndarray:
        try:
            (raw,) = self._session.run(self._output_names, {self._input_name: batch})
        except Exception as e:  # onnxruntime's pybind exceptions share no useful base
            raise InferenceError(
                f"the model cannot run on input of shape {batch.shape}: {e}"
            ) from e
        return np.asarray(raw)

    def _one_row_runner(self, shape: tuple[int, ...]) -> ArrayFunction:
        quantize_into = _quantizer(self.inputs[0], shape)
        dequantize_into = _dequantizer(self.outputs[0])
        invoke = self._invoke

        def run(sample: np.ndarray) -> np.ndarray:
            raw = invoke(sample if quantize_into is None else quantize_into(sample))
            return raw if dequantize_into is None else dequantize_into(raw)

        return run


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Prediction:
    """The model's answer for a batch of ``n`` rows.

    ``outputs`` is always float32 ``(n, k)`` (dequantized). For a classifier,
    ``probabilities`` is ``(n, classes)`` (a single sigmoid unit becomes two columns,
    ``[1 - p, p]``, class 1 from ``p >= 0.5``; a row of outputs that is not already a
    distribution -- logits -- goes through a softmax; decided row by row, so a row's
    answer never depends on the rows batched with it), ``classes`` the predicted class
    indexes, ``labels`` the manifest's names for them (the index as text where the
    manifest names none), ``confidence`` the winning probability. A regression model
    leaves those four ``None``.
    """

    model_name: str
    model_version: int
    outputs: npt.NDArray[np.float32]
    probabilities: npt.NDArray[np.float32] | None = None
    classes: npt.NDArray[np.int64] | None = None
    labels: list[str] | None = None
    confidence: npt.NDArray[np.float32] | None = None

    def __len__(self) -> int:
        return len(self.outputs)


assert Prediction.__slots__ == (
    "model_name",
    "model_version",
    "outputs",
    "probabilities",
    "classes",
    "labels",
    "confidence",
), "_one_row_prediction sets each field"
_set_model_name = Prediction.model_name.__set__  # type: ignore[attr-defined]
_set_model_version = Prediction.model_version.__set__  # type: ignore[attr-defined]
_set_outputs = Prediction.outputs.__set__  # type: ignore[attr-defined]
_set_probabilities = Prediction.probabilities.__set__  # type: ignore[attr-defined]
_set_classes = Prediction.classes.__set__  # type: ignore[attr-defined]
_set_labels = Prediction.labels.__set__  # type: ignore[attr-defined]
_set_confidence = Prediction.confidence.__set__  # type: ignore[attr-defined]


def _one_row_prediction(
    model_name: str,
    model_version: int,
    outputs: np.ndarray,
    probabilities: np.ndarray,
    classes: np.ndarray,
    labels: list[str],
    confidence: np.ndarray,
) -> Prediction:
    """A classifier's :class:`Prediction`, made without the frozen dataclass ``__init__``.

    That one costs about a microsecond (an ``object.__setattr__`` per field), a tenth of
    the single-row serving overhead; this sets the slots directly. The same object, as
    frozen as any other.
    """
    prediction: Prediction = object.__new__(Prediction)
    _set_model_name(prediction, model_name)
    _set_model_version(prediction, model_version)
    _set_outputs(prediction, outputs)
    _set_probabilities(prediction, probabilities)
    _set_classes(prediction, classes)
    _set_labels(prediction, labels)
    _set_confidence(prediction, confidence)
    return prediction


def _probabilities(outputs: np.ndarray) -> np.ndarray:
    if outputs.shape[1] == 1:
        p = outputs[:, 0]
        logits = (p < 0) | (p > 1)  # these rows hold a logit, not a sigmoid output
        if logits.any():
            with np.errstate(over="ignore"):  # exp(1000) = inf gives p = 0, as it should
                p = np.where(logits, 1.0 / (1.0 + np.exp(-p)), p)
        p = np.clip(p, 0.0, 1.0)
        return np.stack([1.0 - p, p], axis=1).astype(np.float32)
    sums = np.add.reduce(outputs, axis=1, keepdims=True)
    distributions = (
        (outputs.min(axis=1) >= 0)
        & (outputs.max(axis=1) <= 1)
        & (np.abs(sums[:, 0] - 1.0) <= _PROBABILITY_SUM_TOLERANCE)
    )
    if distributions.all():
        return np.asarray(outputs / sums, dtype=np.float32)  # sums are near 1: never zero
    shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    probabilities = np.asarray(shifted / shifted.sum(axis=1, keepdims=True), dtype=np.float32)
    np.divide(outputs, sums, out=probabilities, where=distributions[:, None])
    return probabilities


def _clip_into(
    source: np.ndarray, bounds: tuple[float | None, float | None], out: np.ndarray, /
) -> None:
    np.clip(source, bounds[0], bounds[1], out=out)


def _compile_preprocessing(steps: Sequence[Any]) -> list[tuple[Any, Any]]:
    """The steps as in-place operations on a float32 ``(1, features)`` row.

    Each computes what :func:`~shared.preprocessing.apply_preprocessing` computes, in the
    same float32 operations; a reshape moves no data (the row is reshaped once, at
    load). Called only once the steps have been run on a probe row.
    """
    compiled: list[tuple[Any, Any]] = []
    for step in steps:
        if isinstance(step, Standardize):
            std = np.asarray(step.std, dtype=np.float32)
            compiled.append((np.subtract, np.asarray(step.mean, dtype=np.float32)))
            compiled.append((np.divide, np.where(std == 0, np.float32(1), std)))
        elif isinstance(step, Scale):
            compiled.append((np.multiply, np.float32(step.factor)))
            compiled.append((np.add, np.float32(step.offset)))
        elif isinstance(step, Clip):
            compiled.append((_clip_into, (step.min, step.max)))
    return compiled


# ----------------------------------------------------------------------------- the model


class LoadedModel:
    """One bundle's model, loaded in its runtime and ready to serve."""

    def __init__(
        self,
        bundle: Bundle,
        runner: ModelRunner,
        *,
        runtime_version: str,
        limits: Limits,
    ) -> None:
        manifest = bundle.manifest
        self.bundle = bundle
        self.runtime = runner.runtime
        self.runtime_version = runtime_version
        self._manifest = manifest
        self._runner = runner
        self._limits = limits
        self._input_spec = manifest.inputs[0]
        self._output_spec = manifest.outputs[0]
        self._check_tensor("input", self._input_spec, runner.inputs[0])
        self._check_tensor("output", self._output_spec, runner.outputs[0])
        self.n_features = self._feature_count()
        sample_shape = self._check_preprocessing(runner.inputs[0].shape)
        self._classifier = manifest.task == "classification"
        outputs_per_row = runner.outputs[0].shape[1:]
        # A classifier whose outputs are a row of class scores: the single-row answer.
        self._scores_per_row = (
            self._classifier and len(outputs_per_row) == 1 and outputs_per_row[0] > 1
        )
        self._labels = list(manifest.labels or [])
        self._one_row: ArrayFunction | None = None
        if runner.fixed_batch in (None, 1) and all(d > 0 for d in runner.inputs[0].shape[1:]):
            n = self.n_features
            self._preprocess = _compile_preprocessing(manifest.preprocessing)
            self._one_row_shapes = ((n,), (1, n))
            self._row = np.empty((1, n), dtype=np.float32)
            self._row_model_input = self._row.reshape((1, *sample_shape))
            self._finite = np.empty((1, n), dtype=np.bool_)
            self._all_finite = np.ones((1, n), dtype=np.bool_).tobytes()
            self._lock = runner._lock  # the row is the runner's to guard, like its tensors
            self._one_row = runner._one_row_runner(self._row_model_input.shape)

    @classmethod
    def load(
        cls,
        bundle: Bundle,
        *,
        runtimes: Mapping[str, str] | None = None,
        limits: Limits | None = None,
        num_threads: int | None = None,
    ) -> LoadedModel:
        """Load a verified bundle in the best runtime for it.

        ``runtimes`` (name -> version) is what this device offers; by default
        :func:`available_runtimes`. A runtime that turns out not to import gives way to
        the next one for the format.
        """
        manifest = bundle.manifest
        offered = available_runtimes() if runtimes is None else dict(runtimes)
        while True:
            name = _choose_runtime(manifest, offered)
            try:
                runner = open_model(
                    manifest.format, bundle.model, runtime=name, num_threads=num_threads
                )
            except RuntimeUnavailableError:
                if name not in _BROKEN_RUNTIMES:
                    raise
                continue  # _choose_runtime skips it now
            return cls(bundle, runner, runtime_version=offered[name], limits=limits or Limits())

    @property
    def manifest(self) -> BundleManifest:
        return self._manifest

    # -- checks made once, at load

    def _check_tensor(self, role: str, spec: TensorSpec, actual: TensorSpec) -> None:
        if spec.dtype != actual.dtype:
            raise ModelLoadError(
                f"the manifest states a {spec.dtype} {role}, the model's {role} is {actual.dtype}"
            )
        if spec.dtype in ("int8", "uint8", "int16") and spec.quantization is None:
            raise ModelLoadError(
                f"the model's {role} is {spec.dtype} but the manifest gives no quantization "
                "parameters for it"
            )
        stated, own = spec.quantization, actual.quantization
        if stated is None and own is None:
            return
        if (
            stated is None
            or own is None
            or stated.zero_point != own.zero_point
            or not math.isclose(stated.scale, own.scale, rel_tol=1e-6)
        ):
            # The runner quantizes with the model's own parameters; a manifest that
            # states others describes another model.
            raise ModelLoadError(
                f"the manifest states {role} quantization {_quantization(stated)}, the "
                f"model's {role} has {_quantization(own)}"
            )

    def _feature_count(self) -> int:
        if self._manifest.feature_names:
            return len(self._manifest.feature_names)
        sample = self._input_spec.shape[1:]
        if not sample or any(d <= 0 for d in sample):
            raise ModelLoadError(
                "the manifest names no features and the model input "
                f"{self._input_spec.shape} has no fixed size per row"
            )
        return math.prod(sample)

    def _check_preprocessing(self, model_shape: Sequence[int]) -> tuple[int, ...]:
        """The model input shape of one row (no batch), once it fits the model."""
        try:
            probe = apply_preprocessing(
                self._manifest.preprocessing, np.zeros((1, self.n_features), np.float32)
            )
        except MessageError as e:
            raise ModelLoadError(
                f"the bundle's preprocessing does not fit its {self.n_features} features: {e}"
            ) from e
        for stated in (self._input_spec.shape, model_shape):
            sample = list(stated[1:])
            if len(sample) != probe.ndim - 1 or any(
                d > 0 and d != got for d, got in zip(sample, probe.shape[1:], strict=False)
            ):
                raise ModelLoadError(
                    f"preprocessing turns a row of {self.n_features} features into "
                    f"{list(probe.shape[1:])}, the model takes {sample}"
                )
        return tuple(probe.shape[1:])

    # -- serving

    def _validate(self, rows: Any, max_rows: int) -> np.ndarray:
        if (
            isinstance(rows, list | tuple)
            and len(rows) > max_rows
            and isinstance(rows[0], list | tuple | np.ndarray)
        ):  # refuse an oversized batch before numpy copies all of it
            raise InputError(f"expected at most {max_rows} rows per request, got {len(rows)}")
        try:
            array = np.asarray(rows)
        except ValueError as e:  # ragged nested lists
            raise InputError(f"rows must all have {self.n_features} values: {e}") from e
        if array.dtype.kind not in _NUMERIC_KINDS:
            got = "rows of different lengths" if array.dtype == object else f"{array.dtype}"
            raise InputError(f"expected numbers (int or float), got {got}")
        if array.ndim == 1:
            array = array[None, :]
        if array.ndim != 2:
            raise InputError(
                f"expected one row of {self.n_features} values or a batch (rows, "
                f"{self.n_features}), got an array of shape {tuple(array.shape)}"
            )
        n, width = array.shape
        if n == 0:
            raise InputError("expected at least one row, got none")
        if n > max_rows:
            raise InputError(f"expected at most {max_rows} rows per request, got {n}")
        if width != self.n_features:
            raise InputError(f"expected {self.n_features} features per row, got {width}")
        with np.errstate(over="ignore", invalid="ignore"):  # refused just below, by name
            x = array.astype(np.float32)
        finite = np.isfinite(x)
        if not finite.all():
            bad = np.argwhere(~finite)
            row, column = (int(i) for i in bad[0])
            name = self._manifest.feature_names[column] if self._manifest.feature_names else column
            raise InputError(
                f"expected finite numbers, got {len(bad)} NaN or infinite value(s) "
                f"(or values beyond float32), the first in row {row}, feature {name!r}: "
                f"{array[row, column].item()!r}"
            )
        return x

    def _run(self, x: np.ndarray) -> np.ndarray:
        outputs = self._runner.predict(apply_preprocessing(self._manifest.preprocessing, x))
        return outputs.reshape(len(x), -1)

    def _run_one_row(self, rows: np.ndarray) -> np.ndarray | None:
        """The outputs for one row of a plain numeric array; None: take the general path."""
        kind = rows.dtype.char
        row = self._row
        with self._lock:
            if kind == "f":  # float32: checked and read where it is, no copy
                source = checked = rows
            elif kind == "d":
                with np.errstate(over="ignore"):  # beyond float32: inf, refused below
                    np.copyto(row, rows, casting="unsafe")
                source = checked = row
            elif rows.dtype.kind in "biu":  # always finite as float32
                np.copyto(row, rows, casting="unsafe")
                source, checked = row, None
            else:
                return None
            if checked is not None:
                # All finite <=> the mask's bytes are all 1 (numpy's True): one bytes
                # comparison, a fraction of what a numpy reduction costs on one row.
                # (out= given by position, here and below: cheaper than by keyword.)
                np.isfinite(checked, self._finite)  # a 1-D row broadcasts into (1, n)
                if self._finite.tobytes() != self._all_finite:
                    return None
            for operation, operand in self._preprocess:
                operation(source, operand, row)
                source = row
            if source is rows:  # no step wrote the row
                np.copyto(row, rows)
            outputs = self._one_row(self._row_model_input)
        return outputs if outputs.ndim == 2 else outputs.reshape(1, -1)

    def predict(self, rows: Any) -> Prediction:
        """Serve raw feature rows: one row, a list of rows, or an array ``(n, features)``.

        Raises :class:`InputError` (the model keeps serving) for rows it cannot take.
        """
        if (
            self._one_row is not None
            and type(rows) is np.ndarray
            and rows.shape in self._one_row_shapes
        ):
            outputs = self._run_one_row(rows)
            if outputs is not None:
                return self._answer_one(outputs)
        return self._answer(self._run(self._validate(rows, self._limits.max_batch_rows)))

    def _answer_one(self, outputs: np.ndarray) -> Prediction:
        """:meth:`_answer` for one row, shorter where the row is already a distribution."""
        if not self._scores_per_row:
            return self._answer(outputs)
        row = outputs[0]
        values = row.tolist()
        # The same pairwise float32 sum as _probabilities' reduction along a row, as a
        # scalar: dividing by it is the same division, for half the cost of a (1, 1) array.
        total = np.add.reduce(row)
        # Exactly _probabilities' test for this row: min and max compare the same as
        # float32, and 1 - sum is exact in both where it is anywhere near the tolerance.
        # A NaN fails the sum test, whatever min() and max() made of it.
        if not (
            min(values) >= 0.0
            and max(values) <= 1.0
            and abs(float(total) - 1.0) <= _PROBABILITY_SUM_TOLERANCE
        ):
            return self._answer(outputs)
        probabilities = outputs / total
        classes = probabilities.argmax(axis=1)
        if not _INTP_IS_INT64:
            classes = classes.astype(np.int64)
        winner = classes.item()
        names = self._labels
        manifest = self._manifest
        return _one_row_prediction(
            manifest.model_name,
            manifest.model_version,
            outputs,
            probabilities,
            classes,
            [names[winner] if winner < len(names) else str(winner)],
            probabilities[:, winner],  # the confidence: no NaN here, the max is the argmax's
        )

    def _answer(self, outputs: np.ndarray) -> Prediction:
        manifest = self._manifest
        if not self._classifier:
            return Prediction(manifest.model_name, manifest.model_version, outputs)
        probabilities = _probabilities(outputs)
        if outputs.shape[1] == 1:  # ties go to class 1, as in the server's evaluation
            classes = (probabilities[:, 1] >= 0.5).astype(np.int64)
        else:
            classes = probabilities.argmax(axis=1).astype(np.int64)
        names = self._labels
        labels = [names[c] if c < len(names) else str(c) for c in classes.tolist()]
        return Prediction(
            manifest.model_name,
            manifest.model_version,
            outputs,
            probabilities=probabilities,
            classes=classes,
            labels=labels,
            confidence=probabilities.max(axis=1),
        )

    def run_self_tests(self) -> None:
        """Reproduce the bundle's self-test outputs within their tolerance, or raise.

        A bundle without self-test vectors has nothing to compare and passes; the
        server always ships at least one.
        """
        for number, test in enumerate(self._manifest.self_tests):
            expected = np.asarray(test.expected, dtype=np.float32)
            try:
                # Signed data of at most 64 rows: the request limit does not apply to it.
                got = self._run(self._validate(test.input, max(len(test.input), 1)))
            except InputError as e:
                raise SelfTestError(f"self-test {number}: its input is unusable: {e}") from e
            if got.shape != expected.shape:
                raise SelfTestError(
                    f"self-test {number}: the model gives outputs of shape {got.shape}, "
                    f"the bundle expects {expected.shape}"
                )
            deviation = float(np.max(np.abs(got - expected)))
            if not math.isfinite(deviation) or deviation > test.atol:
                raise SelfTestError(
                    f"self-test {number} of {_label(self._manifest)} failed in "
                    f"{self.runtime} {self.runtime_version}: max deviation {deviation:.6g} "
                    f"exceeds the tolerance {test.atol:.6g}"
                )


def _quantization(params: QuantizationParams | None) -> str:
    if params is None:
        return "none"
    return f"scale {params.scale:.9g}, zero point {params.zero_point}"


def _label(manifest: BundleManifest) -> str:
    return f"{manifest.model_name} v{manifest.model_version} ({manifest.target})"
