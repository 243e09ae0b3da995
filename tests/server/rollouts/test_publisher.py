"""The desired-state publisher on a real broker, judged by the agent's own acceptance code."""

from __future__ import annotations

import base64
import json
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.updater import plan_update
from server.keys import FleetKeys, init_keys
from server.rollouts.desired import (
    DesiredContent,
    DesiredPublisher,
    IssuedManifest,
    IssueReason,
    ModelClaim,
    desired_content,
)
from server.rollouts.eligibility import ArtifactVariant
from server.rollouts.errors import PublishError
from shared.errors import BadSignatureError, UnknownKeyError, WrongDeviceError
from shared.messages import DesiredMessage
from shared.signing import Envelope, PayloadType, SigningKey, sign_envelope
from shared.topics import Channel, device_topic
from shared.trust import TrustState
from tests.conftest import BrokerEndpoint, MosquittoProcess, TestClient, free_port
from tests.server.rollouts.conftest import MODEL, NOW, PROFILE

pytestmark = pytest.mark.broker

VARIANT = ArtifactVariant(
    model_name=MODEL,
    model_version=4,
    target=PROFILE,
    runtime="litert",
    bundle_sha256="9f" * 32,
    bundle_length=123_456,
    gate_passed=True,
)


@pytest.fixture
def keys(tmp_path: Path) -> FleetKeys:
    return init_keys(tmp_path / "keys", now=NOW, lifetime=timedelta(days=90))


@pytest.fixture
def publisher(keys: FleetKeys, mqtt_broker: BrokerEndpoint) -> Iterator[DesiredPublisher]:
    publisher = DesiredPublisher(
        keys, host=mqtt_broker.host, port=mqtt_broker.port, publish_timeout=5.0, clock=lambda: NOW
    )
    publisher.start()
    yield publisher
    publisher.stop()


def content(device_id: str) -> DesiredContent:
    claim = ModelClaim(device_id, MODEL, 4, "r-canary", NOW)
    return desired_content(device_id, PROFILE, claims=[claim], variants=[VARIANT])


def device_plan(keys: FleetKeys, device_id: str, payload: bytes, state: TrustState | None = None):  # type: ignore[no-untyped-def]
    """What the agent does with a payload from ``…/desired`` (raises when it refuses)."""
    return plan_update(
        state or TrustState.from_root_keys([keys.root_public]),
        payload,
        device_id=device_id,
        profile=PROFILE,
        runtimes=["litert"],
        running={},
        now=NOW,
    )


def test_a_published_desired_state_is_retained_and_accepted_by_the_agent(
    keys: FleetKeys,
    publisher: DesiredPublisher,
    mqtt_client: Callable[..., TestClient],
) -> None:
    device_id = f"cam-{uuid.uuid4().hex[:8]}"
    recorded: list[IssuedManifest] = []
    issue = publisher.publish(content(device_id), last=None, record=recorded.append)
    assert issue.reason is IssueReason.FIRST and recorded == [issue.manifest]

    # The device connects afterwards: the broker hands it the retained message.
    device = mqtt_client(f"{device_id}-client")
    device.subscribe(device_topic(device_id, Channel.DESIRED))
    received = device.expect()
    assert received.retain and received.payload == issue.manifest.payload

    plan = device_plan(keys, device_id, received.payload)
    assert plan.is_new and plan.desired.manifest_version == 1
    assert plan.desired.rollout_id == "r-canary"
    assert [(d.model_name, d.model_version, d.artifact.sha256) for d in plan.fetch] == [
        (MODEL, 4, VARIANT.bundle_sha256)
    ]

    # Nothing changed: nothing new is issued or sent.
    again = publisher.publish(content(device_id), last=issue.manifest, record=recorded.append)
    assert not again.is_new and len(recorded) == 1
    device.expect_nothing(0.3)

    # A retry is a new version the device accepts on top of the first.
    retry = publisher.publish(
        content(device_id), last=issue.manifest, record=recorded.append, retry=True
    )
    newer = device.expect()
    assert newer.payload == retry.manifest.payload and not newer.retain  # live, not retained
    assert device_plan(keys, device_id, newer.payload, plan.state).desired.manifest_version == 2

    publisher.clear(device_id)
    assert device.expect().payload == b""


def _tamper(payload: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    message = DesiredMessage.from_bytes(payload)
    state = json.loads(message.manifest.payload_bytes())
    change(state)
    forged = message.manifest.model_copy(
        update={"payload": base64.b64encode(json.dumps(state).encode()).decode("ascii")}
    )
    return message.model_copy(update={"manifest": forged}).to_bytes()


def test_a_tampered_or_foreign_desired_state_is_refused_by_the_agent(
    keys: FleetKeys,
    publisher: DesiredPublisher,
    mqtt_client: Callable[..., TestClient],
) -> None:
    device_id = f"cam-{uuid.uuid4().hex[:8]}"
    issue = publisher.publish(content(device_id), last=None, record=lambda manifest: None)
    device = mqtt_client(f"{device_id}-client")
    rogue = mqtt_client(f"{device_id}-rogue")
    topic = device_topic(device_id, Channel.DESIRED)
    device.subscribe(topic)
    assert device.expect().payload == issue.manifest.payload

    def bump(state: dict[str, Any]) -> None:
        state["deployments"][0]["model_version"] = 5

    forged = _tamper(issue.manifest.payload, bump)
    rogue.publish(topic, forged, retain=True)
    with pytest.raises(BadSignatureError):
        device_plan(keys, device_id, device.expect().payload)

    stranger = SigningKey.generate()
    message = DesiredMessage.from_bytes(issue.manifest.payload)
    resigned = message.model_copy(
        update={
            "manifest": sign_envelope(
                message.manifest.payload_bytes(), PayloadType.DESIRED_STATE, [stranger]
            )
        }
    ).to_bytes()
    rogue.publish(topic, resigned, retain=True)
    with pytest.raises(UnknownKeyError):
        device_plan(keys, device_id, device.expect().payload)

    # A genuine message for another device is no use to this one.
    with pytest.raises(WrongDeviceError):
        device_plan(keys, "cam-other", issue.manifest.payload)
    publisher.clear(device_id)


def test_a_keyring_envelope_that_was_altered_is_refused(
    keys: FleetKeys, publisher: DesiredPublisher
) -> None:
    issue = publisher.issue(content("cam-ring"), last=None)
    message = DesiredMessage.from_bytes(issue.manifest.payload)
    ring = json.loads(message.keyring.payload_bytes())
    ring["threshold"] = 1
    ring["expires_at"] = "2099-01-01T00:00:00Z"
    altered = Envelope(
        payload_type=message.keyring.payload_type,
        payload=base64.b64encode(json.dumps(ring).encode()).decode("ascii"),
        signatures=message.keyring.signatures,
    )
    payload = message.model_copy(update={"keyring": altered}).to_bytes()
    with pytest.raises(BadSignatureError):
        device_plan(keys, "cam-ring", payload)


@pytest.mark.parametrize("fault", ["frozen", "killed"])
def test_a_publish_the_broker_does_not_acknowledge_raises(
    fault: str, keys: FleetKeys, mosquitto_factory: Callable[[], MosquittoProcess]
) -> None:
    broker = mosquitto_factory()
    publisher = DesiredPublisher(
        keys, host="127.0.0.1", port=broker.port, publish_timeout=1.0, clock=lambda: NOW
    )
    publisher.start()
    process = broker._process
    assert process is not None
    try:
        recorded: list[IssuedManifest] = []
        publisher.publish(content("cam-ack"), last=None, record=recorded.append)
        if fault == "frozen":  # connected, but no PUBACK will come
            os.kill(process.pid, signal.SIGSTOP)
        else:
            broker.kill()
        expected = "did not acknowledge" if fault == "frozen" else "not connected"
        with pytest.raises(PublishError, match=expected):
            publisher.publish(
                content("cam-ack"), last=recorded[-1], record=recorded.append, retry=True
            )
        # Recorded before it was sent: the version is taken even though the send failed.
        assert [m.manifest_version for m in recorded] == [1, 2]
    finally:
        if fault == "frozen":
            os.kill(process.pid, signal.SIGCONT)
        publisher.stop()


def test_start_fails_when_no_broker_answers(keys: FleetKeys) -> None:
    publisher = DesiredPublisher(keys, host="127.0.0.1", port=free_port())
    with pytest.raises(PublishError, match="no connection"):
        publisher.start(timeout=1.0)
    with pytest.raises(PublishError, match="not started"):
        publisher.send(publisher.issue(content("cam-x"), last=None).manifest)


def test_a_record_that_fails_stops_the_send(
    publisher: DesiredPublisher, mqtt_client: Callable[..., TestClient]
) -> None:
    device_id = f"cam-{uuid.uuid4().hex[:8]}"
    device = mqtt_client(f"{device_id}-client")
    device.subscribe(device_topic(device_id, Channel.DESIRED))

    def refuse(manifest: IssuedManifest) -> None:
        raise RuntimeError("database is down")

    with pytest.raises(RuntimeError, match="database is down"):
        publisher.publish(content(device_id), last=None, record=refuse)
    device.expect_nothing(0.3)
