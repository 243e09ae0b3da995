"""Shared pieces of the training tests: small real datasets, dataset rows, waiting on state."""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import lru_cache
from typing import TypeVar

import numpy as np
from sqlalchemy.engine import Engine
from sqlmodel import select

from server.datasets.types import DatasetSchema, LoadedDataset
from server.db import session_scope
from server.models import Dataset, DatasetVersion

T = TypeVar("T")


def wait_for(
    probe: Callable[[], T | None], *, timeout: float = 30.0, what: str = "the condition"
) -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds.

    Subprocesses and threads give no event to wait on, so their effect on the database is
    polled; nothing waits for time itself to pass.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def split(
    x: np.ndarray, y: np.ndarray, *, seed: int = 0, val: float = 0.15, test: float = 0.15
) -> tuple[np.ndarray, ...]:
    order = np.random.default_rng(seed).permutation(len(x))
    n_test, n_val = int(len(x) * test), int(len(x) * val)
    te, va, tr = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    return x[tr], y[tr], x[va], y[va], x[te], y[te]


def digits_schema() -> DatasetSchema:
    return DatasetSchema(
        task="classification",
        label="digit",
        feature_names=[f"pixel_{i}" for i in range(64)],
        feature_dtypes=["float64"] * 64,
        input_shape=[8, 8, 1],
        class_names=[str(i) for i in range(10)],
        rows=1797,
    )


@lru_cache(maxsize=1)
def digits() -> LoadedDataset:
    """scikit-learn's 8x8 digits (bundled with it; nothing is downloaded), split 70/15/15."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.data.astype(np.float32)
    y = bunch.target.astype(np.int64)
    return LoadedDataset("digits", 1, "0" * 64, digits_schema(), *split(x, y))


def small_digits(rows: int = 400) -> LoadedDataset:
    """The first ``rows`` digits, for fits that only need to run, not to be good."""
    full = digits()
    x = np.concatenate([full.x_train, full.x_val, full.x_test])[:rows]
    y = np.concatenate([full.y_train, full.y_val, full.y_test])[:rows]
    schema = full.schema.model_copy(update={"rows": rows})
    return LoadedDataset("digits", 1, "0" * 64, schema, *split(x, y))


def regression_data(rows: int = 600, seed: int = 0) -> LoadedDataset:
    """A noisy linear target in large units (thousands), on five tabular features."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 5)).astype(np.float32) * [1, 10, 0.1, 5, 1]
    y = (5000 + 800 * x[:, 0] - 30 * x[:, 1] + 2000 * x[:, 2] + rng.normal(0, 50, rows)).astype(
        np.float32
    )
    schema = DatasetSchema(
        task="regression",
        label="price",
        feature_names=[f"f{i}" for i in range(5)],
        feature_dtypes=["float64"] * 5,
        input_shape=[5],
        rows=rows,
    )
    return LoadedDataset("prices", 1, "1" * 64, schema, *split(x.astype(np.float32), y))


def vibration_data(rows: int = 300, steps: int = 16, seed: int = 0) -> LoadedDataset:
    """3-axis windows: class 1 carries a sine on the x axis, class 0 only noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, rows).astype(np.int64)
    t = np.arange(steps)
    windows = rng.normal(0, 1, size=(rows, steps, 3))
    windows[:, :, 0] += y[:, None] * 3 * np.sin(t / 2)[None, :]
    windows[:, :, 2] += 9.81  # gravity: a channel offset that per-channel scaling removes
    x = windows.reshape(rows, steps * 3).astype(np.float32)
    schema = DatasetSchema(
        task="classification",
        label="state",
        feature_names=[f"{axis}{i}" for i in range(steps) for axis in "xyz"],
        feature_dtypes=["float64"] * steps * 3,
        input_shape=[steps, 3],
        class_names=["idle", "running"],
        rows=rows,
    )
    return LoadedDataset("vibration", 1, "2" * 64, schema, *split(x, y))


def add_dataset_version(
    engine: Engine, schema: DatasetSchema, *, name: str = "digits", version: int = 1
) -> int:
    """A dataset version row, as the datasets service would record it (no stored arrays)."""
    with session_scope(engine) as session:
        dataset = session.exec(select(Dataset).where(Dataset.name == name)).first()
        if dataset is None:
            dataset = Dataset(name=name, task=schema.task, label=schema.label)
            session.add(dataset)
            session.flush()
        assert dataset.id is not None
        row = DatasetVersion(
            dataset_id=dataset.id,
            version=version,
            sha256=f"{version:064x}",
            source_sha256=f"{version:064x}",
            source_format="builtin",
            source_name=name,
            rows=schema.rows,
            data_schema_json=schema.model_dump_json(),
            splits_sha256=f"{version:064x}",
            split_seed=0,
        )
        session.add(row)
        session.flush()
        assert row.id is not None
        return row.id
