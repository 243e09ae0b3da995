"""The inventory from MQTT: the pure rules, then the consumer on a real Mosquitto with an
agent-like client publishing retained state, presence (with its Last Will) and events."""

from __future__ import annotations

import queue
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.app import create_app
from server.db import utcnow
from server.fleet.enrollment import DeviceFacts, create_token, enroll
from server.fleet.inventory import (
    DeviceMessage,
    DroppedMessage,
    DropReason,
    InventoryConsumer,
    apply_message,
    apply_presence,
    apply_state,
    decode_message,
)
from server.fleet.models import Device
from server.settings import Settings
from shared.messages import (
    DeviceState,
    Event,
    EventKind,
    Presence,
    PresenceStatus,
    RunningModel,
    RuntimeInfo,
    UpdateOutcome,
    UpdateResult,
)
from shared.topics import Channel, device_topic
from tests.conftest import MosquittoProcess, Will, operator_client
from tests.conftest import TestClient as MqttClient
from tests.server.fleet.conftest import PROFILE

pytestmark = [pytest.mark.database]

T0 = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
WAIT = 10.0


def state(device_id: str, *, at: datetime, version: int = 2, outcome: str = "activated") -> bytes:
    return DeviceState(
        device_id=device_id,
        agent_version="0.1.0",
        profile=PROFILE,
        arch="x86_64",
        runtime=RuntimeInfo(name="litert", version="2.3.1"),
        manifest_version=version + 1,
        keyring_version=1,
        models=[
            RunningModel(
                model_name="digits",
                model_version=version,
                target=PROFILE,
                sha256="ab" * 32,
                activated_at=at,
            )
        ],
        last_update=UpdateResult(
            manifest_version=version + 1,
            outcome=UpdateOutcome(outcome),
            reason=None if outcome == "activated" else "hash_mismatch",
            at=at,
        ),
        reported_at=at,
    ).to_bytes()


def presence(device_id: str, status: str, started: datetime | None = None) -> bytes:
    return Presence(
        device_id=device_id, status=PresenceStatus(status), session_started_at=started
    ).to_bytes()


def event(device_id: str, kind: EventKind, at: datetime, event_id: str | None = None) -> bytes:
    return Event(
        device_id=device_id,
        event_id=event_id or uuid.uuid4().hex,
        kind=kind,
        at=at,
        manifest_version=3,
        model_name="digits",
        model_version=2,
    ).to_bytes()


def make_device(device_id: str = "dev-a", status: str = "accepted") -> Device:
    return Device(
        id=device_id,
        status=status,
        profile=PROFILE,
        arch="x86_64",
        runtime_name="litert",
        runtime_version="2.3.0",
        agent_version="0.0.9",
    )


# ----------------------------------------------------------------------------- pure rules


def test_decode_refuses_what_is_not_a_valid_message_of_its_own_device() -> None:
    topic = device_topic("dev-a", Channel.STATE)
    decoded = decode_message(topic, state("dev-a", at=T0), received_at=T0)
    assert (decoded.device_id, decoded.channel) == ("dev-a", Channel.STATE)
    for bad_topic, payload, reason in [
        (topic, state("dev-b", at=T0), DropReason.DEVICE_MISMATCH),
        (topic, b'{"schema":"ef.device-state","schema_version":1}', DropReason.MALFORMED),
        (topic, presence("dev-a", "online"), DropReason.MALFORMED),  # wrong schema for channel
        ("ef/v1/dev/dev-a/telemetry", b"{}", DropReason.BAD_TOPIC),
        ("somewhere/else", b"{}", DropReason.BAD_TOPIC),
    ]:
        with pytest.raises(DroppedMessage) as caught:
            decode_message(bad_topic, payload, received_at=T0)
        assert caught.value.reason == reason


def test_state_and_presence_rules() -> None:
    device = make_device()
    now = T0 + timedelta(hours=2)
    # A retained (replayed) state says when the device reported it; it is not "seen now".
    apply_state(
        device, DeviceState.from_bytes(state("dev-a", at=T0)), received_at=now, retained=True
    )
    assert device.last_seen == T0 and device.manifest_version == 3
    assert device.models[0]["model_version"] == 2 and device.runtime_version == "2.3.1"
    assert device.profile == PROFILE  # the enrolled profile is kept
    older = DeviceState.from_bytes(state("dev-a", at=T0 - timedelta(minutes=1), version=1))
    with pytest.raises(DroppedMessage) as caught:
        apply_state(device, older, received_at=now)
    assert caught.value.reason == DropReason.STALE and device.manifest_version == 3
    # A device clock ahead of ours does not make last_seen lie in the future.
    ahead = DeviceState.from_bytes(state("dev-a", at=now + timedelta(hours=1)))
    apply_state(device, ahead, received_at=now, retained=True)
    assert device.last_seen == now

    second = T0 + timedelta(minutes=30)
    apply_presence(
        device,
        Presence.from_bytes(presence("dev-a", "online", second)),
        received_at=now,
    )
    assert device.online and device.presence_session_at == second
    with pytest.raises(DroppedMessage):  # the offline of an older connection
        apply_presence(
            device, Presence.from_bytes(presence("dev-a", "offline", T0)), received_at=now
        )
    assert device.online
    apply_presence(device, Presence.from_bytes(presence("dev-a", "offline")), received_at=now)
    assert not device.online

    for other, reason in [
        (None, DropReason.UNKNOWN_DEVICE),
        (make_device(status="pending"), DropReason.NOT_ACCEPTED),
    ]:
        message = DeviceMessage("dev-a", Channel.STATE, ahead, now, False)
        with pytest.raises(DroppedMessage) as caught:
            apply_message(other, message)
        assert caught.value.reason == reason


# ----------------------------------------------------------------------------- on a broker


def register(engine: Engine, device_id: str, *, accept: bool = True) -> None:
    with Session(engine) as session:
        issued = create_token(
            session, now=utcnow(), expires_in=timedelta(hours=1), auto_accept=accept
        )
        facts = DeviceFacts(
            device_id=device_id,
            profile=PROFILE,
            arch="x86_64",
            runtime_name="litert",
            runtime_version="2.3.0",
            agent_version="0.0.9",
        )
        enroll(session, token=issued.token, facts=facts, now=utcnow())
        session.commit()


def load(engine: Engine, device_id: str) -> Device:
    with Session(engine) as session:
        device = session.get(Device, device_id)
        assert device is not None
        session.expunge(device)
        return device


@pytest.fixture
def broker(mosquitto_factory: Callable[[], MosquittoProcess]) -> MosquittoProcess:
    """A fresh Mosquitto of this test's own, so no retained message of another test counts."""
    return mosquitto_factory()


@pytest.fixture
def consumer(engine: Engine, broker: MosquittoProcess) -> Iterator[InventoryConsumer]:
    consumer = InventoryConsumer(engine, host=broker.endpoint.host, port=broker.endpoint.port)
    assert consumer.start(timeout=WAIT), "the consumer did not subscribe"
    yield consumer
    consumer.stop()


def settle(consumer: InventoryConsumer, **at_least: int) -> dict[str, object]:
    """Wait until the counters reach ``at_least`` (``applied=2``, ``device_mismatch=1``...)."""

    def reached(stats: dict[str, object]) -> bool:
        dropped: dict[str, int] = stats["dropped"]  # type: ignore[assignment]
        return all(
            (dropped[name] if name in dropped else stats[name]) >= count  # type: ignore[operator]
            for name, count in at_least.items()
        )

    assert consumer.wait_until(reached, WAIT), f"not reached {at_least}: {consumer.stats()}"
    return consumer.stats()


@pytest.mark.broker
def test_an_agent_like_client_fills_the_inventory(
    engine: Engine,
    broker: MosquittoProcess,
    consumer: InventoryConsumer,
    mqtt_client: Callable[..., MqttClient],
) -> None:
    register(engine, "dev-a")
    register(engine, "dev-p", accept=False)
    events: queue.Queue[DeviceMessage] = queue.Queue()
    consumer.add_hook(lambda m: events.put(m) if m.event is not None else None)
    offline = presence("dev-a", "offline")
    agent = mqtt_client(
        "dev-a",
        will=Will(device_topic("dev-a", Channel.PRESENCE), offline),
        endpoint=broker.endpoint,
    )
    connected_at = utcnow()
    before = utcnow()
    agent.publish(
        device_topic("dev-a", Channel.PRESENCE),
        presence("dev-a", "online", connected_at),
        retain=True,
    )
    agent.publish(
        device_topic("dev-a", Channel.STATE), state("dev-a", at=connected_at), retain=True
    )
    settle(consumer, applied=2)
    after = utcnow()
    device = load(engine, "dev-a")
    assert device.online and before <= device.last_seen <= after  # type: ignore[operator]
    assert [(m["model_name"], m["model_version"]) for m in device.models] == [("digits", 2)]
    assert device.last_update is not None and device.last_update["outcome"] == "activated"
    assert (device.manifest_version, device.runtime_version, device.agent_version) == (
        3,
        "2.3.1",
        "0.1.0",
    )

    # Another device's payload on dev-a's topic, an unknown device, a pending one: dropped.
    agent.publish(device_topic("dev-a", Channel.STATE), state("dev-b", at=utcnow()))
    agent.publish(device_topic("ghost", Channel.STATE), state("ghost", at=utcnow()))
    agent.publish(device_topic("dev-p", Channel.PRESENCE), presence("dev-p", "online"))
    agent.publish(device_topic("dev-a", Channel.EVENTS), b"not json")
    stats = settle(consumer, device_mismatch=1, unknown_device=1, not_accepted=1, malformed=1)
    assert stats["applied"] == 2
    assert load(engine, "dev-a").models[0]["model_version"] == 2
    assert not load(engine, "dev-p").online

    # Events reach the hook once, even when delivered twice.
    event_id = uuid.uuid4().hex
    for _ in range(2):
        agent.publish(
            device_topic("dev-a", Channel.EVENTS),
            event("dev-a", EventKind.ACTIVATED, utcnow(), event_id),
        )
    settle(consumer, duplicate_event=1, applied=3)
    seen = events.get(timeout=WAIT)
    assert seen.device_id == "dev-a" and seen.event is not None
    assert seen.event.kind == EventKind.ACTIVATED and seen.event.event_id == event_id
    assert events.empty()
    assert load(engine, "dev-a").last_event["kind"] == "activated"  # type: ignore[index]

    # A failed update shows as the last update result; then the connection dies: the Will.
    agent.publish(
        device_topic("dev-a", Channel.STATE),
        state("dev-a", at=utcnow(), outcome="rejected"),
        retain=True,
    )
    settle(consumer, applied=4)
    assert load(engine, "dev-a").last_update["outcome"] == "rejected"  # type: ignore[index]
    seen_before = load(engine, "dev-a").last_seen
    agent.drop()
    settle(consumer, applied=5)
    device = load(engine, "dev-a")
    assert not device.online
    assert device.last_seen is not None and seen_before is not None
    assert device.last_seen >= seen_before


@pytest.mark.broker
def test_a_new_consumer_catches_up_from_retained_messages(
    engine: Engine, broker: MosquittoProcess, mqtt_client: Callable[..., MqttClient]
) -> None:
    register(engine, "dev-r")
    agent = mqtt_client("dev-r", endpoint=broker.endpoint)
    reported = utcnow() - timedelta(hours=3)
    agent.publish(device_topic("dev-r", Channel.STATE), state("dev-r", at=reported), retain=True)
    agent.publish(
        device_topic("dev-r", Channel.PRESENCE),
        presence("dev-r", "online", reported),
        retain=True,
    )
    agent.disconnect()  # clean: no Will, the retained "online" stays
    consumer = InventoryConsumer(engine, host=broker.endpoint.host, port=broker.endpoint.port)
    try:
        assert consumer.start(timeout=WAIT)
        settle(consumer, applied=2)
    finally:
        consumer.stop()
    device = load(engine, "dev-r")
    assert device.online and device.models[0]["model_name"] == "digits"
    assert device.last_seen == reported  # replayed, so not "seen now"


@pytest.mark.broker
def test_the_server_runs_the_consumer_when_a_broker_is_configured(
    db_url: str,
    tmp_path: Path,
    broker: MosquittoProcess,
    mqtt_client: Callable[..., MqttClient],
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        broker_url=broker.endpoint.url,
        run_jobs=False,
    )
    app = create_app(settings)
    with operator_client(app) as client:
        consumer: InventoryConsumer = app.state.inventory
        assert consumer is not None and consumer.subscribed
        token = client.post(
            "/api/v1/provisioning-tokens", json={"auto_accept": True, "profile": PROFILE}
        ).json()["token"]
        enrolled = client.post(
            "/api/v1/enroll",
            json={
                "token": token,
                "device_id": "gw-1",
                "profile": PROFILE,
                "arch": "x86_64",
                "runtime": {"name": "litert", "version": "2.3.0"},
                "agent_version": "0.1.0",
            },
        ).json()
        assert enrolled["credentials"]["broker_url"] == broker.endpoint.url
        agent = mqtt_client("gw-1", endpoint=broker.endpoint)
        agent.publish(
            device_topic("gw-1", Channel.PRESENCE),
            presence("gw-1", "online", utcnow()),
            retain=True,
        )
        agent.publish(device_topic("gw-1", Channel.STATE), state("gw-1", at=utcnow()), retain=True)
        settle(consumer, applied=2)
        shown = client.get("/api/v1/devices/gw-1").json()
        assert shown["online"] is True and shown["last_seen"] is not None
        assert [m["model_version"] for m in shown["models"]] == [2]
        assert shown["last_update"]["outcome"] == "activated"
        listed = client.get("/api/v1/devices", params={"model": "digits@2", "online": True})
        assert [d["id"] for d in listed.json()] == ["gw-1"]
    assert not consumer.subscribed  # stopped with the app
    no_broker = create_app(Settings(data_dir=tmp_path / "other", database_url=db_url))
    with TestClient(no_broker):
        assert no_broker.state.inventory is None
