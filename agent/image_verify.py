"""Checks a provisioned agent image (``edgefleet image build``) before anything is installed.

This module uses the Python standard library only, on purpose: ``install.sh`` runs it as
``verify.py`` with ``python3 -I`` on a device that has Python but not yet the agent (so no
``cryptography``). Ed25519 verification is therefore done here in pure Python, after
RFC 8032 section 6 -- slow (a few milliseconds a signature) but only a handful are checked.

What an image is: a folder (or the ``.tar.gz`` holding one folder) with ``MANIFEST.json``
-- the sha256 and size of every other file -- and ``MANIFEST.sig``, a DSSE envelope over
the exact bytes of ``MANIFEST.json`` signed by the fleet's *online* keys. The image also
carries ``root.pub`` and ``keyring.json`` (the root-signed list of online keys): the
chain root -> keyring -> manifest -> every file is what :func:`verify_image` checks.

What always holds:

- Nothing is parsed before its signature verified: the keyring's payload only after the
  root's signature, the manifest's only after the keyring's keys signed it.
- An image is accepted only when every listed file is present with its size and sha256,
  and no other file is (a file added to the image is refused, as are links, devices and
  paths leaving the folder).
- The trust anchor is the root key passed in (``--root-key``, given out of band) or,
  when none is, the image's own ``root.pub``. The latter only proves the image is
  intact and self-consistent (no corruption, no edited file): someone who can rewrite
  the whole image can rewrite its root key and this verifier too. Against that, run a
  verifier you already trust (``python3 -m agent.image_verify`` from an installed agent,
  ``edgefleet image verify`` on the operator's machine) with the fleet's root key.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import posixpath
import sys
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

__all__ = [
    "IMAGE_PAYLOAD_TYPE",
    "KEYRING_PAYLOAD_TYPE",
    "MANIFEST_NAME",
    "SIGNATURE_NAME",
    "ImageVerificationError",
    "VerifiedImage",
    "ed25519_verify",
    "main",
    "verify_image",
]

IMAGE_PAYLOAD_TYPE = "application/vnd.edgefleet.image-manifest+json"
KEYRING_PAYLOAD_TYPE = "application/vnd.edgefleet.keyring+json"  # shared.signing.PayloadType
MANIFEST_SCHEMA = "ef.image-manifest"
MANIFEST_NAME = "MANIFEST.json"
SIGNATURE_NAME = "MANIFEST.sig"
ROOT_KEY_NAME = "root.pub"
KEYRING_NAME = "keyring.json"
MAX_SIGNED_BYTES = 1024 * 1024  # the manifest, its signature, the keyring
MAX_FILES = 10_000
_CHUNK = 1024 * 1024


class ImageVerificationError(Exception):
    """The image is refused; ``reason`` is a short code, the message says what was wrong."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------- Ed25519

_P = 2**255 - 19
_Q = 2**252 + 27742317777372353535851937790883648493
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)
_Point = tuple[int, int, int, int]


def _add(a: _Point, b: _Point) -> _Point:
    x = (a[1] - a[0]) * (b[1] - b[0]) % _P
    y = (a[1] + a[0]) * (b[1] + b[0]) % _P
    c = 2 * a[3] * b[3] * _D % _P
    d = 2 * a[2] * b[2] % _P
    e, f, g, h = y - x, d - c, d + c, y + x
    return (e * f, g * h, f * g, e * h)


def _mul(scalar: int, point: _Point) -> _Point:
    result: _Point = (0, 1, 1, 0)
    while scalar > 0:
        if scalar & 1:
            result = _add(result, point)
        point = _add(point, point)
        scalar >>= 1
    return result


def _equal(a: _Point, b: _Point) -> bool:
    return (a[0] * b[2] - b[0] * a[2]) % _P == 0 and (a[1] * b[2] - b[1] * a[2]) % _P == 0


def _recover_x(y: int, sign: int) -> int | None:
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P)
    if x2 % _P == 0:
        return None if sign else 0
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P != 0:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P != 0:
        return None
    if (x & 1) != sign:
        x = _P - x
    return x


def _decompress(raw: bytes) -> _Point | None:
    y = int.from_bytes(raw, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    x = _recover_x(y, sign)
    return None if x is None else (x, y, 1, x * y % _P)


_GY = 4 * pow(5, _P - 2, _P) % _P
_GX = _recover_x(_GY, 0)
assert _GX is not None
_G: _Point = (_GX, _GY, 1, _GX * _GY % _P)


def ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """RFC 8032 Ed25519 verification (cofactorless, as OpenSSL and ``cryptography`` do)."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    a = _decompress(public_key)
    r = _decompress(signature[:32])
    if a is None or r is None:
        return False
    s = int.from_bytes(signature[32:], "little")
    if s >= _Q:
        return False
    h = int.from_bytes(hashlib.sha512(signature[:32] + public_key + message).digest(), "little")
    return _equal(_mul(s, _G), _add(r, _mul(h % _Q, a)))


# ----------------------------------------------------------------------------- envelopes


def _b64(text: object, what: str) -> bytes:
    """Canonical base64 only (as shared.signing): one text per byte string."""
    if not isinstance(text, str):
        raise ImageVerificationError("malformed", f"{what} is not a base64 string")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageVerificationError("malformed", f"{what} is not valid base64: {e}") from e
    if base64.b64encode(raw).decode("ascii") != text:
        raise ImageVerificationError("malformed", f"{what} is not canonical base64")
    return raw


def _pae(payload_type: str, payload: bytes) -> bytes:
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def _key_id(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()


def _json(raw: bytes, what: str) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("a key appears twice")
        return dict(pairs)

    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except ValueError as e:
        raise ImageVerificationError("malformed", f"{what} is not valid JSON: {e}") from e


def _verify_envelope(
    raw: bytes, *, payload_type: str, keys: Mapping[str, bytes], threshold: int, what: str
) -> bytes:
    """The payload of the DSSE envelope ``raw`` if ``threshold`` distinct ``keys`` signed it."""
    envelope = _json(raw, what)
    if not isinstance(envelope, dict) or not isinstance(envelope.get("signatures"), list):
        raise ImageVerificationError("malformed", f"{what} is not a signed envelope")
    if envelope.get("payloadType") != payload_type:
        raise ImageVerificationError(
            "malformed", f"{what} has payload type {envelope.get('payloadType')!r}"
        )
    payload = _b64(envelope.get("payload"), f"{what} payload")
    message = _pae(payload_type, payload)
    valid: set[str] = set()
    unknown: list[str] = []
    bad: list[str] = []
    for signature in envelope["signatures"][:16]:
        keyid = signature.get("keyid") if isinstance(signature, dict) else None
        if not isinstance(keyid, str) or keyid not in keys:
            unknown.append(str(keyid)[:16])
            continue
        try:
            sig = _b64(signature.get("sig"), f"{what} signature")
        except ImageVerificationError:
            bad.append(keyid[:16])
            continue
        if ed25519_verify(keys[keyid], message, sig):
            valid.add(keyid)
        else:
            bad.append(keyid[:16])
    if len(valid) >= threshold:
        return payload
    if bad:
        raise ImageVerificationError(
            "bad_signature", f"{what}: the signature by key {bad[0]}... does not match"
        )
    if valid:
        raise ImageVerificationError(
            "threshold", f"{what}: {len(valid)} trusted key(s) signed, {threshold} required"
        )
    if unknown:
        raise ImageVerificationError(
            "unknown_key", f"{what} is signed only by unknown key(s): {', '.join(unknown)}"
        )
    raise ImageVerificationError("bad_signature", f"{what} is not signed")


def _time(value: object, what: str) -> datetime:
    if not isinstance(value, str):
        raise ImageVerificationError("malformed", f"{what} is not a timestamp")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as e:
        raise ImageVerificationError("malformed", f"{what}: {e}") from e
    if parsed.tzinfo is None:
        raise ImageVerificationError("malformed", f"{what} has no time zone")
    return parsed


def _keyring_keys(
    raw: bytes, root: bytes, *, now: datetime, allow_expired: bool
) -> tuple[dict[str, bytes], int]:
    payload = _verify_envelope(
        raw,
        payload_type=KEYRING_PAYLOAD_TYPE,
        keys={_key_id(root): root},
        threshold=1,
        what=KEYRING_NAME,
    )
    keyring = _json(payload, KEYRING_NAME)
    if not isinstance(keyring, dict) or keyring.get("schema") != "ef.keyring":
        raise ImageVerificationError("malformed", f"{KEYRING_NAME} holds no keyring")
    expires_at = _time(keyring.get("expires_at"), "keyring expires_at")
    if expires_at <= now and not allow_expired:
        raise ImageVerificationError(
            "expired",
            f"the image's keyring expired at {expires_at.isoformat()}: rebuild the image, "
            "or pass --allow-expired-keyring if you trust it anyway",
        )
    keys: dict[str, bytes] = {}
    for entry in keyring.get("keys") or []:
        public = _b64(entry.get("public_key") if isinstance(entry, dict) else None, "key")
        if len(public) != 32:
            raise ImageVerificationError("malformed", "a keyring key is not 32 bytes")
        keys[_key_id(public)] = public
    threshold = keyring.get("threshold", 1)
    if not keys or not isinstance(threshold, int) or not 1 <= threshold <= len(keys):
        raise ImageVerificationError("malformed", f"{KEYRING_NAME}: no usable keys or threshold")
    return keys, threshold


# ----------------------------------------------------------------------------- image files


def _safe_path(path: object) -> str:
    if (
        not isinstance(path, str)
        or not path
        or path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or posixpath.normpath(path) != path
        or path.split("/")[0] == ".."
    ):
        raise ImageVerificationError("malformed", f"the manifest lists an unsafe path {path!r}")
    return path


class _Source:
    """The files of an image, from a folder or from a ``.tar.gz`` (read without extracting)."""

    def __init__(self, location: Path) -> None:
        self.location = location
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        self._files: dict[str, Path] = {}
        if location.is_dir():
            self._scan_folder(location)
        elif location.is_file():
            self._scan_tar(location)
        else:
            raise ImageVerificationError("missing", f"no image at {location}")

    def _scan_folder(self, root: Path) -> None:
        for path in sorted(root.rglob("*")):
            name = path.relative_to(root).as_posix()
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise ImageVerificationError(
                    "unlisted_file", f"{name} is a link or special file; images hold plain files"
                )
            if path.is_file():
                self._files[name] = path

    def _scan_tar(self, location: Path) -> None:
        try:
            self._tar = tarfile.open(location, "r:*")  # noqa: SIM115 - closed in close()
            members = self._tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ImageVerificationError(
                "malformed", f"{location} is not a tar archive: {e}"
            ) from e
        tops = {m.name.split("/")[0] for m in members}
        if len(tops) != 1:
            raise ImageVerificationError("malformed", "the archive must hold exactly one folder")
        top = tops.pop()
        for member in members:
            if member.name == top and member.isdir():
                continue
            name = member.name[len(top) + 1 :] if member.name.startswith(top + "/") else ""
            if member.isdir():
                continue
            if not member.isfile() or not name:
                raise ImageVerificationError(
                    "unlisted_file", f"{member.name} is a link or special file; refused"
                )
            if name in self._members:
                raise ImageVerificationError("malformed", f"{name} is twice in the archive")
            self._members[name] = member

    def names(self) -> set[str]:
        return set(self._files) | set(self._members)

    def size(self, name: str) -> int:
        return self._files[name].stat().st_size if name in self._files else self._members[name].size

    def open(self, name: str) -> IO[bytes]:
        if name in self._files:
            return self._files[name].open("rb")
        assert self._tar is not None
        handle = self._tar.extractfile(self._members[name])
        assert handle is not None
        return handle

    def read_small(self, name: str, what: str) -> bytes:
        if name not in self.names():
            raise ImageVerificationError("missing_file", f"the image has no {what} ({name})")
        if self.size(name) > MAX_SIGNED_BYTES:
            raise ImageVerificationError("malformed", f"{name} is over {MAX_SIGNED_BYTES} bytes")
        with self.open(name) as f:
            return f.read(MAX_SIGNED_BYTES + 1)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


def _sha256(handle: IO[bytes], limit: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    read = 0
    while chunk := handle.read(_CHUNK):
        read += len(chunk)
        if read > limit:  # stop at the listed size: more is already a mismatch
            break
        digest.update(chunk)
    return digest.hexdigest(), read


@dataclass(frozen=True)
class VerifiedImage:
    """An image that passed :func:`verify_image`: its manifest and who vouched for it."""

    manifest: dict[str, Any]
    root_keyid: str
    root_given: bool

    @property
    def files(self) -> list[dict[str, Any]]:
        return list(self.manifest["files"])


def _files(manifest: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(manifest, dict) or manifest.get("schema") != MANIFEST_SCHEMA:
        raise ImageVerificationError("malformed", f"{MANIFEST_NAME} is not an image manifest")
    entries = manifest.get("files")
    if not isinstance(entries, list) or not entries or len(entries) > MAX_FILES:
        raise ImageVerificationError("malformed", f"{MANIFEST_NAME} lists no files")
    files: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise ImageVerificationError("malformed", f"{MANIFEST_NAME}: a file entry is bad")
        path = _safe_path(entry.get("path"))
        sha, size = entry.get("sha256"), entry.get("size")
        if not isinstance(sha, str) or len(sha) != 64 or not isinstance(size, int) or size < 0:
            raise ImageVerificationError("malformed", f"{MANIFEST_NAME}: bad entry for {path}")
        if path in files or path in (MANIFEST_NAME, SIGNATURE_NAME):
            raise ImageVerificationError("malformed", f"{MANIFEST_NAME} lists {path} twice")
        files[path] = entry
    return files


def verify_image(
    location: Path,
    *,
    root_key: bytes | None = None,
    now: datetime | None = None,
    allow_expired_keyring: bool = False,
) -> VerifiedImage:
    """Verify the image folder or archive at ``location``; raise
    :class:`ImageVerificationError` naming the first problem. See the module docstring."""
    now = now or datetime.now(timezone.utc)  # noqa: UP017 - runs on older Pythons too
    source = _Source(location)
    try:
        image_root = source.read_small(ROOT_KEY_NAME, "root key")
        try:
            image_root_key = base64.b64decode(image_root.strip(), validate=True)
        except (binascii.Error, ValueError) as e:
            raise ImageVerificationError("malformed", f"{ROOT_KEY_NAME} is not base64") from e
        if root_key is not None and image_root_key != root_key:
            raise ImageVerificationError(
                "wrong_root",
                f"the image trusts root key {_key_id(image_root_key)[:16]}..., not the given "
                f"{_key_id(root_key)[:16]}...",
            )
        anchor = root_key if root_key is not None else image_root_key
        if len(anchor) != 32:
            raise ImageVerificationError("malformed", "the root key is not 32 bytes")
        keys, threshold = _keyring_keys(
            source.read_small(KEYRING_NAME, "keyring"),
            anchor,
            now=now,
            allow_expired=allow_expired_keyring,
        )
        manifest_bytes = source.read_small(MANIFEST_NAME, "manifest")
        payload = _verify_envelope(
            source.read_small(SIGNATURE_NAME, "manifest signature"),
            payload_type=IMAGE_PAYLOAD_TYPE,
            keys=keys,
            threshold=threshold,
            what=SIGNATURE_NAME,
        )
        if payload != manifest_bytes:
            raise ImageVerificationError(
                "bad_signature", f"{MANIFEST_NAME} is not the document {SIGNATURE_NAME} signed"
            )
        manifest = _json(payload, MANIFEST_NAME)
        files = _files(manifest)
        present = source.names() - {MANIFEST_NAME, SIGNATURE_NAME}
        extra = sorted(present - set(files))
        if extra:
            raise ImageVerificationError(
                "unlisted_file", f"{extra[0]} is in the image but not in its manifest"
            )
        missing = sorted(set(files) - present)
        if missing:
            raise ImageVerificationError("missing_file", f"{missing[0]} is missing from the image")
        for path, entry in sorted(files.items()):
            with source.open(path) as handle:
                digest, size = _sha256(handle, entry["size"])
            if size != entry["size"] or digest != entry["sha256"]:
                raise ImageVerificationError(
                    "hash_mismatch", f"{path} differs from the manifest (size or sha256)"
                )
    finally:
        source.close()
    return VerifiedImage(
        manifest=manifest, root_keyid=_key_id(anchor), root_given=root_key is not None
    )


# ----------------------------------------------------------------------------- command line


def _read_root_key(path: str) -> bytes:
    try:
        raw = base64.b64decode(Path(path).read_text().strip(), validate=True)
    except (OSError, binascii.Error, ValueError) as e:
        raise SystemExit(f"error: cannot read the root key {path}: {e}") from e
    if len(raw) != 32:
        raise SystemExit(f"error: {path} is not an Ed25519 public key (32 bytes)")
    return raw


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="verify.py",
        description="Verify an edgefleet agent image (folder or .tar.gz) before installing it.",
    )
    parser.add_argument("image", help="the image folder or archive")
    parser.add_argument(
        "--root-key",
        help="the fleet's root.pub, obtained out of band (default: the image's own, which "
        "only proves the image is intact)",
    )
    parser.add_argument("--allow-expired-keyring", action="store_true")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    root_key = None if args.root_key is None else _read_root_key(args.root_key)
    try:
        verified = verify_image(
            Path(args.image), root_key=root_key, allow_expired_keyring=args.allow_expired_keyring
        )
    except ImageVerificationError as e:
        if args.json:
            print(json.dumps({"verified": False, "reason": e.reason, "detail": str(e)}))
        else:
            print(f"REFUSED ({e.reason}): {e}", file=sys.stderr)
        return 1
    manifest = verified.manifest
    summary = {
        "verified": True,
        "profile": manifest.get("profile"),
        "agent_version": manifest.get("agent_version"),
        "built_at": manifest.get("built_at"),
        "files": len(verified.files),
        "root_keyid": verified.root_keyid,
        "root_given": verified.root_given,
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    print(
        f"OK  image for {summary['profile']} (agent {summary['agent_version']}, built "
        f"{summary['built_at']}): {summary['files']} files match the signed manifest"
    )
    if not verified.root_given:
        print(
            f"    checked against the image's own root key {verified.root_keyid[:16]}...; "
            "pass --root-key with the fleet's root.pub to check who built it"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
