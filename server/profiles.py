"""Target profiles: what each device class runs, read from ``firmware_images/<name>/profile.toml``.

A profile says which runtime (and version) a device class has, which model formats
and quantization it takes, its memory, storage and model-size budget, and its
latency SLA. The pipeline builds one artifact per profile and gates it against
these numbers; rollouts pick the artifact that matches a device's profile.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from server.errors import ConfigurationError, NotFoundError

__all__ = [
    "DEFAULT_PROFILES_DIR",
    "Profile",
    "RuntimeSpec",
    "get_profile",
    "load_profile",
    "load_profiles",
]

DEFAULT_PROFILES_DIR = Path(__file__).resolve().parent.parent / "firmware_images"


class RuntimeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["litert", "tflite-runtime", "onnxruntime"]
    version: str = Field(pattern=r"^\d+\.\d+(\.\d+)?$")


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    description: str
    arch: Literal["x86_64", "aarch64", "armv7l"]
    runtime: RuntimeSpec
    formats: list[Literal["tflite", "onnx"]] = Field(min_length=1)
    quantization: Literal["float32", "float16", "dynamic-int8", "int8"]
    ram_mb: int = Field(gt=0)
    storage_mb: int = Field(gt=0)
    max_model_bytes: int = Field(gt=0)
    latency_sla_ms_p95: float = Field(gt=0)
    python_requirements: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _runtime_fits_formats(self) -> Profile:
        takes = {"onnxruntime": "onnx", "litert": "tflite", "tflite-runtime": "tflite"}
        if any(f != takes[self.runtime.name] for f in self.formats):
            raise ValueError(f"runtime {self.runtime.name} cannot load {self.formats}")
        if self.max_model_bytes > self.storage_mb * 1024 * 1024:
            raise ValueError("max_model_bytes is larger than the storage budget")
        return self


def load_profile(path: Path) -> Profile:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        profile = Profile.model_validate(data)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigurationError(f"cannot read profile {path}: {e}") from e
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'profile'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigurationError(f"invalid profile {path}: {problems}") from e
    if profile.name != path.parent.name:
        raise ConfigurationError(f"profile {path} is named {profile.name!r}, not its folder's name")
    return profile


def load_profiles(root: Path = DEFAULT_PROFILES_DIR) -> dict[str, Profile]:
    """Every ``*/profile.toml`` under ``root``, by name."""
    profiles = {p.parent.name: load_profile(p) for p in sorted(root.glob("*/profile.toml"))}
    if not profiles:
        raise ConfigurationError(f"no profiles under {root}")
    return profiles


def get_profile(name: str, root: Path = DEFAULT_PROFILES_DIR) -> Profile:
    path = root / name / "profile.toml"
    if not path.is_file():
        raise NotFoundError(f"no profile {name!r} in {root}")
    return load_profile(path)
