"""The attack suite: each attack on a real broker against a real agent.

Every test starts from the same place: an :class:`agent.agent.Agent` on a real MQTT
broker (Mosquitto when installed) that took a correctly signed desired state, fetched
model v1 over HTTP, verified, self-tested and activated it. Then one attack arrives -- a
desired state over the broker, or bytes from the artifact host, which stands for a
network attacker -- and the test asserts that

- the agent refused it with the reason the attack deserves, and reported it;
- model v1 is still the one served, from the same verified bundle;
- nothing from the attack was persisted: every file in the agent's data folder is as it
  was (the outbox, which holds the ``rejected`` event, aside), except the trust state a
  correctly signed document legitimately moved -- and the test says which part.

The fleet's half is built by hand here (root key, online keys, root-signed keyrings,
signed desired states, a host for artifacts), as a server would; the key ceremony's own
functions (:mod:`server.keys`) rotate and revoke. The rotation on a running server,
with the real app, is ``test_rotation_on_a_running_server``.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.agent import Agent
from agent.config import AgentConfig
from shared.bundle import Bundle, build_bundle
from shared.messages import (
    ArtifactRef,
    Deployment,
    DesiredMessage,
    DesiredState,
    Event,
    KeyEntry,
    Keyring,
)
from shared.signing import Envelope, PayloadType, Signature, SigningKey, sign_envelope
from shared.topics import Channel, device_topic
from tests.agent import conftest as agent_fixtures
from tests.conftest import BrokerEndpoint
from tests.server.rollouts.harness import wait_for

pytestmark = pytest.mark.broker

DEVICE = "cam-attacked"
PROFILE = "edge-x86_64-litert"
MODEL = "digits"
HUGE = 2**40

# The session's real, signed digits bundles (trained and converted once), as the agent's
# own tests build them.
bundle_key = agent_fixtures.bundle_key
digits_rows = agent_fixtures.digits_rows
digits_artifacts = agent_fixtures.digits_artifacts
make_digits_bundle = agent_fixtures.make_digits_bundle


# ----------------------------------------------------------------------------- artifact host


class ArtifactHost:
    """A real HTTP server with Range support that serves artifacts by sha256.

    ``hostile[sha256]`` makes it the attacker on the path: ``"tamper"`` flips one bit in
    what it sends; ``"endless"`` answers with the artifact and then zeros without end (no
    length, close-delimited) and counts what it managed to send before the agent hung up.
    """

    ENDLESS_CAP = 256 * 1024 * 1024  # a failing agent must not keep the test running forever

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.hostile: dict[str, str] = {}
        self.sent: dict[str, int] = {}
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                sha = self.path.rsplit("/", 1)[-1]
                data = host.files.get(sha)
                if data is None:
                    self.send_error(404)
                    return
                mode = host.hostile.get(sha)
                if mode == "endless":
                    self._endless(sha, data)
                    return
                if mode == "tamper":
                    flipped = bytearray(data)
                    flipped[len(flipped) // 2] ^= 0x01
                    data = bytes(flipped)
                start = 0
                ranged = self.headers.get("Range", "")
                if ranged.startswith("bytes="):
                    start = int(ranged[6:].split("-", 1)[0])
                body = data[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _endless(self, sha: str, data: bytes) -> None:
                self.send_response(200)
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                sent, chunk = 0, data + bytes(64 * 1024)
                try:
                    while sent < ArtifactHost.ENDLESS_CAP:
                        self.wfile.write(chunk)
                        sent += len(chunk)
                        chunk = bytes(64 * 1024)
                except OSError:  # the agent stopped reading and closed the connection
                    pass
                host.sent[sha] = sent

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def add(self, data: bytes) -> ArtifactRef:
        sha = hashlib.sha256(data).hexdigest()
        self.files[sha] = data
        return ArtifactRef(sha256=sha, length=len(data), url=f"/a/{sha}")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# ----------------------------------------------------------------------------- the fleet


class Fleet:
    """The server's half by hand: a root, online keys, keyrings, signed desired states."""

    def __init__(self, online: SigningKey, host: ArtifactHost, publish: Callable[..., None]):
        self.root = SigningKey.generate()
        self.online = [online]
        self.host = host
        self._publish = publish
        self.keyring_version = 0
        self.keyring = self.issue_keyring([online])

    def issue_keyring(
        self, keys: list[SigningKey], *, threshold: int = 1, signer: SigningKey | None = None
    ) -> Envelope:
        """The next keyring version listing ``keys``; it becomes the fleet's current one."""
        self.keyring_version += 1
        now = datetime.now(UTC)
        ring = Keyring(
            version=self.keyring_version,
            issued_at=now - timedelta(minutes=1),
            expires_at=now + timedelta(days=1),
            threshold=threshold,
            keys=[KeyEntry(keyid=k.keyid, public_key=k.public.to_base64()) for k in keys],
        )
        self.online = list(keys)
        self.keyring = sign_envelope(ring.to_bytes(), PayloadType.KEYRING, [signer or self.root])
        return self.keyring

    def deployment(self, bundle: bytes, model_version: int, target: str = PROFILE) -> Deployment:
        return Deployment(
            model_name=MODEL,
            model_version=model_version,
            target=target,
            artifact=self.host.add(bundle),
        )

    def message(
        self,
        version: int,
        deployments: list[Deployment],
        *,
        device: str = DEVICE,
        signers: list[SigningKey] | None = None,
        keyring: Envelope | None = None,
        expires_in: timedelta = timedelta(hours=1),
    ) -> bytes:
        now = datetime.now(UTC)
        state = DesiredState(
            device_id=device,
            manifest_version=version,
            issued_at=now - timedelta(hours=2),
            expires_at=now + expires_in,
            rollout_id="r-attack",
            deployments=deployments,
        )
        return DesiredMessage(
            keyring=keyring or self.keyring,
            manifest=sign_envelope(
                state.to_bytes(), PayloadType.DESIRED_STATE, signers or self.online
            ),
        ).to_bytes()

    def publish(self, payload: bytes) -> None:
        self._publish(device_topic(DEVICE, Channel.DESIRED), payload, retain=True)


def signed_bundle(make: Callable[..., Bundle], key: SigningKey, **changes: Any) -> bytes:
    bundle = make("tflite-float32", **changes)
    return build_bundle(bundle.manifest, bundle.model, [key])


# ----------------------------------------------------------------------------- the device


class Device:
    """The agent under attack, with what it looked like before the attack."""

    def __init__(self, agent: Agent, fleet: Fleet, good: Deployment, observer: Any) -> None:
        self.agent = agent
        self.fleet = fleet
        self.good = good
        self.observer = observer
        self.files = snapshot(agent)
        self.trust = json.loads(agent.trust_store.path.read_bytes())

    def baseline(self) -> Device:
        """The device as it is now, for the next attack (after a legitimate change)."""
        return Device(self.agent, self.fleet, self.good, self.observer)

    def attack(self, payload: bytes) -> tuple[str, str | None]:
        """Publish ``payload`` as the device's desired state; the outcome and reason of the
        update it caused. A refusal must also reach the broker as a ``rejected`` event."""
        before = self.agent.last_update
        self.observer.drain()
        self.fleet.publish(payload)
        wait_for(lambda: self.agent.last_update is not before, 60, "the attack to be handled")
        update = self.agent.last_update
        assert update is not None
        outcome, reason = str(update.outcome), update.reason
        if outcome == "rejected":
            events: list[Event] = []

            def reported() -> bool:
                events.extend(Event.from_bytes(m.payload) for m in self.observer.drain(0.2))
                return any(e.kind.value == "rejected" and e.reason == reason for e in events)

            wait_for(reported, 30, f"a rejected event ({reason}) on the broker")
        return outcome, None if reason is None else str(reason)

    def assert_unharmed(self, *, learned: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        """v1 still served from the same bundle; no file changed; the trust state only in
        the ``learned`` fields (a correctly signed manifest or keyring moved them)."""
        agent = self.agent
        model = agent.active_model()
        assert model is not None and model.manifest.model_version == 1
        current = agent.store.current(MODEL)
        assert current is not None and current.sha256 == self.good.artifact.sha256
        assert not any(agent.store.tmp_dir.iterdir()), list(agent.store.tmp_dir.iterdir())
        after = snapshot(agent)
        trust = json.loads(agent.trust_store.path.read_bytes())
        changed = {k for k in self.trust.keys() | trust.keys() if self.trust.get(k) != trust.get(k)}
        assert changed <= learned, (changed, learned)
        after.pop("trust.json")
        assert f"models/bundles/{self.good.artifact.sha256}.efb" in after, sorted(after)
        before = dict(self.files)
        before.pop("trust.json")
        assert after == before


def snapshot(agent: Agent) -> dict[str, str]:
    """sha256 of every file in the agent's data folder but its outbox (events are expected)."""
    root = agent.config.data_dir
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith("outbox.sqlite")
    }


@pytest.fixture
def host() -> Iterator[ArtifactHost]:
    artifact_host = ArtifactHost()
    yield artifact_host
    artifact_host.close()


@pytest.fixture
def fleet(host: ArtifactHost, mqtt_client: Any, bundle_key: SigningKey) -> Fleet:
    server = mqtt_client("attack-server")
    return Fleet(bundle_key, host, server.publish)


@pytest.fixture
def device(
    tmp_path: Path,
    fleet: Fleet,
    mqtt_broker: BrokerEndpoint,
    mqtt_client: Any,
    make_digits_bundle: Callable[..., Bundle],
    bundle_key: SigningKey,
) -> Iterator[Device]:
    observer = mqtt_client("attack-observer")
    observer.subscribe(f"ef/v1/dev/{DEVICE}/events")
    config = AgentConfig.model_validate(
        {
            "device_id": DEVICE,
            "profile": PROFILE,
            "data_dir": str(tmp_path / "device"),
            "window_seconds": 3600,
            "broker": {"url": mqtt_broker.url},
            "trust": {"root_keys": [fleet.root.public.to_base64()]},
            "http": {"enabled": False},
            "download": {"method": "http", "http_base_url": fleet.host.url},
            "limits": {"health_check_max_seconds": 1},
        }
    )
    good = fleet.deployment(signed_bundle(make_digits_bundle, bundle_key), 1)
    fleet.publish(fleet.message(5, [good]))
    agent = Agent(config)
    agent.start()
    try:
        kinds: list[str] = []

        def judged() -> bool:
            kinds.extend(Event.from_bytes(m.payload).kind.value for m in observer.drain(0.2))
            return "health_check_passed" in kinds

        wait_for(judged, 60, "model v1 activated and judged")
        # The event goes out before the probation marker is removed: the baseline is taken
        # once the device is at rest.
        wait_for(lambda: agent.store.probations() == [], 30, "the probation marker removed")
        yield Device(agent, fleet, good, observer)
    finally:
        agent.stop()
        # the retained desired state would reach the next test's agent
        fleet.publish(b"")


# ----------------------------------------------------------------------------- attacks


def test_tampered_artifact(device: Device, make_digits_bundle: Any, bundle_key: Any) -> None:
    """The network flips a bit in a correctly signed update's bundle."""
    fleet = device.fleet
    update = fleet.deployment(signed_bundle(make_digits_bundle, bundle_key, model_version=2), 2)
    fleet.host.hostile[update.artifact.sha256] = "tamper"
    assert device.attack(fleet.message(6, [update])) == ("failed", "hash_mismatch") or (
        device.agent.last_update is not None and device.agent.last_update.reason == "hash_mismatch"
    )
    # the manifest itself was genuine: the device learned its version, nothing else
    device.assert_unharmed(learned={"manifest_version", "manifest_sha256"})
    assert device.agent.trust.manifest_version == 6


def test_tampered_manifest(device: Device, make_digits_bundle: Any, bundle_key: Any) -> None:
    """A signed desired state altered after signing (another artifact, a higher version)."""
    fleet = device.fleet
    evil = fleet.deployment(signed_bundle(make_digits_bundle, bundle_key, model_version=9), 9)
    message = json.loads(fleet.message(6, [device.good]))
    state = json.loads(Envelope.model_validate(message["manifest"]).payload_bytes())
    state["manifest_version"] = 7
    state["deployments"] = [evil.model_dump(mode="json")]
    message["manifest"]["payload"] = base64.b64encode(json.dumps(state).encode()).decode()
    assert device.attack(json.dumps(message).encode()) == ("rejected", "bad_signature")
    device.assert_unharmed()
    assert evil.artifact.sha256 not in fleet.host.sent  # nothing was even fetched


def test_signed_by_an_unknown_key(device: Device) -> None:
    payload = device.fleet.message(6, [device.good], signers=[SigningKey.generate()])
    assert device.attack(payload) == ("rejected", "unknown_key")
    device.assert_unharmed()


def test_a_keyring_not_signed_by_the_root(device: Device) -> None:
    """The attacker lists their own key in a keyring they signed themselves."""
    fleet = device.fleet
    attacker = SigningKey.generate()
    now = datetime.now(UTC)
    ring = Keyring(
        version=fleet.keyring_version + 1,
        issued_at=now,
        expires_at=now + timedelta(days=1),
        keys=[KeyEntry(keyid=attacker.keyid, public_key=attacker.public.to_base64())],
    )
    forged = sign_envelope(ring.to_bytes(), PayloadType.KEYRING, [attacker])
    payload = fleet.message(6, [device.good], signers=[attacker], keyring=forged)
    assert device.attack(payload) == ("rejected", "unknown_key")
    device.assert_unharmed()


def test_unsigned(device: Device) -> None:
    message = json.loads(device.fleet.message(6, [device.good]))
    message["manifest"]["signatures"] = []
    assert device.attack(json.dumps(message).encode()) == ("rejected", "bad_signature")
    device.assert_unharmed()


def test_replayed_older_manifest(device: Device, make_digits_bundle: Any, bundle_key: Any) -> None:
    """Rollback: a genuine manifest from before the current one, replayed."""
    fleet = device.fleet
    old = fleet.deployment(signed_bundle(make_digits_bundle, bundle_key, model_version=3), 3)
    replay = fleet.message(4, [old])  # genuinely signed, but older than the accepted v5
    assert device.attack(replay) == ("rejected", "rollback")
    device.assert_unharmed()
    # the same version with other content is a rollback too
    assert device.attack(fleet.message(5, [old])) == ("rejected", "rollback")
    device.assert_unharmed()


def test_expired_manifest(device: Device, make_digits_bundle: Any, bundle_key: Any) -> None:
    """Freeze: a genuine newer manifest that expired while an attacker held it back."""
    fleet = device.fleet
    update = fleet.deployment(signed_bundle(make_digits_bundle, bundle_key, model_version=2), 2)
    payload = fleet.message(6, [update], expires_in=-timedelta(minutes=1))
    assert device.attack(payload) == ("rejected", "expired")
    device.assert_unharmed()


def test_endless_data_stops_at_the_signed_length(
    device: Device, make_digits_bundle: Any, bundle_key: Any
) -> None:
    """The artifact host answers a genuine update with its bundle and then zeros without end."""
    fleet = device.fleet
    update = fleet.deployment(signed_bundle(make_digits_bundle, bundle_key, model_version=2), 2)
    fleet.host.hostile[update.artifact.sha256] = "endless"
    outcome, reason = device.attack(fleet.message(6, [update]))
    assert (outcome, reason) == ("rejected", "length_mismatch")
    sent = wait_for(lambda: fleet.host.sent.get(update.artifact.sha256), 30, "the host to stop")
    # the agent hung up: the host sent far less than it would have (socket buffers aside)
    assert sent < ArtifactHost.ENDLESS_CAP // 4, sent
    device.assert_unharmed(learned={"manifest_version", "manifest_sha256"})


@pytest.mark.parametrize("mix", ["another model", "another profile", "another device"])
def test_mix_and_match(device: Device, make_digits_bundle: Any, bundle_key: Any, mix: str) -> None:
    """Genuinely signed pieces put together wrongly: a bundle of another model or built for
    another profile under this device's manifest, or another device's manifest."""
    fleet = device.fleet
    if mix == "another device":
        update = fleet.deployment(signed_bundle(make_digits_bundle, bundle_key, model_version=2), 2)
        payload = fleet.message(6, [update], device="cam-neighbour")
        assert device.attack(payload) == ("rejected", "wrong_device")
        device.assert_unharmed()
        return
    if mix == "another model":
        bundle = signed_bundle(make_digits_bundle, bundle_key, model_name="vibration")
    else:
        bundle = signed_bundle(
            make_digits_bundle, bundle_key, model_version=2, target="edge-x86_64-litert-int8"
        )
    update = fleet.deployment(bundle, 2)  # the manifest claims digits v2 for this profile
    outcome, reason = device.attack(fleet.message(6, [update]))
    assert (outcome, reason) == ("rejected", "wrong_target")
    device.assert_unharmed(learned={"manifest_version", "manifest_sha256"})


def test_one_signature_listed_twice_does_not_meet_a_threshold_of_two(device: Device) -> None:
    fleet = device.fleet
    first, second = fleet.online[0], SigningKey.generate()
    ring = fleet.issue_keyring([first, second], threshold=2)
    # the fleet moves to two-of-two: a genuine manifest signed by both carries the keyring
    assert device.attack(fleet.message(6, [device.good])) == ("activated", None)
    assert device.agent.trust.keyring is not None
    assert device.agent.trust.keyring.threshold == 2
    device = device.baseline()  # the keyring it learned is legitimate
    message = json.loads(fleet.message(7, [device.good], signers=[first]))
    (signature,) = message["manifest"]["signatures"]
    message["manifest"]["signatures"] = [signature, signature]
    assert (
        Envelope.model_validate(message["manifest"]).signatures
        == [Signature.model_validate(signature)] * 2
    )
    assert device.attack(json.dumps(message).encode()) == ("rejected", "threshold_not_met")
    device.assert_unharmed()
    assert device.agent.trust.keyring is not None and ring is fleet.keyring


def test_fast_forward_recovery_after_a_huge_manifest_version(
    device: Device, make_digits_bundle: Any, bundle_key: Any
) -> None:
    """A stolen online key signs manifest version 2**40: the device accepts it (it is
    validly signed) and would refuse every genuine manifest after it as a rollback. The
    operator rotates the online key; the next genuine manifest, from the new key under the
    new keyring, is accepted and the version floor starts again from it."""
    fleet = device.fleet
    stolen = fleet.online[0]
    # the attack: the same model (so the device keeps serving), a version no one can top
    assert device.attack(fleet.message(HUGE, [device.good], signers=[stolen])) == (
        "activated",
        None,
    )
    assert device.agent.trust.manifest_version == HUGE
    assert device.attack(fleet.message(6, [device.good])) == ("rejected", "rollback")
    # recovery: rotate the online key (the root signs a keyring without the stolen key)
    fresh = SigningKey.generate()
    fleet.issue_keyring([fresh])
    update = fleet.deployment(signed_bundle(make_digits_bundle, fresh, model_version=2), 2)
    outcome, _ = device.attack(fleet.message(6, [update]))
    assert outcome == "activated"
    agent = device.agent
    assert agent.trust.manifest_version == 6  # nothing of the attack's version is left
    assert agent.trust.keyring is not None and agent.trust.keyring.version == 2
    model = agent.active_model()
    assert model is not None and model.manifest.model_version == 2
    on_disk = json.loads(agent.trust_store.path.read_bytes())
    assert HUGE not in on_disk.values()
    # the stolen key is refused now, whatever version it signs
    assert device.attack(fleet.message(HUGE + 1, [device.good], signers=[stolen])) == (
        "rejected",
        "unknown_key",
    )
    assert agent.trust.manifest_version == 6


def test_a_revoked_key_is_refused_with_either_keyring(device: Device) -> None:
    """Revocation without reflashing: the root-signed keyring drops the old key; documents
    it signs are refused, with the new keyring attached or the old one replayed."""
    fleet = device.fleet
    old = fleet.online[0]
    old_ring = fleet.keyring
    fleet.issue_keyring([SigningKey.generate()])
    assert device.attack(fleet.message(6, [device.good])) == ("activated", None)
    assert device.agent.trust.keyring is not None and device.agent.trust.keyring.version == 2
    device = device.baseline()
    assert device.attack(fleet.message(7, [device.good], signers=[old])) == (
        "rejected",
        "unknown_key",
    )
    device.assert_unharmed()
    replay = fleet.message(7, [device.good], signers=[old], keyring=old_ring)
    assert device.attack(replay) == ("rejected", "rollback")  # keyring v1 < the held v2
    device.assert_unharmed()
    assert device.agent.trust.manifest_version == 6


def test_the_running_model_survives_a_restart_after_its_signing_key_rotated_out(
    device: Device,
) -> None:
    """The bundle v1 was signed by the old key; after the rotation the device still loads
    it at start-up (the earlier keyring vouches for it, re-verified against the root) --
    while a keyring entry tampered on disk vouches for nothing."""
    fleet = device.fleet
    old = fleet.online[0]
    fleet.issue_keyring([SigningKey.generate()])
    assert device.attack(fleet.message(6, [device.good])) == ("activated", None)
    agent = device.agent
    agent.stop()
    restarted = Agent(agent.config)
    restarted.start()
    try:
        assert restarted.store.load_problems == {}
        model = restarted.active_model()
        assert model is not None and model.manifest.model_version == 1
    finally:
        restarted.stop()
    # an attacker with the disk lists their own key in the remembered keyring: no use
    trust = json.loads(agent.trust_store.path.read_bytes())
    (earlier,) = trust["earlier_keyrings"]
    ring = json.loads(Envelope.model_validate(earlier).payload_bytes())
    intruder = SigningKey.generate()
    ring["keys"] = [{"keyid": intruder.keyid, "public_key": intruder.public.to_base64()}]
    earlier["payload"] = base64.b64encode(json.dumps(ring).encode()).decode()
    agent.trust_store.path.write_text(json.dumps(trust))
    keys, _ = agent.trust_store.bundle_keys(agent.trust_store.load(now=datetime.now(UTC)))
    assert intruder.keyid not in keys and old.keyid not in keys
    assert set(keys) == {k.keyid for k in fleet.online}


# ----------------------------------------------------------------------------- on a server


@pytest.mark.slow
def test_rotation_on_a_running_server(
    tmp_path: Path, mqtt_broker: BrokerEndpoint, mqtt_client: Any
) -> None:
    """The key ceremony against the real app and a real agent, no restart, no reflash.

    The fleet's keys are made the production way (root on "offline" media, the keys folder
    holding root.pub, one online key and the keyring); the device runs model v1 signed with
    that key. ``edgefleet keys rotate-online`` writes keyring v2: the running server takes
    it up (:class:`server.keys.KeyringWatcher`), serves it, re-signs the device's desired
    state with the new key, and the agent accepts it. A desired state the retired key
    signs is refused from then on; the next version, signed with the new key, installs.
    """
    from typer.testing import CliRunner

    from server.cli import app as edgefleet
    from server.keys import KeyringWatcher, keyring_recorder
    from tests.server.rollouts.harness import Clock, RolloutServer, publish_versions

    runner = CliRunner()
    offline, data_dir = tmp_path / "usb", tmp_path / "server"
    keys_dir = data_dir / "keys"
    for args in (
        ["init-root", "--out", str(offline)],
        ["add-online", "--root-key", str(offline / "root.key")],
    ):
        done = runner.invoke(edgefleet, ["keys", *args, "--keys-dir", str(keys_dir)])
        assert done.exit_code == 0, done.output
    (old_file,) = (keys_dir / "online").glob("*.key")
    stolen = SigningKey.from_base64(old_file.read_text())  # what a thief would have

    clock = Clock()
    device_id = "cam-rotating"
    with RolloutServer(
        db_url=f"sqlite:///{tmp_path / 'server.db'}",
        data_dir=data_dir,
        broker=mqtt_broker,
        clock=clock,
        alert_evaluator=False,
    ) as server:
        app = server.app
        assert not (keys_dir / "root.key").exists()
        # What create_app should wire (see the report): follow the keys folder.
        watcher = KeyringWatcher(keys_dir, app.state.keys, clock=clock, interval=0.2)
        watcher.subscribe(lambda keys: setattr(app.state, "keys", keys))
        watcher.subscribe(lambda keys: setattr(app.state.desired_publisher, "keys", keys))
        watcher.subscribe(keyring_recorder(app.state.engine))
        watcher.start()
        enrolled = server.enroll(device_id)
        config = AgentConfig.model_validate(
            {
                "device_id": device_id,
                "profile": PROFILE,
                "data_dir": str(tmp_path / "device"),
                "window_seconds": 3600,
                "broker": {
                    "url": mqtt_broker.url,
                    "username": enrolled["credentials"]["username"],
                    "password": enrolled["credentials"]["password"],
                },
                "trust": {"root_keys": [str(keys_dir / "root.pub")]},
                "http": {"enabled": False},
                "limits": {"health_check_max_seconds": 1},
            }
        )
        agent = Agent(config)
        agent.start()
        try:
            (first,) = publish_versions(app, 1)
            server.call("PUT", f"/devices/{device_id}/pins/{MODEL}", json={"version": first})

            def running(version: int) -> bool:
                model = agent.active_model()
                return model is not None and model.manifest.model_version == version

            wait_for(lambda: running(first), 60, f"v{first} running")
            assert agent.trust.keyring is not None and agent.trust.keyring.version == 1

            rotated = runner.invoke(
                edgefleet,
                ["keys", "rotate-online", "--root-key", str(offline / "root.key"),
                 "--keys-dir", str(keys_dir), "--json"],
            )  # fmt: skip
            assert rotated.exit_code == 0, rotated.output
            assert json.loads(rotated.stdout)["removed"] == [stolen.keyid]
            wait_for(
                lambda: agent.trust.keyring is not None and agent.trust.keyring.version == 2,
                30,
                "the device on keyring v2",
            )
            assert server.call("GET", "/keyring")["version"] == 2
            assert stolen.keyid not in server.call("GET", "/keyring")["online_keyids"]
            assert running(first)  # the same model, under the new key's manifest
            accepted = agent.trust.manifest_version

            # the retired key, used by whoever kept it: refused by the device
            before = agent.last_update
            now = datetime.now(UTC)
            forged = DesiredState(
                device_id=device_id,
                manifest_version=accepted + 1000,
                issued_at=now,
                expires_at=now + timedelta(hours=1),
                deployments=[],
            )
            attacker = mqtt_client("attacker")
            attacker.publish(
                device_topic(device_id, Channel.DESIRED),
                DesiredMessage(
                    keyring=app.state.keys.keyring_envelope,
                    manifest=sign_envelope(forged.to_bytes(), PayloadType.DESIRED_STATE, [stolen]),
                ).to_bytes(),
                retain=True,
            )
            wait_for(lambda: agent.last_update is not before, 30, "the forged state handled")
            assert agent.last_update is not None
            assert (agent.last_update.outcome, agent.last_update.reason) == (
                "rejected",
                "unknown_key",
            )
            assert agent.trust.manifest_version == accepted and running(first)

            # the next version is signed (bundle and desired state) with the new key
            (second,) = publish_versions(app, 1)
            server.call("PUT", f"/devices/{device_id}/pins/{MODEL}", json={"version": second})
            wait_for(lambda: running(second), 60, f"v{second} running")
            assert agent.trust.manifest_version > accepted
        finally:
            agent.stop()
            watcher.stop()
