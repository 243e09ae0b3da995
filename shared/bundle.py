"""The model bundle: one file per (model version, target), signed.

A bundle is a *canonical* POSIX ustar archive of exactly two members::

    bundle.json      a DSSE envelope; its payload is a BundleManifest
    model.tflite     (or model.onnx) the model, whose length and sha256 the
                     manifest states

Canonical means: every header is byte-for-byte what :func:`write_bundle` would
write for that name and size (mode 0644, uid/gid 0, mtime 0, no user names),
padding is zeros, and the archive ends with exactly two zero blocks. Any tar tool
can list it, and the reader can insist that every byte of the file is accounted
for: flip any one and :func:`read_bundle` fails.

What always holds in :func:`read_bundle`:

- ``bundle.json``'s signature is verified before its payload is parsed;
- the model is read no further than the signed length, and hashed as it is read;
- with ``expected_length``/``expected_sha256`` (from a signed desired state) the
  whole file is checked too, and reading stops at that length;
- nothing is returned unless every check passed.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, BinaryIO, ClassVar, Literal

import numpy as np
import numpy.typing as npt
from pydantic import AwareDatetime, Field, StringConstraints, model_validator

from shared.drift import DriftReference
from shared.errors import (
    BundleFormatError,
    HashMismatchError,
    LengthMismatchError,
    MessageError,
    WrongTargetError,
)
from shared.integrity import sha256_hex, verify_bytes
from shared.model import ContractModel, Message
from shared.preprocessing import PreprocessingStep
from shared.signing import (
    Envelope,
    PayloadType,
    SigningKey,
    VerifyKey,
    sign_envelope,
    verify_envelope,
)

__all__ = [
    "MANIFEST_MEMBER",
    "Bundle",
    "BundleManifest",
    "FileRef",
    "OpRequirement",
    "QuantizationParams",
    "SelfTest",
    "TensorSpec",
    "build_bundle",
    "check_target",
    "dequantize",
    "quantize",
    "read_bundle",
    "write_bundle",
]

MANIFEST_MEMBER = "bundle.json"
MODEL_MEMBERS = {"tflite": "model.tflite", "onnx": "model.onnx"}
DEFAULT_MAX_BUNDLE_BYTES = 256 * 1024 * 1024
_BLOCK = 512
_CHUNK = 64 * 1024

Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]


class FileRef(ContractModel):
    name: str = Field(pattern=r"^model\.(tflite|onnx)$")
    sha256: Sha256
    length: int = Field(gt=0)


class QuantizationParams(ContractModel):
    """Affine quantization: ``real = scale * (q - zero_point)``."""

    scale: float = Field(gt=0)
    zero_point: int


class TensorSpec(ContractModel):
    name: str = Field(max_length=256)
    dtype: Literal["float32", "float16", "int8", "uint8", "int16", "int32", "int64"]
    shape: list[int] = Field(max_length=8, description="-1 for a free dimension (the batch)")
    quantization: QuantizationParams | None = None


class OpRequirement(ContractModel):
    """An operator the model needs, at the version its flatbuffer / opset records."""

    name: str = Field(max_length=128)
    version: int = Field(ge=1)


class SelfTest(ContractModel):
    """An input (raw, before preprocessing) and the output the device must reproduce."""

    input: list[list[float]] = Field(min_length=1, max_length=64)
    expected: list[list[float]] = Field(min_length=1, max_length=64)
    atol: float = Field(1e-3, ge=0)

    @model_validator(mode="after")
    def _rows(self) -> SelfTest:
        if len(self.input) != len(self.expected):
            raise ValueError("self-test input and expected output differ in rows")
        return self


class BundleManifest(Message):
    """The signed description of one model artifact for one target profile."""

    SCHEMA: ClassVar[str] = "ef.bundle"
    MAX_BYTES: ClassVar[int] = 4 * 1024 * 1024

    model_name: Name
    model_version: int = Field(ge=1)
    target: Name = Field(description="profile name, e.g. edge-arm64-litert")
    runtime: Literal["litert", "tflite-runtime", "onnxruntime"]
    min_runtime_version: str = Field(max_length=32)
    format: Literal["tflite", "onnx"]
    task: Literal["classification", "regression"]
    model_file: FileRef
    inputs: list[TensorSpec] = Field(min_length=1, max_length=16)
    outputs: list[TensorSpec] = Field(min_length=1, max_length=16)
    feature_names: list[str] | None = Field(None, max_length=65536)
    labels: list[str] | None = Field(None, max_length=4096)
    preprocessing: list[PreprocessingStep] = Field(default_factory=list, max_length=32)
    metrics: dict[str, dict[str, float]] = Field(
        default_factory=dict, description='e.g. {"float": {...}, "quantized": {...}}'
    )
    drift_reference: DriftReference | None = None
    self_tests: list[SelfTest] = Field(default_factory=list, max_length=16)
    ops: list[OpRequirement] = Field(default_factory=list, max_length=1024)
    created_at: AwareDatetime

    @model_validator(mode="after")
    def _consistent(self) -> BundleManifest:
        if self.model_file.name != MODEL_MEMBERS[self.format]:
            raise ValueError(f"a {self.format} bundle's model is {MODEL_MEMBERS[self.format]!r}")
        return self


def quantize(x: npt.NDArray[Any], spec: TensorSpec) -> npt.NDArray[Any]:
    """Real values to a tensor's integer type with its affine parameters (clipped).

    The one implementation the server's evaluation and the device's runtime share, so a
    self-test computed on the server is reproduced bit for bit before the kernel runs.
    """
    if spec.quantization is None:
        return x.astype(spec.dtype, copy=False)
    info = np.iinfo(spec.dtype)
    q = np.round(x / np.float32(spec.quantization.scale)) + spec.quantization.zero_point
    return np.clip(q, info.min, info.max).astype(spec.dtype)


def dequantize(q: npt.NDArray[Any], spec: TensorSpec) -> npt.NDArray[np.float32]:
    """A tensor's integers back to float32 real values (float tensors pass through)."""
    if spec.quantization is None:
        return q.astype(np.float32, copy=False)
    zero_point = np.float32(spec.quantization.zero_point)
    scale = np.float32(spec.quantization.scale)
    return ((q.astype(np.float32) - zero_point) * scale).astype(np.float32)


@dataclass(frozen=True, slots=True)
class Bundle:
    """A verified bundle: its manifest, the model bytes, and the whole file's hash."""

    manifest: BundleManifest
    model: bytes
    sha256: str
    length: int


# ----------------------------------------------------------------------------- writing


def _octal(value: int, width: int) -> bytes:
    text = format(value, "o").zfill(width - 1)
    if len(text) > width - 1:
        raise BundleFormatError(f"value {value} does not fit a {width}-byte tar field")
    return text.encode("ascii") + b"\0"


def _header(name: str, size: int) -> bytes:
    encoded = name.encode("ascii")
    fields = [
        encoded.ljust(100, b"\0"),
        _octal(0o644, 8),
        _octal(0, 8),
        _octal(0, 8),
        _octal(size, 12),
        _octal(0, 12),
        b" " * 8,  # checksum placeholder
        b"0",
        b"\0" * 100,
        b"ustar\x0000",
        b"\0" * 32,
        b"\0" * 32,
        _octal(0, 8),
        _octal(0, 8),
        b"\0" * 155,
        b"\0" * 12,
    ]
    header = bytearray(b"".join(fields))
    checksum = sum(header)
    header[148:156] = format(checksum, "o").zfill(6).encode("ascii") + b"\0 "
    return bytes(header)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % _BLOCK)


def build_bundle(manifest: BundleManifest, model: bytes, keys: Iterable[SigningKey]) -> bytes:
    """The bundle file's bytes. ``manifest.model_file`` is set from ``model`` here."""
    manifest = manifest.model_copy(
        update={
            "model_file": FileRef(
                name=MODEL_MEMBERS[manifest.format], sha256=sha256_hex(model), length=len(model)
            )
        }
    )
    manifest = BundleManifest.model_validate(manifest.to_dict())
    payload = manifest.to_bytes()
    envelope = sign_envelope(payload, PayloadType.BUNDLE, list(keys)).to_bytes()
    parts = [
        _header(MANIFEST_MEMBER, len(envelope)),
        envelope,
        _padding(len(envelope)),
        _header(manifest.model_file.name, len(model)),
        model,
        _padding(len(model)),
        b"\0" * (2 * _BLOCK),
    ]
    return b"".join(parts)


def write_bundle(
    out: BinaryIO, manifest: BundleManifest, model: bytes, keys: Iterable[SigningKey]
) -> tuple[str, int]:
    """Write a bundle to ``out``; return its ``(sha256, length)`` for a desired state."""
    data = build_bundle(manifest, model, keys)
    out.write(data)
    return sha256_hex(data), len(data)


# ----------------------------------------------------------------------------- reading


class _Source:
    """Reads exactly what is asked, never past ``limit``, hashing the whole file as it goes."""

    def __init__(self, stream: BinaryIO, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self.position = 0
        self._whole = hashlib.sha256()

    def read_exact(self, size: int, what: str) -> bytes:
        if self.position + size > self._limit:
            raise LengthMismatchError(f"bundle is larger than its limit of {self._limit} bytes")
        chunks = []
        remaining = size
        while remaining:
            chunk = self._stream.read(min(remaining, _CHUNK))
            if not chunk:
                raise BundleFormatError(f"bundle ends inside {what}")
            self._take(chunk)
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def _take(self, chunk: bytes) -> None:
        self._whole.update(chunk)
        self.position += len(chunk)

    def expect_end(self) -> None:
        if self._stream.read(1):
            raise BundleFormatError("bundle has data after its end-of-archive marker")

    @property
    def sha256(self) -> str:
        return self._whole.hexdigest()


def _read_member(source: _Source, name: str, max_size: int) -> int:
    header = source.read_exact(_BLOCK, f"the header of {name}")
    if header == b"\0" * _BLOCK:
        raise BundleFormatError(f"bundle has no {name} member")
    found = header[:100].rstrip(b"\0").decode("ascii", "replace")
    if found != name:
        raise BundleFormatError(f"bundle member is {found!r}, expected {name!r}")
    try:
        size = int(header[124:135].decode("ascii"), 8)
    except ValueError:
        raise BundleFormatError(f"the header of {name} has an invalid size field") from None
    if size > max_size:
        raise LengthMismatchError(f"{name} is {size} bytes, over its limit of {max_size}")
    if header != _header(name, size):
        raise BundleFormatError(f"the header of {name} is not canonical")
    return size


def _check_padding(source: _Source, size: int, name: str) -> None:
    pad = source.read_exact(-size % _BLOCK, f"the padding of {name}")
    if pad.count(0) != len(pad):
        raise BundleFormatError(f"the padding after {name} is not zeros")


def read_bundle(
    source: BinaryIO | bytes,
    *,
    trusted_keys: Mapping[str, VerifyKey] | Iterable[VerifyKey],
    threshold: int = 1,
    expected_sha256: str | None = None,
    expected_length: int | None = None,
    max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
) -> Bundle:
    """Read and verify a bundle; raise a :class:`~shared.errors.ContractError` on any fault."""
    stream: BinaryIO = io.BytesIO(source) if isinstance(source, bytes) else source
    limit = max_bytes
    if expected_sha256 is not None or expected_length is not None:
        if expected_sha256 is None or expected_length is None:
            raise ValueError("expected_sha256 and expected_length go together")
        limit = min(limit, expected_length)  # reading stops at the signed length
    src = _Source(stream, limit)

    size = _read_member(src, MANIFEST_MEMBER, BundleManifest.MAX_BYTES * 2)
    envelope_bytes = src.read_exact(size, MANIFEST_MEMBER)
    _check_padding(src, size, MANIFEST_MEMBER)
    envelope = Envelope.from_bytes(envelope_bytes, max_bytes=BundleManifest.MAX_BYTES * 2)
    payload = verify_envelope(
        envelope, payload_type=PayloadType.BUNDLE, trusted_keys=trusted_keys, threshold=threshold
    )
    try:
        manifest = BundleManifest.from_bytes(payload)
    except MessageError as e:
        raise BundleFormatError(f"bundle.json: {e}") from e

    ref = manifest.model_file
    size = _read_member(src, ref.name, max_bytes)
    if size != ref.length:
        raise LengthMismatchError(
            f"{ref.name} is {size} bytes in the archive, {ref.length} were signed"
        )
    model = src.read_exact(size, ref.name)
    verify_bytes(model, ref.length, ref.sha256)
    _check_padding(src, size, ref.name)

    trailer = src.read_exact(2 * _BLOCK, "the end-of-archive marker")
    if trailer.count(0) != len(trailer):
        raise BundleFormatError("bundle has more than two members or a damaged end marker")
    if expected_sha256 is None:
        src.expect_end()
    elif src.position != expected_length:
        raise LengthMismatchError(
            f"bundle ended after {src.position} bytes, {expected_length} were signed"
        )
    elif src.sha256 != expected_sha256:
        raise HashMismatchError(
            f"bundle sha256 is {src.sha256[:16]}..., the signed value is {expected_sha256[:16]}..."
        )
    return Bundle(manifest=manifest, model=model, sha256=src.sha256, length=src.position)


def check_target(
    manifest: BundleManifest,
    *,
    model_name: str,
    model_version: int,
    target: str,
    runtimes: Iterable[str],
) -> None:
    """Refuse a bundle that is not the one a desired state asked for (mix-and-match)."""
    wanted = (model_name, model_version, target)
    found = (manifest.model_name, manifest.model_version, manifest.target)
    if found != wanted:
        raise WrongTargetError(
            f"bundle is {found[0]} v{found[1]} for {found[2]}, "
            f"the desired state names {wanted[0]} v{wanted[1]} for {wanted[2]}"
        )
    available = set(runtimes)
    if manifest.runtime not in available:
        raise WrongTargetError(
            f"bundle needs runtime {manifest.runtime!r}; this device has "
            f"{', '.join(sorted(available)) or 'none'}"
        )
