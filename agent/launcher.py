"""The launcher: the small, stable process that runs the agent of the ``current`` version
as a child and takes it back when a new version does not prove healthy.

``edgefleet-agent launch --config FILE`` (the systemd unit's ``ExecStart``) runs
``python -P -m agent.cli run --config FILE`` as a child -- with ``PYTHONPATH`` set to
``<data_dir>/agent/versions/<v>`` when ``current`` names a version, so that version's
code shadows the base install (``-P``: the working folder never does), or the base
install itself when it names none. It forwards SIGTERM and SIGINT to the child, waits
``self_update.stop_grace_seconds`` for it, then kills it; it restarts a child that
exited with a backoff (at once after :data:`~agent.selfupdate.RESTART_EXIT_CODE`: the
agent switched ``current`` and asks to be started in its new version).

While an update is pending (``state.json``, :mod:`agent.selfupdate`) the child of the new
version must commit -- clear ``pending`` -- within ``health_timeout_s`` of its start. If
it exits first, the update is rolled back with reason ``agent_crashed``; if the time
passes, it is stopped and rolled back with reason ``agent_unhealthy``; if the launcher
itself is started more than ``self_update.max_starts`` times for it (kills, power cuts),
it is rolled back as ``agent_unhealthy`` too. Then the previous version starts and
reports the rollback (events, ``DeviceState.agent_update``).

systemd: the child inherits ``NOTIFY_SOCKET`` (the unit needs ``NotifyAccess=all``) and
sends READY and the watchdog itself; ``WATCHDOG_PID`` is dropped from its environment
so it does not think the watchdog is another process's. Between children the launcher
feeds the watchdog itself.

What always holds: one launcher per data folder (an flock); the launcher writes
``state.json`` only while no child runs; a child never outlives the launcher (it gets
SIGKILL when the launcher dies: ``PR_SET_PDEATHSIG``); the launcher never imports the
model runtimes, the transport or anything of a versioned folder.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO

from agent import __version__
from agent.config import AgentConfig
from agent.errors import AgentError
from agent.selfupdate import (
    LAUNCHED_ENV,
    RESTART_EXIT_CODE,
    AgentHome,
    Pending,
    SelfUpdateError,
    SelfUpdateState,
)
from agent.systemd import Notifier

__all__ = ["AGENT_CRASHED", "AGENT_UNHEALTHY", "Launcher", "LauncherError"]

log = logging.getLogger(__name__)

AGENT_CRASHED = "agent_crashed"
AGENT_UNHEALTHY = "agent_unhealthy"
_POLL_SECONDS = 0.2
_CONFIG_ERROR_EXIT = 2  # the agent's own exit code for an unusable configuration
_PR_SET_PDEATHSIG = 1


class LauncherError(AgentError):
    """The launcher cannot run (another one holds the folder, the folder is unusable)."""


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Launcher:
    """Runs and supervises the agent child for one config file (see the module docstring)."""

    def __init__(
        self,
        config_path: Path,
        config: AgentConfig,
        *,
        python: str = sys.executable,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = _utc_now,
        notifier: Notifier | None = None,
    ) -> None:
        self.config_path = Path(config_path).resolve()
        self.config = config
        self.home = AgentHome(config.data_dir)
        self.python = python
        self._clock = clock
        self._now = wall_clock
        self.systemd = notifier or Notifier()
        self._stop_signal: int | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._lock_file: IO[bytes] | None = None

    # ------------------------------------------------------------------ the loop

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT; returns the exit code for the launcher."""
        self.home.ensure()
        self._lock()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        settings = self.config.self_update
        failures = 0
        try:
            while not self._stop_requested():
                state = self._recover(self._read_state())
                pending = state.pending
                if pending is not None:
                    pending = replace(pending, attempts=pending.attempts + 1)
                    if pending.attempts > settings.max_starts:
                        self._roll_back(
                            replace(state, pending=pending),
                            AGENT_UNHEALTHY,
                            f"{pending.version} was started {pending.attempts - 1} times and "
                            "never reported healthy (restarts or power cuts during its trial)",
                        )
                        continue
                    pending = replace(
                        pending,
                        deadline=self._now().timestamp() + pending.health_timeout_s,
                    )
                    self.home.write_state(replace(state, pending=pending))
                version = self._current()
                started = self._clock()
                child = self._start_child(version)
                exit_code = self._supervise(child, pending)
                if self._stop_requested():
                    break
                if exit_code is None:  # rolled back by the deadline: start the previous
                    failures = 0
                    continue
                if pending is not None:
                    state = self.home.read_state()
                    if state.pending is not None and state.pending.version == pending.version:
                        self._roll_back(
                            state,
                            AGENT_CRASHED,
                            f"{pending.version} {_describe_exit(exit_code)} before it reported "
                            "healthy",
                        )
                        failures = 0
                        continue
                if exit_code == RESTART_EXIT_CODE:
                    log.info("the agent switched versions; starting %s", self._describe(None))
                    failures = 0
                    continue
                if exit_code == _CONFIG_ERROR_EXIT and self.home.read_state().pending is None:
                    log.error("the agent cannot use its configuration; the launcher stops")
                    return _CONFIG_ERROR_EXIT
                if self._clock() - started >= settings.restart_backoff_max_seconds:
                    failures = 0  # it ran a good while: this is a new run of bad luck
                failures += 1
                delay = min(
                    settings.restart_backoff_max_seconds,
                    settings.restart_backoff_min_seconds * 2 ** (failures - 1),
                )
                log.error(
                    "the agent %s %s; starting it again in %.3g s",
                    version or __version__,
                    _describe_exit(exit_code),
                    delay,
                )
                self._pause(delay)
        finally:
            self._stop_child()
            self.systemd.stopping()
        return 0

    def _supervise(self, child: subprocess.Popen[bytes], pending: Pending | None) -> int | None:
        """Wait for the child to exit (its code), or for a pending update's deadline
        (the child is stopped and the update rolled back: None)."""
        deadline = None if pending is None else self._clock() + pending.health_timeout_s
        while True:
            code = child.poll()
            if code is not None:
                return code
            if self._stop_requested():
                self._stop_child()
                return child.returncode
            if deadline is not None:
                state = self.home.read_state()
                if state.pending is None:
                    log.info("the agent committed its update to %s", self._describe(None))
                    deadline = None
                elif self._clock() >= deadline:
                    self._stop_child()
                    pending = state.pending
                    self._roll_back(
                        state,
                        AGENT_UNHEALTHY,
                        f"{pending.version} did not report healthy within "
                        f"{pending.health_timeout_s} s (connected, state published, models "
                        "self-tested)",
                    )
                    return None
            time.sleep(_POLL_SECONDS)

    # ------------------------------------------------------------------ state

    def _recover(self, state: SelfUpdateState) -> SelfUpdateState:
        """Finish what a kill interrupted: a rollback already decided, or a switch that
        recorded ``pending`` but never moved ``current`` (dropped: the old version runs)."""
        pending = state.pending
        if pending is None:
            return state
        if pending.failed is not None:
            return self._roll_back(state, pending.failed["reason"], pending.failed["detail"])
        if self.home.current() != pending.version:
            log.warning(
                "an update to %s was recorded but current was never moved; it is dropped",
                pending.version,
            )
            state = replace(state, pending=None)
            self.home.write_state(state)
        return state

    def _read_state(self) -> SelfUpdateState:
        """The state file; a damaged one is set aside (the version ``current`` names runs
        as if committed: the launcher must keep some agent running)."""
        try:
            return self.home.read_state()
        except SelfUpdateError as e:
            log.error("%s; starting afresh", e)
            with contextlib.suppress(OSError):
                self.home.state_path.replace(self.home.state_path.with_suffix(".damaged"))
            return SelfUpdateState()

    def _current(self) -> str | None:
        """The version to run; a ``current`` that names no complete version: the base."""
        try:
            version = self.home.current()
            if version is None or self.home.installed(version):
                return version
            problem = f"{self.home.current_link} names {version}, which is not installed"
        except SelfUpdateError as e:
            problem = str(e)
        log.error("%s; running the base install", problem)
        self.home.switch_to(None)
        return None

    def _roll_back(self, state: SelfUpdateState, reason: str, detail: str) -> SelfUpdateState:
        assert state.pending is not None
        log.error("rolling the agent back to %s: %s: %s", state.pending.previous, reason, detail)
        return self.home.roll_back(state, reason=reason, detail=detail, now=self._now())

    # ------------------------------------------------------------------ the child

    def _describe(self, version: str | None) -> str:
        with contextlib.suppress(SelfUpdateError):
            version = version or self.home.current()
        return version or f"the base install ({__version__})"

    def _start_child(self, version: str | None) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env.pop("WATCHDOG_PID", None)  # the child feeds systemd's watchdog itself
        env[LAUNCHED_ENV] = str(os.getpid())
        if version is not None:
            folder = str(self.home.version_dir(version))
            inherited = env.get("PYTHONPATH")
            env["PYTHONPATH"] = folder if not inherited else f"{folder}{os.pathsep}{inherited}"
        command = [self.python, "-P", "-m", "agent.cli", "run", "--config", str(self.config_path)]
        log.info("starting the agent: %s", self._describe(version))
        launcher = os.getpid()
        child = subprocess.Popen(  # our own interpreter and module
            command,
            env=env,
            preexec_fn=lambda: _die_with_parent(launcher),  # one thread here: safe
        )
        self._child = child
        return child

    def _stop_child(self) -> None:
        child = self._child
        if child is None or child.poll() is not None:
            return
        child.send_signal(self._stop_signal or signal.SIGTERM)
        try:
            child.wait(self.config.self_update.stop_grace_seconds)
        except subprocess.TimeoutExpired:
            log.error("the agent did not stop within its grace period; killing it")
            child.kill()
            child.wait()

    def _pause(self, seconds: float) -> None:
        """Wait before a restart, feeding systemd's watchdog (no child feeds it now)."""
        until = self._clock() + seconds
        while not self._stop_requested() and self._clock() < until:
            self.systemd.keepalive()
            time.sleep(min(_POLL_SECONDS, max(0.0, until - self._clock())))

    def _stop_requested(self) -> bool:
        """Set by the signal handler, between any two statements of the loop."""
        return self._stop_signal is not None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop_signal = signum
        child = self._child
        if child is not None and child.poll() is None:
            with contextlib.suppress(OSError):
                child.send_signal(signum)

    def _lock(self) -> None:
        handle = self.home.lock_path.open("ab")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            handle.close()
            raise LauncherError(
                f"another launcher runs for {self.home.root} ({self.home.lock_path} is locked)"
            ) from e
        self._lock_file = handle


def _die_with_parent(launcher: int) -> None:
    """In the child before exec: SIGKILL when the launcher dies (Linux), so a launcher
    killed with SIGKILL leaves no agent behind to fight its successor for the port."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != launcher:  # the launcher died before the line above took effect
        os._exit(1)


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with code {code}"
