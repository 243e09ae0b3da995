"""Fixtures for tests that talk to a real MQTT broker.

- ``mqtt_broker`` (session): our own Mosquitto process on a free loopback port, configured
  from ``tests/broker/mosquitto.conf.template``; where no ``mosquitto`` binary is found, the
  embedded amqtt broker (:class:`server.broker.EmbeddedBroker`) instead.
  ``EDGEFLEET_TEST_BROKER=embedded`` forces the embedded one (to exercise that path on a
  machine with Mosquitto), ``EDGEFLEET_TEST_BROKER=mosquitto`` insists on Mosquitto.
- ``mosquitto_factory``: fresh Mosquitto processes a test may kill and restart.
- ``mqtt_client``: makes paho clients (MQTT 3.1.1) whose callbacks only put what arrives on a
  queue, so tests wait on events, never on the clock.
- :func:`operator_client` / :func:`authorize`: an HTTP test client of the API that sends an
  operator token (by default the admin token the dev-mode app made in its data dir).

The system Mosquitto on 127.0.0.1:1883 is never used.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import paho.mqtt.client as mqtt
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient as HttpClient
from hypothesis import HealthCheck, settings
from paho.mqtt.enums import CallbackAPIVersion

from server.auth.tokens import read_admin_token
from server.settings import Settings

# Property tests: no per-example deadline (CI machines are noisy); explore as usual.
settings.register_profile(
    "edgefleet", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "edgefleet"))

TEMPLATE = Path(__file__).parent / "broker" / "mosquitto.conf.template"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
_BROKER_ENV = "EDGEFLEET_TEST_BROKER"
_BROKER_USED = pytest.StashKey[str]()


@dataclass(frozen=True, slots=True)
class BrokerEndpoint:
    host: str
    port: int
    kind: Literal["mosquitto", "embedded"]
    url: str


# ----------------------------------------------------------------------------- Mosquitto


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    sbin = Path("/usr/sbin/mosquitto")  # not on PATH for most non-root users
    return str(sbin) if sbin.is_file() and os.access(sbin, os.X_OK) else None


def mosquitto_version(binary: str) -> str:
    # ``mosquitto -h`` prints "mosquitto version 2.0.11" first and exits non-zero.
    result = subprocess.run(
        [binary, "-h"], capture_output=True, text=True, timeout=STOP_TIMEOUT, check=False
    )
    match = re.search(r"mosquitto version (\S+)", result.stdout + result.stderr)
    return match.group(1) if match else "(unknown version)"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class MosquittoProcess:
    """One Mosquitto process with its own port and persistence directory.

    :meth:`start` again after :meth:`stop` or :meth:`kill` restarts it on the same port with
    the same data, as a real broker restart would.
    """

    def __init__(self, binary: str, data_dir: Path, port: int | None = None) -> None:
        self.binary = binary
        self.data_dir = data_dir
        self.port = port or free_port()
        self.endpoint = BrokerEndpoint(
            "127.0.0.1", self.port, "mosquitto", f"mqtt://127.0.0.1:{self.port}"
        )
        self.log_file = data_dir / "mosquitto.log"
        self.conf_file = data_dir / "mosquitto.conf"
        self._process: subprocess.Popen[bytes] | None = None
        data_dir.mkdir(parents=True, exist_ok=True)
        self.conf_file.write_text(
            TEMPLATE.read_text().format(port=self.port, data_dir=data_dir, user=getpass.getuser())
        )

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"mosquitto on port {self.port} is already running")
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(
                [self.binary, "-c", str(self.conf_file)], stdout=log, stderr=subprocess.STDOUT
            )
        self._wait_until_listening()

    def stop(self) -> None:
        """SIGTERM (Mosquitto saves its database), then SIGKILL if it lingers."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL: no goodbye, no final save."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL)
        process.wait(STOP_TIMEOUT)

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _wait_until_listening(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with code {self._process.returncode} while starting on "
                    f"port {self.port}; log tail:\n{self.log_tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"mosquitto did not accept connections on port {self.port} within "
                    f"{START_TIMEOUT:g} s; log tail:\n{self.log_tail()}"
                )
            # A child process gives no readiness event to wait on: poll its port.
            time.sleep(0.01)


def _broker_choice() -> tuple[str | None, str]:
    """(mosquitto binary or None for the embedded broker, why)."""
    wanted = os.environ.get(_BROKER_ENV, "").strip().lower()
    if wanted not in ("", "auto", "embedded", "mosquitto"):
        raise pytest.UsageError(f"{_BROKER_ENV} must be 'embedded' or 'mosquitto', not {wanted!r}")
    if wanted == "embedded":
        return None, f"{_BROKER_ENV}=embedded"
    binary = mosquitto_binary()
    if binary is None and wanted == "mosquitto":
        raise pytest.UsageError(f"{_BROKER_ENV}=mosquitto, but no mosquitto binary was found")
    return binary, "no mosquitto binary found"


@pytest.fixture(scope="session")
def mqtt_broker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BrokerEndpoint]:
    """A broker for the whole session: our own Mosquitto, else the embedded amqtt broker."""
    binary, why_embedded = _broker_choice()
    if binary is not None:
        mosquitto = MosquittoProcess(binary, tmp_path_factory.mktemp("mosquitto"))
        mosquitto.start()
        request.config.stash[_BROKER_USED] = (
            f"Mosquitto {mosquitto_version(binary)} (own process, {mosquitto.endpoint.url})"
        )
        try:
            yield mosquitto.endpoint
        finally:
            mosquitto.stop()
        return

    from server.broker import EmbeddedBroker

    embedded = EmbeddedBroker()
    embedded.start()
    request.config.stash[_BROKER_USED] = f"the embedded amqtt broker ({why_embedded})"
    try:
        yield BrokerEndpoint(embedded.host, embedded.port, "embedded", embedded.url)
    finally:
        embedded.stop()


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[[], MosquittoProcess]]:
    """Start fresh Mosquitto processes (own port and data) that the test may kill."""
    binary, why_embedded = _broker_choice()
    if binary is None:
        pytest.skip(f"needs a Mosquitto process it can kill and restart ({why_embedded})")
    started: list[MosquittoProcess] = []

    def start() -> MosquittoProcess:
        process = MosquittoProcess(binary, tmp_path / f"mosquitto-{len(started)}")
        started.append(process)
        process.start()
        return process

    yield start
    for process in started:
        process.stop()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    used = config.stash.get(_BROKER_USED, None)
    if used is not None:
        terminalreporter.write_line(f"MQTT tests ran against {used}")


# ----------------------------------------------------------------------------- clients


class Received(NamedTuple):
    topic: str
    payload: bytes
    retain: bool


class Will(NamedTuple):
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class TestClient:
    """A paho client (MQTT 3.1.1) connected to a broker, with a queue of what it receives.

    paho's network thread only enqueues (messages) or records (acks, disconnects) and never
    raises; the test thread waits on those with timeouts.
    """

    __test__ = False  # not a test class, despite the name

    def __init__(
        self,
        client_id: str,
        endpoint: BrokerEndpoint,
        *,
        clean_session: bool = True,
        will: Will | tuple[str, bytes, int, bool] | None = None,
        userdata: Any = None,
        timeout: float = 5.0,
    ) -> None:
        self.client_id = client_id
        self.endpoint = endpoint
        self.timeout = timeout
        self.session_present: bool | None = None
        self._messages: queue.Queue[Received] = queue.Queue()
        self._acks = threading.Condition()
        self._subacks: dict[int, list[mqtt.ReasonCode]] = {}
        self._connack: mqtt.ReasonCode | None = None
        self._disconnected = threading.Event()
        self._closed = False
        # No automatic reconnect: a dropped or killed connection stays down, as a test expects.
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
            userdata=userdata,
            reconnect_on_failure=False,
        )
        self._client.on_connect = self._on_connect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        if will is not None:
            topic, payload, qos, retain = will
            self._client.will_set(topic, payload, qos=qos, retain=retain)
        self._client.connect(endpoint.host, endpoint.port, keepalive=30)
        self._client.loop_start()
        with self._acks:
            self._acks.wait_for(lambda: self._connack is not None, timeout)
        if self._connack is None:
            self.close()
            raise AssertionError(f"{client_id}: no CONNACK from {endpoint.url} within {timeout} s")
        if self._connack.is_failure:
            self.close()
            raise AssertionError(
                f"{client_id}: {endpoint.url} refused the connection: {self._connack}"
            )

    # -- paho's thread: record and return, never raise

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        with self._acks:
            self.session_present = bool(flags.session_present)
            self._connack = reason
            self._acks.notify_all()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:  # an exception here would stop paho's thread
            topic = repr(message._topic)
        self._messages.put(Received(topic, bytes(message.payload), bool(message.retain)))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        with self._acks:
            self._subacks[mid] = list(codes)
            self._acks.notify_all()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._disconnected.set()

    # -- the test's side

    def subscribe(self, topic: str, qos: int = 1) -> int:
        """Subscribe and wait for the SUBACK; return the granted QoS."""
        result, mid = self._client.subscribe(topic, qos)
        assert result == mqtt.MQTT_ERR_SUCCESS, f"{self.client_id}: subscribe failed: {result}"
        with self._acks:
            self._acks.wait_for(lambda: mid in self._subacks, self.timeout)
            codes = self._subacks.pop(mid, None)
        if codes is None:
            raise AssertionError(
                f"{self.client_id}: no SUBACK for {topic!r} within {self.timeout} s"
            )
        if codes[0].is_failure:
            raise AssertionError(f"{self.client_id}: subscription to {topic!r} refused: {codes[0]}")
        return int(codes[0].value)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish and, for QoS 1/2, wait until the broker acknowledged it."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(self.timeout)
        if not info.is_published():
            raise AssertionError(
                f"{self.client_id}: {topic!r} not acknowledged within {self.timeout} s ({info.rc})"
            )

    def expect(self, timeout: float = 5.0) -> Received:
        """The next message: ``(topic, payload, retain)``."""
        try:
            return self._messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.client_id}: no message within {timeout} s") from None

    def expect_nothing(self, wait: float = 0.5) -> None:
        """Assert that no message arrives within ``wait`` seconds (absence takes a wait)."""
        try:
            got = self._messages.get(timeout=wait)
        except queue.Empty:
            return
        raise AssertionError(
            f"{self.client_id}: expected no message, got {got.topic!r} "
            f"({len(got.payload)} bytes, retain={got.retain})"
        )

    def drain(self, wait: float = 0.0) -> list[Received]:
        """What has arrived: wait up to ``wait`` s for a first message, then take all queued."""
        taken: list[Received] = []
        with contextlib.suppress(queue.Empty):
            taken.append(
                self._messages.get(timeout=wait) if wait > 0 else self._messages.get_nowait()
            )
            while True:
                taken.append(self._messages.get_nowait())
        return taken

    def disconnect(self) -> None:
        """Send DISCONNECT (no Last Will) and wait until the connection is closed."""
        if self._closed:
            return
        if not self._disconnected.is_set():
            self._client.disconnect()
            self._disconnected.wait(self.timeout)
        self.close()

    def drop(self) -> None:
        """Lose the connection without DISCONNECT, so the broker publishes the Last Will.

        Shutting the socket down makes paho's thread see the connection end; with automatic
        reconnect off it then stops, and no DISCONNECT packet is ever sent.
        """
        if self._closed:
            return
        sock = self._client.socket()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if not self._disconnected.wait(self.timeout):
            raise AssertionError(f"{self.client_id}: paho did not notice the dropped connection")
        self.close()

    def close(self) -> None:
        """Stop paho's thread (no network traffic)."""
        self._closed = True
        self._client.loop_stop()


@pytest.fixture
def mqtt_client(request: pytest.FixtureRequest) -> Iterator[Callable[..., TestClient]]:
    """``make(client_id, *, clean_session=True, will=None, userdata=None, endpoint=None)``.

    Clients connect to ``mqtt_broker`` unless given another ``endpoint``; all are
    disconnected at teardown.
    """
    clients: list[TestClient] = []

    def make(
        client_id: str,
        *,
        clean_session: bool = True,
        will: Will | tuple[str, bytes, int, bool] | None = None,
        userdata: Any = None,
        endpoint: BrokerEndpoint | None = None,
    ) -> TestClient:
        target = endpoint or request.getfixturevalue("mqtt_broker")
        client = TestClient(
            client_id, target, clean_session=clean_session, will=will, userdata=userdata
        )
        clients.append(client)
        return client

    yield make
    for client in reversed(clients):
        with contextlib.suppress(Exception):
            client.disconnect()


# ----------------------------------------------------------------------------- the API


def admin_token(settings: Settings) -> str:
    """The app's bootstrap admin token: ``admin_token``, else the one a dev-mode app wrote
    to ``<data_dir>/admin-token`` when it started."""
    if settings.admin_token is not None:
        return settings.admin_token.get_secret_value()
    token = read_admin_token(settings.data_dir)
    assert token is not None, f"no admin token in {settings.data_dir} (has the app started?)"
    return token


def authorize(client: HttpClient, app: FastAPI, token: str | None = None) -> HttpClient:
    """Make a started ``client`` of ``app`` send ``token`` (default: the admin token)."""
    client.headers["Authorization"] = f"Bearer {token or admin_token(app.state.settings)}"
    return client


@contextlib.contextmanager
def operator_client(app: FastAPI, token: str | None = None, **kwargs: Any) -> Iterator[HttpClient]:
    """A started FastAPI ``TestClient`` of ``app`` sending an operator token (default: admin)."""
    with HttpClient(app, **kwargs) as client:
        yield authorize(client, app, token)
