"""Input preprocessing, recorded at training time and replayed at serving time.

The bundle carries the exact steps training used; the agent and the server's
evaluation both run them through :func:`apply_preprocessing`, so serving cannot
skew from training. An unknown step is a validation error: a model must never be
served with part of its preprocessing silently skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from shared.errors import MessageError
from shared.model import ContractModel

__all__ = [
    "Clip",
    "PreprocessingStep",
    "Reshape",
    "Scale",
    "Standardize",
    "apply_preprocessing",
]


class Standardize(ContractModel):
    """``(x - mean) / std`` per feature; a zero std divides by one."""

    op: Literal["standardize"] = "standardize"
    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)

    @model_validator(mode="after")
    def _same_length(self) -> Standardize:
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std differ in length")
        return self


class Scale(ContractModel):
    """``x * factor + offset`` on every value."""

    op: Literal["scale"] = "scale"
    factor: float = 1.0
    offset: float = 0.0


class Clip(ContractModel):
    op: Literal["clip"] = "clip"
    min: float | None = None
    max: float | None = None


class Reshape(ContractModel):
    """Reshape each sample (the batch dimension stays first)."""

    op: Literal["reshape"] = "reshape"
    shape: list[int] = Field(min_length=1, max_length=8)


PreprocessingStep = Annotated[Standardize | Scale | Clip | Reshape, Field(discriminator="op")]


def apply_preprocessing(
    steps: Sequence[Standardize | Scale | Clip | Reshape], batch: npt.ArrayLike
) -> npt.NDArray[np.float32]:
    """Run ``steps`` on a batch ``(rows, features)`` and return float32 model input."""
    x = np.asarray(batch, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    for step in steps:
        if isinstance(step, Standardize):
            if x.ndim != 2 or x.shape[1] != len(step.mean):
                raise MessageError(
                    f"standardize expects {len(step.mean)} features, the input has shape "
                    f"{tuple(x.shape)}"
                )
            std = np.asarray(step.std, dtype=np.float32)
            safe_std = np.where(std == 0, np.float32(1), std)
            x = ((x - np.asarray(step.mean, dtype=np.float32)) / safe_std).astype(np.float32)
        elif isinstance(step, Scale):
            x = x * np.float32(step.factor) + np.float32(step.offset)
        elif isinstance(step, Clip):
            x = np.clip(x, step.min, step.max)
        else:
            try:
                x = x.reshape((x.shape[0], *step.shape))
            except ValueError as e:
                raise MessageError(
                    f"cannot reshape input of shape {tuple(x.shape)} to (rows, "
                    f"{', '.join(map(str, step.shape))})"
                ) from e
    return x.astype(np.float32, copy=False)
