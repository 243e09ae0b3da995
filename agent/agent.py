"""The running agent: wires the store, runtimes, monitoring, local API, transport, outbox
and updater together.

Threads and what each may do:

- the **main loop** reads the transport's inbox (paho's callbacks only enqueue there),
  hands artifact blocks to the downloader's frame queue and desired states to the
  update thread (latest wins), and closes telemetry windows into the outbox;
- the **update thread** plans, downloads, verifies, self-tests, activates and, when
  the health check fails, rolls back -- one update at a time;
- the local API's threads serve predictions from the active model;
- the transport's network thread and the outbox publisher are their modules' own.

What always holds: the agent starts and serves the last good model with no broker
and no network; nothing on the inference path touches the network; a refused
desired state changes nothing on disk but a ``rejected`` event in the outbox; the
active pointer moves only after a bundle verified, loaded and passed its self-tests.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import queue
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from agent import __version__
from agent.config import AgentConfig
from agent.download import BlockDownloader, DownloadError, TransportFrameSource, http_download
from agent.errors import AgentError
from agent.http_api import LocalApi
from agent.monitoring import WindowMonitor
from agent.outbox import Outbox, OutboxPublisher
from agent.runtime import LoadedModel, ModelRuntimeError, available_runtimes
from agent.store import BundleRef, ModelStore
from agent.transport import MqttTransport
from agent.updater import TrustStore, UpdatePlan, plan_update
from shared.bundle import check_target, read_bundle
from shared.errors import ContractError, RejectReason
from shared.messages import (
    Deployment,
    DeviceState,
    Event,
    EventKind,
    RunningModel,
    RuntimeInfo,
    UpdateOutcome,
    UpdateResult,
)
from shared.topics import Channel, device_topic

__all__ = ["Agent"]

log = logging.getLogger(__name__)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Agent:
    """One device's agent. ``transport_factory`` is injectable (tests, other brokers)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        transport_factory: Callable[..., Any] = MqttTransport,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.config = config
        self._transport_factory = transport_factory
        self._clock = clock
        self._now = wall_clock
        self._stopping = threading.Event()
        self._desired: queue.Queue[bytes] = queue.Queue(maxsize=1)
        self._lock = threading.Lock()
        self.models: dict[str, LoadedModel] = {}
        self._serving: LoadedModel | None = None
        self.last_update: UpdateResult | None = None
        self.transport: Any = None
        self._threads: list[threading.Thread] = []
        self._state_dirty = threading.Event()
        self.runtimes = available_runtimes()
        self._refused: set[str] = set()
        self._last_desired: bytes | None = None
        self._retry_at: float | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        config = self.config
        data_dir = config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.store = ModelStore(data_dir, max_bundle_bytes=config.limits.max_bundle_bytes)
        self.trust_store = TrustStore(
            data_dir, root_keys=config.root_keys(), root_threshold=config.trust.root_threshold
        )
        self.trust = self.trust_store.load(now=self._now())
        self.outbox = Outbox(
            data_dir / "outbox.sqlite",
            max_rows=config.limits.outbox_max_rows,
            max_bytes=config.limits.outbox_max_bytes,
        )
        self.monitor = WindowMonitor(
            device_id=config.device_id,
            window_seconds=config.window_seconds,
            capture=config.capture,
            data_dir=data_dir,
            clock=self._clock,
            wall_clock=self._now,
        )
        self._load_active_models()
        self.api: LocalApi | None = None
        if config.http.enabled:
            self.api = LocalApi(
                self.active_model,
                self.monitor,
                config=config.http,
                limits=config.limits,
                status_provider=self.status,
            )
            self.api_address = self.api.start()
        self.publisher: OutboxPublisher | None = None
        if config.broker is not None:
            self.transport = self._transport_factory(
                config.broker, device_id=config.device_id, limits=config.limits
            )
            self.frames = TransportFrameSource(self.transport, config.device_id)
            self.transport.subscribe(device_topic(config.device_id, Channel.DESIRED))
            self.transport.subscribe(self.frames.topic)
            self.transport.start()
            self.publisher = OutboxPublisher(self.outbox, self.transport)
            self.publisher.start()
        self._state_dirty.set()
        for name, target in (("agent-main", self._main_loop), ("agent-update", self._update_loop)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info(
            "agent started", extra={"device_id": config.device_id, "models": list(self.models)}
        )

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(10)
        if self.api is not None:
            self.api.stop()
        if self.publisher is not None:
            self.publisher.stop()
        if self.transport is not None:
            self.transport.stop()
        self.outbox.close()

    def wait(self) -> None:
        while not self._stopping.wait(0.5):
            pass

    # ------------------------------------------------------------------ serving

    def active_model(self) -> LoadedModel | None:
        """The model the local API serves (called on every request: no work here)."""
        return self._serving

    def _set_model(self, name: str, model: LoadedModel | None) -> None:
        """Change one model and recompute which one is served (the first by name)."""
        with self._lock:
            if model is None:
                self.models.pop(name, None)
            else:
                self.models[name] = model
            self._serving = self.models[min(self.models)] if self.models else None

    def _load_active_models(self) -> None:
        keyring = self.trust.keyring
        if keyring is None:
            return
        bundles = self.store.load_active(
            trusted_keys=keyring.verify_keys(), threshold=keyring.threshold
        )
        for problem in self.store.load_problems:
            log.warning("model store: %s", problem)
        for name, bundle in bundles.items():
            try:
                self._set_model(name, LoadedModel.load(bundle, limits=self.config.limits))
            except (ModelRuntimeError, ContractError) as e:
                log.error("cannot serve %s: %s", name, e)
        model = self.active_model()
        self.monitor.set_model(None if model is None else model.manifest)

    def status(self) -> dict[str, Any]:
        model = self.active_model()
        return {
            "device_id": self.config.device_id,
            "agent_version": __version__,
            "profile": self.config.profile,
            "runtimes": self.runtimes,
            "models": {
                name: {"version": m.manifest.model_version, "target": m.manifest.target}
                for name, m in sorted(self.models.items())
            },
            "serving": None if model is None else model.manifest.model_name,
            "connected": bool(self.transport is not None and self.transport.connected.is_set()),
            "outbox_depth": self.outbox.depth(),
            "manifest_version": self.trust.manifest_version,
            "last_update": None
            if self.last_update is None
            else self.last_update.model_dump(mode="json"),
        }

    # ------------------------------------------------------------------ main loop

    def _main_loop(self) -> None:
        desired_topic = device_topic(self.config.device_id, Channel.DESIRED)
        while not self._stopping.is_set():
            timeout = max(0.05, min(1.0, self.monitor.seconds_until_due()))
            message = None
            if self.transport is not None:
                try:
                    message = self.transport.inbox.get(timeout=timeout)
                except queue.Empty:
                    message = None
            else:
                self._stopping.wait(timeout)
            if message is not None:
                if message.topic == self.frames.topic:
                    self.frames.deliver(message.payload)
                elif message.topic == desired_topic and message.payload:
                    self._offer_desired(bytes(message.payload))
            if self.monitor.window_due():
                self._close_window()
            if self._retry_at is not None and self._clock() >= self._retry_at:
                self._retry_at = None
                if self._last_desired is not None:
                    self._offer_desired(self._last_desired)  # retry a failed install
            connected = self.transport is not None and self.transport.connected.is_set()
            if self._state_dirty.is_set() and connected:
                self._state_dirty.clear()
                self._publish_state()

    def _offer_desired(self, payload: bytes) -> None:
        """Latest wins: an older desired state still waiting is replaced."""
        with contextlib.suppress(queue.Empty):
            self._desired.get_nowait()
        self._desired.put_nowait(payload)

    def _close_window(self) -> None:
        topic = device_topic(self.config.device_id, Channel.TELEMETRY)
        try:
            self.outbox.put_report(
                topic,
                lambda seq, dropped: self.monitor.close_window(seq, dropped).to_bytes(),
            )
        except (AgentError, ContractError) as e:
            log.error("telemetry window not stored: %s", e)
        if self.publisher is not None:
            self.publisher.wake()

    def _event(self, kind: EventKind, deployment: Deployment | None = None, **fields: Any) -> None:
        event = Event(
            device_id=self.config.device_id,
            event_id=uuid.uuid4().hex,
            kind=kind,
            at=self._now(),
            manifest_version=self.trust.manifest_version,
            model_name=None if deployment is None else deployment.model_name,
            model_version=None if deployment is None else deployment.model_version,
            sha256=None if deployment is None else deployment.artifact.sha256,
            **fields,
        )
        self.outbox.put(device_topic(self.config.device_id, Channel.EVENTS), event.to_bytes())
        if self.publisher is not None:
            self.publisher.wake()

    def _publish_state(self) -> None:
        models = []
        for name, model in sorted(self.models.items()):
            ref = self.store.current(name)
            if ref is None:
                continue
            previous = self.store.previous(name)
            models.append(
                RunningModel(
                    model_name=name,
                    model_version=model.manifest.model_version,
                    target=model.manifest.target,
                    sha256=ref.sha256,
                    activated_at=ref.activated_at,
                    previous_version=None if previous is None else previous.model_version,
                )
            )
        runtime_name, runtime_version = next(iter(self.runtimes.items()), ("none", "0"))
        state = DeviceState(
            device_id=self.config.device_id,
            agent_version=__version__,
            profile=self.config.profile,
            arch=_arch(),
            runtime=RuntimeInfo(name=runtime_name, version=runtime_version),
            manifest_version=self.trust.manifest_version,
            keyring_version=0 if self.trust.keyring is None else self.trust.keyring.version,
            models=models,
            last_update=self.last_update,
            reported_at=self._now(),
        )
        self.transport.publish(
            device_topic(self.config.device_id, Channel.STATE), state.to_bytes(), retain=True
        )

    # ------------------------------------------------------------------ updates

    def _update_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                payload = self._desired.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self.apply_desired(payload)
            except Exception:  # the update thread must survive anything
                log.exception("update failed unexpectedly")

    def apply_desired(self, payload: bytes) -> UpdatePlan | None:
        """Plan and carry out one desired state; a refusal changes nothing but an event."""
        running = {}
        for name in self.models:
            ref = self.store.current(name)
            if ref is not None:
                running[name] = ref.sha256
        try:
            plan = plan_update(
                self.trust,
                payload,
                device_id=self.config.device_id,
                profile=self.config.profile,
                runtimes=self.runtimes,
                running=running,
                now=self._now(),
            )
        except ContractError as e:
            reason = getattr(e, "reason", RejectReason.MALFORMED)
            log.warning("desired state refused (%s): %s", reason, e)
            self._finish(None, UpdateOutcome.REJECTED, str(reason), str(e))
            self._event(EventKind.REJECTED, reason=str(reason), detail=str(e)[:1000])
            return None
        self._last_desired = payload
        if plan.is_new:
            self.trust = plan.state
            self.trust_store.save(plan.state, keyring_envelope=plan.keyring_envelope)
            self._refused.clear()
        pending = [d for d in plan.fetch if d.artifact.sha256 not in self._refused]
        if not plan.is_new and not pending:
            return plan
        for deployment in pending:
            self._install(deployment, plan)
        for name in plan.remove:
            self.store.deactivate(name)
            self._set_model(name, None)
        if not plan.fetch:
            self._finish(plan, UpdateOutcome.ACTIVATED, None, "nothing to fetch")
        self._state_dirty.set()
        return plan

    def _install(self, deployment: Deployment, plan: UpdatePlan) -> None:
        keyring = self.trust.keyring
        assert keyring is not None
        ref = deployment.artifact
        self._event(EventKind.DOWNLOADING, deployment)
        try:
            path = self._download(deployment)
            with path.open("rb") as f:
                bundle = read_bundle(
                    f,
                    trusted_keys=keyring.verify_keys(),
                    threshold=keyring.threshold,
                    expected_sha256=ref.sha256,
                    expected_length=ref.length,
                    max_bytes=self.config.limits.max_bundle_bytes,
                )
            check_target(
                bundle.manifest,
                model_name=deployment.model_name,
                model_version=deployment.model_version,
                target=deployment.target,
                runtimes=self.runtimes,
            )
            self._event(EventKind.VERIFIED, deployment)
            trial = LoadedModel.load(bundle, limits=self.config.limits)
            trial.run_self_tests()
            self.store.stage(path, sha256=ref.sha256, length=ref.length)
        except ContractError as e:
            self._discard(ref.sha256)
            reason = str(getattr(e, "reason", RejectReason.MALFORMED))
            self._reject(plan, deployment, reason, e)
            return
        except ModelRuntimeError as e:
            self._discard(ref.sha256)
            self._reject(plan, deployment, "self_test_failed", e)
            return
        except (DownloadError, OSError) as e:
            self._retry_at = self._clock() + self.config.limits.backoff_max_seconds
            self._finish(plan, UpdateOutcome.FAILED, "download_failed", str(e))
            self._event(
                EventKind.FAILED, deployment, reason="download_failed", detail=str(e)[:1000]
            )
            return
        self.store.activate(
            deployment.model_name,
            BundleRef(
                sha256=ref.sha256,
                length=ref.length,
                model_version=deployment.model_version,
                target=deployment.target,
            ),
        )
        self._set_model(deployment.model_name, trial)
        self.monitor.set_model(trial.manifest)
        self._event(EventKind.ACTIVATED, deployment)
        if self._healthy(trial):
            self._event(EventKind.HEALTH_CHECK_PASSED, deployment)
            self._finish(plan, UpdateOutcome.ACTIVATED, None, None)
        else:
            self._roll_back(plan, deployment)

    def _discard(self, sha256: str) -> None:
        """Nothing from a refused artifact stays on the device (partial or complete)."""
        for name in (sha256, f"{sha256}.part", f"{sha256}.part.json"):
            (self.store.tmp_dir / name).unlink(missing_ok=True)

    def _download(self, deployment: Deployment) -> Path:
        download = self.config.download
        dest = self.store.tmp_dir
        if download.method == "http":
            if not download.http_base_url or not deployment.artifact.url:
                raise DownloadError("HTTP download configured, but no URL for the artifact")
            return http_download(
                download.http_base_url,
                deployment.artifact.url,
                deployment.artifact,
                dest,
                limits=self.config.limits,
            )
        if self.transport is None:
            raise DownloadError("no broker configured to download over MQTT")
        downloader = BlockDownloader(
            self.frames, self.config.device_id, download, self.config.limits
        )
        return downloader.download(deployment.artifact, dest)

    def _healthy(self, model: LoadedModel) -> bool:
        """Run the self-test inputs as live traffic: no errors, p95 within the profile's SLA."""
        sla = self.config.latency_sla_ms_p95
        latencies = []
        inputs = [row for test in model.manifest.self_tests for row in test.input] or []
        if not inputs:
            return True
        for _ in range(max(1, self.config.limits.health_check_inferences // len(inputs))):
            for row in inputs:
                started = time.perf_counter()
                try:
                    model.predict(np.asarray([row], dtype=np.float64))
                except ModelRuntimeError as e:
                    log.error("health check: inference failed: %s", e)
                    return False
                latencies.append((time.perf_counter() - started) * 1000)
        p95 = float(np.percentile(latencies, 95))
        if sla is not None and p95 > sla:
            log.error("health check: p95 latency %.2f ms over the SLA of %.2f ms", p95, sla)
            return False
        return True

    def _roll_back(self, plan: UpdatePlan, deployment: Deployment) -> None:
        name = deployment.model_name
        try:
            self.store.rollback(name)
        except AgentError:
            self.store.deactivate(name)
            self._set_model(name, None)
        else:
            self._load_active_models()
        self._event(EventKind.ROLLED_BACK, deployment, reason="health_check_failed")
        self._finish(plan, UpdateOutcome.ROLLED_BACK, "health_check_failed", None)

    def _reject(
        self, plan: UpdatePlan, deployment: Deployment, reason: str, error: Exception
    ) -> None:
        self._refused.add(deployment.artifact.sha256)  # not fetched again for this manifest
        log.warning(
            "%s v%s refused (%s): %s",
            deployment.model_name,
            deployment.model_version,
            reason,
            error,
        )
        self._finish(plan, UpdateOutcome.REJECTED, reason, str(error))
        self._event(EventKind.REJECTED, deployment, reason=reason, detail=str(error)[:1000])

    def _finish(
        self,
        plan: UpdatePlan | None,
        outcome: UpdateOutcome,
        reason: str | None,
        detail: str | None,
    ) -> None:
        self.last_update = UpdateResult(
            manifest_version=self.trust.manifest_version,
            rollout_id=None if plan is None else plan.desired.rollout_id,
            outcome=outcome,
            reason=reason,
            detail=None if detail is None else detail[:1000],
            at=self._now(),
        )
        self._state_dirty.set()


def _arch() -> str:
    return platform.machine() or "unknown"
