"""The agent installs with the ``agent`` extra alone, and its command works there."""

from __future__ import annotations

import json
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_agent_extra_alone_installs_a_working_agent(tmp_path: Path) -> None:
    env_dir = tmp_path / "device-venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"{ROOT}[agent]"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"paho-mqtt", "ai-edge-litert", "numpy", "cryptography", "pydantic"} <= installed
    heavy = {"tensorflow", "keras", "fastapi", "sqlmodel", "sqlalchemy", "uvicorn", "amqtt"}
    assert not heavy & installed
    version = subprocess.run(
        [str(env_dir / "bin" / "edgefleet-agent"), "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert version.returncode == 0 and version.stdout.startswith("edgefleet-agent")
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import agent.cli, shared.trust, shared.bundle, shared.drift; "
            "from ai_edge_litert.interpreter import Interpreter; print('ok')",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert probe.stdout.strip() == "ok", probe.stderr[-2000:]
