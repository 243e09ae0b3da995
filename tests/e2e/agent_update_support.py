"""Helpers for the end-to-end test of agent updates: the operator's CLIs, and devices that
are real ``edgefleet-agent launch`` processes enrolled with ``edgefleet-agent enroll``.

- :func:`cli` / :func:`cli_json` -- ``edgefleet ... --server URL`` in-process (Typer's
  runner), the way an operator types it; the token comes from ``EDGEFLEET_TOKEN``.
  :func:`build_release` -- ``edgefleet agent-releases build`` of a checkout as a version.
- :func:`enroll_device` -- enrolls a device with a one-use token (``edgefleet-agent
  enroll`` writes its config), then adds the test-sized settings a device image would
  carry: a 1 s telemetry window, its local API port, a short health check, a quick
  launcher.
- :class:`LaunchedDevice` -- the launcher process of one device (``edgefleet-agent launch
  --config FILE``, logging to a file) and what the test reads from it: the local API
  (``/v1/status``, ``/v1/predict``) and its data folder (:class:`agent.selfupdate.AgentHome`).

What always holds: every process a device starts is stopped by :meth:`LaunchedDevice.stop`
(its agent child dies with the launcher: ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from agent.cli import app as agent_cli
from agent.selfupdate import AgentHome
from server.cli import app as edgefleet
from tests.agent.selfupdate_wheels import REPO

__all__ = ["LaunchedDevice", "build_release", "cli", "cli_json", "enroll_device", "wait_until"]

_runner = CliRunner()


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it returns something truthy (processes, broker and server
    offer no event to wait on)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"{what} not met within {timeout:g} s (last: {last!r})")


def cli(url: str, *args: str, code: int = 0) -> str:
    """``edgefleet ARGS --server URL``; its stdout (asserting its exit code)."""
    result = _runner.invoke(edgefleet, [*args, "--server", url])
    assert result.exit_code == code, f"edgefleet {' '.join(args)}: {result.output}"
    return result.stdout


def cli_json(url: str, *args: str) -> Any:
    return json.loads(cli(url, *args, "--json"))


def build_release(source: Path, out: Path, version: str) -> Path:
    """``edgefleet agent-releases build --source SOURCE --out OUT --version V``: the wheel."""
    args = ["agent-releases", "build", "--source", str(source), "--out", str(out)]
    result = _runner.invoke(edgefleet, [*args, "--version", version])
    assert result.exit_code == 0, result.output
    assert f"agent {version}" in result.stdout, result.stdout
    (wheel,) = out.glob(f"edgefleet-{version}-*.whl")
    return wheel


def _launcher_command(config_file: Path) -> list[str]:
    """``edgefleet-agent launch --config FILE`` -- the venv's console script when there is
    one, else the same entry point through the interpreter."""
    script = Path(sys.executable).parent / "edgefleet-agent"
    found = str(script) if script.is_file() else shutil.which("edgefleet-agent")
    head = [found] if found else [sys.executable, "-m", "agent.cli"]
    return [*head, "launch", "--config", str(config_file)]


class LaunchedDevice:
    """One device: its config, data folder and launcher process."""

    def __init__(self, device_id: str, folder: Path, config_file: Path, port: int) -> None:
        self.device_id = device_id
        self.folder = folder
        self.config_file = config_file
        self.port = port
        self.log_file = folder / "launcher.log"
        self.home = AgentHome(folder / "data")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                _launcher_command(self.config_file),
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        """SIGTERM; the launcher stops its agent and exits 0."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            code = process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
            raise AssertionError(f"{self.device_id}'s launcher ignored SIGTERM") from None
        assert code == 0, f"{self.device_id}'s launcher exited {code}:\n{self.log_tail()}"

    def children(self) -> list[int]:
        """Pids of the launcher's children (its agent)."""
        assert self.process is not None
        pid = self.process.pid
        try:
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        except FileNotFoundError:
            return []
        return [int(p) for p in text.split()]

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- the local API

    def _request(self, method: str, path: str, body: Any = None) -> tuple[int, Any] | None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"{self.device_id}'s launcher exited:\n{self.log_tail()}")
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {} if body is None else {"Content-Type": "application/json"}
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        except OSError:
            return None  # no agent answers right now (starting, or switching versions)
        finally:
            connection.close()

    def status(self) -> dict[str, Any] | None:
        answer = self._request("GET", "/v1/status")
        return answer[1] if answer is not None and answer[0] == 200 else None

    def running(self, version: str, timeout: float = 60.0) -> dict[str, Any]:
        """The status of an agent of ``version`` once one answers."""

        def answer() -> dict[str, Any] | None:
            status = self.status()
            return status if status and status["agent_version"] == version else None

        try:
            found: dict[str, Any] = wait_until(answer, timeout, f"{self.device_id} on {version}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log_tail()}") from None
        return found

    def predict(self, rows: list[list[float]]) -> dict[str, Any]:
        answer = self._request("POST", "/v1/predict", {"instances": rows})
        assert answer is not None, f"{self.device_id}: no agent answers\n{self.log_tail()}"
        status, body = answer
        assert status == 200, f"{self.device_id}: /v1/predict answered {status}: {body}"
        assert isinstance(body, dict)
        return body


def enroll_device(
    url: str,
    *,
    token: str,
    device_id: str,
    profile: str,
    folder: Path,
    root_key: Path,
    port: int,
) -> LaunchedDevice:
    """Enroll ``device_id`` with ``token`` and write its config (not started yet)."""
    folder.mkdir(parents=True)
    config_file = folder / "agent.toml"
    enrolled = _runner.invoke(
        agent_cli,
        [
            "enroll",
            "--server",
            url,
            "--token",
            token,
            "--config",
            str(config_file),
            "--device-id",
            device_id,
            "--profile",
            profile,
            "--data-dir",
            str(folder / "data"),
            "--root-key",
            str(root_key),
        ],
    )
    assert enrolled.exit_code == 0, enrolled.output
    # Test-sized settings (top-level keys before the tables enroll wrote): no traffic, so
    # a model's health check passes on its self-test replay within a second.
    config_file.write_text(
        "window_seconds = 1\n"
        + config_file.read_text()
        + f"""
[http]
port = {port}

[limits]
health_check_max_seconds = 1

[self_update]
max_starts = 2
stop_grace_seconds = 10
restart_backoff_min_seconds = 0.2
restart_backoff_max_seconds = 2
"""
    )
    return LaunchedDevice(device_id, folder, config_file, port)
