"""A harness for rollouts end to end: the real server on a real broker with a clock the test
moves, a model registered by the real pipeline, simulated devices, and ways to wait.

- :class:`Clock` -- real time plus an offset a test moves forward, so time jumps (a
  device timeout, a manifest near its expiry) take no waiting, and everything that
  stamps time -- engine, publisher, inventory, API, simulated devices -- agrees.
- :func:`trained_digits` -- a tiny Keras classifier on sklearn's digits and its targets
  for three profiles, built by :func:`server.pipeline.targets.build_targets` once per
  process (about 8 s); :func:`publish_versions` registers versions of it with
  :func:`server.pipeline.publish.publish_model_version` (real conversion, gates, drift
  reference, bundles signed with the server's own keys).
- :class:`RolloutServer` -- ``create_app`` with a broker, its lifespan running (engine,
  publisher, block server, ingestor, inventory), plus small API helpers.
- :class:`SimFleet` -- simulated devices (:mod:`server.simulator`) enrolled through the API.
"""

from __future__ import annotations

import functools
import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from server.app import create_app
from server.datasets.types import LoadedDataset
from server.db import session_scope
from server.pipeline.publish import publish_model_version
from server.pipeline.types import GateConfig, TargetBuild
from server.profiles import load_profiles
from server.rollouts.models import IssuedManifestRecord
from server.settings import Settings
from server.simulator.device import Behaviour, SimulatedDevice
from server.simulator.fleet import FleetSimulator
from shared.messages import Deployment, DesiredState
from shared.preprocessing import PreprocessingStep, Scale, apply_preprocessing
from shared.signing import Envelope
from tests.conftest import BrokerEndpoint, authorize
from tests.server.conftest import add_dataset_row
from tests.server.pipeline.conftest import make_dataset

MODEL = "digits"
PROFILE = "edge-x86_64-litert"
LEGACY = "legacy-armv7-tflite"
ONNX = "cloud-x86_64-onnx"
RUNTIME = ("litert", "2.3.0")
ACTIVATION_ONLY = {
    "max_error_rate": None,
    "max_latency_sla_ratio": None,
    "max_confidence_drop": None,
    "max_prediction_psi": None,
}
"""Gates (as JSON) that judge installs only: for rollouts whose devices serve no traffic."""


class Clock:
    """Real time plus an offset that only grows (thread-safe)."""

    def __init__(self) -> None:
        self._offset = timedelta(0)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return datetime.now(UTC) + self._offset

    def advance(self, **delta: float) -> None:
        step = timedelta(**delta)
        assert step >= timedelta(0), "the clock never goes back"
        with self._lock:
            self._offset += step


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``condition`` until it returns something truthy (there is no event to wait on
    across the broker, the server's threads and the devices)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"{what} not met within {timeout:g} s (last: {last!r})")


# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Trained:
    model: Any
    data: LoadedDataset
    steps: list[PreprocessingStep]
    accuracy: float
    builds: list[TargetBuild]


@functools.cache
def trained_digits() -> Trained:
    """A small dense classifier on the 8x8 digits, with targets for PROFILE, LEGACY, ONNX."""
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    from sklearn.datasets import load_digits

    from server.pipeline.targets import build_targets

    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.data))
    x = bunch.data[order].astype(np.float32)
    y = bunch.target[order].astype(np.int64)
    data = make_dataset(
        x,
        y,
        task="classification",
        input_shape=[64],
        class_names=[str(d) for d in range(10)],
        n_train=1100,
        n_val=250,
    )
    steps: list[PreprocessingStep] = [Scale(factor=1 / 16)]
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(apply_preprocessing(steps, data.x_train), data.y_train, epochs=10, verbose=0)
    predicted = model.predict(apply_preprocessing(steps, data.x_test), verbose=0).argmax(axis=1)
    accuracy = float(np.mean(predicted == data.y_test))
    profiles = load_profiles()
    builds = build_targets(
        model,
        data=data,
        preprocessing=steps,
        profiles=[profiles[PROFILE], profiles[LEGACY], profiles[ONNX]],
        gates=GateConfig(),
        float_metrics={"accuracy": accuracy},
    )
    assert all(b.gate.passed for b in builds), [b.gate for b in builds]
    return Trained(model, data, steps, accuracy, builds)


def publish_versions(app: Any, count: int) -> list[int]:
    """Register ``count`` new versions of MODEL in ``app``'s registry (signed with its keys)."""
    trained = trained_digits()
    engine = app.state.engine
    with session_scope(engine) as session:
        dataset_version_id = add_dataset_row(session, name=f"digits-{uuid.uuid4().hex[:6]}").id
    versions = []
    for _ in range(count):
        with Session(engine) as session:
            version = publish_model_version(
                session,
                store=app.state.artifacts,
                keys=app.state.keys,
                profiles={p: load_profiles()[p] for p in (PROFILE, LEGACY, ONNX)},
                model_name=MODEL,
                dataset=trained.data,
                dataset_version_id=dataset_version_id,  # type: ignore[arg-type]
                keras_model=trained.model,
                preprocessing=trained.steps,
                float_metrics={"accuracy": trained.accuracy},
                source="trained",
                run_id=None,
                build=lambda *_args, **_kwargs: trained.builds,
            )
            versions.append(version.version)
    return versions


# ----------------------------------------------------------------------------- the server


class RolloutServer:
    """The app with its lifespan running on a real broker; ``with`` starts and stops it."""

    def __init__(
        self,
        *,
        db_url: str,
        data_dir: Path,
        broker: BrokerEndpoint,
        clock: Clock,
        **overrides: Any,
    ) -> None:
        fields: dict[str, Any] = {
            "data_dir": data_dir,
            "database_url": db_url,
            "broker_url": broker.url,
            "run_jobs": False,
            "rollout_tick_seconds": 0.2,
            "rollout_maintenance_seconds": 0.5,
            # Its own persistent ingest session: no telemetry of another test's devices.
            "ingest_client_id": f"ingest-{data_dir.parent.name[-40:]}",
        }
        fields.update(overrides)
        self.settings = Settings(**fields)
        self.clock = clock
        self.app: Any = None
        self.client: TestClient | None = None

    def __enter__(self) -> RolloutServer:
        self.app = create_app(self.settings, clock=self.clock)
        self.client = TestClient(self.app)
        self.client.__enter__()
        authorize(self.client, self.app)
        wait_for(lambda: self.app.state.desired_publisher.connected, 10, "publisher connected")
        wait_for(lambda: self.app.state.inventory.subscribed, 10, "inventory subscribed")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.client is not None
        self.client.__exit__(None, None, None)
        self.client = None

    # -- API

    def call(self, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
        assert self.client is not None
        response = self.client.request(method, f"/api/v1{path}", **kwargs)
        assert response.status_code == expect, f"{method} {path}: {response.text}"
        return None if response.status_code == 204 else response.json()

    def enroll(
        self,
        device_id: str,
        *,
        profile: str = PROFILE,
        tags: Mapping[str, str] | None = None,
        runtime: tuple[str, str] = RUNTIME,
    ) -> dict[str, Any]:
        token = self.call(
            "POST", "/provisioning-tokens", 201, json={"auto_accept": True, "profile": profile}
        )["token"]
        body = {
            "token": token,
            "device_id": device_id,
            "profile": profile,
            "arch": "x86_64",
            "runtime": {"name": runtime[0], "version": runtime[1]},
            "runtimes": {runtime[0]: runtime[1]},
            "agent_version": "test",
            "tags": dict(tags or {}),
        }
        enrolled: dict[str, Any] = self.call("POST", "/enroll", 201, json=body)
        return enrolled

    def group(
        self, name: str, *, members: list[str] | None = None, selector: str | None = None
    ) -> None:
        self.call("POST", "/groups", 201, json={"name": name, "selector": selector})
        if members:
            self.call("POST", f"/groups/{name}/members", json={"device_ids": members})

    def create_rollout(self, **body: Any) -> dict[str, Any]:
        body.setdefault("model", MODEL)
        created: dict[str, Any] = self.call("POST", "/rollouts", 201, json=body)
        return created

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        shown: dict[str, Any] = self.call("GET", f"/rollouts/{rollout_id}")
        return shown

    def wait_rollout(
        self,
        rollout_id: str,
        condition: Callable[[dict[str, Any]], bool],
        timeout: float = 30.0,
        what: str = "rollout condition",
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            shown = self.rollout(rollout_id)
            return shown if condition(shown) else None

        try:
            found: dict[str, Any] = wait_for(check, timeout, what)
        except AssertionError as e:
            raise AssertionError(f"{e}\nrollout now: {self.rollout(rollout_id)}") from None
        return found

    def issued(self, device_id: str) -> list[IssuedManifestRecord]:
        """Manifests issued to a device, oldest first."""
        with Session(self.app.state.engine) as session:
            return list(
                session.exec(
                    select(IssuedManifestRecord)
                    .where(IssuedManifestRecord.device_id == device_id)
                    .order_by(col(IssuedManifestRecord.manifest_version))
                )
            )


def desired_of(record: IssuedManifestRecord) -> DesiredState:
    """The signed desired state inside an issued manifest (signatures not checked here)."""
    from shared.messages import DesiredMessage

    message = DesiredMessage.from_bytes(bytes(record.payload))
    envelope: Envelope = message.manifest
    return DesiredState.from_bytes(envelope.payload_bytes())


def deployed(record: IssuedManifestRecord) -> dict[str, int]:
    deployments: list[Deployment] = desired_of(record).deployments
    return {d.model_name: d.model_version for d in deployments}


# ----------------------------------------------------------------------------- devices


class SimFleet:
    """Simulated devices enrolled through ``server``'s API, on one simulator thread."""

    def __init__(
        self,
        server: RolloutServer,
        broker: BrokerEndpoint,
        behaviours: Mapping[str, Behaviour],
        *,
        tags: Mapping[str, Mapping[str, str]] | None = None,
        report_interval: float = 0.3,
    ) -> None:
        self.server = server
        for device_id in behaviours:
            server.enroll(device_id, tags=(tags or {}).get(device_id))
        root = server.app.state.keys.root_public
        self.devices = {
            device_id: SimulatedDevice(
                device_id,
                profile=PROFILE,
                runtime=RUNTIME,
                root_keys=[root],
                behaviour=behaviour,
                block_size=16 * 1024,
                blocks_per_request=8,
                wall_clock=server.clock,
            )
            for device_id, behaviour in behaviours.items()
        }
        self.simulator = FleetSimulator(
            list(self.devices.values()),
            host=broker.host,
            port=broker.port,
            report_interval=report_interval,
            inferences_per_report=100,
        )

    def __enter__(self) -> SimFleet:
        self.simulator.start()
        wait_for(
            lambda: self.simulator.stats().connected == len(self.devices), 15, "devices connected"
        )
        # The inventory has their state (profile, runtime) before any rollout starts.
        wait_for(
            lambda: all(
                self.server.call("GET", f"/devices/{d}")["state_reported_at"] for d in self.devices
            ),
            15,
            "device states in the inventory",
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.simulator.stop()

    def running(self, device_id: str) -> int | None:
        active = self.devices[device_id].active.get(MODEL)
        return None if active is None else active.deployment.model_version


# ----------------------------------------------------------------------------- rows only


def add_device(
    session: Session,
    device_id: str,
    *,
    profile: str = PROFILE,
    runtime: tuple[str, str] | None = RUNTIME,
    runtimes: Mapping[str, str] | None = None,
    status: str = "accepted",
    tags: Mapping[str, str] | None = None,
) -> Any:
    """A device row as enrollment leaves it (for tests that need no broker)."""
    from server.fleet.models import Device

    name, version = runtime or ("", "")
    device = Device(
        id=device_id,
        status=status,
        profile=profile,
        arch="x86_64",
        runtime_name=name,
        runtime_version=version,
        agent_version="test",
    )
    device.runtimes_json = json.dumps(dict(runtimes or ({name: version} if name else {})))
    device.tags = dict(tags or {})
    session.add(device)
    session.flush()
    return device


def register_version(
    session: Session,
    *,
    model: str = MODEL,
    status: str = "ready",
    artifacts: Mapping[str, Mapping[str, Any]] | None = None,
) -> Any:
    """A model version with ``artifacts`` (profile -> fields) as rows only, no bundles.

    Each artifact defaults to a gate-passed litert variant with a bundle hash; give
    ``gate=False``, ``bundle=False``, ``runtime=...`` or ``ops=[...]`` to change that.
    """
    from server.models import Model, ModelVersion, TargetArtifact

    found = session.exec(select(Model).where(Model.name == model)).first()
    if found is None:
        found = Model(name=model, task="classification")
        session.add(found)
        session.flush()
    dataset_version = add_dataset_row(session, name=f"data-{uuid.uuid4().hex[:8]}")
    last = session.exec(
        select(ModelVersion.version)
        .where(ModelVersion.model_id == found.id)
        .order_by(col(ModelVersion.version).desc())
    ).first()
    version = ModelVersion(
        model_id=found.id,  # type: ignore[arg-type]
        version=(last or 0) + 1,
        source="trained",
        dataset_version_id=dataset_version.id,  # type: ignore[arg-type]
        keras_sha256="0" * 64,
        status=status,
    )
    session.add(version)
    session.flush()
    for profile, fields in (artifacts if artifacts is not None else {PROFILE: {}}).items():
        has_bundle = fields.get("bundle", True)
        session.add(
            TargetArtifact(
                model_version_id=version.id,  # type: ignore[arg-type]
                target=profile,
                format="tflite",
                quantization="float32",
                runtime=fields.get("runtime", "litert"),
                bundle_sha256=fields.get("sha256", uuid.uuid4().hex * 2) if has_bundle else None,
                bundle_length=fields.get("length", 4096) if has_bundle else None,
                ops_json=json.dumps(fields.get("ops", [{"name": "FULLY_CONNECTED", "version": 1}])),
                gate_passed=fields.get("gate", True),
            )
        )
    session.flush()
    return version
