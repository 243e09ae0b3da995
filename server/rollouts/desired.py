"""Each device's desired state: what it should run, under which manifest version, signed.

The pure part, in the order a caller uses it:

1. :func:`rollout_claims` -- what one rollout wants each of its devices to run
   (:class:`ModelClaim`; an agent rollout's :class:`AgentClaim`): the new version while
   the device is moved, with the install window its attempt was given; the previous
   one, at once, after it failed, timed out or was rolled back.
2. :func:`desired_content` -- one device's deployments from every claim on it and its
   pins (a pin wins; among claims the latest wins), each in the deliverable variant
   for the device's profile (:func:`~server.rollouts.eligibility.select_variant`) and
   with the winning claim's install window (a pin has none: it applies at once); and
   the agent deployment of the latest agent claim, if any.
3. :func:`issue_manifest` -- whether that content needs a new manifest version, and if
   so the signed :class:`~shared.messages.DesiredMessage` as an :class:`IssuedManifest`.

:class:`DesiredPublisher` is the thin adapter that records each new manifest through the
caller's callback and then publishes it retained, QoS 1, on ``ef/v1/dev/{id}/desired``.

What always holds:

- A manifest version names exactly one payload. A new version is issued only when the
  content (deployments -- their install windows included -- and rollout id) changes,
  the keyring changes, the manifest nears its expiry, or a retry asks for one; it is
  strictly above both the last version issued to the device and the last one the
  device reported accepting. Otherwise the last issued manifest stands, byte for byte
  -- a device would refuse the same version with other bytes as a rollback.
- A manifest never outlives the keyring it ships with: ``expires_at`` is the earlier of
  ``now + lifetime`` and the keyring's expiry.
- :func:`allowed_artifacts` is exactly the set of artifacts the device's latest signed
  manifest names -- model bundles and the agent wheel: what the block server and the
  range endpoint may serve it.
- Content without an agent deployment digests and serializes exactly as before agent
  deployments existed, so such devices' manifests stay byte for byte what they were.
- An agent claim whose version is no published release (``wheel`` None: the device ran
  a version the server never published, or none) leaves the ``agent`` field out: the
  device keeps the agent it runs. After an abort or a failure that is the only way
  back the server has -- it can only name versions whose wheel it can serve.
- A new manifest is handed to ``record`` (persisted) *before* it is published, so a
  version the broker may have seen is never issued again with other content.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from server.keys import FleetKeys
from server.rollouts.core import DeviceOutcome, RolloutKind, RolloutSpec, RolloutState
from server.rollouts.eligibility import ArtifactVariant, Pin, select_variant
from server.rollouts.errors import DesiredStateError, PublishError
from shared.messages import (
    AGENT_WHEEL_MEDIA_TYPE,
    AgentDeployment,
    ArtifactRef,
    Deployment,
    DesiredMessage,
    DesiredState,
    InstallWindow,
    Keyring,
)
from shared.signing import PayloadType, sign_envelope
from shared.topics import CHANNELS, Channel, device_topic

__all__ = [
    "DEFAULT_MANIFEST_LIFETIME",
    "DEFAULT_REFRESH_MARGIN",
    "AgentClaim",
    "AgentWheel",
    "Claim",
    "DesiredContent",
    "DesiredPublisher",
    "IssueReason",
    "IssuedManifest",
    "ManifestIssue",
    "ModelClaim",
    "allowed_artifacts",
    "artifact_authorizer",
    "build_desired_state",
    "desired_content",
    "issue_manifest",
    "next_manifest_version",
    "refresh_due",
    "rollout_claims",
    "sign_desired",
]

log = logging.getLogger(__name__)

DEFAULT_MANIFEST_LIFETIME = timedelta(days=7)
"""How long a signed desired state stays valid; a device that hears nothing newer by then
freezes on what it runs."""
DEFAULT_REFRESH_MARGIN = timedelta(days=2)
"""Re-sign a desired state once it expires within this margin."""


# ----------------------------------------------------------------------------- claims


@dataclass(frozen=True, slots=True)
class ModelClaim:
    """What one rollout wants a device to run of one model (``None``: not run it), and
    the window to activate it in (``None``: at once)."""

    device_id: str
    model_name: str
    model_version: int | None
    rollout_id: str | None
    claimed_at: datetime
    install_window: InstallWindow | None = None


@dataclass(frozen=True, slots=True)
class AgentWheel:
    """A published agent release as a desired state names it."""

    version: str
    sha256: str
    length: int


DEFAULT_HEALTH_TIMEOUT_S = 300


@dataclass(frozen=True, slots=True)
class AgentClaim:
    """What one agent rollout wants a device to run of the agent (``wheel`` None: no
    published version -- the device keeps what it runs), and the window to switch in."""

    device_id: str
    wheel: AgentWheel | None
    rollout_id: str | None
    claimed_at: datetime
    install_window: InstallWindow | None = None
    health_timeout_s: int = DEFAULT_HEALTH_TIMEOUT_S


Claim = ModelClaim | AgentClaim


def rollout_claims(
    spec: RolloutSpec,
    state: RolloutState,
    *,
    agent_wheels: Mapping[int, AgentWheel] | None = None,
) -> dict[str, Claim]:
    """The claim of one rollout on each device it targeted, by device id.

    Devices it moved (targeted, updating or activated) are claimed for the new version,
    in the install window of their latest attempt; devices that failed, timed out or
    were rolled back, for the version they ran before, at once. Excluded devices carry
    no claim. An agent rollout's versions are release ids, looked up in
    ``agent_wheels``; an id not there (None: the device ran no published version)
    claims no wheel.
    """
    claims: dict[str, Claim] = {}
    version: int | None
    for device_id, a in state.devices.items():
        if a.targeted_at is None or a.outcome is DeviceOutcome.EXCLUDED:
            continue
        window = None
        if a.outcome in (None, DeviceOutcome.ACTIVATED):
            version, at, window = spec.model_version, a.targeted_at, a.install_window
        else:
            version, at = a.previous_version, a.outcome_at or a.targeted_at
        if spec.kind is RolloutKind.AGENT:
            wheels = agent_wheels or {}
            claims[device_id] = AgentClaim(
                device_id=device_id,
                wheel=None if version is None else wheels.get(version),
                rollout_id=spec.rollout_id,
                claimed_at=at,
                install_window=window,
                health_timeout_s=spec.health_timeout_s or DEFAULT_HEALTH_TIMEOUT_S,
            )
            continue
        claims[device_id] = ModelClaim(
            device_id=device_id,
            model_name=spec.model_name,
            model_version=version,
            rollout_id=spec.rollout_id,
            claimed_at=at,
            install_window=window,
        )
    return claims


# ----------------------------------------------------------------------------- content


@dataclass(frozen=True, slots=True)
class DesiredContent:
    """Everything a device's desired state says apart from version, times and signatures."""

    device_id: str
    rollout_id: str | None
    deployments: tuple[Deployment, ...]
    agent: AgentDeployment | None = None

    def digest(self) -> str:
        """SHA-256 of the canonical JSON of the rollout id, the deployments and the agent
        (left out when absent, so content without one digests as it always did)."""
        document: dict[str, object] = {
            "rollout_id": self.rollout_id,
            "deployments": [d.model_dump(mode="json") for d in self.deployments],
        }
        if self.agent is not None:
            document["agent"] = self.agent.model_dump(mode="json")
        canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    @property
    def artifacts(self) -> frozenset[str]:
        shas = {d.artifact.sha256 for d in self.deployments}
        if self.agent is not None:
            shas.add(self.agent.artifact.sha256)
        return frozenset(shas)


def desired_content(
    device_id: str,
    profile: str,
    *,
    claims: Iterable[Claim],
    pins: Iterable[Pin] = (),
    variants: Iterable[ArtifactVariant],
    artifact_url: Callable[[str], str | None] | None = None,
) -> DesiredContent:
    """The deployments ``device_id`` should run.

    Per model, a pin on the device wins (at once); otherwise the latest claim (ties: the
    larger rollout id), in that claim's install window. A model whose winning claim is
    ``None`` is left out, so the device removes it. The agent: the latest
    :class:`AgentClaim`'s wheel (none: the field is left out). The desired state's
    rollout id is that of the latest claim used, model or agent.
    Raises :class:`DesiredStateError` when a chosen version has no deliverable variant
    for ``profile``.
    """
    chosen: dict[str, tuple[int | None, ModelClaim | None]] = {}
    agent_claim: AgentClaim | None = None
    for claim in claims:
        if claim.device_id != device_id:
            continue
        if isinstance(claim, AgentClaim):
            if agent_claim is None or _later(claim, agent_claim):
                agent_claim = claim
            continue
        held = chosen.get(claim.model_name)
        if held is None or _later(claim, held[1]):
            chosen[claim.model_name] = (claim.model_version, claim)
    for pin in pins:
        if pin.device_id == device_id:
            chosen[pin.model_name] = (pin.model_version, None)
    variant_list = list(variants)
    deployments = []
    rollout: Claim | None = agent_claim
    for model_name in sorted(chosen):
        version, source = chosen[model_name]
        if source is not None and _later(source, rollout):
            rollout = source
        if version is None:
            continue
        variant = select_variant(
            variant_list, model_name=model_name, model_version=version, profile=profile
        )
        if variant is None:
            raise DesiredStateError(
                f"{device_id}: {model_name} v{version} has no artifact for profile {profile} "
                "that passed its gates and has a bundle"
            )
        assert variant.bundle_sha256 is not None and variant.bundle_length is not None
        deployments.append(
            Deployment(
                model_name=model_name,
                model_version=version,
                target=variant.target,
                artifact=ArtifactRef(
                    sha256=variant.bundle_sha256,
                    length=variant.bundle_length,
                    url=None if artifact_url is None else artifact_url(variant.bundle_sha256),
                ),
                install_window=None if source is None else source.install_window,
            )
        )
    agent = None
    if agent_claim is not None and agent_claim.wheel is not None:
        wheel = agent_claim.wheel
        agent = AgentDeployment(
            version=wheel.version,
            artifact=ArtifactRef(
                sha256=wheel.sha256,
                length=wheel.length,
                url=None if artifact_url is None else artifact_url(wheel.sha256),
                media_type=AGENT_WHEEL_MEDIA_TYPE,
            ),
            health_timeout_s=agent_claim.health_timeout_s,
            install_window=agent_claim.install_window,
        )
    return DesiredContent(
        device_id=device_id,
        rollout_id=None if rollout is None else rollout.rollout_id,
        deployments=tuple(deployments),
        agent=agent,
    )


def _later(claim: Claim, other: Claim | None) -> bool:
    if other is None:
        return True
    return (claim.claimed_at, claim.rollout_id or "") > (other.claimed_at, other.rollout_id or "")


# ----------------------------------------------------------------------------- manifests


class IssueReason(StrEnum):
    FIRST = "first"
    CONTENT_CHANGED = "content_changed"
    KEYRING_CHANGED = "keyring_changed"
    EXPIRING = "expiring"
    RETRY = "retry"
    DEVICE_AHEAD = "device_ahead"


@dataclass(frozen=True, slots=True)
class IssuedManifest:
    """One signed desired state as issued to a device (persist it; publish ``payload``)."""

    device_id: str
    manifest_version: int
    content_digest: str
    keyring_version: int
    issued_at: datetime
    expires_at: datetime
    artifacts: frozenset[str]
    payload: bytes
    """The :class:`~shared.messages.DesiredMessage` bytes, exactly as published."""


@dataclass(frozen=True, slots=True)
class ManifestIssue:
    """The outcome of :func:`issue_manifest`: the manifest in force and why it is new."""

    manifest: IssuedManifest
    reason: IssueReason | None
    """None: the last issued manifest stands unchanged."""

    @property
    def is_new(self) -> bool:
        return self.reason is not None


def _effective_expiry(keyring: Keyring, *, now: datetime, lifetime: timedelta) -> datetime:
    if keyring.expires_at <= now:
        raise DesiredStateError(
            f"the keyring v{keyring.version} expired at {keyring.expires_at}; "
            "re-issue it with the root key before signing desired states"
        )
    return min(now + lifetime, keyring.expires_at)


def next_manifest_version(
    content: DesiredContent,
    *,
    keyring: Keyring,
    last: IssuedManifest | None,
    now: datetime,
    lifetime: timedelta = DEFAULT_MANIFEST_LIFETIME,
    refresh_margin: timedelta = DEFAULT_REFRESH_MARGIN,
    retry: bool = False,
    reported_version: int = 0,
) -> tuple[int, IssueReason] | None:
    """The version a new manifest for ``content`` gets and why, or None to keep ``last``.

    ``reported_version``: the manifest version the device last reported accepting; a new
    version is above it too (the server's record may be older than the device's).
    """
    floor = max(0 if last is None else last.manifest_version, reported_version)
    if last is None:
        return floor + 1, IssueReason.FIRST
    if last.device_id != content.device_id:
        raise ValueError(f"the last manifest is {last.device_id}'s, not {content.device_id}'s")
    if last.content_digest != content.digest():
        return floor + 1, IssueReason.CONTENT_CHANGED
    if retry:
        return floor + 1, IssueReason.RETRY
    if reported_version > last.manifest_version:
        # The device holds a newer manifest than the one on record: it would refuse ours.
        return floor + 1, IssueReason.DEVICE_AHEAD
    due = refresh_due(
        last, keyring=keyring, now=now, lifetime=lifetime, refresh_margin=refresh_margin
    )
    return None if due is None else (floor + 1, due)


def refresh_due(
    manifest: IssuedManifest,
    *,
    keyring: Keyring,
    now: datetime,
    lifetime: timedelta = DEFAULT_MANIFEST_LIFETIME,
    refresh_margin: timedelta = DEFAULT_REFRESH_MARGIN,
) -> IssueReason | None:
    """Whether an unchanged manifest must be re-signed: a new keyring, or its expiry is near.

    Lets a periodic job find the devices to re-sign without recomputing their content.
    Near expiry counts only when re-signing would move the expiry (a keyring that
    expires first caps it), so versions do not churn while the keyring awaits renewal.
    """
    if manifest.keyring_version != keyring.version:
        return IssueReason.KEYRING_CHANGED
    renewed = _effective_expiry(keyring, now=now, lifetime=lifetime)
    if manifest.expires_at - now < refresh_margin and renewed > manifest.expires_at:
        return IssueReason.EXPIRING
    return None


def build_desired_state(
    content: DesiredContent,
    *,
    manifest_version: int,
    keyring: Keyring,
    now: datetime,
    lifetime: timedelta = DEFAULT_MANIFEST_LIFETIME,
) -> DesiredState:
    return DesiredState(
        device_id=content.device_id,
        manifest_version=manifest_version,
        issued_at=now,
        expires_at=_effective_expiry(keyring, now=now, lifetime=lifetime),
        rollout_id=content.rollout_id,
        deployments=list(content.deployments),
        agent=content.agent,
    )


def sign_desired(state: DesiredState, keys: FleetKeys) -> DesiredMessage:
    """The state signed by the keyring's threshold of online keys, with the keyring."""
    return DesiredMessage(
        keyring=keys.keyring_envelope,
        manifest=sign_envelope(state.to_bytes(), PayloadType.DESIRED_STATE, keys.signing_keys),
    )


def issue_manifest(
    content: DesiredContent,
    *,
    keys: FleetKeys,
    last: IssuedManifest | None,
    now: datetime,
    lifetime: timedelta = DEFAULT_MANIFEST_LIFETIME,
    refresh_margin: timedelta = DEFAULT_REFRESH_MARGIN,
    retry: bool = False,
    reported_version: int = 0,
) -> ManifestIssue:
    """Keep ``last`` or sign a new manifest for ``content`` (see :func:`next_manifest_version`)."""
    if refresh_margin >= lifetime:
        raise ValueError("the refresh margin must be shorter than the manifest lifetime")
    decision = next_manifest_version(
        content,
        keyring=keys.keyring,
        last=last,
        now=now,
        lifetime=lifetime,
        refresh_margin=refresh_margin,
        retry=retry,
        reported_version=reported_version,
    )
    if decision is None:
        assert last is not None
        return ManifestIssue(manifest=last, reason=None)
    version, reason = decision
    state = build_desired_state(
        content, manifest_version=version, keyring=keys.keyring, now=now, lifetime=lifetime
    )
    message = sign_desired(state, keys)
    manifest = IssuedManifest(
        device_id=content.device_id,
        manifest_version=version,
        content_digest=content.digest(),
        keyring_version=keys.keyring.version,
        issued_at=state.issued_at,
        expires_at=state.expires_at,
        artifacts=content.artifacts,
        payload=message.to_bytes(),
    )
    return ManifestIssue(manifest=manifest, reason=reason)


def allowed_artifacts(manifest: IssuedManifest | DesiredState | None) -> frozenset[str]:
    """The artifacts (sha256) a device may fetch: those its latest signed manifest names."""
    if manifest is None:
        return frozenset()
    if isinstance(manifest, IssuedManifest):
        return manifest.artifacts
    shas = {d.artifact.sha256 for d in manifest.deployments}
    if manifest.agent is not None:
        shas.add(manifest.agent.artifact.sha256)
    return frozenset(shas)


def artifact_authorizer(
    latest: Callable[[str], IssuedManifest | DesiredState | None],
) -> Callable[[str, str], bool]:
    """An ``authorize(device_id, sha256)`` for the block server and the range endpoint."""

    def authorize(device_id: str, sha256: str) -> bool:
        return sha256 in allowed_artifacts(latest(device_id))

    return authorize


# ----------------------------------------------------------------------------- the adapter


ClientFactory = Callable[[], mqtt.Client]
Record = Callable[[IssuedManifest], None]


def _default_client() -> mqtt.Client:
    return mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"edgefleet-desired@{uuid.uuid4().hex[:12]}",
        protocol=mqtt.MQTTv311,
        clean_session=True,
    )


class DesiredPublisher:
    """Signs desired states with the fleet's online keys and publishes them retained.

    ``client_factory`` returns a configured, unconnected paho client (credentials,
    TLS); by default an MQTT 3.1.1 client with a clean session. ``username`` /
    ``password``, when given, are the broker login (over any the factory set). paho's
    network thread only sets events here; :meth:`send` waits for the broker's PUBACK
    for up to ``publish_timeout`` seconds and raises :class:`PublishError` otherwise.
    The clock is injected (``clock``) so tests control issue and expiry times. After a
    keyring rotation, assign the new :class:`~server.keys.FleetKeys` to :attr:`keys`.
    """

    def __init__(
        self,
        keys: FleetKeys,
        *,
        host: str = "127.0.0.1",
        port: int = 1883,
        client_factory: ClientFactory | None = None,
        username: str | None = None,
        password: str | None = None,
        publish_timeout: float = 10.0,
        lifetime: timedelta = DEFAULT_MANIFEST_LIFETIME,
        refresh_margin: timedelta = DEFAULT_REFRESH_MARGIN,
        clock: Callable[[], datetime] | None = None,
        reconnect_delay: tuple[int, int] = (1, 30),
    ) -> None:
        if refresh_margin >= lifetime:
            raise ValueError("the refresh margin must be shorter than the manifest lifetime")
        self.keys = keys
        self.host = host
        self.port = port
        self.publish_timeout = publish_timeout
        self.lifetime = lifetime
        self.refresh_margin = refresh_margin
        self._clock = clock or (lambda: datetime.now(UTC))
        self._client_factory = client_factory or _default_client
        self._login = None if username is None else (username, password)
        self._reconnect_delay = reconnect_delay
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._refused: str | None = None
        spec = CHANNELS[Channel.DESIRED]
        self._qos, self._retain = spec.qos, spec.retain

    # ----------------------------------------------------------------------- lifecycle

    def start(self, timeout: float = 10.0, *, wait: bool = True) -> None:
        """Connect; return once the broker accepted the connection.

        ``wait=False`` returns at once and lets paho connect (and reconnect) in the
        background; :attr:`connected` tells when publishing can succeed.
        """
        if self._client is not None:
            raise RuntimeError("DesiredPublisher already started")
        client = self._client_factory()
        if self._login is not None:
            client.username_pw_set(*self._login)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.reconnect_delay_set(*self._reconnect_delay)
        self._client = client
        try:
            client.connect_async(self.host, self.port, keepalive=30)
        except (OSError, ValueError) as e:
            self._client = None
            raise PublishError(f"desired-state publisher: bad broker address: {e}") from e
        client.loop_start()
        if not wait:
            return
        if not self._connected.wait(timeout):
            refused = self._refused
            self.stop()
            raise PublishError(
                f"desired-state publisher: no connection to {self.host}:{self.port} within "
                f"{timeout:g} s" + (f" ({refused})" if refused else "")
            )

    @property
    def connected(self) -> bool:
        """Whether the broker currently accepts this publisher's connection."""
        return self._client is not None and self._connected.is_set()

    def stop(self) -> None:
        client, self._client = self._client, None
        self._connected.clear()
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def __enter__(self) -> DesiredPublisher:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------------- paho's thread

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if getattr(reason, "is_failure", False):
            self._refused = str(reason)
            return
        self._refused = None
        self._connected.set()

    def _on_disconnect(self, *args: Any) -> None:
        self._connected.clear()

    # ----------------------------------------------------------------------- publishing

    def issue(
        self,
        content: DesiredContent,
        *,
        last: IssuedManifest | None,
        retry: bool = False,
        reported_version: int = 0,
    ) -> ManifestIssue:
        """:func:`issue_manifest` with this publisher's keys, clock, lifetime and margin."""
        return issue_manifest(
            content,
            keys=self.keys,
            last=last,
            now=self._clock(),
            lifetime=self.lifetime,
            refresh_margin=self.refresh_margin,
            retry=retry,
            reported_version=reported_version,
        )

    def publish(
        self,
        content: DesiredContent,
        *,
        last: IssuedManifest | None,
        record: Record,
        retry: bool = False,
        reported_version: int = 0,
        republish: bool = False,
    ) -> ManifestIssue:
        """Issue, ``record`` a new manifest, then send it; an unchanged one only if ``republish``.

        ``record`` must persist the manifest (and raise if it cannot): nothing is sent
        unless it returned.
        """
        issue = self.issue(content, last=last, retry=retry, reported_version=reported_version)
        if issue.is_new:
            record(issue.manifest)
        if issue.is_new or republish:
            self.send(issue.manifest)
        return issue

    def send(self, manifest: IssuedManifest) -> None:
        """Publish a recorded manifest retained, QoS 1, and wait for the PUBACK."""
        self._publish(device_topic(manifest.device_id, Channel.DESIRED), manifest.payload)

    def clear(self, device_id: str) -> None:
        """Remove the retained desired state of a device (decommissioned or revoked)."""
        self._publish(device_topic(device_id, Channel.DESIRED), b"")

    def _publish(self, topic: str, payload: bytes) -> None:
        client = self._client
        if client is None:
            raise PublishError("desired-state publisher is not started")
        if not self._connected.wait(self.publish_timeout):
            raise PublishError(f"not connected to the broker; {topic} not published")
        info = client.publish(topic, payload, qos=self._qos, retain=self._retain)
        try:
            info.wait_for_publish(self.publish_timeout)
            published = info.is_published()
        except (RuntimeError, ValueError) as e:
            raise PublishError(f"{topic}: publish failed: {e}") from e
        if not published:
            raise PublishError(
                f"{topic}: the broker did not acknowledge within {self.publish_timeout:g} s"
            )
        log.debug("published %s (%d bytes)", topic, len(payload))
