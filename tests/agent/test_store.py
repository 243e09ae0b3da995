"""The on-device model store: staging, activation, rollback, start-up re-verification, kill -9.

The bundles here are real signed bundles whose model bytes are random: the store
verifies files, it never runs them.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.errors import AgentError
from agent.store import (
    BundleRef,
    CorruptPointerError,
    MissingBundleError,
    ModelStore,
    NoPreviousVersionError,
    StoreError,
)
from shared.bundle import BundleManifest, FileRef, TensorSpec, build_bundle, read_bundle
from shared.integrity import sha256_hex
from shared.signing import SigningKey

KEY = SigningKey.generate()
OTHER_KEY = SigningKey.generate()
TARGET = "edge-x86_64-litert"
T0 = datetime(2026, 11, 2, 10, 0, tzinfo=UTC)
REPO = Path(__file__).resolve().parents[2]


def bundle_bytes(
    version: int, *, model_name: str = "digits", size: int = 4000, key: SigningKey = KEY
) -> bytes:
    manifest = BundleManifest(
        model_name=model_name,
        model_version=version,
        target=TARGET,
        runtime="litert",
        min_runtime_version="2.3.0",
        format="tflite",
        task="classification",
        model_file=FileRef(name="model.tflite", sha256="0" * 64, length=1),
        inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, 4])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[-1, 3])],
        created_at=T0,
    )
    return build_bundle(manifest, random.Random(version).randbytes(size), [key])


def ref_of(data: bytes, version: int) -> BundleRef:
    return BundleRef(
        sha256=sha256_hex(data), length=len(data), model_version=version, target=TARGET
    )


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        self.now += timedelta(minutes=1)
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path, now=Clock())


def put(store: ModelStore, data: bytes, version: int) -> BundleRef:
    """Download (write to tmp/) and stage, as the updater does after verifying."""
    temp = store.temp_path()
    temp.write_bytes(data)
    ref = ref_of(data, version)
    store.stage(temp, sha256=ref.sha256, length=ref.length)
    return ref


def verify_all(store: ModelStore) -> dict[str, int]:
    loaded = store.load_active(trusted_keys=[KEY.public])
    return {name: bundle.manifest.model_version for name, bundle in loaded.items()}


def flip_model_byte(path: Path) -> None:
    """Flip one bit inside the model bytes (after the model member's header)."""
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[data.index(b"model.tflite\0") + 512 + 100] ^= 0x01
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- staging


def test_stage_puts_a_read_only_content_addressed_file_and_is_idempotent(
    store: ModelStore,
) -> None:
    data = bundle_bytes(1)
    ref = put(store, data, 1)
    path = store.bundle_path(ref.sha256)
    assert path == store.root / "bundles" / f"{ref.sha256}.efb"
    assert path.read_bytes() == data
    assert path.stat().st_mode & 0o222 == 0
    assert put(store, data, 1) == ref  # again: same file, no error
    assert list(store.tmp_dir.iterdir()) == []
    assert store.has_bundle(ref.sha256, ref.length)


def test_stage_refuses_a_wrong_length_and_files_outside_tmp(
    store: ModelStore, tmp_path: Path
) -> None:
    data = bundle_bytes(1)
    temp = store.temp_path()
    temp.write_bytes(data[:-1])
    with pytest.raises(MissingBundleError, match=f"is {len(data) - 1} bytes"):
        store.stage(temp, sha256=sha256_hex(data), length=len(data))
    elsewhere = tmp_path / "elsewhere.efb"
    elsewhere.write_bytes(data)
    with pytest.raises(StoreError, match=r"use ModelStore\.temp_path"):
        store.stage(elsewhere, sha256=sha256_hex(data), length=len(data))
    with pytest.raises(StoreError, match="is not a sha256"):
        store.stage(temp, sha256="../../etc", length=len(data))


# ----------------------------------------------------------------------------- pointers


def test_activate_keeps_the_previous_version_and_rollback_restores_it(store: ModelStore) -> None:
    assert store.current("digits") is None and store.previous("digits") is None
    v1, v2, v3 = (put(store, bundle_bytes(v), v) for v in (1, 2, 3))
    first = store.activate("digits", v1)
    assert first.activated_at == T0 + timedelta(minutes=1)  # the injected clock
    assert store.current("digits") == first and store.previous("digits") is None
    with pytest.raises(NoPreviousVersionError, match="digits has no previous version"):
        store.rollback("digits")

    store.activate("digits", v2)
    assert store.activate("digits", v2) == store.current("digits")  # already current: no-op
    current, previous = store.current("digits"), store.previous("digits")
    assert current is not None and current.model_version == 2 and previous == first

    store.activate("digits", v3)
    assert [r.model_version for r in (store.current("digits"), store.previous("digits"))] == [3, 2]  # type: ignore[union-attr]

    restored = store.rollback("digits")
    assert restored.model_version == 2 and store.current("digits") == restored
    previous = store.previous("digits")
    assert previous is not None and previous.model_version == 3
    assert verify_all(store) == {"digits": 2}


def test_models_are_independent(store: ModelStore) -> None:
    a = put(store, bundle_bytes(1, model_name="digits"), 1)
    b = put(store, bundle_bytes(4, model_name="vibration"), 4)
    store.activate("digits", a)
    store.activate("vibration", b)
    assert store.models() == ["digits", "vibration"]
    assert verify_all(store) == {"digits": 1, "vibration": 4}
    store.deactivate("vibration")
    assert store.models() == ["digits"] and store.current("vibration") is None


def test_activate_refuses_a_bundle_that_is_not_staged(store: ModelStore) -> None:
    data = bundle_bytes(1)
    with pytest.raises(MissingBundleError, match="is not staged"):
        store.activate("digits", ref_of(data, 1))
    ref = put(store, data, 1)
    with pytest.raises(MissingBundleError):
        store.activate("digits", BundleRef(ref.sha256, ref.length + 1, 1, TARGET))
    with pytest.raises(StoreError, match="not a valid model name"):
        store.activate("../escape", ref)


def test_the_pointer_file_format(store: ModelStore) -> None:
    v1, v2 = put(store, bundle_bytes(1), 1), put(store, bundle_bytes(2), 2)
    store.activate("digits", v1)
    store.activate("digits", v2)
    assert sorted(p.name for p in store.pointers_dir.iterdir()) == ["digits.json"]
    body = json.loads((store.pointers_dir / "digits.json").read_text())
    assert body["schema"] == "ef.agent.pointer" and body["schema_version"] == 1
    assert body["model_name"] == "digits"
    assert body["current"] == {
        "sha256": v2.sha256,
        "length": v2.length,
        "model_version": 2,
        "target": TARGET,
        "activated_at": (T0 + timedelta(minutes=2)).isoformat(),
    }
    assert body["previous"]["sha256"] == v1.sha256
    assert list(store.tmp_dir.iterdir()) == []  # the draft was renamed, not copied


def test_a_failed_pointer_write_leaves_the_old_pointer(
    store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1, v2 = put(store, bundle_bytes(1), 1), put(store, bundle_bytes(2), 2)
    store.activate("digits", v1)
    before = (store.pointers_dir / "digits.json").read_bytes()

    def no_rename(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(StoreError, match="cannot write the pointer of digits"):
        store.activate("digits", v2)
    monkeypatch.undo()
    assert (store.pointers_dir / "digits.json").read_bytes() == before
    assert list(store.tmp_dir.iterdir()) == []
    assert verify_all(store) == {"digits": 1}


def test_leftovers_of_a_killed_update_are_cleaned_at_start(store: ModelStore) -> None:
    v1 = put(store, bundle_bytes(1), 1)
    store.activate("digits", v1)
    (store.tmp_dir / "download-abc.part").write_bytes(b"half a bundle")
    (store.tmp_dir / "pointer-digits-xyz.part").write_text('{"current": ')
    fresh = ModelStore(store.root.parent)
    assert verify_all(fresh) == {"digits": 1}
    assert list(fresh.tmp_dir.iterdir()) == []


def test_a_corrupt_pointer_is_reported_not_trusted(store: ModelStore) -> None:
    v1 = put(store, bundle_bytes(1), 1)
    store.activate("digits", v1)
    (store.pointers_dir / "digits.json").write_text('{"schema": "ef.agent.pointer", "curr')
    with pytest.raises(CorruptPointerError, match="the pointer of digits is unreadable"):
        store.current("digits")
    assert verify_all(store) == {}
    assert "unreadable" in store.load_problems["digits"][0]
    with pytest.raises(StoreError, match="not collecting garbage"):
        store.garbage_collect()
    assert isinstance(CorruptPointerError("x"), AgentError)


# ----------------------------------------------------------------------------- start-up


def test_load_active_reverifies_and_falls_back_to_previous(store: ModelStore) -> None:
    v1, v2 = put(store, bundle_bytes(1), 1), put(store, bundle_bytes(2), 2)
    store.activate("digits", v1)
    store.activate("digits", v2)
    assert verify_all(store) == {"digits": 2} and store.load_problems == {}

    flip_model_byte(store.bundle_path(v2.sha256))
    assert verify_all(store) == {"digits": 1}
    problems = store.load_problems["digits"]
    assert problems[0].startswith("current v2: hash_mismatch")
    assert problems[-1] == "fell back to previous v1"
    # The fallback is on disk: the pointer says what runs, and the damaged file can go.
    current = store.current("digits")
    assert current is not None and current.sha256 == v1.sha256
    assert store.previous("digits") is None
    assert store.garbage_collect() == [v2.sha256]
    assert verify_all(store) == {"digits": 1} and store.load_problems == {}


def test_a_read_only_load_falls_back_in_memory_and_touches_nothing(store: ModelStore) -> None:
    v1, v2 = put(store, bundle_bytes(1), 1), put(store, bundle_bytes(2), 2)
    store.activate("digits", v1)
    store.activate("digits", v2)
    draft = store.tmp_dir / "pointer-draft"
    draft.write_bytes(b"an agent beside us is writing this")
    flip_model_byte(store.bundle_path(v2.sha256))
    loaded = store.load_active(trusted_keys=[KEY.public], read_only=True)
    assert loaded["digits"].manifest.model_version == 1
    assert store.load_problems["digits"][-1] == "fell back to previous v1"
    current = store.current("digits")
    assert current is not None and current.sha256 == v2.sha256  # the pointer is untouched
    assert draft.exists()  # and so is tmp/


def test_load_active_gives_none_with_reasons_when_nothing_verifies(store: ModelStore) -> None:
    v1, v2 = put(store, bundle_bytes(1), 1), put(store, bundle_bytes(2), 2)
    store.activate("digits", v1)
    store.activate("digits", v2)
    flip_model_byte(store.bundle_path(v2.sha256))
    store.bundle_path(v1.sha256).unlink()
    before = (store.pointers_dir / "digits.json").read_bytes()
    assert verify_all(store) == {}
    assert store.load_problems["digits"] == [
        store.load_problems["digits"][0],
        f"previous v1: MissingBundleError: bundle {v1.sha256[:12]} is missing",
    ]
    assert "hash_mismatch" in store.load_problems["digits"][0]
    assert (store.pointers_dir / "digits.json").read_bytes() == before  # nothing rewritten


def test_load_active_checks_signatures_and_that_the_bundle_is_the_named_one(
    store: ModelStore,
) -> None:
    forged = put(store, bundle_bytes(1, key=OTHER_KEY), 1)
    store.activate("digits", forged)
    assert verify_all(store) == {}
    assert "unknown_key" in store.load_problems["digits"][0]

    other = bundle_bytes(7, model_name="vibration")
    mislabelled = put(store, other, 3)  # the pointer would say v3 of "speech"
    store.activate("speech", mislabelled)
    verify_all(store)
    assert (
        "is vibration v7 for edge-x86_64-litert, the pointer names speech v3"
        in (store.load_problems["speech"][0])
    )


def test_garbage_collect_keeps_what_pointers_name_and_what_is_asked(store: ModelStore) -> None:
    refs = [put(store, bundle_bytes(v), v) for v in (1, 2, 3, 4)]
    store.activate("digits", refs[0])
    store.activate("digits", refs[1])
    store.activate("digits", refs[2])  # refs[0] is no longer named
    removed = store.garbage_collect(keep=[refs[3].sha256])
    assert removed == [refs[0].sha256]
    names = sorted(p.name for p in store.bundles_dir.iterdir())
    assert names == sorted(f"{r.sha256}.efb" for r in refs[1:])


# ----------------------------------------------------------------------------- kill -9


def test_killed_at_any_moment_it_restarts_on_a_complete_verified_model(tmp_path: Path) -> None:
    """SIGKILL a process that downloads, stages, activates, rolls back and collects in a
    loop; after every kill a fresh store loads the old or the new model -- complete,
    verified, the one its pointer names -- never a mix and never none."""
    files = {}
    for version in (1, 2, 3):
        data = bundle_bytes(version, size=150_000 + 20_000 * version)
        path = tmp_path / f"v{version}.efb"
        path.write_bytes(data)
        files[version] = (path, sha256_hex(data))
    data_dir = tmp_path / "device"
    rng = random.Random(4)
    outcomes = []
    for iteration in range(30):
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.agent.store_churn",
                str(data_dir),
                "digits",
                TARGET,
                *(f"{path}:{version}" for version, (path, _) in files.items()),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert child.stdout is not None
            ready = child.stdout.readline()
            assert ready == b"ready\n", child.stderr.read() if child.stderr else ready
            time.sleep(rng.uniform(0, 0.08))
            assert child.poll() is None, "the churn process died on its own"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        assert child.returncode == -signal.SIGKILL

        store = ModelStore(data_dir)
        loaded = store.load_active(trusted_keys=[KEY.public])
        assert set(loaded) == {"digits"}, (iteration, store.load_problems)
        assert store.load_problems == {}, iteration
        bundle = loaded["digits"]
        current = store.current("digits")
        assert current is not None and bundle.sha256 == current.sha256
        assert files[bundle.manifest.model_version][1] == bundle.sha256
        # Every file in bundles/ is complete: no half-written bundle ever gets a name.
        for entry in store.bundles_dir.iterdir():
            read_bundle(
                entry.read_bytes(),
                trusted_keys=[KEY.public],
                expected_sha256=entry.stem,
                expected_length=entry.stat().st_size,
            )
        assert list(store.tmp_dir.iterdir()) == []
        outcomes.append(bundle.manifest.model_version)
    assert len(set(outcomes)) > 1, f"the kills never landed between versions: {outcomes}"


def test_store_errors_share_the_agent_root() -> None:
    for error in (StoreError, CorruptPointerError, MissingBundleError, NoPreviousVersionError):
        assert issubclass(error, AgentError)
