"""The content-addressed artifact store: files named by their SHA-256.

The embedded default is a folder (``<data_dir>/artifacts/ab/abcdef...``); an
S3-compatible store can take its place behind the same methods later.

What always holds:

- A file appears under its hash only complete and verified: it is written to a
  temporary file in the same folder, hashed and size-checked while streaming,
  fsynced, renamed into place, and the folder is fsynced. A crash leaves at most
  a temporary file, never a half-written artifact.
- Storing the same content twice is a no-op; stored files are never modified.
- Size limits are enforced while streaming, not after.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlmodel import Session

from server.errors import ArtifactError, NotFoundError
from server.models import Artifact

__all__ = ["ArtifactStore", "StoredArtifact", "register_artifact"]

_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class StoredArtifact:
    sha256: str
    length: int
    path: Path


class ArtifactStore:
    """A folder of immutable files named by their SHA-256."""

    def __init__(self, root: Path, *, max_bytes: int = 512 * 1024 * 1024) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._tmp = root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise NotFoundError(f"{sha256!r} is not a sha256 hex digest")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put_bytes(self, data: bytes) -> StoredArtifact:
        return self.put_stream(io.BytesIO(data))

    def put_stream(self, stream: BinaryIO) -> StoredArtifact:
        """Store everything ``stream`` yields; refuse it past ``max_bytes``."""
        digest = hashlib.sha256()
        length = 0
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="incoming-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(_CHUNK):
                    length += len(chunk)
                    if length > self.max_bytes:
                        raise ArtifactError(
                            f"artifact is larger than the limit of {self.max_bytes} bytes"
                        )
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha256 = digest.hexdigest()
            final = self.path(sha256)
            if final.is_file():
                tmp.unlink()
            else:
                final.parent.mkdir(exist_ok=True)
                os.chmod(tmp, 0o444)
                os.replace(tmp, final)
                _fsync_dir(final.parent)
            return StoredArtifact(sha256=sha256, length=length, path=final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def open(self, sha256: str) -> BinaryIO:
        try:
            return self.path(sha256).open("rb")
        except FileNotFoundError:
            raise NotFoundError(f"artifact {sha256[:16]}... is not in the store") from None

    def verify(self, sha256: str) -> StoredArtifact:
        """Re-hash a stored file; raise :class:`ArtifactError` if it was damaged."""
        digest = hashlib.sha256()
        length = 0
        with self.open(sha256) as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                length += len(chunk)
        if digest.hexdigest() != sha256:
            raise ArtifactError(f"artifact {sha256[:16]}... is damaged: its content changed")
        return StoredArtifact(sha256=sha256, length=length, path=self.path(sha256))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def register_artifact(session: Session, *, stored: StoredArtifact, media_type: str) -> Artifact:
    """Record a stored file in the index (idempotent: the same hash is one row)."""
    row = session.get(Artifact, stored.sha256)
    if row is not None:
        if row.length != stored.length:
            raise ArtifactError(f"artifact {stored.sha256[:16]}... is indexed with another length")
        return row
    row = Artifact(sha256=stored.sha256, length=stored.length, media_type=media_type)
    session.add(row)
    session.flush()
    return row
