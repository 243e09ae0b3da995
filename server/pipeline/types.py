"""What building a model version for one target profile produces.

The conversion/evaluation code fills :class:`TargetBuild`; the registry turns each
into a signed bundle and a ``target_artifacts`` row. Kept free of TensorFlow so the
API process can import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.bundle import OpRequirement, SelfTest, TensorSpec

__all__ = ["GateConfig", "GateResult", "TargetBuild"]


class GateConfig(BaseModel):
    """Release gates per target; configurable per model, these are the defaults."""

    model_config = ConfigDict(extra="forbid")

    max_metric_drop: float = Field(
        1.0,
        ge=0,
        description="classification: accuracy points (0-100 scale) the artifact may lose "
        "against the float model; regression: percent of the float model's RMSE it may gain",
    )
    enforce_size_budget: bool = Field(True, description="size within the profile's budget")
    enforce_op_support: bool = Field(
        True, description="every op at a version the profile's runtime version supports"
    )


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    """Every gate that failed, each naming the figure and its limit."""


@dataclass
class TargetBuild:
    """One model version converted for one profile and evaluated in that profile's runtime."""

    profile: str
    format: Literal["tflite", "onnx"]
    quantization: str
    runtime: str
    min_runtime_version: str
    model: bytes | None
    """The converted model, or None when conversion itself failed (see ``error``)."""
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    metric_name: str = ""
    metric_value: float | None = None
    metric_delta: float | None = None
    """Against the float model: accuracy points lost, or percent RMSE gained."""
    metrics: dict[str, float] = field(default_factory=dict)
    size_bytes: int = 0
    latency_p50_ms: float | None = None
    ops: list[OpRequirement] = field(default_factory=list)
    self_tests: list[SelfTest] = field(default_factory=list)
    gate: GateResult = field(default_factory=lambda: GateResult(passed=False))
    error: str | None = None
