"""The content-addressed artifact store: files named by their SHA-256, kept in a folder.

The folder (``<data_dir>/artifacts/ab/abcdef...``) is the embedded default; the S3
store (:mod:`server.artifacts.s3`) takes its place behind the same methods and uses
this class for its local cache.

What always holds:

- A file appears under its hash only complete and verified: it is written to a
  temporary file in the same folder, hashed and size-checked while streaming,
  fsynced, renamed into place, and the folder is fsynced. A crash leaves at most
  a temporary file, never a half-written artifact.
- Storing the same content twice is a no-op; stored files are never modified.
- Size limits, and the expected hash when the caller names one, are enforced while
  streaming: content refused on either count leaves nothing behind.
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
CHUNK = 1024 * 1024


@dataclass(frozen=True, slots=True)
class StoredArtifact:
    sha256: str
    length: int
    path: Path


class ArtifactStore:
    """A folder of immutable files named by their SHA-256.

    This is also the interface every caller types against: an S3 store is one of these
    whose folder is a bounded local cache in front of a bucket.
    """

    def __init__(self, root: Path, *, max_bytes: int = 512 * 1024 * 1024) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._tmp = root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        """The local file holding ``sha256`` (here: where it is, or would be, stored)."""
        return self._local_path(sha256)

    def exists(self, sha256: str) -> bool:
        return self._local_path(sha256).is_file()

    def length(self, sha256: str) -> int:
        """The stored artifact's size in bytes."""
        try:
            return self._local_path(sha256).stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"artifact {sha256[:16]}... is not in the store") from None

    def put_bytes(self, data: bytes) -> StoredArtifact:
        return self.put_stream(io.BytesIO(data))

    def put_stream(self, stream: BinaryIO, *, expected_sha256: str | None = None) -> StoredArtifact:
        """Store everything ``stream`` yields; refuse it past ``max_bytes``, or when its
        hash is not ``expected_sha256`` (if given)."""
        return self._write_verified(stream, expected_sha256=expected_sha256)

    def open(self, sha256: str) -> BinaryIO:
        """The stored artifact, open for reading (seekable: ranges are read with seek)."""
        try:
            return self._local_path(sha256).open("rb")
        except FileNotFoundError:
            raise NotFoundError(f"artifact {sha256[:16]}... is not in the store") from None

    def verify(self, sha256: str) -> StoredArtifact:
        """Re-hash a stored file; raise :class:`ArtifactError` if it was damaged."""
        digest = hashlib.sha256()
        length = 0
        with self.open(sha256) as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
                length += len(chunk)
        if digest.hexdigest() != sha256:
            raise ArtifactError(f"artifact {sha256[:16]}... is damaged: its content changed")
        return StoredArtifact(sha256=sha256, length=length, path=self._local_path(sha256))

    def _local_path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise NotFoundError(f"{sha256!r} is not a sha256 hex digest")
        return self.root / sha256[:2] / sha256

    def _write_verified(self, stream: BinaryIO, *, expected_sha256: str | None) -> StoredArtifact:
        if expected_sha256 is not None and not _SHA256.fullmatch(expected_sha256):
            raise ArtifactError(f"{expected_sha256!r} is not a sha256 hex digest")
        digest = hashlib.sha256()
        length = 0
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="incoming-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(CHUNK):
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
            if expected_sha256 is not None and sha256 != expected_sha256:
                raise ArtifactError(
                    f"artifact {expected_sha256[:16]}... is damaged: its content hashes to "
                    f"{sha256[:16]}..."
                )
            final = self._local_path(sha256)
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
