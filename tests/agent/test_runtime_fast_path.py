"""One row as a numpy array takes the runtime's short path; it must answer bit for bit
what the general path answers (lists, batches), and refuse what the general path refuses
with the same message.

The two paths are told apart by a spy on the general path's preprocessing call; every
comparison is exact (``array_equal``), for TFLite float32 and int8 (int8 tensors at the
input and output) and ONNX float32 and int8 (QDQ inside, float32 at the edges).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import agent.runtime as runtime
from agent.config import Limits
from agent.runtime import InputError, LoadedModel, Prediction, open_model
from shared.bundle import Bundle, SelfTest
from shared.preprocessing import apply_preprocessing
from tests.agent.conftest import STEPS, DigitsRows, MakeBundle

KINDS = ["tflite-float32", "tflite-int8", "onnx-float32", "onnx-int8"]


@pytest.fixture(scope="module")
def onnx_int8_bundle(make_digits_bundle: MakeBundle, digits_rows: DigitsRows) -> Bundle:
    """The digits CNN (untrained: only the arithmetic matters here) as ONNX int8."""
    keras = pytest.importorskip("keras")
    from server.pipeline.convert import convert_onnx

    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    data = convert_onnx(
        model,
        input_shape=[8, 8, 1],
        quantization="int8",
        calibration=apply_preprocessing(STEPS, digits_rows.x_train[:100]),
    )
    runner = open_model("onnx", data)
    rows = digits_rows.x_test[:4]
    expected = runner.predict(apply_preprocessing(STEPS, rows))
    return make_digits_bundle(
        "onnx-float32",
        _model=data,
        inputs=runner.inputs,
        outputs=runner.outputs,
        self_tests=[SelfTest(input=rows.tolist(), expected=expected.tolist(), atol=1e-5)],
    )


@pytest.fixture(scope="module")
def models(digits_bundles: dict[str, Bundle], onnx_int8_bundle: Bundle) -> dict[str, LoadedModel]:
    bundles = {**digits_bundles, "onnx-int8": onnx_int8_bundle}
    return {kind: LoadedModel.load(bundles[kind]) for kind in KINDS}


@pytest.fixture
def general_path_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """How many rows went through the general path's preprocessing, call by call."""
    calls: list[int] = []

    def spy(steps: Any, batch: Any) -> np.ndarray:
        calls.append(len(batch))
        return apply_preprocessing(steps, batch)

    monkeypatch.setattr(runtime, "apply_preprocessing", spy)
    yield calls


def assert_same(got: Prediction, want: Prediction) -> None:
    assert (got.model_name, got.model_version) == (want.model_name, want.model_version)
    for field in ("outputs", "probabilities", "classes", "confidence"):
        a, b = getattr(got, field), getattr(want, field)
        assert a.dtype == b.dtype and a.shape == b.shape, field
        np.testing.assert_array_equal(a, b, err_msg=field)
    assert got.labels == want.labels


@pytest.mark.parametrize("kind", KINDS)
def test_one_row_answers_exactly_as_the_general_path(
    kind: str,
    models: dict[str, LoadedModel],
    digits_rows: DigitsRows,
    general_path_calls: list[int],
) -> None:
    model = models[kind]
    if kind == "tflite-int8":
        spec = model.manifest.inputs[0]
        assert spec.dtype == "int8" and spec.quantization is not None
    for row in digits_rows.x_test[:25]:
        general = model.predict([row.tolist()])  # a list: the general path
        assert general_path_calls == [1]
        for fast_input in (
            row,  # float32, 1-D
            row[None, :],  # float32, one row of a batch
            row.astype(np.float64),  # what the local API passes
            row.astype(np.int64),  # the digits are whole numbers: exact as integers
        ):
            assert_same(model.predict(fast_input), general)
        assert general_path_calls == [1], "the single-row path preprocessed nothing itself"
        general_path_calls.clear()


@pytest.mark.parametrize("kind", KINDS)
def test_batches_and_single_rows_agree(
    kind: str, models: dict[str, LoadedModel], digits_rows: DigitsRows
) -> None:
    model = models[kind]
    rows = digits_rows.x_test[:40]
    batch = model.predict(rows)
    for i, row in enumerate(rows):
        single = model.predict(row)
        # The kernels may round differently for another batch size; all that follows
        # from the outputs is decided row by row.
        np.testing.assert_allclose(single.outputs[0], batch.outputs[i], atol=1e-6)
        if np.array_equal(single.outputs[0], batch.outputs[i]):
            assert single.probabilities is not None and batch.probabilities is not None
            np.testing.assert_array_equal(single.probabilities[0], batch.probabilities[i])
            assert single.labels == batch.labels[i : i + 1]  # type: ignore[index]


def test_a_rows_probabilities_do_not_depend_on_its_batch(small_classifier: LoadedModel) -> None:
    # A bare Dense(1) unit read as a classifier: its outputs are logits, some of which
    # happen to fall in [0, 1] -- per row, those are taken as probabilities.
    model = small_classifier
    rows = np.array([[0.1, 0.0, 0.0], [9.0, -9.0, 9.0], [-9.0, 9.0, -9.0], [0.0, 0.2, 0.1]])
    batch = model.predict(rows)
    p = batch.outputs[:, 0]
    assert ((p < 0) | (p > 1)).any() and ((p >= 0) & (p <= 1)).any(), p
    for i, row in enumerate(rows):
        single = model.predict(row)
        assert single.probabilities is not None and batch.probabilities is not None
        np.testing.assert_array_equal(single.probabilities[0], batch.probabilities[i])
        expected = p[i] if 0 <= p[i] <= 1 else 1 / (1 + np.exp(-p[i]))
        assert single.probabilities[0, 1] == pytest.approx(expected, abs=1e-6)


@pytest.fixture(scope="module")
def small_classifier() -> LoadedModel:
    keras = pytest.importorskip("keras")
    from datetime import UTC, datetime

    from server.pipeline.convert import convert_tflite
    from shared.bundle import BundleManifest, FileRef, build_bundle, read_bundle
    from shared.signing import SigningKey

    keras.utils.set_random_seed(1)
    dense = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model = convert_tflite(dense, quantization="float32", representative=None)  # type: ignore[arg-type]
    runner = open_model("tflite", model)
    key = SigningKey.generate()
    manifest = BundleManifest(
        model_name="logit",
        model_version=1,
        target="edge-x86_64-litert",
        runtime="litert",
        min_runtime_version="2.3",
        format="tflite",
        task="classification",
        model_file=FileRef(name="model.tflite", sha256="0" * 64, length=len(model)),
        inputs=runner.inputs,
        outputs=runner.outputs,
        labels=["ok", "fault"],
        created_at=datetime(2026, 11, 2, tzinfo=UTC),
    )
    bundle = read_bundle(build_bundle(manifest, model, [key]), trusted_keys=[key.public])
    return LoadedModel.load(bundle)


@pytest.fixture(scope="module")
def every_step() -> LoadedModel:
    """A softmax over three features, behind every kind of preprocessing step."""
    keras = pytest.importorskip("keras")
    from datetime import UTC, datetime

    from server.pipeline.convert import convert_tflite
    from shared.bundle import BundleManifest, FileRef, build_bundle, read_bundle
    from shared.preprocessing import Clip, Scale, Standardize
    from shared.signing import SigningKey

    keras.utils.set_random_seed(3)
    dense = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, activation="softmax")])
    model = convert_tflite(dense, quantization="float32", representative=None)  # type: ignore[arg-type]
    runner = open_model("tflite", model)
    key = SigningKey.generate()
    manifest = BundleManifest(
        model_name="steps",
        model_version=1,
        target="edge-x86_64-litert",
        runtime="litert",
        min_runtime_version="2.3",
        format="tflite",
        task="classification",
        model_file=FileRef(name="model.tflite", sha256="0" * 64, length=len(model)),
        inputs=runner.inputs,
        outputs=runner.outputs,
        feature_names=["a", "b", "c"],
        preprocessing=[
            Standardize(mean=[1.5, -2.0, 0.1], std=[0.3, 0.0, 7.0]),
            Clip(min=-1.0),
            Scale(factor=0.7, offset=-0.1),
            Clip(min=-0.5, max=0.9),
        ],
        created_at=datetime(2026, 11, 2, tzinfo=UTC),
    )
    bundle = read_bundle(build_bundle(manifest, model, [key]), trusted_keys=[key.public])
    return LoadedModel.load(bundle)


def test_every_kind_of_step_gives_the_general_paths_answer(
    every_step: LoadedModel, general_path_calls: list[int]
) -> None:
    rows = np.random.default_rng(4).normal(scale=3.0, size=(200, 3))
    rows[:5] = [[-0.0, 0.0, -0.0], [1.5, -2.0, 0.1], [1e6, -1e6, 0.0], [2.0, 2.0, 2.0], [0, 0, 0]]
    for row in rows:
        general = every_step.predict([row.tolist()])
        for fast_input in (row, row.astype(np.float32)):
            fast = every_step.predict(fast_input)
            want = (
                general
                if fast_input.dtype == np.float64
                else every_step.predict([fast_input.astype(np.float64).tolist()])
            )
            assert_same(fast, want)
    assert len(general_path_calls) == 2 * len(rows)  # the lists only


def _nan_row(row: np.ndarray, dtype: Any) -> np.ndarray:
    bad = row.astype(dtype)
    bad[5] = np.nan
    return bad


@pytest.mark.parametrize(
    ("case", "make", "message"),
    [
        ("nan, float32", lambda r: _nan_row(r, np.float32), "first in row 0, feature 'pixel_0_5'"),
        ("nan, float64", lambda r: _nan_row(r, np.float64), "first in row 0, feature 'pixel_0_5'"),
        ("inf, float32", lambda r: np.full((1, 64), np.inf, np.float32), "64 NaN or infinite"),
        ("beyond float32", lambda r: np.full(64, 1e39), "beyond float32"),
        ("float16", lambda r: np.full(64, np.nan, np.float16), "64 NaN or infinite"),
        ("complex", lambda r: r.astype(complex), "expected numbers (int or float), got complex"),
        ("text", lambda r: r.astype(str), "expected numbers (int or float), got <U"),
        ("wrong width", lambda r: r[:63], "expected 64 features per row, got 63"),
    ],
)
def test_a_bad_single_row_gets_the_general_paths_error(
    case: str,
    make: Any,
    message: str,
    models: dict[str, LoadedModel],
    digits_rows: DigitsRows,
) -> None:
    model = models["tflite-float32"]
    row = digits_rows.x_test[0]
    with pytest.raises(InputError) as caught:
        model.predict(make(row))
    assert message in str(caught.value), case
    np.testing.assert_array_equal(model.predict(row).outputs, model.predict([row.tolist()]).outputs)


def test_single_rows_and_batches_from_several_threads(
    digits_bundles: dict[str, Bundle], digits_rows: DigitsRows
) -> None:
    model = LoadedModel.load(digits_bundles["tflite-int8"], limits=Limits(max_batch_rows=32))
    rows = digits_rows.x_test[:32]
    singles = [model.predict(row).outputs for row in rows[:8]]
    batch = model.predict(rows).outputs
    failures: list[str] = []

    def one_row_at_a_time() -> None:
        for _ in range(25):
            for i, row in enumerate(rows[:8]):
                if not np.array_equal(model.predict(row).outputs, singles[i]):
                    failures.append(f"row {i} differs")

    def whole_batches() -> None:  # resizes the interpreter between the single rows
        for _ in range(25):
            if not np.array_equal(model.predict(rows).outputs, batch):
                failures.append("batch differs")

    threads = [threading.Thread(target=f) for f in (one_row_at_a_time, whole_batches) * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
