"""The S3 artifact store: the same content-addressed store, kept in any S3-compatible bucket.

Objects are named ``<prefix>/ab/<sha256>`` and never change. Each process keeps a local
folder (:class:`~server.artifacts.store.ArtifactStore` laid out the same way) as a
bounded read-through and write-through cache: callers that need a local
:class:`~pathlib.Path` or a seekable file (training, HTTP range downloads, MQTT
blocks, bundle checks) get the cached copy, so one rollout reads each bundle from the
bucket once per process, not once per device request.

What always holds:

- An object appears under its final key only complete. Uploads rely on S3's own
  atomicity -- a PUT, or a multipart upload (parts of ``multipart_chunk_bytes``) that
  becomes visible only at CompleteMultipartUpload -- not on a temporary key and a
  copy. A crash mid-upload leaves at most an incomplete multipart upload, which is
  invisible, is aborted when the upload fails in-process, and is reaped by the bucket's
  lifecycle rule otherwise (docs/deploy.md).
- Content is hashed and size-checked while it streams in (into a temporary file in the
  cache, before any byte is uploaded); content refused as too large or with the wrong
  hash reaches neither the bucket nor the cache. Content already in the bucket is not
  uploaded again.
- Every byte read from the bucket is hashed on its way into the cache and must hash to
  its key, so a damaged or substituted object is refused (:class:`ArtifactError`),
  never served.
- The cache holds at most ``cache_bytes`` (least recently used files go first, never
  the one just used) and only content that was verified.
- boto3 is imported only when an S3 store is built, so the embedded default needs none
  of it. S3 failures become :class:`NotFoundError` (no such object) or
  :class:`ArtifactStoreUnavailableError` (the store cannot be reached, refuses us, or
  fails), raised from the boto error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from server.artifacts.store import ArtifactStore, StoredArtifact
from server.errors import ArtifactError, ConfigurationError, NotFoundError

__all__ = ["ArtifactStoreUnavailableError", "S3ArtifactStore", "S3Location", "make_s3_client"]

log = logging.getLogger(__name__)

_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


class ArtifactStoreUnavailableError(ArtifactError):
    """The object store cannot be reached, refuses our credentials, or fails; retry later."""

    status_code = 503


@dataclass(frozen=True, slots=True)
class S3Location:
    """A bucket and a key prefix ("" for the bucket's root), as ``s3://bucket/prefix``."""

    bucket: str
    prefix: str = ""

    def key(self, sha256: str) -> str:
        name = f"{sha256[:2]}/{sha256}"
        return f"{self.prefix}/{name}" if self.prefix else name

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"


def make_s3_client(
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    addressing_style: str = "auto",
    verify: bool | str = True,
    max_connections: int = 32,
) -> Any:
    """A boto3 S3 client (thread-safe; share one per process).

    Without ``access_key_id`` the standard AWS chain finds credentials (``AWS_*``
    variables, ``~/.aws``, an instance or pod role); likewise the region.
    """
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:
        raise ConfigurationError(
            "an S3 artifact store needs boto3: install the 's3' extra (pip install 'edgefleet[s3]')"
        ) from e
    session = boto3.session.Session(
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        region_name=region,
    )
    config = Config(
        s3={"addressing_style": addressing_style},
        retries={"mode": "standard", "max_attempts": 5},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=max_connections,
    )
    return session.client("s3", endpoint_url=endpoint_url, config=config, verify=verify)


class S3ArtifactStore(ArtifactStore):
    """Artifacts in an S3 bucket, with ``cache_dir`` as a bounded local cache."""

    def __init__(
        self,
        location: S3Location,
        *,
        client: Any,
        cache_dir: Path,
        cache_bytes: int = 4 * 1024**3,
        max_bytes: int = 512 * 1024 * 1024,
        multipart_chunk_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        if cache_bytes < max_bytes:
            raise ConfigurationError(
                f"the artifact cache ({cache_bytes} bytes) must hold the largest artifact "
                f"({max_bytes} bytes)"
            )
        super().__init__(cache_dir, max_bytes=max_bytes)
        from boto3.s3.transfer import TransferConfig

        self.location = location
        self.cache_bytes = cache_bytes
        self._client = client
        self._transfer = TransferConfig(
            multipart_threshold=multipart_chunk_bytes,
            multipart_chunksize=multipart_chunk_bytes,
            max_concurrency=4,
        )
        self._fill_locks: dict[str, threading.Lock] = {}
        self._fill_locks_guard = threading.Lock()

    def __repr__(self) -> str:
        return f"S3ArtifactStore({self.location}, cache={self.root})"

    # ------------------------------------------------------------------ the interface

    def check(self) -> None:
        """Raise :class:`ConfigurationError` unless the bucket answers to our credentials."""
        try:
            with self._s3_errors("a check of the bucket"):
                self._client.head_bucket(Bucket=self.location.bucket)
        except NotFoundError as e:
            raise ConfigurationError(
                f"artifact store {self.location}: bucket {self.location.bucket!r} does not exist"
            ) from e
        except ArtifactStoreUnavailableError as e:
            raise ConfigurationError(f"artifact store: {e}") from e

    def path(self, sha256: str) -> Path:
        """A local, verified copy of the artifact (fetched into the cache if need be)."""
        return self._cached(sha256)

    def exists(self, sha256: str) -> bool:
        return self._head_length(sha256) is not None

    def length(self, sha256: str) -> int:
        local = self._local_path(sha256)
        with contextlib.suppress(FileNotFoundError):
            return local.stat().st_size
        found = self._head_length(sha256)
        if found is None:
            raise NotFoundError(f"artifact {sha256[:16]}... is not in {self.location}")
        return found

    def put_stream(self, stream: BinaryIO, *, expected_sha256: str | None = None) -> StoredArtifact:
        # Into the cache first: hashed and size-checked while streaming, so the key is
        # known before the upload starts and refused content never leaves this host.
        stored = self._write_verified(stream, expected_sha256=expected_sha256)
        try:
            self._upload(stored)
        except BaseException:
            # The cache holds only what the bucket holds.
            stored.path.unlink(missing_ok=True)
            raise
        _touch(stored.path)
        self._trim(keep=stored.path)
        return stored

    def open(self, sha256: str) -> BinaryIO:
        for _ in range(3):
            try:
                return self._cached(sha256).open("rb")
            except FileNotFoundError:  # evicted by another process between fill and open
                continue
        raise ArtifactStoreUnavailableError(
            f"artifact {sha256[:16]}... keeps leaving the cache at {self.root}; "
            "is EDGEFLEET_ARTIFACTS_CACHE_BYTES too small for the load?"
        )

    def verify(self, sha256: str) -> StoredArtifact:
        """Read the object back from the bucket and re-hash it; the verified bytes replace
        any cached copy. Raise :class:`ArtifactError` if the object was damaged."""
        self._local_path(sha256).unlink(missing_ok=True)
        path = self._cached(sha256)
        return StoredArtifact(sha256=sha256, length=path.stat().st_size, path=path)

    # ------------------------------------------------------------------ the bucket

    @contextlib.contextmanager
    def _s3_errors(self, what: str) -> Iterator[None]:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except ClientError as e:
            error = e.response.get("Error", {})
            code = str(error.get("Code", "")) or str(
                e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
            )
            if code in _NOT_FOUND_CODES:
                raise NotFoundError(f"{what} is not in {self.location}") from e
            raise ArtifactStoreUnavailableError(
                f"{self.location} refused {what}: {code} {error.get('Message', '')}".rstrip()
            ) from e
        except (BotoCoreError, Boto3Error) as e:
            raise ArtifactStoreUnavailableError(f"{self.location}, {what}: {e}") from e

    def _head_length(self, sha256: str) -> int | None:
        key = self.location.key(self._local_path(sha256).name)  # validates the digest
        try:
            with self._s3_errors(f"artifact {sha256[:16]}..."):
                head = self._client.head_object(Bucket=self.location.bucket, Key=key)
        except NotFoundError:
            return None
        return int(head["ContentLength"])

    def _upload(self, stored: StoredArtifact) -> None:
        existing = self._head_length(stored.sha256)
        if existing == stored.length:
            return  # content-addressed: the same key holds the same bytes
        if existing is not None:
            log.warning(
                "artifact store: %s holds %s with a wrong length; replacing it",
                self.location,
                stored.sha256[:16],
                extra={"sha256": stored.sha256, "length": existing, "expected": stored.length},
            )
        with self._s3_errors(f"the upload of artifact {stored.sha256[:16]}..."):
            self._client.upload_file(
                str(stored.path),
                self.location.bucket,
                self.location.key(stored.sha256),
                ExtraArgs={"ContentType": "application/octet-stream"},
                Config=self._transfer,
            )
        log.info(
            "artifact store: uploaded %s to %s",
            stored.sha256[:16],
            self.location,
            extra={"sha256": stored.sha256, "length": stored.length},
        )

    # ------------------------------------------------------------------ the cache

    def _cached(self, sha256: str) -> Path:
        local = self._local_path(sha256)  # validates the digest
        if _touch(local):
            return local
        with self._fill_lock(sha256):
            if _touch(local):  # another thread fetched it meanwhile
                return local
            key = self.location.key(sha256)
            with self._s3_errors(f"artifact {sha256[:16]}..."):
                body = self._client.get_object(Bucket=self.location.bucket, Key=key)["Body"]
                try:
                    # A wrong hash or size raises ArtifactError and leaves nothing cached.
                    stored = self._write_verified(body, expected_sha256=sha256)
                finally:
                    body.close()
        log.info(
            "artifact store: fetched %s from %s into the cache",
            sha256[:16],
            self.location,
            extra={"sha256": sha256, "length": stored.length},
        )
        _touch(stored.path)
        self._trim(keep=stored.path)
        return stored.path

    @contextlib.contextmanager
    def _fill_lock(self, sha256: str) -> Iterator[None]:
        """One fetch per artifact at a time in this process (a rollout's first requests
        all ask for the same new bundle). A rare race can still fetch twice; both land
        the same verified bytes."""
        with self._fill_locks_guard:
            lock = self._fill_locks.setdefault(sha256, threading.Lock())
        with lock:
            yield
        with self._fill_locks_guard:
            if not lock.locked():
                self._fill_locks.pop(sha256, None)

    def _trim(self, *, keep: Path) -> None:
        """Evict the least recently used files until the cache fits ``cache_bytes``."""
        entries: list[tuple[float, int, Path]] = []
        total = 0
        for folder in self.root.iterdir():
            if folder == self._tmp or not folder.is_dir():
                continue
            for file in folder.iterdir():
                try:
                    status = file.stat()
                except FileNotFoundError:
                    continue
                entries.append((status.st_mtime, status.st_size, file))
                total += status.st_size
        if total <= self.cache_bytes:
            return
        evicted = 0
        for _mtime, size, file in sorted(entries):
            if total <= self.cache_bytes:
                break
            if file == keep:
                continue
            file.unlink(missing_ok=True)  # readers that have it open keep reading
            total -= size
            evicted += 1
        log.info(
            "artifact store: evicted %d file(s) from the cache",
            evicted,
            extra={"cache_bytes": total, "bound": self.cache_bytes},
        )


def _touch(path: Path) -> bool:
    """Mark a cached file as just used; whether it is there."""
    now = time.time_ns()  # not the file system's coarse clock: recency must order uses
    try:
        os.utime(path, ns=(now, now))
    except FileNotFoundError:
        return False
    except PermissionError:  # a cache shared with another user: recency is best effort
        return path.is_file()
    return True
