"""One simulated device: the agent's side of the wire contract, without a model runtime.

A :class:`SimulatedDevice` is a state machine driven by the messages that reach it and
by ``now``; it does no I/O. Each handler returns the :class:`Outgoing` messages the
device would publish, and :class:`~server.simulator.fleet.FleetSimulator` carries them
over a real broker. What is real, so that the server cannot tell it from an agent
(apart from the absent interpreter):

- desired states go through :func:`agent.updater.plan_update` -- the agent's own
  acceptance rules: root-signed keyring, online-key signature, device id, manifest
  version, expiry, profile and runtime;
- artifacts are fetched with the block protocol (``artifact/req`` → ``artifact/blk``),
  resumed from the last complete block after a lost request, and the bundle is
  verified (length, sha256, signature, model/version/target) before "activation";
- telemetry windows carry real drift sketches: rows are drawn from the bundle's own
  drift reference (its training histogram), shifted by :attr:`Behaviour.drift` for
  the features it names, and counted over the reference's bins exactly as
  :class:`shared.drift.DriftAccumulator` counts them. So that a report costs tens of
  microseconds, rows are drawn once per reference and drift, and a bounded number of
  encoded sketches per window size is kept and then reused at random; latencies and
  errors are drawn for every window (:mod:`server.simulator.windows`).

What is simulated: inference (no model runs -- predicted classes follow the reference's
prediction distribution, latencies a log-normal around :attr:`Behaviour.latency_ms`),
and failure modes a test or benchmark asks for (:class:`Behaviour`).

Install windows, as the agent honours them: a deployment whose ``install_window`` is
closed by ``wall_clock`` is fetched and verified at once, reported ``staged`` (event and
last update), and activated by :meth:`SimulatedDevice.tick` once the window is open; a
newer desired state that no longer names it drops it, one that still names it keeps it.

What always holds: a refused desired state changes nothing but emits a ``rejected``
event; a model becomes "active" only after its bundle verified, and only inside its
install window when it has one; ``seq`` of telemetry increases strictly for the life of
the object.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

import numpy as np

from agent.updater import plan_update
from server.simulator.windows import WindowMaker, encode_report
from shared.bundle import BundleManifest, check_target, read_bundle
from shared.errors import ContractError, RejectReason
from shared.messages import (
    BlockRequest,
    Deployment,
    DeviceState,
    Event,
    EventKind,
    Presence,
    PresenceStatus,
    RunningModel,
    RuntimeInfo,
    TelemetryReport,
    UpdateOutcome,
    UpdateResult,
    decode_block,
)
from shared.signing import VerifyKey
from shared.topics import Channel, device_topic
from shared.trust import TrustState

__all__ = ["Behaviour", "Outgoing", "SimulatedDevice"]

AGENT_VERSION = "sim-1"

# Report layouts whose first report was parsed back as a TelemetryReport in this process.
_CHECKED_LAYOUTS: set[tuple[object, ...]] = set()


class Outgoing(NamedTuple):
    """One publish the device asks for."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True)
class Behaviour:
    """How a simulated device behaves; the defaults are a healthy device."""

    latency_ms: float = 8.0
    """Median inference latency; latencies are log-normal around it (sigma 0.25)."""
    error_rate: float = 0.0
    """Share of inferences that fail with a runtime error."""
    reject_installs: bool = False
    """Every bundle fails its self-test here (reports ``rejected``/``self_test_failed``)."""
    silent: bool = False
    """Never acts on a desired state (a device that stays silent during a rollout)."""
    drift: Mapping[str, float] = field(default_factory=dict)
    """Feature name -> shift of its values, in units of the reference's standard deviation."""
    confidence: float = 0.9
    """Mean top-class probability of the simulated predictions."""


@dataclass
class _Download:
    deployment: Deployment
    data: bytearray
    hasher: Any
    request_id: str = ""
    requested_at: float = 0.0


@dataclass(frozen=True)
class _Staged:
    deployment: Deployment
    manifest: BundleManifest


@dataclass
class _Active:
    deployment: Deployment
    manifest: BundleManifest
    activated_at: datetime
    previous_version: int | None
    maker: WindowMaker


class SimulatedDevice:
    """The protocol half of an edge agent, for load tests, benchmarks and demos."""

    def __init__(
        self,
        device_id: str,
        *,
        profile: str,
        runtime: tuple[str, str],
        root_keys: list[VerifyKey],
        arch: str = "x86_64",
        behaviour: Behaviour | None = None,
        block_size: int = 64 * 1024,
        blocks_per_request: int = 16,
        request_timeout: float = 10.0,
        seed: int | None = None,
        wall_clock: Callable[[], datetime],
    ) -> None:
        self.device_id = device_id
        self.profile = profile
        self.runtime = runtime
        self.arch = arch
        self.behaviour = behaviour or Behaviour()
        self.trust = TrustState.from_root_keys(root_keys)
        self.block_size = block_size
        self.blocks_per_request = blocks_per_request
        self.request_timeout = request_timeout
        self._rng = np.random.default_rng(
            seed if seed is not None else int.from_bytes(device_id.encode()[:8], "big")
        )
        self._now = wall_clock
        self.active: dict[str, _Active] = {}
        self.last_update: UpdateResult | None = None
        self._queue: list[Deployment] = []
        self._download: _Download | None = None
        self._staged: dict[str, _Staged] = {}
        self._rollout_id: str | None = None
        self._requested_offset = 0
        self._seq = 0
        self._window_start = wall_clock()
        self._telemetry_topic = device_topic(device_id, Channel.TELEMETRY)
        self.bytes_received = 0
        self.requests_sent = 0
        self.installs = 0
        self.rejections = 0

    # ------------------------------------------------------------------ topics

    def topic(self, channel: Channel) -> str:
        return device_topic(self.device_id, channel)

    def will(self) -> Outgoing:
        """The Last Will the broker publishes for this device (retained ``offline``)."""
        offline = Presence(device_id=self.device_id, status=PresenceStatus.OFFLINE)
        return Outgoing(self.topic(Channel.PRESENCE), offline.to_bytes(), 1, True)

    def subscriptions(self) -> list[str]:
        return [self.topic(Channel.DESIRED), self.topic(Channel.ARTIFACT_BLOCK)]

    # ------------------------------------------------------------------ handlers

    def on_connect(self) -> list[Outgoing]:
        online = Presence(
            device_id=self.device_id, status=PresenceStatus.ONLINE, session_started_at=self._now()
        )
        out = [Outgoing(self.topic(Channel.PRESENCE), online.to_bytes(), 1, True), self._state()]
        if self._download is not None:  # resume after a reconnect
            out.append(self._request())
        return out

    def on_desired(self, payload: bytes, monotonic: float) -> list[Outgoing]:
        if self.behaviour.silent:
            return []
        try:
            plan = plan_update(
                self.trust,
                payload,
                device_id=self.device_id,
                profile=self.profile,
                runtimes=[self.runtime[0]],
                running={name: a.deployment.artifact.sha256 for name, a in self.active.items()},
                now=self._now(),
            )
        except ContractError as e:
            self.rejections += 1
            reason = str(getattr(e, "reason", RejectReason.MALFORMED))
            self.last_update = self._result(UpdateOutcome.REJECTED, reason, str(e))
            return [self._event(EventKind.REJECTED, None, reason=reason, detail=str(e)[:1000])]
        self.trust = plan.state
        if not plan.is_new and not plan.fetch:
            return []
        self._rollout_id = plan.desired.rollout_id
        out: list[Outgoing] = []
        for name in plan.remove:
            self.active.pop(name, None)
        wanted = {d.artifact.sha256 for d in plan.fetch}
        if self._download is not None and self._download.deployment.artifact.sha256 not in wanted:
            self._download = None
        # What waits and is still asked for keeps waiting (in the window named now).
        staged = {}
        for deployment in plan.fetch:
            held = self._staged.get(deployment.model_name)
            if held is not None and held.deployment.artifact.sha256 == deployment.artifact.sha256:
                staged[deployment.model_name] = _Staged(deployment, held.manifest)
        self._staged = staged
        downloading = None if self._download is None else self._download.deployment.artifact
        self._queue = [
            d
            for d in plan.fetch
            if d.model_name not in staged
            and (downloading is None or d.artifact.sha256 != downloading.sha256)
        ]
        if plan.remove:
            out.append(self._state())
        out.extend(self._next_download(monotonic))
        return out

    def on_block(self, frame: bytes, monotonic: float) -> list[Outgoing]:
        download = self._download
        try:
            header, data = decode_block(frame)
        except ContractError:
            return []  # a damaged frame: the request times out and is asked again
        if download is None or header.request_id != download.request_id:
            return []  # a late answer to a request given up on
        deployment = download.deployment
        if header.error is not None:
            download.requested_at = monotonic - self.request_timeout + 1.0  # retry in ~1 s
            return []
        if header.offset != len(download.data):
            return []  # out of order: wait for the timeout and resume from what is complete
        download.data += data
        download.hasher.update(data)
        self.bytes_received += len(data)
        if len(download.data) > deployment.artifact.length:
            return self._refuse(deployment, RejectReason.LENGTH_MISMATCH, "more data than signed")
        if len(download.data) < deployment.artifact.length:
            if header.offset + header.length >= self._request_end(download):
                return [self._request(monotonic)]
            return []
        return self._install(download, monotonic)

    def tick(self, monotonic: float) -> list[Outgoing]:
        """Activate what waited for a window that is open now; ask again for blocks whose
        request went unanswered too long."""
        out: list[Outgoing] = []
        now = self._now()
        for name, staged in sorted(self._staged.items()):
            window = staged.deployment.install_window
            if window is None or window.contains(now):
                del self._staged[name]
                out += self._activate(staged.deployment, staged.manifest)
        download = self._download
        if download is not None and monotonic - download.requested_at >= self.request_timeout:
            out.append(self._request(monotonic))
        return out

    @property
    def staged(self) -> dict[str, Deployment]:
        """Deployments verified and waiting for their install window, by model name."""
        return {name: s.deployment for name, s in self._staged.items()}

    @property
    def reports_made(self) -> int:
        """Telemetry reports made so far: their ``seq`` are ``0 .. reports_made - 1``."""
        return self._seq

    def telemetry(self, inferences: int) -> Outgoing:
        """Close a window in which each active model served ``inferences`` requests."""
        end = self._now()
        behaviour = self.behaviour  # read at each report: a test may change it
        models = [
            a.maker.window(inferences, self._rng, behaviour) for _, a in sorted(self.active.items())
        ]
        raw = encode_report(self.device_id, self._seq, self._window_start, end, models)
        layout = tuple(a.maker.layout for _, a in sorted(self.active.items()))
        if layout not in _CHECKED_LAYOUTS:  # once per process and layout: see windows.py
            TelemetryReport.from_bytes(raw)
            _CHECKED_LAYOUTS.add(layout)
        self._seq += 1
        self._window_start = end
        return Outgoing(self._telemetry_topic, raw, 1, False)

    # ------------------------------------------------------------------ internals

    def _next_download(self, monotonic: float) -> list[Outgoing]:
        if self._download is not None or not self._queue:
            return []
        deployment = self._queue.pop(0)
        self._download = _Download(deployment, bytearray(), hashlib.sha256())
        return [self._event(EventKind.DOWNLOADING, deployment), self._request(monotonic)]

    def _request_end(self, download: _Download) -> int:
        return min(
            download.deployment.artifact.length,
            self._requested_offset + self.block_size * self.blocks_per_request,
        )

    def _request(self, monotonic: float = 0.0) -> Outgoing:
        download = self._download
        assert download is not None
        download.request_id = uuid.uuid4().hex
        download.requested_at = monotonic
        self._requested_offset = len(download.data)
        request = BlockRequest(
            device_id=self.device_id,
            request_id=download.request_id,
            sha256=download.deployment.artifact.sha256,
            offset=len(download.data),
            block_size=self.block_size,
            count=self.blocks_per_request,
        )
        self.requests_sent += 1
        return Outgoing(self.topic(Channel.ARTIFACT_REQUEST), request.to_bytes(), 1, False)

    def _install(self, download: _Download, monotonic: float) -> list[Outgoing]:
        deployment = download.deployment
        keyring = self.trust.keyring
        assert keyring is not None
        out = [self._event(EventKind.DOWNLOADED, deployment)]
        try:
            bundle = read_bundle(
                bytes(download.data),
                trusted_keys=keyring.verify_keys(),
                threshold=keyring.threshold,
                expected_sha256=deployment.artifact.sha256,
                expected_length=deployment.artifact.length,
            )
            check_target(
                bundle.manifest,
                model_name=deployment.model_name,
                model_version=deployment.model_version,
                target=deployment.target,
                runtimes=[self.runtime[0]],
            )
        except ContractError as e:
            reason = str(getattr(e, "reason", RejectReason.MALFORMED))
            return out + self._refuse(deployment, reason, str(e))
        out.append(self._event(EventKind.VERIFIED, deployment))
        if self.behaviour.reject_installs:
            return out + self._refuse(
                deployment, "self_test_failed", "simulated: self-test outside its tolerance"
            )
        self._download = None
        window = deployment.install_window
        if window is not None and not window.contains(self._now()):
            self._staged[deployment.model_name] = _Staged(deployment, bundle.manifest)
            opening = window.next_opening(self._now()).isoformat()
            detail = f"staged; activates in its install window {window}, next opening {opening}"
            self.last_update = self._result(UpdateOutcome.STAGED, None, detail)
            out += [self._event(EventKind.STAGED, deployment, detail=detail), self._state()]
            return out + self._next_download(monotonic)
        return out + self._activate(deployment, bundle.manifest) + self._next_download(monotonic)

    def _activate(self, deployment: Deployment, manifest: BundleManifest) -> list[Outgoing]:
        previous = self.active.get(deployment.model_name)
        reference = manifest.drift_reference
        self.active[deployment.model_name] = _Active(
            deployment=deployment,
            manifest=manifest,
            activated_at=self._now(),
            previous_version=None if previous is None else previous.deployment.model_version,
            maker=WindowMaker(deployment, reference),
        )
        self.installs += 1
        self.last_update = self._result(UpdateOutcome.ACTIVATED, None, None)
        return [
            self._event(EventKind.ACTIVATED, deployment),
            self._event(EventKind.HEALTH_CHECK_PASSED, deployment),
            self._state(),
        ]

    def _refuse(self, deployment: Deployment, reason: str, detail: str) -> list[Outgoing]:
        self._download = None
        self._queue = []
        self.rejections += 1
        self.last_update = self._result(UpdateOutcome.REJECTED, reason, detail)
        return [
            self._event(EventKind.REJECTED, deployment, reason=reason, detail=detail[:1000]),
            self._state(),
        ]

    def _state(self) -> Outgoing:
        models = [
            RunningModel(
                model_name=name,
                model_version=a.deployment.model_version,
                target=a.deployment.target,
                sha256=a.deployment.artifact.sha256,
                activated_at=a.activated_at,
                previous_version=a.previous_version,
            )
            for name, a in sorted(self.active.items())
        ]
        keyring = self.trust.keyring
        state = DeviceState(
            device_id=self.device_id,
            agent_version=AGENT_VERSION,
            profile=self.profile,
            arch=self.arch,
            runtime=RuntimeInfo(name=self.runtime[0], version=self.runtime[1]),
            manifest_version=self.trust.manifest_version,
            keyring_version=0 if keyring is None else keyring.version,
            models=models,
            last_update=self.last_update,
            reported_at=self._now(),
        )
        return Outgoing(self.topic(Channel.STATE), state.to_bytes(), 1, True)

    def _event(self, kind: EventKind, deployment: Deployment | None, **fields: Any) -> Outgoing:
        event = Event(
            device_id=self.device_id,
            event_id=uuid.uuid4().hex,
            kind=kind,
            at=self._now(),
            manifest_version=self.trust.manifest_version,
            rollout_id=self._rollout_id,
            model_name=None if deployment is None else deployment.model_name,
            model_version=None if deployment is None else deployment.model_version,
            sha256=None if deployment is None else deployment.artifact.sha256,
            **fields,
        )
        return Outgoing(self.topic(Channel.EVENTS), event.to_bytes(), 1, False)

    def _result(
        self, outcome: UpdateOutcome, reason: str | None, detail: str | None
    ) -> UpdateResult:
        return UpdateResult(
            manifest_version=self.trust.manifest_version,
            rollout_id=self._rollout_id,
            outcome=outcome,
            reason=reason,
            detail=None if detail is None else detail[:1000],
            at=self._now(),
        )
