"""Real, signed model bundles for the agent's runtime tests, built once per session.

- ``digits_rows``: sklearn's 8x8 digits as raw flat rows (0-16) with their labels.
- ``digits_bundles``: a small Keras CNN trained on them for a few epochs, converted by
  the server's own converters to TFLite float32, TFLite full-integer int8 and ONNX
  float32, each in a bundle signed with ``bundle_key``. The preprocessing is
  ``Scale(1/16)`` then ``Reshape([8, 8, 1])``; the self-test vectors are raw rows with
  the outputs the *server's* runners produced, at the server's tolerance -- so the
  agent's runtime is checked against an independent implementation.
- ``make_digits_bundle``: the same, re-signed with changes (a tampered self-test...).

Tests may use server code to produce real artifacts; ``agent/`` never imports it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest

from shared.bundle import Bundle, BundleManifest, FileRef, SelfTest, build_bundle, read_bundle
from shared.preprocessing import Reshape, Scale, apply_preprocessing
from shared.signing import SigningKey

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CREATED_AT = datetime(2026, 11, 2, 10, 0, tzinfo=UTC)
DIGIT_LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
STEPS = [Scale(factor=1 / 16), Reshape(shape=[8, 8, 1])]
TARGETS = {
    "tflite-float32": ("tflite", "float32", "edge-x86_64-litert", "litert", "2.3.0"),
    "tflite-int8": ("tflite", "int8", "edge-x86_64-litert-int8", "litert", "2.3.0"),
    "onnx-float32": ("onnx", "float32", "onprem-x86_64-onnx", "onnxruntime", "1.20.0"),
}


@dataclass(frozen=True)
class DigitsRows:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class Artifact:
    kind: str
    model: bytes
    runner: Any  # the server's runner, for reference outputs

    def reference(self, rows: np.ndarray) -> np.ndarray:
        """What the server's runner gives for raw ``rows``."""
        model_input = apply_preprocessing(STEPS, rows)
        return np.asarray(self.runner.predict(model_input)).reshape(len(rows), -1)


@pytest.fixture(scope="session")
def bundle_key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(scope="session")
def digits_rows() -> DigitsRows:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.data))
    x = bunch.data[order].astype(np.float32)
    y = bunch.target[order].astype(np.int64)
    return DigitsRows(x[:1100], y[:1100], x[1100:], y[1100:])


@pytest.fixture(scope="session")
def digits_artifacts(digits_rows: DigitsRows) -> dict[str, Artifact]:
    import keras

    from server.pipeline.convert import convert_onnx, convert_tflite
    from server.pipeline.evaluate import LiteRTRunner, OnnxRunner

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    x_train = apply_preprocessing(STEPS, digits_rows.x_train)
    model.fit(x_train, digits_rows.y_train, epochs=10, batch_size=32, verbose=0)
    representative = x_train[:200]
    artifacts = {}
    for kind, (fmt, quantization, *_) in TARGETS.items():
        if fmt == "tflite":
            data = convert_tflite(model, quantization=quantization, representative=representative)
            runner: Any = LiteRTRunner(data)
        else:
            data = convert_onnx(
                model, input_shape=[8, 8, 1], quantization=quantization, calibration=None
            )
            runner = OnnxRunner(data)
        artifacts[kind] = Artifact(kind, data, runner)
    return artifacts


def _manifest(kind: str, artifact: Artifact, rows: np.ndarray, **changes: Any) -> BundleManifest:
    from server.pipeline.targets import self_test_atol

    fmt, quantization, target, runtime, min_version = TARGETS[kind]
    expected = artifact.reference(rows)
    fields: dict[str, Any] = {
        "model_name": "digits",
        "model_version": 1,
        "target": target,
        "runtime": runtime,
        "min_runtime_version": min_version,
        "format": fmt,
        "task": "classification",
        "model_file": FileRef(name=f"model.{fmt}", sha256="0" * 64, length=len(artifact.model)),
        "inputs": artifact.runner.inputs,
        "outputs": artifact.runner.outputs,
        "feature_names": [f"pixel_{i // 8}_{i % 8}" for i in range(64)],
        "labels": DIGIT_LABELS,
        "preprocessing": STEPS,
        "self_tests": [
            SelfTest(
                input=rows.astype(np.float64).tolist(),
                expected=expected.astype(np.float64).tolist(),
                atol=self_test_atol(
                    format=fmt,
                    quantization=quantization,
                    outputs=artifact.runner.outputs,
                    expected=expected,
                ),
            )
        ],
        "created_at": CREATED_AT,
    }
    fields.update(changes)
    return BundleManifest(**fields)


MakeBundle = Callable[..., Bundle]


@pytest.fixture(scope="session")
def make_digits_bundle(
    digits_artifacts: dict[str, Artifact], digits_rows: DigitsRows, bundle_key: SigningKey
) -> MakeBundle:
    """``make(kind, _model=None, **manifest_changes) -> Bundle``, signed and verified.

    ``_model`` replaces the model bytes (the manifest's file reference follows them).
    """

    def make(kind: str, _model: bytes | None = None, **changes: Any) -> Bundle:
        artifact = digits_artifacts[kind]
        manifest = _manifest(kind, artifact, digits_rows.x_test[:16], **changes)
        data = build_bundle(manifest, _model or artifact.model, [bundle_key])
        return read_bundle(data, trusted_keys=[bundle_key.public])

    return make


@pytest.fixture(scope="session")
def digits_bundles(make_digits_bundle: MakeBundle) -> dict[str, Bundle]:
    return {kind: make_digits_bundle(kind) for kind in TARGETS}
