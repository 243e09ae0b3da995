"""Helpers for the security tests: a certificate authority made on the spot, an MQTT probe
that reports refusals instead of raising, and a fleet enrolled through the real API."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import queue
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion

from server.app import create_app
from server.settings import Settings
from tests.conftest import operator_client

PROFILE = "edge-x86_64-litert"
SERVICE_USER = "server@edgefleet"
SERVICE_PASSWORD = "service-password-for-the-security-tests"
TIMEOUT = 5.0


# ----------------------------------------------------------------------------- certificates


class CertFiles(NamedTuple):
    cert: Path
    key: Path


@dataclass
class Pki:
    """A CA, a server certificate for 127.0.0.1 and client certificates, as PEM files."""

    directory: Path
    ca: Path = field(init=False)
    server: CertFiles = field(init=False)
    _ca_key: ec.EllipticCurvePrivateKey = field(init=False)
    _ca_cert: x509.Certificate = field(init=False)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._ca_key, self._ca_cert = _self_signed("edgefleet test CA")
        self.ca = self._write_cert("ca.pem", self._ca_cert)
        self.server = self.issue("server", "localhost", server=True)

    def issue(
        self, name: str, common_name: str, *, server: bool = False, expired: bool = False
    ) -> CertFiles:
        """A certificate for ``common_name`` signed by this CA (``expired``: a year ago)."""
        return self._issue(name, common_name, self._ca_key, self._ca_cert, server, expired)

    def issue_by_stranger(self, name: str, common_name: str) -> CertFiles:
        """A certificate for ``common_name`` from a CA the broker does not know."""
        key, cert = _self_signed("someone else's CA")
        return self._issue(name, common_name, key, cert, False, False)

    def _issue(
        self,
        name: str,
        common_name: str,
        issuer_key: ec.EllipticCurvePrivateKey,
        issuer: x509.Certificate,
        server: bool,
        expired: bool,
    ) -> CertFiles:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        start, end = (
            (now - dt.timedelta(days=400), now - dt.timedelta(days=35))
            if expired
            else (now - dt.timedelta(minutes=5), now + dt.timedelta(days=30))
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(issuer.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(issuer_key, hashes.SHA256())
        key_path = self.directory / f"{name}.key"
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        return CertFiles(self._write_cert(f"{name}.pem", cert), key_path)

    def _write_cert(self, name: str, cert: x509.Certificate) -> Path:
        path = self.directory / name
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path


def _self_signed(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


# ----------------------------------------------------------------------------- MQTT probe


class Message(NamedTuple):
    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True)
class Tls:
    ca: Path
    client: CertFiles | None = None


class Probe:
    """A paho client (MQTT 3.1.1) whose connection may be refused: :attr:`outcome` says how.

    ``outcome`` is ``"Success"``, the CONNACK's reason when the broker refused, or
    ``"no connection: ..."`` when the TCP or TLS connection never carried a CONNACK. paho
    callbacks only record; the test waits on them with timeouts.
    """

    def __init__(
        self,
        port: int,
        *,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        tls: Tls | None = None,
        clean_session: bool = True,
        will: tuple[str, bytes, int, bool] | None = None,
    ) -> None:
        self.client_id = client_id
        self.messages: queue.Queue[Message] = queue.Queue()
        self.outcome = "no connection: no answer"
        self._answered = threading.Event()
        self.disconnected = threading.Event()
        self._subacks: dict[int, list[Any]] = {}
        self._lock = threading.Condition()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=clean_session,
            reconnect_on_failure=False,
        )
        if username is not None:
            client.username_pw_set(username, password)
        if will is not None:
            will_topic, payload, qos, retain = will
            client.will_set(will_topic, payload, qos=qos, retain=retain)
        if tls is not None:
            context = ssl.create_default_context(cafile=str(tls.ca))
            if tls.client is not None:
                context.load_cert_chain(str(tls.client.cert), str(tls.client.key))
            client.tls_set_context(context)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._client = client
        try:
            client.connect("127.0.0.1", port, keepalive=30)
        except (OSError, ssl.SSLError) as e:
            self.outcome = f"no connection: {type(e).__name__}: {e}"
            return
        client.loop_start()
        if not self._answered.wait(TIMEOUT):
            self.outcome = "no connection: no CONNACK"
        if self.outcome != "Success":
            client.loop_stop()

    @property
    def connected(self) -> bool:
        return self.outcome == "Success"

    # -- paho's thread: record, never raise

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.outcome = str(reason)
        self._answered.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, p: Any) -> None:
        if not self._answered.is_set():
            self.outcome = f"no connection: closed ({reason})"
            self._answered.set()
        self.disconnected.set()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with contextlib.suppress(UnicodeDecodeError):
            self.messages.put(Message(message.topic, bytes(message.payload), bool(message.retain)))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        with self._lock:
            self._subacks[mid] = list(codes)
            self._lock.notify_all()

    # -- the test's side

    def subscribe(self, *topic_filters: str) -> list[bool]:
        """Subscribe (QoS 1) and wait for the SUBACK; whether each filter was granted."""
        result, mid = self._client.subscribe([(f, 1) for f in topic_filters])
        assert result == mqtt.MQTT_ERR_SUCCESS and mid is not None, f"{self.client_id}: {result}"
        with self._lock:
            assert self._lock.wait_for(lambda: mid in self._subacks, TIMEOUT), "no SUBACK"
            codes = self._subacks.pop(mid)
        return [not code.is_failure for code in codes]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the PUBACK (which says nothing about delivery)."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(TIMEOUT)
        assert info.is_published(), f"{self.client_id}: no PUBACK for {topic}"

    def until(self, payload: bytes) -> list[Message]:
        """Every message up to and including the one carrying ``payload`` (a sentinel)."""
        got: list[Message] = []
        while True:
            try:
                message = self.messages.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(
                    f"{self.client_id}: no {payload!r} within {TIMEOUT} s; got {got}"
                ) from None
            got.append(message)
            if message.payload == payload:
                return got

    def nothing_within(self, seconds: float) -> None:
        try:
            message = self.messages.get(timeout=seconds)
        except queue.Empty:
            return
        raise AssertionError(f"{self.client_id}: expected nothing, got {message}")

    def drop(self) -> None:
        """Lose the connection without DISCONNECT, so the broker sends the Last Will."""
        sock = self._client.socket()
        if isinstance(sock, socket.socket):  # TLS sockets are socket.socket too
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        assert self.disconnected.wait(TIMEOUT), f"{self.client_id}: the drop went unnoticed"
        self._client.loop_stop()

    def close(self) -> None:
        if self.connected and not self.disconnected.is_set():
            self._client.disconnect()
            self.disconnected.wait(TIMEOUT)
        self._client.loop_stop()


@pytest.fixture
def probes() -> Iterator[list[Probe]]:
    """Probes a test opens (append them); all are closed at the end."""
    opened: list[Probe] = []
    yield opened
    for probe in opened:
        with contextlib.suppress(Exception):
            probe.close()


# ----------------------------------------------------------------------------- the fleet


@dataclass
class EnrolledFleet:
    """A server app (embedded-broker mode, no MQTT services) and the devices it enrolled."""

    client: TestClient
    settings: Settings
    passwords: dict[str, str]

    def revoke(self, device_id: str) -> None:
        response = self.client.post(f"/api/v1/devices/{device_id}/revoke")
        assert response.status_code == 200, response.text

    def enroll(self, device_id: str, *, accept: bool) -> str:
        token = self.client.post(
            "/api/v1/provisioning-tokens", json={"auto_accept": accept, "profile": PROFILE}
        ).json()["token"]
        response = self.client.post(
            "/api/v1/enroll",
            json={
                "token": token,
                "device_id": device_id,
                "profile": PROFILE,
                "arch": "x86_64",
                "runtime": {"name": "litert", "version": "2.3.0"},
                "runtimes": {"litert": "2.3.0"},
                "agent_version": "0.1.0",
            },
        )
        assert response.status_code == 201, response.text
        password: str = response.json()["credentials"]["password"]
        self.passwords[device_id] = password
        return password


def fleet_settings(tmp: Path, **overrides: Any) -> Settings:
    return Settings(
        data_dir=tmp / "data",
        database_url=f"sqlite:///{tmp / 'fleet.db'}",
        run_jobs=False,
        broker_username=SERVICE_USER,
        broker_password=SERVICE_PASSWORD,  # type: ignore[arg-type]
        **overrides,
    )


@contextlib.contextmanager
def enrolled_fleet(tmp: Path, devices: dict[str, str], **overrides: Any) -> Iterator[EnrolledFleet]:
    """An app on a fresh database with ``devices`` (id -> "accepted" | "pending" |
    "rejected") enrolled through the API."""
    settings = fleet_settings(tmp, **overrides)
    with operator_client(create_app(settings)) as client:
        fleet = EnrolledFleet(client, settings, {})
        for device_id, status in devices.items():
            fleet.enroll(device_id, accept=status == "accepted")
            if status == "rejected":
                response = client.post(f"/api/v1/devices/{device_id}/reject")
                assert response.status_code == 200, response.text
        yield fleet
