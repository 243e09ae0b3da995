"""``edgefleet-agent verify``: a bundle checked offline exactly as before activation."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from typer.testing import CliRunner

from agent.cli import app
from shared.bundle import BundleManifest, FileRef, TensorSpec, build_bundle
from shared.integrity import sha256_hex
from shared.messages import KeyEntry, Keyring
from shared.signing import PayloadType, SigningKey, sign_envelope

runner = CliRunner()


def setup_files(tmp_path: Path) -> tuple[Path, list[str], bytes]:
    root, online = SigningKey.generate(), SigningKey.generate()
    now = datetime.now(UTC)
    keyring = Keyring(
        version=1,
        issued_at=now - timedelta(minutes=1),
        expires_at=now + timedelta(days=1),
        keys=[KeyEntry(keyid=online.keyid, public_key=online.public.to_base64())],
    )
    (tmp_path / "root.pub").write_text(root.public.to_base64())
    (tmp_path / "keyring.json").write_bytes(
        sign_envelope(keyring.to_bytes(), PayloadType.KEYRING, [root]).to_bytes()
    )
    manifest = BundleManifest(
        model_name="m",
        model_version=1,
        target="edge-x86_64-litert",
        runtime="litert",
        min_runtime_version="2.3.0",
        format="tflite",
        task="classification",
        model_file=FileRef(name="model.tflite", sha256="0" * 64, length=1),
        inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, 2])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[-1, 2])],
        created_at=now,
    )
    data = build_bundle(manifest, b"\x01" * 700, [online])
    (tmp_path / "model.efb").write_bytes(data)
    args = ["--root-key", str(tmp_path / "root.pub"), "--keyring", str(tmp_path / "keyring.json")]
    return tmp_path / "model.efb", args, data


def test_a_good_bundle_verifies(tmp_path: Path) -> None:
    bundle, args, data = setup_files(tmp_path)
    result = runner.invoke(app, ["verify", str(bundle), *args, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["verified"] and info["sha256"] == sha256_hex(data) and info["length"] == len(data)
    human = runner.invoke(app, ["verify", str(bundle), *args])
    assert human.exit_code == 0 and human.stdout.startswith("OK  m v1")


def test_a_tampered_bundle_is_rejected_with_its_reason(tmp_path: Path) -> None:
    bundle, args, data = setup_files(tmp_path)
    tampered = bytearray(data)
    tampered[data.index(b"model.tflite\0") + 512 + 5] ^= 0x40  # inside the model bytes
    bundle.write_bytes(bytes(tampered))
    result = runner.invoke(app, ["verify", str(bundle), *args, "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout) | {"detail": ""} == {
        "verified": False,
        "reason": "hash_mismatch",
        "detail": "",
    }


def test_expected_hash_from_a_desired_state(tmp_path: Path) -> None:
    bundle, args, data = setup_files(tmp_path)
    ok = runner.invoke(
        app,
        ["verify", str(bundle), *args, "--sha256", sha256_hex(data), "--length", str(len(data))],
    )
    assert ok.exit_code == 0
    bad = runner.invoke(
        app, ["verify", str(bundle), *args, "--sha256", "0" * 64, "--length", str(len(data))]
    )
    assert bad.exit_code == 1 and "hash_mismatch" in bad.output


def test_missing_key_file_is_a_usage_error(tmp_path: Path) -> None:
    bundle, args, _ = setup_files(tmp_path)
    (tmp_path / "root.pub").unlink()
    result = runner.invoke(app, ["verify", str(bundle), *args])
    assert result.exit_code == 2 and "root public key" in result.output
