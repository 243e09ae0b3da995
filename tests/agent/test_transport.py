"""The MQTT transport against a real broker: presence and Last Will, persistent sessions,
reconnects with backoff, resubscription, and a loop that survives failing callbacks."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.config import BrokerConfig, Limits
from agent.errors import AgentError
from agent.transport import InboundMessage, MqttTransport, TransportError, backoff_delay
from shared.messages import Presence, PresenceStatus
from shared.topics import Channel, device_topic
from tests.conftest import BrokerEndpoint, MosquittoProcess, TestClient, mosquitto_binary

ROOT = Path(__file__).resolve().parents[2]
FAST = Limits(backoff_min_seconds=0.05, backoff_max_seconds=0.5)
MakeTransport = Callable[..., MqttTransport]


def new_device_id(prefix: str = "dev") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """A bounded poll on a condition that has no event of its own."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(0.01)


def next_inbound(transport: MqttTransport, timeout: float = 5.0) -> InboundMessage:
    return transport.inbox.get(timeout=timeout)


@pytest.fixture
def make_transport() -> Iterator[MakeTransport]:
    """``make(endpoint, device_id, protocol="3.1.1", start=True)``; all stopped at teardown."""
    made: list[MqttTransport] = []

    def make(
        endpoint: BrokerEndpoint, device_id: str, *, protocol: str = "3.1.1", start: bool = True
    ) -> MqttTransport:
        config = BrokerConfig(url=endpoint.url, keepalive=5, protocol=protocol)  # type: ignore[arg-type]
        transport = MqttTransport(config, device_id=device_id, limits=FAST)
        made.append(transport)
        if start:
            transport.start()
        return transport

    yield make
    for transport in made:
        transport.stop()


# ----------------------------------------------------------------------------- backoff (pure)


class EdgeRng(random.Random):
    """Always draws the top (or bottom) of the range asked for."""

    def __init__(self, top: bool) -> None:
        super().__init__()
        self.top = top

    def uniform(self, a: float, b: float) -> float:
        return b if self.top else a


def test_backoff_ceiling_doubles_until_the_cap() -> None:
    delays = [backoff_delay(n, minimum=0.25, maximum=3.0, rng=EdgeRng(top=True)) for n in range(7)]
    assert delays == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0, 3.0]
    floor = [backoff_delay(n, minimum=0.25, maximum=3.0, rng=EdgeRng(top=False)) for n in range(7)]
    assert floor == [0.25] * 7


def test_backoff_is_jittered_within_bounds_and_grows() -> None:
    rng = random.Random(4)
    for attempt in [*range(50), 1_000, 10**9]:
        delay = backoff_delay(attempt, minimum=1.0, maximum=120.0, rng=rng)
        assert 1.0 <= delay <= 120.0
    first = [backoff_delay(0, minimum=1.0, maximum=120.0, rng=rng) for _ in range(300)]
    late = [backoff_delay(10, minimum=1.0, maximum=120.0, rng=rng) for _ in range(300)]
    assert max(first) <= 2.0 and len({round(d, 3) for d in first}) > 100  # jittered at once
    assert sum(late) / len(late) > 40 * sum(first) / len(first)


@pytest.mark.parametrize(("attempt", "low", "high"), [(-1, 1.0, 2.0), (0, 0.0, 1.0), (0, 2.0, 1.0)])
def test_backoff_refuses_nonsense(attempt: int, low: float, high: float) -> None:
    with pytest.raises(ValueError):
        backoff_delay(attempt, minimum=low, maximum=high, rng=random.Random())


def test_unusable_tls_files_are_a_transport_error(tmp_path: Path) -> None:
    config = BrokerConfig(url="mqtts://127.0.0.1:8883", ca_file=tmp_path / "missing-ca.pem")
    with pytest.raises(TransportError, match="cannot set up") as info:
        MqttTransport(config, device_id="cam-1", limits=FAST)
    assert isinstance(info.value, AgentError)


# ----------------------------------------------------------------------------- over a broker


@pytest.mark.broker
@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_connect_publishes_online_presence_retained(
    protocol: str,
    mqtt_broker: BrokerEndpoint,
    mqtt_client: Callable[..., TestClient],
    make_transport: MakeTransport,
) -> None:
    if protocol == "5" and mqtt_broker.kind == "embedded":
        pytest.skip("the embedded amqtt broker speaks MQTT 3.1.1 only")
    device_id = new_device_id()
    topic = device_topic(device_id, Channel.PRESENCE)
    transport = make_transport(mqtt_broker, device_id, protocol=protocol)
    assert transport.connected.wait(5)
    watcher = mqtt_client(f"watch-{device_id}")
    watcher.subscribe(topic)
    watcher.expect()  # live or retained, depending on who was first: it reached the broker
    late = mqtt_client(f"late-{device_id}")  # so a late subscriber gets the retained copy
    late.subscribe(topic)
    received = late.expect()
    assert received.retain
    presence = Presence.from_bytes(received.payload)
    assert presence.device_id == device_id and presence.status is PresenceStatus.ONLINE
    assert presence.session_started_at is not None

    transport.stop()  # a clean stop says offline itself (a clean DISCONNECT sends no Will)
    assert Presence.from_bytes(watcher.expect().payload).status is PresenceStatus.OFFLINE


@pytest.mark.broker
def test_last_will_says_offline_when_the_agent_process_is_killed(
    mqtt_broker: BrokerEndpoint, mqtt_client: Callable[..., TestClient]
) -> None:
    device_id = new_device_id()
    watcher = mqtt_client(f"watch-{device_id}")
    watcher.subscribe(device_topic(device_id, Channel.PRESENCE))
    script = (
        "import sys, threading\n"
        "from agent.config import BrokerConfig, Limits\n"
        "from agent.transport import MqttTransport\n"
        "t = MqttTransport(BrokerConfig(url=sys.argv[1], keepalive=5), device_id=sys.argv[2],\n"
        "                  limits=Limits(backoff_min_seconds=0.05, backoff_max_seconds=0.5))\n"
        "t.start()\n"
        "print('connected' if t.connected.wait(10) else 'timeout', flush=True)\n"
        "threading.Event().wait()\n"
    )
    agent = subprocess.Popen(
        [sys.executable, "-c", script, mqtt_broker.url, device_id],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert agent.stdout is not None
        assert agent.stdout.readline().strip() == "connected"
        online = Presence.from_bytes(watcher.expect().payload)
        assert online.status is PresenceStatus.ONLINE
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
    will = watcher.expect(timeout=10)
    assert Presence.from_bytes(will.payload).status is PresenceStatus.OFFLINE
    late = mqtt_client(f"late-{device_id}")
    late.subscribe(device_topic(device_id, Channel.PRESENCE))
    retained = late.expect()
    assert retained.retain and Presence.from_bytes(retained.payload).status == "offline"


@pytest.mark.broker
def test_messages_sent_while_away_arrive_through_the_persistent_session(
    mqtt_broker: BrokerEndpoint,
    mqtt_client: Callable[..., TestClient],
    make_transport: MakeTransport,
) -> None:
    device_id = new_device_id()
    topic = device_topic(device_id, Channel.ARTIFACT_BLOCK)  # QoS 1, not retained
    first = make_transport(mqtt_broker, device_id)
    assert first.subscribe(topic).wait(5)
    first.stop()

    server = mqtt_client(f"server-{device_id}")
    for i in range(3):
        server.publish(topic, f"block {i}".encode(), qos=1)

    second = make_transport(mqtt_broker, device_id)  # no subscribe: the session has it
    assert second.connected.wait(5)
    got = [next_inbound(second) for _ in range(3)]
    assert [m.payload for m in got] == [b"block 0", b"block 1", b"block 2"]
    assert all(m.topic == topic and m.qos == 1 for m in got)
    assert second.session_present is True


@pytest.mark.broker
def test_resubscribes_after_a_broker_restart_that_forgot_the_session(
    mosquitto_factory: Callable[[], MosquittoProcess],
    mqtt_client: Callable[..., TestClient],
    make_transport: MakeTransport,
) -> None:
    broker = mosquitto_factory()
    device_id = new_device_id()
    topic = device_topic(device_id, Channel.DESIRED)
    transport = make_transport(broker.endpoint, device_id)
    assert transport.subscribe(topic).wait(5)

    broker.kill()
    (broker.data_dir / "mosquitto.db").unlink(missing_ok=True)  # a broker with no memory
    wait_until(lambda: transport.last_error is not None, what="the device to notice")
    broker.start()
    wait_until(lambda: transport.connection_count == 2, what="the reconnect")
    assert transport.session_present is False  # only our own SUBSCRIBE can make this work
    assert transport.loop_restarts == 0

    server = mqtt_client(f"server-{device_id}", endpoint=broker.endpoint)
    server.publish(topic, b"after the restart", qos=1)
    message = next_inbound(transport)
    assert (message.topic, message.payload) == (topic, b"after the restart")


@pytest.mark.broker
def test_keeps_retrying_until_the_broker_appears(
    mosquitto_factory: Callable[[], MosquittoProcess], make_transport: MakeTransport
) -> None:
    broker = mosquitto_factory()
    broker.stop()
    transport = make_transport(broker.endpoint, new_device_id())
    wait_until(lambda: transport.last_error is not None, what="a failed attempt")
    assert not transport.connected.is_set()
    handle = transport.publish(device_topic(transport.device_id, Channel.EVENTS), b"queued")
    broker.start()
    assert transport.connected.wait(5)
    assert handle.wait(5)  # published while offline, sent after the CONNACK


@pytest.mark.broker
def test_a_raising_callback_does_not_stop_the_loop(
    mqtt_broker: BrokerEndpoint,
    mqtt_client: Callable[..., TestClient],
    make_transport: MakeTransport,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    device_id = new_device_id()
    inbound = device_topic(device_id, Channel.DESIRED)
    outbound = device_topic(device_id, Channel.EVENTS)
    transport = make_transport(mqtt_broker, device_id)
    assert transport.subscribe(inbound).wait(5)
    server = mqtt_client(f"server-{device_id}")

    # 1. paho's on_message fails inside (the inbox raises): the guard swallows it.
    real_put = transport.inbox.put_nowait
    calls: list[object] = []

    def broken_put(item: InboundMessage) -> None:
        calls.append(item)
        monkeypatch.setattr(transport.inbox, "put_nowait", real_put)
        raise RuntimeError("injected failure in on_message")

    monkeypatch.setattr(transport.inbox, "put_nowait", broken_put)
    with caplog.at_level(logging.ERROR, logger="agent.transport"):
        server.publish(inbound, b"lost", qos=1)
        wait_until(lambda: len(calls) == 1, what="the failing callback")
        server.publish(inbound, b"kept", qos=1)
        assert next_inbound(transport).payload == b"kept"
    assert any(getattr(r, "event", None) == "mqtt_callback_failed" for r in caplog.records)

    # 2. a user's on_acked hook raises: logged, and the next publish still completes.
    handle = transport.publish(outbound, b"one")
    handle.on_acked(lambda h: 1 / 0)
    assert handle.wait(5)
    second = transport.publish(outbound, b"two")
    assert second.wait(5) and second.reason_code == 0
    assert transport.loop_restarts == 0 and transport.connected.is_set()


@pytest.mark.broker
def test_the_supervisor_restarts_a_loop_that_died(
    mqtt_broker: BrokerEndpoint, make_transport: MakeTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    device_id = new_device_id()
    transport = make_transport(mqtt_broker, device_id)
    assert transport.connected.wait(5)
    client = transport._client  # fault injection: nothing public can kill the loop
    real_loop = client.loop

    def dies_once(timeout: float = 1.0) -> object:
        monkeypatch.setattr(client, "loop", real_loop)
        raise RuntimeError("injected: the network loop dies")

    monkeypatch.setattr(client, "loop", dies_once)
    wait_until(lambda: transport.loop_restarts == 1, what="the supervisor's restart")
    handle = transport.publish(device_topic(device_id, Channel.EVENTS), b"still alive")
    assert handle.wait(5)
    assert transport.connected.is_set() and transport.connection_count == 1


# ----------------------------------------------------------------------------- TLS


def write_pki(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    now = dt.datetime.now(dt.UTC)

    def issue(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, object] | None, ca: bool
    ) -> x509.Certificate:
        issuer_name, issuer_key = issuer or (subject, key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        return builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]

    paths: dict[str, Path] = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue("edgefleet test CA", ca_key, None, ca=True)
    for name, cert, key in [("ca", ca, ca_key)] + [
        (name, issue(name, k, ("edgefleet test CA", ca_key), ca=False), k)
        for name, k in (
            ("server", ec.generate_private_key(ec.SECP256R1())),
            ("client", ec.generate_private_key(ec.SECP256R1())),
        )
    ]:
        paths[f"{name}_cert"] = folder / f"{name}.pem"
        paths[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{name}_key"] = folder / f"{name}.key"
        paths[f"{name}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return paths


@pytest.mark.broker
@pytest.mark.usefixtures("mosquitto_factory")  # for its skip where no Mosquitto can run
def test_tls_with_a_client_certificate(tmp_path: Path) -> None:
    binary = mosquitto_binary()
    assert binary is not None
    pki = write_pki(tmp_path)
    broker = MosquittoProcess(binary, tmp_path / "tls-broker")
    with broker.conf_file.open("a") as conf:  # makes the template's one listener a TLS one
        conf.write(
            f"cafile {pki['ca_cert']}\ncertfile {pki['server_cert']}\n"
            f"keyfile {pki['server_key']}\nrequire_certificate true\n"
        )
    broker.start()
    transports: list[MqttTransport] = []
    try:
        url = f"mqtts://127.0.0.1:{broker.port}"
        good = BrokerConfig(
            url=url,
            ca_file=pki["ca_cert"],
            cert_file=pki["client_cert"],
            key_file=pki["client_key"],
        )
        transport = MqttTransport(good, device_id=new_device_id(), limits=FAST)
        transports.append(transport)
        transport.start()
        assert transport.connected.wait(10), transport.last_error
        handle = transport.publish(device_topic(transport.device_id, Channel.EVENTS), b"over tls")
        assert handle.wait(5)

        stranger = MqttTransport(  # trusts another CA: the handshake fails, it keeps trying
            BrokerConfig(url=url, cert_file=pki["client_cert"], key_file=pki["client_key"]),
            device_id=new_device_id(),
            limits=FAST,
        )
        transports.append(stranger)
        stranger.start()
        wait_until(lambda: stranger.last_error is not None, what="the failed handshake")
        assert not stranger.connected.is_set()
        assert "certificate" in (stranger.last_error or "").lower()
    finally:
        for transport in transports:
            transport.stop()
        broker.stop()
