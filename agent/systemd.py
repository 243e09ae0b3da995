"""systemd's notify protocol (``sd_notify``) without libsystemd: ready, stopping, and the
watchdog keep-alive that lets ``WatchdogSec=`` restart an agent whose main loop hangs.

systemd starts a ``Type=notify`` service with ``$NOTIFY_SOCKET`` (a Unix datagram socket;
a leading ``@`` names one in the abstract namespace) and, with ``WatchdogSec=``,
``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``). Each notification is one datagram of
``KEY=VALUE`` lines.

What always holds:

- Outside systemd (no ``$NOTIFY_SOCKET``) every call does nothing, so the agent runs the
  same under a container runtime, a test or a shell.
- The watchdog is fed only from the caller's loop (:meth:`Notifier.keepalive`), at half
  the interval systemd asked for, and only when ``$WATCHDOG_PID`` is unset or this
  process: a hung loop stops feeding it, and systemd restarts the agent.
- A failure to notify is logged once and never raised: the notify socket going away
  must not stop a device from inferring.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

__all__ = ["Notifier"]

log = logging.getLogger(__name__)


class Notifier:
    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = ("\0" + raw[1:] if raw.startswith("@") else raw) or None
        self.watchdog_interval: float | None = _watchdog_interval(env)
        self._clock = clock
        self._fed_at: float | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send one notification; False when not under systemd or it could not be sent."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self.address)
                s.sendall("\n".join(lines).encode())
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("cannot notify systemd at %s: %s", self.address.lstrip("\0"), e)
            return False
        return True

    def ready(self, status: str) -> bool:
        sent = self.notify("READY=1", f"STATUS={status}")
        self._fed_at = self._clock()
        return sent

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def keepalive(self) -> bool:
        """Feed the watchdog if half its interval has passed since it was last fed."""
        if self.watchdog_interval is None or self.address is None:
            return False
        now = self._clock()
        if self._fed_at is not None and now - self._fed_at < self.watchdog_interval / 2:
            return False
        self._fed_at = now
        return self.notify("WATCHDOG=1")


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process of the service
    try:
        interval = int(usec) / 1e6
    except ValueError:
        return None
    return interval if interval > 0 else None
