"""The agent's model runtimes, on real signed bundles in real LiteRT and onnxruntime."""

from __future__ import annotations

import sys
import threading
import types
from typing import Any

import numpy as np
import pytest

from agent.config import Limits
from agent.errors import AgentError
from agent.runtime import (
    InputError,
    LoadedModel,
    ModelLoadError,
    RuntimeUnavailableError,
    SelfTestError,
    available_runtimes,
)
from shared.bundle import Bundle, SelfTest, TensorSpec
from tests.agent.conftest import DIGIT_LABELS, Artifact, DigitsRows, MakeBundle

KINDS = ["tflite-float32", "tflite-int8", "onnx-float32"]


@pytest.fixture(scope="module")
def models(digits_bundles: dict[str, Bundle]) -> dict[str, LoadedModel]:
    return {kind: LoadedModel.load(bundle) for kind, bundle in digits_bundles.items()}


def test_available_runtimes_names_what_is_importable() -> None:
    import ai_edge_litert
    import onnxruntime

    found = available_runtimes()
    assert found["onnxruntime"] == onnxruntime.__version__
    assert found["litert"].startswith("2.")
    assert ai_edge_litert is not None
    assert set(found) <= {"litert", "tflite-runtime", "onnxruntime"}


@pytest.mark.parametrize("kind", KINDS)
def test_each_backend_serves_and_matches_the_servers_runner(
    kind: str,
    models: dict[str, LoadedModel],
    digits_rows: DigitsRows,
    digits_artifacts: dict[str, Artifact],
) -> None:
    model = models[kind]
    assert model.runtime == ("onnxruntime" if kind.startswith("onnx") else "litert")
    model.run_self_tests()
    rows = digits_rows.x_test
    prediction = model.predict(rows)
    assert prediction.outputs.dtype == np.float32 and prediction.outputs.shape == (len(rows), 10)
    reference = digits_artifacts[kind].reference(rows)
    np.testing.assert_allclose(prediction.outputs, reference, atol=1e-5)
    assert prediction.classes is not None
    assert np.mean(prediction.classes == digits_rows.y_test) > 0.85


def test_int8_is_transparent(models: dict[str, LoadedModel], digits_rows: DigitsRows) -> None:
    int8, float32 = models["tflite-int8"], models["tflite-float32"]
    assert int8.manifest.inputs[0].dtype == "int8" and int8.manifest.outputs[0].dtype == "int8"
    rows = digits_rows.x_test
    q, f = int8.predict(rows), float32.predict(rows)
    assert q.outputs.dtype == np.float32  # dequantized, not int8 codes
    assert float(np.max(np.abs(q.outputs - f.outputs))) < 0.15
    assert q.classes is not None and f.classes is not None
    assert np.mean(q.classes == f.classes) > 0.95


def test_classification_fields(models: dict[str, LoadedModel], digits_rows: DigitsRows) -> None:
    prediction = models["tflite-float32"].predict(digits_rows.x_test[:20])
    assert prediction.model_name == "digits" and prediction.model_version == 1
    assert prediction.probabilities is not None and prediction.classes is not None
    assert prediction.confidence is not None and prediction.labels is not None
    assert prediction.probabilities.shape == (20, 10) and len(prediction) == 20
    np.testing.assert_allclose(prediction.probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(prediction.classes, prediction.outputs.argmax(axis=1))
    assert prediction.classes.dtype == np.int64
    assert prediction.labels == [DIGIT_LABELS[c] for c in prediction.classes]
    np.testing.assert_allclose(prediction.confidence, prediction.probabilities.max(axis=1))


def test_int8_probabilities_still_sum_to_one(
    models: dict[str, LoadedModel], digits_rows: DigitsRows
) -> None:
    prediction = models["tflite-int8"].predict(digits_rows.x_test[:50])
    assert prediction.probabilities is not None
    np.testing.assert_allclose(prediction.probabilities.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_and_single_rows_agree(
    kind: str, models: dict[str, LoadedModel], digits_rows: DigitsRows
) -> None:
    model = models[kind]
    rows = digits_rows.x_test[:7]
    batch = model.predict(rows).outputs
    for i, row in enumerate(rows):
        single = model.predict(row).outputs  # a 1-D row is one row
        assert single.shape == (1, 10)
        np.testing.assert_allclose(single[0], batch[i], atol=1e-6)
    as_lists = model.predict([[int(v) for v in row] for row in rows]).outputs
    np.testing.assert_allclose(as_lists, batch, atol=1e-6)
    np.testing.assert_allclose(model.predict(rows[:3]).outputs, batch[:3], atol=1e-6)


def test_a_fixed_batch_model_runs_in_pieces(
    digits_rows: DigitsRows, make_digits_bundle: MakeBundle
) -> None:
    from server.pipeline.convert import convert_tflite

    keras = pytest.importorskip("keras")
    # A model whose input is built for batches of exactly 4 (no free batch dimension).
    fixed = keras.Sequential(
        [
            keras.Input((8, 8, 1), batch_size=4),
            keras.layers.Conv2D(2, 3, padding="same", activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    data = convert_tflite(fixed, quantization="float32", representative=None)  # type: ignore[arg-type]
    from server.pipeline.evaluate import LiteRTRunner

    runner = LiteRTRunner(data)
    assert runner.inputs[0].shape[0] == 4
    artifact = Artifact("tflite-float32", data, runner)
    rows = digits_rows.x_test[:4]
    bundle = make_digits_bundle(
        "tflite-float32",
        inputs=runner.inputs,
        outputs=runner.outputs,
        self_tests=[SelfTest(input=rows.tolist(), expected=artifact.reference(rows).tolist())],
        _model=data,
    )
    model = LoadedModel.load(bundle)
    model.run_self_tests()
    seven = digits_rows.x_test[:7]
    out = model.predict(seven).outputs
    assert out.shape == (7, 10)
    np.testing.assert_allclose(out[:4], artifact.reference(rows), atol=1e-5)
    np.testing.assert_allclose(model.predict(seven[6]).outputs[0], out[6], atol=1e-6)


def _bad_inputs(n_features: int) -> list[tuple[str, Any, str]]:
    good = [1.0] * n_features
    nan = list(good)
    nan[5] = float("nan")
    return [
        ("too few features", [[1.0] * (n_features - 1)], "expected 64 features per row, got 63"),
        ("too many features", np.ones((2, n_features + 1)), "expected 64 features per row, got 65"),
        ("text", [["a"] * n_features], "expected numbers (int or float), got <U1"),
        ("ragged", [good, good[:10]], "rows must all have 64 values"),
        ("none", [[None] * n_features], "expected numbers (int or float)"),
        ("complex", np.ones((1, n_features), dtype=complex), "got complex128"),
        ("3-d", np.ones((2, 8, 8)), "got an array of shape (2, 8, 8)"),
        ("scalar", 3.0, "got an array of shape ()"),
        ("no rows", np.zeros((0, n_features)), "expected at least one row, got none"),
        ("nan", [good, nan], "NaN or infinite value(s)"),
        ("inf", np.full((1, n_features), np.inf), "64 NaN or infinite value(s)"),
        ("beyond float32", np.full((1, n_features), 1e39), "beyond float32"),
        ("too many rows", np.ones((9, n_features)), "expected at most 8 rows per request, got 9"),
        ("too many rows, list", [good] * 9, "expected at most 8 rows per request, got 9"),
    ]


@pytest.mark.parametrize("kind", ["tflite-int8", "onnx-float32"])
def test_bad_inputs_get_a_clear_error_and_the_model_keeps_serving(
    kind: str, digits_bundles: dict[str, Bundle], digits_rows: DigitsRows
) -> None:
    model = LoadedModel.load(digits_bundles[kind], limits=Limits(max_batch_rows=8))
    before = model.predict(digits_rows.x_test[:2]).outputs
    for case, rows, message in _bad_inputs(64):
        with pytest.raises(InputError) as caught:
            model.predict(rows)
        assert message in str(caught.value), case
        assert isinstance(caught.value, AgentError)
    np.testing.assert_array_equal(model.predict(digits_rows.x_test[:2]).outputs, before)


def test_the_nan_error_names_the_row_and_feature(models: dict[str, LoadedModel]) -> None:
    rows = np.ones((3, 64))
    rows[2, 9] = np.nan
    with pytest.raises(InputError, match=r"first in row 2, feature 'pixel_1_1': nan"):
        models["tflite-float32"].predict(rows)


def test_integer_and_bool_rows_are_numbers(models: dict[str, LoadedModel]) -> None:
    model = models["onnx-float32"]
    ints = np.arange(64, dtype=np.int64) % 17
    np.testing.assert_allclose(
        model.predict(ints).outputs, model.predict(ints.astype(np.float32)).outputs
    )
    assert model.predict(np.ones(64, dtype=bool)).outputs.shape == (1, 10)


@pytest.mark.parametrize("kind", KINDS)
def test_a_tampered_self_test_fails_with_deviation_and_tolerance(
    kind: str, digits_bundles: dict[str, Bundle], make_digits_bundle: MakeBundle
) -> None:
    good = digits_bundles[kind].manifest.self_tests[0]
    expected = [list(row) for row in good.expected]
    expected[3][2] += 0.5
    tampered = make_digits_bundle(
        kind, self_tests=[SelfTest(input=good.input, expected=expected, atol=good.atol)]
    )
    model = LoadedModel.load(tampered)
    with pytest.raises(SelfTestError) as caught:
        model.run_self_tests()
    text = str(caught.value)
    assert "self-test 0 of digits v1" in text
    assert f"exceeds the tolerance {good.atol:.6g}" in text
    deviation = float(text.split("max deviation ")[1].split(" ")[0])
    assert 0.4 < deviation < 0.6
    model.predict(np.ones(64))  # a failed self-test does not break the interpreter


def test_a_self_test_of_the_wrong_width_fails(make_digits_bundle: MakeBundle) -> None:
    model = LoadedModel.load(
        make_digits_bundle(
            "onnx-float32", self_tests=[SelfTest(input=[[0.0] * 64], expected=[[0.1] * 3])]
        )
    )
    with pytest.raises(SelfTestError, match=r"shape \(1, 10\), the bundle expects \(1, 3\)"):
        model.run_self_tests()


def test_a_runtime_this_device_lacks_is_refused_naming_what_is_installed(
    digits_bundles: dict[str, Bundle],
) -> None:
    with pytest.raises(RuntimeUnavailableError) as caught:
        LoadedModel.load(digits_bundles["tflite-float32"], runtimes={"onnxruntime": "1.32.0"})
    assert "needs litert or tflite-runtime; this device has onnxruntime 1.32.0" in str(caught.value)
    with pytest.raises(RuntimeUnavailableError, match="this device has no model runtime"):
        LoadedModel.load(digits_bundles["onnx-float32"], runtimes={})


def test_a_runtime_older_than_the_bundle_needs_is_refused(make_digits_bundle: MakeBundle) -> None:
    bundle = make_digits_bundle("onnx-float32", min_runtime_version="99.1")
    with pytest.raises(RuntimeUnavailableError, match=r"needs onnxruntime >= 99\.1"):
        LoadedModel.load(bundle)


def test_tflite_runtime_is_the_fallback_for_tflite_bundles(
    digits_bundles: dict[str, Bundle], monkeypatch: pytest.MonkeyPatch
) -> None:
    # tflite-runtime 2.14 needs numpy<2, so it cannot be installed here; its interpreter
    # module has the same API as LiteRT's, which stands in for it.
    from ai_edge_litert.interpreter import Interpreter

    package = types.ModuleType("tflite_runtime")
    module = types.ModuleType("tflite_runtime.interpreter")
    module.Interpreter = Interpreter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tflite_runtime", package)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", module)
    model = LoadedModel.load(
        digits_bundles["tflite-int8"], runtimes={"tflite-runtime": "2.14.0", "onnxruntime": "1"}
    )
    assert model.runtime == "tflite-runtime" and model.runtime_version == "2.14.0"
    model.run_self_tests()


def test_a_manifest_that_does_not_match_its_model_is_refused_at_load(
    make_digits_bundle: MakeBundle,
) -> None:
    float_spec = TensorSpec(name="x", dtype="float32", shape=[-1, 8, 8, 1])
    with pytest.raises(ModelLoadError, match="manifest states a float32 input, the model's"):
        LoadedModel.load(make_digits_bundle("tflite-int8", inputs=[float_spec]))
    with pytest.raises(ModelLoadError, match=r"into \[64\], the model takes \[8, 8, 1\]"):
        LoadedModel.load(make_digits_bundle("tflite-float32", preprocessing=[]))
    with pytest.raises(ModelLoadError, match="does not fit its 3 features"):
        LoadedModel.load(make_digits_bundle("onnx-float32", feature_names=["a", "b", "c"]))


def test_a_model_the_runtime_cannot_read_is_a_load_error(make_digits_bundle: MakeBundle) -> None:
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load the model"):
        LoadedModel.load(make_digits_bundle("onnx-float32", _model=b"not an onnx model" * 10))


def test_predict_is_safe_from_several_threads(
    digits_bundles: dict[str, Bundle], digits_rows: DigitsRows
) -> None:
    model = LoadedModel.load(digits_bundles["tflite-int8"])
    sizes = [1, 5, 17, 3]  # different batch sizes force resizes between threads
    expected = {n: model.predict(digits_rows.x_test[:n]).outputs for n in sizes}
    failures: list[str] = []

    def work(n: int) -> None:
        for _ in range(40):
            got = model.predict(digits_rows.x_test[:n]).outputs
            if not np.array_equal(got, expected[n]):
                failures.append(f"batch {n} differs")

    threads = [threading.Thread(target=work, args=(n,)) for n in sizes * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_one_row_as_a_flat_list_is_not_counted_as_many_rows(
    digits_bundles: dict[str, Bundle], digits_rows: DigitsRows
) -> None:
    model = LoadedModel.load(digits_bundles["onnx-float32"], limits=Limits(max_batch_rows=8))
    row = [float(v) for v in digits_rows.x_test[0]]  # 64 values, more than 8
    assert model.predict(row).outputs.shape == (1, 10)


@pytest.fixture(scope="module")
def small_models() -> dict[str, bytes]:
    """Two tiny untrained TFLite models over 3 features: a regressor and a sigmoid unit."""
    keras = pytest.importorskip("keras")
    from server.pipeline.convert import convert_tflite

    keras.utils.set_random_seed(1)
    built = {}
    for name, activation in (("regression", None), ("binary", "sigmoid")):
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, activation=activation)])
        built[name] = convert_tflite(model, quantization="float32", representative=None)  # type: ignore[arg-type]
    return built


def _small_bundle(model: bytes, *, task: str, labels: list[str] | None) -> Bundle:
    from datetime import UTC, datetime

    from server.pipeline.evaluate import LiteRTRunner
    from shared.bundle import BundleManifest, FileRef, build_bundle, read_bundle
    from shared.preprocessing import Standardize, apply_preprocessing
    from shared.signing import SigningKey

    key = SigningKey.generate()
    steps = [Standardize(mean=[1.0, 2.0, 3.0], std=[2.0, 0.0, 4.0])]
    runner = LiteRTRunner(model)
    rows = np.array([[0.0, 1.0, 2.0], [5.0, -3.0, 8.0]], dtype=np.float32)
    expected = runner.predict(apply_preprocessing(steps, rows)).reshape(2, -1)
    manifest = BundleManifest(
        model_name="small",
        model_version=2,
        target="edge-x86_64-litert",
        runtime="litert",
        min_runtime_version="2.3",
        format="tflite",
        task=task,  # type: ignore[arg-type]
        model_file=FileRef(name="model.tflite", sha256="0" * 64, length=len(model)),
        inputs=runner.inputs,
        outputs=runner.outputs,
        labels=labels,
        preprocessing=steps,
        self_tests=[SelfTest(input=rows.tolist(), expected=expected.tolist(), atol=1e-5)],
        created_at=datetime(2026, 11, 2, tzinfo=UTC),
    )
    return read_bundle(build_bundle(manifest, model, [key]), trusted_keys=[key.public])


def test_a_regression_model_gives_outputs_only(small_models: dict[str, bytes]) -> None:
    # No feature_names in the manifest: the feature count is the input's size per row.
    model = LoadedModel.load(
        _small_bundle(small_models["regression"], task="regression", labels=None)
    )
    assert model.n_features == 3
    model.run_self_tests()
    prediction = model.predict([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    assert prediction.outputs.shape == (2, 1)
    assert prediction.probabilities is None and prediction.classes is None
    assert prediction.labels is None and prediction.confidence is None
    with pytest.raises(InputError, match="expected 3 features per row, got 4"):
        model.predict([1.0, 2.0, 3.0, 4.0])


def test_a_single_sigmoid_unit_is_a_two_class_probability(small_models: dict[str, bytes]) -> None:
    model = LoadedModel.load(
        _small_bundle(small_models["binary"], task="classification", labels=["ok", "fault"])
    )
    model.run_self_tests()
    prediction = model.predict(np.array([[1.0, 2.0, 3.0], [9.0, -9.0, 0.0], [-9.0, 9.0, 9.0]]))
    assert prediction.probabilities is not None and prediction.classes is not None
    assert prediction.probabilities.shape == (3, 2)
    p = prediction.outputs[:, 0]
    np.testing.assert_allclose(prediction.probabilities[:, 1], p, atol=1e-6)
    np.testing.assert_array_equal(prediction.classes, (p >= 0.5).astype(np.int64))
    assert prediction.labels == [["ok", "fault"][c] for c in prediction.classes]
