"""The rollout engine: the thread that moves every active rollout along and keeps each
device's signed desired state in step with the rollouts and pins.

One :meth:`RolloutEngine.tick` (every ``tick_seconds``, and at once when the inventory
hook hands over a device's state or update event):

1. Reads the id and revision of every rollout. A rollout whose revision moved without
   this engine -- an operator command, another replica -- has the devices it claims
   reconciled: their desired content is recomputed and published if it changed (an
   abort's roll-backs are published this way).
2. For each active rollout, oldest first: loads the group's members (accepted devices,
   each with its exclusion: :func:`~server.rollouts.service.rollout_members`), builds
   their :class:`~server.rollouts.core.DeviceSignals` (running version and state
   receipt from the inventory, update events since targeting from ``device_events``,
   telemetry windows from ``model_windows``), runs the pure
   :func:`~server.rollouts.core.step`, saves the state over the revision it read, and
   publishes the desired state of every device the step named.
3. Every ``maintenance_seconds``: re-sends manifests that were recorded but never
   acknowledged, re-signs those close to their expiry or signed under an older keyring
   (:func:`~server.rollouts.desired.refresh_due`), and reconciles pinned devices.

What always holds:

- A device's desired content is the latest claim per model over *every* rollout,
  active or finished, and over what its latest manifest already names (as claimed when
  it was issued), with the device's pins winning
  (:func:`~server.rollouts.desired.desired_content`). So a model changes only when
  something newer says so -- clearing a pin leaves the device on the pinned version
  until a rollout targets it -- and a device no rollout and no pin ever touched is
  never sent anything.
- Nothing is published for a step whose state was not saved: when another writer moved
  the revision first, the step's result is dropped and the next tick starts again
  from what that writer saved.
- A manifest is committed to ``issued_manifests`` before it is published, and marked
  sent only after the broker's PUBACK; a failed publish is sent again later, never
  re-issued under the same version with other bytes.
- Maintenance windows: a rollout targets the devices of a group with a window at any
  time, at its rate limit, and each attempt's deployment carries the window as its
  ``install_window`` (:class:`~shared.messages.InstallWindow`): the device downloads,
  verifies and stages ahead, reports ``staged``, and activates inside the window by its
  own clock. The core does not count the wait for the window against the per-device
  timeout, and shows such a device as waiting for its window. The window an attempt was
  sent stays with it (a changed group window applies to later attempts); reverts,
  roll-backs and pins apply at once. An agent that predates the field ignores it and
  installs at once -- the field is additive, so nothing else changes for it.
- Restart: rollout state lives in the database; a new engine's first tick reconciles
  every device any rollout claims and then continues each rollout from its saved
  state -- a server restart mid-rollout resumes it where it was.
- The clock is read only through ``clock``; an exception while stepping one rollout is
  logged and counted, and the others go on; the thread never dies of one.
- The gates judge telemetry windows of the rollout's model that end after the rollout
  started minus ``baseline_window`` (the baseline: devices still on other versions).
- Agent rollouts (``kind`` agent) run through the same step, claims and publishing: a
  device's desired state carries the model deployments of the model claims and the
  agent deployment of the latest agent claim side by side, so neither kind of rollout
  disturbs the other. A device counts as running the new agent once its state reports
  that ``agent_version`` with an ``agent_update`` that ``activated`` it. Their gates
  judge the windows of every model: a window that starts after the device was seen
  on the new agent counts as the new version's, one that ended before its attempt (or
  from a device not moved) as the old's; windows in between are left out.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from server.db import utcnow
from server.fleet.inventory import DeviceMessage
from server.fleet.models import Device, DeviceStatus
from server.ingest.models import ModelWindowRecord
from server.rollouts import service
from server.rollouts.core import (
    DeviceOutcome,
    DeviceSignals,
    PhaseStarted,
    RolloutKind,
    RolloutSpec,
    StatusChanged,
    StepResult,
    step,
)
from server.rollouts.desired import (
    AgentClaim,
    AgentWheel,
    Claim,
    DesiredPublisher,
    ModelClaim,
    desired_content,
    refresh_due,
    rollout_claims,
)
from server.rollouts.eligibility import ArtifactVariant, Pin
from server.rollouts.errors import DesiredStateError, PublishError
from server.rollouts.models import RolloutRecord
from shared.drift import DriftSketch, PredictionSketch
from shared.messages import AgentDeployment, InstallWindow, LatencyHistogram, ModelWindow

__all__ = ["ArtifactPath", "RolloutEngine", "needs_telemetry"]

log = logging.getLogger(__name__)

ArtifactPath = Callable[[str, str], str | None]
"""``(device_id, sha256) -> URL path`` put in a desired state's artifact reference."""

_IN_CHUNK = 2000


def needs_telemetry(spec: RolloutSpec) -> bool:
    """Whether any phase of ``spec`` has a gate that reads telemetry windows."""
    for index in range(len(spec.phases)):
        gates = spec.phase_gates(index)
        if any(
            limit is not None
            for limit in (
                gates.max_error_rate,
                gates.max_latency_sla_ratio,
                gates.max_confidence_drop,
                gates.max_prediction_psi,
            )
        ):
            return True
    return False


def _window(row: ModelWindowRecord) -> ModelWindow | None:
    """What the gates read of a stored window: counts, latency and the prediction sketch."""
    try:
        drift = None
        if row.drift_json:
            document = json.loads(row.drift_json)
            predictions = document.get("predictions")
            drift = DriftSketch(
                reference_id=document["reference_id"],
                features=[],
                predictions=None
                if predictions is None
                else PredictionSketch.model_validate(predictions),
            )
        return ModelWindow(
            model_name=row.model_name,
            model_version=row.model_version,
            target=row.target,
            inferences=row.inferences,
            errors=row.errors,
            latency_ms=LatencyHistogram.model_validate_json(row.latency_json),
            drift=drift,
        )
    except (ValidationError, ValueError, KeyError, TypeError):
        log.warning("rollouts: a stored telemetry window does not parse (id %s)", row.id)
        return None


def _standing_claims(record: Any) -> list[Claim]:
    """What the device's latest manifest names, as claims made when it was issued (with
    the install windows it named).

    They lose to every later claim or pin, so a model stays as it was last issued until
    something newer says otherwise: clearing a pin, say, never changes or removes a
    model by itself.
    """
    if record is None:
        return []
    claims: list[Claim] = []
    agent_json = getattr(record, "agent_json", None)
    if agent_json:
        agent = AgentDeployment.model_validate_json(agent_json)
        claims.append(
            AgentClaim(
                device_id=record.device_id,
                wheel=AgentWheel(
                    version=agent.version,
                    sha256=agent.artifact.sha256,
                    length=agent.artifact.length,
                ),
                rollout_id=record.rollout_id,
                claimed_at=record.issued_at,
                install_window=agent.install_window,
                health_timeout_s=agent.health_timeout_s,
            )
        )
    return claims + [
        ModelClaim(
            device_id=record.device_id,
            model_name=d["model_name"],
            model_version=int(d["model_version"]),
            rollout_id=record.rollout_id,
            claimed_at=record.issued_at,
            install_window=None
            if d.get("install_window") is None
            else InstallWindow.model_validate(d["install_window"]),
        )
        for d in json.loads(record.deployments_json)
    ]


_OLD_AGENT = 0
"""The version a relabelled window of an agent rollout gets when the old agent made it."""


def _agent_window(
    rollout: service.LoadedRollout, device_id: str, window: ModelWindow, start: datetime
) -> ModelWindow | None:
    """A window as an agent rollout's gates read it: ``model_version`` the release id when
    the new agent made it, :data:`_OLD_AGENT` when the old one did, None when unsure."""
    a = rollout.state.devices.get(device_id)
    if a is None or a.targeted_at is None or a.outcome is DeviceOutcome.EXCLUDED:
        label = _OLD_AGENT
    elif a.outcome is DeviceOutcome.ACTIVATED and a.outcome_at is not None:
        if start >= a.outcome_at:
            label = rollout.spec.model_version
        elif start < a.targeted_at:
            label = _OLD_AGENT
        else:
            return None
    elif start < a.targeted_at:
        label = _OLD_AGENT
    else:
        return None
    return window.model_copy(update={"model_version": label})


class RolloutEngine:
    """Runs :meth:`tick` on its own thread until :meth:`stop` (see the module docstring).

    ``publisher`` must be started; ``latency_sla_ms`` maps profile names to their p95
    SLA; ``artifact_path`` names the HTTP path of an artifact for a device (or None).
    ``authority``, when given, forgets its cached answers for a device whenever the
    device gets a new manifest.
    """

    def __init__(
        self,
        db: Engine,
        *,
        publisher: DesiredPublisher,
        latency_sla_ms: Mapping[str, float],
        clock: Callable[[], datetime] = utcnow,
        tick_seconds: float = 1.0,
        maintenance_seconds: float = 30.0,
        baseline_window: timedelta = timedelta(hours=24),
        artifact_path: ArtifactPath | None = None,
        authority: service.ManifestAuthority | None = None,
    ) -> None:
        if tick_seconds <= 0 or maintenance_seconds <= 0:
            raise ValueError("tick_seconds and maintenance_seconds must be positive")
        self.db = db
        self.publisher = publisher
        self.latency_sla_ms = dict(latency_sla_ms)
        self.tick_seconds = tick_seconds
        self.maintenance_seconds = maintenance_seconds
        self.baseline_window = baseline_window
        self._clock = clock
        self._artifact_path = artifact_path
        self._authority = authority
        self._rollouts: dict[str, service.LoadedRollout] = {}
        self._claims: dict[str, dict[str, Claim]] = {}
        self._agent_wheels: dict[int, AgentWheel] = {}
        self._variants: dict[tuple[str, int], list[ArtifactVariant]] = {}
        self._windows: dict[str, dict[int, tuple[str, ModelWindow, datetime]]] = {}
        self._loaded_once = False
        self._next_maintenance = 0.0
        self._pending: dict[str, bool] = {}  # device id -> needs a new manifest version
        self._lock = threading.Lock()
        self._tick_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._stats = {
            "ticks": 0,
            "steps_saved": 0,
            "conflicts": 0,
            "step_errors": 0,
            "published": 0,
            "publish_errors": 0,
            "desired_errors": 0,
        }

    # ----------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("RolloutEngine already started")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="rollout-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the tick in progress, then stop."""
        thread, self._thread = self._thread, None
        self._stopping.set()
        self._wake.set()
        if thread is not None:
            thread.join(timeout)

    def wake(self) -> None:
        """Run the next tick now rather than at the end of the interval."""
        self._wake.set()

    def request(self, device_ids: Iterable[str]) -> None:
        """Reconcile these devices' desired states at the next tick (after a pin changed)."""
        self._defer({device_id: False for device_id in device_ids})
        self._wake.set()

    def _defer(self, devices: Mapping[str, bool]) -> None:
        with self._lock:
            for device_id, retry in devices.items():
                self._pending[device_id] = self._pending.get(device_id, False) or retry

    def on_device_message(self, message: DeviceMessage) -> None:
        """The inventory hook: a state report or an update event may move a rollout."""
        if service.channel_matters(message):
            self._wake.set()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] += n

    def _run(self) -> None:
        # Coalesce bursts of device messages: at most one tick per quarter interval.
        gap = self.tick_seconds / 4
        while not self._stopping.is_set():
            try:
                self.tick()
            except Exception:  # the thread must outlive a bad tick (database down, say)
                log.exception("rollout engine: tick failed")
                self._count("step_errors")
            self._wake.wait(self.tick_seconds)
            self._wake.clear()
            self._stopping.wait(gap)

    # ----------------------------------------------------------------------- one tick

    def tick(self) -> None:
        """One pass over every rollout (see the module docstring); safe to call from tests."""
        with self._tick_lock:
            now = self._clock()
            publish: dict[str, bool] = {}  # device id -> needs a new version even if unchanged
            for device_id in self._refresh_cache():
                publish.setdefault(device_id, False)
            active = sorted(
                (r for r in self._rollouts.values() if not r.state.status.is_final),
                key=lambda r: (r.created_at, r.id),
            )
            for rollout in active:
                try:
                    result = self._step(rollout, now)
                except Exception:
                    log.exception("rollout %s: step failed", rollout.id)
                    self._count("step_errors")
                    continue
                if result is not None:
                    for device_id in result.device_ids:
                        publish[device_id] = publish.get(device_id, False) or (
                            device_id in result.retried
                        )
            if time.monotonic() >= self._next_maintenance:
                self._next_maintenance = time.monotonic() + self.maintenance_seconds
                for device_id in self._maintenance_devices(now):
                    publish.setdefault(device_id, False)
            self._defer(publish)
            if self.publisher.connected:
                with self._lock:
                    publish, self._pending = self._pending, {}
                if publish:
                    self._defer(self._publish(publish, now))
            self._count("ticks")

    def _refresh_cache(self) -> set[str]:
        """Load rollouts that are new or changed; return the devices to reconcile."""
        with Session(self.db) as session:
            heads = session.exec(select(RolloutRecord.id, RolloutRecord.revision)).all()
            reconcile: set[str] = set()
            for rollout_id, revision in heads:
                known = self._rollouts.get(rollout_id)
                if known is not None and known.revision == revision:
                    continue
                record = session.get(RolloutRecord, rollout_id)
                if record is None:
                    continue
                fresh = service.load_rollout(record)
                if fresh.spec.kind is RolloutKind.AGENT and (
                    fresh.spec.model_version not in self._agent_wheels
                    or any(
                        a.previous_version is not None
                        and a.previous_version not in self._agent_wheels
                        for a in fresh.state.devices.values()
                    )
                ):
                    self._agent_wheels = service.agent_wheels(session)
                if known is not None:
                    reconcile |= service.targeted_devices(known.state)
                if known is not None or not self._loaded_once:
                    reconcile |= service.targeted_devices(fresh.state)
                self._remember(fresh)
        self._loaded_once = True
        return reconcile

    def _remember(self, rollout: service.LoadedRollout) -> None:
        self._rollouts[rollout.id] = rollout
        self._claims[rollout.id] = rollout_claims(
            rollout.spec, rollout.state, agent_wheels=self._agent_wheels
        )
        if rollout.state.status.is_final:
            self._windows.pop(rollout.id, None)

    def _variants_of(
        self, session: Session, model_name: str, version: int
    ) -> list[ArtifactVariant]:
        key = (model_name, version)
        if key not in self._variants:
            found = service.model_variants(session, model_name=model_name, model_version=version)
            if not found:
                return []  # not ready (yet): ask again next time
            self._variants[key] = found
        return self._variants[key]

    # ----------------------------------------------------------------------- stepping

    def _step(self, rollout: service.LoadedRollout, now: datetime) -> StepResult | None:
        spec, state = rollout.spec, rollout.state
        with Session(self.db, expire_on_commit=False) as session:
            if spec.kind is RolloutKind.AGENT:
                # Small, and read fresh: a release published since names devices' versions.
                self._agent_wheels = service.agent_wheels(session)
                variants: list[ArtifactVariant] = []
            else:
                variants = self._variants_of(session, spec.model_name, spec.model_version)
            members = service.rollout_members(
                session,
                spec=spec,
                group_id=rollout.group_id,
                variants=variants,
                latency_sla_ms=self.latency_sla_ms,
                also=service.targeted_devices(state),
            )
            signals = self._signals(session, rollout, members, now)
            result = step(
                spec,
                state,
                members.members,
                signals,
                now=now,
                install_window=members.install_window,
            )
            if result.state == state and not result.actions:
                return None
            saved = service.save_state(session, rollout=rollout, state=result.state, now=now)
            if saved is None:
                session.rollback()
                self._count("conflicts")
                log.info(
                    "rollout %s: changed by another writer; its step is dropped", spec.rollout_id
                )
                return None
            session.commit()
        self._remember(saved)
        self._count("steps_saved")
        for action in result.actions:
            if isinstance(action, StatusChanged):
                log.info(
                    "rollout %s: %s -> %s%s",
                    spec.rollout_id,
                    action.previous.value,
                    action.status.value,
                    f" ({action.reason})" if action.reason else "",
                )
            elif isinstance(action, PhaseStarted):
                log.info(
                    "rollout %s: phase %d started (%d of %d eligible devices)",
                    spec.rollout_id,
                    action.phase + 1,
                    action.target,
                    action.eligible,
                )
        return result

    def _signals(
        self,
        session: Session,
        rollout: service.LoadedRollout,
        members: service.Members,
        now: datetime,
    ) -> dict[str, DeviceSignals]:
        spec, state = rollout.spec, rollout.state
        ids = {m.device_id for m in members.members} | service.targeted_devices(state)
        devices = members.devices
        if spec.kind is RolloutKind.AGENT:
            moving = {
                d: spec.agent_version
                for d, a in state.devices.items()
                if a.targeted and a.outcome is None and spec.agent_version is not None
            }
            release_ids = {w.version: i for i, w in self._agent_wheels.items()}
            versions = service.running_agent_releases(devices.values(), release_ids, confirm=moving)
        else:
            versions = service.running_versions(devices.values(), spec.model_name)
        receipts = service.state_receipts(session, device_ids=ids)
        in_progress = {
            d: a.targeted_at
            for d, a in state.devices.items()
            if a.targeted_at is not None and a.outcome is None
        }
        updates = (
            service.update_reports(
                session,
                device_ids=list(in_progress),
                model_name=spec.model_name,
                since=min(in_progress.values()),
            )
            if in_progress
            else {}
        )
        telemetry = self._telemetry(session, rollout, ids, now) if needs_telemetry(spec) else {}
        signals = {}
        for device_id in ids:
            device = devices.get(device_id)
            receipt = receipts.get(device_id)
            received = (
                receipt.received_at
                if receipt is not None
                and device is not None
                and receipt.reported_at == device.state_reported_at
                else None
            )
            signals[device_id] = DeviceSignals(
                device_id=device_id,
                running_version=versions.get(device_id),
                state_received_at=received,
                updates=tuple(updates.get(device_id, ())),
                telemetry=tuple(telemetry.get(device_id, ())),
            )
        return signals

    def _telemetry(
        self,
        session: Session,
        rollout: service.LoadedRollout,
        device_ids: Collection[str],
        now: datetime,
    ) -> dict[str, list[ModelWindow]]:
        """The rollout's model's windows since its start minus the baseline window, by
        device. Parsed rows are kept between ticks; only new ids are read."""
        since = (rollout.state.started_at or now) - self.baseline_window
        cache = self._windows.setdefault(rollout.id, {})
        agent = rollout.spec.kind is RolloutKind.AGENT
        ids = select(ModelWindowRecord.id).where(col(ModelWindowRecord.window_end) >= since)
        if not agent:
            ids = ids.where(ModelWindowRecord.model_name == rollout.spec.model_name)
        present = set(session.exec(ids).all())
        for stale in set(cache) - present:
            del cache[stale]
        new = sorted(i for i in present - set(cache) if i is not None)
        for start in range(0, len(new), _IN_CHUNK):
            rows = session.exec(
                select(ModelWindowRecord).where(
                    col(ModelWindowRecord.id).in_(new[start : start + _IN_CHUNK])
                )
            )
            for row in rows:
                window = _window(row)
                if window is not None and row.id is not None:
                    cache[row.id] = (row.device_id, window, row.window_start)
        wanted = set(device_ids)
        found: dict[str, list[ModelWindow]] = {}
        for device_id, window, window_start in cache.values():
            if device_id not in wanted:
                continue
            if agent:
                labelled = _agent_window(rollout, device_id, window, window_start)
                if labelled is None:
                    continue
                window = labelled
            found.setdefault(device_id, []).append(window)
        return found

    # ----------------------------------------------------------------------- maintenance

    def _maintenance_devices(self, now: datetime) -> set[str]:
        """Devices whose latest manifest was never acknowledged or must be re-signed, and
        pinned devices (a pin set by another replica)."""
        due: set[str] = set()
        keyring = self.publisher.keys.keyring
        with Session(self.db) as session:
            latest = service.latest_manifests(session)
            pinned = {p.device_id for p in service.list_pins(session)}
        for device_id, row in latest.items():
            if row.sent_at is None:
                due.add(device_id)
                continue
            manifest = service.issued_manifest(row)
            assert manifest is not None
            try:
                reason = refresh_due(
                    manifest,
                    keyring=keyring,
                    now=now,
                    lifetime=self.publisher.lifetime,
                    refresh_margin=self.publisher.refresh_margin,
                )
            except DesiredStateError as e:  # the keyring itself expired: nothing can be signed
                log.error("rollouts: cannot re-sign desired states: %s", e)
                break
            if reason is not None:
                due.add(device_id)
        return due | pinned

    # ----------------------------------------------------------------------- publishing

    def _device_claims(self, device_id: str) -> list[Claim]:
        return [claims[device_id] for claims in self._claims.values() if device_id in claims]

    def _publish(self, devices: Mapping[str, bool], now: datetime) -> dict[str, bool]:
        """Recompute, issue (if anything changed), record, then send each device's state.

        Returns the devices left for later: the broker failed a publish, and the rest of
        the batch waits for the next tick instead of each waiting for its timeout.
        """
        ids = sorted(devices)
        with Session(self.db, expire_on_commit=False) as session:
            rows = service.devices_by_id(session, ids)
            pins: dict[str, list[Pin]] = {}
            for pin in service.list_pins(session, device_ids=ids):
                pins.setdefault(pin.device_id, []).append(
                    Pin(pin.device_id, pin.model_name, pin.model_version)
                )
            latest = service.latest_manifests(session, device_ids=ids)
            wanted: set[tuple[str, int]] = set()
            claims = {
                device_id: [
                    *_standing_claims(latest.get(device_id)),
                    *self._device_claims(device_id),
                ]
                for device_id in ids
            }
            for device_claims in claims.values():
                wanted.update(
                    (c.model_name, c.model_version)
                    for c in device_claims
                    if isinstance(c, ModelClaim) and c.model_version is not None
                )
            for device_pins in pins.values():
                wanted.update((p.model_name, p.model_version) for p in device_pins)
            variants = [
                v
                for name, version in sorted(wanted)
                for v in self._variants_of(session, name, version)
            ]
        for index, device_id in enumerate(ids):
            device = rows.get(device_id)
            if device is None or device.status != DeviceStatus.ACCEPTED:
                continue
            delivered = self._publish_one(
                device,
                claims=claims[device_id],
                pins=pins.get(device_id, []),
                variants=variants,
                last_row=latest.get(device_id),
                retry=devices[device_id],
                now=now,
            )
            if not delivered:
                # This device's retry, if any, is spent: its new version is recorded, and
                # sending that (unacknowledged, so still its latest) is the retry. The
                # devices after it were not looked at and keep theirs.
                return {device_id: False, **{d: devices[d] for d in ids[index + 1 :]}}
        return {}

    def _publish_one(
        self,
        device: Device,
        *,
        claims: Sequence[Claim],
        pins: Sequence[Pin],
        variants: Sequence[ArtifactVariant],
        last_row: Any,
        retry: bool,
        now: datetime,
    ) -> bool:
        """False only when the broker did not take the desired state."""
        device_id = device.id
        path = self._artifact_path
        try:
            content = desired_content(
                device_id,
                device.profile,
                claims=claims,
                pins=pins,
                variants=variants,
                artifact_url=None if path is None else (lambda sha: path(device_id, sha)),
            )
        except DesiredStateError as e:
            log.warning("rollouts: no desired state for %s: %s", device_id, e)
            self._count("desired_errors")
            return True
        last = service.issued_manifest(last_row)
        try:
            issue = self.publisher.issue(
                content, last=last, retry=retry, reported_version=device.manifest_version
            )
        except DesiredStateError as e:
            log.error("rollouts: cannot sign a desired state for %s: %s", device_id, e)
            self._count("desired_errors")
            return True
        if issue.is_new:
            try:
                with Session(self.db) as session:
                    service.record_manifest(
                        session, manifest=issue.manifest, content=content, reason=issue.reason
                    )
                    session.commit()
            except IntegrityError:
                # Another replica issued this version first; its manifest stands.
                log.info(
                    "rollouts: manifest v%d of %s was issued elsewhere",
                    issue.manifest.manifest_version,
                    device_id,
                )
                return True
        elif last_row is not None and last_row.sent_at is not None:
            return True  # unchanged and already delivered
        try:
            self.publisher.send(issue.manifest)
        except PublishError as e:
            log.warning("rollouts: desired state of %s not published yet: %s", device_id, e)
            self._count("publish_errors")
            return False
        with Session(self.db) as session:
            service.mark_sent(
                session,
                device_id=device_id,
                manifest_version=issue.manifest.manifest_version,
                at=now,
            )
            session.commit()
        if self._authority is not None:
            self._authority.forget(device_id)
        self._count("published")
        return True
