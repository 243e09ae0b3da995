"""The update of the agent itself: its versions on disk, the wheel installer, the switch,
and the state file the agent and its launcher (:mod:`agent.launcher`) share.

Layout under ``<data_dir>/agent/``::

    versions/<version>/     one installed version: a pure-Python wheel of ``edgefleet``,
                            extracted and checked (``.edgefleet-install.json`` inside
                            names the wheel's sha256)
    current                 a symlink to ``versions/<version>``: the version the
                            launcher runs; absent, the base install (the launcher's own)
    state.json              the update in progress and how the last one ended
    tmp/                    wheel downloads and extractions being made
    launcher.lock           held (flock) by the running launcher

``state.json``::

    {"schema": "ef.agent-self-update", "schema_version": 1,
     "pending": {"version": "0.2.0", "previous": "0.1.0", "previous_target": null,
                 "sha256": "…", "health_timeout_s": 300, "deadline": 1795000000.0,
                 "attempts": 1, "manifest_version": 7, "rollout_id": "r-7",
                 "switched_at": "…", "failed": null} | null,
     "previous_target": "0.1.5" | null,   the version kept to go back to (null: base)
     "result": {… an AgentUpdateResult …} | null,
     "result_reported": true,              its events are in the outbox
     "refused": {"version": …, "sha256": …, "manifest_version": …} | null}

The switch, in this order: the version is extracted under ``tmp/``, fsynced and renamed
into ``versions/``; ``pending`` is written; ``current`` is replaced (``os.replace`` of a
new symlink); the folder is fsynced. Killed between the last two, ``pending`` names a
version ``current`` does not: the launcher drops it and the old version, which still
runs, switches again when the desired state comes again. Going back: ``pending.failed``
is written first (so a kill from there on still ends rolled back), then ``current`` moves
back, then ``pending`` is cleared and ``result`` says ``rolled_back``.

What always holds: ``current`` names a complete, checked version or nothing (the base);
no file of a wheel is written outside its version's folder; a wheel that breaks a rule
of :mod:`shared.wheel` (the same check the server ran when it published it: not
pure-Python, another distribution or version, a ``RECORD`` that does not match its
files, …) is refused before anything lands in ``versions/``; ``state.json`` is replaced
atomically, and only by a process while the other side cannot write it (the agent
writes it while it runs, the launcher only while no agent runs); the functions here
decide nothing about time -- callers pass ``now``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from agent.errors import AgentError
from shared.errors import RejectReason
from shared.messages import AgentUpdateResult, UpdateOutcome
from shared.wheel import (
    DISTRIBUTION,
    WheelError,
    WheelFacts,
    WheelLimits,
    inspect_wheel,
    member_chunks,
    open_wheel,
)

__all__ = [
    "DISTRIBUTION",
    "LAUNCHED_ENV",
    "RESTART_EXIT_CODE",
    "AgentHome",
    "Pending",
    "Refusal",
    "SelfUpdateError",
    "SelfUpdateState",
    "WheelRejected",
    "extract_wheel",
]

LAUNCHED_ENV = "EDGEFLEET_LAUNCHER"
"""Set (to the launcher's pid) in the environment of an agent the launcher runs."""
RESTART_EXIT_CODE = 75
"""An agent that switched ``current`` exits with this code: start what it names now."""
STATE_SCHEMA = "ef.agent-self-update"
INSTALL_MARKER = ".edgefleet-install.json"
_VERSION = re.compile(r"^[0-9][0-9A-Za-z.+!_-]{0,63}$")


class SelfUpdateError(AgentError):
    """The self-update folder cannot be read or written."""


class WheelRejected(SelfUpdateError):
    """A wheel that must not be installed; ``reason`` is what the events report."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------- the state file


@dataclass(frozen=True)
class Pending:
    """A switched-to version that has not reported healthy yet."""

    version: str
    previous: str
    """The version that ran before (what events and results name)."""
    previous_target: str | None
    """What ``current`` goes back to: a version in ``versions/``, or None for the base."""
    sha256: str
    health_timeout_s: int
    manifest_version: int
    rollout_id: str | None
    switched_at: str
    attempts: int = 0
    """Starts of this version by a launcher; bounded by ``self_update.max_starts``."""
    deadline: float | None = None
    """Wall-clock epoch seconds by which the current start must commit (informational:
    the launcher judges by its own monotonic clock)."""
    failed: dict[str, str] | None = None
    """``{"reason", "detail"}`` once given up; the rollback is then finished at once."""


@dataclass(frozen=True)
class Refusal:
    """A version that rolled back: not installed again for the same manifest version."""

    version: str
    sha256: str
    manifest_version: int


@dataclass(frozen=True)
class SelfUpdateState:
    pending: Pending | None = None
    previous_target: str | None = None
    result: AgentUpdateResult | None = None
    result_reported: bool = True
    refused: Refusal | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": STATE_SCHEMA,
            "schema_version": 1,
            "pending": None if self.pending is None else asdict(self.pending),
            "previous_target": self.previous_target,
            "result": None if self.result is None else self.result.model_dump(mode="json"),
            "result_reported": self.result_reported,
            "refused": None if self.refused is None else asdict(self.refused),
        }

    @classmethod
    def from_json(cls, data: Any) -> SelfUpdateState:
        if not isinstance(data, dict) or data.get("schema") != STATE_SCHEMA:
            raise ValueError(f"not an {STATE_SCHEMA} document")
        pending = data.get("pending")
        refused = data.get("refused")
        result = data.get("result")
        return cls(
            pending=None if pending is None else Pending(**pending),
            previous_target=data.get("previous_target"),
            result=None if result is None else AgentUpdateResult.model_validate(result),
            result_reported=bool(data.get("result_reported", True)),
            refused=None if refused is None else Refusal(**refused),
        )

    def with_result(self, result: AgentUpdateResult, *, reported: bool) -> SelfUpdateState:
        return replace(self, result=result, result_reported=reported)


# ----------------------------------------------------------------------------- the folder


@dataclass
class AgentHome:
    """``<data_dir>/agent/``: installed versions, the ``current`` link and the state file."""

    data_dir: Path
    root: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.data_dir) / "agent"

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def current_link(self) -> Path:
        return self.root / "current"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def lock_path(self) -> Path:
        return self.root / "launcher.lock"

    def ensure(self) -> None:
        try:
            for folder in (self.versions_dir, self.tmp_dir):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SelfUpdateError(f"cannot create {self.root}: {e}") from e

    def version_dir(self, version: str) -> Path:
        if not _VERSION.fullmatch(version) or version in (".", ".."):
            raise SelfUpdateError(f"{version!r} is not an agent version")
        return self.versions_dir / version

    # -- what runs

    def current(self) -> str | None:
        """The version ``current`` names; None for the base install (no link)."""
        try:
            target = os.readlink(self.current_link)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise SelfUpdateError(f"cannot read {self.current_link}: {e}") from e
        parts = PurePosixPath(target).parts
        if len(parts) != 2 or parts[0] != "versions" or not _VERSION.fullmatch(parts[1]):
            raise SelfUpdateError(f"{self.current_link} points to {target!r}, not a version")
        return parts[1]

    def installed(self, version: str, sha256: str | None = None) -> bool:
        """Whether ``version`` is completely installed (from the wheel ``sha256``, if given)."""
        try:
            marker = json.loads((self.version_dir(version) / INSTALL_MARKER).read_text())
        except (OSError, ValueError):
            return False
        return (
            isinstance(marker, dict)
            and marker.get("version") == version
            and (sha256 is None or marker.get("sha256") == sha256)
        )

    def versions(self) -> list[str]:
        try:
            names = sorted(p.name for p in self.versions_dir.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []
        return [n for n in names if self.installed(n)]

    def switch_to(self, version: str | None) -> None:
        """Point ``current`` at ``version`` (None: the base install), atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            if version is None:
                with contextlib.suppress(FileNotFoundError):
                    self.current_link.unlink()
            else:
                if not self.installed(version):
                    raise SelfUpdateError(f"{version} is not installed; current stays")
                draft = self.root / f".current.{secrets.token_hex(4)}"
                os.symlink(f"versions/{version}", draft)
                try:
                    os.replace(draft, self.current_link)
                except BaseException:
                    draft.unlink(missing_ok=True)
                    raise
            _fsync_dir(self.root)
        except OSError as e:
            raise SelfUpdateError(f"cannot move {self.current_link}: {e}") from e

    # -- the state file

    def read_state(self) -> SelfUpdateState:
        try:
            text = self.state_path.read_text()
        except FileNotFoundError:
            return SelfUpdateState()
        except OSError as e:
            raise SelfUpdateError(f"cannot read {self.state_path}: {e}") from e
        try:
            return SelfUpdateState.from_json(json.loads(text))
        except (ValueError, TypeError) as e:
            raise SelfUpdateError(f"{self.state_path} is damaged: {e}") from e

    def write_state(self, state: SelfUpdateState) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".state.")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(state.to_json(), f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.state_path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            _fsync_dir(self.root)
        except OSError as e:
            raise SelfUpdateError(f"cannot write {self.state_path}: {e}") from e

    # -- install, switch, go back, clean up

    def install(
        self,
        wheel: Path,
        *,
        version: str,
        sha256: str,
        max_unpacked_bytes: int,
        max_files: int,
    ) -> Path:
        """Extract and check ``wheel`` into ``versions/<version>`` (raises
        :class:`WheelRejected`); an existing complete install of the same wheel is kept."""
        self.ensure()
        dest = self.version_dir(version)
        if self.installed(version, sha256):
            return dest
        for stale in self.tmp_dir.glob("install-*"):  # drafts of an install a kill cut short
            _remove(stale)
        draft = Path(tempfile.mkdtemp(dir=self.tmp_dir, prefix=f"install-{version}-"))
        try:
            extract_wheel(
                wheel,
                draft,
                version=version,
                max_unpacked_bytes=max_unpacked_bytes,
                max_files=max_files,
            )
            _write_synced(
                draft / INSTALL_MARKER,
                json.dumps({"version": version, "sha256": sha256}).encode(),
            )
            _fsync_dir(draft)
            if dest.exists() or dest.is_symlink():  # a damaged or other install of it
                if self.current() == version:
                    raise SelfUpdateError(f"{dest} runs now and differs; not replaced")
                _remove(dest)
            os.rename(draft, dest)
            _fsync_dir(self.versions_dir)
        except OSError as e:
            raise SelfUpdateError(f"cannot install {version} into {dest}: {e}") from e
        finally:
            if draft.exists():
                _remove(draft)
        return dest

    def begin_switch(self, pending: Pending, state: SelfUpdateState) -> SelfUpdateState:
        """Record ``pending``, then move ``current`` to its version (see the module docs)."""
        if not self.installed(pending.version, pending.sha256):
            raise SelfUpdateError(f"{pending.version} is not installed; no switch")
        new_state = replace(state, pending=pending)
        self.write_state(new_state)
        self.switch_to(pending.version)
        return new_state

    def roll_back(
        self, state: SelfUpdateState, *, reason: str, detail: str, now: datetime
    ) -> SelfUpdateState:
        """Give the pending version up and go back to the previous one, in the order that
        survives a kill at any step (failed marker, pointer, result)."""
        pending = state.pending
        if pending is None:
            return state
        if pending.failed is None:
            pending = replace(pending, failed={"reason": reason, "detail": detail[:1000]})
            state = replace(state, pending=pending)
            self.write_state(state)
        assert pending.failed is not None
        target = pending.previous_target
        if target is not None and not self.installed(target):
            target = None  # the previous version is gone: the base install is always there
        self.switch_to(target)
        result = AgentUpdateResult(
            manifest_version=pending.manifest_version,
            rollout_id=pending.rollout_id,
            version=pending.version,
            previous_version=pending.previous,
            outcome=UpdateOutcome.ROLLED_BACK,
            reason=pending.failed["reason"],
            detail=pending.failed["detail"],
            at=now,
        )
        state = SelfUpdateState(
            pending=None,
            previous_target=state.previous_target,
            result=result,
            result_reported=False,
            refused=Refusal(pending.version, pending.sha256, pending.manifest_version),
        )
        self.write_state(state)
        _remove(self.version_dir(pending.version))  # nothing of a refused version stays
        return state

    def garbage_collect(self, keep: Iterable[str | None]) -> list[str]:
        """Remove installed versions not in ``keep`` and leftover drafts; returns the removed."""
        kept = {v for v in keep if v is not None}
        removed = []
        try:
            entries = list(self.versions_dir.iterdir())
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if entry.name not in kept:
                _remove(entry)
                removed.append(entry.name)
        with contextlib.suppress(FileNotFoundError):
            for entry in self.tmp_dir.iterdir():
                if entry.name.startswith("install-"):
                    _remove(entry)
        return sorted(removed)


# ----------------------------------------------------------------------------- the wheel


def extract_wheel(
    wheel: Path, dest: Path, *, version: str, max_unpacked_bytes: int, max_files: int
) -> None:
    """Check ``wheel`` as an agent wheel of ``version`` and extract it into the empty
    folder ``dest`` (fsynced).

    The rules are :func:`shared.wheel.inspect_wheel`'s, the server's own when it
    published the wheel, under this device's limits (``max_files`` entries,
    ``max_unpacked_bytes`` unpacked); a refusal is a :class:`WheelRejected` with the
    reason and message of the :class:`~shared.wheel.WheelError`. Each file is checked
    against ``RECORD`` again while it is written, so what lands is what was checked.
    """
    limits = WheelLimits(
        max_wheel_bytes=None,  # the download stopped at limits.agent_wheel_max_bytes
        max_unpacked_bytes=max_unpacked_bytes,
        max_entries=max_files,
    )
    try:
        file = wheel.open("rb")
    except OSError as e:
        raise WheelRejected(RejectReason.MALFORMED, f"not a wheel: {e}") from e
    try:
        with file, open_wheel(file, limits=limits) as archive:
            facts = inspect_wheel(archive, expected_version=version, limits=limits)
            _write_members(archive, facts, dest)
    except WheelError as e:
        raise WheelRejected(e.reason, e.message) from e


def _write_members(archive: zipfile.ZipFile, facts: WheelFacts, dest: Path) -> None:
    """Write the members of the checked wheel into ``dest``: their paths are proven
    relative and plain, so only a symlink already in ``dest`` could lead out."""
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    folders: set[Path] = {root}
    for member in archive.infolist():
        target = (root / member.filename).resolve()
        if target != root and root not in target.parents:
            raise WheelRejected(RejectReason.MALFORMED, f"{member.filename} escapes the folder")
        if member.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            folders.add(target)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        folders.add(target.parent)
        with target.open("xb") as out:
            for chunk in member_chunks(archive, member, facts):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        _fsync_dir(folder)


# ----------------------------------------------------------------------------- disk helpers


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)
