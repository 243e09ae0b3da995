"""The on-device model store: verified bundles on disk and which one each model runs.

Layout under ``<data_dir>/models/``::

    bundles/<sha256>.efb    content-addressed bundle files, read-only once in place
    pointers/<model>.json   one pointer file per model name: what runs, what ran before
    probation/<model>.json  an update of that model not yet judged healthy, or given up
    waiting.json            the signed desired state whose staged bundles wait for their
                            install window (absent when nothing waits)
    tmp/                    downloads and file drafts; load_active() keeps only what a
                            download can resume from (<sha256>, .part, .part.json)

A pointer file holds::

    {"schema": "ef.agent.pointer", "schema_version": 1, "model_name": "digits",
     "current":  {"sha256": "…", "length": 12345, "model_version": 7,
                  "target": "edge-arm64-litert", "activated_at": "2026-11-02T10:00:00+00:00"},
     "previous": {… the same fields …} | null}

One file per model (rather than one for all) so that activating one model never
rewrites, and can never damage, another's pointer.

A probation marker (:class:`ProbationMarker`) is written *before* an update is loaded
for its trial and before its pointer moves, and removed once the update passed its
health check. So a marker whose bundle is the current one says "killed, or crashed,
while this version was on probation", and one whose bundle is not current says
"killed while this version was being loaded or self-tested". The marker counts the
agent starts that met it (:meth:`ModelStore.count_restart`), which is how a model
that crashes the process on load or on inference is given up instead of looping
for ever. A given-up marker (``failed`` set) stays as the record that this
artifact is refused for its manifest version.

Staging ahead. A deployment with an install window is staged (:meth:`ModelStore.stage`)
long before its pointer moves. ``waiting.json`` keeps the desired state that asked for
it, exactly as received (:meth:`ModelStore.keep_waiting`), so an agent that restarts
with no broker still knows what waits and when; the agent verifies it again by the
trust rules, and the bundle again, before it acts on either. A staged bundle no
pointer names is removed only by :meth:`ModelStore.garbage_collect`, which spares what
the caller says still waits.

What always holds, whenever the process is killed:

- A file in ``bundles/`` is complete: it was written and fsynced under ``tmp/``, then
  renamed into place and the directory fsynced (:meth:`ModelStore.stage`). Its name is
  the sha256 the caller verified while downloading.
- A pointer file is either the old one or the new one, never a mix: it is written
  under ``tmp/``, fsynced, renamed over the old one, and the directory fsynced
  (:meth:`ModelStore.activate`). A pointer only ever names bundles already in place,
  so moving it is the last step of an activation. Probation markers are written the
  same way.
- At start, :meth:`ModelStore.load_active` re-reads every current bundle and verifies
  length, sha256 and signature again (:func:`shared.bundle.read_bundle`). A current
  bundle that fails falls back to the previous one, which then becomes current on
  disk; why is kept in :attr:`ModelStore.load_problems`. A model is missing from the
  result only when neither verifies.
- ``tmp/`` holds nothing after :meth:`ModelStore.clean_tmp` but downloads in progress
  (``<sha256>.part`` and its ``.part.json`` sidecar) and finished ones not yet staged
  (``<sha256>``): a restarted agent resumes those instead of fetching them again. The
  downloader re-hashes them before it trusts a byte (``agent.download``).

One agent process owns a store; a lock serializes its own pointer updates. Pure
path and file I/O: no network, and no clock but the injected ``now``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from shared.bundle import DEFAULT_MAX_BUNDLE_BYTES, Bundle, read_bundle
from shared.errors import ContractError
from shared.signing import VerifyKey

__all__ = [
    "BundleRef",
    "CorruptPointerError",
    "MissingBundleError",
    "ModelStore",
    "NoPreviousVersionError",
    "ProbationMarker",
    "StoreError",
]

POINTER_SCHEMA = "ef.agent.pointer"
POINTER_SCHEMA_VERSION = 1
PROBATION_SCHEMA = "ef.agent.probation"
PROBATION_SCHEMA_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # as BundleManifest.model_name
_BUNDLE_FILE = re.compile(r"^([0-9a-f]{64})\.efb$")
# What agent.download leaves in tmp/ and resumes from: <sha256>, <sha256>.part(.json)
_DOWNLOAD_FILE = re.compile(r"^([0-9a-f]{64})(?:\.part|\.part\.json)?$")
_CHUNK = 1024 * 1024

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- errors


class StoreError(AgentError):
    """Root of the model store's errors."""


class CorruptPointerError(StoreError):
    """A pointer file cannot be read or does not hold a valid pointer."""


class MissingBundleError(StoreError):
    """A bundle is not staged (or not with the length it should have)."""


class NoPreviousVersionError(StoreError):
    """A rollback was asked for a model that keeps no previous version."""


# ----------------------------------------------------------------------------- refs


@dataclass(frozen=True, slots=True)
class BundleRef:
    """One staged bundle as a pointer names it."""

    sha256: str
    length: int
    model_version: int
    target: str
    activated_at: datetime | None = None

    def __post_init__(self) -> None:
        if not _SHA256.fullmatch(self.sha256):
            raise ValueError("sha256 must be 64 lowercase hex characters")
        if self.length <= 0 or self.model_version < 1:
            raise ValueError("length must be positive and model_version at least 1")

    def to_dict(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "length": self.length,
            "model_version": self.model_version,
            "target": self.target,
            "activated_at": self.activated_at.isoformat() if self.activated_at else None,
        }

    @classmethod
    def from_dict(cls, data: Any) -> BundleRef:
        if not isinstance(data, dict):
            raise TypeError(f"a bundle reference is an object, not {type(data).__name__}")
        activated_at = data.get("activated_at")
        return cls(
            sha256=str(data["sha256"]),
            length=_int(data["length"]),
            model_version=_int(data["model_version"]),
            target=str(data["target"]),
            activated_at=datetime.fromisoformat(activated_at) if activated_at else None,
        )

    def same_bundle(self, other: BundleRef | None) -> bool:
        return other is not None and (self.sha256, self.length) == (other.sha256, other.length)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class _Pointer:
    current: BundleRef
    previous: BundleRef | None


@dataclass(frozen=True, slots=True)
class ProbationMarker:
    """One model's update that has not passed its health check (see the module docstring).

    ``restarts``: agent starts that found this marker. ``failed``: why the update was
    given up (then the marker is the record that ``ref`` is refused while
    ``manifest_version`` is the accepted manifest); None while it is on trial.
    """

    model_name: str
    ref: BundleRef
    manifest_version: int
    rollout_id: str | None = None
    restarts: int = 0
    failed: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": PROBATION_SCHEMA,
            "schema_version": PROBATION_SCHEMA_VERSION,
            "model_name": self.model_name,
            "bundle": self.ref.to_dict(),
            "manifest_version": self.manifest_version,
            "rollout_id": self.rollout_id,
            "restarts": self.restarts,
            "failed": self.failed,
        }

    @classmethod
    def from_dict(cls, data: Any) -> ProbationMarker:
        if not isinstance(data, dict):
            raise TypeError(f"a probation marker is an object, not {type(data).__name__}")
        schema = (data.get("schema"), data.get("schema_version"))
        if schema != (PROBATION_SCHEMA, PROBATION_SCHEMA_VERSION):
            raise ValueError(f"schema {schema[0]!r} v{schema[1]!r} is not {PROBATION_SCHEMA} v1")
        rollout_id, failed = data.get("rollout_id"), data.get("failed")
        return cls(
            model_name=str(data["model_name"]),
            ref=BundleRef.from_dict(data["bundle"]),
            manifest_version=_int(data["manifest_version"]),
            rollout_id=None if rollout_id is None else str(rollout_id),
            restarts=_int(data["restarts"]),
            failed=None if failed is None else str(failed),
        )


# ----------------------------------------------------------------------------- file helpers


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # Windows cannot open a directory; its renames are journaled
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- the store


class ModelStore:
    """Bundles on disk, one pointer per model; see the module docstring for the layout."""

    def __init__(
        self,
        data_dir: Path,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
    ) -> None:
        self.root = Path(data_dir) / "models"
        self.bundles_dir = self.root / "bundles"
        self.pointers_dir = self.root / "pointers"
        self.probation_dir = self.root / "probation"
        self.tmp_dir = self.root / "tmp"
        self.waiting_path = self.root / "waiting.json"
        self._now = now
        self._max_bundle_bytes = max_bundle_bytes
        self._lock = threading.Lock()
        self.load_problems: dict[str, list[str]] = {}
        """Filled by :meth:`load_active`: model name -> why a bundle was not loaded."""
        try:
            created = not self.root.exists()
            for folder in (self.bundles_dir, self.pointers_dir, self.probation_dir, self.tmp_dir):
                folder.mkdir(parents=True, exist_ok=True)
            if created:
                _fsync_dir(self.root)
                _fsync_dir(self.root.parent)
        except OSError as e:
            raise StoreError(f"cannot create the model store under {self.root}: {e}") from e

    # -- paths

    def bundle_path(self, sha256: str) -> Path:
        if not _SHA256.fullmatch(sha256):
            raise StoreError(f"{sha256!r} is not a sha256 (64 lowercase hex characters)")
        return self.bundles_dir / f"{sha256}.efb"

    def _pointer_path(self, model_name: str) -> Path:
        if not _MODEL_NAME.fullmatch(model_name):
            raise StoreError(f"{model_name!r} is not a valid model name")
        return self.pointers_dir / f"{model_name}.json"

    def temp_path(self, prefix: str = "download-") -> Path:
        """A new empty file under ``tmp/`` to download into (same filesystem as bundles)."""
        try:
            fd, name = tempfile.mkstemp(prefix=prefix, suffix=".part", dir=self.tmp_dir)
        except OSError as e:
            raise StoreError(f"cannot create a temporary file in {self.tmp_dir}: {e}") from e
        os.close(fd)
        return Path(name)

    # -- staging

    def stage(self, temp_path: Path, *, sha256: str, length: int) -> Path:
        """Move a downloaded, already verified file into ``bundles/`` durably; idempotent.

        ``temp_path`` must come from :meth:`temp_path`. It is fsynced, made read-only and
        renamed over ``bundles/<sha256>.efb`` (a fresh verified copy replaces whatever
        was there), then the directory is fsynced.
        """
        target = self.bundle_path(sha256)
        temp_path = Path(temp_path)
        if temp_path.resolve().parent != self.tmp_dir.resolve():
            raise StoreError(f"{temp_path} is not in {self.tmp_dir}; use ModelStore.temp_path()")
        try:
            size = temp_path.stat().st_size
            if size != length:
                raise MissingBundleError(
                    f"{temp_path.name} is {size} bytes, the bundle {sha256[:12]} is {length}"
                )
            _fsync_file(temp_path)
            temp_path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
            os.replace(temp_path, target)
            _fsync_dir(self.bundles_dir)
        except OSError as e:
            raise StoreError(f"cannot stage bundle {sha256[:12]}: {e}") from e
        return target

    def has_bundle(self, sha256: str, length: int) -> bool:
        try:
            return self.bundle_path(sha256).stat().st_size == length
        except FileNotFoundError:
            return False

    # -- pointers

    def models(self) -> list[str]:
        """The model names that have a pointer, sorted."""
        return sorted(
            p.stem for p in self.pointers_dir.glob("*.json") if _MODEL_NAME.fullmatch(p.stem)
        )

    def _read_pointer(self, model_name: str) -> _Pointer | None:
        path = self._pointer_path(model_name)
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise CorruptPointerError(f"the pointer of {model_name} is unreadable: {e}") from e
        try:
            if (data.get("schema"), data.get("schema_version")) != (
                POINTER_SCHEMA,
                POINTER_SCHEMA_VERSION,
            ):
                raise ValueError(
                    f"schema {data.get('schema')!r} v{data.get('schema_version')!r} is not "
                    f"{POINTER_SCHEMA} v{POINTER_SCHEMA_VERSION}"
                )
            if data.get("model_name") != model_name:
                raise ValueError(f"it names the model {data.get('model_name')!r}")
            previous = data.get("previous")
            return _Pointer(
                current=BundleRef.from_dict(data["current"]),
                previous=BundleRef.from_dict(previous) if previous is not None else None,
            )
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise CorruptPointerError(f"the pointer of {model_name} is not valid: {e}") from e

    def _write_pointer(self, model_name: str, pointer: _Pointer) -> None:
        body = {
            "schema": POINTER_SCHEMA,
            "schema_version": POINTER_SCHEMA_VERSION,
            "model_name": model_name,
            "current": pointer.current.to_dict(),
            "previous": pointer.previous.to_dict() if pointer.previous else None,
        }
        self._write_json(self._pointer_path(model_name), body, f"the pointer of {model_name}")

    def _write_json(self, path: Path, body: dict[str, Any], what: str) -> None:
        self._write_bytes(path, json.dumps(body, indent=1, sort_keys=True).encode(), what)

    def _write_bytes(self, path: Path, data: bytes, what: str) -> None:
        """Replace ``path`` atomically: draft in tmp/, fsync, rename, fsync the folder."""
        draft = self.temp_path(prefix=f"{path.parent.name}-{path.stem}-")
        try:
            with draft.open("wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(draft, path)
            _fsync_dir(path.parent)
        except OSError as e:
            with contextlib.suppress(OSError):
                draft.unlink()
            raise StoreError(f"cannot write {what}: {e}") from e

    def current(self, model_name: str) -> BundleRef | None:
        pointer = self._read_pointer(model_name)
        return pointer.current if pointer else None

    def previous(self, model_name: str) -> BundleRef | None:
        pointer = self._read_pointer(model_name)
        return pointer.previous if pointer else None

    def activate(self, model_name: str, ref: BundleRef) -> BundleRef:
        """Make a staged bundle current; the old current becomes previous. Returns the ref.

        Activating what is already current changes nothing. The bundle must be staged
        with its length (its hash was checked when it was downloaded, and is checked
        again at every start).
        """
        if not self.has_bundle(ref.sha256, ref.length):
            raise MissingBundleError(
                f"bundle {ref.sha256[:12]} ({ref.length} bytes) is not staged; stage it first"
            )
        with self._lock:
            old = self._read_pointer(model_name)
            if old is not None and ref.same_bundle(old.current):
                return old.current
            stamped = replace(ref, activated_at=self._now())
            previous = old.current if old is not None else None
            self._write_pointer(model_name, _Pointer(current=stamped, previous=previous))
            return stamped

    def rollback(self, model_name: str) -> BundleRef:
        """Make the previous version current again; the rolled-back one becomes previous.

        Keeping it means the pointer still names two complete versions (a later start
        can still fall back if one is damaged); the next activation replaces it.
        """
        with self._lock:
            old = self._read_pointer(model_name)
            if old is None or old.previous is None:
                raise NoPreviousVersionError(
                    f"{model_name} has no previous version to roll back to"
                )
            restored = replace(old.previous, activated_at=self._now())
            self._write_pointer(model_name, _Pointer(current=restored, previous=old.current))
            return restored

    def deactivate(self, model_name: str) -> None:
        """Remove a model's pointer (the desired state no longer lists it); bundles stay
        until :meth:`garbage_collect`."""
        path = self._pointer_path(model_name)
        with self._lock:
            try:
                path.unlink(missing_ok=True)
                _fsync_dir(self.pointers_dir)
            except OSError as e:
                raise StoreError(f"cannot remove the pointer of {model_name}: {e}") from e

    # -- probation markers

    def _probation_path(self, model_name: str) -> Path:
        if not _MODEL_NAME.fullmatch(model_name):
            raise StoreError(f"{model_name!r} is not a valid model name")
        return self.probation_dir / f"{model_name}.json"

    def probation(self, model_name: str) -> ProbationMarker | None:
        """The model's probation marker; an unreadable one is removed and None returned.

        Markers are written atomically, so an unreadable one means a damaged disk: the
        safe reading is "no update in progress" (the pointer alone says what runs).
        """
        path = self._probation_path(model_name)
        try:
            marker = ProbationMarker.from_dict(json.loads(path.read_bytes()))
            if marker.model_name != model_name:
                raise ValueError(f"it names the model {marker.model_name!r}")
            return marker
        except FileNotFoundError:
            return None
        except (OSError, AttributeError, KeyError, TypeError, ValueError) as e:
            log.warning("the probation marker of %s is unreadable; removed: %s", model_name, e)
            with contextlib.suppress(OSError):
                path.unlink()
            return None

    def probations(self) -> list[ProbationMarker]:
        """Every probation marker, by model name."""
        names = sorted(
            p.stem for p in self.probation_dir.glob("*.json") if _MODEL_NAME.fullmatch(p.stem)
        )
        return [m for m in (self.probation(name) for name in names) if m is not None]

    def _write_probation(self, marker: ProbationMarker) -> ProbationMarker:
        self._write_json(
            self._probation_path(marker.model_name),
            marker.to_dict(),
            f"the probation marker of {marker.model_name}",
        )
        return marker

    def begin_probation(
        self,
        model_name: str,
        ref: BundleRef,
        *,
        manifest_version: int,
        rollout_id: str | None = None,
    ) -> ProbationMarker:
        """Mark ``ref`` as being installed, before it is loaded and before its pointer moves.

        The same artifact again (an install retried after a restart) keeps its count
        of restarts; anything else starts at zero.
        """
        with self._lock:
            old = self.probation(model_name)
            restarts = 0
            if old is not None and old.failed is None and ref.same_bundle(old.ref):
                restarts = old.restarts
            return self._write_probation(
                ProbationMarker(model_name, ref, manifest_version, rollout_id, restarts)
            )

    def count_restart(self, model_name: str) -> ProbationMarker:
        """One more agent start met this model's (open) probation; the updated marker."""
        with self._lock:
            marker = self.probation(model_name)
            if marker is None:
                raise StoreError(f"{model_name} has no probation marker")
            return self._write_probation(replace(marker, restarts=marker.restarts + 1))

    def fail_probation(self, model_name: str, reason: str) -> ProbationMarker:
        """Record that the update was given up (and why); written before it is rolled back."""
        with self._lock:
            marker = self.probation(model_name)
            if marker is None:
                raise StoreError(f"{model_name} has no probation marker")
            return self._write_probation(replace(marker, failed=reason or "failed"))

    def end_probation(self, model_name: str) -> None:
        """Remove the model's marker: the update passed, or the record is no longer needed."""
        path = self._probation_path(model_name)
        with self._lock:
            try:
                if path.exists():
                    path.unlink()
                    _fsync_dir(self.probation_dir)
            except OSError as e:
                raise StoreError(f"cannot remove the probation marker of {model_name}: {e}") from e

    # -- the desired state that waits for its install window

    def keep_waiting(self, payload: bytes) -> None:
        """Keep the desired state whose staged bundles wait (replaces any kept before)."""
        try:
            if self.waiting_path.read_bytes() == payload:
                return
        except OSError:
            pass
        self._write_bytes(self.waiting_path, payload, "the waiting desired state")

    def waiting(self) -> bytes | None:
        """The kept desired state, as received (not verified here), or None."""
        try:
            return self.waiting_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"cannot read the waiting desired state: {e}") from e

    def forget_waiting(self) -> None:
        """Nothing waits any more: remove the kept desired state."""
        try:
            if self.waiting_path.exists():
                self.waiting_path.unlink()
                _fsync_dir(self.root)
        except OSError as e:
            raise StoreError(f"cannot remove the waiting desired state: {e}") from e

    # -- start-up

    def _verify(
        self,
        model_name: str,
        ref: BundleRef,
        trusted_keys: Mapping[str, VerifyKey] | Iterable[VerifyKey],
        threshold: int,
    ) -> Bundle:
        path = self.bundle_path(ref.sha256)
        try:
            with path.open("rb") as f:
                bundle = read_bundle(
                    f,
                    trusted_keys=trusted_keys,
                    threshold=threshold,
                    expected_sha256=ref.sha256,
                    expected_length=ref.length,
                    max_bytes=self._max_bundle_bytes,
                )
        except FileNotFoundError as e:
            raise MissingBundleError(f"bundle {ref.sha256[:12]} is missing") from e
        except OSError as e:
            raise StoreError(f"bundle {ref.sha256[:12]} is unreadable: {e}") from e
        manifest = bundle.manifest
        found = (manifest.model_name, manifest.model_version, manifest.target)
        named = (model_name, ref.model_version, ref.target)
        if found != named:
            raise StoreError(
                f"bundle {ref.sha256[:12]} is {found[0]} v{found[1]} for {found[2]}, the "
                f"pointer names {named[0]} v{named[1]} for {named[2]}"
            )
        return bundle

    def clean_tmp(self, keep: Iterable[str] | None = None) -> None:
        """Remove what a kill left in ``tmp/``: drafts, temp files, unknown entries.

        Downloads (``<sha256>``, ``<sha256>.part``, ``<sha256>.part.json``) stay, so a
        restarted agent resumes them: all of them when ``keep`` is None, else only
        those of the sha256s in ``keep`` (what the accepted desired state still asks for).
        """
        wanted = None if keep is None else set(keep)
        for entry in self.tmp_dir.iterdir():
            download = _DOWNLOAD_FILE.fullmatch(entry.name)
            if download and entry.is_file() and (wanted is None or download.group(1) in wanted):
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

    def load_active(
        self,
        *,
        trusted_keys: Mapping[str, VerifyKey] | Iterable[VerifyKey],
        threshold: int = 1,
        read_only: bool = False,
    ) -> dict[str, Bundle]:
        """At start: every model's current bundle, re-verified; previous where current fails.

        Cleans ``tmp/`` first (:meth:`clean_tmp`: resumable downloads stay) and records a
        fallback to the previous version in the pointer. ``read_only`` does neither: for
        a reader beside a running agent (``edgefleet-agent predict``), which must not
        touch files the agent may be writing. Every problem met is recorded in
        :attr:`load_problems`.
        """
        keys = dict(trusted_keys) if isinstance(trusted_keys, Mapping) else list(trusted_keys)
        if not read_only:
            self.clean_tmp()
        self.load_problems = {}
        loaded: dict[str, Bundle] = {}
        for model_name in self.models():
            problems = self.load_problems.setdefault(model_name, [])
            with self._lock:
                try:
                    pointer = self._read_pointer(model_name)
                except CorruptPointerError as e:
                    problems.append(str(e))
                    continue
                if pointer is None:  # removed since it was listed
                    continue
                try:
                    loaded[model_name] = self._verify(model_name, pointer.current, keys, threshold)
                    continue
                except (StoreError, ContractError) as e:
                    problems.append(f"current v{pointer.current.model_version}: {_reason(e)}")
                if pointer.previous is None:
                    problems.append("no previous version to fall back to")
                    continue
                try:
                    bundle = self._verify(model_name, pointer.previous, keys, threshold)
                except (StoreError, ContractError) as e:
                    problems.append(f"previous v{pointer.previous.model_version}: {_reason(e)}")
                    continue
                # Persist the fallback, so the pointer says what runs; the damaged bundle
                # is no longer referenced and goes at the next garbage collection.
                problems.append(f"fell back to previous v{pointer.previous.model_version}")
                if read_only:
                    loaded[model_name] = bundle
                    continue
                try:
                    self._write_pointer(
                        model_name, _Pointer(current=pointer.previous, previous=None)
                    )
                except StoreError as e:  # serve the good bundle anyway; retried next start
                    problems.append(str(e))
                loaded[model_name] = bundle
        self.load_problems = {name: p for name, p in self.load_problems.items() if p}
        return loaded

    # -- housekeeping

    def garbage_collect(self, keep: Iterable[str] = ()) -> list[str]:
        """Remove bundles no pointer names (current or previous) and not in ``keep``.

        ``keep``: sha256s to spare, e.g. a bundle staged but not yet activated. Returns
        the sha256s removed. While any pointer cannot be read, nothing is removed: it
        raises :class:`StoreError`.
        """
        with self._lock:
            referenced = set(keep)
            for model_name in self.models():
                try:
                    pointer = self._read_pointer(model_name)
                except CorruptPointerError as e:
                    raise StoreError(f"not collecting garbage: {e}") from e
                if pointer is not None:
                    referenced.add(pointer.current.sha256)
                    if pointer.previous is not None:
                        referenced.add(pointer.previous.sha256)
            removed = []
            for entry in sorted(self.bundles_dir.iterdir()):
                match = _BUNDLE_FILE.fullmatch(entry.name)
                if match and match.group(1) not in referenced:
                    try:
                        entry.unlink()
                    except OSError as e:
                        raise StoreError(f"cannot remove {entry.name}: {e}") from e
                    removed.append(match.group(1))
            if removed:
                _fsync_dir(self.bundles_dir)
            return removed


def _reason(error: Exception) -> str:
    reason = getattr(error, "reason", None)
    return f"{reason}: {error}" if reason else f"{type(error).__name__}: {error}"
