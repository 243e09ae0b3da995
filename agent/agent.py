"""The running agent: wires the store, runtimes, monitoring, local API, transport, outbox
and updater together, and judges each new model on probation.

Threads and what each may do:

- the **main loop** reads the transport's inbox (paho's callbacks only enqueue there),
  hands artifact blocks to the downloader's frame queue and desired states to the
  update thread (latest wins), and closes telemetry windows into the outbox;
- the **update thread** plans, downloads, verifies, self-tests, activates, watches
  the health check and, when it fails, rolls back -- one update at a time: a desired
  state that arrives meanwhile waits (at most ``limits.health_check_max_seconds``);
  between updates it looks at the wall clock for install windows that opened;
- the local API's threads (and callers of :meth:`Agent.predict`) serve predictions
  from the active model;
- the transport's network thread and the outbox publisher are their modules' own.

The health check. Right after activation the bundle's self-test inputs are replayed
as traffic (so a device without traffic still gets a check); then the model is on
*probation* for its first ``limits.health_check_inferences`` real inferences, or
``limits.health_check_max_seconds`` by the injected clock, whichever comes first.
Serving threads only count into a :class:`Probation` (a short lock around two
counters; nothing is held across an inference); the update thread reads the
verdict (:func:`judge_health`): a share of runtime errors over
``limits.health_check_max_error_rate`` (a caller's bad input is not the model's
error) or a p95 latency over the profile's ``latency_sla_ms_p95`` rolls the model
back by itself -- ``health_check_failed`` and ``rolled_back`` events whose detail
names the cause and its numbers, the last update result and the retained state
say so -- and passing is a ``health_check_passed`` event. With fewer inferences by
the deadline, those are judged; with none, the replay's verdict stands.

Install windows. A deployment with an ``install_window`` that is closed by the injected
wall clock is fetched, verified, self-tested and staged at once -- ``downloading``,
``verified`` and ``staged`` events, a ``staged`` last update -- and then waits: nothing
stays loaded, the pointer does not move, the model served does not change. When the
window opens, the update thread applies the same desired state again, which verifies
the staged bundle again, loads and self-tests it, and activates it (pointer last) and
judges it as any update. A newer desired state replaces what waits (a bundle it no
longer names is removed). The waiting desired state is kept on disk
(``agent.store``), so after a restart -- with or without a broker -- it is verified
again, by the trust rules and the bundle's hash and signature, and still waits.
Deployments without a window, and removals, happen at once.

Restarts. A probation marker (``agent.store.ProbationMarker``) is written before a
new model is first loaded and before its pointer moves, and removed when it passes.
At start, a marker means the agent was killed or crashed while that update was
loaded, self-tested or on probation: each start counts; up to
``limits.health_check_max_restarts`` the install or the probation starts again (a
power cut is not the model's fault), beyond it the update is given up -- rolled back
if it was active, refused either way for the current manifest version -- so a model
that crashes the process on load or on inference cannot trap the device in a loop.

The agent's own updates (``agent.selfupdate``, ``agent.launcher``). A desired state's
``agent`` field names a version; the same as the one running asks nothing. Otherwise the
update thread, after the models, fetches the wheel by the same download paths as a
bundle (length and sha256 checked while streaming), checks and installs it beside the
running version and -- inside its install window, if it has one (``staged`` until then)
-- records the switch and moves ``current``, then asks ``edgefleet-agent run`` to exit
for the launcher (:attr:`Agent.restart_requested`). Only under the launcher: without it
the update fails with ``self_update_unavailable``. A refused or failed wheel is a
``rejected``/``failed`` event and ``DeviceState.agent_update`` says why; the version
running goes on. The new version, started by the launcher, is on trial: once connected,
its DeviceState (naming it) acknowledged and its models' self-tests passed, it commits --
``activated`` and ``health_check_passed`` events, ``agent_update`` activated, older
versions but the previous one removed. A version the launcher rolled back is reported
by the one it went back to (``health_check_failed``, ``rolled_back``) and not installed
again under the same manifest version.

What always holds: the agent starts and serves the last good model with no broker
and no network; nothing on the inference path touches the network; a refused
desired state changes nothing on disk but a ``rejected`` event in the outbox; the
active pointer moves only after a bundle verified, loaded and passed its self-tests;
a model on probation has a marker on disk until its verdict is recorded; a
deployment with an install window is activated only while the wall clock is inside it.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import math
import os
import platform
import queue
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from agent import __version__
from agent.config import AgentConfig, Limits
from agent.download import (
    BlockDownloader,
    DownloadCancelled,
    DownloadError,
    TransportFrameSource,
    http_download,
)
from agent.errors import AgentError
from agent.feedback import sample_batches, samples_fit
from agent.http_api import LocalApi
from agent.monitoring import WindowMonitor
from agent.outbox import Outbox, OutboxPublisher
from agent.runtime import (
    InputError,
    LoadedModel,
    ModelRuntimeError,
    Prediction,
    available_runtimes,
)
from agent.selfupdate import (
    LAUNCHED_ENV,
    AgentHome,
    Pending,
    SelfUpdateError,
    SelfUpdateState,
    WheelRejected,
)
from agent.store import (
    BundleRef,
    ModelStore,
    NoPreviousVersionError,
    ProbationMarker,
    StoreError,
)
from agent.systemd import Notifier
from agent.transport import MqttTransport
from agent.updater import TrustStore, UpdatePlan, plan_update
from shared.bundle import Bundle, check_target, read_bundle
from shared.errors import ContractError, RejectReason
from shared.messages import (
    AGENT_WHEEL_MEDIA_TYPE,
    AgentDeployment,
    AgentUpdateResult,
    ArtifactRef,
    Deployment,
    DeviceState,
    Event,
    EventKind,
    FeedbackReport,
    InstallWindow,
    LabelledOutcome,
    RunningModel,
    RuntimeInfo,
    UpdateOutcome,
    UpdateResult,
)
from shared.topics import Channel, device_topic

__all__ = ["Agent", "HealthVerdict", "NoModelError", "Probation", "judge_health"]

log = logging.getLogger(__name__)

HEALTH_CHECK_FAILED = "health_check_failed"
"""The reason of a rollback the health check decided (events and the last update)."""
_PROBATION_POLL_SECONDS = 0.1  # how often the update thread looks at the injected clock
_STATE_ACK_SECONDS = 5.0  # a version on trial publishes its state again if not acked by then


class NoModelError(AgentError):
    """:meth:`Agent.predict` was called while no model is active."""


# ----------------------------------------------------------------------------- health check


@dataclass(frozen=True, slots=True)
class HealthVerdict:
    """Whether a model is healthy; ``cause`` (``errors`` or ``latency``) when it is not."""

    passed: bool
    detail: str
    cause: str | None = None


def judge_health(
    latencies_ms: Sequence[float],
    errors: int,
    *,
    max_error_rate: float,
    sla_ms_p95: float | None,
    what: str = "inferences",
) -> HealthVerdict:
    """The verdict on some inferences: ``latencies_ms`` of those that succeeded, and
    ``errors``, those that failed. Pure; ``detail`` carries the numbers either way."""
    total = len(latencies_ms) + errors
    if total == 0:
        return HealthVerdict(True, f"no {what} to judge")
    rate = errors / total
    if rate > max_error_rate:
        return HealthVerdict(
            False,
            f"errors: {errors} of {total} {what} failed ({rate:.0%}), over the limit of "
            f"{max_error_rate:.0%}",
            "errors",
        )
    if not latencies_ms:
        return HealthVerdict(True, f"{total} {what}, {errors} failed")
    p95 = float(np.percentile(np.asarray(latencies_ms, dtype=np.float64), 95))
    if sla_ms_p95 is not None and p95 > sla_ms_p95:
        return HealthVerdict(
            False,
            f"latency: p95 {p95:.4g} ms over the profile's SLA of {sla_ms_p95:g} ms "
            f"({len(latencies_ms)} {what})",
            "latency",
        )
    return HealthVerdict(True, f"{total} {what}, {errors} failed, p95 {p95:.4g} ms")


class Probation:
    """A newly activated model's first real inferences, counted until its verdict is due.

    :meth:`observe` is called on serving threads for every inference of any model and
    keeps only ``model``'s, the first ``limits.health_check_inferences`` of them; it
    takes a lock for a few counters only. :meth:`verdict` (the update thread) is None
    until they all came, too many failed to pass whatever follows, or ``now`` reached
    the deadline.
    """

    def __init__(
        self,
        model: LoadedModel,
        deployment: Deployment,
        *,
        rollout_id: str | None,
        limits: Limits,
        sla_ms_p95: float | None,
        now: float,
    ) -> None:
        self.model = model
        self.deployment = deployment
        self.rollout_id = rollout_id
        self.inferences = limits.health_check_inferences
        self.max_error_rate = limits.health_check_max_error_rate
        self.max_seconds = limits.health_check_max_seconds
        self.sla_ms_p95 = sla_ms_p95
        self.deadline = now + limits.health_check_max_seconds
        # More failures than this and the rate over all of them is over the limit already.
        self._allowed_errors = math.floor(self.max_error_rate * self.inferences + 1e-9)
        self._latencies: list[float] = []
        self._errors = 0
        self._lock = threading.Lock()
        self.due = threading.Event()
        """Set once the verdict no longer waits for the clock (the update thread waits on it)."""

    def observe(self, model: object, latency_ms: float | None) -> None:
        """One inference served by ``model``: its latency, or None when it failed."""
        if model is not self.model:
            return  # the model it replaced, finishing a request
        with self._lock:
            if self.due.is_set():
                return
            if latency_ms is None:
                self._errors += 1
            else:
                self._latencies.append(latency_ms)
            if (
                self._errors + len(self._latencies) >= self.inferences
                or self._errors > self._allowed_errors
            ):
                self.due.set()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "model_name": self.deployment.model_name,
                "model_version": self.deployment.model_version,
                "inferences": len(self._latencies) + self._errors,
                "errors": self._errors,
                "needed": self.inferences,
            }

    def verdict(self, now: float) -> HealthVerdict | None:
        if not self.due.is_set() and now < self.deadline:
            return None
        with self._lock:
            self.due.set()  # nothing counts after the verdict
            latencies, errors = list(self._latencies), self._errors
        verdict = judge_health(
            latencies, errors, max_error_rate=self.max_error_rate, sla_ms_p95=self.sla_ms_p95
        )
        seen = len(latencies) + errors
        if seen < self.inferences and verdict.passed:
            detail = (
                f"{verdict.detail}; {seen} of {self.inferences} inferences came within "
                f"{self.max_seconds:g} s"
            )
            if seen == 0:
                detail = f"no inference within {self.max_seconds:g} s; the self-test replay passed"
            verdict = HealthVerdict(True, detail)
        return verdict


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
        self._probation: Probation | None = None
        self._resumed: list[ProbationMarker] = []
        self._waiting: dict[str, Deployment] = {}  # staged, each waiting for its window
        self._wanted: frozenset[str] = frozenset()  # sha256s the accepted state still needs
        self.publisher: OutboxPublisher | None = None  # events may be put before it starts
        self.systemd = Notifier()  # READY and the watchdog, when systemd runs the agent
        # The agent's own updates (agent.selfupdate): the launcher restarts the agent in
        # the version ``current`` names once this is set.
        self.restart_requested = threading.Event()
        self.agent_update: AgentUpdateResult | None = None
        self._self_state = SelfUpdateState()
        self._agent_trial: Pending | None = None  # this process is a version on trial
        self._agent_trial_blocked: str | None = None
        self._agent_waiting: AgentDeployment | None = None  # installed, waits for its window
        self._state_handle: Any = None  # the last DeviceState handed to the transport
        self._state_published_at = 0.0

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
        self.home = AgentHome(data_dir)
        self._recover_self_update()
        self._recover_probations()  # before any model is loaded: it may be the one that crashes
        self._load_active_models()
        try:
            waiting = self.store.waiting()
        except StoreError as e:
            log.warning("%s", e)
            waiting = None
        if waiting is not None:  # verified again, by the trust rules, on the update thread
            self._offer_desired(waiting)
        self.api: LocalApi | None = None
        if config.http.enabled:
            self.api = LocalApi(
                self.active_model,
                self.monitor,
                config=config.http,
                limits=config.limits,
                status_provider=self.status,
                on_inference=self._observe,
                on_feedback=self._forward_feedback,
            )
            self.api_address = self.api.start()
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
        self.systemd.ready(f"serving {', '.join(self.models) or 'no model yet'}")

    def stop(self) -> None:
        self.systemd.stopping()
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

    def predict(self, rows: Any) -> Prediction:
        """Serve raw rows with the active model, counted as a local API request is:
        in the telemetry window and, for a model on probation, in its health check.

        Raises :class:`NoModelError` with no model, and the runtime's
        :class:`~agent.runtime.InputError` for rows it cannot take.
        """
        model = self._serving
        if model is None:
            self.monitor.record_error("unavailable")
            raise NoModelError("no model is active")
        manifest = model.manifest
        started = time.perf_counter()
        try:
            prediction = model.predict(rows)
        except InputError:
            self.monitor.record_error("input", manifest=manifest)
            raise
        except Exception:
            self.monitor.record_error("runtime", manifest=manifest)
            self._observe(model, None)
            raise
        latency_ms = (time.perf_counter() - started) * 1000.0
        self._observe(model, latency_ms)
        raw = np.asarray(rows, dtype=np.float64).reshape(len(prediction.outputs), -1)
        self.monitor.record(raw, prediction, latency_ms, manifest=manifest)
        return prediction

    def _observe(self, model: object, latency_ms: float | None) -> None:
        """The hot path's share of the health check: nothing unless a model is on probation."""
        probation = self._probation
        if probation is not None:
            probation.observe(model, latency_ms)

    def _set_model(self, name: str, model: LoadedModel | None) -> None:
        """Change one model and recompute which one is served (the first by name)."""
        with self._lock:
            if model is None:
                self.models.pop(name, None)
            else:
                self.models[name] = model
            self._serving = self.models[min(self.models)] if self.models else None

    def _load_active_models(self) -> None:
        if self.trust.keyring is None:
            return
        # Keys of earlier keyrings too: a rotation must not cost a device its model.
        keys, threshold = self.trust_store.bundle_keys(self.trust)
        bundles = self.store.load_active(trusted_keys=keys, threshold=threshold)
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
            "probation": None if (probation := self._probation) is None else probation.snapshot(),
            "agent_update": None
            if self.agent_update is None
            else self.agent_update.model_dump(mode="json"),
            "agent_trial": None
            if (trial := self._agent_trial) is None
            else {"version": trial.version, "previous": trial.previous, "attempt": trial.attempts},
            "waiting": [
                {
                    "model_name": name,
                    "model_version": d.model_version,
                    "install_window": str(d.install_window),
                    "opens_at": _next_opening(d.install_window, self._now()),
                }
                for name, d in sorted(self._waiting.items())
            ],
        }

    # ------------------------------------------------------------------ main loop

    def _main_loop(self) -> None:
        desired_topic = device_topic(self.config.device_id, Channel.DESIRED)
        # Under a systemd watchdog the loop turns at least four times an interval, so it is
        # fed every half interval even when nothing arrives.
        watchdog = self.systemd.watchdog_interval
        longest = 1.0 if watchdog is None else min(1.0, watchdog / 4)
        while not self._stopping.is_set():
            timeout = max(0.05, min(longest, self.monitor.seconds_until_due()))
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
            # Bin the rows served since the last turn here, off the request path.
            self.monitor.flush()
            if self.monitor.window_due():
                self._close_window()
            if self._retry_at is not None and self._clock() >= self._retry_at:
                self._retry_at = None
                if self._last_desired is not None:
                    self._offer_desired(self._last_desired)  # retry a failed install
            connected = self.transport is not None and self.transport.connected.is_set()
            if self._state_dirty.is_set() and connected:
                self._state_dirty.clear()
                self._state_handle = self._publish_state()
                self._state_published_at = self._clock()
            if self._agent_trial is not None and connected:
                self._commit_agent_update_when_healthy()
            self.systemd.keepalive()  # a loop that stops turning stops feeding the watchdog

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
        self._forward_samples()
        if self.publisher is not None:
            self.publisher.wake()

    # ------------------------------------------------------------------ feedback and samples

    def _forward_feedback(self, outcomes: list[LabelledOutcome]) -> None:
        """Labels posted to the local API: into the outbox (on an HTTP thread; raises
        :class:`~agent.errors.AgentError` when the outbox cannot store them)."""
        try:
            payload = FeedbackReport(device_id=self.config.device_id, outcomes=outcomes).to_bytes()
        except ContractError as e:
            raise AgentError(f"feedback cannot be sent: {e}") from e
        self.outbox.put(device_topic(self.config.device_id, Channel.FEEDBACK), payload)
        if self.publisher is not None:
            self.publisher.wake()

    def _forward_samples(self) -> None:
        """Samples captured in closed windows (``capture.enabled``): into the outbox, within
        half of its bounds (:func:`agent.feedback.samples_fit`); what does not fit is dropped."""
        topic = device_topic(self.config.device_id, Channel.SAMPLES)
        for captured in self.monitor.take_samples():
            try:
                batches, not_finite = sample_batches(self.config.device_id, captured)
                for batch in batches:
                    payload = batch.to_bytes()
                    if not samples_fit(
                        rows=self.outbox.depth(),
                        bytes_stored=self.outbox.bytes(),
                        max_rows=self.outbox.max_rows,
                        max_bytes=self.outbox.max_bytes,
                        size=len(payload) + len(topic),
                    ):
                        log.warning(
                            "samples of window %d dropped: the outbox is half full",
                            captured.seq,
                            extra={"event": "samples_dropped", "rows": len(batch.rows)},
                        )
                        break
                    self.outbox.put(topic, payload)
            except (AgentError, ContractError) as e:
                log.error("samples of window %d not stored: %s", captured.seq, e)
                continue
            if not_finite:
                log.info("%d captured rows were not finite and stay on the device", not_finite)

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
        self._put_event(event)

    def _put_event(self, event: Event) -> None:
        kind = event.kind
        try:
            self.outbox.put(device_topic(self.config.device_id, Channel.EVENTS), event.to_bytes())
        except AgentError as e:
            # A full disk, say: the update goes on (and its retry stays armed); the retained
            # state still tells the server the last update's outcome.
            log.error("%s event not stored: %s", kind, e)
            return
        if self.publisher is not None:
            self.publisher.wake()

    def _publish_state(self) -> Any:
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
        # The runtime serving a model is the one that matters to the server; before any
        # model runs, the best this device has (litert first).
        serving = next(iter(self.models.values()), None)
        runtime_name, runtime_version = (
            (serving.runtime, serving.runtime_version)
            if serving is not None
            else next(iter(self.runtimes.items()), ("none", "0"))
        )
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
            agent_update=self.agent_update,
            reported_at=self._now(),
        )
        return self.transport.publish(
            device_topic(self.config.device_id, Channel.STATE), state.to_bytes(), retain=True
        )

    # ------------------------------------------------------------------ updates

    def _update_loop(self) -> None:
        resumed, self._resumed = self._resumed, []
        for marker in resumed:
            try:
                self._resume_probation(marker)
            except Exception:  # the update thread must survive anything
                log.exception("resuming the health check of %s failed", marker.model_name)
        while not self._stopping.is_set() and not self.restart_requested.is_set():
            try:
                payload: bytes | None = self._desired.get(timeout=0.5)
            except queue.Empty:
                payload = self._window_opened()
            if payload is None:
                continue
            try:
                self.apply_desired(payload)
            except Exception:  # the update thread must survive anything
                log.exception("update failed unexpectedly")

    def _window_opened(self) -> bytes | None:
        """The desired state to apply again because a staged deployment's window is open."""
        if self._last_desired is None:
            return None
        now = self._now()
        agent = self._agent_waiting
        window = None if agent is None else agent.install_window
        if agent is not None and window is not None and window.contains(now):
            log.info("the install window %s of agent %s is open", window, agent.version)
            return self._last_desired
        for deployment in self._waiting.values():
            window = deployment.install_window
            if window is not None and window.contains(now):
                log.info(
                    "the install window %s of %s v%s is open",
                    window,
                    deployment.model_name,
                    deployment.model_version,
                )
                return self._last_desired
        return None

    def apply_desired(self, payload: bytes) -> UpdatePlan | None:
        """Plan and carry out one desired state; a refusal changes nothing but an event.

        Returns once every new model was activated and judged, refused, or -- outside
        its install window -- staged to wait for it.
        """
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
            if payload == self._last_desired and self._waiting:
                # What waited can no longer be trusted (it expired, say): nothing waits.
                self._settle_waiting(payload, {}, before=self._waiting)
            return None
        before, self._waiting = self._waiting, {}
        if plan.is_new:
            # Forget a kept older state before the trust state moves past it: a restart
            # in between must not find it and refuse it as a rollback.
            self._settle_waiting(payload, {}, before={})
        self._last_desired = payload
        if plan.is_new:
            try:
                self.trust_store.save(plan.state, keyring_envelope=plan.keyring_envelope)
            except OSError as e:
                # A full disk, say: nothing starts that a restart would not know the
                # manifest of; the server is told why and the state is tried again later.
                log.error("cannot save the trust state: %s", e)
                self._waiting = before
                self._retry_at = self._clock() + self.config.limits.backoff_max_seconds
                self._finish(
                    plan, UpdateOutcome.FAILED, "store_failed", f"cannot save the trust state: {e}"
                )
                return None
            self.trust = plan.state
            self._refused.clear()
        self._forget_stale_markers(plan)
        pending = [d for d in plan.fetch if d.artifact.sha256 not in self._refused]
        self._wanted = frozenset(d.artifact.sha256 for d in pending)
        with contextlib.suppress(OSError):  # downloads nobody asks for any more
            self.store.clean_tmp(keep=self._wanted)
        if not plan.is_new and not pending:
            self._settle_waiting(payload, {}, before=before)
            self._apply_agent(plan)
            return plan
        waiting: dict[str, Deployment] = {}
        for deployment in pending:
            window = deployment.install_window
            if window is None or window.contains(self._now()):
                self._install(deployment, plan)
            elif before.get(deployment.model_name) == deployment or self._install(
                deployment, plan, activate=False
            ):  # staged now, or staged and checked before in this process
                waiting[deployment.model_name] = deployment
                self._waiting = {**self._waiting, deployment.model_name: deployment}
        for name in plan.remove:
            self.store.deactivate(name)
            self._set_model(name, None)
        if not plan.fetch:
            self._finish(plan, UpdateOutcome.ACTIVATED, None, "nothing to fetch")
        self._settle_waiting(payload, waiting, before=before)
        self._state_dirty.set()
        self._apply_agent(plan)
        return plan

    def _settle_waiting(
        self, payload: bytes, waiting: dict[str, Deployment], *, before: dict[str, Deployment]
    ) -> None:
        """Record what waits for its window now (kept on disk while anything does), and
        remove staged bundles that waited before and are asked for no more."""
        self._waiting = waiting
        try:
            if waiting:
                self.store.keep_waiting(payload)
            else:
                self.store.forget_waiting()
        except StoreError as e:  # only a restart with no broker would miss it
            log.warning("%s", e)
        kept = {d.artifact.sha256 for d in waiting.values()}
        if {d.artifact.sha256 for d in before.values()} - kept - self._wanted:
            try:  # pointers keep what runs and ran before; the rest goes
                self.store.garbage_collect(keep=kept | self._wanted)
            except StoreError as e:
                log.warning("%s", e)

    def _forget_stale_markers(self, plan: UpdatePlan) -> None:
        """Drop probation markers the accepted desired state made pointless: refusals of an
        older manifest, and interrupted installs of something no longer asked for."""
        wanted = {d.model_name: d.artifact.sha256 for d in plan.desired.deployments}
        for marker in self.store.probations():
            name = marker.model_name
            if marker.failed is not None:
                stale = marker.manifest_version != plan.state.manifest_version
            else:
                stale = wanted.get(name) != marker.ref.sha256 and not marker.ref.same_bundle(
                    self.store.current(name)
                )
            if stale:
                self.store.end_probation(name)

    def _install(self, deployment: Deployment, plan: UpdatePlan, *, activate: bool = True) -> bool:
        """Fetch, verify, self-test and stage one deployment, then activate and judge it
        -- or, with ``activate=False``, leave it staged to wait for its install window.

        True when it was activated (whatever the health check then decided) or staged;
        False when it was refused or failed, which is reported either way.
        """
        ref = deployment.artifact
        name = deployment.model_name
        rollout_id = plan.desired.rollout_id
        bundle_ref = BundleRef(
            sha256=ref.sha256,
            length=ref.length,
            model_version=deployment.model_version,
            target=deployment.target,
        )
        marked = False
        try:
            path, bundle, staged = self._fetch(deployment)
            check_target(
                bundle.manifest,
                model_name=name,
                model_version=deployment.model_version,
                target=deployment.target,
                runtimes=self.runtimes,
            )
            self._event(EventKind.VERIFIED, deployment)
            # Before the model is first loaded: if loading or running it kills the
            # process, the next start finds this marker and counts it.
            self.store.begin_probation(
                name,
                bundle_ref,
                manifest_version=self.trust.manifest_version,
                rollout_id=rollout_id,
            )
            marked = True
            trial = LoadedModel.load(bundle, limits=self.config.limits)
            trial.run_self_tests()
            if not staged:
                self.store.stage(path, sha256=ref.sha256, length=ref.length)
            if activate:
                self.store.activate(name, bundle_ref)
            else:
                # Nothing stays loaded while it waits; when the window opens the bundle
                # is verified, marked, loaded and self-tested again before it activates.
                self.store.end_probation(name)
        except ContractError as e:
            reason = str(getattr(e, "reason", RejectReason.MALFORMED))
            self._reject(plan, deployment, reason, e, marked=marked)
            return False
        except ModelRuntimeError as e:
            self._reject(plan, deployment, "self_test_failed", e, marked=marked)
            return False
        except DownloadCancelled as e:  # stopping: not a failure; the next start resumes it
            log.info("download of %s v%s paused: %s", name, deployment.model_version, e)
            return False
        except (DownloadError, StoreError, OSError) as e:
            reason = "download_failed" if isinstance(e, DownloadError) else "store_failed"
            log.warning("%s v%s not installed (%s): %s", name, deployment.model_version, reason, e)
            self._retry_at = self._clock() + self.config.limits.backoff_max_seconds
            self._finish(plan, UpdateOutcome.FAILED, reason, str(e))
            self._event(EventKind.FAILED, deployment, reason=reason, detail=str(e)[:1000])
            return False
        if not activate:
            del trial
            self._report_staged(deployment, plan)
            return True
        self._set_model(name, trial)
        self.monitor.set_model(trial.manifest)
        self._event(EventKind.ACTIVATED, deployment)
        self._probate(trial, deployment, rollout_id)
        return True

    def _report_staged(self, deployment: Deployment, plan: UpdatePlan) -> None:
        window = deployment.install_window
        assert window is not None
        detail = (
            f"{deployment.model_name} v{deployment.model_version} staged; activates in its "
            f"install window {window}, next opening {_next_opening(window, self._now())}"
        )
        log.info("%s", detail)
        self._event(EventKind.STAGED, deployment, rollout_id=plan.desired.rollout_id, detail=detail)
        self._finish(plan, UpdateOutcome.STAGED, None, detail)

    def _fetch(self, deployment: Deployment) -> tuple[Path, Bundle, bool]:
        """The artifact, verified: (path, bundle, whether it is staged in ``bundles/``).

        A bundle already staged (an attempt a kill cut short, or the previous version
        asked for again) is not fetched again -- unless it no longer verifies.
        """
        ref = deployment.artifact
        if self.store.has_bundle(ref.sha256, ref.length):
            path = self.store.bundle_path(ref.sha256)
            try:
                return path, self._read_verified(path, ref), True
            except (ContractError, OSError) as e:
                log.warning(
                    "staged bundle %s no longer verifies; fetching it again: %s", ref.sha256[:12], e
                )
                with contextlib.suppress(OSError):
                    path.unlink()
        self._event(EventKind.DOWNLOADING, deployment)
        path = self._download(deployment)
        return path, self._read_verified(path, ref), False

    def _read_verified(self, path: Path, ref: ArtifactRef) -> Bundle:
        keyring = self.trust.keyring
        assert keyring is not None
        with path.open("rb") as f:
            return read_bundle(
                f,
                trusted_keys=keyring.verify_keys(),
                threshold=keyring.threshold,
                expected_sha256=ref.sha256,
                expected_length=ref.length,
                max_bytes=self.config.limits.max_bundle_bytes,
            )

    def _discard(self, sha256: str) -> None:
        """Nothing from a refused artifact stays on the device (partial or complete)."""
        for name in (sha256, f"{sha256}.part", f"{sha256}.part.json"):
            (self.store.tmp_dir / name).unlink(missing_ok=True)

    def _download(self, deployment: Deployment) -> Path:
        return self._download_artifact(deployment.artifact, self.store.tmp_dir)

    def _download_artifact(self, artifact: ArtifactRef, dest: Path) -> Path:
        """Fetch ``artifact`` into ``dest`` by the configured path (HTTP ranges or MQTT
        blocks), verified against its signed length and sha256."""
        download = self.config.download
        if download.method == "http":
            if not download.http_base_url or not artifact.url:
                raise DownloadError("HTTP download configured, but no URL for the artifact")
            return http_download(
                download.http_base_url,
                artifact.url,
                artifact,
                dest,
                opener=self._http_opener(),
                limits=self.config.limits,
            )
        if self.transport is None:
            raise DownloadError("no broker configured to download over MQTT")
        downloader = BlockDownloader(
            self.frames,
            self.config.device_id,
            download,
            self.config.limits,
            cancelled=self._stopping,  # stop() never waits out a block request's timeout
            sleep=self._stopping.wait,
        )
        return downloader.download(artifact, dest)

    def _http_opener(self) -> urllib.request.OpenerDirector:
        """An opener that shows the server this device's identity (HTTP Basic: the device
        id and the password enrollment gave it -- the same credentials as the broker's)."""
        opener = urllib.request.build_opener()
        broker = self.config.broker
        password = None if broker is None else broker.resolved_password()
        if password is not None:
            username = (broker.username if broker is not None else None) or self.config.device_id
            token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
            opener.addheaders = [("Authorization", f"Basic {token}")]
        return opener

    # ------------------------------------------------------------------ the agent's own updates

    def _recover_self_update(self) -> None:
        """At start: report a rollback the launcher made, and learn whether this process is
        a new version on trial (it commits once healthy)."""
        try:
            state = self.home.read_state()
            current = self.home.current()
        except SelfUpdateError as e:
            log.error("agent self-update: %s", e)
            return
        result = state.result
        if result is not None and not state.result_reported:
            if result.outcome == UpdateOutcome.ROLLED_BACK:
                log.error(
                    "agent %s was rolled back to %s (%s): %s",
                    result.version,
                    __version__,
                    result.reason,
                    result.detail,
                )
                for kind in (EventKind.HEALTH_CHECK_FAILED, EventKind.ROLLED_BACK):
                    self._agent_event(
                        kind,
                        result.version,
                        manifest_version=result.manifest_version,
                        rollout_id=result.rollout_id,
                        reason=result.reason,
                        detail=result.detail,
                    )
            state = dataclasses.replace(state, result_reported=True)
            self._write_self_state(state)
        self._self_state = state
        self.agent_update = state.result
        pending = state.pending
        if (
            pending is not None
            and pending.failed is None
            and pending.version == __version__
            and current == __version__
            and os.environ.get(LAUNCHED_ENV)
        ):
            self._agent_trial = pending
            log.warning(
                "agent %s is on trial (start %d): it commits once connected, its state "
                "published and its models self-tested",
                __version__,
                pending.attempts,
            )

    def _apply_agent(self, plan: UpdatePlan) -> None:
        """The ``agent`` part of an accepted desired state: fetch, verify and install the
        wheel beside the running version, then switch (inside the install window, if any)
        and ask the launcher for a restart. A failure is reported; the old version runs on."""
        wanted = plan.desired.agent
        self._agent_waiting = None
        if wanted is None or wanted.version == __version__ or self._agent_trial is not None:
            return
        sha256 = wanted.artifact.sha256
        refused = self._self_state.refused
        if sha256 in self._refused or (
            refused is not None
            and (refused.version, refused.sha256, refused.manifest_version)
            == (wanted.version, sha256, self.trust.manifest_version)
        ):
            return  # refused, failed or rolled back under this manifest: not again
        rollout_id = plan.desired.rollout_id
        if not self.config.self_update.enabled or not os.environ.get(LAUNCHED_ENV):
            why = (
                "self_update.enabled is false"
                if not self.config.self_update.enabled
                else "the agent runs without its launcher (edgefleet-agent launch)"
            )
            self._refused.add(sha256)
            self._agent_outcome(
                wanted, rollout_id, UpdateOutcome.FAILED, "self_update_unavailable", why
            )
            return
        limits = self.config.limits
        try:
            if wanted.artifact.media_type != AGENT_WHEEL_MEDIA_TYPE:
                raise WheelRejected(
                    RejectReason.MALFORMED,
                    f"the artifact is {wanted.artifact.media_type!r}, not an agent wheel",
                )
            if wanted.artifact.length > limits.agent_wheel_max_bytes:
                raise WheelRejected(
                    RejectReason.MALFORMED,
                    f"the wheel is {wanted.artifact.length} bytes, over "
                    f"limits.agent_wheel_max_bytes ({limits.agent_wheel_max_bytes})",
                )
            if not self.home.installed(wanted.version, sha256):
                self.home.ensure()
                self._agent_event(EventKind.DOWNLOADING, wanted.version, sha256=sha256)
                path = self._download_artifact(wanted.artifact, self.home.tmp_dir)
                self._agent_event(EventKind.DOWNLOADED, wanted.version, sha256=sha256)
                try:
                    self.home.install(
                        path,
                        version=wanted.version,
                        sha256=sha256,
                        max_unpacked_bytes=limits.agent_wheel_max_unpacked_bytes,
                        max_files=limits.agent_wheel_max_files,
                    )
                finally:
                    path.unlink(missing_ok=True)
            self._agent_event(
                EventKind.VERIFIED,
                wanted.version,
                sha256=sha256,
                detail=f"installed in {self.home.version_dir(wanted.version)}",
            )
        except (WheelRejected, ContractError) as e:
            reason = str(getattr(e, "reason", RejectReason.MALFORMED))
            self._discard_agent_download(sha256)
            self._refused.add(sha256)
            log.warning("agent %s refused (%s): %s", wanted.version, reason, e)
            self._agent_outcome(wanted, rollout_id, UpdateOutcome.REJECTED, reason, str(e))
            return
        except DownloadCancelled as e:
            log.info("download of agent %s paused: %s", wanted.version, e)
            return
        except (DownloadError, SelfUpdateError, OSError) as e:
            reason = "download_failed" if isinstance(e, DownloadError) else "store_failed"
            log.warning("agent %s not installed (%s): %s", wanted.version, reason, e)
            self._retry_at = self._clock() + self.config.limits.backoff_max_seconds
            self._agent_outcome(wanted, rollout_id, UpdateOutcome.FAILED, reason, str(e))
            return
        window = wanted.install_window
        if window is not None and not window.contains(self._now()):
            self._agent_waiting = wanted
            done = self.agent_update
            if done is None or (
                done.outcome,
                done.version,
                done.manifest_version,
            ) != (UpdateOutcome.STAGED, wanted.version, self.trust.manifest_version):
                self._agent_outcome(
                    wanted,
                    rollout_id,
                    UpdateOutcome.STAGED,
                    None,
                    f"agent {wanted.version} installed; switches in its install window "
                    f"{window}, next opening {_next_opening(window, self._now())}",
                )
            return
        self._switch_agent(wanted, rollout_id)

    def _switch_agent(self, wanted: AgentDeployment, rollout_id: str | None) -> None:
        try:
            previous_target = self.home.current()
            pending = Pending(
                version=wanted.version,
                previous=__version__,
                previous_target=previous_target,
                sha256=wanted.artifact.sha256,
                health_timeout_s=wanted.health_timeout_s,
                manifest_version=self.trust.manifest_version,
                rollout_id=rollout_id,
                switched_at=self._now().isoformat(),
            )
            self._self_state = self.home.begin_switch(pending, self._self_state)
        except SelfUpdateError as e:
            log.error("agent %s not switched to: %s", wanted.version, e)
            self._retry_at = self._clock() + self.config.limits.backoff_max_seconds
            self._agent_outcome(wanted, rollout_id, UpdateOutcome.FAILED, "store_failed", str(e))
            return
        log.warning(
            "switched to agent %s (from %s); it has %d s to report healthy, or the launcher "
            "goes back",
            wanted.version,
            __version__,
            wanted.health_timeout_s,
        )
        self.restart_requested.set()  # `edgefleet-agent run` stops and exits for the launcher

    def _commit_agent_update_when_healthy(self) -> None:
        """A version on trial commits once connected (the caller checks), its DeviceState
        naming this version was acknowledged, and its active models pass their self-tests."""
        trial = self._agent_trial
        handle = self._state_handle
        if trial is None or self._agent_trial_blocked is not None:
            return
        if handle is None or not handle.acked or handle.refused:
            if handle is not None and self._clock() - self._state_published_at > _STATE_ACK_SECONDS:
                self._state_dirty.set()  # lost with a connection, or refused: publish again
            return
        for name, model in sorted(self.models.items()):
            try:
                model.run_self_tests()
            except ModelRuntimeError as e:
                self._agent_trial_blocked = f"{name} fails its self-tests under {__version__}: {e}"
                log.error("agent %s does not commit: %s", __version__, self._agent_trial_blocked)
                return
        detail = (
            f"agent {__version__} runs: connected, its state acknowledged, "
            f"{len(self.models)} model(s) self-tested"
        )
        for kind in (EventKind.ACTIVATED, EventKind.HEALTH_CHECK_PASSED):
            self._agent_event(
                kind,
                trial.version,
                sha256=trial.sha256,
                manifest_version=trial.manifest_version,
                rollout_id=trial.rollout_id,
                detail=detail,
            )
        result = AgentUpdateResult(
            manifest_version=trial.manifest_version,
            rollout_id=trial.rollout_id,
            version=trial.version,
            previous_version=trial.previous,
            outcome=UpdateOutcome.ACTIVATED,
            detail=detail,
            at=self._now(),
        )
        state = SelfUpdateState(
            pending=None,
            previous_target=trial.previous_target,
            result=result,
            result_reported=True,
        )
        if not self._write_self_state(state):
            return  # tried again at the next turn; the launcher's deadline bounds it
        self._agent_trial = None
        self.agent_update = result
        self._state_dirty.set()
        log.info("%s", detail)
        if self._last_desired is not None:  # one that came during the trial waited for this
            self._offer_desired(self._last_desired)
        try:  # the version running and the one to go back to; older ones go
            removed = self.home.garbage_collect(keep={trial.version, trial.previous_target})
        except OSError as e:
            log.warning("old agent versions not removed: %s", e)
        else:
            if removed:
                log.info("removed old agent versions: %s", ", ".join(removed))

    def _agent_outcome(
        self,
        wanted: AgentDeployment,
        rollout_id: str | None,
        outcome: UpdateOutcome,
        reason: str | None,
        detail: str,
    ) -> None:
        """An agent update ended here (refused, failed) or waits (staged): an event, the
        result kept in ``state.json`` and published in the retained state."""
        kind = {
            UpdateOutcome.REJECTED: EventKind.REJECTED,
            UpdateOutcome.FAILED: EventKind.FAILED,
            UpdateOutcome.STAGED: EventKind.STAGED,
        }[outcome]
        self._agent_event(
            kind,
            wanted.version,
            sha256=wanted.artifact.sha256,
            rollout_id=rollout_id,
            reason=reason,
            detail=detail[:1000],
        )
        result = AgentUpdateResult(
            manifest_version=self.trust.manifest_version,
            rollout_id=rollout_id,
            version=wanted.version,
            previous_version=__version__,
            outcome=outcome,
            reason=reason,
            detail=detail[:1000],
            at=self._now(),
        )
        self.agent_update = result
        self._write_self_state(dataclasses.replace(self._self_state, result=result))
        self._state_dirty.set()

    def _agent_event(
        self,
        kind: EventKind,
        version: str,
        *,
        sha256: str | None = None,
        manifest_version: int | None = None,
        rollout_id: str | None = None,
        reason: str | None = None,
        detail: str | None = None,
    ) -> None:
        self._put_event(
            Event(
                device_id=self.config.device_id,
                event_id=uuid.uuid4().hex,
                kind=kind,
                at=self._now(),
                manifest_version=self.trust.manifest_version
                if manifest_version is None
                else manifest_version,
                rollout_id=rollout_id,
                agent_version=version,
                sha256=sha256,
                reason=reason,
                detail=None if detail is None else detail[:1000],
            )
        )

    def _write_self_state(self, state: SelfUpdateState) -> bool:
        try:
            self.home.write_state(state)
        except SelfUpdateError as e:
            log.error("agent self-update: %s", e)
            return False
        self._self_state = state
        return True

    def _discard_agent_download(self, sha256: str) -> None:
        for name in (sha256, f"{sha256}.part", f"{sha256}.part.json"):
            (self.home.tmp_dir / name).unlink(missing_ok=True)

    # ------------------------------------------------------------------ health check

    def _probate(self, model: LoadedModel, deployment: Deployment, rollout_id: str | None) -> None:
        """Judge a model that was just activated: the self-test replay at once, then its
        first real inferences; pass (marker removed) or roll back. Returns on the
        verdict, or when the agent stops (the marker stays: the next start resumes)."""
        limits = self.config.limits
        replay = self._replay_self_tests(model)
        if not replay.passed:
            self._roll_back(deployment, rollout_id, f"self-test replay: {replay.detail}")
            return
        probation = Probation(
            model,
            deployment,
            rollout_id=rollout_id,
            limits=limits,
            sla_ms_p95=self.config.latency_sla_ms_p95,
            now=self._clock(),
        )
        self._finish(
            rollout_id,
            UpdateOutcome.ACTIVATED,
            None,
            f"on probation: the self-test replay passed ({replay.detail}); watching the first "
            f"{limits.health_check_inferences} inferences for at most "
            f"{limits.health_check_max_seconds:g} s",
        )
        self._probation = probation
        try:
            while (verdict := probation.verdict(self._clock())) is None:
                if self._stopping.is_set():
                    return
                probation.due.wait(_PROBATION_POLL_SECONDS)
        finally:
            self._probation = None
        if verdict.passed:
            self._pass(deployment, rollout_id, verdict.detail)
        else:
            self._roll_back(deployment, rollout_id, verdict.detail)

    def _replay_self_tests(self, model: LoadedModel) -> HealthVerdict:
        """Run the self-test inputs one by one as live traffic: no errors, p95 within the SLA."""
        inputs = [row for test in model.manifest.self_tests for row in test.input]
        if not inputs:
            return HealthVerdict(True, "no self-test inputs to replay")
        latencies = []
        rounds = max(1, self.config.limits.health_check_inferences // len(inputs))
        for _ in range(rounds):
            for row in inputs:
                started = time.perf_counter()
                try:
                    model.predict(np.asarray([row], dtype=np.float64))
                except Exception as e:  # whatever the runtime raises, the model failed
                    return HealthVerdict(False, f"errors: a self-test input failed: {e}", "errors")
                latencies.append((time.perf_counter() - started) * 1000)
        return judge_health(
            latencies,
            0,
            max_error_rate=0.0,
            sla_ms_p95=self.config.latency_sla_ms_p95,
            what="replayed self-test inputs",
        )

    def _pass(self, deployment: Deployment, rollout_id: str | None, detail: str) -> None:
        """Report the pass, then remove the marker: killed in between, the next start
        checks the model once more and reports again -- never a pass left unreported."""
        name = deployment.model_name
        log.info("%s v%s passed its health check: %s", name, deployment.model_version, detail)
        self._event(
            EventKind.HEALTH_CHECK_PASSED, deployment, rollout_id=rollout_id, detail=detail[:1000]
        )
        self._finish(rollout_id, UpdateOutcome.ACTIVATED, None, f"health check passed: {detail}")
        try:
            self.store.end_probation(name)
        except StoreError as e:  # the next start checks it once more; nothing worse
            log.error("%s", e)
        try:  # keep what the pointers name (current and previous) and what is still asked
            # for (staged, maybe waiting for its window); drop older versions
            self.store.garbage_collect(
                keep=self._wanted | {d.artifact.sha256 for d in self._waiting.values()}
            )
        except StoreError as e:
            log.warning("%s", e)

    def _roll_back(self, deployment: Deployment, rollout_id: str | None, detail: str) -> None:
        """Give the update up, say why, then restore the previous version.

        In that order: the failed marker first, so a kill from there on still ends
        rolled back (the next start moves the pointer before anything loads); the
        report before the pointer moves, so a kill cannot lose it (the next start
        reports once more).
        """
        name = deployment.model_name
        log.error(
            "%s v%s failed its health check, rolling back: %s",
            name,
            deployment.model_version,
            detail,
        )
        self._refused.add(deployment.artifact.sha256)
        try:
            self.store.fail_probation(name, detail[:1000])
        except StoreError as e:  # rolled back all the same; only a kill now would forget it
            log.error("%s", e)
        self._report_rollback(deployment, rollout_id, detail)
        try:
            restored = self._restore_previous(name)
        except StoreError as e:
            log.error("cannot move %s back: %s; the next start finishes the rollback", name, e)
            return
        if restored:
            self._load_active_models()
        else:
            self._set_model(name, None)
            model = self.active_model()
            self.monitor.set_model(None if model is None else model.manifest)
        self._state_dirty.set()  # the retained state names what runs now

    def _restore_previous(self, name: str) -> bool:
        """Point the model back at its previous version; without one, remove it. Pointer only."""
        try:
            self.store.rollback(name)
        except NoPreviousVersionError:
            self.store.deactivate(name)
            return False
        return True

    def _report_rollback(self, deployment: Deployment, rollout_id: str | None, detail: str) -> None:
        for kind in (EventKind.HEALTH_CHECK_FAILED, EventKind.ROLLED_BACK):
            self._event(
                kind,
                deployment,
                rollout_id=rollout_id,
                reason=HEALTH_CHECK_FAILED,
                detail=detail[:1000],
            )
        self._finish(rollout_id, UpdateOutcome.ROLLED_BACK, HEALTH_CHECK_FAILED, detail)

    def _recover_probations(self) -> None:
        """At start, before any model loads: act on the updates a kill or crash interrupted
        (see the module docstring). Only pointers and markers change here."""
        limit = self.config.limits.health_check_max_restarts
        for marker in self.store.probations():
            name = marker.model_name
            deployment = _deployment(marker)
            try:
                in_place = marker.ref.same_bundle(self.store.current(name))
                if marker.failed is not None:
                    if in_place:  # given up, then killed before the pointer moved back
                        self._report_rollback(deployment, marker.rollout_id, marker.failed)
                        self._restore_previous(name)
                    if marker.manifest_version == self.trust.manifest_version:
                        self._refused.add(marker.ref.sha256)
                    continue
                marker = self.store.count_restart(name)
                if marker.restarts <= limit:
                    if in_place:
                        self._resumed.append(marker)
                    # else: the install starts again when the desired state comes again
                    continue
                stage = "on probation" if in_place else "being loaded and self-tested"
                detail = (
                    f"the agent restarted {marker.restarts} times while {name} "
                    f"v{marker.ref.model_version} was {stage} (a model that crashes the "
                    "process?); given up"
                )
                log.error("%s", detail)
                self.store.fail_probation(name, detail)
                if marker.manifest_version == self.trust.manifest_version:
                    self._refused.add(marker.ref.sha256)
                if in_place:
                    self._report_rollback(deployment, marker.rollout_id, detail)
                    self._restore_previous(name)
                else:
                    self._finish(
                        marker.rollout_id, UpdateOutcome.REJECTED, "self_test_failed", detail
                    )
                    self._event(
                        EventKind.REJECTED,
                        deployment,
                        rollout_id=marker.rollout_id,
                        reason="self_test_failed",
                        detail=detail,
                    )
            except StoreError as e:  # a damaged pointer: load_active reports it next
                log.error("cannot recover the update of %s: %s", name, e)

    def _resume_probation(self, marker: ProbationMarker) -> None:
        """A model found on probation at start: judge it again from the beginning."""
        name = marker.model_name
        model = self.models.get(name)
        if model is None or not marker.ref.same_bundle(self.store.current(name)):
            # It did not load, or the store fell back from it: it no longer runs.
            self.store.end_probation(name)
            return
        log.warning(
            "%s v%s was on probation when the agent stopped (start %d of at most %d); "
            "checking it again",
            name,
            marker.ref.model_version,
            marker.restarts,
            self.config.limits.health_check_max_restarts,
        )
        self._probate(model, _deployment(marker), marker.rollout_id)

    def _reject(
        self,
        plan: UpdatePlan,
        deployment: Deployment,
        reason: str,
        error: Exception,
        *,
        marked: bool = False,
    ) -> None:
        self._discard(deployment.artifact.sha256)
        self._refused.add(deployment.artifact.sha256)  # not fetched again for this manifest
        if marked:  # and not after a restart either
            try:
                self.store.fail_probation(deployment.model_name, f"{reason}: {error}"[:1000])
            except StoreError as e:
                log.error("%s", e)
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
        plan_or_rollout: UpdatePlan | str | None,
        outcome: UpdateOutcome,
        reason: str | None,
        detail: str | None,
    ) -> None:
        rollout_id = (
            plan_or_rollout.desired.rollout_id
            if isinstance(plan_or_rollout, UpdatePlan)
            else plan_or_rollout
        )
        self.last_update = UpdateResult(
            manifest_version=self.trust.manifest_version,
            rollout_id=rollout_id,
            outcome=outcome,
            reason=reason,
            detail=None if detail is None else detail[:1000],
            at=self._now(),
        )
        self._state_dirty.set()


def _deployment(marker: ProbationMarker) -> Deployment:
    """The deployment a probation marker stands for (for events)."""
    return Deployment(
        model_name=marker.model_name,
        model_version=marker.ref.model_version,
        target=marker.ref.target,
        artifact=ArtifactRef(sha256=marker.ref.sha256, length=marker.ref.length),
    )


def _next_opening(window: InstallWindow | None, now: datetime) -> str | None:
    """When ``window`` next opens after ``now`` (ISO 8601, UTC); None without a window."""
    return None if window is None else window.next_opening(now).astimezone(UTC).isoformat()


def _arch() -> str:
    return platform.machine() or "unknown"
