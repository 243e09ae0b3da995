"""The check an agent wheel passes before it is published: pure, on the wheel's bytes.

What always holds for a wheel :func:`inspect_wheel` accepts:

- It is a zip archive of at most :data:`MAX_ENTRIES` entries and
  :data:`MAX_UNPACKED_BYTES` unpacked, with no absolute or ``..`` paths.
- It has exactly one ``edgefleet-<version>.dist-info`` folder whose ``METADATA`` names
  the distribution ``edgefleet`` at that same version, a valid agent version
  (:data:`shared.messages.AgentVersion`).
- Its ``WHEEL`` says ``Root-Is-Purelib: true`` and every tag is ``*-none-any``: one
  file installs on every device class.
- It contains the packages ``agent/`` and ``shared/`` (their ``__init__.py``).
- Its ``RECORD`` lists every file but itself, and each listed file's size and
  SHA-256 match; nothing listed is missing.

Anything else raises :class:`~server.agent_releases.errors.InvalidWheelError` naming
the first problem found.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import re
import zipfile
from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser

from pydantic import TypeAdapter, ValidationError

from server.agent_releases.errors import InvalidWheelError
from shared.messages import AgentVersion

__all__ = [
    "DISTRIBUTION",
    "MAX_ENTRIES",
    "MAX_UNPACKED_BYTES",
    "REQUIRED_PACKAGES",
    "WheelFacts",
    "inspect_wheel",
]

DISTRIBUTION = "edgefleet"
REQUIRED_PACKAGES = ("agent", "shared")
MAX_ENTRIES = 10_000
MAX_UNPACKED_BYTES = 256 * 1024 * 1024

_DIST_INFO = re.compile(r"^(?P<name>[^/]+)-(?P<version>[^/-]+)\.dist-info/$")
_VERSION = TypeAdapter(AgentVersion)


@dataclass(frozen=True, slots=True)
class WheelFacts:
    """What a checked wheel says about itself."""

    version: str
    files: int
    unpacked_bytes: int
    tags: tuple[str, ...]
    requires_python: str | None


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _record_digest(data: bytes) -> str:
    raw = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + raw.decode("ascii")


def inspect_wheel(data: bytes, *, filename: str | None = None) -> WheelFacts:
    """Check ``data`` as an agent wheel (see the module docstring) and describe it."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise InvalidWheelError(f"not a wheel: the file is not a zip archive ({e})") from e
    with archive:
        infos = [i for i in archive.infolist() if not i.is_dir()]
        if len(infos) > MAX_ENTRIES:
            raise InvalidWheelError(f"the wheel has {len(infos)} files; the limit is {MAX_ENTRIES}")
        unpacked = sum(i.file_size for i in infos)
        if unpacked > MAX_UNPACKED_BYTES:
            raise InvalidWheelError(
                f"the wheel unpacks to {unpacked} bytes; the limit is {MAX_UNPACKED_BYTES}"
            )
        names = [i.filename for i in infos]
        for name in names:
            if name.startswith("/") or "\\" in name or ".." in name.split("/"):
                raise InvalidWheelError(f"the wheel holds an unsafe path: {name!r}")
        version = _dist_info_version(names)
        dist_info = f"{DISTRIBUTION}-{version}.dist-info"
        metadata = _headers(archive, f"{dist_info}/METADATA")
        meta_name, meta_version = metadata.get("Name"), metadata.get("Version")
        if meta_name is None or _normalize(meta_name) != DISTRIBUTION:
            raise InvalidWheelError(
                f"METADATA names the distribution {meta_name!r}, not {DISTRIBUTION!r}"
            )
        if meta_version != version:
            raise InvalidWheelError(
                f"METADATA says version {meta_version!r} but the folder is {dist_info}"
            )
        wheel = _headers(archive, f"{dist_info}/WHEEL")
        if (wheel.get("Root-Is-Purelib") or "").strip().lower() != "true":
            raise InvalidWheelError(
                "WHEEL does not say 'Root-Is-Purelib: true': the agent wheel must be pure "
                "Python so one file installs on every device class"
            )
        tags = tuple(wheel.get_all("Tag") or ())
        impure = [t for t in tags if not t.endswith("-none-any")]
        if not tags or impure:
            raise InvalidWheelError(
                f"WHEEL tags {', '.join(tags) or '(none)'} are not all '*-none-any'"
            )
        for package in REQUIRED_PACKAGES:
            if f"{package}/__init__.py" not in names:
                raise InvalidWheelError(
                    f"the wheel has no {package}/ package: it is not a wheel of the agent"
                )
        _check_record(archive, names, f"{dist_info}/RECORD")
        if filename is not None and not filename.startswith(f"{DISTRIBUTION}-{version}-"):
            raise InvalidWheelError(
                f"the file is named {filename!r} but holds {DISTRIBUTION} {version}"
            )
        return WheelFacts(
            version=version,
            files=len(names),
            unpacked_bytes=unpacked,
            tags=tags,
            requires_python=metadata.get("Requires-Python"),
        )


def _dist_info_version(names: list[str]) -> str:
    folders = {n.split("/", 1)[0] + "/" for n in names if "/" in n}
    found = [m for f in sorted(folders) if (m := _DIST_INFO.match(f)) is not None]
    if not found:
        raise InvalidWheelError("not a wheel: it has no <name>-<version>.dist-info folder")
    if len(found) > 1:
        listed = ", ".join(m.group(0).rstrip("/") for m in found)
        raise InvalidWheelError(f"the wheel has more than one .dist-info folder: {listed}")
    match = found[0]
    if _normalize(match["name"]) != DISTRIBUTION:
        raise InvalidWheelError(
            f"the wheel is of the distribution {match['name']!r}, not {DISTRIBUTION!r}"
        )
    try:
        version: str = _VERSION.validate_python(match["version"])
    except ValidationError as e:
        raise InvalidWheelError(
            f"{match['version']!r} is not a version an agent can report "
            "(digits first, then letters, digits and . + ! _ -, at most 64 characters)"
        ) from e
    if _normalize(match["name"]) != match["name"]:
        raise InvalidWheelError(f"the .dist-info folder must be named {DISTRIBUTION}-{version}")
    return version


def _headers(archive: zipfile.ZipFile, name: str) -> Message:
    try:
        text = archive.read(name).decode("utf-8")
    except KeyError:
        raise InvalidWheelError(f"the wheel has no {name}") from None
    except UnicodeDecodeError as e:
        raise InvalidWheelError(f"{name} is not UTF-8 text") from e
    return HeaderParser().parsestr(text)


def _check_record(archive: zipfile.ZipFile, names: list[str], record_name: str) -> None:
    try:
        text = archive.read(record_name).decode("utf-8")
    except KeyError:
        raise InvalidWheelError(f"the wheel has no {record_name}") from None
    except UnicodeDecodeError as e:
        raise InvalidWheelError(f"{record_name} is not UTF-8 text") from e
    listed: dict[str, tuple[str, str]] = {}
    for row in csv.reader(io.StringIO(text)):
        if not row:
            continue
        if len(row) != 3:
            raise InvalidWheelError(f"{record_name}: a row has {len(row)} fields, not 3: {row!r}")
        listed[row[0]] = (row[1], row[2])
    unsigned = {record_name, f"{record_name}.jws", f"{record_name}.p7s"}
    for name in names:
        if name in unsigned:
            continue
        entry = listed.pop(name, None)
        if entry is None:
            raise InvalidWheelError(f"{name} is in the wheel but not in {record_name}")
        digest, size = entry
        if not digest.startswith("sha256="):
            raise InvalidWheelError(f"{record_name} gives {name} no sha256 hash")
        content = archive.read(name)
        if digest != _record_digest(content):
            raise InvalidWheelError(f"{name} does not match its hash in {record_name}")
        if size and size != str(len(content)):
            raise InvalidWheelError(f"{name} is {len(content)} bytes; {record_name} says {size}")
    missing = sorted(set(listed) - unsigned)
    if missing:
        raise InvalidWheelError(
            f"{record_name} lists files the wheel lacks: {', '.join(missing[:5])}"
        )
