"""Every message round-trips, keeps unknown fields, and is refused on size before parsing."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import MessageError, PayloadTooLargeError
from shared.latency import N_LATENCY_BUCKETS
from shared.messages import (
    BlockHeader,
    BlockRequest,
    DesiredMessage,
    DesiredState,
    DeviceState,
    Event,
    Keyring,
    Presence,
    TelemetryReport,
    decode_block,
    encode_block,
)
from shared.model import Message
from tests.shared.conftest import NOW, key, make_desired, make_keyring, make_message

SHA = "0123456789abcdef" * 4


def samples() -> dict[type[Message], dict[str, Any]]:
    """One valid payload (as decoded JSON) per message class."""
    desired = make_desired()
    return {
        Keyring: make_keyring(key("online-1")).to_dict(),
        DesiredState: desired.to_dict(),
        DesiredMessage: make_message(
            desired, root=key("root"), signers=[key("online-1")]
        ).to_dict(),
        DeviceState: {
            "device_id": "cam-1",
            "agent_version": "0.1.0",
            "profile": "edge-arm64-litert",
            "arch": "aarch64",
            "runtime": {"name": "litert", "version": "2.3.0"},
            "manifest_version": 4,
            "keyring_version": 1,
            "models": [
                {
                    "model_name": "digits",
                    "model_version": 3,
                    "target": "edge-arm64-litert",
                    "sha256": SHA,
                    "activated_at": NOW.isoformat(),
                    "previous_version": 2,
                }
            ],
            "last_update": {
                "manifest_version": 4,
                "rollout_id": "r-1",
                "outcome": "rejected",
                "reason": "bad_signature",
                "detail": "signature by key 1234 does not match",
                "at": NOW.isoformat(),
            },
            "reported_at": NOW.isoformat(),
        },
        Presence: {"device_id": "cam-1", "status": "offline"},
        Event: {
            "device_id": "cam-1",
            "event_id": uuid.UUID(int=7).hex,
            "kind": "activated",
            "at": NOW.isoformat(),
            "manifest_version": 4,
            "model_name": "digits",
            "model_version": 3,
            "sha256": SHA,
        },
        TelemetryReport: {
            "device_id": "cam-1",
            "seq": 17,
            "window_start": NOW.isoformat(),
            "window_end": (NOW + timedelta(seconds=60)).isoformat(),
            "models": [
                {
                    "model_name": "digits",
                    "model_version": 3,
                    "target": "edge-arm64-litert",
                    "inferences": 10,
                    "errors": 1,
                    "latency_ms": {"counts": [1] * N_LATENCY_BUCKETS},
                    "drift": {
                        "reference_id": SHA,
                        "features": [
                            {
                                "name": "x0",
                                "counts": [0, 3, 4, 2, 1, 0],
                                "moments": {"n": 10, "mean": 0.5, "m2": 2.0, "min": 0, "max": 1},
                            }
                        ],
                        "predictions": {"class_counts": [4, 6], "confidence_counts": [0] * 10},
                    },
                }
            ],
            "resources": {"rss_bytes": 50_000_000, "cpu_seconds": 1.5},
            "dropped_reports": 2,
        },
        BlockRequest: {
            "device_id": "cam-1",
            "request_id": "req-1",
            "sha256": SHA,
            "offset": 65536,
            "block_size": 65536,
            "count": 4,
        },
        BlockHeader: {
            "request_id": "req-1",
            "sha256": SHA,
            "offset": 0,
            "length": 3,
            "total_length": 10,
            "block_sha256": SHA,
        },
    }


ALL = list(samples())


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.SCHEMA)
def test_round_trip_is_exact(cls: type[Message]) -> None:
    message = cls.from_dict(samples()[cls])
    raw = message.to_bytes()
    again = cls.from_bytes(raw)
    assert again == message
    assert again.to_bytes() == raw
    decoded = json.loads(raw)
    assert decoded["schema"] == cls.SCHEMA
    assert decoded["schema_version"] == 1


def _first_nested_object(data: dict[str, Any]) -> list[str | int] | None:
    """Path to the first JSON object nested in ``data`` (inside lists too)."""
    for name, value in data.items():
        if isinstance(value, dict):
            return [name]
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return [name, 0]
    return None


def _at(data: Any, path: list[str | int]) -> Any:
    for step in path:
        data = data[step]
    return data


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.SCHEMA)
def test_unknown_fields_survive_a_round_trip(cls: type[Message]) -> None:
    data = samples()[cls]
    path = _first_nested_object(data)
    if path is not None:
        _at(data, path)["future_field"] = "kept"
    data["added_in_v1_9"] = {"nested": [1, 2, 3]}
    decoded = json.loads(cls.from_bytes(cls.from_dict(data).to_bytes()).to_bytes())
    assert decoded["added_in_v1_9"] == {"nested": [1, 2, 3]}
    if path is not None:
        assert _at(decoded, path)["future_field"] == "kept"


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.SCHEMA)
def test_size_limit_is_checked_before_parsing(cls: type[Message]) -> None:
    # Not even valid JSON: a parser would fail differently. The size check comes first.
    raw = b"{" * (cls.MAX_BYTES + 1)
    with pytest.raises(PayloadTooLargeError, match="over its limit"):
        cls.from_bytes(raw)


def test_oversized_message_is_not_produced() -> None:
    data = samples()[Event]
    data["detail"] = "x" * 1000
    data["padding"] = "y" * Event.MAX_BYTES
    with pytest.raises(PayloadTooLargeError):
        Event.from_dict(data).to_bytes()


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.SCHEMA)
def test_other_schema_and_newer_major_are_refused(cls: type[Message]) -> None:
    data = samples()[cls]
    with pytest.raises(MessageError, match="expected"):
        cls.from_dict({**data, "schema": "ef.something-else"})
    with pytest.raises(MessageError, match="newer than this build"):
        cls.from_dict({**data, "schema_version": 2})


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"[]", b"null", b'{"schema": "ef.presence"}', b"\xff\xfe"],
)
def test_malformed_payloads_raise_message_error(raw: bytes) -> None:
    with pytest.raises(MessageError):
        Presence.from_bytes(raw)


def test_errors_name_the_field() -> None:
    data = samples()[TelemetryReport]
    data["seq"] = -1
    data["device_id"] = "a/b"
    with pytest.raises(MessageError) as info:
        TelemetryReport.from_dict(data)
    assert "seq" in str(info.value) and "device_id" in str(info.value)


def test_nan_and_infinity_are_refused() -> None:
    for bad in (float("nan"), float("inf")):
        data = samples()[TelemetryReport]
        data["models"][0]["drift"]["features"][0]["moments"]["mean"] = bad
        with pytest.raises(MessageError, match="mean"):
            TelemetryReport.from_dict(data)
    with pytest.raises(MessageError):
        TelemetryReport.from_bytes(
            json.dumps(samples()[TelemetryReport]).replace('"mean": 0.5', '"mean": NaN')
        )


def test_telemetry_window_must_not_run_backwards() -> None:
    data = samples()[TelemetryReport]
    data["window_end"] = (NOW - timedelta(seconds=1)).isoformat()
    with pytest.raises(MessageError, match="window_end"):
        TelemetryReport.from_dict(data)


def test_naive_timestamps_are_refused() -> None:
    data = samples()[DeviceState]
    data["reported_at"] = "2026-11-29T12:00:00"
    with pytest.raises(MessageError, match="reported_at"):
        DeviceState.from_dict(data)


def test_a_model_is_deployed_once() -> None:
    deployment = make_desired().deployments[0].model_dump(mode="json")
    with pytest.raises(MessageError, match="deployed twice"):
        DesiredState.from_dict(
            {**make_desired().to_dict(), "deployments": [deployment, deployment]}
        )


def test_keyring_key_id_must_match_its_key() -> None:
    data = make_keyring(key("a")).to_dict()
    data["keys"][0]["keyid"] = key("b").keyid
    with pytest.raises(MessageError, match="keyid"):
        Keyring.from_dict(data)


# ----------------------------------------------------------------------------- blocks


def test_block_frame_round_trip_and_checks() -> None:
    import hashlib

    data = b"abc"
    header = BlockHeader(
        request_id="r",
        sha256=SHA,
        offset=4,
        length=3,
        total_length=10,
        block_sha256=hashlib.sha256(data).hexdigest(),
    )
    frame = encode_block(header, data)
    assert frame[:4] == b"EFB1"
    assert decode_block(frame) == (header, data)
    with pytest.raises(MessageError, match="block_sha256"):
        decode_block(frame[:-1] + b"X")
    with pytest.raises(MessageError, match="carries"):
        decode_block(frame + b"more")
    with pytest.raises(MessageError, match="starts with"):
        decode_block(b"XXXX" + frame[4:])
    with pytest.raises(MessageError, match="header length"):
        decode_block(frame[:4] + (10**6).to_bytes(4, "big") + frame[8:])
    with pytest.raises(MessageError):
        decode_block(b"EF")


def test_block_header_consistency() -> None:
    with pytest.raises(MessageError, match="past the artifact"):
        BlockHeader.from_dict(
            {**samples()[BlockHeader], "offset": 9, "length": 3, "total_length": 10}
        )
    with pytest.raises(MessageError, match="carries no data"):
        BlockHeader.from_dict({**samples()[BlockHeader], "error": "unknown artifact"})
    error = BlockHeader.from_dict(
        {**samples()[BlockHeader], "length": 0, "error": "unknown artifact", "block_sha256": None}
    )
    assert decode_block(encode_block(error))[0].error == "unknown artifact"


# ----------------------------------------------------------------------------- properties

counts = st.lists(st.integers(0, 10**9), min_size=1, max_size=20)


@settings(max_examples=60)
@given(
    seq=st.integers(0, 2**62),
    inferences=st.integers(0, 10**9),
    feature_counts=counts,
    latency=st.dictionaries(
        st.integers(0, N_LATENCY_BUCKETS - 1), st.integers(0, 10**6), max_size=6
    ),
    mean=st.floats(allow_nan=False, allow_infinity=False, width=64),
    extra=st.dictionaries(
        st.sampled_from(["x_future", "x_vendor", "x_site"]),
        st.one_of(st.integers(), st.text(max_size=10), st.booleans(), st.none()),
        max_size=3,
    ),
)
def test_telemetry_round_trips_for_any_values(
    seq: int,
    inferences: int,
    feature_counts: list[int],
    latency: dict[int, int],
    mean: float,
    extra: dict[str, Any],
) -> None:
    data = samples()[TelemetryReport]
    data.update(extra)
    data["seq"] = seq
    model = data["models"][0]
    model["inferences"] = inferences
    model["latency_ms"]["counts"] = [latency.get(i, 0) for i in range(N_LATENCY_BUCKETS)]
    model["drift"]["features"][0]["counts"] = feature_counts
    model["drift"]["features"][0]["moments"]["mean"] = mean
    report = TelemetryReport.from_dict(data)
    again = TelemetryReport.from_bytes(report.to_bytes())
    assert again == report
    assert again.to_dict() == report.to_dict()


@given(
    device_id=st.text(
        alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-", min_size=1, max_size=64
    ).filter(lambda s: set(s) != {"."}),
    status=st.sampled_from(["online", "offline"]),
)
def test_presence_round_trips(device_id: str, status: str) -> None:
    message = Presence(device_id=device_id, status=status)  # type: ignore[arg-type]
    assert Presence.from_bytes(message.to_bytes()) == message


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (
            b'{"schema":"ef.presence","schema_version":1,"device_id":"a","device_id":"b",'
            b'"status":"online"}',
            "appears twice",
        ),
        (
            b'{"schema":"ef.presence","schema_version":1,"device_id":"a","status":"online",'
            b'"x_future":NaN}',
            "NaN",
        ),
        (
            b'{"schema":"ef.presence","schema_version":1,"device_id":"a","status":"online",'
            b'"x":{"y":Infinity}}',
            "Infinity",
        ),
        (b'{"schema_version":1,"device_id":"a","status":"online"}', "missing schema"),
        (b'{"schema":"ef.presence","device_id":"a","status":"online"}', "missing schema_version"),
    ],
)
def test_payloads_are_parsed_strictly(raw: bytes, problem: str) -> None:
    """Two parsers must never read one payload two ways, and NaN is never kept."""
    with pytest.raises(MessageError, match=problem):
        Presence.from_bytes(raw)


def test_error_blocks_echo_an_out_of_range_request() -> None:
    header = BlockHeader(
        request_id="r",
        sha256=SHA,
        offset=10**9,
        length=0,
        total_length=100,
        error="offset past end",
    )
    assert decode_block(encode_block(header))[0].offset == 10**9
