"""Real ``edgefleet-agent run`` processes for the fault tests, enrolled with a real server.

:class:`AgentProcess` starts ``python -m agent.cli run --config FILE`` -- optionally under
:mod:`tests.faults.stop_at`, so the process stops itself at an exact step of an update
and the test kills it there with SIGKILL. :func:`write_agent_config` writes the TOML a
device would have after enrollment (with test-sized limits).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.agent.test_kill import REPO
from tests.agent.test_kill import AgentProcess as _KillableAgent
from tests.server.rollouts.harness import PROFILE, wait_for


class AgentProcess(_KillableAgent):
    """An agent process; ``start(stop_at=SPEC)`` runs it under a breakpoint."""

    def start(self, *, stop_at: str | None = None) -> None:  # type: ignore[override]
        command = [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config_file)]
        if stop_at is not None:
            command = [sys.executable, "-m", "tests.faults.stop_at", stop_at, "--", *command[2:]]
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        if stop_at is None:
            wait_for(self.health, 60, f"the agent's local API on port {self.port}")

    def stopped(self) -> bool:
        """Whether the process stopped itself at its breakpoint (state ``T`` in /proc)."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"the agent exited ({self.process.returncode}):\n{self.log_tail()}"
            )
        try:
            stat = Path(f"/proc/{self.process.pid}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] == "T"

    def wait_stopped(self, timeout: float = 60.0, what: str = "the breakpoint") -> None:
        try:
            wait_for(self.stopped, timeout, what)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.log_tail()}") from None

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(10) == -signal.SIGKILL

    def status(self) -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while True:
            try:
                return super().status()
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def write_agent_config(
    folder: Path,
    *,
    device_id: str,
    broker_url: str,
    root_public_b64: str,
    api_port: int,
    block_size: int = 1024,
    health_check_seconds: float = 1.0,
    latency_sla_ms_p95: float | None = None,
    request_timeout_seconds: float = 2.0,
) -> Path:
    """The agent's TOML, as enrollment leaves it, with test-sized limits."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "root.pub").write_text(root_public_b64)
    sla = "" if latency_sla_ms_p95 is None else f"latency_sla_ms_p95 = {latency_sla_ms_p95!r}\n"
    config = folder / "agent.toml"
    config.write_text(
        f"""\
device_id = "{device_id}"
profile = "{PROFILE}"
data_dir = "device"
window_seconds = 1.0
{sla}
[broker]
url = "{broker_url}"

[trust]
root_keys = ["root.pub"]

[http]
port = {api_port}

[download]
block_size = {block_size}
blocks_per_request = 1
request_timeout_seconds = {request_timeout_seconds!r}

[limits]
backoff_min_seconds = 0.05
backoff_max_seconds = 0.5
health_check_max_seconds = {health_check_seconds!r}
"""
    )
    return config
