"""One artifact per target profile: convert, evaluate in the target runtime, gate.

:func:`build_targets` is what the registry calls for every new model version. For
each profile it takes the profile's first format and its quantization, converts the
Keras model once per distinct (format, quantization) and reuses that artifact and its
measurements for every profile that asks for the same, then gates each profile's build
against that profile.

Where artifacts are evaluated: TFLite in ai-edge-litert, ONNX in onnxruntime -- the
runtimes installed with the server, never Keras -- through the device's own runtime
layer (:func:`agent.runtime.open_model`, via :mod:`server.pipeline.evaluate`), so the
metrics, latency and self-test outputs recorded here come from the code a device runs.
The legacy ``tflite-runtime`` 2.14 profile is evaluated in ai-edge-litert too (the same
TFLite kernel family, and the one a server with numpy 2 can run), but gated against the
op table of tflite-runtime 2.14, so a model that such a device cannot load fails here,
naming the op. A TFLite or ONNX artifact the installed runtime cannot load fails as an
error of its build.

What always holds: one :class:`TargetBuild` per profile, in the profiles' order; a
failure in one (conversion, loading, evaluation) becomes that build's ``error`` with
``model=None`` when there is no artifact, and a failed gate -- it never loses the
other builds. ``min_runtime_version`` is the runtime version of the profile the
artifact was gated against. Self-test vectors are raw rows from the test split with
the outputs the target runtime produced for them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.datasets.types import LoadedDataset, Task
from server.pipeline.convert import ConversionError, convert_onnx, convert_tflite
from server.pipeline.evaluate import (
    EvaluationError,
    LiteRTRunner,
    OnnxRunner,
    Runner,
    evaluate,
    latency_p50_ms,
    score,
)
from server.pipeline.gates import check_gates, metric_delta, metric_name
from server.pipeline.ops import onnx_ops, tflite_ops
from server.pipeline.types import GateConfig, GateResult, TargetBuild
from server.profiles import Profile
from shared.bundle import OpRequirement, SelfTest, TensorSpec
from shared.preprocessing import PreprocessingStep, apply_preprocessing

__all__ = ["LATENCY_REPEATS", "build_targets", "self_test_atol"]

log = logging.getLogger(__name__)

LATENCY_REPEATS = 100
REPRESENTATIVE_MIN, REPRESENTATIVE_MAX = 100, 500
MAX_SELF_TEST_ROWS = 64
INT8_SELF_TEST_STEPS = 8
_SEED = 0


@dataclass
class _Artifact:
    """One converted model and what was measured on it (shared by profiles that want it)."""

    model: bytes | None = None
    error: str | None = None
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    latency_p50_ms: float | None = None
    ops: list[OpRequirement] = field(default_factory=list)
    self_tests: list[SelfTest] = field(default_factory=list)


def self_test_atol(
    *, format: str, quantization: str, outputs: list[TensorSpec], expected: np.ndarray
) -> float:
    """How far a device's outputs may differ from the server's and still pass.

    Scaled by the outputs' magnitude (at least 1): float32 differs between CPUs only in
    the last bits; float16 may run in half precision on a GPU delegate; dynamic-range
    int8 quantizes activations at run time with kernels that differ per CPU; int8
    outputs are multiples of their scale, and kernels differ by a few steps between
    runtime versions (measured: tflite-runtime 2.14 against ai-edge-litert 2.3 on the
    same int8 CNN, up to 5 steps of a softmax output), so 8 steps are allowed.
    """
    magnitude = max(1.0, float(np.max(np.abs(expected))) if expected.size else 1.0)
    if quantization == "float32":
        return 1e-4 * magnitude
    if quantization in ("float16", "dynamic-int8"):
        return 1e-2 * magnitude
    scale = outputs[0].quantization.scale if outputs and outputs[0].quantization else 0.0
    if format == "tflite" and scale > 0:
        return max(INT8_SELF_TEST_STEPS * scale, 1e-3 * magnitude)
    return 2e-2 * magnitude


def _representative(
    data: LoadedDataset, steps: Sequence[PreprocessingStep], rows: int
) -> np.ndarray:
    wanted = min(max(rows, REPRESENTATIVE_MIN), REPRESENTATIVE_MAX, len(data.x_train))
    picked = np.random.default_rng(_SEED).choice(len(data.x_train), size=wanted, replace=False)
    return apply_preprocessing(steps, data.x_train[np.sort(picked)])


def _float_metric(
    model: Any,
    *,
    name: str,
    float_metrics: dict[str, float],
    x_test: np.ndarray,
    data: LoadedDataset,
) -> float:
    if name not in float_metrics:
        outputs = np.asarray(model.predict(x_test, verbose=0))
        return score(outputs, y=data.y_test, task=data.schema.task)[name]
    value = float(float_metrics[name])
    if name == "accuracy" and not 0.0 <= value <= 1.0:
        raise ValueError(f"the float model's accuracy must be a fraction (0-1), not {value}")
    return value


def _build_artifact(
    model: Any,
    *,
    format: str,
    quantization: str,
    data: LoadedDataset,
    steps: Sequence[PreprocessingStep],
    representative: np.ndarray,
    x_test: np.ndarray,
    self_test_rows: int,
    progress: Callable[[str], None],
) -> _Artifact:
    label = f"{format} {quantization}"
    artifact = _Artifact()
    try:
        progress(f"converting {label}")
        if format == "tflite":
            artifact.model = convert_tflite(
                model, quantization=quantization, representative=representative
            )
            artifact.ops = tflite_ops(artifact.model)
            progress(f"evaluating {label} in ai-edge-litert")
            runner: Runner = LiteRTRunner(artifact.model)
        else:
            artifact.model = convert_onnx(
                model,
                input_shape=data.schema.input_shape,
                quantization=quantization,
                calibration=representative,
            )
            artifact.ops = onnx_ops(artifact.model)
            progress(f"evaluating {label} in onnxruntime")
            runner = OnnxRunner(artifact.model)
        artifact.inputs, artifact.outputs = runner.inputs, runner.outputs
        task: Task = data.schema.task
        artifact.metrics = evaluate(runner, x_model_input=x_test, y=data.y_test, task=task)
        artifact.latency_p50_ms = latency_p50_ms(runner, x_test[:1], LATENCY_REPEATS)
        rows = data.x_test[: max(1, min(self_test_rows, MAX_SELF_TEST_ROWS))]
        expected = runner.predict(apply_preprocessing(steps, rows)).reshape(len(rows), -1)
        artifact.self_tests = [
            SelfTest(
                input=rows.astype(np.float64).tolist(),
                expected=expected.astype(np.float64).tolist(),
                atol=self_test_atol(
                    format=format,
                    quantization=quantization,
                    outputs=runner.outputs,
                    expected=expected,
                ),
            )
        ]
    except (ConversionError, EvaluationError) as e:
        artifact.error = str(e)
    except Exception as e:  # one target's failure must not lose the others
        log.exception("building the %s artifact failed", label)
        artifact.error = f"{type(e).__name__}: {e}"
    return artifact


def build_targets(
    model: Any,
    *,
    data: LoadedDataset,
    preprocessing: list[PreprocessingStep],
    profiles: Sequence[Profile],
    gates: GateConfig,
    float_metrics: dict[str, float],
    representative_rows: int = 300,
    self_test_rows: int = 4,
    on_progress: Callable[[str], None] | None = None,
) -> list[TargetBuild]:
    """One gated :class:`TargetBuild` per profile for a trained Keras ``model``.

    ``float_metrics`` are the float model's metrics on ``data``'s test split
    (fractions: ``accuracy``; or ``rmse``); when the gated metric is missing it is
    measured here with the Keras model. ``representative_rows`` training rows (clamped
    to 100-500) calibrate int8; ``self_test_rows`` test rows become self-test vectors.
    """
    progress = on_progress or (lambda _message: None)
    task: Task = data.schema.task
    name = metric_name(task)
    x_test = apply_preprocessing(preprocessing, data.x_test)
    representative = _representative(data, preprocessing, representative_rows)
    float_metric = _float_metric(
        model, name=name, float_metrics=float_metrics, x_test=x_test, data=data
    )

    artifacts: dict[tuple[str, str], _Artifact] = {}
    builds = []
    for profile in profiles:
        key = (profile.formats[0], profile.quantization)
        if key not in artifacts:
            artifacts[key] = _build_artifact(
                model,
                format=key[0],
                quantization=key[1],
                data=data,
                steps=preprocessing,
                representative=representative,
                x_test=x_test,
                self_test_rows=self_test_rows,
                progress=progress,
            )
        artifact = artifacts[key]
        value = artifact.metrics.get(name)
        build = TargetBuild(
            profile=profile.name,
            format=key[0],  # type: ignore[arg-type]  # a Profile's formats are Literals
            quantization=key[1],
            runtime=profile.runtime.name,
            min_runtime_version=profile.runtime.version,
            model=artifact.model,
            inputs=list(artifact.inputs),
            outputs=list(artifact.outputs),
            metric_name=name,
            metric_value=value,
            metric_delta=None
            if value is None
            else metric_delta(task, float_metric=float_metric, value=value),
            metrics=dict(artifact.metrics),
            size_bytes=len(artifact.model) if artifact.model is not None else 0,
            latency_p50_ms=artifact.latency_p50_ms,
            ops=list(artifact.ops),
            self_tests=list(artifact.self_tests),
            gate=GateResult(passed=False),
            error=artifact.error,
        )
        progress(f"gating {profile.name}")
        build.gate = check_gates(
            build=build, profile=profile, config=gates, float_metric=float_metric, task=task
        )
        builds.append(build)
    return builds
