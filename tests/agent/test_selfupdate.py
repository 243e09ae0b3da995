"""The agent's own updates, on disk: a wheel is checked and installed beside the running
version, ``current`` moves atomically, a rollback survives a kill at any step, and the
code that runs from a version's folder reports that version.

Real wheels (zips of this checkout's packages with a correct RECORD, built in
``selfupdate_wheels``), real folders, a real interpreter for the version check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.launcher import Launcher, LauncherError
from agent.selfupdate import (
    INSTALL_MARKER,
    AgentHome,
    Pending,
    SelfUpdateError,
    SelfUpdateState,
    WheelRejected,
    extract_wheel,
)
from shared.messages import UpdateOutcome
from shared.signing import SigningKey
from shared.wheel import DEFAULT_LIMITS
from tests.agent.selfupdate_wheels import build_wheel

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
LIMITS = {"max_unpacked_bytes": 64 * 1024 * 1024, "max_files": 5000}


def write(tmp_path: Path, data: bytes, name: str = "agent.whl") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def install(home: AgentHome, wheel: Path, version: str, sha256: str = "a" * 64) -> Path:
    return home.install(wheel, version=version, sha256=sha256, **LIMITS)


def pending(version: str = "0.2.0", previous_target: str | None = None) -> Pending:
    return Pending(
        version=version,
        previous="0.1.0",
        previous_target=previous_target,
        sha256="a" * 64,
        health_timeout_s=30,
        manifest_version=7,
        rollout_id="r-7",
        switched_at=NOW.isoformat(),
    )


def test_a_good_wheel_is_installed_beside_and_its_code_reports_its_version(tmp_path: Path) -> None:
    home = AgentHome(tmp_path / "data")
    folder = install(home, write(tmp_path, build_wheel("0.2.0")), "0.2.0")
    assert folder == home.versions_dir / "0.2.0"
    assert (folder / "agent" / "launcher.py").is_file()
    assert (folder / "edgefleet-0.2.0.dist-info" / "RECORD").is_file()
    assert json.loads((folder / INSTALL_MARKER).read_text())["sha256"] == "a" * 64
    assert home.installed("0.2.0", "a" * 64) and not home.installed("0.2.0", "b" * 64)
    assert home.versions() == ["0.2.0"]
    assert list(home.tmp_dir.iterdir()) == []  # the draft was renamed into place
    # The interpreter the launcher starts: -P, the version's folder first on the path.
    env = {**os.environ, "PYTHONPATH": str(folder)}
    code = "import agent, shared; print(agent.__version__, agent.__file__, shared.__file__)"
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "0.2.0"
    assert Path(out[1]).is_relative_to(folder) and Path(out[2]).is_relative_to(folder)


@pytest.mark.parametrize(
    ("wheel", "reason", "says"),
    [
        (lambda: build_wheel("0.2.0", purelib=False), "wrong_target", "not pure-Python"),
        (
            lambda: build_wheel(
                "0.2.0", tamper_after_record={"agent/agent.py": b"print('not the release')\n"}
            ),
            "hash_mismatch",
            "agent/agent.py does not match its hash in edgefleet-0.2.0.dist-info/RECORD",
        ),
        (
            lambda: build_wheel("0.2.0", extra={"../escape.py": b"x = 1\n"}),
            "malformed",
            "not a path inside the wheel",
        ),
        (lambda: build_wheel("0.3.0"), "wrong_target", "'0.3.0'; '0.2.0' was asked for"),
        (lambda: b"PK\x03\x04 not really a zip", "malformed", "not a wheel"),
    ],
    ids=["not-pure", "record", "dotdot", "other-version", "zip"],
)
def test_a_bad_wheel_is_refused_and_nothing_is_installed(
    tmp_path: Path, wheel: object, reason: str, says: str
) -> None:
    # Each rule is tested in tests/shared/test_wheel.py; here: the device applies them to
    # the version its desired state asks for, reports the reason, and keeps nothing.
    home = AgentHome(tmp_path / "data")
    assert callable(wheel)
    with pytest.raises(WheelRejected, match=says) as refused:
        install(home, write(tmp_path, wheel()), "0.2.0")
    assert refused.value.reason == reason
    assert list(home.versions_dir.iterdir()) == [] and list(home.tmp_dir.iterdir()) == []
    assert not (tmp_path / "escape.py").exists() and not (tmp_path / "data" / "escape.py").exists()


def test_the_device_limits_bound_the_wheel(tmp_path: Path) -> None:
    path = write(tmp_path, build_wheel("0.2.0"))
    with pytest.raises(WheelRejected, match="more than the limit of 1000") as refused:
        extract_wheel(
            path, tmp_path / "c", version="0.2.0", max_unpacked_bytes=1000, max_files=5000
        )
    assert refused.value.reason == "malformed"
    with pytest.raises(WheelRejected, match="entries, over the limit of 3"):
        extract_wheel(path, tmp_path / "d", version="0.2.0", max_unpacked_bytes=10**9, max_files=3)
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


def test_a_device_takes_every_wheel_the_server_publishes_by_default(tmp_path: Path) -> None:
    # The server checks with DEFAULT_LIMITS: a device's default bounds must not be tighter.
    config = AgentConfig.model_validate(
        {
            "device_id": "dev-1",
            "profile": "p",
            "data_dir": str(tmp_path / "data"),
            "trust": {"root_keys": [SigningKey.generate().public.to_base64()]},
        }
    )
    limits = config.limits
    assert DEFAULT_LIMITS.max_wheel_bytes is not None
    assert limits.agent_wheel_max_bytes >= DEFAULT_LIMITS.max_wheel_bytes
    assert limits.agent_wheel_max_unpacked_bytes >= DEFAULT_LIMITS.max_unpacked_bytes
    assert limits.agent_wheel_max_files >= DEFAULT_LIMITS.max_entries


def test_switch_and_roll_back_move_current_in_an_order_a_kill_cannot_break(
    tmp_path: Path,
) -> None:
    home = AgentHome(tmp_path / "data")
    install(home, write(tmp_path, build_wheel("0.2.0")), "0.2.0")
    assert home.current() is None  # the base install
    with pytest.raises(SelfUpdateError, match="not installed"):
        home.switch_to("0.3.0")
    state = home.begin_switch(pending(), SelfUpdateState())
    assert home.current() == "0.2.0"
    assert os.readlink(home.current_link) == "versions/0.2.0"
    assert home.read_state() == state and state.pending == pending()

    # Killed after the failed marker was written, before current moved back: the
    # launcher's recovery finishes the rollback.
    failed = state.pending
    assert failed is not None
    marked = SelfUpdateState(
        pending=Pending(**{**failed.__dict__, "failed": {"reason": "agent_crashed", "detail": "x"}})
    )
    home.write_state(marked)
    config = AgentConfig.model_validate(
        {
            "device_id": "dev-1",
            "profile": "p",
            "data_dir": str(tmp_path / "data"),
            "trust": {"root_keys": [SigningKey.generate().public.to_base64()]},
        }
    )
    launcher = Launcher(tmp_path / "agent.toml", config, wall_clock=lambda: NOW)
    recovered = launcher._recover(home.read_state())
    assert home.current() is None
    assert recovered.pending is None and recovered.result is not None
    assert recovered.result.outcome == UpdateOutcome.ROLLED_BACK
    assert (recovered.result.reason, recovered.result.detail) == ("agent_crashed", "x")
    assert (recovered.result.version, recovered.result.previous_version) == ("0.2.0", "0.1.0")
    assert not recovered.result_reported  # the previous version reports it when it starts
    assert recovered.refused is not None and recovered.refused.manifest_version == 7
    assert not (home.versions_dir / "0.2.0").exists()  # nothing of a refused version stays
    assert home.read_state() == recovered


def test_a_switch_recorded_but_never_made_is_dropped(tmp_path: Path) -> None:
    home = AgentHome(tmp_path / "data")
    install(home, write(tmp_path, build_wheel("0.2.0")), "0.2.0")
    home.write_state(SelfUpdateState(pending=pending()))  # killed before current moved
    config = AgentConfig.model_validate(
        {
            "device_id": "dev-1",
            "profile": "p",
            "data_dir": str(tmp_path / "data"),
            "trust": {"root_keys": [SigningKey.generate().public.to_base64()]},
        }
    )
    state = Launcher(tmp_path / "agent.toml", config)._recover(home.read_state())
    assert state.pending is None and state.result is None
    assert home.current() is None and home.read_state().pending is None
    assert home.installed("0.2.0")  # the old version switches again when asked again


def test_garbage_collection_keeps_the_running_and_the_previous_version(tmp_path: Path) -> None:
    home = AgentHome(tmp_path / "data")
    for version in ("0.2.0", "0.3.0", "0.4.0"):
        install(home, write(tmp_path, build_wheel(version), f"{version}.whl"), version)
    home.switch_to("0.4.0")
    assert home.garbage_collect(keep={"0.4.0", "0.3.0"}) == ["0.2.0"]
    assert home.versions() == ["0.3.0", "0.4.0"] and home.current() == "0.4.0"


def test_a_damaged_state_file_or_current_link_is_an_error_naming_it(tmp_path: Path) -> None:
    home = AgentHome(tmp_path / "data")
    home.ensure()
    home.state_path.write_text("{not json")
    with pytest.raises(SelfUpdateError, match=r"state\.json is damaged"):
        home.read_state()
    os.symlink("/usr/lib/python3", home.current_link)
    with pytest.raises(SelfUpdateError, match="not a version"):
        home.current()


def test_one_launcher_per_data_folder(tmp_path: Path) -> None:
    config = AgentConfig.model_validate(
        {
            "device_id": "dev-1",
            "profile": "p",
            "data_dir": str(tmp_path / "data"),
            "trust": {"root_keys": [SigningKey.generate().public.to_base64()]},
        }
    )
    first = Launcher(tmp_path / "agent.toml", config)
    first.home.ensure()
    first._lock()
    second = Launcher(tmp_path / "agent.toml", config)
    with pytest.raises(LauncherError, match="another launcher runs"):
        second._lock()
    assert first._lock_file is not None
    first._lock_file.close()  # the lock goes with the process that held it
    second._lock()
