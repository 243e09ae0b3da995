"""Following the database from every API process that keeps a broker configuration folder.

The API process that handles an enrollment, accept, reject or revoke re-renders its own
folder at once (:meth:`~server.brokerconf.writer.BrokerConfigWriter.credentials_changed`).
Other API processes -- replicas on other hosts, without the folder -- only change the
database. :class:`CredentialsFollower` closes that gap: in each process with a folder it
polls the fleet's credentials revision (:mod:`server.brokerconf.revision`) and, when the
number differs from the one the files were rendered at, refreshes them (atomically,
then ``SIGHUP`` to Mosquitto when they changed, as the writer always does).

What always holds:

- A poll is one single-row query; the credentials are read and rendered only when the
  revision moved, so an idle fleet of any size costs nothing more.
- Every committed change reaches the folder within one poll interval (plus the render)
  while the database and the folder are usable; a failed poll or render is logged once
  per failure and retried at the next poll, and the broker keeps its current files
  meanwhile.
- The thread never raises and stops within one poll interval of :meth:`stop`.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from server.brokerconf.errors import BrokerConfigError
from server.brokerconf.revision import credentials_revision
from server.brokerconf.writer import BrokerConfigWriter, Refresh

__all__ = ["DEFAULT_POLL_SECONDS", "CredentialsFollower"]

log = logging.getLogger(__name__)

DEFAULT_POLL_SECONDS = 2.0


class CredentialsFollower:
    """Keeps ``writer``'s folder in step with credential changes made by any process."""

    def __init__(
        self, writer: BrokerConfigWriter, *, poll_seconds: float = DEFAULT_POLL_SECONDS
    ) -> None:
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be positive, not {poll_seconds}")
        self.writer = writer
        self.poll_seconds = poll_seconds
        self._failing: str | None = None  # the last failure logged, so it is logged once
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> Refresh | None:
        """One poll: the refresh it made when the revision moved, else ``None``. Never raises."""
        try:
            with Session(self.writer.engine) as session:
                revision = credentials_revision(session)
        except SQLAlchemyError as e:
            self._failed(f"cannot read the credentials revision: {e}")
            return None
        if revision == self.writer.rendered_revision:
            self._recovered()
            return None
        try:
            refresh = self.writer.refresh()
        except BrokerConfigError as e:
            self._failed(f"broker configuration not updated to revision {revision}: {e}")
            return None
        self._recovered()
        if refresh.changed:
            log.info(
                "broker configuration follows the database",
                extra={"revision": self.writer.rendered_revision, "files": list(refresh.changed)},
            )
        return refresh

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("CredentialsFollower already started")
        self._thread = threading.Thread(
            target=self._run, name="broker-credentials-follower", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_seconds + 30)
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.wait(self.poll_seconds):
            try:
                self.check()
            except Exception:  # a bug must not end the following; it shows in the log
                log.exception("broker configuration: a poll failed")

    def _failed(self, message: str) -> None:
        if message != self._failing:
            log.error(message)
            self._failing = message

    def _recovered(self) -> None:
        if self._failing is not None:
            log.info("broker configuration: following the database again")
            self._failing = None
