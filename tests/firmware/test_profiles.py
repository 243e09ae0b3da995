"""Every ``firmware_images/<profile>/`` folder: its files, a systemd unit that is hardened
and that systemd itself accepts, a config template the agent loads once filled in, and a
Dockerfile that verifies, installs from the wheelhouse only and runs unprivileged."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_config
from server.image import IMAGE_PROFILE_FILES, ImageBuildError, platform_tags, render_template
from server.image.build import SOURCE_ROOT, image_requirements
from server.profiles import DEFAULT_PROFILES_DIR, Profile, load_profiles

PROFILES = load_profiles()


def build_values(profile: Profile) -> dict[str, str]:
    return {
        "profile": json.dumps(profile.name),
        "server_url": json.dumps("https://fleet.example:8750"),
        "latency_sla_ms_p95": repr(profile.latency_sla_ms_p95),
        "max_bundle_bytes": str(profile.max_model_bytes + 8 * 1024 * 1024),
        "python_version": "3.11",
    }


def unit_lines(profile: str) -> list[str]:
    text = (DEFAULT_PROFILES_DIR / profile / "edgefleet-agent.service").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_every_profile_folder_has_its_image_files() -> None:
    assert len(PROFILES) == 7
    for name in PROFILES:
        for file in IMAGE_PROFILE_FILES:
            assert (DEFAULT_PROFILES_DIR / name / file).is_file(), f"{name}/{file}"


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_the_unit_is_hardened(profile: str) -> None:
    lines = unit_lines(profile)
    for directive in (
        "User=@USER@",
        "Group=@USER@",
        "Restart=on-failure",
        "ProtectSystem=strict",
        "ReadWritePaths=@DATA_DIR@",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "RestrictSUIDSGID=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectControlGroups=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "WantedBy=multi-user.target",
    ):
        assert directive in lines, f"{profile}: {directive} missing"
    # A restart limit: systemd gives up after a burst instead of looping forever.
    assert any(re.fullmatch(r"StartLimitBurst=\d+", line) for line in lines)
    assert any(re.fullmatch(r"StartLimitIntervalSec=\d+", line) for line in lines)
    # Writable: the data folder, nothing else.
    assert [line for line in lines if line.startswith("ReadWritePaths=")] == [
        "ReadWritePaths=@DATA_DIR@"
    ]
    # A watchdog, fed by the agent's main loop (agent/systemd.py): a hung agent restarts.
    assert "WATCHDOG=1" in (SOURCE_ROOT / "agent" / "systemd.py").read_text()
    assert {"Type=notify", "NotifyAccess=all", "WatchdogSec=30"} <= set(lines)
    # The launcher supervises the agent of the current version (agent updates roll back
    # through it); the agent is its child, so notifications come from another pid.
    (exec_start,) = [line for line in lines if line.startswith("ExecStart=")]
    assert "edgefleet-agent launch --config" in exec_start
    # Only the GPU profile sees devices, and only the GPU's.
    if "gpu" in profile:
        assert "DevicePolicy=closed" in lines and "DeviceAllow=char-drm rw" in lines
    else:
        assert "PrivateDevices=yes" in lines


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_systemd_accepts_the_rendered_unit(profile: str, tmp_path: Path) -> None:
    # ExecStart must name an existing program: a prefix whose venv is this interpreter's.
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    agent = Path(sys.executable).with_name("edgefleet-agent")
    (tmp_path / "venv" / "bin" / "edgefleet-agent").symlink_to(agent)
    text = (DEFAULT_PROFILES_DIR / profile / "edgefleet-agent.service").read_text()
    for key, value in {
        "PREFIX": str(tmp_path),
        "CONFIG_DIR": str(tmp_path / "etc"),
        "DATA_DIR": str(tmp_path / "data"),
        "USER": "edgefleet",
    }.items():
        text = text.replace(f"@{key}@", value)
    assert "@" not in text.replace("@system-service", "").replace("@privileged", "")
    unit = tmp_path / "edgefleet-agent.service"
    unit.write_text(text)
    checked = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 on unknown keys and bad values too; it only complains on stderr.
    assert checked.returncode == 0 and checked.stderr.strip() == "", checked.stderr


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_the_config_template_loads_once_filled_in(profile: str, tmp_path: Path) -> None:
    p = PROFILES[profile]
    text = (DEFAULT_PROFILES_DIR / profile / "agent.toml.template").read_text()
    text = render_template(text, build_values(p), name="agent.toml.template")
    assert "{{" not in text
    (tmp_path / "root.pub").write_text("dGhpcyBpcyBub3QgYSBrZXkgYnV0IDMyIGJ5dGVzIQ==\n")
    for key, value in {
        "DEVICE_ID": "gw-7",
        "DATA_DIR": str(tmp_path / "data"),
        "ROOT_KEY": str(tmp_path / "root.pub"),
        "HTTP_HOST": "127.0.0.1",
    }.items():
        text = text.replace(f"@{key}@", json.dumps(value))
    (tmp_path / "agent.toml").write_text(text)
    config = load_config(tmp_path / "agent.toml")
    assert config.device_id == "gw-7" and config.profile == profile
    assert config.latency_sla_ms_p95 == p.latency_sla_ms_p95
    assert config.download.http_base_url == "https://fleet.example:8750"
    assert config.limits.max_bundle_bytes > p.max_model_bytes
    assert config.broker is None  # enrollment adds it, with the device's own credentials


def test_an_unknown_placeholder_is_refused() -> None:
    with pytest.raises(ImageBuildError, match="unknown placeholder"):
        render_template("a = {{nope}}", {"profile": "x"}, name="t")


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_the_dockerfile_verifies_installs_offline_and_runs_unprivileged(profile: str) -> None:
    text = (DEFAULT_PROFILES_DIR / profile / "Dockerfile").read_text()
    text = render_template(text, build_values(PROFILES[profile]), name="Dockerfile")
    stages = re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]
    assert len(stages) == 2, "an install stage and a run stage"
    install, final = stages
    assert install.startswith("python:${PYTHON_VERSION}-slim")
    assert final.startswith("python:${PYTHON_VERSION}-slim")
    run = install.split("RUN ", 1)[1]
    # The manifest is checked first, then pip may only read the wheelhouse.
    assert run.index("verify.py /image") < run.index("pip install")
    assert "--no-index" in run and "--find-links /image/wheelhouse" in run
    assert "PIP_CONFIG_FILE=/dev/null" in run
    # The final stage has no wheelhouse and runs as the unprivileged user it creates.
    assert "wheelhouse" not in final
    users = re.findall(r"^USER (\S+)$", final, flags=re.MULTILINE)
    assert users == ["edgefleet"]
    assert "useradd --system --uid 10001" in final
    assert 'VOLUME ["/var/lib/edgefleet"]' in final
    assert "--configure-only" in final and "edgefleet-agent launch" in final


def test_requirements_follow_the_runtime() -> None:
    pyproject = SOURCE_ROOT / "pyproject.toml"
    assert image_requirements(PROFILES["edge-x86_64-litert"], "0.1.0", pyproject) == [
        "edgefleet[agent]==0.1.0"
    ]
    assert image_requirements(PROFILES["cloud-x86_64-onnx"], "0.1.0", pyproject) == [
        "edgefleet[agent,agent-onnx]==0.1.0"
    ]
    legacy = image_requirements(PROFILES["legacy-armv7-tflite"], "0.1.0", pyproject)
    assert legacy[0] == "edgefleet==0.1.0"
    assert "numpy<2" in legacy and "tflite-runtime==2.14.0" in legacy
    assert any(r.startswith("paho-mqtt") for r in legacy)
    assert not any("litert" in r for r in legacy)


def test_platform_tags_cover_each_arch() -> None:
    x86 = platform_tags("x86_64")
    assert "manylinux_2_17_x86_64" in x86 and "manylinux2014_x86_64" in x86
    assert "manylinux_2_27_x86_64" in x86  # ai-edge-litert's tag
    assert all(t.endswith("_aarch64") for t in platform_tags("aarch64"))
    assert "linux_armv7l" in platform_tags("armv7l")
    with pytest.raises(ImageBuildError, match="riscv64"):
        platform_tags("riscv64")
