"""The bundle file: canonical tar, signed manifest, length and hash checked while reading."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.bundle import (
    BundleManifest,
    FileRef,
    TensorSpec,
    build_bundle,
    check_target,
    read_bundle,
    write_bundle,
)
from shared.drift import DriftReference
from shared.errors import (
    BundleFormatError,
    ContractError,
    HashMismatchError,
    LengthMismatchError,
    UnknownKeyError,
    WrongTargetError,
)
from shared.integrity import sha256_hex
from tests.shared.conftest import NOW, key

ONLINE = key("online-1")
MODEL = bytes(range(256)) * 9 + b"tail"  # not a multiple of 512: padding is exercised


def manifest(**changes: object) -> BundleManifest:
    x = np.random.default_rng(1).normal(size=(200, 3))
    fields: dict[str, object] = {
        "model_name": "vibration",
        "model_version": 2,
        "target": "edge-arm64-litert",
        "runtime": "litert",
        "min_runtime_version": "2.3.0",
        "format": "tflite",
        "task": "classification",
        "model_file": FileRef(name="model.tflite", sha256="0" * 64, length=1),
        "inputs": [
            TensorSpec(
                name="x",
                dtype="int8",
                shape=[-1, 3],
                quantization={"scale": 0.02, "zero_point": -3},
            )
        ],
        "outputs": [TensorSpec(name="y", dtype="float32", shape=[-1, 2])],
        "feature_names": ["ax", "ay", "az"],
        "labels": ["ok", "fault"],
        "preprocessing": [{"op": "standardize", "mean": [0, 0, 0], "std": [1, 1, 1]}],
        "metrics": {"float": {"accuracy": 0.97}, "quantized": {"accuracy": 0.965}},
        "drift_reference": DriftReference.from_data(x, feature_names=["ax", "ay", "az"]),
        "self_tests": [{"input": [[0.1, 0.2, 0.3]], "expected": [[0.9, 0.1]], "atol": 0.05}],
        "ops": [{"name": "FULLY_CONNECTED", "version": 12}],
        "created_at": NOW,
    }
    fields.update(changes)
    return BundleManifest.model_validate(fields)


BUNDLE = build_bundle(manifest(), MODEL, [ONLINE])


def test_round_trip_and_the_file_is_a_plain_tar() -> None:
    out = io.BytesIO()
    sha, length = write_bundle(out, manifest(), MODEL, [ONLINE])
    assert out.getvalue() == BUNDLE  # deterministic
    assert (sha, length) == (sha256_hex(BUNDLE), len(BUNDLE))
    bundle = read_bundle(io.BytesIO(BUNDLE), trusted_keys=[ONLINE.public])
    assert bundle.model == MODEL
    assert bundle.manifest.model_file.sha256 == sha256_hex(MODEL)
    assert bundle.manifest.model_file.length == len(MODEL)
    assert (bundle.sha256, bundle.length) == (sha, length)
    assert bundle.manifest.drift_reference == manifest().drift_reference
    with tarfile.open(fileobj=io.BytesIO(BUNDLE)) as tar:
        assert tar.getnames() == ["bundle.json", "model.tflite"]
        member = tar.extractfile("model.tflite")
        assert member is not None and member.read() == MODEL


def test_expected_hash_and_length_from_the_desired_state() -> None:
    sha, length = sha256_hex(BUNDLE), len(BUNDLE)
    assert read_bundle(
        BUNDLE, trusted_keys=[ONLINE.public], expected_sha256=sha, expected_length=length
    )
    with pytest.raises(HashMismatchError):
        read_bundle(
            BUNDLE, trusted_keys=[ONLINE.public], expected_sha256="1" * 64, expected_length=length
        )
    with pytest.raises(LengthMismatchError):
        read_bundle(
            BUNDLE, trusted_keys=[ONLINE.public], expected_sha256=sha, expected_length=length - 512
        )
    with pytest.raises(LengthMismatchError):
        read_bundle(
            BUNDLE + b"\0" * 512,
            trusted_keys=[ONLINE.public],
            expected_sha256=sha,
            expected_length=length + 512,
        )


class Endless(io.RawIOBase):
    """A stream that never ends: the reader must stop at the signed length."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.served = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        n = len(buffer)
        chunk = (self.prefix[self.served : self.served + n]).ljust(n, b"\0")
        buffer[:n] = chunk
        self.served += n
        return n


def test_endless_data_is_cut_at_the_signed_length() -> None:
    stream = Endless(BUNDLE)
    with pytest.raises(LengthMismatchError):
        read_bundle(
            stream,  # type: ignore[arg-type]
            trusted_keys=[ONLINE.public],
            expected_sha256=sha256_hex(BUNDLE),
            expected_length=len(BUNDLE) - 1024,
        )
    assert stream.served <= len(BUNDLE)


def test_unknown_signer() -> None:
    with pytest.raises(UnknownKeyError):
        read_bundle(BUNDLE, trusted_keys=[key("other").public])


def test_trailing_data_and_truncation() -> None:
    with pytest.raises(BundleFormatError, match="after its end"):
        read_bundle(BUNDLE + b"x", trusted_keys=[ONLINE.public])
    with pytest.raises(BundleFormatError, match="ends inside"):
        read_bundle(BUNDLE[:-700], trusted_keys=[ONLINE.public])


def test_a_third_member_is_refused() -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [
            ("bundle.json", BUNDLE[512:1024]),
            ("model.tflite", MODEL),
            ("evil.sh", b"rm"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ContractError):
        read_bundle(out.getvalue(), trusted_keys=[ONLINE.public])


def test_a_tar_from_another_tool_is_not_canonical() -> None:
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar,
        tarfile.open(fileobj=io.BytesIO(BUNDLE)) as src,
    ):
        for member in src.getmembers():
            member.mtime = 1_700_000_000
            tar.addfile(member, src.extractfile(member))
    with pytest.raises(BundleFormatError, match="not canonical"):
        read_bundle(out.getvalue(), trusted_keys=[ONLINE.public])


def test_swapped_model_with_valid_signature_fails_on_hash() -> None:
    other = build_bundle(manifest(), MODEL[::-1], [ONLINE])
    split = BUNDLE.index(b"model.tflite\0")  # the model member's header
    assert split == other.index(b"model.tflite\0")
    mixed = BUNDLE[:split] + other[split:]  # our signed manifest, their model
    with pytest.raises(HashMismatchError):
        read_bundle(mixed, trusted_keys=[ONLINE.public])


@settings(max_examples=400, deadline=None)
@given(index=st.integers(0, len(BUNDLE) - 1), bit=st.integers(0, 7))
def test_flipping_any_bit_of_a_bundle_fails_verification(index: int, bit: int) -> None:
    tampered = bytearray(BUNDLE)
    tampered[index] ^= 1 << bit
    with pytest.raises(ContractError):
        read_bundle(bytes(tampered), trusted_keys=[ONLINE.public])


@pytest.mark.parametrize("index", [0, 100, 148, 300, 511, 600, 1500, 3000, len(BUNDLE) - 1])
def test_flipping_a_byte_at_each_region_fails(index: int) -> None:
    tampered = bytearray(BUNDLE)
    tampered[index] ^= 0xFF
    with pytest.raises(ContractError):
        read_bundle(bytes(tampered), trusted_keys=[ONLINE.public])


def test_check_target_refuses_mix_and_match() -> None:
    m = manifest()
    check_target(
        m, model_name="vibration", model_version=2, target="edge-arm64-litert", runtimes=["litert"]
    )
    with pytest.raises(WrongTargetError, match="v3"):
        check_target(
            m,
            model_name="vibration",
            model_version=3,
            target="edge-arm64-litert",
            runtimes=["litert"],
        )
    with pytest.raises(WrongTargetError, match="edge-gpu"):
        check_target(
            m, model_name="vibration", model_version=2, target="edge-gpu", runtimes=["litert"]
        )
    with pytest.raises(WrongTargetError, match="runtime"):
        check_target(
            m,
            model_name="vibration",
            model_version=2,
            target="edge-arm64-litert",
            runtimes=["onnxruntime"],
        )


def test_manifest_rules() -> None:
    with pytest.raises(ValueError, match=r"model\.onnx"):
        manifest(format="onnx")
    with pytest.raises(ValueError):
        manifest(preprocessing=[{"op": "mystery"}])
    with pytest.raises(ValueError, match="differ in rows"):
        manifest(self_tests=[{"input": [[1.0]], "expected": [[1.0], [2.0]]}])
