"""MQTT payloads fuzzed into the server's ingestion and the agent's handlers (hypothesis).

Arbitrary bytes, and JSON that has the right shape with wrong values (a valid message with
one field replaced, removed or added), go where a device's or the server's messages go:

- telemetry, feedback and samples into the server's
  :class:`~server.ingest.telemetry.TelemetryIngestor`, over a real broker: every payload
  is stored or dropped and counted per device and reason in ``ingest_drops``; the writer
  never fails a batch (a failed batch would be redelivered for ever);
- desired states into :meth:`agent.agent.Agent.apply_desired`: a refusal returns None,
  changes nothing, and puts a ``rejected`` event with its reason in the outbox;
- artifact blocks into the agent's :class:`~agent.download.BlockDownloader`: junk frames
  are counted as dropped and the download still ends with the signed bytes.

No exception escapes any of them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import queue
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine
from sqlmodel import Session, func, select

from agent.agent import Agent
from agent.config import AgentConfig, DownloadConfig, Limits
from agent.download import BlockDownloader
from server.fleet.models import DeviceStatus
from server.ingest.models import IngestDrop
from server.ingest.telemetry import TelemetryIngestor
from server.ingest.workers import device_consumers
from shared.errors import RejectReason
from shared.messages import (
    ArtifactRef,
    BlockHeader,
    BlockRequest,
    DesiredMessage,
    DesiredState,
    Event,
    EventKind,
    encode_block,
)
from shared.signing import PayloadType, sign_envelope
from shared.topics import Channel, device_topic
from tests.agent.test_agent_refusals import DEVICE, KEYRING, ONLINE, PROFILE, ROOT
from tests.conftest import BrokerEndpoint
from tests.server.conftest import db_url, engine, external_schema  # noqa: F401 (fixtures)
from tests.server.ingest.test_telemetry import add_device, report

EXAMPLES = 100
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same payloads every run: a failure reproduces
)

# ----------------------------------------------------------------------------- payloads

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON document: dict keys and list indexes, outermost first."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, inner in value.items():
            found += _paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found += _paths(inner, (*prefix, index))
    return found


@st.composite
def mutated(draw: st.DrawFn, document: dict[str, Any]) -> bytes:
    """``document`` with one place replaced by any JSON value, removed, or given a sibling."""
    doc = json.loads(json.dumps(document))
    path = draw(st.sampled_from(_paths(doc)))
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    action = draw(st.sampled_from(["replace", "remove", "add"]))
    if action == "replace":
        parent[last] = draw(json_values)
    elif action == "remove":
        del parent[last]
    elif isinstance(parent, dict):
        parent[draw(st.text(min_size=1, max_size=12))] = draw(json_values)
    else:
        parent.append(draw(json_values))
    return json.dumps(doc).encode()


def payloads(valid: dict[str, Any]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=2048), mutated(valid), json_values.map(_dumps))


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


# ----------------------------------------------------------------------------- ingestion

FUZZ_DEVICE = "fuzz-1"
DROP_REASONS = {
    "bad_topic",
    "oversized",
    "malformed",
    "wrong_device",
    "unknown_device",
    "expired",
    "drift_layout",
}


def _wait(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # the writer thread gives no event to wait on
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def ingestor(
    engine: Engine,  # noqa: F811
    mqtt_broker: BrokerEndpoint,
    tmp_path: Path,
) -> Iterator[TelemetryIngestor]:
    with Session(engine) as session:
        add_device(session, FUZZ_DEVICE, DeviceStatus.ACCEPTED)
        session.commit()
    ingestor = TelemetryIngestor(
        engine,
        host=mqtt_broker.host,
        port=mqtt_broker.port,
        client_id=f"fuzz-ingest-{tmp_path.name[-30:]}",
        flush_interval=0.02,
        consumers=device_consumers(),  # feedback and samples, as the server ingests them
    )
    ingestor.start()
    _wait(ingestor.subscribed.is_set, "the ingestor's subscription")
    yield ingestor
    ingestor.stop()


@pytest.mark.database
@pytest.mark.broker
def test_fuzzed_telemetry_is_stored_or_dropped_with_a_counted_reason(
    engine: Engine,  # noqa: F811
    ingestor: TelemetryIngestor,
    mqtt_client: Callable[..., Any],
) -> None:
    device = mqtt_client(FUZZ_DEVICE)
    topic = device_topic(FUZZ_DEVICE, Channel.TELEMETRY)
    valid = json.loads(report(FUZZ_DEVICE, 0).to_bytes())
    channels = st.sampled_from([Channel.TELEMETRY, Channel.FEEDBACK, Channel.SAMPLES])
    sent = [0]

    @FUZZ
    @given(batch=st.lists(st.tuples(channels, payloads(valid)), min_size=1, max_size=5))
    def check(batch: list[tuple[Channel, bytes]]) -> None:
        for channel, payload in batch:
            device.publish(device_topic(FUZZ_DEVICE, channel), payload)
        sent[0] += len(batch)
        _wait(lambda: ingestor.stats().received >= sent[0], "the batch to be handled")
        stats = ingestor.stats()
        assert stats.errors == 0, "a fuzzed payload failed a whole batch"
        assert stats.received == sent[0]
        # Every payload is stored, a duplicate, or dropped and counted.
        assert stats.received - stats.stored - stats.duplicates <= stats.dropped
        with Session(engine) as session:
            counted = session.exec(select(func.sum(IngestDrop.count))).one() or 0
            reasons = set(session.exec(select(IngestDrop.reason)).all())
        assert counted == stats.dropped
        assert reasons <= DROP_REASONS, reasons

    check()
    assert ingestor.stats().dropped > 0  # the fuzzing did reach the drop path
    # ... and the ingestor still stores a good report afterwards.
    before = ingestor.stats().stored
    device.publish(topic, report(FUZZ_DEVICE, 10**6).to_bytes())
    _wait(lambda: ingestor.stats().stored > before, "a good report after the fuzzing")


# ----------------------------------------------------------------------------- the agent


def _empty_desired(version: int) -> bytes:
    now = datetime.now(UTC)
    state = DesiredState(
        device_id=DEVICE,
        manifest_version=version,
        issued_at=now - timedelta(minutes=1),
        expires_at=now + timedelta(hours=1),
    )
    return DesiredMessage(
        keyring=KEYRING,
        manifest=sign_envelope(state.to_bytes(), PayloadType.DESIRED_STATE, [ONLINE]),
    ).to_bytes()


def _unwrapped(message: bytes) -> dict[str, Any]:
    """A desired message with its signed manifest decoded, so fuzzing reaches inside it."""
    document: dict[str, Any] = json.loads(message)
    manifest = document["manifest"]
    manifest["payload"] = json.loads(base64.b64decode(manifest["payload"]))
    return document


def _rewrapped(document: bytes) -> bytes:
    """The inverse of :func:`_unwrapped`, where the fuzzed document still allows it."""
    try:
        parsed = json.loads(document)
        inner = parsed["manifest"]["payload"]
        if isinstance(inner, dict):
            parsed["manifest"]["payload"] = base64.b64encode(json.dumps(inner).encode()).decode()
        return json.dumps(parsed).encode()
    except (ValueError, TypeError, KeyError):
        return document


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    config = AgentConfig.model_validate(
        {
            "device_id": DEVICE,
            "profile": PROFILE,
            "data_dir": str(tmp_path / "device"),
            "trust": {"root_keys": [ROOT.public.to_base64()]},
            "http": {"enabled": False},
        }
    )
    agent = Agent(config)
    agent.start()
    assert agent.apply_desired(_empty_desired(1)) is not None
    yield agent
    agent.stop()


def test_fuzzed_desired_states_are_refused_with_a_reason_and_change_nothing(agent: Agent) -> None:
    valid = _unwrapped(_empty_desired(2))
    reasons = {r.value for r in RejectReason}

    @FUZZ
    @given(payload=st.one_of(st.binary(max_size=2048), mutated(valid).map(_rewrapped)))
    def check(payload: bytes) -> None:
        trust_file = agent.trust_store.path.read_bytes()
        before = (agent.trust.manifest_version, dict(agent.models))
        depth = agent.outbox.depth()
        plan = agent.apply_desired(payload)
        if plan is not None:  # still a valid signed state (an unknown field, say)
            return
        assert agent.trust_store.path.read_bytes() == trust_file
        assert (agent.trust.manifest_version, dict(agent.models)) == before
        assert agent.last_update is not None and agent.last_update.outcome == "rejected"
        assert agent.last_update.reason in reasons, agent.last_update.reason
        assert agent.outbox.depth() == depth + 1
        newest = Event.from_bytes(agent.outbox.pending(depth + 1)[-1].payload)
        assert newest.kind == EventKind.REJECTED and newest.reason == agent.last_update.reason

    check()


class _Blocks:
    """Answers block requests from an artifact's bytes, after the junk frames queued first
    (the agent's side of ``artifact/blk`` is this queue; the broker adds nothing here)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.frames: queue.Queue[bytes] = queue.Queue()
        self.junk: list[bytes] = []

    def request(self, req: BlockRequest) -> None:
        for frame in self.junk:
            self.frames.put(frame)
        self.junk = []
        for index in range(req.count):
            offset = req.offset + index * req.block_size
            chunk = self.data[offset : offset + req.block_size]
            if not chunk:
                break
            header = BlockHeader(
                request_id=req.request_id,
                sha256=self.sha256,
                offset=offset,
                length=len(chunk),
                total_length=len(self.data),
                block_sha256=hashlib.sha256(chunk).hexdigest(),
            )
            self.frames.put(encode_block(header, chunk))


@st.composite
def junk_frames(draw: st.DrawFn) -> bytes:
    """Raw bytes, or well-framed blocks of another artifact or with a mangled header."""
    kind = draw(st.sampled_from(["bytes", "other_artifact", "mangled_header"]))
    if kind == "bytes":
        return draw(st.binary(max_size=4096))
    data = draw(st.binary(min_size=1, max_size=2048))
    header = BlockHeader(
        request_id=draw(st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True)),
        sha256=hashlib.sha256(b"another artifact" + data).hexdigest(),
        offset=0,
        length=len(data),
        total_length=len(data),
        block_sha256=hashlib.sha256(data).hexdigest(),
    )
    frame = encode_block(header, data)
    if kind == "other_artifact":
        return frame
    head = json.loads(header.to_bytes())
    return b"EFB1" + b"\0\0\0\0" + draw(mutated(head)) + data  # a header length that lies


def test_fuzzed_block_frames_are_dropped_and_counted(tmp_path: Path) -> None:
    artifact = bytes(range(256)) * 40  # 10 240 bytes: three requests of 4 KiB blocks
    ref = ArtifactRef(sha256=hashlib.sha256(artifact).hexdigest(), length=len(artifact))
    config = DownloadConfig(block_size=1024, blocks_per_request=4, request_timeout_seconds=5)
    limits = Limits(backoff_min_seconds=0.01, backoff_max_seconds=0.05)
    runs = [0]

    @FUZZ
    @given(junk=st.lists(junk_frames(), min_size=1, max_size=8))
    def check(junk: list[bytes]) -> None:
        runs[0] += 1
        source = _Blocks(artifact)
        source.junk = list(junk)
        downloader = BlockDownloader(source, DEVICE, config, limits)
        got = downloader.download(ref, tmp_path / f"run-{runs[0]}")
        assert got.read_bytes() == artifact
        assert downloader.last_stats.frames_dropped == len(junk)
        assert downloader.last_stats.frames == len(junk) + 10

    check()
