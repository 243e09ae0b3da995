"""The agent updates itself under its launcher, for real: ``edgefleet-agent launch`` as a
process against a real Mosquitto and the server's BlockServer, a signed desired state
naming an agent wheel built from this checkout, and real agent children of each version.

- A good version is installed beside the base, ``current`` moves to it, the child runs
  it and commits: state and events say so.
- A version that exits at start, and one that hangs and never reports, are rolled back
  by the launcher (``agent_crashed``, ``agent_unhealthy``); the base version reports it.
- Tampered wheels are refused before anything is installed; the old agent never stops.
- The launcher killed with SIGKILL while a version is on trial (its child dies with it):
  started again it converges -- the good version commits; a version that keeps being
  interrupted is given up after ``self_update.max_starts`` -- and ``current`` always
  names a complete version or the base.

Nothing is faked; the only waits are for the processes to do what they must.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.agent import Agent
from agent.config import AgentConfig
from agent.selfupdate import INSTALL_MARKER, LAUNCHED_ENV, AgentHome
from server.artifacts import ArtifactStore
from server.delivery.blocks import BlockServer
from shared.messages import (
    AGENT_WHEEL_MEDIA_TYPE,
    AgentDeployment,
    ArtifactRef,
    DesiredMessage,
    DesiredState,
    DeviceState,
    Event,
    InstallWindow,
    KeyEntry,
    Keyring,
)
from shared.signing import PayloadType, SigningKey, sign_envelope
from shared.topics import Channel, device_topic
from tests.agent.selfupdate_wheels import BROKEN_AT_START, HANGS_AT_START, REPO, build_wheel
from tests.conftest import free_port

pytestmark = [pytest.mark.broker, pytest.mark.slow]

PROFILE = "edge-x86_64-litert"
BASE = "0.1.0"
WAIT = 90.0


def wait_for(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not in time: {what}")


class Fleet:
    """The server's half, by hand: keys, an artifact store, a block server, signed desired
    states naming an agent version."""

    def __init__(self, tmp_path: Path, broker: Any) -> None:
        # One device per test: retained messages of another test's device never mix in.
        self.device_id = f"selfupdate-{uuid.uuid4().hex[:12]}"
        self.root = SigningKey.generate()
        self.online = SigningKey.generate()
        now = datetime.now(UTC)
        keyring = Keyring(
            version=1,
            issued_at=now - timedelta(minutes=1),
            expires_at=now + timedelta(days=1),
            keys=[KeyEntry(keyid=self.online.keyid, public_key=self.online.public.to_base64())],
        )
        self.keyring = sign_envelope(keyring.to_bytes(), PayloadType.KEYRING, [self.root])
        self.store = ArtifactStore(tmp_path / "server-artifacts")
        self.allowed: set[str] = set()
        self.blocks = BlockServer(
            self.store,
            authorize=lambda device, sha: device == self.device_id and sha in self.allowed,
            host=broker.host,
            port=broker.port,
        )
        self.blocks.start()
        self.manifest_version = 0

    def add(self, wheel: bytes) -> ArtifactRef:
        stored = self.store.put_bytes(wheel)
        self.allowed.add(stored.sha256)
        return ArtifactRef(
            sha256=stored.sha256, length=stored.length, media_type=AGENT_WHEEL_MEDIA_TYPE
        )

    def desired(
        self,
        version: str,
        ref: ArtifactRef,
        *,
        health_timeout_s: int = 60,
        window: InstallWindow | None = None,
    ) -> bytes:
        self.manifest_version += 1
        now = datetime.now(UTC)
        state = DesiredState(
            device_id=self.device_id,
            manifest_version=self.manifest_version,
            issued_at=now,
            expires_at=now + timedelta(hours=12),
            rollout_id=f"agent-{self.manifest_version}",
            agent=AgentDeployment(
                version=version,
                artifact=ref,
                health_timeout_s=health_timeout_s,
                install_window=window,
            ),
        )
        return DesiredMessage(
            keyring=self.keyring,
            manifest=sign_envelope(state.to_bytes(), PayloadType.DESIRED_STATE, [self.online]),
        ).to_bytes()


class Observer:
    """Events and retained states the device publishes."""

    def __init__(self, client: Any, device_id: str) -> None:
        self.client = client
        self.events: list[Event] = []
        self.states: list[DeviceState] = []
        for channel in (Channel.EVENTS, Channel.STATE):
            client.subscribe(device_topic(device_id, channel))

    def poll(self) -> None:
        for topic, payload, _retain in self.client.drain(0.05):
            if topic.endswith("/events"):
                self.events.append(Event.from_bytes(payload))
            elif topic.endswith("/state"):
                self.states.append(DeviceState.from_bytes(payload))

    def state(self, check: Callable[[DeviceState], bool], what: str) -> DeviceState:
        def seen() -> DeviceState | None:
            self.poll()
            return next((s for s in reversed(self.states) if check(s)), None)

        return wait_for(seen, what)  # type: ignore[no-any-return]

    def kinds(self, version: str) -> list[str]:
        self.poll()
        return [str(e.kind) for e in self.events if e.agent_version == version]

    def wait_kinds(self, version: str, *kinds: str) -> list[Event]:
        wait_for(lambda: set(kinds) <= set(self.kinds(version)), f"{kinds} of agent {version}")
        return [e for e in self.events if e.agent_version == version]


class LauncherProcess:
    """``python -m agent.cli launch --config FILE``, logging to a file."""

    def __init__(self, config_file: Path, port: int, log_file: Path) -> None:
        self.config_file = config_file
        self.port = port
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "launch", "--config", str(self.config_file)],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def children(self) -> list[int]:
        assert self.process is not None
        pid = self.process.pid
        try:
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        except FileNotFoundError:
            return []
        return [int(p) for p in text.split()]

    def status(self) -> dict[str, Any] | None:
        """The child agent's /v1/status, or None while no agent answers."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the launcher exited:\n{self.log_tail()}")
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request("GET", "/v1/status")
            response = connection.getresponse()
            return json.loads(response.read()) if response.status == 200 else None
        except OSError:
            return None
        finally:
            connection.close()

    def running(self, version: str) -> dict[str, Any]:
        def answer() -> dict[str, Any] | None:
            status = self.status()
            return status if status and status["agent_version"] == version else None

        return wait_for(answer, f"an agent {version} answering\n{self.log_tail()}")  # type: ignore[no-any-return]

    def kill(self) -> list[int]:
        """SIGKILL the launcher; returns the pids of the children it had."""
        assert self.process is not None
        children = self.children()
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(10) == -signal.SIGKILL
        return children

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                assert self.process.wait(30) == 0, self.log_tail()
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
                raise

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state in ("Z", "X")


@pytest.fixture
def fleet(tmp_path: Path, mqtt_broker: Any) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path, mqtt_broker)
    yield fleet
    fleet.blocks.stop()


@pytest.fixture
def device(tmp_path: Path, fleet: Fleet, mqtt_broker: Any) -> Iterator[LauncherProcess]:
    (tmp_path / "root.pub").write_text(fleet.root.public.to_base64())
    port = free_port()
    config = tmp_path / "agent.toml"
    config.write_text(
        f"""\
device_id = "{fleet.device_id}"
profile = "{PROFILE}"
data_dir = "device"

[broker]
url = "{mqtt_broker.url}"

[trust]
root_keys = ["root.pub"]

[http]
port = {port}

[self_update]
max_starts = 2
stop_grace_seconds = 10
restart_backoff_min_seconds = 0.2
restart_backoff_max_seconds = 2
"""
    )
    launcher = LauncherProcess(config, port, tmp_path / "launcher.log")
    yield launcher
    launcher.stop()


def home(tmp_path: Path) -> AgentHome:
    return AgentHome(tmp_path / "device")


def publish(mqtt_client: Callable[..., Any], fleet: Fleet, payload: bytes) -> None:
    topic = device_topic(fleet.device_id, Channel.DESIRED)
    mqtt_client(f"server-{fleet.manifest_version}").publish(topic, payload, retain=True)


def test_a_good_version_is_installed_beside_switched_to_and_committed(
    tmp_path: Path, fleet: Fleet, device: LauncherProcess, mqtt_client: Callable[..., Any]
) -> None:
    observer = Observer(mqtt_client("observer"), fleet.device_id)
    device.start()
    device.running(BASE)
    observer.state(lambda s: s.agent_version == BASE, "the base version's state")
    ref = fleet.add(build_wheel("0.2.0"))
    publish(mqtt_client, fleet, fleet.desired("0.2.0", ref))

    state = observer.state(
        lambda s: s.agent_update is not None and s.agent_update.outcome == "activated",
        "a state that says the update to 0.2.0 committed",
    )
    assert state.agent_version == "0.2.0"
    update = state.agent_update
    assert update is not None
    assert (update.version, update.previous_version) == ("0.2.0", BASE)
    assert (update.manifest_version, update.rollout_id) == (1, "agent-1")
    events = observer.wait_kinds(
        "0.2.0", "downloading", "downloaded", "verified", "activated", "health_check_passed"
    )
    kinds = [str(e.kind) for e in events]
    assert kinds.index("verified") < kinds.index("activated") < kinds.index("health_check_passed")
    assert all(e.model_name is None and e.sha256 == ref.sha256 for e in events)
    assert "rolled_back" not in kinds and "failed" not in kinds

    status = device.running("0.2.0")
    assert status["agent_update"]["outcome"] == "activated" and status["agent_trial"] is None
    disk = home(tmp_path)
    assert os.readlink(disk.current_link) == "versions/0.2.0"
    assert (disk.versions_dir / "0.2.0" / INSTALL_MARKER).is_file()
    assert disk.read_state().pending is None
    # The status view, from the data folder.
    shown = subprocess.run(
        [sys.executable, "-m", "agent.cli", "versions", "--config", str(device.config_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "0.2.0" in shown
    as_json = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "agent.cli",
                "versions",
                "--config",
                str(device.config_file),
                "--json",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert as_json["current"] == "0.2.0" and as_json["installed"] == ["0.2.0"]
    assert as_json["pending"] is None and as_json["last_update"]["outcome"] == "activated"


@pytest.mark.parametrize(
    ("version", "code", "timeout", "reason", "says"),
    [
        ("0.2.1", BROKEN_AT_START, 60, "agent_crashed", "exited with code 1 before"),
        ("0.2.2", HANGS_AT_START, 10, "agent_unhealthy", "did not report healthy within 10 s"),
    ],
    ids=["exits-at-start", "hangs"],
)
def test_a_version_that_does_not_report_healthy_is_rolled_back_by_the_launcher(
    tmp_path: Path,
    fleet: Fleet,
    device: LauncherProcess,
    mqtt_client: Callable[..., Any],
    version: str,
    code: bytes,
    timeout: int,
    reason: str,
    says: str,
) -> None:
    observer = Observer(mqtt_client("observer"), fleet.device_id)
    device.start()
    device.running(BASE)
    ref = fleet.add(build_wheel(version, inject={"agent/agent.py": code}))
    publish(mqtt_client, fleet, fleet.desired(version, ref, health_timeout_s=timeout))

    state = observer.state(
        lambda s: s.agent_update is not None and s.agent_update.outcome == "rolled_back",
        f"a state that says {version} was rolled back",
    )
    assert state.agent_version == BASE
    update = state.agent_update
    assert update is not None
    assert (update.version, update.previous_version, update.reason) == (version, BASE, reason)
    assert update.detail is not None and says in update.detail
    events = observer.wait_kinds(version, "verified", "health_check_failed", "rolled_back")
    rolled_back = next(e for e in events if e.kind == "rolled_back")
    assert rolled_back.reason == reason and rolled_back.manifest_version == 1
    assert "activated" not in [str(e.kind) for e in events]
    disk = home(tmp_path)
    assert not disk.current_link.is_symlink()  # back on the base install
    assert not (disk.versions_dir / version).exists()
    assert device.running(BASE)["agent_update"]["outcome"] == "rolled_back"
    # The desired state still names it (retained): refused under this manifest, not retried.
    downloads = observer.kinds(version).count("downloading")
    time.sleep(2)  # absence takes a wait
    assert observer.kinds(version).count("downloading") == downloads == 1


def test_tampered_wheels_are_refused_and_the_old_agent_keeps_running(
    tmp_path: Path, fleet: Fleet, device: LauncherProcess, mqtt_client: Callable[..., Any]
) -> None:
    observer = Observer(mqtt_client("observer"), fleet.device_id)
    device.start()
    device.running(BASE)
    children = device.children()
    assert len(children) == 1

    tampered = fleet.add(build_wheel("0.3.0"))  # changed at rest after it was signed for
    path = fleet.store.path(tampered.sha256)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    cases = [
        ("0.3.0", tampered, "hash_mismatch"),
        (
            "0.3.1",
            fleet.add(build_wheel("0.3.1", tamper_after_record={"agent/cli.py": b"import os\n"})),
            "hash_mismatch",
        ),
        ("0.3.2", fleet.add(build_wheel("0.3.2", extra={"../../evil.py": b"x=1\n"})), "malformed"),
        ("0.3.3", fleet.add(build_wheel("0.3.3", purelib=False)), "wrong_target"),
    ]
    for version, ref, reason in cases:
        publish(mqtt_client, fleet, fleet.desired(version, ref))
        state = observer.state(
            lambda s, v=version: s.agent_update is not None and s.agent_update.version == v,
            f"the refusal of {version}",
        )
        update = state.agent_update
        assert update is not None
        assert (update.outcome, update.reason) == ("rejected", reason), update.detail
        assert state.agent_version == BASE
        rejected = observer.wait_kinds(version, "rejected")[-1]
        assert rejected.reason == reason and rejected.manifest_version == fleet.manifest_version
    disk = home(tmp_path)
    assert list(disk.versions_dir.iterdir()) == [] and list(disk.tmp_dir.iterdir()) == []
    assert not disk.current_link.is_symlink()
    assert not (tmp_path / "evil.py").exists() and not (tmp_path / "device" / "evil.py").exists()
    assert device.children() == children  # the same agent process all along
    assert device.running(BASE)["agent_update"]["outcome"] == "rejected"


def test_a_launcher_killed_mid_trial_converges_when_started_again(
    tmp_path: Path, fleet: Fleet, device: LauncherProcess, mqtt_client: Callable[..., Any]
) -> None:
    observer = Observer(mqtt_client("observer"), fleet.device_id)
    disk = home(tmp_path)

    def on_trial(version: str) -> bool:
        if not disk.state_path.exists():
            return False
        pending = disk.read_state().pending
        return pending is not None and pending.version == version and pending.attempts >= 1

    def kill_mid_trial(version: str) -> None:
        wait_for(lambda: on_trial(version), f"{version} on trial", timeout=WAIT)
        children = device.kill()
        # Killed at once: the child of the version on trial dies with its launcher.
        wait_for(lambda: all(gone(pid) for pid in children), "the orphaned agent to die", 10)
        assert disk.read_state().pending is not None  # it did not commit in between
        assert disk.current() == version and disk.installed(version)  # never half-installed

    # A good version, interrupted once: started again, it commits.
    device.start()
    device.running(BASE)
    publish(mqtt_client, fleet, fleet.desired("0.2.0", fleet.add(build_wheel("0.2.0"))))
    kill_mid_trial("0.2.0")
    device.start()
    state = observer.state(
        lambda s: s.agent_update is not None and s.agent_update.outcome == "activated",
        "0.2.0 committed after the restart",
    )
    assert state.agent_version == "0.2.0"
    assert disk.read_state().pending is None and disk.current() == "0.2.0"

    # A version that hangs, interrupted more often than max_starts (2): given up at the
    # next start, long before its deadline, back to 0.2.0 (which it replaced).
    ref = fleet.add(build_wheel("0.2.3", inject={"agent/agent.py": HANGS_AT_START}))
    publish(mqtt_client, fleet, fleet.desired("0.2.3", ref, health_timeout_s=3600))
    kill_mid_trial("0.2.3")
    device.start()
    wait_for(
        lambda: on_trial("0.2.3") and disk.read_state().pending.attempts == 2,  # type: ignore[union-attr]
        "the second start of 0.2.3",
    )
    kill_mid_trial("0.2.3")
    device.start()
    state = observer.state(
        lambda s: s.agent_update is not None and s.agent_update.outcome == "rolled_back",
        "0.2.3 given up",
    )
    assert state.agent_version == "0.2.0"
    update = state.agent_update
    assert update is not None
    assert (update.version, update.previous_version, update.reason) == (
        "0.2.3",
        "0.2.0",
        "agent_unhealthy",
    )
    assert update.detail is not None and "started 2 times" in update.detail
    assert disk.current() == "0.2.0" and disk.read_state().pending is None
    assert disk.versions() == ["0.2.0"]
    observer.wait_kinds("0.2.3", "health_check_failed", "rolled_back")


def test_a_version_with_an_install_window_is_installed_at_once_and_switched_to_inside_it(
    tmp_path: Path,
    fleet: Fleet,
    mqtt_broker: Any,
    mqtt_client: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In process, with the wall clock the test moves: the agent as its launcher runs it."""
    monkeypatch.setenv(LAUNCHED_ENV, str(os.getpid()))
    real_now = datetime.now(UTC)
    clock = {"now": real_now}
    opens = real_now + timedelta(hours=2)
    window = InstallWindow(
        start=opens.strftime("%H:%M"), end=(opens + timedelta(hours=1)).strftime("%H:%M")
    )
    config = AgentConfig.model_validate(
        {
            "device_id": fleet.device_id,
            "profile": PROFILE,
            "data_dir": str(tmp_path / "device"),
            "broker": {"url": mqtt_broker.url},
            "trust": {"root_keys": [fleet.root.public.to_base64()]},
            "http": {"port": 0},
        }
    )
    observer = Observer(mqtt_client("observer"), fleet.device_id)
    ref = fleet.add(build_wheel("0.2.0"))
    publish(mqtt_client, fleet, fleet.desired("0.2.0", ref, health_timeout_s=45, window=window))
    agent = Agent(config, wall_clock=lambda: clock["now"])
    agent.start()
    disk = home(tmp_path)
    try:
        state = observer.state(
            lambda s: s.agent_update is not None and s.agent_update.outcome == "staged",
            "the staged update",
        )
        assert state.agent_update is not None and state.agent_update.detail is not None
        assert str(window) in state.agent_update.detail
        observer.wait_kinds("0.2.0", "downloading", "downloaded", "verified", "staged")
        assert disk.installed("0.2.0", ref.sha256) and disk.current() is None
        assert not agent.restart_requested.is_set() and disk.read_state().pending is None

        clock["now"] = opens + timedelta(minutes=5)  # the window opens
        wait_for(agent.restart_requested.is_set, "the switch inside the window", 30)
        assert disk.current() == "0.2.0"
        pending = disk.read_state().pending
        assert pending is not None
        assert (pending.version, pending.previous, pending.previous_target) == ("0.2.0", BASE, None)
        assert (pending.health_timeout_s, pending.manifest_version, pending.attempts) == (45, 1, 0)
    finally:
        agent.stop()


def test_under_systemd_the_child_notifies_and_feeds_the_watchdog(tmp_path: Path) -> None:
    """The unit's ``NotifyAccess=all``: READY and WATCHDOG=1 come from the agent child
    (whose environment lost ``WATCHDOG_PID``, systemd's pid of the launcher), and the
    launcher says STOPPING on SIGTERM. A real Unix datagram socket tells the sender's
    pid (``SO_PASSCRED``), as it tells systemd."""
    root = tmp_path / "root.pub"
    root.write_text(SigningKey.generate().public.to_base64())
    config = tmp_path / "agent.toml"
    config.write_text(
        f'device_id = "cam-1"\nprofile = "{PROFILE}"\ndata_dir = "{tmp_path / "data"}"\n'
        f'[trust]\nroot_keys = ["{root}"]\n[http]\nenabled = false\n'
    )
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.settimeout(0.2)

        def receive(until: float, done: Callable[[int, str], bool]) -> list[tuple[int, str]]:
            got: list[tuple[int, str]] = []
            while time.monotonic() < until:
                try:
                    data, ancillary, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(12))
                except TimeoutError:
                    continue
                pid = next(
                    struct.unpack("iII", cdata[:12])[0]
                    for level, kind, cdata in ancillary
                    if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
                )
                got.append((pid, data.decode()))
                if done(*got[-1]):
                    break
            return got

        env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000", "PATH": "/usr/bin:/bin"}
        # As systemd starts it: WATCHDOG_PID is the launcher's own pid.
        launcher = subprocess.Popen(
            [
                "/bin/sh",
                "-c",
                'WATCHDOG_PID=$$ exec "$0" -m agent.cli launch --config "$1"',
                sys.executable,
                str(config),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            ready = receive(time.monotonic() + 60, lambda _pid, text: text.startswith("READY=1"))
            assert ready and ready[-1][1].startswith("READY=1"), ready
            child = ready[-1][0]
            assert child != launcher.pid
            assert Path(
                f"/proc/{launcher.pid}/task/{launcher.pid}/children"
            ).read_text().split() == [str(child)]
            fed = receive(time.monotonic() + 5, lambda _pid, _text: False)
            watchdog = [pid for pid, text in fed if text == "WATCHDOG=1"]
            assert len(watchdog) >= 2 and set(watchdog) == {child}, fed
            launcher.send_signal(signal.SIGTERM)
            stopping = receive(
                time.monotonic() + 30,
                lambda pid, text: pid == launcher.pid and text == "STOPPING=1",
            )
            assert (child, "STOPPING=1") in stopping and (launcher.pid, "STOPPING=1") in stopping
            assert launcher.wait(30) == 0
        finally:
            if launcher.poll() is None:
                launcher.kill()
            output = launcher.communicate()[0].decode(errors="replace")
    assert "cannot notify systemd" not in output
    assert gone(child)
