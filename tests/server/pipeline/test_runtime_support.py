"""The op tables, their provenance, and the installed runtimes as the final word.

The legacy test installs the real ``tflite-runtime`` 2.14 with ``numpy<2`` in a venv of
its own (never the project's; ``EDGEFLEET_LEGACY_TFLITE_PYTHON`` may name one instead),
loads every artifact there, and checks that the 2.14 table predicted exactly which ones
load.
"""

from __future__ import annotations

import json
import os
import subprocess
import venv
from pathlib import Path

import numpy as np
import pytest

from server.pipeline.evaluate import LiteRTRunner
from server.pipeline.ops import tflite_ops, unsupported_ops
from server.pipeline.runtime_support import (
    DATA_DIR,
    installed_version,
    load_error,
    onnx_opset_table,
    tflite_op_table,
)
from server.pipeline.targets import self_test_atol

from .conftest import Prepared

LEGACY_PYTHON = os.environ.get("EDGEFLEET_LEGACY_TFLITE_PYTHON")


def test_every_table_states_where_it_comes_from() -> None:
    for path in DATA_DIR.glob("*.json"):
        data = json.loads(path.read_text())
        assert data["provenance"]["source"], path.name
    legacy = json.loads((DATA_DIR / "tflite-runtime-2.14.json").read_text())["provenance"]
    assert "register.cc" in legacy["source"] and len(legacy["commit"]) == 40


def test_the_2_14_table_knows_what_2_14_registered() -> None:
    table = tflite_op_table("tflite-runtime", "2.14.0")
    assert table.builtin["FULLY_CONNECTED"] == (1, 10)
    assert table.builtin["CONV_2D"] == (1, 7)
    assert table.builtin["BROADCAST_TO"] == (2, 3)
    assert "STABLEHLO_ADD" not in table.builtin
    assert "TFLite_Detection_PostProcess" in table.custom


def test_the_litert_table_is_the_installed_runtime() -> None:
    table = tflite_op_table("litert", "2.3.0")
    assert installed_version("litert") is not None
    assert table.version == ".".join(installed_version("litert").split(".")[:2])  # type: ignore[union-attr]
    assert table.builtin["FULLY_CONNECTED"][1] >= 12
    legacy = tflite_op_table("tflite-runtime", "2.14.0").builtin
    assert all(table.builtin[name][1] >= high for name, (_, high) in legacy.items())
    assert onnx_opset_table("1.20.0").max_opset["ai.onnx"] == 21


def test_the_installed_runtimes_load_every_artifact(
    tflite_models: dict[str, bytes], onnx_models: dict[str, bytes]
) -> None:
    for model in tflite_models.values():
        assert load_error(model, format="tflite") is None
    for model in onnx_models.values():
        assert load_error(model, format="onnx") is None
    assert load_error(b"junk", format="tflite")
    assert load_error(b"junk", format="onnx")


@pytest.fixture(scope="session")
def legacy_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Python with the real tflite-runtime 2.14 (numpy<2), in a venv of its own.

    ``EDGEFLEET_LEGACY_TFLITE_PYTHON`` may name one; otherwise one is installed from the
    package index (a few seconds). Skipped only where no 2.14 wheel exists for this
    platform and Python.
    """
    if LEGACY_PYTHON:
        return LEGACY_PYTHON
    env_dir = tmp_path_factory.mktemp("legacy-tflite") / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "tflite-runtime==2.14.0", "numpy<2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if install.returncode != 0:
        pytest.skip(f"no tflite-runtime 2.14 for this platform: {install.stderr[-300:]}")
    return python


@pytest.mark.slow
def test_the_2_14_table_predicts_what_a_real_tflite_runtime_2_14_loads(
    tflite_models: dict[str, bytes], digits: Prepared, tmp_path: Path, legacy_python: str
) -> None:
    """Also: what loads there reproduces our self-test outputs within their tolerance."""
    x = digits.model_input(digits.data.x_test[:16])
    np.save(tmp_path / "x.npy", x)
    for quantization, model in tflite_models.items():
        (tmp_path / f"{quantization}.tflite").write_bytes(model)
    script = (
        "import json, pathlib, sys\n"
        "import numpy as np\n"
        "from tflite_runtime.interpreter import Interpreter\n"
        "folder = pathlib.Path(sys.argv[1])\n"
        "x = np.load(folder / 'x.npy')\n"
        "result = {}\n"
        "for path in sorted(folder.glob('*.tflite')):\n"
        "    try:\n"
        "        it = Interpreter(model_content=path.read_bytes())\n"
        "    except ValueError as e:\n"
        "        result[path.stem] = str(e)\n"
        "        continue\n"
        "    i, o = it.get_input_details()[0], it.get_output_details()[0]\n"
        "    it.resize_tensor_input(i['index'], list(x.shape))\n"
        "    it.allocate_tensors()\n"
        "    q = x\n"
        "    if i['dtype'] == np.int8:\n"
        "        s, z = i['quantization']\n"
        "        q = np.clip(np.round(x / s) + z, -128, 127).astype(np.int8)\n"
        "    it.set_tensor(i['index'], q)\n"
        "    it.invoke()\n"
        "    y = it.get_tensor(o['index'])\n"
        "    if o['dtype'] == np.int8:\n"
        "        s, z = o['quantization']\n"
        "        y = (y.astype(np.float32) - z) * s\n"
        "    np.save(folder / (path.stem + '.out.npy'), y)\n"
        "    result[path.stem] = None\n"
        "print(json.dumps(result))\n"
    )
    out = subprocess.run(
        [legacy_python, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    loaded = json.loads(out.strip().splitlines()[-1])
    for quantization, model in tflite_models.items():
        predicted = unsupported_ops(tflite_ops(model), "tflite-runtime", "2.14.0")
        assert (loaded[quantization] is None) == (predicted == []), (
            quantization,
            loaded,
            predicted,
        )
        if loaded[quantization] is None:
            runner = LiteRTRunner(model)
            ours = runner.predict(x)
            atol = self_test_atol(
                format="tflite", quantization=quantization, outputs=runner.outputs, expected=ours
            )
            theirs = np.load(tmp_path / f"{quantization}.out.npy")
            np.testing.assert_allclose(theirs, ours, atol=atol, rtol=0, err_msg=quantization)
    assert "FULLY_CONNECTED" in loaded["dynamic-int8"]
