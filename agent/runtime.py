"""Running a verified bundle's model on the device: TFLite (LiteRT) or ONNX, float or int8.

:meth:`LoadedModel.load` picks the backend from the bundle: a ``tflite`` bundle runs in
ai-edge-litert, or in ``tflite_runtime`` where only that is installed (legacy devices);
an ``onnx`` bundle runs in onnxruntime. A bundle this device has no runtime for is a
:class:`RuntimeUnavailableError` naming what is installed.

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
3. an int8/uint8 input is quantized with the *bundle's* scale and zero point
   (``q = round(x / scale) + zero_point``, saturated), the batch is resized (or, for a
   model built for a fixed batch, run in pieces of it), the model runs, and an int8
   output is dequantized (``x = scale * (q - zero_point)``).

NaN policy: NaN and infinities are refused, never passed on. A bundle carries no
imputation step, nothing in training saw a NaN, and an int8 model would turn one into
an arbitrary integer -- a confident wrong answer is worse than a 4xx. (Monitoring
counts NaN inputs for drift before it calls :meth:`~LoadedModel.predict`.)

What always holds: a :class:`LoadedModel` exists only if its interpreter loaded the
model, the model's first input and output match the manifest's dtype and quantization,
and the preprocessing turns one row of the stated feature count into the model's input
shape. Access to the interpreter is serialized by a lock, so the local API may call
:meth:`~LoadedModel.predict` from several threads. Only the first output tensor is
served. Latency is not measured here (monitoring does that).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from agent.config import Limits
from agent.errors import AgentError
from shared.bundle import Bundle, BundleManifest, TensorSpec, dequantize, quantize
from shared.errors import MessageError
from shared.preprocessing import apply_preprocessing

__all__ = [
    "InputError",
    "LoadedModel",
    "ModelLoadError",
    "ModelRuntimeError",
    "Prediction",
    "RuntimeUnavailableError",
    "SelfTestError",
    "available_runtimes",
]

# name -> (module to import, distribution whose version is reported)
_RUNTIME_MODULES = {
    "litert": ("ai_edge_litert.interpreter", "ai-edge-litert"),
    "tflite-runtime": ("tflite_runtime.interpreter", "tflite-runtime"),
    "onnxruntime": ("onnxruntime", "onnxruntime"),
}
# The runtimes that can run each format, best first.
_BACKENDS_FOR_FORMAT = {"tflite": ("litert", "tflite-runtime"), "onnx": ("onnxruntime",)}
_NUMERIC_KINDS = "biuf"  # bool, signed, unsigned, float
# Softmax outputs dequantized from int8 sum to 1 only within a few quantization steps.
_PROBABILITY_SUM_TOLERANCE = 0.05


# ----------------------------------------------------------------------------- errors


class ModelRuntimeError(AgentError):
    """Root of the runtime's errors."""


class RuntimeUnavailableError(ModelRuntimeError):
    """The bundle needs a runtime (or a runtime version) this device does not have."""


class ModelLoadError(ModelRuntimeError):
    """The runtime cannot load the model, or the model does not match its manifest."""


class InputError(ModelRuntimeError, ValueError):
    """A request's rows cannot be served as given (the local API answers 4xx)."""


class SelfTestError(ModelRuntimeError):
    """The model's outputs on the bundle's self-test vectors are outside its tolerance."""


# ----------------------------------------------------------------------------- runtimes


def available_runtimes() -> dict[str, str]:
    """The model runtimes importable here: name -> version, e.g. ``{"litert": "2.3.0"}``."""
    found = {}
    for name, (module, distribution) in _RUNTIME_MODULES.items():
        try:
            imported = importlib.import_module(module)
        except Exception:  # noqa: S112 -- a broken install (e.g. numpy ABI) is "not available"
            continue
        try:
            found[name] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            found[name] = str(getattr(imported, "__version__", "unknown"))
    return found


def _version_tuple(text: str) -> tuple[int, ...] | None:
    match = re.match(r"\d+(?:\.\d+)*", text.strip())
    return tuple(int(part) for part in match.group(0).split(".")) if match else None


def _describe(runtimes: Mapping[str, str]) -> str:
    return ", ".join(f"{n} {v}" for n, v in sorted(runtimes.items())) or "no model runtime"


def _choose_backend(manifest: BundleManifest, runtimes: Mapping[str, str]) -> str:
    candidates = [n for n in _BACKENDS_FOR_FORMAT[manifest.format] if n in runtimes]
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


# ----------------------------------------------------------------------------- backends


class _Backend(Protocol):
    """One interpreter: float32 model input in, raw first output out (not thread-safe)."""

    input_dtype: str
    output_dtype: str
    input_shape: list[int]
    fixed_batch: int | None

    def run(self, model_input: np.ndarray) -> np.ndarray: ...


class _TFLiteBackend:
    def __init__(self, interpreter_class: Any, model: bytes, num_threads: int | None) -> None:
        try:
            self._interpreter = interpreter_class(model_content=model, num_threads=num_threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise ModelLoadError(f"the TFLite interpreter cannot load the model: {e}") from e
        inputs = self._interpreter.get_input_details()
        outputs = self._interpreter.get_output_details()
        if len(inputs) != 1 or not outputs:
            raise ModelLoadError(
                f"expected one input and at least one output, the model has {len(inputs)} "
                f"and {len(outputs)}"
            )
        self._input_index = int(inputs[0]["index"])
        self._output_index = int(outputs[0]["index"])
        self.input_dtype = np.dtype(inputs[0]["dtype"]).name
        self.output_dtype = np.dtype(outputs[0]["dtype"]).name
        signature = inputs[0].get("shape_signature")
        shape = [int(d) for d in (signature if signature is not None else inputs[0]["shape"])]
        self.input_shape = shape
        self._rows = int(inputs[0]["shape"][0])
        self.fixed_batch = None if shape[0] == -1 else shape[0]

    def run(self, model_input: np.ndarray) -> np.ndarray:
        rows = len(model_input)
        if rows != self._rows:
            try:
                self._interpreter.resize_tensor_input(
                    self._input_index, list(model_input.shape), strict=True
                )
                self._interpreter.allocate_tensors()
            except (ValueError, RuntimeError) as e:
                raise ModelLoadError(f"cannot resize the model's input to {rows} rows: {e}") from e
            self._rows = rows
        self._interpreter.set_tensor(self._input_index, model_input)
        self._interpreter.invoke()
        return np.asarray(self._interpreter.get_tensor(self._output_index))


_ONNX_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
}


class _OnnxBackend:
    def __init__(self, onnxruntime: Any, model: bytes, num_threads: int | None) -> None:
        options = onnxruntime.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        try:
            self._session = onnxruntime.InferenceSession(
                model, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # onnxruntime's pybind exceptions share no useful base
            raise ModelLoadError(f"onnxruntime cannot load the model: {e}") from e
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or not outputs:
            raise ModelLoadError(
                f"expected one input and at least one output, the model has {len(inputs)} "
                f"and {len(outputs)}"
            )
        self.input_dtype = _ONNX_DTYPES.get(inputs[0].type, inputs[0].type)
        self.output_dtype = _ONNX_DTYPES.get(outputs[0].type, outputs[0].type)
        self.input_shape = [d if isinstance(d, int) and d > 0 else -1 for d in inputs[0].shape]
        self.fixed_batch = None if self.input_shape[0] == -1 else self.input_shape[0]
        self._input_name = inputs[0].name
        self._output_name = outputs[0].name

    def run(self, model_input: np.ndarray) -> np.ndarray:
        (raw,) = self._session.run([self._output_name], {self._input_name: model_input})
        return np.asarray(raw)


def _make_backend(name: str, model: bytes, num_threads: int | None) -> _Backend:
    module_name = _RUNTIME_MODULES[name][0]
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # an ImportError, or a broken binary install
        raise RuntimeUnavailableError(
            f"{name} is listed as available but cannot be imported: {e}"
        ) from e
    if name == "onnxruntime":
        return _OnnxBackend(module, model, num_threads)
    return _TFLiteBackend(module.Interpreter, model, num_threads)


# ----------------------------------------------------------------------------- quantization


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Prediction:
    """The model's answer for a batch of ``n`` rows.

    ``outputs`` is always float32 ``(n, k)`` (dequantized). For a classifier,
    ``probabilities`` is ``(n, classes)`` (a single sigmoid unit becomes two columns,
    ``[1 - p, p]``, class 1 from ``p >= 0.5``; outputs that are not already a
    distribution -- logits -- go through a softmax), ``classes`` the predicted class
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


def _probabilities(outputs: np.ndarray) -> np.ndarray:
    if outputs.shape[1] == 1:
        p = outputs[:, 0]
        if np.any((p < 0) | (p > 1)):  # a logit, not a sigmoid output
            with np.errstate(over="ignore"):  # exp(1000) = inf gives p = 0, as it should
                p = 1.0 / (1.0 + np.exp(-p))
        p = np.clip(p, 0.0, 1.0)
        return np.stack([1.0 - p, p], axis=1).astype(np.float32)
    sums = outputs.sum(axis=1, keepdims=True)
    if (
        outputs.min() >= 0
        and outputs.max() <= 1
        and float(np.abs(sums - 1.0).max()) <= _PROBABILITY_SUM_TOLERANCE
    ):
        return np.asarray(outputs / sums, dtype=np.float32)  # sums are near 1: never zero
    shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=1, keepdims=True), dtype=np.float32)


# ----------------------------------------------------------------------------- the model


class LoadedModel:
    """One bundle's model, loaded in its runtime and ready to serve."""

    def __init__(
        self,
        bundle: Bundle,
        backend: _Backend,
        *,
        runtime: str,
        runtime_version: str,
        limits: Limits,
    ) -> None:
        manifest = bundle.manifest
        self.bundle = bundle
        self.runtime = runtime
        self.runtime_version = runtime_version
        self._manifest = manifest
        self._backend = backend
        self._limits = limits
        self._input_spec = manifest.inputs[0]
        self._output_spec = manifest.outputs[0]
        self._lock = threading.Lock()
        self._check_tensor("input", self._input_spec, backend.input_dtype)
        self._check_tensor("output", self._output_spec, backend.output_dtype)
        self.n_features = self._feature_count()
        self._check_preprocessing(backend.input_shape)

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
        :func:`available_runtimes`.
        """
        offered = available_runtimes() if runtimes is None else dict(runtimes)
        name = _choose_backend(bundle.manifest, offered)
        backend = _make_backend(name, bundle.model, num_threads)
        return cls(
            bundle, backend, runtime=name, runtime_version=offered[name], limits=limits or Limits()
        )

    @property
    def manifest(self) -> BundleManifest:
        return self._manifest

    # -- checks made once, at load

    def _check_tensor(self, role: str, spec: TensorSpec, actual: str) -> None:
        if spec.dtype != actual:
            raise ModelLoadError(
                f"the manifest states a {spec.dtype} {role}, the model's {role} is {actual}"
            )
        if spec.dtype in ("int8", "uint8", "int16") and spec.quantization is None:
            raise ModelLoadError(
                f"the model's {role} is {spec.dtype} but the manifest gives no quantization "
                "parameters for it"
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

    def _check_preprocessing(self, model_shape: Sequence[int]) -> None:
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
        model_input = quantize(
            apply_preprocessing(self._manifest.preprocessing, x), self._input_spec
        )
        fixed = self._backend.fixed_batch
        with self._lock:
            if fixed is None:
                raw = self._backend.run(model_input)
            else:  # a model built for one batch size: run in pieces of it, pad the last
                pieces = []
                for start in range(0, len(model_input), fixed):
                    piece = model_input[start : start + fixed]
                    short = fixed - len(piece)
                    if short:
                        pad = np.repeat(piece[-1:], short, axis=0)
                        piece = np.concatenate([piece, pad], axis=0)
                    pieces.append(self._backend.run(piece)[: fixed - short])
                raw = np.concatenate(pieces, axis=0)
        return dequantize(raw, self._output_spec).reshape(len(x), -1)

    def predict(self, rows: Any) -> Prediction:
        """Serve raw feature rows: one row, a list of rows, or an array ``(n, features)``.

        Raises :class:`InputError` (the model keeps serving) for rows it cannot take.
        """
        outputs = self._run(self._validate(rows, self._limits.max_batch_rows))
        manifest = self._manifest
        if manifest.task != "classification":
            return Prediction(manifest.model_name, manifest.model_version, outputs)
        probabilities = _probabilities(outputs)
        if outputs.shape[1] == 1:  # ties go to class 1, as in the server's evaluation
            classes = (probabilities[:, 1] >= 0.5).astype(np.int64)
        else:
            classes = probabilities.argmax(axis=1).astype(np.int64)
        names = manifest.labels or []
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


def _label(manifest: BundleManifest) -> str:
    return f"{manifest.model_name} v{manifest.model_version} ({manifest.target})"
