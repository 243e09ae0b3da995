from __future__ import annotations

import numpy as np
import pytest
from pydantic import TypeAdapter

from shared.errors import MessageError
from shared.preprocessing import PreprocessingStep, apply_preprocessing

STEPS = TypeAdapter(list[PreprocessingStep])


def test_steps_run_in_order_and_give_float32() -> None:
    steps = STEPS.validate_python(
        [
            {"op": "standardize", "mean": [1, 2, 3, 4], "std": [1, 2, 0, 4]},
            {"op": "clip", "min": -1, "max": 1},
            {"op": "scale", "factor": 2, "offset": 1},
            {"op": "reshape", "shape": [2, 2, 1]},
        ]
    )
    out = apply_preprocessing(steps, [[2, 2, 10, 12]])
    assert out.dtype == np.float32 and out.shape == (1, 2, 2, 1)
    assert out.ravel().tolist() == [3.0, 1.0, 3.0, 3.0]


def test_wrong_shapes_are_clear_errors() -> None:
    steps = STEPS.validate_python([{"op": "standardize", "mean": [0, 0], "std": [1, 1]}])
    with pytest.raises(MessageError, match="expects 2 features"):
        apply_preprocessing(steps, [[1, 2, 3]])
    reshape = STEPS.validate_python([{"op": "reshape", "shape": [8, 8]}])
    with pytest.raises(MessageError, match="cannot reshape"):
        apply_preprocessing(reshape, np.zeros((2, 10)))


def test_unknown_steps_are_refused() -> None:
    with pytest.raises(ValueError):
        STEPS.validate_python([{"op": "fft"}])
