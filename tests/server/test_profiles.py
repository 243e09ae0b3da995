from __future__ import annotations

from pathlib import Path

import pytest

from server.errors import ConfigurationError, NotFoundError
from server.profiles import get_profile, load_profile, load_profiles


def test_shipped_profiles_cover_every_kind_of_target() -> None:
    profiles = load_profiles()
    by_runtime = {(p.runtime.name, p.formats[0], p.quantization) for p in profiles.values()}
    assert ("onnxruntime", "onnx", "float32") in by_runtime  # cloud
    assert ("onnxruntime", "onnx", "int8") in by_runtime  # on-prem
    assert ("litert", "tflite", "int8") in by_runtime  # edge arm64
    assert ("litert", "tflite", "dynamic-int8") in by_runtime  # edge arm64, float I/O
    assert ("litert", "tflite", "float16") in by_runtime  # edge GPU
    assert ("tflite-runtime", "tflite", "int8") in by_runtime  # legacy
    legacy = profiles["legacy-armv7-tflite"]
    assert legacy.runtime.version == "2.14.0" and "numpy<2" in legacy.python_requirements
    assert get_profile("edge-arm64-litert").arch == "aarch64"
    with pytest.raises(NotFoundError):
        get_profile("no-such-profile")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name / "profile.toml"
    path.parent.mkdir()
    path.write_text(text)
    return path


GOOD = """
name = "p1"
description = "x"
arch = "x86_64"
formats = ["onnx"]
quantization = "float32"
ram_mb = 1
storage_mb = 1
max_model_bytes = 1000
latency_sla_ms_p95 = 5
[runtime]
name = "onnxruntime"
version = "1.20"
"""


def test_bad_profiles_name_the_problem(tmp_path: Path) -> None:
    assert load_profile(write(tmp_path, "p1", GOOD)).name == "p1"
    with pytest.raises(ConfigurationError, match="cannot load"):
        load_profile(
            write(tmp_path, "p2", GOOD.replace('"p1"', '"p2"').replace('["onnx"]', '["tflite"]'))
        )
    with pytest.raises(ConfigurationError, match="folder"):
        load_profile(write(tmp_path, "p3", GOOD))
    with pytest.raises(ConfigurationError, match="cannot read"):
        load_profile(write(tmp_path, "p4", "name = "))
    with pytest.raises(ConfigurationError, match="ram_mb"):
        load_profile(
            write(tmp_path, "p5", GOOD.replace('"p1"', '"p5"').replace("ram_mb = 1", "ram_mb = -1"))
        )
    with pytest.raises(ConfigurationError, match="no profiles"):
        load_profiles(tmp_path / "empty")
