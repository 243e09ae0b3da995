"""Keeping a Mosquitto configuration in step with the fleet's database.

:class:`BrokerConfigWriter` reads the accepted devices' live credentials, renders the
password and ACL files (:func:`server.brokerconf.render.fleet_files`), replaces the
files that changed, and then signals Mosquitto (``SIGHUP`` to the pid in its pid file)
to re-read them. The API calls :meth:`~BrokerConfigWriter.credentials_changed` after
every enrollment of an accepted device and every accept, reject and revoke, so a revoked
device is out of the files -- and, once Mosquitto has reloaded, disconnected and refused
-- before the API answers.

What always holds:

- A file is replaced atomically (temporary file in the same folder, ``fsync``, rename,
  ``fsync`` of the folder), ACL before passwords (see
  :data:`~server.brokerconf.render.FLEET_FILES`), so Mosquitto never reads half a file.
- Renders are serialized: within a process by a lock, across processes (several API
  replicas writing one folder) by ``flock`` on ``.edgefleet.lock`` in that folder. Each
  render reads the database after taking both, so the last render to finish reflects
  the last committed change. A refresh that another render started after it covered is
  skipped.
- Unchanged files are not rewritten and an unchanged configuration sends no signal.
- The service password's hash is kept while it still matches the configured password,
  so restarting the server does not make Mosquitto reload for nothing.
- :attr:`BrokerConfigWriter.rendered_revision` is the fleet's credentials revision
  (:mod:`server.brokerconf.revision`) read before the credentials of the last render:
  the files reflect at least every change up to it, so
  :class:`~server.brokerconf.follow.CredentialsFollower` renders again only when the
  database's number differs.
- A signal goes only to a process that Linux names ``mosquitto`` (a stale pid file whose
  pid now belongs to another program is left alone: ``SIGHUP`` would end most programs).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import inspect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from server.brokerconf.errors import BrokerConfigError
from server.brokerconf.render import (
    CONF_FILE,
    FLEET_FILES,
    SERVICE_PASSWORDS,
    Login,
    MosquittoLayout,
    fleet_files,
    render_mosquitto_conf,
)
from server.brokerconf.revision import TABLE as REVISION_TABLE
from server.brokerconf.revision import credentials_revision
from server.fleet.auth import hash_password, verify_password
from server.fleet.models import Device, DeviceCredential, DeviceStatus

__all__ = [
    "FILE_MODE",
    "BrokerConfigWriter",
    "Refresh",
    "device_logins",
    "signal_reload",
    "write_atomically",
    "write_broker_config",
]

log = logging.getLogger(__name__)

FILE_MODE = 0o640
"""Readable by the group Mosquitto runs in, never by everyone: the files hold hashes."""
_LOCK_FILE = ".edgefleet.lock"


@dataclass(frozen=True, slots=True)
class Refresh:
    """What one refresh did."""

    changed: tuple[str, ...]
    """Names of the files it replaced (empty: the configuration was already current)."""
    signalled: bool
    """Whether Mosquitto was told to reload."""
    devices: int | None
    """Devices in the password file (``None``: skipped, a later render covered it)."""


def device_logins(session: Session, *, exclude: str | None = None) -> list[Login]:
    """The accepted devices' live credentials (username = device id), newest per device.

    ``exclude`` drops a username (the service's own, which no device may hold) with a
    warning.
    """
    rows = session.exec(
        select(DeviceCredential.username, DeviceCredential.password_hash)
        .join(Device, col(Device.id) == col(DeviceCredential.device_id))
        .where(col(Device.status) == DeviceStatus.ACCEPTED.value)
        .where(col(DeviceCredential.revoked_at).is_(None))
        .where(col(DeviceCredential.username) == col(Device.id))
        .order_by(col(DeviceCredential.username), col(DeviceCredential.created_at))
    ).all()
    logins: dict[str, Login] = {}
    for username, password_hash in rows:  # ordered oldest first: the newest wins
        logins[username] = Login(username, password_hash)
    if exclude is not None and logins.pop(exclude, None) is not None:
        log.warning(
            "device %r has the server's own broker username; it is left out of the broker "
            "configuration and cannot log in to Mosquitto",
            exclude,
        )
    return list(logins.values())


def write_atomically(path: Path, text: str, *, mode: int = FILE_MODE) -> None:
    """Replace ``path`` with ``text``: temp file, fsync, rename, fsync of the folder."""
    directory = path.parent
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    folder = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def signal_reload(pid_file: Path) -> bool:
    """Send ``SIGHUP`` to the Mosquitto whose pid ``pid_file`` holds; whether one was sent.

    A missing pid file or a pid that no longer runs means no broker is up (it reads the
    files when it starts): ``False``. A pid file that is not a pid, a process that is
    not Mosquitto, or a process this user may not signal is a
    :class:`BrokerConfigError`.
    """
    try:
        text = pid_file.read_text().strip()
    except FileNotFoundError:
        return False
    except OSError as e:
        raise BrokerConfigError(f"cannot read the broker's pid file {pid_file}: {e}") from e
    if not text.isdigit() or int(text) <= 1:
        raise BrokerConfigError(f"{pid_file} does not hold a process id: {text[:40]!r}")
    pid = int(text)
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return False  # no such process (on Linux)
    except OSError:
        name = None  # no /proc here: trust the pid file
    if name is not None and "mosquitto" not in name:
        raise BrokerConfigError(
            f"{pid_file} names process {pid}, which is {name!r}, not mosquitto (stale pid file?)"
        )
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return False
    except PermissionError as e:
        raise BrokerConfigError(f"not allowed to signal the broker (pid {pid}): {e}") from e
    return True


class BrokerConfigWriter:
    """Renders the fleet's password and ACL files into ``directory`` and reloads Mosquitto.

    ``service_username`` / ``service_password`` are the server's own broker identity;
    ``pid_file`` is Mosquitto's (``None``: write the files, signal nobody).
    """

    def __init__(
        self,
        engine: Engine,
        directory: Path,
        *,
        service_username: str,
        service_password: str,
        pid_file: Path | None = None,
    ) -> None:
        self.engine = engine
        self.directory = directory
        self.service_username = service_username
        self.pid_file = pid_file
        self._service_password = service_password
        self._service_hash: str | None = None
        self._render_lock = threading.Lock()
        self._counter_lock = threading.Lock()
        self._requested = 0
        self._rendered = 0
        self._has_revision: bool | None = None  # a database before migration 0012 has none
        self.rendered_revision: int | None = None
        """The credentials revision the files were last rendered at (``None``: not yet)."""

    def refresh(self) -> Refresh:
        """Bring the files in step with the database now; signal Mosquitto if they changed.

        Raises :class:`BrokerConfigError` when the database cannot be read, a file cannot
        be written, or the broker cannot be signalled.
        """
        with self._counter_lock:
            self._requested += 1
            ticket = self._requested
        with self._render_lock:
            if self._rendered >= ticket:
                return Refresh(changed=(), signalled=False, devices=None)
            with self._counter_lock:
                target = self._requested
            result = self._render()
            self._rendered = target
            return result

    def credentials_changed(self) -> Refresh | None:
        """:meth:`refresh` for hooks that run after a committed change: never raises.

        The change is already committed, so a failure here cannot undo it; it is logged
        as an error (the broker still admits what it admitted before) and ``None`` is
        returned.
        """
        try:
            return self.refresh()
        except BrokerConfigError as e:
            log.error("broker configuration not updated: %s", e)
            return None

    # ----------------------------------------------------------------------- internals

    def _render(self) -> Refresh:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BrokerConfigError(f"cannot create {self.directory}: {e}") from e
        with self._folder_lock():
            try:
                with Session(self.engine) as session:
                    # read before the credentials: they are at least as new as this number
                    revision = self._revision(session)
                    devices = device_logins(session, exclude=self.service_username)
            except SQLAlchemyError as e:
                raise BrokerConfigError(
                    f"cannot read device credentials from the database: {e}"
                ) from e
            files = fleet_files(devices, Login(self.service_username, self._service_login_hash()))
            changed = self._write_changed(files)
            self.rendered_revision = revision
        signalled = False
        if changed and self.pid_file is not None:
            signalled = signal_reload(self.pid_file)
            if not signalled:
                log.warning(
                    "broker configuration updated, but no Mosquitto runs for %s", self.pid_file
                )
        if changed:
            log.info(
                "broker configuration updated",
                extra={"files": list(changed), "devices": len(devices), "reloaded": signalled},
            )
        return Refresh(changed=changed, signalled=signalled, devices=len(devices))

    def _revision(self, session: Session) -> int | None:
        if self._has_revision is None:
            self._has_revision = inspect(session.connection()).has_table(REVISION_TABLE)
        return credentials_revision(session) if self._has_revision else None

    @contextlib.contextmanager
    def _folder_lock(self) -> Iterator[None]:
        try:
            handle = (self.directory / _LOCK_FILE).open("a")
        except OSError as e:
            raise BrokerConfigError(f"cannot write in {self.directory}: {e}") from e
        with handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _service_login_hash(self) -> str:
        if self._service_hash is None:
            self._service_hash = self._kept_service_hash() or hash_password(self._service_password)
        return self._service_hash

    def _kept_service_hash(self) -> str | None:
        try:
            text = (self.directory / SERVICE_PASSWORDS).read_text()
        except OSError:
            return None
        for line in text.splitlines():
            username, sep, encoded = line.partition(":")
            if sep and username == self.service_username:
                return encoded if verify_password(self._service_password, encoded) else None
        return None

    def _write_changed(self, files: Mapping[str, str]) -> tuple[str, ...]:
        changed = []
        for name in FLEET_FILES:
            path = self.directory / name
            try:
                current = path.read_text()
            except FileNotFoundError:
                current = None
            except OSError as e:
                raise BrokerConfigError(f"cannot read {path}: {e}") from e
            if current == files[name]:
                continue
            try:
                write_atomically(path, files[name])
            except OSError as e:
                raise BrokerConfigError(f"cannot write {path}: {e}") from e
            changed.append(name)
        return tuple(changed)


def write_broker_config(
    engine: Engine, layout: MosquittoLayout, *, service_username: str, service_password: str
) -> Refresh:
    """Write ``mosquitto.conf`` for ``layout`` and the fleet's files from the database.

    What ``edgefleet broker-config`` does. A running Mosquitto (``layout.pid_file``) is
    told to reload when anything changed; listeners, TLS files and the pid file take a
    restart to change (Mosquitto does not reload those).
    """
    conf = render_mosquitto_conf(layout)
    directory = layout.directory
    try:
        directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        path = directory / CONF_FILE
        conf_changed = not path.is_file() or path.read_text() != conf
        if conf_changed:
            write_atomically(path, conf)
    except OSError as e:
        raise BrokerConfigError(f"cannot write the broker configuration in {directory}: {e}") from e
    writer = BrokerConfigWriter(
        engine,
        directory,
        service_username=service_username,
        service_password=service_password,
        pid_file=layout.pid_file,
    )
    refresh = writer.refresh()
    if not conf_changed:
        return refresh
    signalled = refresh.signalled
    if not signalled and layout.pid_file is not None:
        signalled = signal_reload(layout.pid_file)
    return Refresh((CONF_FILE, *refresh.changed), signalled, refresh.devices)
