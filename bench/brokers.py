"""Ports and a Mosquitto of the benchmark's own, shared by the bench scripts that need a
real broker (bench/ingest.py, bench/load.py, bench/rollout.py): each passes the
configuration lines its measurement depends on (queue depths, in-flight caps)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["free_port", "mosquitto_binary", "start_mosquitto", "wait_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on port {port} within {timeout:.0f} s")


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


def start_mosquitto(work: Path, settings: str) -> tuple[subprocess.Popen[bytes], int]:
    """A Mosquitto on a free loopback port, anonymous and without persistence, with
    ``settings`` (mosquitto.conf lines) added; SystemExit when none is installed."""
    binary = mosquitto_binary()
    if binary is None:
        raise SystemExit("this benchmark needs a mosquitto binary (apt install mosquitto)")
    port = free_port()
    conf = work / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{settings}"
    )
    process = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.DEVNULL)
    wait_port(port, 10, "mosquitto")
    return process, port
