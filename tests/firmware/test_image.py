"""The x86-64 image end to end: built by ``edgefleet image build`` against a real server,
installed by its own ``install.sh`` into a fresh virtual environment from the image alone,
enrolled with the image's token, and taking a rollout over a real Mosquitto. Then the
image tampered with in each way that matters, which must install nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from agent.config import load_config
from agent.image_verify import ImageVerificationError, verify_image
from server.app import create_app
from server.cli import app as edgefleet
from server.settings import Settings
from shared.signing import SigningKey, sign_envelope
from tests.conftest import BrokerEndpoint, admin_token
from tests.firmware.conftest import PROFILE, PYTHON_VERSION
from tests.server.fleet.conftest import serve
from tests.server.rollouts.harness import MODEL, Clock, publish_versions, trained_digits, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]
runner = CliRunner()
GROUP = "imaged"
DEVICE = "imaged-gw-1"
UNREACHABLE_INDEX = "http://127.0.0.1:9/simple"  # port 9 (discard): nothing answers


def cli(url: str, *args: str, code: int = 0) -> str:
    result = runner.invoke(edgefleet, [*args, "--server", url])
    assert result.exit_code == code, f"edgefleet {' '.join(args)}: {result.output}"
    return result.stdout


def cli_json(url: str, *args: str) -> Any:
    return json.loads(cli(url, *args, "--json"))


@dataclass
class Fleet:
    url: str
    app: Any
    settings: Settings
    image: Path
    token: str


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, mqtt_broker: BrokerEndpoint, wheelhouse: Path
) -> Iterator[Fleet]:
    trained_digits()  # built before the server starts its clocks
    root = tmp_path_factory.mktemp("image-fleet")
    settings = Settings(
        data_dir=root / "server",
        broker_url=mqtt_broker.url,
        run_jobs=False,
        rollout_tick_seconds=0.2,
        ingest_client_id=f"ingest-{root.name[-40:]}",
    )
    app = create_app(settings, clock=Clock())
    with ExitStack() as stack, pytest.MonkeyPatch.context() as monkeypatch:
        url = stack.enter_context(serve(app))
        monkeypatch.setenv("EDGEFLEET_TOKEN", admin_token(settings))
        cli(url, "groups", "create", GROUP)
        token = cli_json(
            url, "tokens", "create", "--auto-accept", "--profile", PROFILE, "--group", GROUP
        )["token"]
        image = root / f"edgefleet-{PROFILE}.tar.gz"
        built = runner.invoke(
            edgefleet,
            [
                "image", "build", "--profile", PROFILE, "--server", url, "--token", token,
                "--out", str(image), "--keys-dir", str(settings.keys_dir),
                "--wheelhouse-from", str(wheelhouse), "--python-version", PYTHON_VERSION,
                "--json",
            ],
        )  # fmt: skip
        assert built.exit_code == 0, built.output
        summary = json.loads(built.stdout)
        assert summary["profile"] == PROFILE and summary["path"] == str(image)
        assert any(w.startswith("edgefleet-") for w in summary["wheels"])
        assert any(w.startswith("ai_edge_litert-") for w in summary["wheels"])
        yield Fleet(url=url, app=app, settings=settings, image=image, token=token)


def unpack(image: Path, into: Path) -> Path:
    with tarfile.open(image) as tar:
        tar.extractall(into, filter="data")
    (folder,) = into.iterdir()
    return folder


def install(folder: Path, target: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run the image's install.sh with a POSIX sh, pip pointed at an index that cannot
    answer and at find-links the image does not hold."""
    env = dict(os.environ)
    env.update(
        PIP_INDEX_URL=UNREACHABLE_INDEX,
        PIP_EXTRA_INDEX_URL=UNREACHABLE_INDEX,
        PIP_FIND_LINKS=str(target / "elsewhere"),
    )
    command = ["sh", str(folder / "install.sh"), "--prefix", str(target / "opt")]
    command += ["--config-dir", str(target / "etc"), "--data-dir", str(target / "data")]
    command += ["--python", sys.executable, "--no-systemd", *extra]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def test_the_image_installs_offline_enrolls_and_takes_a_rollout(
    fleet: Fleet, tmp_path: Path
) -> None:
    folder = unpack(fleet.image, tmp_path / "unpacked")
    target = tmp_path / "device"
    done = install(folder, target, "--device-id", DEVICE)
    assert done.returncode == 0, done.stdout + done.stderr
    # pip looked at the image's wheelhouse and nowhere else, and downloaded nothing.
    assert f"Looking in links: {folder / 'wheelhouse'}\n" in done.stdout, done.stdout
    assert "Looking in indexes" not in done.stdout and "Downloading" not in done.stdout
    assert f"device {DEVICE}: config" in done.stdout
    assert "device " + DEVICE in done.stdout

    agent_bin = target / "opt" / "venv" / "bin" / "edgefleet-agent"
    assert agent_bin.is_file()
    # The install enrolled the device with the image's token: credentials, [broker] set.
    assert (target / "data" / "broker-password").stat().st_mode & 0o777 == 0o600
    config_path = target / "etc" / "agent.toml"
    config = config_path.read_text()
    assert f'device_id = "{DEVICE}"' in config and "[broker]" in config
    assert f'root_keys = ["{target / "etc" / "root.pub"}"]' in config
    assert (target / "etc" / "root.pub").read_text() == (
        fleet.settings.keys_dir / "root.pub"
    ).read_text()
    shown = cli_json(fleet.url, "devices", "show", DEVICE)
    assert shown["status"] == "accepted" and shown["profile"] == PROFILE

    # The test's own settings: a free port for the local API, short windows and probation.
    config = config.replace("port = 8761", "port = 0").replace(
        "window_seconds = 60.0", "window_seconds = 1.0"
    )
    config_path.write_text(config.replace("[limits]\n", "[limits]\nhealth_check_max_seconds = 1\n"))
    log = (tmp_path / "agent.log").open("w")
    agent = subprocess.Popen(
        [str(agent_bin), "launch", "--config", str(config_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
    )
    try:

        def reported() -> Any:
            assert agent.poll() is None, (tmp_path / "agent.log").read_text()[-3000:]
            return cli_json(fleet.url, "devices", "show", DEVICE).get("state_reported_at")

        wait_for(
            reported,
            60,
            "the installed agent's state in the inventory",
        )
        (version,) = publish_versions(fleet.app, 1)
        rollout_id = cli_json(
            fleet.url, "rollouts", "create", "--model", MODEL, "--version", str(version),
            "--group", GROUP, "--phases", "100", "--wait", "0s", "--timeout", "2m",
        )["id"]  # fmt: skip

        def activated() -> Any:
            shown = cli_json(fleet.url, "rollouts", "show", rollout_id)
            states = {d["device_id"]: d["state"] for d in shown["devices"]}
            if shown["status"] == "waiting_approval":  # no traffic: the gates lack data
                cli(fleet.url, "rollouts", "approve", rollout_id, "--phase", str(shown["phase"]))
            return shown if states.get(DEVICE) == "activated" else None

        wait_for(activated, 90, f"{DEVICE} activating v{version}")

        def running() -> Any:
            models = cli_json(fleet.url, "devices", "show", DEVICE)["models"]
            return [(m["model_name"], m["model_version"], m["target"]) for m in models]

        assert wait_for(running, 30, "the inventory showing the model") == [
            (MODEL, version, PROFILE)
        ]
        assert agent.poll() is None, "the installed agent exited"
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(timeout=30)
        finally:
            if agent.poll() is None:
                agent.kill()
            log.close()
    assert agent.returncode == 0, (tmp_path / "agent.log").read_text()[-3000:]
    # The bundle it activated is in the device's data folder, nowhere else.
    assert any((target / "data").rglob("*")), "nothing in the data folder"

    # Installing again (an upgrade, a rerun) keeps the identity and does not enroll again.
    before = config_path.read_text()
    again = install(folder, target, "--device-id", "another-id")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "keeping the existing" in again.stdout and "enrolling" not in again.stdout
    assert config_path.read_text() == before


# ----------------------------------------------------------------------------- tampering


def _one_wheel(folder: Path) -> Path:
    return sorted((folder / "wheelhouse").glob("paho_mqtt-*.whl"))[0]


def _flip_a_wheel_byte(folder: Path) -> None:
    wheel = _one_wheel(folder)
    data = bytearray(wheel.read_bytes())
    data[len(data) // 2] ^= 0x01
    wheel.write_bytes(bytes(data))


def _add_a_file(folder: Path) -> None:
    shutil.copy(_one_wheel(folder), folder / "wheelhouse" / "paho_mqtt-9.9.9-py3-none-any.whl")


def _edit_the_manifest(folder: Path) -> None:
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    wheel = _one_wheel(folder)
    _flip_a_wheel_byte(folder)  # ...and make the manifest agree with the changed wheel
    for entry in manifest["files"]:
        if entry["path"] == f"wheelhouse/{wheel.name}":
            entry["sha256"] = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (folder / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _sign_with_another_key(folder: Path) -> None:
    _edit_the_manifest(folder)
    envelope = sign_envelope(
        (folder / "MANIFEST.json").read_bytes(),
        "application/vnd.edgefleet.image-manifest+json",
        [SigningKey.generate()],
    )
    (folder / "MANIFEST.sig").write_bytes(envelope.to_bytes() + b"\n")


TAMPERING = {
    "a wheel's byte": (_flip_a_wheel_byte, "hash_mismatch"),
    "an added file": (_add_a_file, "unlisted_file"),
    "an edited manifest": (_edit_the_manifest, "bad_signature"),
    "another key's signature": (_sign_with_another_key, "unknown_key"),
}


@pytest.mark.parametrize("how", list(TAMPERING))
def test_a_tampered_image_installs_nothing(fleet: Fleet, tmp_path: Path, how: str) -> None:
    folder = unpack(fleet.image, tmp_path / "unpacked")
    tamper, reason = TAMPERING[how]
    tamper(folder)
    target = tmp_path / "device"
    done = install(folder, target, "--device-id", "tampered-1")
    assert done.returncode != 0
    assert f"REFUSED ({reason})" in done.stderr, done.stderr
    assert "nothing was installed" in done.stderr
    assert not target.exists(), sorted(p.name for p in target.rglob("*"))
    # The server never heard of it.
    devices = httpx.get(
        f"{fleet.url}/api/v1/devices",
        headers={"Authorization": f"Bearer {admin_token(fleet.settings)}"},
    ).json()
    assert "tampered-1" not in {d["id"] for d in devices}


def _reroot(folder: Path) -> None:
    """What someone who controls the whole image can do: a new root, keyring and signature."""
    from datetime import UTC, datetime, timedelta

    from server.keys import issue_keyring

    root, online = SigningKey.generate(), SigningKey.generate()
    _flip_a_wheel_byte(folder)
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    for entry in manifest["files"]:
        path = folder / entry["path"]
        if entry["path"] == "root.pub":
            path.write_text(root.public.to_base64() + "\n")
        elif entry["path"] == "keyring.json":
            _, envelope = issue_keyring(
                root, [online.public], version=1, now=datetime.now(UTC), lifetime=timedelta(1)
            )
            path.write_bytes(envelope.to_bytes())
        entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        entry["size"] = path.stat().st_size
    raw = json.dumps(manifest).encode()
    (folder / "MANIFEST.json").write_bytes(raw)
    envelope = sign_envelope(raw, "application/vnd.edgefleet.image-manifest+json", [online])
    (folder / "MANIFEST.sig").write_bytes(envelope.to_bytes())


def test_a_rerooted_image_passes_its_own_check_but_not_the_fleet_root(
    fleet: Fleet, tmp_path: Path
) -> None:
    folder = unpack(fleet.image, tmp_path / "unpacked")
    _reroot(folder)
    assert verify_image(folder).root_given is False  # self-consistent, as documented
    fleet_root = fleet.settings.keys_dir / "root.pub"
    target = tmp_path / "device"
    done = install(folder, target, "--no-enroll", "--root-key", str(fleet_root))
    assert done.returncode != 0 and "REFUSED (wrong_root)" in done.stderr, done.stderr
    assert not target.exists()
    # The operator's check and the agent's module say the same.
    result = runner.invoke(
        edgefleet, ["image", "verify", str(folder), "--root-key", str(fleet_root), "--json"]
    )
    assert result.exit_code == 1 and json.loads(result.stdout)["reason"] == "wrong_root"
    checked = subprocess.run(
        [sys.executable, "-I", "-m", "agent.image_verify", str(fleet.image), "--root-key",
         str(fleet_root), "--json"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=120,
    )  # fmt: skip
    assert checked.returncode == 0 and json.loads(checked.stdout)["root_given"] is True
    # ... and so does the installed agent's command line.
    agent_cli = Path(sys.executable).parent / "edgefleet-agent"
    for image, code in ((fleet.image, 0), (folder, 1)):
        checked = subprocess.run(
            [str(agent_cli), "verify-image", str(image), "--root-key", str(fleet_root), "--json"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert checked.returncode == code, checked.stderr


def test_the_archive_is_checked_without_unpacking(fleet: Fleet, tmp_path: Path) -> None:
    fleet_root = (fleet.settings.keys_dir / "root.pub").read_text().strip()
    import base64

    key = base64.b64decode(fleet_root)
    verified = verify_image(fleet.image, root_key=key)
    assert verified.manifest["profile"] == PROFILE
    names = {f["path"] for f in verified.files}
    for needed in ("install.sh", "verify.py", "agent.toml", "token", "root.pub", "keyring.json"):
        assert needed in names
    assert any(n.startswith("wheelhouse/edgefleet-") for n in names)
    # One changed byte in a wheel, inside the archive.
    with tarfile.open(fleet.image) as src, tarfile.open(tmp_path / "bad.tar.gz", "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None  # type: ignore[union-attr]
            if data is not None and member.name.endswith(".whl") and "paho" in member.name:
                data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
            dst.addfile(member, None if data is None else __import__("io").BytesIO(data))
    with pytest.raises(ImageVerificationError) as refused:
        verify_image(tmp_path / "bad.tar.gz", root_key=key)
    assert refused.value.reason == "hash_mismatch"


def test_the_dockerfile_install_step_works_from_the_wheelhouse_alone(
    fleet: Fleet, tmp_path: Path
) -> None:
    """No Docker engine here: run the Dockerfile's install RUN with /image and
    /opt/edgefleet mapped to folders, under an unreachable index."""
    folder = unpack(fleet.image, tmp_path / "unpacked")
    dockerfile = (folder / "Dockerfile").read_text()
    first_stage = dockerfile.split("FROM ")[1]
    run = first_stage.split("RUN ", 1)[1].replace("\\\n", " ")
    run = re.sub(r"(?<![\w/])/image", str(folder), run)
    run = run.replace("/opt/edgefleet", str(tmp_path / "opt"))
    run = run.replace("python3 ", f"{sys.executable} ")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env["PIP_INDEX_URL"] = UNREACHABLE_INDEX  # a container build has no index either
    done = subprocess.run(["sh", "-c", run], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Looking in links: {folder / 'wheelhouse'}\n" in done.stdout, done.stdout
    assert "Looking in indexes" not in done.stdout and "Downloading" not in done.stdout
    installed = tmp_path / "opt" / "venv" / "bin" / "edgefleet-agent"
    version = subprocess.run(
        [str(installed), "--version"], capture_output=True, text=True, timeout=120
    )
    assert version.returncode == 0 and "edgefleet-agent" in version.stdout
    assert (tmp_path / "opt" / "image" / "token").read_text().strip() == fleet.token
    # The container's first start writes its config on the volume (enrolling is shown above).
    volume = tmp_path / "volume"
    start = subprocess.run(
        ["sh", str(tmp_path / "opt" / "image" / "install.sh"), "--configure-only",
         "--no-systemd", "--no-enroll", "--prefix", str(tmp_path / "opt"), "--config-dir",
         str(volume), "--data-dir", str(volume / "data"), "--http-host", "0.0.0.0",
         "--device-id", "container-1", "--python", sys.executable],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert start.returncode == 0, start.stdout + start.stderr
    config = load_config(volume / "agent.toml")
    assert config.device_id == "container-1" and config.http.host == "0.0.0.0"
    assert config.data_dir == volume / "data" and config.profile == PROFILE
