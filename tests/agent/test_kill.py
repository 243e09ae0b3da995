"""kill -9 of the whole agent: ``edgefleet-agent run --config FILE`` as a real process
against a real Mosquitto and the server's BlockServer, killed with SIGKILL and started
again.

- In the middle of a download (tiny blocks, a block server that answers each request
  after a pause, for real): the restarted agent asks only for the blocks it did not
  have, and ends on the new model, verified.
- At random delays after the last block of an update was sent, which land in the
  final hash check, the verification, the trial load, the self-tests, staging, the
  pointer move, the self-test replay and the probation: after each kill the disk names
  the old or the new model, complete and verified, never a mix, never none; the
  restarted agent serves one of the two, and ends on the new one with ``tmp/`` empty.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import random
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.store import ModelStore
from shared.bundle import Bundle, read_bundle
from shared.messages import ArtifactRef
from shared.signing import SigningKey
from shared.topics import Channel, device_topic
from tests.agent.test_health import Fleet, Observer, wait_for
from tests.conftest import free_port

pytestmark = [pytest.mark.broker, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PROFILE = "edge-x86_64-litert"
BLOCK = 1024
DOWNLOAD_FILE_SUFFIXES = ("", ".part", ".part.json")


class AgentProcess:
    """``python -m agent.cli run --config FILE`` in its own process, logging to a file."""

    def __init__(self, config_file: Path, port: int, log_file: Path) -> None:
        self.config_file = config_file
        self.port = port
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config_file)],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(self.health, what=f"the agent's local API on port {self.port}\n{self.log_tail()}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(10) == -signal.SIGKILL

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def _get(self, path: str) -> tuple[int, dict[str, Any]] | None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"the agent exited ({self.process.returncode}):\n{self.log_tail()}"
            )
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        except OSError:
            return None
        finally:
            connection.close()

    def health(self) -> dict[str, Any] | None:
        """The answer of /v1/health once the API is up (a model or not)."""
        answer = self._get("/v1/health")
        return None if answer is None else answer[1]

    def status(self) -> dict[str, Any]:
        answer = self._get("/v1/status")
        assert answer is not None and answer[0] == 200
        return answer[1]

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def write_config(tmp_path: Path, fleet: Fleet, broker: Any, port: int) -> Path:
    root = tmp_path / "root.pub"
    root.write_text(fleet.root.public.to_base64())
    config = tmp_path / "agent.toml"
    config.write_text(
        f"""\
device_id = "{fleet.device_id}"
profile = "{PROFILE}"
data_dir = "device"

[broker]
url = "{broker.url}"

[trust]
root_keys = ["root.pub"]

[http]
port = {port}

[download]
block_size = {BLOCK}
blocks_per_request = 1
request_timeout_seconds = 5

[limits]
backoff_min_seconds = 0.05
backoff_max_seconds = 0.5
health_check_max_seconds = 0.3
"""
    )
    return config


class Device:
    """One device's data directory, read as a fresh start would, without changing it."""

    def __init__(self, data_dir: Path, trusted: SigningKey) -> None:
        self.store = ModelStore(data_dir)  # creating it only makes missing folders
        self.trusted = trusted

    def pointer(self) -> dict[str, Any]:
        return dict(json.loads((self.store.pointers_dir / "digits.json").read_bytes()))

    def verified_current(self) -> tuple[str, int]:
        """(sha256, model version) of the current bundle, after checking it as the agent
        does at start: complete, the hash the pointer names, signed by a trusted key."""
        current = self.pointer()["current"]
        path = self.store.bundle_path(current["sha256"])
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == current["sha256"]
        bundle = read_bundle(
            data,
            trusted_keys=[self.trusted.public],
            expected_sha256=current["sha256"],
            expected_length=current["length"],
        )
        assert bundle.manifest.model_version == current["model_version"]
        return current["sha256"], current["model_version"]

    def tmp(self) -> list[str]:
        return sorted(p.name for p in self.store.tmp_dir.iterdir())


def download_files(sha256: str) -> set[str]:
    """What a resumable download of ``sha256`` may leave in tmp/."""
    return {sha256 + suffix for suffix in DOWNLOAD_FILE_SUFFIXES}


@pytest.fixture
def fleet(tmp_path: Path, mqtt_broker: Any, bundle_key: SigningKey) -> Iterator[Fleet]:
    fleet = Fleet(
        tmp_path, mqtt_broker, bundle_key, device_id=f"kill-{uuid.uuid4().hex[:8]}", profile=PROFILE
    )
    yield fleet
    fleet.blocks.stop()


@pytest.fixture
def agent_process(
    tmp_path: Path, fleet: Fleet, mqtt_broker: Any
) -> Iterator[Callable[[], AgentProcess]]:
    port = free_port()
    config = write_config(tmp_path, fleet, mqtt_broker, port)
    started: list[AgentProcess] = []

    def start() -> AgentProcess:
        process = AgentProcess(config, port, tmp_path / "agent.log")
        started.append(process)
        process.start()
        return process

    yield start
    for process in started:
        process.stop()


def test_killed_mid_download_it_resumes_with_the_missing_blocks_only(
    tmp_path: Path,
    fleet: Fleet,
    mqtt_client: Callable[..., Any],
    agent_process: Callable[[], AgentProcess],
    make_digits_bundle: Callable[..., Bundle],
    bundle_key: SigningKey,
) -> None:
    observer = Observer(mqtt_client("observer"), fleet.device_id)
    server = mqtt_client("server")
    desired_topic = device_topic(fleet.device_id, Channel.DESIRED)
    v1 = fleet.add(make_digits_bundle("tflite-float32"), bundle_key)
    v2 = fleet.add(make_digits_bundle("tflite-float32", model_version=2), bundle_key)
    assert v2.length > 12 * BLOCK, "the bundle is too small to kill a download in its middle"
    device = Device(tmp_path / "device", bundle_key)
    server.publish(desired_topic, fleet.desired(1, v1, 1), retain=True)
    agent = agent_process()
    observer.wait_event("health_check_passed", 1)

    fleet.delay = 0.05  # a slow link: ~20 blocks a second
    server.publish(desired_topic, fleet.desired(2, v2, 2), retain=True)
    sidecar = device.store.tmp_dir / f"{v2.sha256}.part.json"

    def held() -> int:
        try:
            return int(json.loads(sidecar.read_text())["verified_bytes"])
        except (OSError, ValueError, KeyError):
            return 0

    wait_for(lambda: held() >= 4 * BLOCK, what="4 blocks of v2 on disk")
    agent.kill()
    resumed_from = held()
    assert 4 * BLOCK <= resumed_from < v2.length
    assert set(device.tmp()) <= download_files(v2.sha256)
    assert device.verified_current() == (v1.sha256, 1)  # the old model, untouched
    observer.poll()
    sessions_before = {r.request_id.rsplit("-", 1)[0] for r in observer.requests}
    asked_before = len(observer.requests)

    fleet.delay = 0.0
    agent = agent_process()
    assert agent.status()["models"]["digits"]["version"] == 1  # served while it resumes
    observer.wait_event("health_check_passed", 2)
    after = [
        r
        for r in observer.requests[asked_before:]
        if r.request_id.rsplit("-", 1)[0] not in sessions_before  # not the killed process's
    ]
    offsets = [r.offset for r in after]
    assert offsets == list(range(resumed_from, v2.length, BLOCK)), (
        f"resumed from {resumed_from}: asked for {offsets}"
    )
    print(
        f"\nkilled after {resumed_from} of {v2.length} bytes; the restart asked for "
        f"{len(offsets)} blocks of {BLOCK} bytes (of {-(-v2.length // BLOCK)})"
    )

    status = subprocess.run(
        [sys.executable, "-m", "agent.cli", "status", "--config", str(agent.config_file), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["models"] == {"digits": {"version": 2, "target": PROFILE}}
    agent.stop()
    assert device.verified_current() == (v2.sha256, 2)
    assert device.pointer()["previous"]["sha256"] == v1.sha256
    assert device.tmp() == []
    assert device.store.probations() == []


def test_killed_during_activation_or_health_check_it_restarts_old_or_new_never_a_mix(
    tmp_path: Path,
    fleet: Fleet,
    mqtt_client: Callable[..., Any],
    agent_process: Callable[[], AgentProcess],
    make_digits_bundle: Callable[..., Bundle],
    bundle_key: SigningKey,
) -> None:
    seed = int(os.environ.get("EDGEFLEET_KILL_SEED", secrets.randbits(30)))
    rng = random.Random(seed)
    # 0 lands before the new model is verified, 0.4 s past its probation (0.3 s, no
    # traffic); log-uniform in between, as the steps before the pointer moves are short.
    delays = [0.0, *sorted(math.exp(rng.uniform(math.log(0.002), math.log(0.4))) for _ in range(5))]
    observer = Observer(mqtt_client("observer"), fleet.device_id, blocks=True)
    server = mqtt_client("server")
    desired_topic = device_topic(fleet.device_id, Channel.DESIRED)
    refs: dict[int, ArtifactRef] = {
        version: fleet.add(make_digits_bundle("tflite-float32", model_version=version), bundle_key)
        for version in range(1, len(delays) + 2)
    }
    device = Device(tmp_path / "device", bundle_key)
    server.publish(desired_topic, fleet.desired(1, refs[1], 1), retain=True)
    agent = agent_process()
    observer.wait_event("health_check_passed", 1)

    outcomes = []
    for old, delay in enumerate(delays, start=1):
        new = old + 1
        server.publish(desired_topic, fleet.desired(new, refs[new], new), retain=True)
        observer.wait_last_block(refs[new].sha256)
        time.sleep(delay)  # a real process, killed at a real moment
        agent.kill()

        # On disk: the old or the new bundle, complete and verified; a pointer, never none.
        sha256, version = device.verified_current()
        assert (sha256, version) in {(refs[old].sha256, old), (refs[new].sha256, new)}
        previous = device.pointer()["previous"]
        if version == new:
            assert previous["sha256"] == refs[old].sha256
            assert device.store.bundle_path(refs[old].sha256).is_file()
        leftovers = set(device.tmp()) - download_files(refs[new].sha256)
        assert all(name.endswith(".part") for name in leftovers), leftovers  # drafts at most
        marker = device.store.probation("digits")
        if version == old:
            landed = "old, not verified" if marker is None else "old, in its trial"
        else:
            landed = "new, on probation" if marker is not None else "new, judged healthy"
        outcomes.append(landed)

        agent = agent_process()
        serving = agent.health()
        assert serving is not None and serving["version"] in (old, new), serving
        observer.wait_event("health_check_passed", new)
        wait_for(
            lambda running=agent: running.status()["probation"] is None,
            what="the health check done",
        )
        assert agent.status()["models"]["digits"]["version"] == new
        assert device.tmp() == []

    print(
        f"\nseed {seed}: kills {[f'{d:.3f}' for d in delays]} s after the last block -> {outcomes}"
    )
    agent.stop()
    assert device.verified_current() == (refs[len(delays) + 1].sha256, len(delays) + 1)
    assert device.store.probations() == []
    assert outcomes[0].startswith("old"), f"a kill at once left the new model: {outcomes}"
    assert any(o.startswith("new") for o in outcomes), f"no kill came late enough: {outcomes}"
