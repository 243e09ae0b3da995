"""Broker identities and ACLs, against a real Mosquitto started with the configuration
``server.brokerconf`` generates -- and, where amqtt can enforce it, the embedded broker.

Absence is asserted on delivery, never on acknowledgements (over MQTT 3.1.1 a denied
PUBLISH is still acknowledged): after each forbidden publish the test sends a message
the receiver *may* get and reads everything up to it. The broker handles one
connection's packets in order and a publisher waits for its PUBACK before the next
step, so anything forbidden that got through would have arrived before that sentinel.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.app import create_app
from server.broker import EmbeddedBroker
from server.brokerconf.access import FleetAccess
from server.brokerconf.render import DEVICE_ACL, DEVICE_PASSWORDS, Listener, MosquittoLayout
from server.brokerconf.render import TlsFiles as ListenerTls
from server.brokerconf.writer import write_broker_config
from server.cli import app as cli
from server.db import create_db_engine
from shared.messages import BlockRequest, Presence, PresenceStatus, decode_block
from shared.topics import Channel, device_topic, fleet_filter
from tests.conftest import MosquittoProcess, free_port, mosquitto_binary, operator_client
from tests.security.conftest import (
    SERVICE_PASSWORD,
    SERVICE_USER,
    TIMEOUT,
    EnrolledFleet,
    Pki,
    Probe,
    Tls,
    enrolled_fleet,
    fleet_settings,
)

pytestmark = pytest.mark.broker

DEVICES = {
    "dev-a": "accepted",
    "dev-b": "accepted",
    "dev-c": "accepted",  # logs in with a client certificate
    "dev-d": "accepted",  # a certificate device the Mosquitto test revokes
    "dev-r": "accepted",  # revoked by the Mosquitto revocation test
    "dev-r2": "accepted",  # revoked to see Mosquitto reload in the certificate test
    "dev-e": "accepted",  # revoked by the embedded-broker revocation test
    "dev-p": "pending",
    "dev-x": "rejected",
}
WILDCARD_NAMES = ["+", "#", "dev-a/#", "dev-a/+", "ef/v1/dev/+", "+/#", "dev-b/desired"]


def topic(device_id: str, channel: Channel) -> str:
    return device_topic(device_id, channel)


@dataclass
class Secured:
    """A broker enforcing the fleet's rules: where devices and the server connect."""

    kind: str
    fleet: EnrolledFleet
    device_port: int
    service_port: int
    out: Path | None = None
    cert_port: int | None = None
    pki: Pki | None = None

    def device(self, device_id: str, *, client_id: str | None = None, **options: object) -> Probe:
        return Probe(
            self.device_port,
            client_id=device_id if client_id is None else client_id,
            username=device_id,
            password=self.fleet.passwords.get(device_id, "no-password"),
            **options,  # type: ignore[arg-type]
        )

    def service(self, client_id: str) -> Probe:
        return Probe(
            self.service_port, client_id=client_id, username=SERVICE_USER, password=SERVICE_PASSWORD
        )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnrolledFleet]:
    """Devices enrolled through the API; the app keeps a Mosquitto configuration in ``out``."""
    tmp = tmp_path_factory.mktemp("fleet")
    out = tmp / "mosquitto"
    with enrolled_fleet(
        tmp, DEVICES, broker_config_dir=out, broker_pid_file=out / "mosquitto.pid"
    ) as enrolled:
        yield enrolled


@pytest.fixture(scope="module")
def mosquitto(fleet: EnrolledFleet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("needs a mosquitto binary")
    out = fleet.settings.broker_config_dir
    assert out is not None and fleet.settings.broker_pid_file is not None
    pki = Pki(tmp_path_factory.mktemp("pki"))
    device_port, cert_port, service_port = free_port(), free_port(), free_port()
    layout = MosquittoLayout(
        directory=out,
        device_listeners=(
            Listener(device_port, "127.0.0.1"),
            Listener(
                cert_port,
                "127.0.0.1",
                ListenerTls(pki.server.cert, pki.server.key, pki.ca, client_certificates=True),
            ),
        ),
        service_listener=Listener(service_port, "127.0.0.1"),
        pid_file=fleet.settings.broker_pid_file,
        user=getpass.getuser(),
    )
    engine = create_db_engine(fleet.settings.resolved_database_url)
    write_broker_config(
        engine, layout, service_username=SERVICE_USER, service_password=SERVICE_PASSWORD
    )
    engine.dispose()
    process = MosquittoProcess(binary, tmp_path_factory.mktemp("mosquitto-run"), device_port)
    process.conf_file = out / "mosquitto.conf"
    process.port = service_port  # the last listener opened: start() waits for it
    process.start()
    try:
        yield Secured("mosquitto", fleet, device_port, service_port, out, cert_port, pki)
    finally:
        process.stop()


@pytest.fixture(scope="module")
def embedded(fleet: EnrolledFleet) -> Iterator[Secured]:
    engine = create_db_engine(fleet.settings.resolved_database_url)
    access = FleetAccess(
        engine,
        service_username=SERVICE_USER,
        service_password=SERVICE_PASSWORD,
        recheck_seconds=0.0,  # every action re-reads the credential: revocation is immediate
    )
    broker = EmbeddedBroker(access=access)
    broker.start()
    try:
        yield Secured("embedded", fleet, broker.port, broker.port)
    finally:
        broker.stop()
        engine.dispose()


@pytest.fixture(params=["mosquitto", "embedded"], scope="module")
def secured(request: pytest.FixtureRequest) -> Secured:
    broker: Secured = request.getfixturevalue(request.param)
    return broker


# ----------------------------------------------------------------------------- both brokers


def test_a_device_reaches_only_its_own_topics(secured: Secured, probes: list[Probe]) -> None:
    server = secured.service("srv-own-topics")
    probes.append(server)
    assert server.connected, server.outcome
    device_sent = [Channel.STATE, Channel.PRESENCE, Channel.EVENTS, Channel.TELEMETRY]
    assert all(server.subscribe(*(fleet_filter(c) for c in device_sent)))
    assert server.subscribe(fleet_filter(Channel.ARTIFACT_REQUEST, share_group="blocks")) == [True]
    server.publish(topic("dev-a", Channel.DESIRED), b"desired-a", retain=True)
    server.publish(topic("dev-b", Channel.DESIRED), b"desired-b", retain=True)

    a, b = secured.device("dev-a"), secured.device("dev-b")
    probes += [a, b]
    assert a.connected and b.connected, (a.outcome, b.outcome)
    others = a.subscribe(
        topic("dev-b", Channel.DESIRED), "ef/v1/dev/+/desired", "#", "ef/v1/dev/dev-b/#"
    )
    if secured.kind == "embedded":  # Mosquitto grants them, and delivers nothing through them
        assert others == [False] * 4
    assert a.subscribe(topic("dev-a", Channel.DESIRED), topic("dev-a", Channel.ARTIFACT_BLOCK)) == [
        True,
        True,
    ]
    assert b.subscribe(topic("dev-b", Channel.DESIRED), topic("dev-b", Channel.ARTIFACT_BLOCK)) == [
        True,
        True,
    ]

    # device A tries B's topics in both directions, and the channels it may not write
    a.publish(topic("dev-b", Channel.DESIRED), b"forged", retain=True)
    a.publish(topic("dev-b", Channel.ARTIFACT_BLOCK), b"forged")
    for channel in [*device_sent, Channel.ARTIFACT_REQUEST]:
        a.publish(topic("dev-b", channel), b"forged")
    a.publish(topic("dev-a", Channel.DESIRED), b"forged", retain=True)
    a.publish(topic("dev-a", Channel.ARTIFACT_BLOCK), b"forged")
    a.publish("ef/v1/elsewhere", b"forged")
    a.publish(topic("dev-a", Channel.TELEMETRY), b"telemetry-a")
    server.publish(topic("dev-b", Channel.ARTIFACT_BLOCK), b"block-b")
    server.publish(topic("dev-a", Channel.ARTIFACT_BLOCK), b"block-a")

    heard = server.until(b"telemetry-a")
    assert [m.payload for m in heard] == [b"telemetry-a"]
    assert heard[0].topic == topic("dev-a", Channel.TELEMETRY)
    got_a = a.until(b"block-a")
    assert {m.topic for m in got_a} == {
        topic("dev-a", Channel.DESIRED),
        topic("dev-a", Channel.ARTIFACT_BLOCK),
    }
    assert b"forged" not in {m.payload for m in got_a} and b"desired-b" not in {
        m.payload for m in got_a
    }
    assert [m.payload for m in b.until(b"block-b")] == [b"desired-b", b"block-b"]

    # the forged retained message was not stored either
    b_again = secured.device("dev-b")
    probes.append(b_again)
    assert b_again.subscribe(topic("dev-b", Channel.DESIRED)) == [True]
    b_again.publish(topic("dev-b", Channel.STATE), b"state-b")
    assert server.until(b"state-b")[-1].topic == topic("dev-b", Channel.STATE)
    assert b_again.messages.get(timeout=TIMEOUT).payload == b"desired-b"


def test_wildcards_in_a_username_or_client_id_get_nowhere(
    secured: Secured, probes: list[Probe]
) -> None:
    password_a = secured.fleet.passwords["dev-a"]
    for name in WILDCARD_NAMES:
        for port, password in ((secured.device_port, password_a), (secured.service_port, None)):
            probe = Probe(
                port, client_id=name, username=name, password=password or SERVICE_PASSWORD
            )
            probes.append(probe)
            assert not probe.connected, f"username {name!r} got in: {probe.outcome}"

    server = secured.service("srv-wildcards")
    b = secured.device("dev-b")
    probes += [server, b]
    assert b.subscribe(topic("dev-b", Channel.DESIRED), topic("dev-b", Channel.ARTIFACT_BLOCK))
    server.publish(topic("dev-b", Channel.DESIRED), b"desired-b", retain=True)
    for index, client_id in enumerate(["dev-b", *WILDCARD_NAMES]):
        # device A's own password with another client id: B's id, or one full of wildcards
        probe = secured.device("dev-a", client_id=client_id)
        probes.append(probe)
        if secured.kind == "embedded":
            assert not probe.connected, f"client id {client_id!r} got in: {probe.outcome}"
            continue
        # Mosquitto replaces the client id with the username: this is device A, nobody else
        assert probe.connected, probe.outcome
        probe.subscribe(
            "#", topic("dev-b", Channel.DESIRED), topic("dev-a", Channel.ARTIFACT_BLOCK)
        )
        probe.publish(topic("dev-b", Channel.STATE), b"forged")
        sentinel = f"block-a-{index}".encode()
        server.publish(topic("dev-a", Channel.ARTIFACT_BLOCK), sentinel)
        got = probe.until(sentinel)
        assert {m.topic for m in got} <= {
            topic("dev-a", Channel.DESIRED),
            topic("dev-a", Channel.ARTIFACT_BLOCK),
        }, got
        probe.close()
    # B was never thrown off by a client taking its client id, and still hears its server
    server.publish(topic("dev-b", Channel.ARTIFACT_BLOCK), b"block-b")
    assert [m.payload for m in b.until(b"block-b")][-1] == b"block-b"
    assert not b.disconnected.is_set()


def test_wrong_passwords_unaccepted_devices_and_anonymous_clients_are_refused(
    secured: Secured, probes: list[Probe]
) -> None:
    passwords = secured.fleet.passwords
    refused = [
        Probe(secured.device_port, client_id="anonymous"),
        Probe(secured.service_port, client_id="anonymous"),
        Probe(secured.device_port, client_id="dev-a", username="dev-a", password="wrong"),
        Probe(secured.device_port, client_id="dev-a", username="dev-a"),  # no password
        secured.device("dev-p"),  # pending: right password, not accepted yet
        secured.device("dev-x"),  # rejected: its credential is revoked
        secured.device("dev-unknown"),
        Probe(
            secured.service_port,
            client_id="srv",
            username=SERVICE_USER,
            password=SERVICE_PASSWORD + "x",
        ),
    ]
    if secured.kind == "mosquitto":  # separate listeners: neither password works on the other
        refused += [
            Probe(
                secured.device_port,
                client_id="srv",
                username=SERVICE_USER,
                password=SERVICE_PASSWORD,
            ),
            Probe(
                secured.service_port,
                client_id="dev-a",
                username="dev-a",
                password=passwords["dev-a"],
            ),
        ]
    probes += refused
    assert [p.outcome for p in refused if p.connected] == []


def test_a_last_will_cannot_speak_for_another_device(secured: Secured, probes: list[Probe]) -> None:
    server = secured.service("srv-wills")
    probes.append(server)
    server.subscribe(fleet_filter(Channel.PRESENCE))
    forged = secured.device("dev-a", will=(topic("dev-b", Channel.PRESENCE), b"forged", 1, True))
    probes.append(forged)
    if secured.kind == "mosquitto":  # admitted; the Will is dropped when it would be sent
        assert forged.connected, forged.outcome
        forged.drop()
    else:  # refused outright
        assert not forged.connected
    honest = secured.device(
        "dev-a", will=(topic("dev-a", Channel.PRESENCE), b"offline-a", 1, False)
    )
    probes.append(honest)
    assert honest.connected, honest.outcome
    honest.drop()
    assert [m.payload for m in server.until(b"offline-a")] == [b"offline-a"]


# ----------------------------------------------------------------------------- revocation


def test_mosquitto_drops_and_refuses_a_revoked_device(
    mosquitto: Secured, probes: list[Probe]
) -> None:
    assert mosquitto.out is not None
    server = mosquitto.service("srv-revoke")
    device = mosquitto.device("dev-r", clean_session=False)
    probes += [server, device]
    assert device.subscribe(topic("dev-r", Channel.DESIRED)) == [True]
    server.publish(topic("dev-r", Channel.DESIRED), b"desired-r-1", retain=True)
    device.until(b"desired-r-1")

    mosquitto.fleet.revoke("dev-r")  # the API re-renders the files and sends SIGHUP

    assert device.disconnected.wait(TIMEOUT), "Mosquitto kept the revoked device connected"
    passwords = (mosquitto.out / DEVICE_PASSWORDS).read_text().splitlines()
    assert {line.partition(":")[0] for line in passwords} >= {"dev-a", "dev-b"} - {"dev-r"}
    assert not any(line.startswith("dev-r:") for line in passwords)
    acl = (mosquitto.out / DEVICE_ACL).read_text().splitlines()
    assert "user dev-a" in acl and "user dev-r" not in acl
    server.publish(topic("dev-r", Channel.DESIRED), b"desired-r-2", retain=True)
    again = mosquitto.device("dev-r", clean_session=False)
    probes.append(again)
    assert again.outcome == "Not authorized"
    assert again.messages.empty()


def test_the_embedded_broker_cuts_off_a_revoked_device(
    embedded: Secured, probes: list[Probe]
) -> None:
    server = embedded.service("srv-revoke")
    device, witness = embedded.device("dev-e"), embedded.device("dev-a")
    probes += [server, device, witness]
    server.subscribe(fleet_filter(Channel.TELEMETRY))
    assert device.subscribe(topic("dev-e", Channel.DESIRED)) == [True]
    server.publish(topic("dev-e", Channel.DESIRED), b"desired-e-1", retain=True)
    device.until(b"desired-e-1")

    embedded.fleet.revoke("dev-e")

    # still connected (amqtt cannot be told to drop it), but nothing passes either way
    device.publish(topic("dev-e", Channel.TELEMETRY), b"after-revocation")
    witness.publish(topic("dev-a", Channel.TELEMETRY), b"telemetry-a")
    assert [m.payload for m in server.until(b"telemetry-a")] == [b"telemetry-a"]
    server.publish(topic("dev-e", Channel.DESIRED), b"desired-e-2", retain=True)
    assert device.subscribe(topic("dev-e", Channel.DESIRED)) == [False]
    device.nothing_within(0.3)
    again = embedded.device("dev-e")
    probes.append(again)
    assert not again.connected and again.messages.empty()


# ----------------------------------------------------------------------------- TLS


def test_a_client_certificate_logs_a_device_in_and_bad_ones_are_refused(
    mosquitto: Secured, probes: list[Probe]
) -> None:
    pki, port = mosquitto.pki, mosquitto.cert_port
    assert pki is not None and port is not None
    server = mosquitto.service("srv-tls")
    probes.append(server)
    server.subscribe(fleet_filter(Channel.STATE))
    server.publish(topic("dev-c", Channel.DESIRED), b"desired-c", retain=True)

    device = Probe(port, client_id="dev-c", tls=Tls(pki.ca, pki.issue("dev-c", "dev-c")))
    probes.append(device)
    assert device.connected, device.outcome
    device.subscribe(
        topic("dev-c", Channel.DESIRED),
        topic("dev-c", Channel.ARTIFACT_BLOCK),
        topic("dev-b", Channel.DESIRED),
    )
    device.publish(topic("dev-b", Channel.STATE), b"forged")
    device.publish(topic("dev-c", Channel.STATE), b"state-c")
    assert [m.payload for m in server.until(b"state-c")] == [b"state-c"]
    server.publish(topic("dev-c", Channel.ARTIFACT_BLOCK), b"block-c")
    assert [m.payload for m in device.until(b"block-c")] == [b"desired-c", b"block-c"]

    refused = [
        Probe(port, client_id="dev-c", tls=Tls(pki.ca, pki.issue("old", "dev-c", expired=True))),
        Probe(port, client_id="dev-c", tls=Tls(pki.ca, pki.issue_by_stranger("rogue", "dev-c"))),
        Probe(port, client_id="dev-c", tls=Tls(pki.ca)),  # no certificate
        # a password is no way around the certificate on this listener
        Probe(
            port,
            client_id="dev-a",
            username="dev-a",
            password=mosquitto.fleet.passwords["dev-a"],
            tls=Tls(pki.ca),
        ),
    ]
    probes += refused
    assert [p.outcome for p in refused if p.connected] == []


def test_a_certificate_that_still_verifies_is_worth_nothing_once_revoked(
    mosquitto: Secured, probes: list[Probe]
) -> None:
    """Mosquitto cannot refuse the handshake of a revoked device's certificate (that takes
    the CA's CRL), so the ACL holds no topic for it; a pending device's alike."""
    pki, port = mosquitto.pki, mosquitto.cert_port
    assert pki is not None and port is not None
    server, witness = mosquitto.service("srv-tls-revoked"), mosquitto.device("dev-a")
    probes += [server, witness]
    server.subscribe(fleet_filter(Channel.STATE))
    for device_id in ("dev-d", "dev-p"):
        server.publish(
            topic(device_id, Channel.DESIRED), f"desired-{device_id}".encode(), retain=True
        )
    certificate = pki.issue("dev-d", "dev-d")
    before = Probe(port, client_id="dev-d", tls=Tls(pki.ca, certificate))
    probes.append(before)
    assert before.subscribe(topic("dev-d", Channel.DESIRED)) == [True]
    before.until(b"desired-dev-d")

    password_device = mosquitto.device("dev-r2")
    probes.append(password_device)
    assert password_device.connected, password_device.outcome

    mosquitto.fleet.revoke("dev-d")
    # Mosquitto reloads on SIGHUP in its own time: a password device revoked after dev-d
    # is dropped by a reload that has dev-d's revocation too
    mosquitto.fleet.revoke("dev-r2")
    assert password_device.disconnected.wait(TIMEOUT)

    # The connection from before the revocation may stay up (its certificate is still
    # valid), but it has no topic left: what it sends goes nowhere.
    if not before.disconnected.is_set():
        before.publish(topic("dev-d", Channel.STATE), b"forged")
    witness.publish(topic("dev-a", Channel.STATE), b"state-a-1")
    assert [m.payload for m in server.until(b"state-a-1")] == [b"state-a-1"]

    # New connections with the revoked device's and a pending device's certificates
    cut_off = []
    for device_id, cert in (("dev-d", certificate), ("dev-p", pki.issue("dev-p", "dev-p"))):
        probe = Probe(port, client_id=device_id, tls=Tls(pki.ca, cert))
        probes.append(probe)
        if probe.connected:  # the certificate still verifies: TLS lets it in
            probe.subscribe(topic(device_id, Channel.DESIRED))
            probe.publish(topic(device_id, Channel.STATE), b"forged")
            cut_off.append(probe)
    witness.publish(topic("dev-a", Channel.STATE), b"state-a-2")
    assert [m.payload for m in server.until(b"state-a-2")] == [b"state-a-2"]
    server.publish(topic("dev-d", Channel.DESIRED), b"desired-dev-d-2", retain=True)
    if cut_off:
        cut_off[0].nothing_within(0.3)
    assert [probe.messages.qsize() for probe in cut_off] == [0] * len(cut_off)
    assert before.messages.empty()


# ----------------------------------------------------------------------------- the server


def test_the_servers_own_clients_log_in_with_the_service_identity(
    mosquitto: Secured, probes: list[Probe]
) -> None:
    """The server's publisher, block server, ingestor and inventory consumer, started by the
    app against Mosquitto's service listener, get exactly the access they need."""
    settings = fleet_settings(
        mosquitto.fleet.settings.data_dir.parent,
        broker_url=f"mqtt://127.0.0.1:{mosquitto.service_port}",
        block_share_group="blocks",
        ingest_share_group="ingest",
    )
    with operator_client(create_app(settings)) as client:
        state = client.app.state  # type: ignore[attr-defined]
        assert state.desired_publisher.connected
        assert state.inventory.subscribed
        device = mosquitto.device("dev-a")
        probes.append(device)
        assert device.subscribe(topic("dev-a", Channel.ARTIFACT_BLOCK)) == [True]
        # an artifact request reaches the block server through its shared subscription,
        # and its answer reaches the device
        request = BlockRequest(
            device_id="dev-a", request_id="r1", sha256="0" * 64, offset=0, block_size=1024
        )
        device.publish(topic("dev-a", Channel.ARTIFACT_REQUEST), request.to_bytes())
        header, _ = decode_block(device.messages.get(timeout=TIMEOUT).payload)
        assert header.request_id == "r1" and header.error is not None
        # a presence report reaches the inventory consumer
        presence = Presence(
            device_id="dev-a", status=PresenceStatus.ONLINE, session_started_at=datetime.now(UTC)
        )
        device.publish(topic("dev-a", Channel.PRESENCE), presence.to_bytes())
        assert state.inventory.wait_until(lambda stats: stats["applied"] >= 1, TIMEOUT)
        assert client.get("/api/v1/devices/dev-a").json()["online"] is True


def test_broker_config_writes_a_configuration_mosquitto_runs_as_is(
    fleet: EnrolledFleet, tmp_path: Path, probes: list[Probe]
) -> None:
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("needs a mosquitto binary")
    pki = Pki(tmp_path / "pki")
    out, device_port, service_port = tmp_path / "conf", free_port(), free_port()
    pid_file = out / "mosquitto.pid"
    arguments = [
        "broker-config",
        "--out",
        str(out),
        "--port",
        str(device_port),
        "--bind",
        "127.0.0.1",
        "--tls-cert",
        str(pki.server.cert),
        "--tls-key",
        str(pki.server.key),
        "--service-port",
        str(service_port),
        "--pid-file",
        str(pid_file),
        "--user",
        getpass.getuser(),
        "--db",
        fleet.settings.resolved_database_url,
        "--json",
    ]
    environment = {
        "EDGEFLEET_BROKER_USERNAME": SERVICE_USER,
        "EDGEFLEET_BROKER_PASSWORD": SERVICE_PASSWORD,
    }
    runner = CliRunner()
    first = runner.invoke(cli, arguments, env=environment)
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["reloaded"] is False and report["devices"] >= 3
    assert report["server_environment"]["EDGEFLEET_BROKER_URL"] == (
        f"mqtt://127.0.0.1:{service_port}"
    )
    assert report["server_environment"]["EDGEFLEET_DEVICE_BROKER_URL"] == (
        f"mqtts://127.0.0.1:{device_port}"
    )

    process = MosquittoProcess(binary, tmp_path / "run", device_port)
    process.conf_file = out / "mosquitto.conf"
    process.port = service_port  # the last listener opened: start() waits for it
    process.start()
    try:
        device = Probe(
            device_port,
            client_id="dev-b",
            username="dev-b",
            password=fleet.passwords["dev-b"],
            tls=Tls(pki.ca),
        )
        wrong = Probe(
            device_port, client_id="dev-b", username="dev-b", password="wrong", tls=Tls(pki.ca)
        )
        plain = Probe(
            device_port, client_id="dev-b", username="dev-b", password=fleet.passwords["dev-b"]
        )
        server = Probe(
            service_port, client_id="srv", username=SERVICE_USER, password=SERVICE_PASSWORD
        )
        probes += [device, wrong, plain, server]
        assert device.connected and server.connected, (device.outcome, server.outcome)
        assert not wrong.connected and not plain.connected
        # nothing changed: nothing rewritten, no reload
        second = runner.invoke(cli, arguments, env=environment)
        assert second.exit_code == 0, second.output
        assert json.loads(second.stdout)["changed"] == []
        # the development password is refused outside dev mode
        prod = runner.invoke(
            cli, arguments, env={"EDGEFLEET_MODE": "prod", "EDGEFLEET_SECRET_KEY": "k" * 40}
        )
        assert prod.exit_code == 2
        assert "built-in development password" in " ".join(prod.output.split())
    finally:
        process.stop()
