"""The promises about what each side may import, and that both commands start."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("tensorflow", "keras", "fastapi", "sqlmodel", "sqlalchemy", "server", "uvicorn", "amqtt")


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    return result.stdout


@pytest.mark.parametrize(
    "module", ["agent", "agent.cli", "shared.trust", "shared.bundle", "shared.drift"]
)
def test_the_agent_side_never_loads_heavy_modules(module: str) -> None:
    out = run_python(
        f"import sys, json, {module}; "
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    assert json.loads(out) == []


def test_shared_imports_neither_side() -> None:
    out = run_python(
        "import sys, json, shared.topics, shared.messages, shared.signing, shared.trust, "
        "shared.bundle, shared.drift, shared.latency, shared.preprocessing; "
        "print(json.dumps(sorted(m for m in ('agent', 'server', 'paho') if m in sys.modules)))"
    )
    assert json.loads(out) == []


@pytest.mark.parametrize("command", ["edgefleet", "edgefleet-agent"])
def test_both_commands_answer_help_and_version(command: str) -> None:
    import shutil

    exe = shutil.which(command, path=str(__import__("pathlib").Path(sys.executable).parent))
    assert exe is not None, f"{command} is not installed in the venv"
    help_text = subprocess.run(
        [exe, "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "Usage" in help_text
    version = subprocess.run(
        [exe, "--version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert version.startswith(command + " ")
