"""The runner layer the device and the server's evaluation share (``open_model``), and
how runtimes are found: without importing them, and a broken one given up on."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import agent.runtime as runtime
from agent.runtime import (
    InferenceError,
    LoadedModel,
    ModelLoadError,
    RuntimeUnavailableError,
    available_runtimes,
    open_model,
)
from shared.bundle import Bundle, QuantizationParams, build_bundle, dequantize, quantize
from shared.preprocessing import apply_preprocessing
from shared.signing import SigningKey
from tests.agent.conftest import STEPS, Artifact, DigitsRows, MakeBundle

ROOT = Path(__file__).resolve().parents[2]


def test_open_model_reads_the_tensors_from_the_model(
    digits_artifacts: dict[str, Artifact],
) -> None:
    runner = open_model("tflite", digits_artifacts["tflite-int8"].model)
    assert (runner.format, runner.runtime, runner.fixed_batch) == ("tflite", "litert", None)
    (spec_in,), spec_out = runner.inputs, runner.outputs[0]
    assert spec_in.dtype == "int8" and spec_in.shape == [-1, 8, 8, 1]
    assert spec_in.quantization is not None and spec_out.quantization is not None
    onnx = open_model("onnx", digits_artifacts["onnx-float32"].model)
    assert onnx.runtime == "onnxruntime" and onnx.inputs[0].dtype == "float32"
    assert onnx.inputs[0].quantization is None


def test_predict_quantizes_with_the_tensors_own_parameters(
    digits_artifacts: dict[str, Artifact], digits_rows: DigitsRows
) -> None:
    from ai_edge_litert.interpreter import Interpreter

    model = digits_artifacts["tflite-int8"].model
    runner = open_model("tflite", model)
    x = apply_preprocessing(STEPS, digits_rows.x_test[:3])
    interpreter = Interpreter(model_content=model)
    interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], [3, 8, 8, 1])
    interpreter.allocate_tensors()
    interpreter.set_tensor(
        interpreter.get_input_details()[0]["index"], quantize(x, runner.inputs[0])
    )
    interpreter.invoke()
    raw = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    got = runner.predict(x)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, dequantize(raw, runner.outputs[0]))


@pytest.mark.parametrize("kind", ["tflite-float32", "onnx-float32"])
def test_any_batch_size(
    kind: str, digits_artifacts: dict[str, Artifact], digits_rows: DigitsRows
) -> None:
    artifact = digits_artifacts[kind]
    runner = open_model(kind.split("-")[0], artifact.model)
    x = apply_preprocessing(STEPS, np.concatenate([digits_rows.x_train] * 2)[:1100])
    whole = runner.predict(x)  # more than one invoke's worth of rows
    assert whole.shape == (1100, 10)
    for rows in (1, 600, 3, 1):
        np.testing.assert_allclose(runner.predict(x[:rows]), whole[:rows], atol=1e-6)


def test_what_the_runtime_cannot_run_is_an_inference_error(
    digits_artifacts: dict[str, Artifact],
) -> None:
    runner = open_model("tflite", digits_artifacts["tflite-float32"].model)
    with pytest.raises(InferenceError, match="cannot run on input of shape"):
        runner.predict(np.zeros((2, 64), np.float32))  # not preprocessed: the wrong shape
    with pytest.raises(InferenceError, match="expected a batch"):
        runner.predict(np.zeros((0, 8, 8, 1), np.float32))
    assert runner.predict(np.zeros((2, 8, 8, 1), np.float32)).shape == (2, 10)  # still serves


def test_what_cannot_be_opened() -> None:
    with pytest.raises(ModelLoadError, match="ai-edge-litert cannot load the model"):
        open_model("tflite", b"not a flatbuffer at all")
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load the model"):
        open_model("onnx", b"not a protobuf")
    with pytest.raises(ModelLoadError, match="unknown model format 'pt'"):
        open_model("pt", b"")
    with pytest.raises(RuntimeUnavailableError, match="onnxruntime does not run tflite"):
        open_model("tflite", b"", runtime="onnxruntime")


def test_a_manifest_stating_other_quantization_is_refused_at_load(
    digits_bundles: dict[str, Bundle], make_digits_bundle: MakeBundle
) -> None:
    spec = digits_bundles["tflite-int8"].manifest.inputs[0]
    assert spec.quantization is not None
    other = spec.model_copy(
        update={"quantization": QuantizationParams(scale=spec.quantization.scale * 2, zero_point=0)}
    )
    with pytest.raises(ModelLoadError, match="manifest states input quantization scale"):
        LoadedModel.load(make_digits_bundle("tflite-int8", inputs=[other]))


# ----------------------------------------------------------------------------- finding runtimes


def _run_python(code: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


def test_listing_runtimes_imports_none_and_loading_imports_only_the_one_needed(
    digits_bundles: dict[str, Bundle], bundle_key: SigningKey, tmp_path: Path
) -> None:
    bundle = digits_bundles["tflite-float32"]
    path = tmp_path / "bundle.tar"
    path.write_bytes(build_bundle(bundle.manifest, bundle.model, [bundle_key]))
    code = (
        "import json, sys\n"
        "from agent.runtime import LoadedModel, available_runtimes\n"
        "from shared.bundle import read_bundle\n"
        "from shared.signing import VerifyKey\n"
        "runtimes = ('ai_edge_litert', 'tflite_runtime', 'onnxruntime')\n"
        "found = available_runtimes()\n"
        "listed = [m for m in runtimes if m in sys.modules]\n"
        "key = VerifyKey.from_base64(sys.argv[2])\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "model = LoadedModel.load(read_bundle(data, trusted_keys=[key]), runtimes=found)\n"
        "model.predict([0.0] * 64)\n"
        "loaded = [m for m in runtimes if m in sys.modules]\n"
        "print(json.dumps([sorted(found), listed, loaded]))\n"
    )
    found, after_listing, after_loading = json.loads(
        _run_python(code, str(path), bundle_key.public.to_base64())
    )
    assert {"litert", "onnxruntime"} <= set(found)
    assert after_listing == []
    assert after_loading == ["ai_edge_litert"]


def test_a_broken_install_is_not_listed_once_it_fails_to_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tflite_runtime built for another numpy: found on the path, fails on import.
    package = tmp_path / "tflite_runtime"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "interpreter.py").write_text("raise ImportError('compiled against numpy 1.x')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(runtime, "_BROKEN_RUNTIMES", {})
    try:
        found = available_runtimes()  # no metadata: the version comes from importing it
    finally:  # the half-imported fake must not outlive the test
        sys.modules.pop("tflite_runtime.interpreter", None)
        sys.modules.pop("tflite_runtime", None)
    assert "tflite-runtime" not in found and "litert" in found
    assert "compiled against numpy 1.x" in runtime._BROKEN_RUNTIMES["tflite-runtime"]


def test_a_runtime_that_fails_to_import_gives_way_to_the_next(
    digits_bundles: dict[str, Bundle], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ai_edge_litert.interpreter import Interpreter

    # litert listed but broken; tflite_runtime (LiteRT's interpreter standing in) works.
    fallback = types.ModuleType("tflite_runtime.interpreter")
    fallback.Interpreter = Interpreter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tflite_runtime", types.ModuleType("tflite_runtime"))
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fallback)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # import fails
    monkeypatch.setattr(runtime, "_BROKEN_RUNTIMES", {})
    offered = {"litert": "2.3.0", "tflite-runtime": "2.14.0"}
    model = LoadedModel.load(digits_bundles["tflite-float32"], runtimes=offered)
    assert model.runtime == "tflite-runtime"
    model.run_self_tests()
    assert "litert" not in available_runtimes()
    with pytest.raises(RuntimeUnavailableError, match="installed but broken: litert"):
        LoadedModel.load(digits_bundles["tflite-float32"], runtimes={"litert": "2.3.0"})
