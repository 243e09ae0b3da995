"""The messages of the wire contract, one class per payload kind.

=====================  ==========================  ===========================
message                topic channel / use          signed
=====================  ==========================  ===========================
:class:`Keyring`        inside ``desired``           by the root key(s)
:class:`DesiredState`   inside ``desired``           by an online key
:class:`DesiredMessage` ``desired`` (the payload)    carries both envelopes
:class:`DeviceState`    ``state``                    no (broker identity)
:class:`Presence`       ``presence``                 no
:class:`Event`          ``events``                   no
:class:`TelemetryReport` ``telemetry``               no
:class:`BlockRequest`   ``artifact/req``             no
:class:`BlockHeader`    ``artifact/blk`` (framed)    no; the artifact is hashed
:class:`FeedbackReport`  ``feedback``                no
:class:`SampleBatch`    ``samples``                  no
=====================  ==========================  ===========================

Device-to-server messages carry the sender's ``device_id``; the server checks it
against the topic, so a device cannot speak for another. Timestamps are ISO 8601
with a UTC offset. Every class enforces its size limit before parsing
(:mod:`shared.model`).
"""

from __future__ import annotations

import hashlib
import struct
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StringConstraints,
    model_serializer,
    model_validator,
)

from shared.drift import DriftSketch
from shared.errors import MessageError, PayloadTooLargeError
from shared.latency import N_LATENCY_BUCKETS
from shared.model import ContractModel, Message
from shared.signing import Envelope, VerifyKey, key_id
from shared.topics import check_device_id

__all__ = [
    "AGENT_WHEEL_MEDIA_TYPE",
    "MAX_OUTCOMES_PER_REPORT",
    "MAX_SAMPLE_FEATURES",
    "MAX_SAMPLE_ROWS",
    "AgentDeployment",
    "AgentUpdateResult",
    "AgentVersion",
    "ArtifactRef",
    "BlockHeader",
    "BlockRequest",
    "Deployment",
    "DesiredMessage",
    "DesiredState",
    "DeviceState",
    "Event",
    "EventKind",
    "FeedbackReport",
    "InstallWindow",
    "KeyEntry",
    "Keyring",
    "LabelledOutcome",
    "LatencyHistogram",
    "ModelWindow",
    "Presence",
    "PresenceStatus",
    "Resources",
    "RunningModel",
    "RuntimeInfo",
    "SampleBatch",
    "TelemetryReport",
    "UpdateOutcome",
    "UpdateResult",
    "decode_block",
    "encode_block",
]

DeviceId = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9._-]{1,64}$"),
    AfterValidator(check_device_id),  # also refuses ids made of dots only
]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
ShortText = Annotated[str, StringConstraints(max_length=1024)]
TimeOfDay = Annotated[str, StringConstraints(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")]
AgentVersion = Annotated[
    str, StringConstraints(pattern=r"^[0-9][0-9A-Za-z.+!_-]{0,63}$")
]  # a PEP 440 version as a wheel names it ("0.2.0", "0.2.0rc1", "0.2.0+fix.1")

AGENT_WHEEL_MEDIA_TYPE = "application/vnd.edgefleet.agent+wheel"


class _OmitsAbsent(ContractModel):
    """A part whose optional fields named in ``OMIT_WHEN_ABSENT`` are left out of the
    payload when they are ``None``: fields added after a message first shipped, so the
    payloads that don't use them stay byte for byte what they were before."""

    OMIT_WHEN_ABSENT: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for name in self.OMIT_WHEN_ABSENT:
                if name in data and data[name] is None:
                    del data[name]
        return data


# ----------------------------------------------------------------------------- trust documents


class KeyEntry(ContractModel):
    """One online signing key listed by the root."""

    keyid: Sha256
    public_key: str = Field(description="base64 of the raw 32-byte Ed25519 public key")
    role: Literal["online"] = "online"

    @model_validator(mode="after")
    def _keyid_matches(self) -> KeyEntry:
        try:
            key = VerifyKey.from_base64(self.public_key)
        except ValueError as e:
            raise ValueError(str(e)) from e
        if key_id(key.raw) != self.keyid:
            raise ValueError("keyid is not the SHA-256 of the public key")
        return self

    def verify_key(self) -> VerifyKey:
        return VerifyKey.from_base64(self.public_key)


class Keyring(Message):
    """The root-signed list of online keys allowed to sign desired states.

    Devices accept a keyring only with a version at or above the one they hold, so
    rotating or revoking an online key needs no reflash.
    """

    SCHEMA: ClassVar[str] = "ef.keyring"
    MAX_BYTES: ClassVar[int] = 16 * 1024

    version: int = Field(ge=1, description="monotonic; devices refuse a lower one")
    issued_at: AwareDatetime
    expires_at: AwareDatetime
    threshold: int = Field(1, ge=1, le=8, description="distinct online keys needed on a manifest")
    keys: list[KeyEntry] = Field(min_length=1, max_length=16)

    @model_validator(mode="after")
    def _consistent(self) -> Keyring:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        if len({k.keyid for k in self.keys}) != len(self.keys):
            raise ValueError("a key is listed twice")
        if self.threshold > len(self.keys):
            raise ValueError("threshold is higher than the number of keys")
        return self

    def verify_keys(self) -> dict[str, VerifyKey]:
        return {k.keyid: k.verify_key() for k in self.keys}


class ArtifactRef(ContractModel):
    """A file the device must fetch, pinned by length and hash."""

    sha256: Sha256
    length: int = Field(gt=0, description="exact size in bytes; readers stop here")
    media_type: str = Field("application/vnd.edgefleet.bundle", max_length=128)
    url: str | None = Field(
        None, max_length=1024, description="optional HTTP path for range downloads"
    )


class InstallWindow(ContractModel):
    """A daily window, in UTC, inside which a device may change what it runs.

    ``start`` is inclusive and ``end`` exclusive, both ``HH:MM``; an ``end`` before
    ``start`` wraps midnight (``22:00``-``02:00``); the two are never equal. The device
    judges the window by its own clock.
    """

    model_config = ConfigDict(frozen=True)  # a value: hashable, compared by its times

    start: TimeOfDay
    end: TimeOfDay

    @model_validator(mode="after")
    def _not_empty(self) -> InstallWindow:
        if self.start == self.end:
            raise ValueError("start and end are the same: the window would be empty")
        return self

    def _minutes(self) -> tuple[int, int]:
        (h1, m1), (h2, m2) = (map(int, t.split(":")) for t in (self.start, self.end))
        return h1 * 60 + m1, h2 * 60 + m2

    def contains(self, moment: datetime) -> bool:
        """Whether ``moment`` (timezone-aware) falls inside the window."""
        if moment.tzinfo is None:
            raise ValueError("moment must be timezone-aware")
        utc = moment.astimezone(UTC)
        minute = utc.hour * 60 + utc.minute
        start, end = self._minutes()
        if start < end:
            return start <= minute < end
        return minute >= start or minute < end

    def next_opening(self, moment: datetime) -> datetime:
        """``moment`` itself when the window is open then, else the window's next start."""
        if self.contains(moment):
            return moment
        utc = moment.astimezone(UTC)
        start, _ = self._minutes()
        opening = utc.replace(hour=start // 60, minute=start % 60, second=0, microsecond=0)
        return opening if opening > utc else opening + timedelta(days=1)

    def __str__(self) -> str:
        return f"{self.start}-{self.end} UTC"


class Deployment(_OmitsAbsent):
    """One model version the device must run, in its variant for the device's profile.

    With an ``install_window`` the device fetches, verifies, self-tests and stages the
    artifact at once but activates it only inside the window (a ``staged`` event and
    update result say it waits); without one it activates as soon as it is ready. The
    field is left out of the payload when there is no window, so such payloads are
    byte for byte what they were before it existed. An agent that predates the field
    keeps it as an unknown field and activates at once.
    """

    OMIT_WHEN_ABSENT: ClassVar[tuple[str, ...]] = ("install_window",)

    kind: Literal["model"] = "model"
    model_name: Name
    model_version: int = Field(ge=1)
    target: Name = Field(description="the profile this variant was built for")
    artifact: ArtifactRef
    install_window: InstallWindow | None = Field(
        None, description="fetch and stage now, activate only inside this window; absent: at once"
    )


class AgentDeployment(_OmitsAbsent):
    """The version of the agent itself the device must run.

    The artifact is a pure-Python wheel of the ``edgefleet`` distribution
    (``media_type`` :data:`AGENT_WHEEL_MEDIA_TYPE`), pinned by length and sha256 like a
    model bundle. The device installs it beside the version it runs, switches to it
    atomically, and goes back by itself if the new version has not reported healthy
    within ``health_timeout_s``. With an ``install_window`` the switch waits for it.
    """

    OMIT_WHEN_ABSENT: ClassVar[tuple[str, ...]] = ("install_window",)

    kind: Literal["agent"] = "agent"
    version: AgentVersion
    artifact: ArtifactRef
    health_timeout_s: int = Field(
        300, ge=10, le=86_400, description="seconds the new version has to report healthy"
    )
    install_window: InstallWindow | None = Field(
        None, description="fetch and install now, switch only inside this window; absent: at once"
    )


class DesiredState(Message, _OmitsAbsent):
    """What one device should run. Signed by an online key; latest wins.

    ``agent`` names the agent version to run; absent, the device keeps the one it has.
    The field is left out of the payload when absent, so such payloads are byte for
    byte what they were before it existed.
    """

    SCHEMA: ClassVar[str] = "ef.desired-state"
    MAX_BYTES: ClassVar[int] = 32 * 1024
    OMIT_WHEN_ABSENT: ClassVar[tuple[str, ...]] = ("agent",)

    device_id: DeviceId
    manifest_version: int = Field(ge=1, description="strictly increasing per device")
    issued_at: AwareDatetime
    expires_at: AwareDatetime
    rollout_id: Name | None = None
    deployments: list[Deployment] = Field(default_factory=list, max_length=32)
    agent: AgentDeployment | None = Field(None, description="the agent version to run")

    @model_validator(mode="after")
    def _consistent(self) -> DesiredState:
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        names = [d.model_name for d in self.deployments]
        if len(set(names)) != len(names):
            raise ValueError("a model is deployed twice")
        return self


class DesiredMessage(Message):
    """The retained payload of ``…/desired``: the keyring and the desired state, both signed.

    Shipping the keyring with every desired state lets a device learn a rotated
    online key from the same message that first uses it.
    """

    SCHEMA: ClassVar[str] = "ef.desired"
    MAX_BYTES: ClassVar[int] = 96 * 1024

    keyring: Envelope = Field(description="Keyring, signed by the root key(s)")
    manifest: Envelope = Field(description="DesiredState, signed by online key(s)")


# ----------------------------------------------------------------------------- device reports


class RuntimeInfo(ContractModel):
    name: Literal["litert", "tflite-runtime", "onnxruntime"] | str = Field(max_length=64)
    version: str = Field(max_length=64)


class RunningModel(ContractModel):
    model_name: Name
    model_version: int = Field(ge=1)
    target: Name
    sha256: Sha256
    activated_at: AwareDatetime | None = None
    previous_version: int | None = Field(None, ge=1)


class UpdateOutcome(StrEnum):
    ACTIVATED = "activated"
    STAGED = "staged"
    REJECTED = "rejected"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


class UpdateResult(ContractModel):
    manifest_version: int = Field(ge=0)
    rollout_id: Name | None = None
    outcome: UpdateOutcome
    reason: str | None = Field(None, max_length=64, description="a RejectReason or failure code")
    detail: ShortText | None = None
    at: AwareDatetime


class AgentUpdateResult(ContractModel):
    """How the device's latest agent update ended (``rolled_back`` names the reason)."""

    manifest_version: int = Field(ge=0)
    rollout_id: Name | None = None
    version: AgentVersion = Field(description="the version the update installed")
    previous_version: AgentVersion | None = None
    outcome: UpdateOutcome
    reason: str | None = Field(None, max_length=64)
    detail: ShortText | None = None
    at: AwareDatetime


class DeviceState(Message, _OmitsAbsent):
    """What the device runs now (retained)."""

    SCHEMA: ClassVar[str] = "ef.device-state"
    MAX_BYTES: ClassVar[int] = 32 * 1024
    OMIT_WHEN_ABSENT: ClassVar[tuple[str, ...]] = ("agent_update",)

    device_id: DeviceId
    agent_version: str = Field(max_length=64)
    profile: Name
    arch: str = Field(max_length=32)
    runtime: RuntimeInfo
    manifest_version: int = Field(0, ge=0, description="last accepted; 0 before the first")
    keyring_version: int = Field(0, ge=0)
    models: list[RunningModel] = Field(default_factory=list, max_length=32)
    last_update: UpdateResult | None = None
    agent_update: AgentUpdateResult | None = Field(
        None, description="how the latest agent update ended; absent before the first"
    )
    reported_at: AwareDatetime


class PresenceStatus(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"


class Presence(Message):
    """``online`` when the device connects; ``offline`` is its Last Will (retained)."""

    SCHEMA: ClassVar[str] = "ef.presence"
    MAX_BYTES: ClassVar[int] = 1024

    device_id: DeviceId
    status: PresenceStatus
    session_started_at: AwareDatetime | None = Field(
        None, description="when the connection that set this status was opened"
    )


class EventKind(StrEnum):
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"
    VERIFIED = "verified"
    STAGED = "staged"
    ACTIVATED = "activated"
    REJECTED = "rejected"
    HEALTH_CHECK_PASSED = "health_check_passed"
    HEALTH_CHECK_FAILED = "health_check_failed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


class Event(Message, _OmitsAbsent):
    """One step of an update's life on a device."""

    SCHEMA: ClassVar[str] = "ef.event"
    MAX_BYTES: ClassVar[int] = 8 * 1024
    OMIT_WHEN_ABSENT: ClassVar[tuple[str, ...]] = ("agent_version",)

    device_id: DeviceId
    event_id: str = Field(pattern=r"^[0-9a-f]{32}$", description="uuid4 hex, for de-duplication")
    kind: EventKind
    at: AwareDatetime
    manifest_version: int | None = Field(None, ge=0)
    rollout_id: Name | None = None
    model_name: Name | None = None
    model_version: int | None = Field(None, ge=1)
    sha256: Sha256 | None = None
    reason: str | None = Field(None, max_length=64, description="a RejectReason or failure code")
    detail: ShortText | None = None
    agent_version: AgentVersion | None = Field(
        None, description="set on the events of an agent update: the version being installed"
    )


class LatencyHistogram(ContractModel):
    """Counts over :data:`shared.latency.LATENCY_BOUNDS_MS` plus one overflow bucket."""

    counts: list[int] = Field(min_length=N_LATENCY_BUCKETS, max_length=N_LATENCY_BUCKETS)

    @model_validator(mode="after")
    def _non_negative(self) -> LatencyHistogram:
        if min(self.counts) < 0:  # never empty: the length is fixed
            raise ValueError("latency counts must not be negative")
        return self

    @classmethod
    def empty(cls) -> LatencyHistogram:
        return cls(counts=[0] * N_LATENCY_BUCKETS)


class Resources(ContractModel):
    rss_bytes: int | None = Field(None, ge=0)
    cpu_seconds: float | None = Field(None, ge=0)
    disk_free_bytes: int | None = Field(None, ge=0)
    uptime_seconds: float | None = Field(None, ge=0)


class ModelWindow(ContractModel):
    """One model's share of a telemetry window."""

    model_name: Name
    model_version: int = Field(ge=1)
    target: Name
    inferences: int = Field(0, ge=0)
    errors: int = Field(0, ge=0)
    latency_ms: LatencyHistogram = Field(default_factory=LatencyHistogram.empty)
    drift: DriftSketch | None = None


class TelemetryReport(Message):
    """One window of a device's work. ``(device_id, seq)`` is unique: ingest it once."""

    SCHEMA: ClassVar[str] = "ef.telemetry"
    MAX_BYTES: ClassVar[int] = 512 * 1024

    device_id: DeviceId
    seq: int = Field(ge=0, description="strictly increasing across restarts")
    window_start: AwareDatetime
    window_end: AwareDatetime
    models: list[ModelWindow] = Field(default_factory=list, max_length=32)
    resources: Resources = Field(default_factory=Resources)
    dropped_reports: int = Field(
        0, ge=0, description="reports the outbox dropped (oldest first) since the last one sent"
    )

    @model_validator(mode="after")
    def _window(self) -> TelemetryReport:
        if self.window_end < self.window_start:
            raise ValueError("window_end is before window_start")
        return self


# ----------------------------------------------------------------------------- artifact blocks

MAX_BLOCK_SIZE = 256 * 1024
MAX_BLOCKS_PER_REQUEST = 64


class BlockRequest(Message):
    """Ask for ``count`` blocks of ``block_size`` bytes from ``offset`` of an artifact."""

    SCHEMA: ClassVar[str] = "ef.block-request"
    MAX_BYTES: ClassVar[int] = 1024

    device_id: DeviceId
    request_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    sha256: Sha256
    offset: int = Field(ge=0)
    block_size: int = Field(gt=0, le=MAX_BLOCK_SIZE)
    count: int = Field(1, gt=0, le=MAX_BLOCKS_PER_REQUEST)


class BlockHeader(Message):
    """The JSON header of one ``artifact/blk`` frame; ``error`` set means no data."""

    SCHEMA: ClassVar[str] = "ef.block"
    MAX_BYTES: ClassVar[int] = 2048

    request_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    sha256: Sha256
    offset: int = Field(ge=0)
    length: int = Field(ge=0, le=MAX_BLOCK_SIZE)
    total_length: int = Field(ge=0)
    block_sha256: Sha256 | None = None
    error: str | None = Field(None, max_length=256)

    @model_validator(mode="after")
    def _consistent(self) -> BlockHeader:
        if self.error is not None:
            if self.length != 0:
                raise ValueError("an error block carries no data")
            return self  # echoes the request's offset, which may be out of range
        if self.block_sha256 is None:
            raise ValueError("a block without error needs block_sha256")
        if self.offset + self.length > self.total_length:
            raise ValueError("block reaches past the artifact's total length")
        return self


_FRAME_MAGIC = b"EFB1"
_FRAME_HEAD = struct.Struct(">4sI")


def encode_block(header: BlockHeader, data: bytes = b"") -> bytes:
    """Frame a block: ``"EFB1"``, header length (uint32 big-endian), header JSON, data."""
    if len(data) != header.length:
        raise MessageError(f"block data is {len(data)} bytes, header says {header.length}")
    head = header.to_bytes()
    return _FRAME_HEAD.pack(_FRAME_MAGIC, len(head)) + head + data


def decode_block(frame: bytes | bytearray | memoryview) -> tuple[BlockHeader, bytes]:
    """Split and check a block frame: the data length and block hash must match its header."""
    raw = bytes(frame)
    limit = _FRAME_HEAD.size + BlockHeader.MAX_BYTES + MAX_BLOCK_SIZE
    if len(raw) > limit:
        raise PayloadTooLargeError(BlockHeader.SCHEMA, len(raw), limit)
    if len(raw) < _FRAME_HEAD.size:
        raise MessageError("block frame is shorter than its fixed header")
    magic, head_len = _FRAME_HEAD.unpack_from(raw)
    if magic != _FRAME_MAGIC:
        raise MessageError(f"block frame starts with {magic!r}, expected {_FRAME_MAGIC!r}")
    end = _FRAME_HEAD.size + head_len
    if head_len > BlockHeader.MAX_BYTES or end > len(raw):
        raise MessageError("block frame header length is out of range")
    header = BlockHeader.from_bytes(raw[_FRAME_HEAD.size : end])
    data = raw[end:]
    if len(data) != header.length:
        raise MessageError(f"block frame carries {len(data)} bytes, header says {header.length}")
    if header.block_sha256 is not None and hashlib.sha256(data).hexdigest() != header.block_sha256:
        raise MessageError("block data does not match its block_sha256")
    return header, data


# ----------------------------------------------------------------------------- feedback and samples

PredictionId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,64}$")]
LabelName = Annotated[str, StringConstraints(min_length=1, max_length=128)]

MAX_OUTCOMES_PER_REPORT = 256
"""Labelled outcomes one :class:`FeedbackReport` may carry."""
MAX_SAMPLE_ROWS = 4096
"""Rows one :class:`SampleBatch` may carry (its byte limit usually binds first)."""
MAX_SAMPLE_FEATURES = 65_536
"""Values per sample row: the most features a dataset may have."""


class LabelledOutcome(ContractModel):
    """The ground truth for one prediction a device served, and what the model answered."""

    prediction_id: PredictionId = Field(
        description="the id the device's local API gave the prediction; unique per device"
    )
    model_name: Name
    model_version: int = Field(ge=1)
    predicted_label: LabelName = Field(
        description="the label the model answered (its class index as text where it names none)"
    )
    true_label: LabelName = Field(description="the correct label, from the same label set")
    predicted_at: AwareDatetime | None = Field(None, description="when the prediction was served")
    labelled_at: AwareDatetime = Field(description="when the label was given")


class FeedbackReport(Message):
    """Labelled outcomes of a device's predictions, forwarded through its outbox.

    Each outcome is ingested once per ``(device_id, prediction_id)``: the first label a
    prediction gets counts; a redelivered report changes nothing.
    """

    SCHEMA: ClassVar[str] = "ef.feedback"
    MAX_BYTES: ClassVar[int] = 128 * 1024

    device_id: DeviceId
    outcomes: list[LabelledOutcome] = Field(min_length=1, max_length=MAX_OUTCOMES_PER_REPORT)

    @model_validator(mode="after")
    def _unique_predictions(self) -> FeedbackReport:
        ids = [o.prediction_id for o in self.outcomes]
        if len(set(ids)) != len(ids):
            raise ValueError("a prediction_id appears twice in one report")
        return self


class SampleBatch(Message):
    """Raw input rows a device captured (opt-in) from one model's share of one telemetry
    window -- all of them, or part ``part`` of ``parts`` when they did not fit one payload.

    Ingested once per ``(device_id, seq, model_name, part)``. ``prediction_ids[i]`` is the
    id row ``i`` was answered under (None where it had none), so the row can be joined
    with a label posted for that prediction later.
    """

    SCHEMA: ClassVar[str] = "ef.samples"
    MAX_BYTES: ClassVar[int] = 256 * 1024

    device_id: DeviceId
    seq: int = Field(ge=0, description="the seq of the telemetry report of the window")
    part: int = Field(0, ge=0)
    parts: int = Field(1, ge=1, le=1024)
    model_name: Name
    model_version: int = Field(ge=1)
    target: Name
    window_end: AwareDatetime
    rows: list[list[float]] = Field(
        min_length=1, max_length=MAX_SAMPLE_ROWS, description="raw rows, before preprocessing"
    )
    prediction_ids: list[PredictionId | None] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> SampleBatch:
        if self.part >= self.parts:
            raise ValueError(f"part {self.part} is not below parts ({self.parts})")
        width = len(self.rows[0])
        if not 1 <= width <= MAX_SAMPLE_FEATURES:
            raise ValueError(f"a row must hold 1 to {MAX_SAMPLE_FEATURES} values")
        if any(len(row) != width for row in self.rows):
            raise ValueError("every row must hold the same number of values")
        if self.prediction_ids is not None and len(self.prediction_ids) != len(self.rows):
            raise ValueError("prediction_ids must hold one entry per row")
        return self
