"""The bundled example datasets, by name; none needs a download.

- ``digits``: scikit-learn's 8x8 handwritten digits (``load_digits``, shipped inside
  scikit-learn): 1797 rows, features ``px0`` .. ``px63`` (values 0..16, row-major),
  input shape ``[8, 8, 1]``, classes ``"0"`` .. ``"9"``, label ``digit``.
- ``vibration``: :func:`server.datasets.synthetic.generate_vibration` with 2000
  samples, seed 0 and a 64-reading window: features ``ax[0]``, ``ay[0]``, ``az[0]``, ...,
  input shape ``[64, 3]``, four machine conditions, label ``condition``.

What always holds: an example is the same data every time (its ``content_sha256`` is
stable for a given numpy and scikit-learn), it passes the same validation as an upload,
and its ``source_format`` is ``builtin`` with ``source_sha256`` equal to its content hash.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.datasets.ingest import DatasetNotFoundError, ParsedDataset, from_arrays
from server.datasets.synthetic import generate_vibration

__all__ = ["EXAMPLES", "VIBRATION_SAMPLES", "VIBRATION_SEED", "Example", "load_example"]

VIBRATION_SAMPLES = 2000
VIBRATION_SEED = 0


@dataclass(frozen=True)
class Example:
    name: str
    description: str
    build: Callable[[], ParsedDataset] = field(repr=False)
    lineage: dict[str, Any] = field(default_factory=dict)
    """What a version made from it records as its origin."""


def _digits() -> ParsedDataset:
    from sklearn.datasets import load_digits  # bundled with scikit-learn; heavy import

    digits = load_digits()
    return from_arrays(
        np.asarray(digits.data, dtype=np.float32),
        np.asarray(digits.target, dtype=np.int64),
        label="digit",
        feature_names=[f"px{i}" for i in range(64)],
        input_shape=[8, 8, 1],
        class_names=[str(d) for d in range(10)],
        task="classification",
    )


def _vibration() -> ParsedDataset:
    samples = generate_vibration(VIBRATION_SAMPLES, seed=VIBRATION_SEED)
    return from_arrays(
        samples.x,
        samples.y,
        label="condition",
        feature_names=samples.feature_names,
        input_shape=samples.input_shape,
        class_names=samples.class_names,
        task="classification",
    )


EXAMPLES: dict[str, Example] = {
    "digits": Example(
        name="digits",
        description="8x8 grey-level images of handwritten digits 0-9 (scikit-learn's load_digits).",
        lineage={
            "source": "builtin",
            "example": "digits",
            "origin": "sklearn.datasets.load_digits",
        },
        build=_digits,
    ),
    "vibration": Example(
        name="vibration",
        description="Synthetic three-axis vibration windows of a rotating machine: normal, "
        "imbalance, misalignment, bearing fault.",
        lineage={
            "source": "builtin",
            "example": "vibration",
            "generator": {
                "function": "server.datasets.synthetic.generate_vibration",
                "n_samples": VIBRATION_SAMPLES,
                "seed": VIBRATION_SEED,
                "window": 64,
            },
        },
        build=_vibration,
    ),
}


def load_example(name: str) -> ParsedDataset:
    """The bundled example ``name`` (``digits`` or ``vibration``)."""
    example = EXAMPLES.get(name)
    if example is None:
        raise DatasetNotFoundError(
            f"no example dataset named {name!r}; the examples are {', '.join(sorted(EXAMPLES))}"
        )
    return example.build()
