"""Print ``docs/protocol.md``, the wire protocol reference, generated from ``shared/``.

Run ``make docs`` (or ``python docs/generate_protocol.py > docs/protocol.md``).
Every table, schema, constant and example below is computed from the code of the
wire contract, so the document cannot drift from it; ``tests/test_protocol_doc.py``
fails when the committed file differs from what this script prints.

The output is deterministic: example keys come from fixed seeds (Ed25519
signatures are deterministic), timestamps are fixed, and nothing reads a clock.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import re
import struct
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import shared
from shared import drift
from shared.bundle import (
    _BLOCK,
    DEFAULT_MAX_BUNDLE_BYTES,
    MANIFEST_MEMBER,
    MODEL_MEMBERS,
    BundleManifest,
    FileRef,
    OpRequirement,
    SelfTest,
    TensorSpec,
    _header,
    build_bundle,
)
from shared.drift import (
    CONFIDENCE_BINS,
    PSI_EPSILON,
    DriftAccumulator,
    DriftReference,
    FeatureReference,
    Moments,
    PredictionReference,
)
from shared.errors import RejectReason, VerificationError
from shared.integrity import sha256_hex
from shared.latency import LATENCY_BOUNDS_MS, N_LATENCY_BUCKETS, latency_counts
from shared.messages import (
    _FRAME_HEAD,
    _FRAME_MAGIC,
    AGENT_WHEEL_MEDIA_TYPE,
    MAX_BLOCK_SIZE,
    MAX_BLOCKS_PER_REQUEST,
    ArtifactRef,
    BlockHeader,
    BlockRequest,
    Deployment,
    DesiredMessage,
    DesiredState,
    DeviceState,
    Event,
    EventKind,
    FeedbackReport,
    KeyEntry,
    Keyring,
    LabelledOutcome,
    LatencyHistogram,
    ModelWindow,
    Presence,
    PresenceStatus,
    Resources,
    RunningModel,
    RuntimeInfo,
    SampleBatch,
    TelemetryReport,
    UpdateOutcome,
    UpdateResult,
    encode_block,
)
from shared.model import Message
from shared.preprocessing import Clip, Reshape, Scale, Standardize
from shared.signing import (
    Envelope,
    PayloadType,
    SigningKey,
    pae,
    sign_envelope,
    verify_envelope,
)
from shared.topics import (
    _DEVICE_ID,
    _SHARE_GROUP,
    CHANNELS,
    PREFIX,
    Channel,
    device_filter,
    device_topic,
    fleet_filter,
)
from shared.trust import TrustState

__all__ = [
    "EXAMPLE_DEVICE_ID",
    "EXAMPLE_NOW",
    "MESSAGE_CLASSES",
    "example_bundle",
    "example_online_key",
    "example_root_key",
    "examples",
    "render",
]

_M = TypeVar("_M", bound=Message)

# ----------------------------------------------------------------------------- example data

EXAMPLE_DEVICE_ID = "press-line2-cam07"
EXAMPLE_ROOT_LABEL = b"example-root"
EXAMPLE_ONLINE_LABEL = b"example-online-1"

KEYRING_ISSUED_AT = datetime(2026, 11, 1, 0, 0, tzinfo=UTC)
KEYRING_EXPIRES_AT = datetime(2027, 11, 1, 0, 0, tzinfo=UTC)
DESIRED_ISSUED_AT = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
DESIRED_EXPIRES_AT = DESIRED_ISSUED_AT + timedelta(days=7)
EXAMPLE_NOW = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
"""A moment inside the validity of every example document (for tests)."""

# Placeholder bytes stand in for a real .tflite flatbuffer (whose bytes 4..7 read "TFL3").
EXAMPLE_MODEL = b"\x1c\x00\x00\x00TFL3" + bytes(range(256)) * 4

MESSAGE_CLASSES: tuple[type[Message], ...] = (
    Keyring,
    DesiredState,
    DesiredMessage,
    DeviceState,
    Presence,
    Event,
    TelemetryReport,
    BlockRequest,
    BlockHeader,
    FeedbackReport,
    SampleBatch,
    BundleManifest,
)
"""Every top-level message of the contract, in the order the document presents them."""

_CARRIED_BY: dict[type[Message], Channel | str] = {
    Keyring: "inside the `keyring` envelope of a DesiredMessage (not published on its own)",
    DesiredState: "inside the `manifest` envelope of a DesiredMessage (not published on its own)",
    DesiredMessage: Channel.DESIRED,
    DeviceState: Channel.STATE,
    Presence: Channel.PRESENCE,
    Event: Channel.EVENTS,
    TelemetryReport: Channel.TELEMETRY,
    BlockRequest: Channel.ARTIFACT_REQUEST,
    BlockHeader: Channel.ARTIFACT_BLOCK,
    FeedbackReport: Channel.FEEDBACK,
    SampleBatch: Channel.SAMPLES,
    BundleManifest: f"inside `{MANIFEST_MEMBER}` of a model bundle (never on MQTT)",
}

_SIGNED_AS: dict[type[Message], str] = {
    Keyring: "KEYRING",
    DesiredState: "DESIRED_STATE",
    BundleManifest: "BUNDLE",
}


def _key(label: bytes) -> SigningKey:
    return SigningKey.from_seed(hashlib.sha256(label).digest())


def example_root_key() -> SigningKey:
    """The example root key: seed = SHA-256 of ``b"example-root"``. Never use it for real."""
    return _key(EXAMPLE_ROOT_LABEL)


def example_online_key() -> SigningKey:
    """The example online key: seed = SHA-256 of ``b"example-online-1"``."""
    return _key(EXAMPLE_ONLINE_LABEL)


def _drift_reference() -> DriftReference:
    return DriftReference(
        features=[
            FeatureReference(
                name="temperature_c",
                edges=[18.0, 20.0, 22.0, 24.0, 26.0],
                counts=[3, 250, 240, 260, 245, 2, 0],
                moments=Moments(n=1000, mean=22.0, m2=4012.5, min=17.25, max=26.5),
            ),
            FeatureReference(
                name="vibration_rms",
                edges=[0.0, 0.5, 1.0, 2.0],
                counts=[0, 400, 350, 248, 2, 0],
                moments=Moments(n=1000, mean=0.75, m2=250.0, min=0.0, max=2.75),
            ),
        ],
        predictions=PredictionReference(
            class_counts=[900, 100],
            confidence_counts=[0, 0, 0, 0, 0, 40, 60, 100, 200, 600],
        ),
    )


def _bundle_manifest() -> BundleManifest:
    return BundleManifest(
        model_name="vibration-anomaly",
        model_version=4,
        target="edge-arm64-litert",
        runtime="litert",
        min_runtime_version="2.3",
        format="tflite",
        task="classification",
        model_file=FileRef(
            name=MODEL_MEMBERS["tflite"],
            sha256=sha256_hex(EXAMPLE_MODEL),
            length=len(EXAMPLE_MODEL),
        ),
        inputs=[
            TensorSpec(
                name="serving_default_features:0",
                dtype="int8",
                shape=[-1, 2],
                quantization={"scale": 0.03125, "zero_point": -4},
            )
        ],
        outputs=[TensorSpec(name="StatefulPartitionedCall:0", dtype="float32", shape=[-1, 2])],
        feature_names=["temperature_c", "vibration_rms"],
        labels=["normal", "anomaly"],
        preprocessing=[
            Clip(min=-40.0, max=125.0),
            Standardize(mean=[22.0, 0.75], std=[2.0, 0.5]),
        ],
        metrics={
            "float": {"accuracy": 0.9625, "f1": 0.875},
            "quantized": {"accuracy": 0.95, "f1": 0.859375},
        },
        drift_reference=_drift_reference(),
        self_tests=[
            SelfTest(input=[[22.0, 0.75]], expected=[[0.96875, 0.03125]], atol=0.0625),
        ],
        ops=[
            OpRequirement(name="FULLY_CONNECTED", version=12),
            OpRequirement(name="SOFTMAX", version=3),
        ],
        created_at=datetime(2026, 11, 28, 16, 30, tzinfo=UTC),
    )


@functools.cache
def example_bundle() -> bytes:
    """The example bundle file, signed by the example online key."""
    return build_bundle(_bundle_manifest(), EXAMPLE_MODEL, [example_online_key()])


def _telemetry(reference: DriftReference, deployment: Deployment) -> TelemetryReport:
    nan = float("nan")
    inputs = [
        [17.5, 0.25],
        [21.0, 0.75],
        [22.5, nan],
        [23.0, 1.5],
        [25.5, 2.5],
        [24.0, 0.5],
        [19.5, 1.0],
        [26.0, 0.5],
    ]
    probabilities = [
        [0.875, 0.125],
        [0.75, 0.25],
        [0.5, 0.5],
        [0.25, 0.75],
        [0.0625, 0.9375],
        [0.9375, 0.0625],
        [0.625, 0.375],
        [1.0, 0.0],
    ]
    accumulator = DriftAccumulator(reference)
    accumulator.update(inputs, probabilities=probabilities)
    latencies = [0.4, 0.45, 0.5, 0.52, 0.61, 0.7, 0.75, 2.9]
    return TelemetryReport(
        device_id=EXAMPLE_DEVICE_ID,
        seq=1284,
        window_start=datetime(2026, 11, 30, 8, 0, tzinfo=UTC),
        window_end=datetime(2026, 11, 30, 8, 5, tzinfo=UTC),
        models=[
            ModelWindow(
                model_name=deployment.model_name,
                model_version=deployment.model_version,
                target=deployment.target,
                inferences=len(inputs),
                errors=0,
                latency_ms=LatencyHistogram(counts=latency_counts(latencies).tolist()),
                drift=accumulator.sketch(),
            )
        ],
        resources=Resources(
            rss_bytes=48_234_496,
            cpu_seconds=12.5,
            disk_free_bytes=1_073_741_824,
            uptime_seconds=86_400.0,
        ),
        dropped_reports=0,
    )


@functools.cache
def examples() -> dict[str, Message]:
    """Every example payload of the document, by name; each is a validated message."""
    root, online = example_root_key(), example_online_key()
    manifest = _bundle_manifest()
    bundle = example_bundle()
    bundle_sha, bundle_len = sha256_hex(bundle), len(bundle)
    keyring = Keyring(
        version=3,
        issued_at=KEYRING_ISSUED_AT,
        expires_at=KEYRING_EXPIRES_AT,
        threshold=1,
        keys=[KeyEntry(keyid=online.keyid, public_key=online.public.to_base64())],
    )
    deployment = Deployment(
        model_name=manifest.model_name,
        model_version=manifest.model_version,
        target=manifest.target,
        artifact=ArtifactRef(sha256=bundle_sha, length=bundle_len),
    )
    desired_state = DesiredState(
        device_id=EXAMPLE_DEVICE_ID,
        manifest_version=17,
        issued_at=DESIRED_ISSUED_AT,
        expires_at=DESIRED_EXPIRES_AT,
        rollout_id="ro-2026-11-29-canary",
        deployments=[deployment],
    )
    desired = DesiredMessage(
        keyring=sign_envelope(keyring.to_bytes(), PayloadType.KEYRING, [root]),
        manifest=sign_envelope(desired_state.to_bytes(), PayloadType.DESIRED_STATE, [online]),
    )
    activated_at = datetime(2026, 11, 29, 12, 3, 41, tzinfo=UTC)
    session = datetime(2026, 11, 29, 6, 12, 5, tzinfo=UTC)
    state = DeviceState(
        device_id=EXAMPLE_DEVICE_ID,
        agent_version="0.1.0",
        profile="edge-arm64-litert",
        arch="aarch64",
        runtime=RuntimeInfo(name="litert", version="2.3.0"),
        manifest_version=desired_state.manifest_version,
        keyring_version=keyring.version,
        models=[
            RunningModel(
                model_name=manifest.model_name,
                model_version=manifest.model_version,
                target=manifest.target,
                sha256=bundle_sha,
                activated_at=activated_at,
                previous_version=3,
            )
        ],
        last_update=UpdateResult(
            manifest_version=desired_state.manifest_version,
            rollout_id=desired_state.rollout_id,
            outcome=UpdateOutcome.ACTIVATED,
            at=activated_at,
        ),
        reported_at=activated_at + timedelta(seconds=1),
    )
    block_size = 1024
    first = bundle[:block_size]
    return {
        "keyring": keyring,
        "desired_state": desired_state,
        "desired": desired,
        "state": state,
        "presence_online": Presence(
            device_id=EXAMPLE_DEVICE_ID, status=PresenceStatus.ONLINE, session_started_at=session
        ),
        "presence_offline": Presence(
            device_id=EXAMPLE_DEVICE_ID, status=PresenceStatus.OFFLINE, session_started_at=session
        ),
        "event_activated": Event(
            device_id=EXAMPLE_DEVICE_ID,
            event_id="6f1c0b9e4d2a4f4e9a7d3c2b1a0f9e8d",
            kind=EventKind.ACTIVATED,
            at=activated_at,
            manifest_version=desired_state.manifest_version,
            rollout_id=desired_state.rollout_id,
            model_name=manifest.model_name,
            model_version=manifest.model_version,
            sha256=bundle_sha,
        ),
        "event_rejected": Event(
            device_id=EXAMPLE_DEVICE_ID,
            event_id="0d4e5f6a7b8c4d9e8f0a1b2c3d4e5f60",
            kind=EventKind.REJECTED,
            at=datetime(2026, 12, 7, 12, 0, 2, tzinfo=UTC),
            manifest_version=desired_state.manifest_version,
            rollout_id=desired_state.rollout_id,
            reason=RejectReason.EXPIRED.value,
            detail=f"manifest v{desired_state.manifest_version} expired at {DESIRED_EXPIRES_AT}",
        ),
        "telemetry": _telemetry(manifest.drift_reference or _drift_reference(), deployment),
        "block_request": BlockRequest(
            device_id=EXAMPLE_DEVICE_ID,
            request_id="dl-17-0",
            sha256=bundle_sha,
            offset=0,
            block_size=block_size,
            count=4,
        ),
        "block_header": BlockHeader(
            request_id="dl-17-0",
            sha256=bundle_sha,
            offset=0,
            length=len(first),
            total_length=bundle_len,
            block_sha256=sha256_hex(first),
        ),
        "block_error": BlockHeader(
            request_id="dl-17-9",
            sha256=sha256_hex(b"an artifact this server does not hold"),
            offset=0,
            length=0,
            total_length=0,
            error="unknown artifact",
        ),
        "feedback": FeedbackReport(
            device_id=EXAMPLE_DEVICE_ID,
            outcomes=[
                LabelledOutcome(
                    prediction_id="3f9a1c07be52-18211",
                    model_name=manifest.model_name,
                    model_version=manifest.model_version,
                    predicted_label="normal",
                    true_label="anomaly",
                    predicted_at=datetime(2026, 11, 30, 8, 2, 11, tzinfo=UTC),
                    labelled_at=datetime(2026, 11, 30, 8, 40, tzinfo=UTC),
                )
            ],
        ),
        "samples": SampleBatch(
            device_id=EXAMPLE_DEVICE_ID,
            seq=1284,
            model_name=manifest.model_name,
            model_version=manifest.model_version,
            target=manifest.target,
            window_end=datetime(2026, 11, 30, 8, 5, tzinfo=UTC),
            rows=[[21.0, 0.75], [25.5, 2.5]],
            prediction_ids=["3f9a1c07be52-18211", None],
        ),
        "bundle_manifest": manifest,
    }


def _example(name: str, cls: type[_M]) -> _M:
    message = examples()[name]
    assert isinstance(message, cls)
    return message


# ----------------------------------------------------------------------------- formatting


def _pretty(value: Any, indent: int = 0, width: int = 96) -> str:
    """JSON with two-space indentation, short arrays of scalars kept on one line."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [
            f"{pad}  {json.dumps(k, ensure_ascii=False)}: {_pretty(v, indent + 2, width)}"
            for k, v in value.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(value, list):
        if not value:
            return "[]"
        if all(not isinstance(v, dict | list) for v in value):
            texts = [json.dumps(v, ensure_ascii=False, allow_nan=False) for v in value]
            one_line = "[" + ", ".join(texts) + "]"
            if len(one_line) + indent + 8 <= width:
                return one_line
            lines: list[str] = []
            current = ""
            for text in texts:
                candidate = f"{current}, {text}" if current else text
                if current and len(candidate) + indent + 3 > width:
                    lines.append(current + ",")
                    current = text
                else:
                    current = candidate
            lines.append(current)
            return "[\n" + "\n".join(f"{pad}  {line}" for line in lines) + "\n" + pad + "]"
        items = [f"{pad}  {_pretty(v, indent + 2, width)}" for v in value]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def _json_block(value: Any) -> list[str]:
    return ["```json", _pretty(value), "```"]


def _schema_block(cls: type[Any]) -> list[str]:
    schema = cls.model_json_schema(by_alias=True)
    return ["```json", json.dumps(schema, indent=2, sort_keys=True), "```"]


def _hexdump(data: bytes, start: int = 0) -> list[str]:
    lines = []
    for pos in range(0, len(data), 16):
        row = data[pos : pos + 16]
        hex_part = " ".join(f"{b:02x}" for b in row[:8])
        if len(row) > 8:
            hex_part += "  " + " ".join(f"{b:02x}" for b in row[8:])
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{start + pos:08x}  {hex_part:<49}|{text}|")
    return lines


def _c_literal(data: bytes) -> str:
    out = []
    for b in data:
        if b == 0:
            out.append("\\0")
        elif b == 0x5C:
            out.append("\\\\")
        elif b == 0x22:
            out.append('\\"')
        elif 32 <= b < 127:
            out.append(chr(b))
        else:
            out.append(f"\\x{b:02x}")
    return '"' + "".join(out) + '"'


def _field_bytes(data: bytes) -> str:
    """A tar header field as a C literal, trailing NUL runs written as a count."""
    stripped = data.rstrip(b"\0")
    zeros = len(data) - len(stripped)
    if not stripped:
        return f"{zeros} × NUL"
    if zeros <= 1:
        return f"`{_c_literal(data)}`"
    return f"`{_c_literal(stripped)}` + {zeros} × NUL"


def _md_doc(obj: Any) -> str:
    """A docstring with its reST markup turned into Markdown."""
    text = inspect.getdoc(obj) or ""
    text = re.sub(r":[a-z]+:`~?([\w.]+)`", lambda m: f"`{m.group(1).split('.')[-1]}`", text)
    return re.sub(r"``(.+?)``", r"`\1`", text)


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Iterable[str], rows: Iterable[Iterable[object]]) -> list[str]:
    head = list(header)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _size(n: int) -> str:
    if n % (1024 * 1024) == 0:
        return f"{n} bytes ({n // (1024 * 1024)} MiB)"
    if n % 1024 == 0:
        return f"{n} bytes ({n // 1024} KiB)"
    return f"{n} bytes"


def _topic_pattern(channel: Channel) -> str:
    return f"{PREFIX}/dev/{{device_id}}/{channel.value}"


def _anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


# ----------------------------------------------------------------------------- sections


def _intro() -> list[str]:
    return [
        "<!-- Generated by docs/generate_protocol.py from shared/. Do not edit by hand: -->",
        "<!-- run `make docs` after changing the wire contract. -->",
        "",
        f"# edgefleet wire protocol (`{shared.PROTOCOL_VERSION}`)",
        "",
        "This is the reference for everything a device and the edgefleet server exchange:",
        "MQTT topics, JSON messages, signed envelopes, the rules a device applies before it",
        "trusts a deployment, the block transfer of artifacts, the model bundle file, and the",
        "numbers inside telemetry (drift sketches and latency histograms). It is generated",
        "from the Python package `shared/`, which both the agent and the server import, and it",
        "is meant to be enough to write a compatible device client in another language.",
        "",
        "Every example in this document was built as a real message object and validated by",
        "the same code the server runs; the signatures were made with the example keys listed",
        "under [Signing](#signing) and verify. The example keys are derived from public",
        "strings: **never use them outside tests**.",
        "",
        "Contents:",
        "",
        *[
            f"{i}. [{title}](#{_anchor(title)})"
            for i, title in enumerate(
                [
                    "Overview",
                    "Topics",
                    "Encoding rules",
                    "Messages",
                    "Signing",
                    "Acceptance rules on the device",
                    "Artifact block transfer",
                    "Model bundle",
                    "Preprocessing",
                    "Drift sketches",
                    "Latency histograms",
                ],
                start=1,
            )
        ],
        "",
    ]


def _overview() -> list[str]:
    device = EXAMPLE_DEVICE_ID
    return [
        "## Overview",
        "",
        "- **Transport.** MQTT 3.1.1 is the baseline: a client that speaks only 3.1.1 can",
        "  do everything in this document, and nothing depends on MQTT 5 features.",
        f"- **Topic prefix.** Every topic starts with `{PREFIX}/`. A device's topics all live",
        f"  under `{PREFIX}/dev/{{device_id}}/`; the last level(s) name the *channel*.",
        "- **Device id.** 1 to 64 characters, each a letter, a digit, `.`, `_` or `-`",
        f"  (regular expression `{_DEVICE_ID.pattern}`, matched in full), and not made of dots",
        "  alone. The restriction is what makes ids safe everywhere they end up: the MQTT",
        "  wildcards `+` and `#`, the level separator `/` and the `$` of broker system topics",
        "  can never appear in a topic built from an id, ACL patterns cannot be widened by an",
        "  id, and an id can be used as a file or directory name without path tricks such",
        f"  as `.` or `..`. The examples use the id `{device}`.",
        "- **Quality of service.** Every channel is published with QoS 1 (at least once),",
        "  so every receiver must tolerate duplicates; each message kind below says how it",
        "  is de-duplicated. No channel uses QoS 0 or 2.",
        "- **Retained messages.** The channels that describe a *current state* are retained",
        "  (`desired`, `state`, `presence`): a client that subscribes receives the latest",
        "  value at once. The desired state is *latest wins*, never a queue: a newer one",
        "  replaces the older one, and a device that was offline sees only the newest.",
        "- **Last Will.** A device connects with a Last Will on its `presence` topic:",
        "  a `Presence` message with status `offline`, QoS 1, retained. After connecting it",
        "  publishes `online` (retained) on the same topic.",
        "- **Sessions.** Devices should connect with `clean_session = false` and a stable",
        "  client id so that QoS 1 messages for them (artifact blocks, a new desired state)",
        "  survive short disconnects. MQTT queues are not durable storage: a device keeps",
        "  its own outbox for telemetry and events it could not publish yet.",
        "- **Identity.** Messages from a device carry its `device_id`; the server drops a",
        "  message whose `device_id` differs from the id in its topic, and the broker ACL",
        "  lets a device touch only its own topics (see below).",
        "",
    ]


def _topics() -> list[str]:
    device = EXAMPLE_DEVICE_ID
    rows = []
    for channel, spec in CHANNELS.items():
        rows.append(
            [
                f"`{_topic_pattern(channel)}`",
                spec.direction.value,
                spec.qos,
                "yes" if spec.retain else "no",
                spec.summary,
            ]
        )
    lines = [
        "## Topics",
        "",
        "One row per channel (from `shared.topics.CHANNELS`). *Direction* says who publishes:",
        "the other side subscribes.",
        "",
        *_table(["topic", "direction", "QoS", "retain", "what it carries"], rows),
        "",
        f"Example: the telemetry topic of `{device}` is",
        f"`{device_topic(device, Channel.TELEMETRY)}`.",
        "",
        "**Device subscriptions.** A device subscribes (QoS 1) to the channels published",
        "towards it:",
        "",
    ]
    for channel, spec in CHANNELS.items():
        if spec.direction.value == "server->device":
            lines.append(f"- `{device_topic(device, channel)}`")
    lines += [
        "",
        "**Broker ACL.** A device may publish and subscribe only below its own id. The one",
        "filter that covers all of a device's topics is",
        "",
        "```text",
        device_filter(device),
        "```",
        "",
        "and the broker's ACL grants each device exactly that filter for its own id (for",
        f"Mosquitto: `pattern readwrite {PREFIX}/dev/%c/#` with the client id set to the",
        "device id, or `%u` with the username set to it).",
        "",
        "**Server subscriptions.** The server subscribes to each device-to-server channel of",
        "the whole fleet with a single-level wildcard, for example:",
        "",
        "```text",
        *[
            fleet_filter(channel)
            for channel, spec in CHANNELS.items()
            if spec.direction.value == "device->server"
        ],
        "```",
        "",
        "With several ingestion workers it uses MQTT shared subscriptions instead, so that",
        "the broker hands each message to exactly one member of the group:",
        "",
        "```text",
        fleet_filter(Channel.TELEMETRY, share_group="ingest"),
        "```",
        "",
        "that is `$share/{group}/` followed by the plain filter. A group name is 1 to 32",
        f"characters matching `{_SHARE_GROUP.pattern}`. Mosquitto and EMQX offer shared",
        "subscriptions to MQTT 3.1.1 clients too. Devices never use shared subscriptions.",
        "",
    ]
    return lines


def _encoding() -> list[str]:
    rows = [
        [
            f"`{cls.SCHEMA}`",
            f"[{cls.__name__}](#{cls.__name__.lower()})",
            cls.SCHEMA_VERSION,
            _size(cls.MAX_BYTES),
        ]
        for cls in MESSAGE_CLASSES
    ]
    presence = examples()["presence_online"]
    return [
        "## Encoding rules",
        "",
        "These hold for every JSON message (they are enforced by `shared.model.Message`):",
        "",
        "- **Compact UTF-8 JSON.** A payload is one JSON object encoded as UTF-8 without a",
        "  byte order mark. Writers emit it compactly (no whitespace between tokens) and do",
        "  not escape non-ASCII characters; readers accept any valid JSON spacing.",
        "- **Schema tag.** Every message carries `schema` (its name, a constant per message",
        "  kind) and `schema_version` (the major version, a positive integer, currently 1",
        "  for all). A reader refuses a message with another `schema` and one whose",
        "  `schema_version` is newer than it understands; `schema_version` must be a JSON",
        '  integer (`1`, not `1.0` or `"1"`). Writers always send both fields, first.',
        "- **Unknown fields are kept.** A field a reader does not know is not an error: it",
        "  is kept, and written back unchanged if the reader re-encodes the message (every",
        "  nested object too). This is how newer peers add fields within one major version.",
        "  A C client that only reads may simply ignore unknown fields; one that re-publishes",
        "  a message it received must carry them over.",
        "- **Size limit first.** Each message kind has a maximum encoded size (`MAX_BYTES`,",
        "  table below). A reader compares the payload's byte length with it *before*",
        "  parsing and refuses larger payloads unparsed; writers refuse to produce them.",
        "- **Timestamps** are ISO 8601 / RFC 3339 strings *with* a UTC offset, such as",
        '  `"2026-11-29T12:00:00Z"` or `"2026-11-29T13:00:00+01:00"`. A timestamp without',
        "  offset is invalid. Writers send UTC with the `Z` suffix.",
        "- **Numbers.** NaN and the infinities are not JSON and are never valid, in any",
        "  field. Integer fields take JSON integers. The contract puts no upper bound on",
        "  counters and versions; a C client should hold them as signed 64-bit integers and",
        "  treat larger values as malformed.",
        "- **Optional fields** are written as `null` when absent; readers treat a missing",
        "  optional field and `null` alike, and apply the defaults shown in the schemas.",
        "- **Keys.** Key order carries no meaning. A key appears at most once per object:",
        "  readers refuse a payload with a repeated key, since parsers disagree on which",
        "  occurrence wins and a signed document must read the same everywhere.",
        "- **`schema` and `schema_version`** are required in every payload; a reader",
        "  refuses a payload without them.",
        "- **Extensible enumerations.** Reason codes (`reason` fields) are short strings;",
        "  a reader must accept codes it does not know and treat them as opaque text.",
        "",
        "The same presence message, as a reader sees it on the wire:",
        "",
        "```json",
        presence.to_bytes().decode("utf-8"),
        "```",
        "",
        *_table(["schema", "message", "schema_version", "MAX_BYTES"], rows),
        "",
        "The JSON Schemas below are produced by pydantic (draft 2020-12). They add",
        "`x-max-bytes` (the size limit), and `schema` as a `const`: what a writer must send.",
        "",
    ]


def _message_section(cls: type[Message], example_names: list[str]) -> list[str]:
    ex = examples()
    carried = _CARRIED_BY[cls]
    if isinstance(carried, Channel):
        spec = CHANNELS[carried]
        where = (
            f"`{_topic_pattern(carried)}` ({spec.direction.value}, QoS {spec.qos}, "
            f"{'retained' if spec.retain else 'not retained'})"
        )
        if cls is BlockHeader:
            where += ", as the header of a binary frame (see [below](#artifact-block-transfer))"
    else:
        where = carried
    lines = [
        f"### {cls.__name__}",
        "",
        _md_doc(cls),
        "",
        f"- schema: `{cls.SCHEMA}`, schema_version {cls.SCHEMA_VERSION}",
        f"- carried: {where}",
        f"- MAX_BYTES: {_size(cls.MAX_BYTES)}",
    ]
    if cls in _SIGNED_AS:
        member = _SIGNED_AS[cls]
        lines.append(
            f"- signed: yes, as the payload of an envelope with payloadType "
            f"`{getattr(PayloadType, member)}`"
        )
    lines += [
        "",
        "<details><summary>JSON Schema</summary>",
        "",
        *_schema_block(cls),
        "",
        "</details>",
        "",
    ]
    if cls is DesiredMessage:
        lines += [
            "Example: see [A complete signed DesiredMessage](#a-complete-signed-desiredmessage).",
            "",
        ]
        return lines
    for name in example_names:
        lines += [f"Example (`{name}`):", "", *_json_block(ex[name].to_dict()), ""]
    return lines


def _messages() -> list[str]:
    by_class: dict[type[Message], list[str]] = {cls: [] for cls in MESSAGE_CLASSES}
    for name, message in examples().items():
        by_class[type(message)].append(name)
    _check_complete()
    lines = [
        "## Messages",
        "",
        "One section per message kind: its purpose, where it travels, its size limit, its",
        "JSON Schema and an example. Nested objects (`$defs` in the schemas) follow the same",
        "rules as top-level messages: unknown fields kept, no NaN.",
        "",
        "Event kinds (`Event.kind`):",
        ", ".join(f"`{k.value}`" for k in EventKind) + ".",
        "Update outcomes (`UpdateResult.outcome`): "
        + ", ".join(f"`{o.value}`" for o in UpdateOutcome)
        + ".",
        "",
        "De-duplication (QoS 1 delivers at least once): `Event` by `event_id` (a uuid4 in",
        "32 lowercase hex digits, generated once per event and kept across retries);",
        "`TelemetryReport` by `(device_id, seq)` where `seq` increases strictly, across",
        "restarts too, so it must be persisted; `DeviceState` and `Presence` are retained",
        "states, the latest wins; a re-delivered `DesiredMessage` is recognised by the trust",
        "rules; artifact blocks are placed by offset; a `FeedbackReport`'s outcomes by",
        "`(device_id, prediction_id)` -- the first label of a prediction counts; a",
        "`SampleBatch` by `(device_id, seq, model_name, part)`, where `seq` is that of the",
        "telemetry report of the window the rows were captured in.",
        "",
    ]
    for cls in MESSAGE_CLASSES:
        lines += _message_section(cls, by_class[cls])
    return lines


def _check_complete() -> None:
    """Refuse to render when the contract gained a message kind this document does not cover."""
    import shared.bundle
    import shared.messages

    found = {
        obj
        for module in (shared.messages, shared.bundle)
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, Message) and obj is not Message
    }
    missing = found - set(MESSAGE_CLASSES)
    if missing:
        names = ", ".join(sorted(c.__name__ for c in missing))
        raise RuntimeError(f"docs/generate_protocol.py does not describe: {names}")
    without_example = set(MESSAGE_CLASSES) - {type(m) for m in examples().values()}
    if without_example:
        names = ", ".join(sorted(c.__name__ for c in without_example))
        raise RuntimeError(f"no example for: {names}")


def _signing() -> list[str]:
    root, online = example_root_key(), example_online_key()
    tiny_type = PayloadType.DESIRED_STATE
    tiny_payload = b'{"n":1}'
    tiny_pae = pae(tiny_type, tiny_payload)
    tiny_env = sign_envelope(tiny_payload, tiny_type, [online])
    verified = verify_envelope(tiny_env, payload_type=tiny_type, trusted_keys=[online.public])
    assert verified == tiny_payload
    desired = _example("desired", DesiredMessage)
    keyring_bytes = desired.keyring.payload_bytes()
    manifest_bytes = desired.manifest.payload_bytes()
    manifest_pae = pae(PayloadType.DESIRED_STATE, manifest_bytes)
    manifest_prefix = manifest_pae[: len(manifest_pae) - len(manifest_bytes)]
    payload_types = [
        [name, f"`{value}`"]
        for name, value in vars(PayloadType).items()
        if not name.startswith("_") and isinstance(value, str)
    ]
    key_rows = []
    for role, label, k in (
        ("root", EXAMPLE_ROOT_LABEL, root),
        ("online", EXAMPLE_ONLINE_LABEL, online),
    ):
        seed = hashlib.sha256(label).hexdigest()
        key_rows.append(
            [role, f'SHA-256 of `"{label.decode()}"` = `{seed}`', f"`{k.public.to_base64()}`"]
        )
    return [
        "## Signing",
        "",
        "Documents that a device must be able to trust (keyrings, desired states, bundle",
        "manifests) are signed with Ed25519. The signature covers the exact payload bytes",
        "and their type, and is checked before the payload is parsed at all.",
        "",
        "### Envelope",
        "",
        "A signed document travels as a DSSE-style envelope, a JSON object:",
        "",
        "```json",
        _pretty(
            {
                "payloadType": "<one of the payload types below>",
                "payload": "<standard base64 of the exact payload bytes>",
                "signatures": [{"keyid": "<64 lowercase hex digits>", "sig": "<base64>"}],
            }
        ),
        "```",
        "",
        "- `payloadType`: 1 to 128 characters. The edgefleet payload types "
        "(`shared.signing.PayloadType`):",
        "",
        *_table(["name", "payloadType"], payload_types),
        "",
        "- `payload`: standard base64 (alphabet `A-Z a-z 0-9 + /`, `=` padding, no line",
        "  breaks) of the document's bytes. The document is itself a compact JSON message",
        "  of the kind the type names.",
        "- `signatures`: at most 16 entries; each has `keyid` (see below) and `sig`, the",
        "  standard base64 of the 64-byte Ed25519 signature over `PAE(payloadType, payload)`",
        "  where *payload* means the decoded bytes, not the base64 text.",
        f"- A standalone envelope is at most {_size(Envelope.MAX_BYTES)}; unknown fields in",
        "  the envelope and in a signature entry are allowed and ignored by verification.",
        "- **Canonical base64 only.** `payload` and `sig` must be the canonical encoding of",
        "  their bytes: correct padding and the unused low bits of the last character equal",
        "  to zero. Re-encoding the decoded bytes must give back exactly the same text;",
        "  otherwise the document is refused as `malformed` (payload) or the signature does",
        "  not count (sig). Without this rule several texts would decode to the same bytes.",
        "",
        "### Pre-authentication encoding (PAE)",
        "",
        "The signed bytes are not the payload alone but",
        "",
        "```text",
        'PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body',
        "```",
        "",
        "where `SP` is one space (0x20), `LEN` is the length *in bytes* written in ASCII",
        "decimal without leading zeros, `type` is the payloadType encoded as UTF-8 and `body`",
        "the raw payload bytes. Binding the type into the signed bytes means a signature on",
        "one kind of document can never be replayed as another kind.",
        "",
        f"Worked example: payloadType `{tiny_type}` ({len(tiny_type.encode())} bytes) and the",
        f"{len(tiny_payload)}-byte payload `{tiny_payload.decode()}` give these "
        f"{len(tiny_pae)} bytes:",
        "",
        "```text",
        tiny_pae.decode("utf-8"),
        "```",
        "",
        "```text",
        *_hexdump(tiny_pae),
        "```",
        "",
        "Signed with the example online key, the envelope is:",
        "",
        "```json",
        _pretty(tiny_env.model_dump(mode="json", by_alias=True)),
        "```",
        "",
        "### Keys and key ids",
        "",
        "Keys are Ed25519 (RFC 8032, pure Ed25519, no pre-hashing). A public key travels as",
        "the standard base64 of its raw 32 bytes. Its **key id** is the lowercase hex",
        "SHA-256 of those 32 raw bytes (not of the base64 text), so anyone holding the key",
        "can compute the id. A private key's text form is the base64 of its 32-byte seed.",
        "",
        "Two kinds of keys sign edgefleet documents:",
        "",
        "- **root** keys are kept offline; their public halves are built into each device",
        "  image. They sign only keyrings (payloadType `KEYRING`).",
        "- **online** keys are held by the server and listed in the current keyring. They",
        "  sign desired states (`DESIRED_STATE`) and model bundles (`BUNDLE`). Rotating an",
        "  online key is a new keyring, so no device needs reflashing.",
        "",
        "The example keys used throughout this document (seed = SHA-256 of a label):",
        "",
        *_table(["role", "32-byte seed", "public key (base64)"], key_rows),
        "",
        f"- root key id: `{root.keyid}`",
        f"- online key id: `{online.keyid}`",
        "",
        "### Thresholds",
        "",
        "A document needs valid signatures from at least *threshold* **distinct** trusted",
        "keys: a key counts once however many of its signatures the envelope carries, and",
        "signatures by keys the verifier does not trust are ignored (they neither help nor",
        "hurt). A root-signed keyring needs the device's root threshold (1 unless the image",
        "says otherwise); a desired state needs the `threshold` that the keyring states.",
        "When verification fails, the reported reason is chosen in this order:",
        "",
        "1. wrong payloadType, or a payload that is not canonical base64: `malformed`;",
        "2. no signature at all: `bad_signature`;",
        "3. at least one trusted key verified but fewer than the threshold:",
        "   `threshold_not_met`;",
        "4. otherwise, a trusted key's signature failed to verify: `bad_signature`;",
        "5. otherwise (only untrusted keys signed): `unknown_key`.",
        "",
        "Only after the signatures are accepted is the payload parsed as JSON, with the size",
        "limit of its message kind.",
        "",
        "### A complete signed DesiredMessage",
        "",
        "The retained payload of the `desired` topic carries two envelopes: the keyring,",
        "signed by the example root key, and the desired state, signed by the example online",
        f"key. This is the example for `{EXAMPLE_DEVICE_ID}`:",
        "",
        *_json_block(desired.to_dict()),
        "",
        "Its keyring payload decodes to these bytes:",
        "",
        "```json",
        keyring_bytes.decode("utf-8"),
        "```",
        "",
        "and its manifest payload to:",
        "",
        "```json",
        manifest_bytes.decode("utf-8"),
        "```",
        "",
        "The online key's signature covers the PAE of the manifest, which starts with the",
        f"{len(manifest_prefix)} bytes `{manifest_prefix.decode('utf-8')}` and continues with",
        "the manifest payload bytes above. A device holding the example root public key",
        f"accepts this message at, for example, `{EXAMPLE_NOW.isoformat()}`.",
        "",
    ]


_REASON_MEANING: dict[RejectReason, str] = {
    RejectReason.BAD_SIGNATURE: (
        "a signature by a trusted key does not verify over PAE(payloadType, payload), "
        "or the envelope has no signature at all"
    ),
    RejectReason.UNKNOWN_KEY: "no signature comes from a key trusted for this document",
    RejectReason.THRESHOLD_NOT_MET: (
        "some trusted keys signed validly, but fewer distinct ones than the threshold"
    ),
    RejectReason.EXPIRED: "the keyring or the desired state is at or past its `expires_at`",
    RejectReason.ROLLBACK: (
        "a version lower than the accepted one, or the accepted version with other bytes"
    ),
    RejectReason.WRONG_DEVICE: "the desired state names another `device_id`",
    RejectReason.WRONG_TARGET: (
        "the bundle is not the model name, version and target the desired state asked for, "
        "or it needs a runtime the device lacks"
    ),
    RejectReason.LENGTH_MISMATCH: (
        "an artifact or bundle member is longer or shorter than its signed length, "
        "or over a size limit"
    ),
    RejectReason.HASH_MISMATCH: "an artifact's SHA-256 differs from the signed value",
    RejectReason.MALFORMED: (
        "not a valid signed document: bad JSON or schema, wrong payloadType, non-canonical "
        "base64, or over the size limit"
    ),
}

_TRUST_STATE_MEANING: dict[str, str] = {
    "root_keys": "the root public keys built into the image, by key id",
    "root_threshold": "distinct root keys needed on a keyring",
    "keyring": "the last accepted keyring",
    "keyring_sha256": "SHA-256 (hex) of that keyring's payload bytes",
    "manifest_version": "the last accepted manifest version; 0 before the first",
    "manifest_sha256": "SHA-256 (hex) of that desired state's payload bytes",
    "manifest_signers": "key ids whose signatures on it verified",
}


def _acceptance() -> list[str]:
    missing = set(RejectReason) - set(_REASON_MEANING)
    if missing:
        raise RuntimeError(f"reject reasons without a description: {sorted(missing)}")
    classes: dict[RejectReason, list[str]] = {}
    for sub in VerificationError.__subclasses__():
        classes.setdefault(sub.reason, []).append(sub.__name__)
    reason_rows = [
        [f"`{r.value}`", _REASON_MEANING[r], ", ".join(f"`{c}`" for c in classes.get(r, []))]
        for r in RejectReason
    ]
    state_fields = [f.name for f in dataclasses.fields(TrustState)]
    unknown = set(state_fields) - set(_TRUST_STATE_MEANING)
    if unknown:
        raise RuntimeError(f"trust state fields without a description: {sorted(unknown)}")
    return [
        "## Acceptance rules on the device",
        "",
        "A device decides whether to trust a `DesiredMessage` with pure rules (no clock of",
        "their own: they take the current time as input, so a device needs a plausible",
        "clock). On any failure the device keeps its previous trust state unchanged, acts",
        "on nothing, and publishes a `rejected` event whose `reason` is the code below.",
        "",
        "The device persists this state between decisions (`shared.trust.TrustState`):",
        "",
        *[f"- `{name}`: {_TRUST_STATE_MEANING[name]}" for name in state_fields],
        "",
        "### Keyring (the `keyring` envelope)",
        "",
        "1. payloadType must be `KEYRING`; at least the root threshold of distinct root",
        "   keys must have signed (see [Thresholds](#thresholds)).",
        f"2. The payload is parsed as a `Keyring`; it may be at most {_size(Keyring.MAX_BYTES)}.",
        "3. It must not have expired: the current time must be before `expires_at`.",
        "4. Its `version` must not be lower than the held keyring's. The *same* version is",
        "   accepted only if its payload bytes hash to the same SHA-256 as the held one",
        "   (otherwise: `rollback`); then nothing changes.",
        "5. **Fast-forward recovery.** When a newer keyring lists none of the keys that",
        "   signed the last accepted manifest, the manifest-version floor goes back to 0",
        "   (version, hash and signers are cleared). This recovers from a leaked online key",
        "   that signed an absurdly high manifest version: once the root replaces that key,",
        "   only manifests signed by the new keys can pass, at any version.",
        "",
        "`issued_at` is informational; it is not compared with the clock.",
        "",
        "### Desired state (the `manifest` envelope)",
        "",
        "Checked against the keyring accepted in the step before, in this order:",
        "",
        "1. payloadType must be `DESIRED_STATE`; at least the keyring's `threshold` of",
        "   distinct keys listed in the keyring must have signed.",
        f"2. The payload is parsed as a `DesiredState`; it may be at most "
        f"{_size(DesiredState.MAX_BYTES)}.",
        "3. `device_id` must be this device's id (`wrong_device`).",
        "4. The current time must be before `expires_at` (`expired`). An expired desired",
        "   state freezes the device on what it runs; it does not roll anything back.",
        "5. `manifest_version` must not be below the accepted one (`rollback`). The same",
        "   version is a harmless re-delivery (retained messages arrive on every connect)",
        "   when its payload has the same SHA-256, and a `rollback` otherwise.",
        "6. A higher version is accepted: the device records the version, the payload's",
        "   SHA-256 and the ids of the keys that signed it, together with the keyring.",
        "",
        "### Artifacts",
        "",
        "For each deployment of an accepted desired state the device fetches the artifact",
        "(HTTP range download from `artifact.url`, or the [block transfer]"
        "(#artifact-block-transfer)) and checks it against the signed `length` and `sha256`",
        "while it arrives: it never reads past the signed length (`length_mismatch`) and",
        "compares the hash at the end (`hash_mismatch`). Then it reads the bundle (see",
        "[Model bundle](#model-bundle)), verifying `bundle.json` with the online keys of its",
        "keyring, and refuses a bundle whose model name, version or target differ from the",
        "deployment, or whose runtime the device does not have (`wrong_target`). Nothing is",
        "kept or activated before every check has passed.",
        "",
        "### The agent's own version (`agent`)",
        "",
        "When the accepted desired state names an `agent` version other than the one",
        "running, the device fetches its artifact the same way (a pure-Python wheel of the",
        "`edgefleet` distribution, media type `" + AGENT_WHEEL_MEDIA_TYPE + "`), checks the",
        "wheel itself (its name and version match the deployment, it is pure, its RECORD",
        "matches every file, no path leaves its folder), installs it beside the running",
        "version and switches to it atomically. The new version has `health_timeout_s`",
        "seconds to connect, publish a `DeviceState` with the new `agent_version` and pass",
        "its models' self-tests; otherwise the device goes back to the previous version by",
        "itself. Each step is an `Event` with `agent_version` set (and no `model_name`);",
        "the outcome is `DeviceState.agent_update` (`activated`, or `rolled_back` with reason",
        "`agent_crashed` or `agent_unhealthy`, `rejected`, `failed`). Without an `agent`",
        "field the device keeps the version it runs.",
        "",
        "### Reject reasons",
        "",
        "The `reason` of a `rejected` event and of `UpdateResult` (`shared.errors.RejectReason`;",
        "the Python exception raised for each is listed for reference):",
        "",
        *_table(["reason", "meaning", "raised as"], reason_rows),
        "",
    ]


def _blocks() -> list[str]:
    bundle = example_bundle()
    request = _example("block_request", BlockRequest)
    header = _example("block_header", BlockHeader)
    error = _example("block_error", BlockHeader)
    data = bundle[header.offset : header.offset + header.length]
    frame = encode_block(header, data)
    head_len = struct.unpack(">I", frame[4:8])[0]
    error_frame = encode_block(error)
    fixed = _FRAME_HEAD.size
    frame_limit = fixed + BlockHeader.MAX_BYTES + MAX_BLOCK_SIZE
    return [
        "## Artifact block transfer",
        "",
        "Devices that can reach only the broker fetch artifacts over MQTT, in blocks. The",
        "transfer is driven by the device and resumable at any byte offset.",
        "",
        f"**Request.** The device publishes a `BlockRequest` on "
        f"`{_topic_pattern(Channel.ARTIFACT_REQUEST)}`:",
        "`count` blocks (1 to "
        f"{MAX_BLOCKS_PER_REQUEST}) of `block_size` bytes (1 to {MAX_BLOCK_SIZE}) of the artifact",
        "`sha256`, starting at byte `offset`. `request_id` (1 to 64 of `[A-Za-z0-9_-]`) is",
        "chosen by the device and echoed in every answer.",
        "",
        *_json_block(request.to_dict()),
        "",
        f"**Answer.** The server publishes on `{_topic_pattern(Channel.ARTIFACT_BLOCK)}` one",
        "binary frame per block, in order: block *i* covers",
        "`[offset + i·block_size, offset + (i+1)·block_size)` clipped to the artifact's end,",
        "and the answer stops early at the end of the artifact. The payload is not JSON but",
        "this frame:",
        "",
        *_table(
            ["bytes", "content"],
            [
                ["0 – 3", f"magic `{_FRAME_MAGIC.decode('ascii')}` (`{_FRAME_MAGIC.hex()}`)"],
                ["4 – 7", "H = length of the header in bytes, unsigned 32-bit big-endian"],
                [
                    f"{fixed} – {fixed}+H−1",
                    f"header: a `BlockHeader` message, compact UTF-8 JSON, H ≤ "
                    f"{BlockHeader.MAX_BYTES}",
                ],
                [f"{fixed}+H – end", "data: exactly `length` bytes (none for an error block)"],
            ],
        ),
        "",
        f"(In Python `struct` notation the fixed part is `{_FRAME_HEAD.format}`.) A whole frame",
        f"is at most {fixed} + {BlockHeader.MAX_BYTES} + {MAX_BLOCK_SIZE} = {frame_limit} bytes.",
        "",
        "The header of the first answer to the request above:",
        "",
        *_json_block(header.to_dict()),
        "",
        f"and the start of that frame ({len(frame)} bytes: {fixed} fixed, {head_len} header,",
        f"{len(data)} data):",
        "",
        "```text",
        *_hexdump(frame[:48]),
        "...",
        "```",
        "",
        "A receiver checks, in this order, and drops the frame on any failure: the frame is",
        "no longer than the limit and at least 8 bytes; the magic matches; H ≤",
        f"{BlockHeader.MAX_BYTES} and the header fits in the frame; the header is a valid",
        "`BlockHeader`; the data is exactly `length` bytes; the SHA-256 of the data equals",
        "`block_sha256`. A valid header also satisfies `offset + length ≤ total_length`, and",
        "a block without `error` has a `block_sha256`.",
        "",
        "**Errors.** When the server cannot serve a request (unknown artifact, offset past",
        "the end, ...) it answers with one *error block*: `error` set to a short text,",
        "`length` 0, no data, `block_sha256` null. The header still obeys",
        "`offset + length ≤ total_length`, so when the artifact is unknown `offset` and",
        "`total_length` are 0. The device should back off before asking again.",
        "",
        *_json_block(error.to_dict()),
        "",
        "```text",
        *_hexdump(error_frame[:16]),
        "...",
        "```",
        "",
        "**Resuming.** Each block states its own `offset`, so blocks can be written into a",
        "partial file at their place, duplicates (QoS 1) are harmless, and after a",
        "disconnect the device asks again from the first byte it does not have. It never",
        "writes past the *signed* length from the desired state (`ArtifactRef.length`), even",
        "if `total_length` says more (`length_mismatch`), and it checks the whole file's",
        "SHA-256 against the signed `sha256` before using it. `block_sha256` only detects",
        "damaged blocks early; the signed hash is what makes the artifact trusted.",
        "",
    ]


_TAR_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("name", 0, 100),
    ("mode", 100, 8),
    ("uid", 108, 8),
    ("gid", 116, 8),
    ("size", 124, 12),
    ("mtime", 136, 12),
    ("chksum", 148, 8),
    ("typeflag", 156, 1),
    ("linkname", 157, 100),
    ("magic", 257, 6),
    ("version", 263, 2),
    ("uname", 265, 32),
    ("gname", 297, 32),
    ("devmajor", 329, 8),
    ("devminor", 337, 8),
    ("prefix", 345, 155),
    ("(padding)", 500, 12),
)

_TAR_RULES: dict[str, str] = {
    "name": "member name in ASCII, NUL-padded",
    "mode": "0644, 7 octal digits and NUL",
    "uid": "0",
    "gid": "0",
    "size": "member size, 11 octal digits and NUL",
    "mtime": "0",
    "chksum": "see below: 6 octal digits, NUL, space",
    "typeflag": "`0`: regular file",
    "linkname": "empty",
    "magic": "`ustar` and NUL",
    "version": "`00`",
    "uname": "empty",
    "gname": "empty",
    "devmajor": "0",
    "devminor": "0",
    "prefix": "empty",
    "(padding)": "zeros",
}


def _bundle() -> list[str]:
    bundle = example_bundle()
    manifest = _example("bundle_manifest", BundleManifest)
    size_example = 1234
    header = _header(MANIFEST_MEMBER, size_example)
    assert len(header) == _BLOCK
    assert sum(size for _, _, size in _TAR_FIELDS) == _BLOCK
    rows = [
        [name, offset, size, _field_bytes(header[offset : offset + size]), _TAR_RULES[name]]
        for name, offset, size in _TAR_FIELDS
    ]
    env_size = int(bundle[124:135].decode("ascii"), 8)
    model_at = _BLOCK + env_size + (-env_size % _BLOCK)
    model_size = int(bundle[model_at + 124 : model_at + 135].decode("ascii"), 8)
    end_at = model_at + _BLOCK + model_size + (-model_size % _BLOCK)
    layout = [
        [0, _BLOCK, f"header of `{MANIFEST_MEMBER}`"],
        [_BLOCK, env_size, f"`{MANIFEST_MEMBER}`: the signed envelope (JSON)"],
        [_BLOCK + env_size, -env_size % _BLOCK, "zero padding to a 512-byte boundary"],
        [model_at, _BLOCK, f"header of `{manifest.model_file.name}`"],
        [model_at + _BLOCK, model_size, "the model bytes"],
        [model_at + _BLOCK + model_size, -model_size % _BLOCK, "zero padding"],
        [end_at, 2 * _BLOCK, "end of archive: two zero blocks"],
    ]
    assert end_at + 2 * _BLOCK == len(bundle)
    members = ", ".join(f"`{m}` for {f}" for f, m in MODEL_MEMBERS.items())
    return [
        "## Model bundle",
        "",
        "A bundle is one file per (model version, target profile): the model and its signed",
        "description. The desired state pins the whole file by `ArtifactRef.length` and",
        "`ArtifactRef.sha256`.",
        "",
        "It is a **canonical POSIX ustar archive** with exactly two members, in this order:",
        "",
        f"1. `{MANIFEST_MEMBER}`: an envelope (see [Signing](#signing)) with payloadType",
        f"   `{PayloadType.BUNDLE}` whose payload is a [BundleManifest](#bundlemanifest).",
        "   It is signed by the server's online key(s).",
        f"2. the model, named after `BundleManifest.format`: {members}. Its length and",
        "   SHA-256 are `BundleManifest.model_file.length` and `.sha256`.",
        "",
        "Each member is a 512-byte header followed by its bytes, zero-padded to a multiple of",
        "512; after the last member come exactly two 512-byte blocks of zeros, and nothing",
        "after them. Any tar tool lists a bundle; a writer must produce it byte for byte as",
        "described, because the reader refuses anything else.",
        "",
        "### Header fields",
        "",
        f"Every header is exactly what this table gives (values shown for a {size_example}-byte",
        f"`{MANIFEST_MEMBER}`); numbers are octal ASCII, zero-filled to the field width minus",
        "one, then NUL:",
        "",
        *_table(["field", "offset", "size", "bytes", "rule"], rows),
        "",
        "**Checksum.** Fill the checksum field with eight spaces, add up all 512 header",
        "bytes as unsigned values, and write the sum as 6 octal digits (zero-filled),",
        "followed by NUL and a space. No other header layout (GNU or pax extensions, a",
        "name prefix, user names, other modes or times) is accepted.",
        "",
        f"The header of `{MANIFEST_MEMBER}` in the example bundle:",
        "",
        "```text",
        *_hexdump(bundle[:_BLOCK]),
        "```",
        "",
        "### Layout of the example bundle",
        "",
        f"The example bundle ({len(bundle)} bytes, SHA-256 `{sha256_hex(bundle)}`; "
        "this is the artifact",
        "the example desired state deploys):",
        "",
        *_table(["offset", "bytes", "content"], layout),
        "",
        "### What the reader checks",
        "",
        "A device reads a bundle front to back as a stream and accepts it only if all of",
        "these hold; it keeps nothing otherwise:",
        "",
        "- The file is no larger than the signed `ArtifactRef.length`, and reading stops at",
        "  that length. Without a signed length the limit is",
        f"  {_size(DEFAULT_MAX_BUNDLE_BYTES)}.",
        f"- The first header is exactly the canonical header for `{MANIFEST_MEMBER}` and its",
        f"  size. That size is at most {_size(BundleManifest.MAX_BYTES * 2)}: twice the",
        "  manifest's limit, which leaves room for the base64 expansion.",
        "- The padding after each member is zeros.",
        "- The envelope verifies with payloadType `BUNDLE` against the device's online keys",
        "  *before* the manifest is parsed; the manifest is a valid `BundleManifest`.",
        "- The second header is exactly the canonical header for `model_file.name`, with the",
        "  size `model_file.length` (`length_mismatch` otherwise).",
        "- The model bytes hash to `model_file.sha256` (`hash_mismatch`).",
        "- The archive then ends with two zero blocks and nothing follows.",
        "- The whole file's length and SHA-256 equal the desired state's `ArtifactRef`.",
        "- The manifest's `model_name`, `model_version` and `target` equal the deployment's,",
        "  and its `runtime` is one the device has (`wrong_target`).",
        "",
        "The manifest also carries what the device needs to serve the model exactly as it was",
        "trained: input and output tensor specs (with affine quantization `real = scale ×",
        "(q − zero_point)`), feature and label names, the preprocessing steps, self-tests",
        "(raw inputs and the outputs the device must reproduce within `atol`), the operator",
        "versions the model needs, evaluation metrics and the drift reference. Its example",
        "is under [BundleManifest](#bundlemanifest).",
        "",
    ]


_STEP_EFFECT: dict[str, str] = {
    "standardize": "`(x − mean[j]) / std[j]` for feature j; a zero `std` divides by one",
    "scale": "`x × factor + offset` on every value",
    "clip": "limit every value to `[min, max]`; a null bound is no limit",
    "reshape": "reshape each row to `shape` (the batch dimension stays first)",
}


def _preprocessing() -> list[str]:
    rows = []
    for step in (Standardize, Scale, Clip, Reshape):
        op = step.model_fields["op"].default
        if op not in _STEP_EFFECT:
            raise RuntimeError(f"preprocessing step {op!r} is not described")
        fields = ", ".join(f"`{n}`" for n in step.model_fields if n != "op")
        rows.append([f"`{op}`", fields, _STEP_EFFECT[op]])
    return [
        "## Preprocessing",
        "",
        "`BundleManifest.preprocessing` lists the steps, in order, that turn a raw input",
        "batch of shape (rows, features) into model input. Each step is an object tagged by",
        "`op`. Arithmetic is float32. A device must refuse a bundle with a step it does not",
        "know: skipping part of the preprocessing would serve a different model.",
        "",
        *_table(["op", "fields", "effect"], rows),
        "",
    ]


def _drift() -> list[str]:
    reference = _drift_reference()
    telemetry = _example("telemetry", TelemetryReport)
    sketch = telemetry.models[0].drift
    assert sketch is not None
    feature = reference.features[0]
    layout_text = reference.layout_json()
    assert hashlib.sha256(layout_text.encode()).hexdigest() == reference.reference_id
    slots = ["underflow"] + [f"bin {i}" for i in range(1, feature.n_bins + 1)]
    slots += ["overflow", "nan"]
    return [
        "## Drift sketches",
        "",
        "Each bundle's `drift_reference` fixes, per monitored feature, the bin edges (at",
        "training-data quantiles) and the training counts. A device counts its live inputs",
        "over the *same* bins, per telemetry window, and sends the counts and moments as a",
        "`DriftSketch` inside `ModelWindow.drift`. Counts merge by addition and moments by",
        "the formula below, so the server can pool any set of devices and windows exactly.",
        "",
        "### Counts",
        "",
        f"A feature with edges `e[0] < e[1] < … < e[n]` has n bins (n from {drift.MIN_BINS}",
        f"to {drift.MAX_BINS}) and **n + 3** counts, laid out as",
        "",
        "```text",
        "[underflow, bin_1, ..., bin_n, overflow, nan]",
        "```",
        "",
        "- `bin_i` counts values x with `e[i-1] ≤ x < e[i]`; the last bin also counts",
        "  `x = e[n]`.",
        "- `underflow` counts `x < e[0]` (including −∞); `overflow` counts `x > e[n]`",
        "  (including +∞); `nan` counts NaN.",
        "- A constant training feature has the two equal edges `[c, c]`: one bin that holds",
        "  exactly `c`, values below in underflow, above in overflow.",
        "",
        f"For example, `{feature.name}` has edges `{feature.edges}`, so its "
        f"{len(feature.counts)} counts are",
        ", ".join(slots) + ".",
        "",
        "Features appear in the sketch in the reference's order, with the same names.",
        "",
        "### Moments",
        "",
        "Per feature, over the finite values only (NaN and ±∞ are left out): `n` (count),",
        "`mean`, `m2` (sum of squared deviations from the mean), `min` and `max` (null",
        "while n = 0). The variance is `m2 / (n − 1)` for n > 1. Two moment sets a and b",
        "merge (Chan et al.'s parallel formula) as",
        "",
        "```text",
        "if a.n == 0: result = b;   if b.n == 0: result = a;   otherwise",
        "n     = a.n + b.n",
        "delta = b.mean - a.mean",
        "mean  = a.mean + delta * b.n / n",
        "m2    = max(0, a.m2 + b.m2 + delta * delta * a.n * b.n / n)",
        "min   = min(a.min, b.min);   max = max(a.max, b.max)",
        "```",
        "",
        "A device may update its moments one value at a time with Welford's method (the",
        "same formula with b a single value) or merge per batch.",
        "",
        "### Predictions",
        "",
        "- `class_counts` (classifiers): one count per class of the arg-max of the output",
        "  probabilities (the first maximum on ties); length = number of classes.",
        f"- `confidence_counts`: a histogram of each row's top probability p over "
        f"{CONFIDENCE_BINS}",
        "  equal-width bins of [0, 1]: p is clipped to [0, 1], NaN counts as 0, and the",
        f"  bin is `min(floor(p × {CONFIDENCE_BINS}), {CONFIDENCE_BINS - 1})`.",
        "- `value` (regressors): the predicted value counted like a feature named",
        "  `prediction` over `predictions.value.edges`.",
        "",
        "### Reference id",
        "",
        "`DriftSketch.reference_id` says which bins the counts are over; the server merges",
        "only sketches with equal ids. The bundle carries it (`drift_reference.reference_id`):",
        "a device copies it into its sketches and need not compute it. Readers recompute it",
        "and refuse a reference whose id does not match its bins. It is the lowercase hex",
        "SHA-256 of the UTF-8 bytes of the compact JSON (no spaces, non-ASCII characters",
        "escaped as `\\uXXXX`) of:",
        "",
        "```text",
        "[[name_1, edges_1], ..., [name_k, edges_k], P]",
        "```",
        "",
        "where P is present only when the reference has `predictions`, and is then",
        "`[number of classes or null, number of confidence bins or null, value edges or",
        "null]`. Numbers are written as Python writes floats: the shortest text that reads",
        "back to the same double, always with a decimal point or exponent (`18.0`, `0.5`,",
        "`1e-05`, `1e+16`). `bundle.json` writes the edges in that same notation, so a",
        "client can copy the number tokens from there verbatim. For the example reference:",
        "",
        "```text",
        layout_text,
        "```",
        "",
        f"gives `{reference.reference_id}`.",
        "",
        "### Distances (server side)",
        "",
        "The server compares pooled live counts with the reference counts, over all n + 3",
        "slots. Proportions are `count / total`. The population stability index is",
        "",
        "```text",
        f"PSI = sum_i (a_i - e_i) * ln(a_i / e_i),   with a_i, e_i floored at {PSI_EPSILON!r}",
        "```",
        "",
        "(e = reference, a = live); below 0.1 is read as stable, 0.1 to 0.25 as a moderate",
        "shift, 0.25 and above as significant. The server also computes the Jensen-Shannon",
        "distance (base 2, in [0, 1]), a two-sample chi-squared statistic (bins empty in",
        "both left out) and a Kolmogorov-Smirnov statistic from the binned CDFs (NaN slot",
        "excluded). Devices need none of these.",
        "",
        "The drift sketch of the example telemetry report (eight inputs, one of them NaN):",
        "",
        *_json_block(sketch.model_dump(mode="json", by_alias=True)),
        "",
    ]


def _latency() -> list[str]:
    bounds = list(LATENCY_BOUNDS_MS)
    per_row = 8
    rows = []
    for start in range(0, len(bounds), per_row):
        chunk = bounds[start : start + per_row]
        rows.append([f"{start}–{start + len(chunk) - 1}", ", ".join(repr(b) for b in chunk)])
    rows.append([str(len(bounds)), "overflow: everything above the last bound"])
    return [
        "## Latency histograms",
        "",
        "`ModelWindow.latency_ms.counts` has exactly "
        f"{N_LATENCY_BUCKETS} counts, over fixed bucket bounds",
        "shared by every device so histograms merge by addition. The bounds, in",
        f"milliseconds, are `round(0.05 × 2^(i / 4), 6)` for i = 0 … {len(bounds) - 1}",
        f"({len(bounds)} bounds, from {bounds[0]} ms to {bounds[-1]} ms), plus one overflow",
        "bucket:",
        "",
        "- bucket 0 counts latencies `x ≤ bound[0]` (and negative values);",
        "- bucket i counts `bound[i-1] < x ≤ bound[i]`;",
        f"- bucket {len(bounds)} counts `x > bound[{len(bounds) - 1}]` (and NaN).",
        "",
        "Consecutive bounds differ by a factor of 2^(1/4), about 19 %, so a percentile read",
        "from a histogram is within one bucket of the true value. Copy the bounds from this",
        "table rather than recomputing them (the rounding is Python's, to 6 decimals):",
        "",
        *_table(["buckets", "upper bounds (ms)"], rows),
        "",
        "To read quantile q from counts c (total N > 0): rank = max(1, ceil(q × N)); the",
        "answer is the upper bound of the first bucket whose cumulative count reaches rank,",
        "or +∞ if that is the overflow bucket.",
        "",
    ]


def render() -> str:
    """The whole of ``docs/protocol.md``."""
    sections = [
        _intro(),
        _overview(),
        _topics(),
        _encoding(),
        _messages(),
        _signing(),
        _acceptance(),
        _blocks(),
        _bundle(),
        _preprocessing(),
        _drift(),
        _latency(),
    ]
    text = "\n".join(line for section in sections for line in section)
    return text.rstrip("\n") + "\n"


def _check_examples_round_trip() -> None:
    for name, message in examples().items():
        again = type(message).from_bytes(message.to_bytes())
        if again.to_dict() != message.to_dict():
            raise RuntimeError(f"example {name} does not survive encoding")


if __name__ == "__main__":
    _check_examples_round_trip()
    print(render(), end="")
