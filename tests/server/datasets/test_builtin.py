"""The bundled examples: the same validated data every time, no download."""

from __future__ import annotations

import numpy as np
import pytest

from server.datasets.builtin import EXAMPLES, load_example
from server.datasets.ingest import DatasetNotFoundError
from server.errors import NotFoundError


def test_digits() -> None:
    digits = load_example("digits")
    schema = digits.schema
    assert digits.x.shape == (1797, 64) and schema.rows == 1797
    assert schema.feature_names == [f"px{i}" for i in range(64)]
    assert schema.input_shape == [8, 8, 1]
    assert schema.class_names == [str(d) for d in range(10)]
    assert schema.task == "classification" and schema.label == "digit"
    assert digits.x.min() == 0 and digits.x.max() == 16
    assert digits.source_format == "builtin"
    assert digits.source_sha256 == digits.content_sha256


def test_vibration() -> None:
    vibration = load_example("vibration")
    schema = vibration.schema
    assert vibration.x.shape == (2000, 192)
    assert schema.input_shape == [64, 3]
    assert schema.class_names == ["normal", "imbalance", "misalignment", "bearing_fault"]
    assert schema.label == "condition"
    assert np.bincount(vibration.y).tolist() == [500] * 4


def test_examples_are_stable() -> None:
    assert load_example("vibration").content_sha256 == load_example("vibration").content_sha256
    assert set(EXAMPLES) == {"digits", "vibration"}


def test_unknown_example() -> None:
    with pytest.raises(DatasetNotFoundError, match="the examples are digits, vibration") as e:
        load_example("mnist")
    assert isinstance(e.value, NotFoundError) and e.value.status_code == 404
