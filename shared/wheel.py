"""The rules an agent wheel meets: one check for the server that publishes it and the
device that installs it, so the server never publishes a wheel the devices refuse.

What always holds for a wheel :func:`inspect_wheel` accepts (``limits`` a
:class:`WheelLimits`):

- It is a zip archive of at most ``limits.max_wheel_bytes`` (checked by
  :func:`open_wheel` unless None), with at most ``limits.max_entries`` entries (folders
  count) and at most ``limits.max_unpacked_bytes`` unpacked.
- Every entry's path is relative and plain: no leading ``/``, no ``\\``, no NUL, no
  drive (``c:``), no empty, ``.`` or ``..`` part; every entry is a regular file or a
  folder (no symlink, device or fifo); no path is in it twice.
- Exactly one top-level ``.dist-info`` folder, named ``edgefleet-<version>.dist-info``
  with a valid agent version (:data:`shared.messages.AgentVersion`) -- the version asked
  for, when one is; no ``.data`` folder (nothing installs outside the packages).
- ``WHEEL`` says ``Root-Is-Purelib: true`` and has at least one tag, every one
  ``*-none-any``: one file installs on every device class.
- ``METADATA`` names the distribution ``edgefleet`` at the folder's version.
- It holds ``agent/__init__.py``, ``agent/cli.py`` (what the launcher runs) and
  ``shared/__init__.py``.
- ``RECORD`` lists every file but itself, each with a ``sha256=`` hash and an empty or
  integer size; it lists nothing the wheel lacks; and each file's bytes match the hash
  and the size listed.

Anything else raises :class:`WheelError` naming the first problem found, with
``reason`` the :class:`~shared.errors.RejectReason` a device reports. The check reads
the archive it is given and does no other I/O; a read fault of the underlying file
(``OSError``) is the caller's to handle. :func:`member_chunks` streams a file of an
accepted wheel and checks it against ``RECORD`` again, so what a device writes is what
was checked.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import re
import stat
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser
from typing import IO

from pydantic import TypeAdapter, ValidationError

from shared.errors import ContractError, RejectReason
from shared.messages import AgentVersion

__all__ = [
    "DEFAULT_LIMITS",
    "DISTRIBUTION",
    "REQUIRED_FILES",
    "RecordEntry",
    "WheelError",
    "WheelFacts",
    "WheelLimits",
    "inspect_wheel",
    "member_chunks",
    "open_wheel",
]

DISTRIBUTION = "edgefleet"
REQUIRED_FILES = ("agent/__init__.py", "agent/cli.py", "shared/__init__.py")
"""The launcher runs ``python -m agent.cli``: a wheel without these is not an agent."""

_DIST_INFO = re.compile(r"^(?P<name>[^/]+)-(?P<version>[^/-]+)\.dist-info$")
_VERSION: TypeAdapter[str] = TypeAdapter(AgentVersion)
_CHUNK = 1 << 16
# What reading a damaged or unsupported zip member raises (CRC error, bad deflate
# stream, truncated entry, encrypted entry, unknown compression method).
_ZIP_FAULTS = (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError)


class WheelError(ContractError, ValueError):
    """A file that is not an agent wheel a device may install; the message says why and
    ``reason`` is the code a device reports in its ``rejected`` event."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class WheelLimits:
    """The bounds of an agent wheel. The defaults are what the server publishes; a device
    takes at least as much by default, so a published wheel is never too big for it."""

    max_wheel_bytes: int | None = 64 * 1024 * 1024
    """The wheel file's size; None: not checked here (a device bounded its download)."""
    max_unpacked_bytes: int = 256 * 1024 * 1024
    max_entries: int = 10_000
    """Entries in the zip, folders included."""

    def __post_init__(self) -> None:
        for name in ("max_wheel_bytes", "max_unpacked_bytes", "max_entries"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"WheelLimits.{name} must be positive, not {value}")


DEFAULT_LIMITS = WheelLimits()


@dataclass(frozen=True, slots=True)
class RecordEntry:
    """One ``RECORD`` row: the urlsafe-base64 SHA-256 (no padding) and the size, if given."""

    sha256: str
    size: int | None


@dataclass(frozen=True, slots=True)
class WheelFacts:
    """What an accepted wheel says about itself."""

    version: str
    dist_info: str
    """``edgefleet-<version>.dist-info``."""
    files: int
    """Files in the wheel (folders not counted)."""
    unpacked_bytes: int
    tags: tuple[str, ...]
    requires_python: str | None
    record: Mapping[str, RecordEntry]
    """Every file but ``RECORD`` itself, by path."""

    @property
    def record_name(self) -> str:
        return f"{self.dist_info}/RECORD"


def open_wheel(file: IO[bytes], *, limits: WheelLimits = DEFAULT_LIMITS) -> zipfile.ZipFile:
    """Open the seekable binary ``file`` as a zip archive of at most
    ``limits.max_wheel_bytes``; the caller closes the archive (and ``file``)."""
    size = file.seek(0, io.SEEK_END)
    file.seek(0)
    if limits.max_wheel_bytes is not None and size > limits.max_wheel_bytes:
        raise WheelError(
            RejectReason.MALFORMED,
            f"the wheel is {size} bytes, over the limit of {limits.max_wheel_bytes}",
        )
    try:
        return zipfile.ZipFile(file)
    except _ZIP_FAULTS as e:
        raise WheelError(
            RejectReason.MALFORMED, f"not a wheel: the file is not a zip archive ({e})"
        ) from e


def inspect_wheel(
    archive: zipfile.ZipFile,
    *,
    expected_version: str | None = None,
    limits: WheelLimits = DEFAULT_LIMITS,
) -> WheelFacts:
    """Check ``archive`` as an agent wheel (see the module docstring) and describe it.

    ``expected_version``: the version the wheel must be (a device passes the version its
    desired state names); None takes the version the wheel states.
    """
    members = _check_entries(archive, limits)
    files = [m for m in members if not m.is_dir()]
    names = {m.filename for m in files}
    dist_info, version = _dist_info(names, expected_version)
    data_dirs = sorted({n.split("/", 1)[0] for n in names if ".data" in n.split("/", 1)[0]})
    if data_dirs:
        raise WheelError(
            RejectReason.WRONG_TARGET,
            f"the wheel installs outside the package folder ({data_dirs[0]}/): "
            "the agent takes pure-Python wheels only",
        )
    wheel = _headers(archive, f"{dist_info}/WHEEL", names)
    if (wheel.get("Root-Is-Purelib") or "").strip().lower() != "true":
        raise WheelError(
            RejectReason.WRONG_TARGET,
            "the wheel is not pure-Python: WHEEL does not say 'Root-Is-Purelib: true', and "
            "one file must install on every device class",
        )
    tags = tuple(str(t).strip() for t in wheel.get_all("Tag") or ())
    if not tags or any(not t.endswith("-none-any") for t in tags):
        raise WheelError(
            RejectReason.WRONG_TARGET,
            f"WHEEL tags {', '.join(tags) or '(none)'} are not all '*-none-any': "
            "the wheel is not pure-Python",
        )
    metadata = _headers(archive, f"{dist_info}/METADATA", names)
    meta_name = metadata.get("Name")
    if meta_name is None or _normalize(str(meta_name)) != DISTRIBUTION:
        raise WheelError(
            RejectReason.WRONG_TARGET,
            f"METADATA names the distribution {meta_name!r}, not {DISTRIBUTION!r}",
        )
    meta_version = metadata.get("Version")
    if meta_version != version:
        raise WheelError(
            RejectReason.WRONG_TARGET,
            f"METADATA says version {meta_version!r} but the folder is {dist_info}",
        )
    for required in REQUIRED_FILES:
        if required not in names:
            package = required.split("/", 1)[0]
            raise WheelError(
                RejectReason.MALFORMED,
                f"the wheel has no {required} ({package}/ package): it is not a wheel of the agent",
            )
    record_name = f"{dist_info}/RECORD"
    record = _record(archive, record_name, names)
    unlisted = sorted(names - set(record) - {record_name})
    if unlisted:
        raise WheelError(
            RejectReason.MALFORMED, f"{unlisted[0]} is in the wheel but not in its RECORD"
        )
    missing = sorted(set(record) - names)
    if missing:
        raise WheelError(
            RejectReason.MALFORMED,
            f"{record_name} lists files the wheel lacks: {', '.join(missing[:5])}",
        )
    requires_python = metadata.get("Requires-Python")
    facts = WheelFacts(
        version=version,
        dist_info=dist_info,
        files=len(files),
        unpacked_bytes=sum(m.file_size for m in files),
        tags=tags,
        requires_python=None if requires_python is None else str(requires_python),
        record=record,
    )
    for member in files:
        for _ in member_chunks(archive, member, facts):
            pass
    return facts


def member_chunks(
    archive: zipfile.ZipFile, member: zipfile.ZipInfo, facts: WheelFacts
) -> Iterator[bytes]:
    """The bytes of the file ``member`` of an accepted wheel, in chunks; never more than
    its stated size. Once all are read, a file listed in ``RECORD`` whose hash or size
    differs raises :class:`WheelError` (a caller writing the chunks drops what it wrote)."""
    name = member.filename
    entry = facts.record.get(name)
    if entry is None and name != facts.record_name:
        raise WheelError(RejectReason.MALFORMED, f"{name} is in the wheel but not in its RECORD")
    digest = hashlib.sha256()
    size = 0
    try:
        with archive.open(member) as source:
            while chunk := source.read(_CHUNK):
                size += len(chunk)
                if size > member.file_size:
                    raise WheelError(RejectReason.MALFORMED, f"{name} is longer than stated")
                digest.update(chunk)
                yield chunk
    except _ZIP_FAULTS as e:
        raise WheelError(RejectReason.MALFORMED, f"{name} is unreadable: {e}") from e
    if entry is None:
        return
    if _b64(digest.digest()) != entry.sha256:
        raise WheelError(
            RejectReason.HASH_MISMATCH, f"{name} does not match its hash in {facts.record_name}"
        )
    if entry.size is not None and entry.size != size:
        raise WheelError(
            RejectReason.LENGTH_MISMATCH,
            f"{name} is {size} bytes; {facts.record_name} says {entry.size}",
        )


# ----------------------------------------------------------------------------- the parts


def _check_entries(archive: zipfile.ZipFile, limits: WheelLimits) -> list[zipfile.ZipInfo]:
    members = archive.infolist()
    if len(members) > limits.max_entries:
        raise WheelError(
            RejectReason.MALFORMED,
            f"the wheel has {len(members)} entries, over the limit of {limits.max_entries}",
        )
    seen: set[str] = set()
    unpacked = 0
    for member in members:
        name = member.filename
        # Split by hand: PurePosixPath drops "." and empty parts, which must be refused.
        segments = (name[:-1] if name.endswith("/") else name).split("/")
        if (
            "\\" in name
            or "\x00" in name
            or ":" in segments[0]
            or any(segment in ("", ".", "..") for segment in segments)
        ):
            raise WheelError(
                RejectReason.MALFORMED,
                f"the wheel holds an unsafe path {name!r}: not a path inside the wheel",
            )
        file_type = stat.S_IFMT(member.external_attr >> 16)  # 0: a zip tool that sets none
        if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise WheelError(RejectReason.MALFORMED, f"{name} is not a plain file")
        key = name.rstrip("/")
        if key in seen:
            raise WheelError(RejectReason.MALFORMED, f"{name} is in the wheel twice")
        seen.add(key)
        unpacked += member.file_size
    if unpacked > limits.max_unpacked_bytes:
        raise WheelError(
            RejectReason.MALFORMED,
            f"the wheel unpacks to {unpacked} bytes, more than the limit of "
            f"{limits.max_unpacked_bytes}",
        )
    return members


def _dist_info(names: set[str], expected_version: str | None) -> tuple[str, str]:
    folders = sorted({n.split("/", 1)[0] for n in names if "/" in n})
    found = [f for f in folders if f.endswith(".dist-info")]
    if not found:
        raise WheelError(
            RejectReason.MALFORMED, "not a wheel: it has no <name>-<version>.dist-info folder"
        )
    if len(found) > 1:
        raise WheelError(
            RejectReason.MALFORMED,
            f"the wheel has more than one .dist-info folder: {', '.join(found)}",
        )
    folder = found[0]
    match = _DIST_INFO.fullmatch(folder)
    if match is None:
        raise WheelError(
            RejectReason.MALFORMED, f"{folder} is not named <name>-<version>.dist-info"
        )
    name, version = match["name"], match["version"]
    if _normalize(name) != DISTRIBUTION:
        raise WheelError(
            RejectReason.WRONG_TARGET,
            f"the wheel is of the distribution {name!r}, not {DISTRIBUTION!r}",
        )
    if expected_version is not None and version != expected_version:
        raise WheelError(
            RejectReason.WRONG_TARGET,
            f"the wheel is version {version!r}; {expected_version!r} was asked for",
        )
    try:
        _VERSION.validate_python(version)
    except ValidationError as e:
        raise WheelError(
            RejectReason.MALFORMED,
            f"{version!r} is not a version an agent can report "
            "(digits first, then letters, digits and . + ! _ -, at most 64 characters)",
        ) from e
    if name != DISTRIBUTION:
        raise WheelError(
            RejectReason.MALFORMED, f"the .dist-info folder must be named {DISTRIBUTION}-{version}"
        )
    return folder, version


def _read_text(archive: zipfile.ZipFile, name: str, names: set[str]) -> str:
    if name not in names:
        raise WheelError(RejectReason.MALFORMED, f"the wheel has no {name}")
    try:
        return archive.read(name).decode("utf-8")
    except UnicodeDecodeError as e:
        raise WheelError(RejectReason.MALFORMED, f"{name} is not UTF-8 text") from e
    except _ZIP_FAULTS as e:
        raise WheelError(RejectReason.MALFORMED, f"{name} is unreadable: {e}") from e


def _headers(archive: zipfile.ZipFile, name: str, names: set[str]) -> Message:
    return HeaderParser().parsestr(_read_text(archive, name, names))


def _record(archive: zipfile.ZipFile, record_name: str, names: set[str]) -> dict[str, RecordEntry]:
    entries: dict[str, RecordEntry] = {}
    for row in csv.reader(io.StringIO(_read_text(archive, record_name, names))):
        if not row:
            continue
        if len(row) != 3:
            raise WheelError(
                RejectReason.MALFORMED,
                f"{record_name}: a row has {len(row)} fields, not 3: {row!r}",
            )
        path, hash_field, size_field = row
        if path == record_name:
            continue
        algorithm, _, value = hash_field.partition("=")
        if algorithm != "sha256" or not value:
            raise WheelError(RejectReason.MALFORMED, f"{record_name} gives {path} no sha256 hash")
        try:
            size = int(size_field) if size_field else None
        except ValueError as e:
            raise WheelError(
                RejectReason.MALFORMED, f"{record_name} gives {path} the size {size_field!r}"
            ) from e
        entries[path] = RecordEntry(sha256=value, size=size)
    return entries


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
