"""Release gates for one target build: a pure function of the build, its profile and config.

The gates (each switchable in :class:`~server.pipeline.types.GateConfig`):

- **metric**: against the float model on the same test split. Classification: the
  accuracy points lost, ``100 * (float - artifact)`` on the 0-100 scale (metrics are
  fractions); regression: the percent of the float model's RMSE gained,
  ``100 * (artifact - float) / float``. At most ``max_metric_drop``. A negative delta
  (the artifact is better) always passes.
- **size**: the artifact's bytes within ``profile.max_model_bytes``.
- **op support**: every op, at the version the model needs, registered by the
  profile's runtime at its version (tables in :mod:`server.pipeline.runtime_support`);
  a runtime version without a table fails the gate rather than passing unchecked.

A build that has no model, or carries an error, fails whatever else holds. Every
failure is one reason string naming the figure and its limit. Nothing here does I/O
beyond reading the (cached, packaged) op tables.
"""

from __future__ import annotations

import math

from server.datasets.types import Task
from server.pipeline.ops import unsupported_ops
from server.pipeline.runtime_support import UnknownRuntimeError
from server.pipeline.types import GateConfig, GateResult, TargetBuild
from server.profiles import Profile

__all__ = ["check_gates", "metric_delta", "metric_name"]

# Rounding noise must not fail a gate set exactly at a measured figure.
_EPSILON = 1e-9


def metric_name(task: Task) -> str:
    """The metric a task is gated on: ``accuracy`` or ``rmse``."""
    return "accuracy" if task == "classification" else "rmse"


def metric_delta(task: Task, *, float_metric: float, value: float) -> float:
    """How much worse ``value`` is than ``float_metric``, in the gate's unit.

    Classification: accuracy points lost (0-100 scale). Regression: percent of the
    float model's RMSE gained (infinite when a perfect float model is no longer
    perfect).
    """
    if task == "classification":
        return 100.0 * (float_metric - value)
    if float_metric > 0:
        return 100.0 * (value - float_metric) / float_metric
    return 0.0 if value <= float_metric else math.inf


def _bytes(n: int) -> str:
    return f"{n / (1024 * 1024):.2f} MiB ({n:,} bytes)"


def check_gates(
    *,
    build: TargetBuild,
    profile: Profile,
    config: GateConfig,
    float_metric: float,
    task: Task,
) -> GateResult:
    """Every gate ``build`` fails for ``profile`` under ``config``; passed when none."""
    reasons: list[str] = []
    if build.model is None:
        reasons.append(f"no artifact: {build.error or 'conversion produced nothing'}")
    elif build.error:
        reasons.append(f"the artifact failed in its runtime: {build.error}")

    if build.model is not None:
        name = metric_name(task)
        if build.metric_value is None or not math.isfinite(build.metric_value):
            reasons.append(f"{name} was not measured in the target runtime")
        else:
            delta = metric_delta(task, float_metric=float_metric, value=build.metric_value)
            if delta > config.max_metric_drop + _EPSILON:
                if task == "classification":
                    reasons.append(
                        f"accuracy dropped {delta:.2f} points against the float model "
                        f"({100 * float_metric:.2f}% -> {100 * build.metric_value:.2f}%); "
                        f"the limit is {config.max_metric_drop:.2f} points"
                    )
                else:
                    reasons.append(
                        f"RMSE rose {delta:.2f}% against the float model ({float_metric:.6g} "
                        f"-> {build.metric_value:.6g}); the limit is {config.max_metric_drop:.2f}%"
                    )

        if config.enforce_size_budget and build.size_bytes > profile.max_model_bytes:
            reasons.append(
                f"size {_bytes(build.size_bytes)} exceeds the budget of profile "
                f"{profile.name}: {_bytes(profile.max_model_bytes)}"
            )

        if config.enforce_op_support:
            runtime = f"{profile.runtime.name} {profile.runtime.version}"
            try:
                missing = unsupported_ops(build.ops, profile.runtime.name, profile.runtime.version)
            except UnknownRuntimeError as e:
                reasons.append(f"op support cannot be checked: {e}")
            else:
                reasons.extend(f"op not supported by {runtime}: {problem}" for problem in missing)

    return GateResult(passed=not reasons, reasons=reasons)
