"""What the rest of the server gets from a dataset version: arrays, schema and splits.

These types are the seam between the datasets package (which parses, validates and
stores uploads) and training and the pipeline (which only read them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DatasetSchema", "LoadedDataset", "Task"]

Task = Literal["classification", "regression"]


class DatasetSchema(BaseModel):
    """Inferred when a version is added, stored with it, never changed afterwards."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Task
    label: str = Field(description="name of the label column (CSV) or array (NPZ)")
    feature_names: list[str] = Field(min_length=1, description="flattened feature order")
    feature_dtypes: list[str] = Field(description="per feature: int64, float64, bool")
    input_shape: list[int] = Field(
        min_length=1, description="shape of one sample, e.g. [64] or [8, 8, 1] or [256, 3]"
    )
    class_names: list[str] | None = Field(
        None, description="classification: label values in class-index order"
    )
    rows: int = Field(gt=0)


@dataclass(frozen=True)
class LoadedDataset:
    """A dataset version with its seeded, stored splits applied.

    ``x_*`` are *raw, flat* feature rows: shape ``(rows, len(schema.feature_names))``,
    dtype float32, exactly what a device will be given. ``schema.input_shape`` is the
    per-sample shape the model sees after preprocessing (which ends with a reshape
    when that shape has more than one dimension). ``y_*`` are int64 class indices
    (classification) or float32 targets (regression).
    """

    dataset_name: str
    version: int
    sha256: str
    schema: DatasetSchema
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def n_classes(self) -> int | None:
        return None if self.schema.class_names is None else len(self.schema.class_names)

    @property
    def n_features(self) -> int:
        return len(self.schema.feature_names)
