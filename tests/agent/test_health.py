"""The health check of a new model: the self-test replay at activation, then probation over
its first real inferences, and the rollback it decides by itself.

Real parts: Mosquitto, the server's BlockServer, signed bundles, onnxruntime, the local API
over a real socket. The unhealthy models are real too: the digits ONNX model with a
branch added that does nothing on inputs like the training data (so its self-tests
pass) and, on brighter inputs, either indexes past the end of a table (onnxruntime
raises) or multiplies a few thousand rows through two 1024x1024 matrices (~100 ms).
Only the clock is fake, where the deadline of the probation matters.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.agent import Agent, HealthVerdict, Probation, judge_health
from agent.config import AgentConfig, Limits
from agent.store import BundleRef
from server.artifacts import ArtifactStore
from server.delivery.blocks import BlockServer
from shared.bundle import Bundle, build_bundle
from shared.messages import (
    ArtifactRef,
    BlockHeader,
    BlockRequest,
    Deployment,
    DesiredMessage,
    DesiredState,
    DeviceState,
    Event,
    InstallWindow,
    KeyEntry,
    Keyring,
    decode_block,
)
from shared.signing import PayloadType, SigningKey, sign_envelope
from shared.topics import Channel, device_topic

ONNX_PROFILE = "onprem-x86_64-onnx"
WAIT = 30.0
SLA_MS = 30.0  # the slow branch takes ~100 ms and more; the replay well under 1 ms


def wait_for(condition: Callable[[], Any], timeout: float = WAIT, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"not in time: {what or condition}")


class FakeClock:
    """The agent's monotonic clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


# ----------------------------------------------------------------------------- the server's half


class Fleet:
    """Keys, an artifact store, a block server and signed desired states for one device.

    The block server serves the artifacts in :attr:`allowed` only, and answers each
    request after :attr:`delay` seconds (a slow link, for real).
    """

    def __init__(
        self, tmp_path: Path, broker: Any, online: SigningKey, *, device_id: str, profile: str
    ) -> None:
        self.device_id = device_id
        self.profile = profile
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
        self.delay = 0.0
        self.blocks = BlockServer(
            self.store,
            authorize=self._authorize,
            host=broker.host,
            port=broker.port,
            reconnect_delay=(0.05, 0.2),
        )
        self.blocks.start()

    def _authorize(self, device_id: str, sha256: str) -> bool:
        if self.delay:  # on a block server worker, not on paho's thread
            time.sleep(self.delay)
        return device_id == self.device_id and sha256 in self.allowed

    def add(self, bundle: Bundle, key: SigningKey, *, allow: bool = True) -> ArtifactRef:
        stored = self.store.put_bytes(build_bundle(bundle.manifest, bundle.model, [key]))
        if allow:
            self.allowed.add(stored.sha256)
        return ArtifactRef(sha256=stored.sha256, length=stored.length)

    def desired(
        self,
        manifest_version: int,
        ref: ArtifactRef,
        model_version: int,
        *,
        now: datetime | None = None,
        lifetime: timedelta = timedelta(hours=1),
        window: InstallWindow | None = None,
    ) -> bytes:
        now = now or datetime.now(UTC)
        state = DesiredState(
            device_id=self.device_id,
            manifest_version=manifest_version,
            issued_at=now,
            expires_at=now + lifetime,
            rollout_id=f"r-{manifest_version}",
            deployments=[
                Deployment(
                    model_name="digits",
                    model_version=model_version,
                    target=self.profile,
                    artifact=ref,
                    install_window=window,
                )
            ],
        )
        return DesiredMessage(
            keyring=self.keyring,
            manifest=sign_envelope(state.to_bytes(), PayloadType.DESIRED_STATE, [self.online]),
        ).to_bytes()


class Observer:
    """What the device publishes (events in order, retained states, block requests) and,
    with ``blocks``, the block frames it is sent."""

    def __init__(self, client: Any, device_id: str, *, blocks: bool = False) -> None:
        self.client = client
        self.events: list[Event] = []
        self.states: list[DeviceState] = []
        self.requests: list[BlockRequest] = []
        self.frames: list[BlockHeader] = []
        channels = [Channel.EVENTS, Channel.STATE, Channel.ARTIFACT_REQUEST]
        for channel in [*channels, Channel.ARTIFACT_BLOCK] if blocks else channels:
            client.subscribe(device_topic(device_id, channel))

    def take(self, topic: str, payload: bytes) -> None:
        if topic.endswith("/events"):
            self.events.append(Event.from_bytes(payload))
        elif topic.endswith("/state"):
            self.states.append(DeviceState.from_bytes(payload))
        elif topic.endswith("/artifact/req"):
            self.requests.append(BlockRequest.from_bytes(payload))
        elif topic.endswith("/artifact/blk"):
            self.frames.append(decode_block(payload)[0])

    def poll(self) -> None:
        for topic, payload, _retain in self.client.drain(0.05):
            self.take(topic, payload)

    def wait_last_block(self, sha256: str) -> None:
        """Return as soon as the frame that ends ``sha256`` arrives (no polling delay)."""
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            topic, payload, _retain = self.client.expect(deadline - time.monotonic())
            self.take(topic, payload)
            header = self.frames[-1] if topic.endswith("/artifact/blk") else None
            if (
                header is not None
                and header.sha256 == sha256
                and header.error is None
                and header.offset + header.length == header.total_length
            ):
                return
        raise AssertionError(f"the last block of {sha256[:12]} was not sent in time")

    def kinds(self, model_version: int | None = None) -> list[str]:
        return [
            e.kind.value
            for e in self.events
            if model_version is None or e.model_version == model_version
        ]

    def wait_event(self, kind: str, model_version: int) -> Event:
        def found() -> Event | None:
            self.poll()
            return next(
                (e for e in self.events if e.kind == kind and e.model_version == model_version),
                None,
            )

        event: Event = wait_for(found, what=f"{kind} of v{model_version}")
        return event


def device_config(
    tmp_path: Path, fleet: Fleet, broker: Any, *, sla_ms: float | None = None, **limits: Any
) -> AgentConfig:
    return AgentConfig.model_validate(
        {
            "device_id": fleet.device_id,
            "profile": fleet.profile,
            "data_dir": str(tmp_path / "device"),
            "trust": {"root_keys": [fleet.root.public.to_base64()]},
            "http": {"port": 0},
            "broker": {"url": broker.url},
            "latency_sla_ms_p95": sla_ms,
            "limits": {"health_check_max_seconds": 60, **limits},
        }
    )


@pytest.fixture
def fleet(tmp_path: Path, mqtt_broker: Any, bundle_key: SigningKey) -> Iterator[Fleet]:
    fleet = Fleet(
        tmp_path,
        mqtt_broker,
        bundle_key,
        device_id=f"hc-{uuid.uuid4().hex[:8]}",
        profile=ONNX_PROFILE,
    )
    yield fleet
    fleet.blocks.stop()


# ----------------------------------------------------------------------------- real bad models


def trapped_onnx(model: bytes, kind: str) -> bytes:
    """``model`` plus a branch that adds 0 to its output: harmless on inputs whose largest
    value after preprocessing is at most 1 (every training image), and on brighter ones
    ``"error"``: a Gather past the end of a 2-entry table, ``"slow"``: ~300 rows per unit
    above 1 through two 1024x1024 matrix products."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph_model = onnx.load_from_string(model)
    graph = graph_model.graph
    x, y = graph.input[0].name, graph.output[0].name
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == y:
                node.output[i] = "trap_y"

    def const(name: str, value: Any) -> None:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))

    nodes = [helper.make_node("ReduceMax", [x], ["trap_max"], keepdims=0)]
    if kind == "error":
        const("trap_table", np.zeros(2, np.float32))
        nodes += [
            helper.make_node("Cast", ["trap_max"], ["trap_index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["trap_table", "trap_index"], ["trap_value"]),
        ]
    else:
        side = 1024
        const("trap_one", np.float32(1.0))
        const("trap_scale", np.float32(300.0))
        const("trap_side", np.array([side], np.int64))
        const("trap_axes", np.array([0], np.int64))
        const("trap_w", np.full((side, side), 1e-3, np.float32))
        ones = helper.make_tensor("trap_fill", TensorProto.FLOAT, [1], [1.0])
        nodes += [
            helper.make_node("Sub", ["trap_max", "trap_one"], ["trap_over"]),
            helper.make_node("Relu", ["trap_over"], ["trap_relu"]),
            helper.make_node("Mul", ["trap_relu", "trap_scale"], ["trap_rows_f"]),
            helper.make_node("Cast", ["trap_rows_f"], ["trap_rows"], to=TensorProto.INT64),
            helper.make_node("Unsqueeze", ["trap_rows", "trap_axes"], ["trap_rows1"]),
            helper.make_node("Concat", ["trap_rows1", "trap_side"], ["trap_shape"], axis=0),
            helper.make_node("ConstantOfShape", ["trap_shape"], ["trap_ones"], value=ones),
            helper.make_node("MatMul", ["trap_ones", "trap_w"], ["trap_work"]),
            helper.make_node("MatMul", ["trap_work", "trap_w"], ["trap_work2"]),
            helper.make_node("ReduceSum", ["trap_work2"], ["trap_value"], keepdims=0),
        ]
    const("trap_zero", np.float32(0.0))
    nodes += [
        helper.make_node("Mul", ["trap_value", "trap_zero"], ["trap_nothing"]),
        helper.make_node("Add", ["trap_y", "trap_nothing"], [y]),
    ]
    graph.node.extend(nodes)
    onnx.checker.check_model(graph_model)
    return bytes(graph_model.SerializeToString())


def post_predict(agent: Agent, rows: Any) -> tuple[int, dict[str, Any]]:
    address = agent.api_address
    assert isinstance(address, tuple)
    connection = http.client.HTTPConnection(*address, timeout=10)
    try:
        body = json.dumps({"instances": np.asarray(rows).tolist()})
        connection.request(
            "POST", "/v1/predict", body=body, headers={"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def on_probation(agent: Agent, model_version: int) -> dict[str, Any] | None:
    probation = agent.status()["probation"]
    if probation is not None and probation["model_version"] == model_version:
        return dict(probation)
    return None


def bright(rows: np.ndarray) -> np.ndarray:
    """Rows 16 times brighter than any training image (pixels up to 256, not 16)."""
    return np.asarray(rows, dtype=np.float64) * 16


# ----------------------------------------------------------------------------- the pure part


def test_the_verdict_names_its_cause_and_numbers() -> None:
    healthy = judge_health([1.0] * 19 + [2.0], 0, max_error_rate=0.1, sla_ms_p95=5.0)
    assert healthy.passed and healthy.cause is None
    assert healthy.detail.startswith("20 inferences, 0 failed, p95 ")

    erring = judge_health([1.0] * 17, 3, max_error_rate=0.1, sla_ms_p95=5.0)
    assert (erring.passed, erring.cause) == (False, "errors")
    assert erring.detail == "errors: 3 of 20 inferences failed (15%), over the limit of 10%"
    assert judge_health([1.0] * 18, 2, max_error_rate=0.1, sla_ms_p95=None).passed  # 10% is ok

    slow = judge_health([1.0] * 10 + [9.0] * 10, 0, max_error_rate=0.1, sla_ms_p95=5.0)
    assert (slow.passed, slow.cause) == (False, "latency")
    assert slow.detail == "latency: p95 9 ms over the profile's SLA of 5 ms (20 inferences)"
    assert judge_health([9.0] * 20, 0, max_error_rate=0.1, sla_ms_p95=None).passed  # no SLA

    assert judge_health([], 0, max_error_rate=0.1, sla_ms_p95=5.0) == HealthVerdict(
        True, "no inferences to judge"
    )


def probation(clock: FakeClock, model: object, **limits: Any) -> Probation:
    deployment = Deployment(
        model_name="digits",
        model_version=2,
        target=ONNX_PROFILE,
        artifact=ArtifactRef(sha256="ab" * 32, length=10),
    )
    return Probation(
        model,  # type: ignore[arg-type]  # only its identity matters here
        deployment,
        rollout_id=None,
        limits=Limits(**limits),
        sla_ms_p95=5.0,
        now=clock(),
    )


def test_probation_counts_the_new_models_first_inferences_until_its_deadline() -> None:
    clock, model, old_model = FakeClock(), object(), object()
    watch = probation(clock, model, health_check_inferences=4, health_check_max_seconds=30)
    watch.observe(old_model, None)  # the replaced model finishing a request: not counted
    watch.observe(model, 1.0)
    assert watch.snapshot()["inferences"] == 1 and watch.verdict(clock()) is None
    clock.advance(29.9)
    assert watch.verdict(clock()) is None
    clock.advance(0.1)
    verdict = watch.verdict(clock())  # the deadline, by the injected clock
    assert verdict is not None and verdict.passed
    assert verdict.detail.endswith("; 1 of 4 inferences came within 30 s")
    watch.observe(model, 99.0)  # after the verdict nothing counts
    assert watch.snapshot()["inferences"] == 1

    quiet = probation(clock, model, health_check_max_seconds=30)
    clock.advance(30)
    verdict = quiet.verdict(clock())
    assert verdict == HealthVerdict(True, "no inference within 30 s; the self-test replay passed")


def test_probation_is_due_after_n_inferences_or_once_errors_decide_it() -> None:
    clock, model = FakeClock(), object()
    full = probation(clock, model, health_check_inferences=3)
    for latency in (1.0, 2.0, 3.0):
        assert not full.due.is_set()
        full.observe(model, latency)
    assert full.due.is_set()
    assert full.verdict(clock()) == HealthVerdict(True, "3 inferences, 0 failed, p95 2.9 ms")

    # 20 inferences, 10%: 2 errors may pass; the 3rd decides it before the other 17 come
    failing = probation(clock, model, health_check_inferences=20, health_check_max_error_rate=0.1)
    for _ in range(2):
        failing.observe(model, None)
    assert not failing.due.is_set()
    failing.observe(model, None)
    assert failing.due.is_set()
    verdict = failing.verdict(clock())
    assert verdict is not None and verdict.cause == "errors"
    assert verdict.detail == "errors: 3 of 3 inferences failed (100%), over the limit of 10%"


def test_observing_is_cheap_and_safe_from_many_threads() -> None:
    clock, model = FakeClock(), object()
    watch = probation(clock, model, health_check_inferences=1000)

    def serve() -> None:
        for _ in range(250):
            watch.observe(model, 1.0)

    threads = [threading.Thread(target=serve) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert watch.snapshot()["inferences"] == 1000 and watch.due.is_set()


# ----------------------------------------------------------------------------- the whole agent


@pytest.mark.broker
def test_no_traffic_passes_at_the_deadline_and_errors_on_real_traffic_roll_back(
    tmp_path: Path,
    fleet: Fleet,
    mqtt_broker: Any,
    mqtt_client: Callable[..., Any],
    make_digits_bundle: Callable[..., Bundle],
    digits_artifacts: Any,
    digits_rows: Any,
    bundle_key: SigningKey,
) -> None:
    observer = Observer(mqtt_client("observer"), fleet.device_id)
    server = mqtt_client("server")
    desired_topic = device_topic(fleet.device_id, Channel.DESIRED)
    v1 = fleet.add(make_digits_bundle("onnx-float32"), bundle_key)
    erring_model = trapped_onnx(digits_artifacts["onnx-float32"].model, "error")
    v2 = fleet.add(
        make_digits_bundle("onnx-float32", _model=erring_model, model_version=2), bundle_key
    )
    clock = FakeClock()
    config = device_config(
        tmp_path,
        fleet,
        mqtt_broker,
        health_check_inferences=10,
        health_check_max_error_rate=0.2,
    )

    def rolled_back_state() -> DeviceState | None:
        observer.poll()
        return next(
            (
                s
                for s in observer.states
                if [m.model_version for m in s.models] == [1]
                and s.last_update is not None
                and s.last_update.outcome == "rolled_back"
            ),
            None,
        )

    server.publish(desired_topic, fleet.desired(1, v1, 1), retain=True)
    agent = Agent(config, clock=clock)
    agent.start()
    try:
        # v1, the first model: no traffic at all, so the deadline decides (injected clock)
        wait_for(lambda: on_probation(agent, 1), what="v1 on probation")
        assert (agent.store.probation_dir / "digits.json").exists()
        clock.advance(60)
        passed = observer.wait_event("health_check_passed", 1)
        assert passed.detail == "no inference within 60 s; the self-test replay passed"
        wait_for(lambda: agent.store.probations() == [], what="the marker gone after the pass")

        # v2 passes its self-tests (the training data is never brighter than 16)...
        server.publish(desired_topic, fleet.desired(2, v2, 2), retain=True)
        wait_for(lambda: on_probation(agent, 2), what="v2 on probation")
        rows = digits_rows.x_test[:4]
        assert post_predict(agent, rows)[0] == 200
        status, body = post_predict(agent, rows[:, :10])  # the caller's mistake: not counted
        assert status == 400 and body["error"] == "invalid_input"
        assert on_probation(agent, 2) == {
            "model_name": "digits",
            "model_version": 2,
            "inferences": 1,
            "errors": 0,
            "needed": 10,
        }
        agent.predict(rows[:1])  # the Python API counts as well
        # ...and fails on real traffic: 2 of 10 errors would pass, the 3rd decides it
        for _ in range(3):
            status, body = post_predict(agent, bright(rows[:1]))
            assert status == 500 and body["error"] == "internal"
        rolled_back = observer.wait_event("rolled_back", 2)
        state = wait_for(rolled_back_state, what="the retained state after the rollback")
    finally:
        agent.stop()

    detail = "errors: 3 of 5 inferences failed (60%), over the limit of 20%"
    assert observer.kinds(2) == [
        "downloading",
        "verified",
        "activated",
        "health_check_failed",
        "rolled_back",
    ]
    assert (rolled_back.reason, rolled_back.detail) == ("health_check_failed", detail)
    assert rolled_back.rollout_id == "r-2"
    assert agent.last_update is not None
    assert (agent.last_update.outcome, agent.last_update.reason, agent.last_update.detail) == (
        "rolled_back",
        "health_check_failed",
        detail,
    )
    assert agent.active_model().manifest.model_version == 1  # type: ignore[union-attr]
    current, previous = agent.store.current("digits"), agent.store.previous("digits")
    assert current is not None and current.sha256 == v1.sha256
    assert previous is not None and previous.sha256 == v2.sha256  # kept, refused

    assert state.last_update is not None and state.last_update.detail == detail
    assert state.models[0].previous_version == 2
    marker = agent.store.probation("digits")
    assert marker is not None and marker.failed == detail and marker.manifest_version == 2

    # Restarted with v2 still desired (retained): v1 is served, v2 is not fetched again.
    requests_before = fleet.blocks.stats()["requests"]
    again = Agent(config, clock=clock)
    again.start()
    try:
        assert again.active_model().manifest.model_version == 1  # type: ignore[union-attr]
        wait_for(lambda: again.status()["connected"], what="connected")
        time.sleep(1.0)  # the retained v2 arrives and must be left alone: absence takes a wait
        observer.poll()
        assert observer.kinds(2).count("downloading") == 1
        assert fleet.blocks.stats()["requests"] == requests_before
        status, body = post_predict(again, bright(digits_rows.x_test[:1]))
        assert status == 200 and body["version"] == 1
    finally:
        again.stop()


@pytest.mark.broker
def test_a_model_slower_than_the_sla_on_real_traffic_is_rolled_back(
    tmp_path: Path,
    fleet: Fleet,
    mqtt_broker: Any,
    mqtt_client: Callable[..., Any],
    make_digits_bundle: Callable[..., Bundle],
    digits_artifacts: Any,
    digits_rows: Any,
    bundle_key: SigningKey,
) -> None:
    observer = Observer(mqtt_client("observer"), fleet.device_id)
    server = mqtt_client("server")
    desired_topic = device_topic(fleet.device_id, Channel.DESIRED)
    v1 = fleet.add(make_digits_bundle("onnx-float32"), bundle_key)
    slow_model = trapped_onnx(digits_artifacts["onnx-float32"].model, "slow")
    v2 = fleet.add(
        make_digits_bundle("onnx-float32", _model=slow_model, model_version=2), bundle_key
    )
    clock = FakeClock()
    config = device_config(tmp_path, fleet, mqtt_broker, sla_ms=SLA_MS, health_check_inferences=4)
    server.publish(desired_topic, fleet.desired(1, v1, 1), retain=True)
    agent = Agent(config, clock=clock)
    agent.start()
    try:
        rows = digits_rows.x_test[:1]
        wait_for(lambda: on_probation(agent, 1), what="v1 on probation")
        for _ in range(4):
            assert post_predict(agent, rows)[0] == 200
        passed = observer.wait_event("health_check_passed", 1)
        assert passed.detail is not None and passed.detail.startswith(
            "4 inferences, 0 failed, p95 "
        )

        server.publish(desired_topic, fleet.desired(2, v2, 2), retain=True)
        wait_for(lambda: on_probation(agent, 2), what="v2 on probation")  # its replay was fast
        for _ in range(4):
            status, body = post_predict(agent, bright(rows))
            assert status == 200 and body["version"] == 2  # slow, but answered
        rolled_back = observer.wait_event("rolled_back", 2)
    finally:
        agent.stop()

    assert rolled_back.reason == "health_check_failed"
    assert rolled_back.detail is not None
    assert rolled_back.detail.startswith("latency: p95 ")
    assert rolled_back.detail.endswith(
        f" ms over the profile's SLA of {SLA_MS:g} ms (4 inferences)"
    )
    p95 = float(rolled_back.detail.split()[2])
    assert p95 > SLA_MS
    assert agent.last_update is not None and agent.last_update.outcome == "rolled_back"
    assert agent.active_model().manifest.model_version == 1  # type: ignore[union-attr]


@pytest.mark.broker
def test_a_healthy_update_passes_on_real_traffic_and_keeps_two_versions(
    tmp_path: Path,
    fleet: Fleet,
    mqtt_broker: Any,
    mqtt_client: Callable[..., Any],
    make_digits_bundle: Callable[..., Bundle],
    digits_rows: Any,
    bundle_key: SigningKey,
) -> None:
    observer = Observer(mqtt_client("observer"), fleet.device_id)
    server = mqtt_client("server")
    desired_topic = device_topic(fleet.device_id, Channel.DESIRED)
    refs = [
        fleet.add(make_digits_bundle("onnx-float32", model_version=v), bundle_key)
        for v in (1, 2, 3)
    ]
    config = device_config(tmp_path, fleet, mqtt_broker, sla_ms=SLA_MS, health_check_inferences=5)
    agent = Agent(config)
    agent.start()
    try:
        rows = digits_rows.x_test[:2]
        for version, ref in enumerate(refs, start=1):
            server.publish(desired_topic, fleet.desired(version, ref, version), retain=True)
            wait_for(lambda v=version: on_probation(agent, v), what=f"v{version} on probation")
            for _ in range(3):
                assert post_predict(agent, rows)[0] == 200
            for _ in range(2):
                assert agent.predict(rows).outputs.shape == (2, 10)
            passed = observer.wait_event("health_check_passed", version)
            assert passed.detail is not None
            assert passed.detail.startswith("5 inferences, 0 failed, p95 ")
    finally:
        agent.stop()

    assert observer.kinds(3) == ["downloading", "verified", "activated", "health_check_passed"]
    assert agent.store.probations() == []
    assert agent.last_update is not None and agent.last_update.outcome == "activated"
    assert agent.last_update.detail.startswith("health check passed: 5 inferences")  # type: ignore[union-attr]
    # v1 is neither current nor previous any more: collected once v3 passed
    kept = sorted(p.name for p in agent.store.bundles_dir.iterdir())
    assert kept == sorted(f"{ref.sha256}.efb" for ref in refs[1:])


@pytest.mark.broker
@pytest.mark.slow
def test_an_update_the_agent_keeps_restarting_on_is_given_up_at_start(
    tmp_path: Path,
    fleet: Fleet,
    mqtt_broker: Any,
    mqtt_client: Callable[..., Any],
    make_digits_bundle: Callable[..., Bundle],
    bundle_key: SigningKey,
) -> None:
    """What a model that crashes the process leaves on disk, restart after restart: a
    probation marker that is still open. The first restart checks it again; the one
    after ``health_check_max_restarts`` rolls it back before anything loads it."""
    observer = Observer(mqtt_client("observer"), fleet.device_id)
    server = mqtt_client("server")
    desired_topic = device_topic(fleet.device_id, Channel.DESIRED)
    v1 = fleet.add(make_digits_bundle("onnx-float32"), bundle_key)
    v2 = fleet.add(make_digits_bundle("onnx-float32", model_version=2), bundle_key)
    clock = FakeClock()
    config = device_config(
        tmp_path, fleet, mqtt_broker, health_check_max_restarts=1, health_check_inferences=1000
    )
    server.publish(desired_topic, fleet.desired(1, v1, 1), retain=True)
    agent = Agent(config, clock=clock)
    agent.start()
    try:
        wait_for(lambda: on_probation(agent, 1), what="v1 on probation")
        clock.advance(60)
        observer.wait_event("health_check_passed", 1)
        server.publish(desired_topic, fleet.desired(2, v2, 2), retain=True)
        wait_for(lambda: on_probation(agent, 2), what="v2 on probation")
    finally:
        agent.stop()  # as a crash would: the verdict was not reached
    marker = agent.store.probation("digits")
    assert marker is not None and (marker.restarts, marker.failed) == (0, None)

    second = Agent(config, clock=clock)
    second.start()
    try:  # restart 1 of 1 allowed: v2 is served and judged again from the start
        assert second.active_model().manifest.model_version == 2  # type: ignore[union-attr]
        wait_for(lambda: on_probation(second, 2), what="v2 on probation again")
    finally:
        second.stop()

    third = Agent(config, clock=clock)
    third.start()
    try:  # restart 2: v2 never loads; v1 is back at once
        assert third.active_model().manifest.model_version == 1  # type: ignore[union-attr]
        current = third.store.current("digits")
        assert current is not None and current.sha256 == v1.sha256
        rolled_back = observer.wait_event("rolled_back", 2)
        assert rolled_back.reason == "health_check_failed"
        assert rolled_back.detail == (
            "the agent restarted 2 times while digits v2 was on probation (a model that "
            "crashes the process?); given up"
        )
        assert third.last_update is not None and third.last_update.outcome == "rolled_back"
        time.sleep(1.0)  # the retained desired state (v2) came again: absence takes a wait
        assert third.status()["probation"] is None
        assert third.active_model().manifest.model_version == 1  # type: ignore[union-attr]
    finally:
        third.stop()
    observer.poll()
    assert observer.kinds(2).count("downloading") == 1


@pytest.mark.broker
@pytest.mark.slow
def test_an_install_interrupted_too_often_before_activation_is_refused(
    tmp_path: Path,
    fleet: Fleet,
    mqtt_broker: Any,
    mqtt_client: Callable[..., Any],
    make_digits_bundle: Callable[..., Bundle],
    bundle_key: SigningKey,
) -> None:
    """A model that kills the process while it is first loaded or self-tested: its marker
    names a bundle that is not current. Each start counts; past the limit it is refused
    for this manifest and not fetched again."""
    observer = Observer(mqtt_client("observer"), fleet.device_id)
    server = mqtt_client("server")
    desired_topic = device_topic(fleet.device_id, Channel.DESIRED)
    v1 = fleet.add(make_digits_bundle("onnx-float32"), bundle_key)
    v2 = fleet.add(make_digits_bundle("onnx-float32", model_version=2), bundle_key, allow=False)
    clock = FakeClock()
    config = device_config(tmp_path, fleet, mqtt_broker, health_check_max_restarts=0)
    server.publish(desired_topic, fleet.desired(1, v1, 1), retain=True)
    agent = Agent(config, clock=clock)
    agent.start()
    try:
        wait_for(lambda: on_probation(agent, 1), what="v1 on probation")
        clock.advance(60)
        observer.wait_event("health_check_passed", 1)
        server.publish(desired_topic, fleet.desired(2, v2, 2), retain=True)
        failed = observer.wait_event("failed", 2)  # accepted, not served yet
        assert failed.reason == "download_failed"
    finally:
        agent.stop()
    # What a crash in the trial load of v2 leaves on top: its marker, its pointer unmoved.
    agent.store.begin_probation(
        "digits", BundleRef(v2.sha256, v2.length, 2, ONNX_PROFILE), manifest_version=2
    )
    fleet.allowed.add(v2.sha256)

    again = Agent(config, clock=clock)
    again.start()
    try:
        assert again.active_model().manifest.model_version == 1  # type: ignore[union-attr]
        rejected = observer.wait_event("rejected", 2)
        assert rejected.reason == "self_test_failed"
        assert rejected.detail == (
            "the agent restarted 1 times while digits v2 was being loaded and self-tested "
            "(a model that crashes the process?); given up"
        )
        time.sleep(1.0)  # the retained v2 arrives and must be left alone: absence takes a wait
        assert again.active_model().manifest.model_version == 1  # type: ignore[union-attr]
    finally:
        again.stop()
    observer.poll()
    assert observer.kinds(2).count("downloading") == 1
    marker = again.store.probation("digits")
    assert marker is not None and marker.failed is not None and marker.restarts == 1


@pytest.mark.broker
def test_a_rollback_a_kill_cut_short_is_finished_at_start(
    tmp_path: Path,
    fleet: Fleet,
    mqtt_broker: Any,
    mqtt_client: Callable[..., Any],
    make_digits_bundle: Callable[..., Bundle],
    bundle_key: SigningKey,
) -> None:
    """A rollback records its verdict before it moves the pointer back; killed in between,
    the next start moves it, before the failed version is loaded, and reports it."""
    observer = Observer(mqtt_client("observer"), fleet.device_id)
    server = mqtt_client("server")
    desired_topic = device_topic(fleet.device_id, Channel.DESIRED)
    v1 = fleet.add(make_digits_bundle("onnx-float32"), bundle_key)
    v2 = fleet.add(make_digits_bundle("onnx-float32", model_version=2), bundle_key)
    clock = FakeClock()
    config = device_config(tmp_path, fleet, mqtt_broker)
    server.publish(desired_topic, fleet.desired(1, v1, 1), retain=True)
    agent = Agent(config, clock=clock)
    agent.start()
    try:
        wait_for(lambda: on_probation(agent, 1), what="v1 on probation")
        clock.advance(60)
        observer.wait_event("health_check_passed", 1)
        server.publish(desired_topic, fleet.desired(2, v2, 2), retain=True)
        wait_for(lambda: on_probation(agent, 2), what="v2 on probation")
    finally:
        agent.stop()
    verdict = "errors: 3 of 3 inferences failed (100%), over the limit of 10%"
    agent.store.fail_probation("digits", verdict)  # the rollback's first step; then the kill

    again = Agent(config, clock=clock)
    again.start()
    try:
        assert again.active_model().manifest.model_version == 1  # type: ignore[union-attr]
        rolled_back = observer.wait_event("rolled_back", 2)
        assert (rolled_back.reason, rolled_back.detail) == ("health_check_failed", verdict)
        assert again.last_update is not None and again.last_update.outcome == "rolled_back"
        current = again.store.current("digits")
        assert current is not None and current.sha256 == v1.sha256
    finally:
        again.stop()
