"""The whole agent against a real broker: a signed update is fetched over the block
protocol, verified, self-tested, activated and reported; refused updates change nothing;
a restart serves the last good model with no broker at all."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from agent.agent import Agent
from agent.cli import app as agent_cli
from agent.config import AgentConfig, load_config
from server.artifacts import ArtifactStore
from server.delivery.blocks import BlockServer
from shared.bundle import Bundle, build_bundle
from shared.messages import (
    ArtifactRef,
    Deployment,
    DesiredMessage,
    DesiredState,
    DeviceState,
    Event,
    KeyEntry,
    Keyring,
)
from shared.signing import PayloadType, SigningKey, sign_envelope
from shared.topics import Channel, device_topic

pytestmark = pytest.mark.broker
runner = CliRunner()
DEVICE = "cam-e2e"
PROFILE = "edge-x86_64-litert"


def wait_for(condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


class Fleet:
    """The server's half, by hand: keys, a store, a block server, signed desired states."""

    def __init__(self, tmp_path: Path, broker: Any, online: SigningKey) -> None:
        self.root = SigningKey.generate()
        self.online = online
        now = datetime.now(UTC)
        keyring = Keyring(
            version=1,
            issued_at=now - timedelta(minutes=1),
            expires_at=now + timedelta(days=1),
            keys=[KeyEntry(keyid=online.keyid, public_key=online.public.to_base64())],
        )
        self.keyring = sign_envelope(keyring.to_bytes(), PayloadType.KEYRING, [self.root])
        self.store = ArtifactStore(tmp_path / "server-artifacts")
        self.allowed: set[str] = set()
        self.blocks = BlockServer(
            self.store,
            authorize=lambda _device, sha: sha in self.allowed,
            host=broker.host,
            port=broker.port,
        )
        self.blocks.start()

    def add(self, data: bytes) -> ArtifactRef:
        stored = self.store.put_bytes(data)
        self.allowed.add(stored.sha256)
        return ArtifactRef(sha256=stored.sha256, length=stored.length)

    def desired(self, version: int, ref: ArtifactRef, model_version: int = 1) -> bytes:
        now = datetime.now(UTC)
        state = DesiredState(
            device_id=DEVICE,
            manifest_version=version,
            issued_at=now,
            expires_at=now + timedelta(hours=1),
            rollout_id="r-e2e",
            deployments=[
                Deployment(
                    model_name="digits", model_version=model_version, target=PROFILE, artifact=ref
                )
            ],
        )
        return DesiredMessage(
            keyring=self.keyring,
            manifest=sign_envelope(state.to_bytes(), PayloadType.DESIRED_STATE, [self.online]),
        ).to_bytes()


def bundle_bytes(bundle: Bundle, key: SigningKey) -> bytes:
    return build_bundle(bundle.manifest, bundle.model, [key])


@pytest.fixture
def fleet(tmp_path: Path, mqtt_broker: Any, bundle_key: SigningKey) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path, mqtt_broker, bundle_key)
    yield fleet
    fleet.blocks.stop()


def agent_config(tmp_path: Path, fleet: Fleet, broker: Any | None) -> AgentConfig:
    data: dict[str, Any] = {
        "device_id": DEVICE,
        "profile": PROFILE,
        "data_dir": str(tmp_path / "device"),
        "window_seconds": 1,
        "trust": {"root_keys": [fleet.root.public.to_base64()]},
        "http": {"port": 0},
        # No traffic here: the health check passes on its self-test replay after 1 s.
        "limits": {"health_check_max_seconds": 1},
    }
    if broker is not None:
        data["broker"] = {"url": broker.url}
    return AgentConfig.model_validate(data)


def test_update_verify_activate_report_refuse_and_restart_offline(
    tmp_path: Path,
    fleet: Fleet,
    mqtt_broker: Any,
    mqtt_client: Any,
    make_digits_bundle: Callable[..., Bundle],
    bundle_key: SigningKey,
    digits_rows: Any,
) -> None:
    observer = mqtt_client("observer")
    observer.subscribe(f"ef/v1/dev/{DEVICE}/#")
    good = fleet.add(bundle_bytes(make_digits_bundle("tflite-float32"), bundle_key))
    publisher = mqtt_client("server")
    publisher.publish(device_topic(DEVICE, Channel.DESIRED), fleet.desired(5, good), retain=True)

    agent = Agent(agent_config(tmp_path, fleet, mqtt_broker))
    agent.start()
    try:
        model = wait_for(agent.active_model)
        assert model.manifest.model_name == "digits"
        prediction = model.predict(digits_rows.x_test[:3])
        assert prediction.labels is not None and len(prediction.labels) == 3
        events: list[str] = []
        states: list[DeviceState] = []

        def collect() -> bool:
            for topic, payload, _retain in observer.drain(0.2):
                if topic.endswith("/events"):
                    events.append(Event.from_bytes(payload).kind.value)
                elif topic.endswith("/state"):
                    states.append(DeviceState.from_bytes(payload))
            return "health_check_passed" in events and any(s.models for s in states)

        wait_for(collect)
        assert events[:4] == ["downloading", "verified", "activated", "health_check_passed"]
        state = states[-1]
        assert state.manifest_version == 5 and state.models[0].sha256 == good.sha256
        assert state.last_update is not None and state.last_update.outcome == "activated"
        assert fleet.blocks.stats()["bytes_served"] >= good.length

        # a replayed older manifest: refused, reported, nothing changes
        publisher.publish(
            device_topic(DEVICE, Channel.DESIRED), fleet.desired(4, good), retain=True
        )
        wait_for(lambda: agent.last_update is not None and agent.last_update.outcome == "rejected")
        assert agent.last_update.reason == "rollback"
        assert agent.trust.manifest_version == 5

        # a bundle tampered after signing: fetched, then refused before activation
        tampered = bytearray(
            bundle_bytes(make_digits_bundle("tflite-float32", model_version=2), bundle_key)
        )
        tampered[len(tampered) // 2] ^= 0x01
        bad = fleet.add(bytes(tampered))
        publisher.publish(
            device_topic(DEVICE, Channel.DESIRED),
            fleet.desired(6, bad, model_version=2),
            retain=True,
        )
        wait_for(
            lambda: (
                agent.last_update.manifest_version == 6 and agent.last_update.outcome == "rejected"
            )
        )
        assert agent.last_update.reason in ("hash_mismatch", "bad_signature", "malformed")
        assert agent.active_model().manifest.model_version == 1
        assert agent.store.current("digits").sha256 == good.sha256

        # a correctly signed bundle whose self-test fails on this device: refused
        good_bundle = make_digits_bundle("tflite-float32")
        wrong = [
            t.model_copy(update={"expected": [[v + 0.5 for v in r] for r in t.expected]})
            for t in good_bundle.manifest.self_tests
        ]
        failing = fleet.add(
            bundle_bytes(
                make_digits_bundle("tflite-float32", model_version=3, self_tests=wrong), bundle_key
            )
        )
        publisher.publish(
            device_topic(DEVICE, Channel.DESIRED),
            fleet.desired(7, failing, model_version=3),
            retain=True,
        )
        wait_for(lambda: agent.last_update.manifest_version == 7)
        assert (agent.last_update.outcome, agent.last_update.reason) == (
            "rejected",
            "self_test_failed",
        )

        # a desired state whose signed length is not the artifact's: refused, nothing kept
        short = ArtifactRef(sha256=failing.sha256, length=failing.length + 512)
        publisher.publish(
            device_topic(DEVICE, Channel.DESIRED),
            fleet.desired(8, short, model_version=4),
            retain=True,
        )
        wait_for(lambda: agent.last_update.manifest_version == 8)
        assert (agent.last_update.outcome, agent.last_update.reason) == (
            "rejected",
            "length_mismatch",
        )
        assert agent.active_model().manifest.model_version == 1
        assert not any(agent.store.tmp_dir.iterdir())

        # telemetry windows reach the broker with strictly increasing seq
        seqs: list[int] = []

        def telemetry() -> bool:
            for topic, payload, _retain in observer.drain(0.2):
                if topic.endswith("/telemetry"):
                    seqs.append(json.loads(payload)["seq"])
            return len(seqs) >= 2

        wait_for(telemetry)
        assert seqs == sorted(set(seqs))
    finally:
        agent.stop()

    # restart with no broker at all: the last good model is verified again and served,
    # and the command line reaches it (status over the local API, predict from the store)
    port = free_port()
    toml = tmp_path / "agent.toml"
    toml.write_text(
        f'device_id = "{DEVICE}"\nprofile = "{PROFILE}"\ndata_dir = "device"\n'
        f'[trust]\nroot_keys = ["{fleet.root.public.to_base64()}"]\n[http]\nport = {port}\n'
    )
    offline = Agent(load_config(toml))
    offline.start()
    try:
        model = offline.active_model()
        assert model is not None and model.manifest.model_version == 1
        out = model.predict(np.asarray(digits_rows.x_test[:2]))
        assert out.outputs.shape == (2, 10)
        status = runner.invoke(agent_cli, ["status", "--config", str(toml), "--json"])
        assert status.exit_code == 0, status.output
        assert json.loads(status.stdout)["connected"] is False
        rows = tmp_path / "rows.json"
        rows.write_text(json.dumps(digits_rows.x_test[:3].tolist()))
        predicted = runner.invoke(
            agent_cli, ["predict", "--config", str(toml), "--input", str(rows), "--json"]
        )
        assert predicted.exit_code == 0, predicted.output
        assert len(json.loads(predicted.stdout)["labels"]) == 3
        rows.write_text(json.dumps([[1.0, 2.0]]))
        wrong = runner.invoke(agent_cli, ["predict", "--config", str(toml), "--input", str(rows)])
        assert wrong.exit_code == 1 and "feature" in wrong.output
    finally:
        offline.stop()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
