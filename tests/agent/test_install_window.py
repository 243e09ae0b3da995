"""Install windows on the agent: a deployment whose window is closed is downloaded, verified,
self-tested and staged at once, reported ``staged``, and activated when the agent's wall
clock enters the window; a newer desired state replaces what waits; a restart -- even with
no broker -- verifies the staged bundle again and still waits.

Real parts: Mosquitto, the server's BlockServer, signed bundles and desired states,
onnxruntime. Only the wall clock is fake (the agent judges windows by it).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.agent import Agent
from agent.config import AgentConfig
from shared.bundle import Bundle
from shared.messages import (
    ArtifactRef,
    DeviceState,
    Event,
    InstallWindow,
)
from shared.signing import SigningKey
from shared.topics import Channel, device_topic
from tests.agent.test_health import ONNX_PROFILE, Fleet, Observer, device_config, wait_for

pytestmark = pytest.mark.broker


class WallClock:
    """The agent's wall clock, set by the test (thread-safe)."""

    def __init__(self, start: datetime) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def set(self, moment: datetime) -> None:
        with self._lock:
            assert moment >= self._now, "the clock never goes back"
            self._now = moment


def closed_window(now: datetime) -> InstallWindow:
    """A one-hour window that opens about two hours after ``now``."""
    start = (now + timedelta(hours=2)).replace(second=0, microsecond=0)
    end = start + timedelta(hours=1)
    return InstallWindow(start=f"{start:%H:%M}", end=f"{end:%H:%M}")


def inside(window: InstallWindow, now: datetime) -> datetime:
    """A minute after ``window`` next opens."""
    return window.next_opening(now) + timedelta(minutes=1)


def desired(
    fleet: Fleet,
    manifest_version: int,
    ref: ArtifactRef,
    model_version: int,
    *,
    now: datetime,
    window: InstallWindow | None,
) -> bytes:
    return fleet.desired(
        manifest_version, ref, model_version, now=now, lifetime=timedelta(hours=12), window=window
    )


def running(agent: Agent) -> int | None:
    model = agent.active_model()
    return None if model is None else model.manifest.model_version


@pytest.fixture
def fleet(tmp_path: Path, mqtt_broker: Any, bundle_key: SigningKey) -> Iterator[Fleet]:
    fleet = Fleet(
        tmp_path,
        mqtt_broker,
        bundle_key,
        device_id=f"iw-{uuid.uuid4().hex[:8]}",
        profile=ONNX_PROFILE,
    )
    yield fleet
    fleet.blocks.stop()


@pytest.fixture
def config(tmp_path: Path, fleet: Fleet, mqtt_broker: Any) -> AgentConfig:
    # No traffic here: each health check passes on its self-test replay within a second.
    return device_config(tmp_path, fleet, mqtt_broker, health_check_max_seconds=1)


def test_outside_its_window_an_update_is_staged_and_activates_when_the_window_opens(
    fleet: Fleet,
    config: AgentConfig,
    mqtt_client: Callable[..., Any],
    make_digits_bundle: Callable[..., Bundle],
    bundle_key: SigningKey,
) -> None:
    observer = Observer(mqtt_client("observer"), fleet.device_id)
    server = mqtt_client("server")
    topic = device_topic(fleet.device_id, Channel.DESIRED)
    v1 = fleet.add(make_digits_bundle("onnx-float32"), bundle_key)
    v2 = fleet.add(make_digits_bundle("onnx-float32", model_version=2), bundle_key)
    clock = WallClock(datetime.now(UTC))
    window = closed_window(clock())

    agent = Agent(config, wall_clock=clock)
    agent.start()
    try:
        server.publish(topic, desired(fleet, 1, v1, 1, now=clock(), window=None), retain=True)
        observer.wait_event("health_check_passed", 1)

        server.publish(topic, desired(fleet, 2, v2, 2, now=clock(), window=window), retain=True)
        staged = observer.wait_event("staged", 2)
        assert staged.rollout_id == "r-2" and staged.detail is not None
        assert str(window) in staged.detail
        opens = window.next_opening(clock()).isoformat()
        assert opens in staged.detail
        requests = fleet.blocks.stats()["requests"]

        def staged_state() -> DeviceState | None:
            observer.poll()
            last = observer.states[-1] if observer.states else None
            update = None if last is None else last.last_update
            return last if update is not None and update.outcome == "staged" else None

        state = wait_for(staged_state, what="the retained state says staged")
        assert [m.model_version for m in state.models] == [1]  # still runs v1
        assert agent.status()["waiting"] == [
            {
                "model_name": "digits",
                "model_version": 2,
                "install_window": str(window),
                "opens_at": opens,
            }
        ]
        assert agent.store.has_bundle(v2.sha256, v2.length)  # staged, complete, verified
        current = agent.store.current("digits")
        assert current is not None and current.sha256 == v1.sha256  # the pointer stayed
        assert agent.store.waiting_path.exists()
        time.sleep(1.0)  # the update thread looks every half second: absence takes a wait
        assert running(agent) == 1
        assert agent.store.probations() == []  # nothing loaded, nothing on trial

        clock.set(inside(window, clock()))
        observer.wait_event("health_check_passed", 2)
    finally:
        agent.stop()

    assert observer.kinds(2) == [
        "downloading",
        "verified",
        "staged",
        "verified",  # the staged bundle, verified again before it is loaded
        "activated",
        "health_check_passed",
    ]
    activated = next(e for e in observer.events if e.kind == "activated" and e.model_version == 2)
    assert activated.at >= window.next_opening(staged.at)  # by the agent's clock
    assert fleet.blocks.stats()["requests"] == requests  # nothing fetched at the window
    assert running(agent) == 2
    current, previous = agent.store.current("digits"), agent.store.previous("digits")
    assert current is not None and current.sha256 == v2.sha256
    assert previous is not None and previous.sha256 == v1.sha256
    assert agent.status()["waiting"] == []
    assert not agent.store.waiting_path.exists()


def test_a_newer_desired_state_replaces_the_staged_one(
    fleet: Fleet,
    config: AgentConfig,
    mqtt_client: Callable[..., Any],
    make_digits_bundle: Callable[..., Bundle],
    bundle_key: SigningKey,
) -> None:
    observer = Observer(mqtt_client("observer"), fleet.device_id)
    server = mqtt_client("server")
    topic = device_topic(fleet.device_id, Channel.DESIRED)
    v2 = fleet.add(make_digits_bundle("onnx-float32", model_version=2), bundle_key)
    v3 = fleet.add(make_digits_bundle("onnx-float32", model_version=3), bundle_key)
    clock = WallClock(datetime.now(UTC))
    window = closed_window(clock())

    agent = Agent(config, wall_clock=clock)
    agent.start()
    try:
        server.publish(topic, desired(fleet, 1, v2, 2, now=clock(), window=window), retain=True)
        observer.wait_event("staged", 2)
        assert agent.store.has_bundle(v2.sha256, v2.length)
        assert running(agent) is None  # nothing was served before, nothing is now

        server.publish(topic, desired(fleet, 2, v3, 3, now=clock(), window=window), retain=True)
        observer.wait_event("staged", 3)
        wait_for(lambda: [w["model_version"] for w in agent.status()["waiting"]] == [3])
        assert not agent.store.has_bundle(v2.sha256, v2.length)  # replaced: removed
        assert agent.store.has_bundle(v3.sha256, v3.length)
        assert running(agent) is None

        clock.set(inside(window, clock()))
        observer.wait_event("health_check_passed", 3)
    finally:
        agent.stop()

    assert observer.kinds(2) == ["downloading", "verified", "staged"]  # never activated
    assert observer.kinds(3)[-2:] == ["activated", "health_check_passed"]
    assert running(agent) == 3
    assert agent.trust.manifest_version == 2


def test_a_restart_while_staged_keeps_waiting_and_activates_with_no_broker(
    fleet: Fleet,
    config: AgentConfig,
    mqtt_client: Callable[..., Any],
    make_digits_bundle: Callable[..., Bundle],
    bundle_key: SigningKey,
) -> None:
    observer = Observer(mqtt_client("observer"), fleet.device_id)
    server = mqtt_client("server")
    topic = device_topic(fleet.device_id, Channel.DESIRED)
    v2 = fleet.add(make_digits_bundle("onnx-float32", model_version=2), bundle_key)
    clock = WallClock(datetime.now(UTC))
    window = closed_window(clock())

    first = Agent(config, wall_clock=clock)
    first.start()
    try:
        server.publish(topic, desired(fleet, 1, v2, 2, now=clock(), window=window), retain=True)
        observer.wait_event("staged", 2)
    finally:
        first.stop()
    before = {e.event_id for e in observer.events}

    # The device restarts cut off from the broker: the kept desired state says what waits.
    offline = config.model_copy(update={"broker": None})
    again = Agent(offline, wall_clock=clock)
    again.start()
    try:
        wait_for(
            lambda: [w["model_version"] for w in again.status()["waiting"]] == [2],
            what="v2 waiting again after the restart",
        )
        assert running(again) is None
        clock.set(inside(window, clock()))
        wait_for(lambda: running(again) == 2, what="v2 activated, offline, in its window")
        wait_for(lambda: again.status()["waiting"] == [], what="nothing waits any more")
        events = [
            Event.from_bytes(m.payload)
            for m in again.outbox.pending(100)
            if m.topic.endswith("/events")
        ]
        kinds = [e.kind.value for e in events if e.event_id not in before]
    finally:
        again.stop()
    # After the restart, before the window: verified again and staged again; then activated.
    assert kinds[:2] == ["verified", "staged"]
    assert kinds[2:4] == ["verified", "activated"]
    assert "downloading" not in kinds
    assert not again.store.waiting_path.exists()


def test_a_staged_bundle_that_no_longer_verifies_after_a_restart_is_fetched_again(
    fleet: Fleet,
    config: AgentConfig,
    mqtt_client: Callable[..., Any],
    make_digits_bundle: Callable[..., Bundle],
    bundle_key: SigningKey,
) -> None:
    observer = Observer(mqtt_client("observer"), fleet.device_id)
    server = mqtt_client("server")
    topic = device_topic(fleet.device_id, Channel.DESIRED)
    v2 = fleet.add(make_digits_bundle("onnx-float32", model_version=2), bundle_key)
    clock = WallClock(datetime.now(UTC))
    window = closed_window(clock())

    first = Agent(config, wall_clock=clock)
    first.start()
    try:
        server.publish(topic, desired(fleet, 1, v2, 2, now=clock(), window=window), retain=True)
        observer.wait_event("staged", 2)
    finally:
        first.stop()
    staged = first.store.bundle_path(v2.sha256)
    staged.chmod(0o600)
    data = bytearray(staged.read_bytes())
    data[-10] ^= 0xFF  # same length, other bytes
    staged.write_bytes(bytes(data))

    again = Agent(config, wall_clock=clock)
    again.start()
    try:

        def staged_twice() -> bool:
            observer.poll()
            return observer.kinds(2).count("staged") == 2

        wait_for(staged_twice, what="staged again")
        assert observer.kinds(2) == [
            "downloading",
            "verified",
            "staged",
            "downloading",  # the damaged copy failed its hash: fetched again
            "verified",
            "staged",
        ]
        assert running(again) is None
        clock.set(inside(window, clock()))
        observer.wait_event("health_check_passed", 2)
    finally:
        again.stop()
    assert running(again) == 2


def test_inside_its_window_an_update_activates_at_once(
    fleet: Fleet,
    config: AgentConfig,
    mqtt_client: Callable[..., Any],
    make_digits_bundle: Callable[..., Bundle],
    bundle_key: SigningKey,
) -> None:
    observer = Observer(mqtt_client("observer"), fleet.device_id)
    server = mqtt_client("server")
    topic = device_topic(fleet.device_id, Channel.DESIRED)
    v2 = fleet.add(make_digits_bundle("onnx-float32", model_version=2), bundle_key)
    clock = WallClock(datetime.now(UTC))
    window = closed_window(clock())
    clock.set(inside(window, clock()))

    agent = Agent(config, wall_clock=clock)
    agent.start()
    try:
        server.publish(topic, desired(fleet, 1, v2, 2, now=clock(), window=window), retain=True)
        observer.wait_event("health_check_passed", 2)
    finally:
        agent.stop()
    assert observer.kinds(2) == ["downloading", "verified", "activated", "health_check_passed"]
