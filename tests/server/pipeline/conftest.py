"""Small real models for the pipeline tests, trained once per session.

- ``digits``: sklearn's 8x8 digits as raw flat rows (0-16), split 1100/250/rest, with
  the preprocessing a CNN needs: ``Scale(1/16)`` then ``Reshape([8, 8, 1])``.
- ``digits_cnn``: a small Keras CNN trained on it for a few epochs.
- ``regression``: a synthetic linear target with noise over 6 features, standardized,
  and ``regression_mlp``, a tiny MLP fitted to it.
- ``tflite_models`` / ``onnx_models``: the CNN converted once per quantization.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from server.datasets.types import DatasetSchema, LoadedDataset
from server.pipeline.convert import convert_onnx, convert_tflite
from shared.preprocessing import PreprocessingStep, Reshape, Scale, Standardize, apply_preprocessing

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclass(frozen=True)
class Prepared:
    data: LoadedDataset
    steps: list[PreprocessingStep]

    def model_input(self, rows: np.ndarray) -> np.ndarray:
        return apply_preprocessing(self.steps, rows)


def make_dataset(
    x: np.ndarray,
    y: np.ndarray,
    *,
    task: str,
    input_shape: list[int],
    class_names: list[str] | None,
    n_train: int,
    n_val: int,
) -> LoadedDataset:
    schema = DatasetSchema(
        task=task,  # type: ignore[arg-type]
        label="target",
        feature_names=[f"f{i}" for i in range(x.shape[1])],
        feature_dtypes=["float64"] * x.shape[1],
        input_shape=input_shape,
        class_names=class_names,
        rows=len(x),
    )
    a, b = n_train, n_train + n_val
    return LoadedDataset(
        dataset_name="test",
        version=1,
        sha256="0" * 64,
        schema=schema,
        x_train=x[:a],
        y_train=y[:a],
        x_val=x[a:b],
        y_val=y[a:b],
        x_test=x[b:],
        y_test=y[b:],
    )


@pytest.fixture(scope="session")
def digits() -> Prepared:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.data))
    x = bunch.data[order].astype(np.float32)
    y = bunch.target[order].astype(np.int64)
    data = make_dataset(
        x,
        y,
        task="classification",
        input_shape=[8, 8, 1],
        class_names=[str(d) for d in range(10)],
        n_train=1100,
        n_val=250,
    )
    return Prepared(data=data, steps=[Scale(factor=1 / 16), Reshape(shape=[8, 8, 1])])


@pytest.fixture(scope="session")
def digits_cnn(digits: Prepared) -> Any:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(digits.model_input(digits.data.x_train), digits.data.y_train, epochs=12, verbose=0)
    return model


@pytest.fixture(scope="session")
def digits_float_accuracy(digits: Prepared, digits_cnn: Any) -> float:
    probabilities = digits_cnn.predict(digits.model_input(digits.data.x_test), verbose=0)
    return float(np.mean(probabilities.argmax(axis=1) == digits.data.y_test))


@pytest.fixture(scope="session")
def representative(digits: Prepared) -> np.ndarray:
    return digits.model_input(digits.data.x_train[:200])


@pytest.fixture(scope="session")
def tflite_models(digits_cnn: Any, representative: np.ndarray) -> dict[str, bytes]:
    return {
        q: convert_tflite(digits_cnn, quantization=q, representative=representative)
        for q in ("float32", "float16", "dynamic-int8", "int8")
    }


@pytest.fixture(scope="session")
def onnx_models(digits_cnn: Any, representative: np.ndarray) -> dict[str, bytes]:
    return {
        q: convert_onnx(
            digits_cnn, input_shape=[8, 8, 1], quantization=q, calibration=representative
        )
        for q in ("float32", "int8")
    }


@pytest.fixture(scope="session")
def regression() -> Prepared:
    rng = np.random.default_rng(1)
    x = rng.normal(loc=5.0, scale=[1.0, 2.0, 0.5, 3.0, 1.5, 1.0], size=(900, 6)).astype(np.float32)
    y = (x @ np.array([1.5, -2.0, 0.5, 1.0, 0.0, 3.0]) + rng.normal(0, 0.5, 900)).astype(np.float32)
    data = make_dataset(
        x, y, task="regression", input_shape=[6], class_names=None, n_train=600, n_val=100
    )
    steps: list[PreprocessingStep] = [
        Standardize(mean=data.x_train.mean(axis=0).tolist(), std=data.x_train.std(axis=0).tolist())
    ]
    return Prepared(data=data, steps=steps)


@pytest.fixture(scope="session")
def regression_mlp(regression: Prepared) -> Any:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(1)]
    )
    model.compile(keras.optimizers.Adam(0.02), "mse")
    model.fit(
        regression.model_input(regression.data.x_train),
        regression.data.y_train,
        epochs=60,
        batch_size=32,
        verbose=0,
    )
    return model
