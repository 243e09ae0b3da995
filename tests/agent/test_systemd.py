"""The agent under systemd (``Type=notify`` with ``WatchdogSec=``): a real agent process
tells the notify socket it is ready, feeds the watchdog from its main loop at half the
interval asked for, and says it is stopping on SIGTERM -- the protocol systemd speaks,
on a real Unix datagram socket. Outside systemd nothing is sent."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.systemd import Notifier
from shared.signing import SigningKey

REPO = Path(__file__).resolve().parents[2]


def receive(sock: socket.socket, until: float, *, stop_at: str | None = None) -> list[str]:
    """Notifications until ``until``, or up to the first that starts with ``stop_at``."""
    messages: list[str] = []
    sock.settimeout(0.2)
    while time.monotonic() < until:
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
        if stop_at is not None and messages[-1].startswith(stop_at):
            break
    return messages


@pytest.mark.slow
def test_a_real_agent_is_ready_feeds_the_watchdog_and_says_it_stops(tmp_path: Path) -> None:
    root = tmp_path / "root.pub"
    root.write_text(SigningKey.generate().public.to_base64())
    config = tmp_path / "agent.toml"
    config.write_text(
        'device_id = "cam-1"\nprofile = "edge-x86_64-litert"\n'
        f'data_dir = "{tmp_path / "data"}"\n'
        f'[trust]\nroot_keys = ["{root}"]\n[http]\nenabled = false\n'
    )
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000", "PATH": "/usr/bin:/bin"}
        agent = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            first = receive(sock, time.monotonic() + 60, stop_at="READY=1")
            assert first and first[-1].startswith("READY=1\nSTATUS=serving"), first
            fed = [m for m in receive(sock, time.monotonic() + 3) if m == "WATCHDOG=1"]
            assert 3 <= len(fed) <= 10  # every ~0.5 s for a 1 s watchdog, not every turn
            agent.send_signal(signal.SIGTERM)
            assert "STOPPING=1" in receive(sock, time.monotonic() + 30, stop_at="STOPPING=1")
            assert agent.wait(30) == 0
        finally:
            if agent.poll() is None:
                agent.kill()
            output = agent.communicate()[0].decode(errors="replace")
    assert "cannot notify systemd" not in output


def test_outside_systemd_nothing_is_sent_and_a_gone_socket_is_no_error(tmp_path: Path) -> None:
    assert Notifier({}).ready("x") is False and Notifier({}).keepalive() is False
    gone = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody"), "WATCHDOG_USEC": "1000000"})
    assert gone.ready("x") is False and gone.keepalive() is False  # logged, never raised


def test_the_watchdog_belongs_to_the_pid_systemd_named(tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "s"), "WATCHDOG_USEC": "2000000"}
    assert Notifier(env).watchdog_interval == 2.0
    assert Notifier(env | {"WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier(env | {"WATCHDOG_USEC": "soon"}).watchdog_interval is None
    assert Notifier({"NOTIFY_SOCKET": "@abstract"}).address == "\0abstract"
