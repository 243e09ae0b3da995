"""The fast telemetry parse: it takes what agents send and gives what the strict parse gives;
whatever else, it hands to the strict parse (never takes something the contract refuses)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.drift.layout import Layout, LayoutError
from server.ingest.reports import ParsedReport, parse_fast
from server.ingest.telemetry import IngestRejected, parse_report
from shared.drift import DriftSketch
from shared.errors import ContractError
from shared.messages import Resources, TelemetryReport
from shared.topics import Channel, device_topic
from tests.server.drift.conftest import T0, make_reference, report, sketch_of

REFERENCE = make_reference()
DEVICE = "dev-1"


def agent_payload(seed: int = 0, rows: int = 300) -> bytes:
    """A report as an agent sends it: the contract's own encoding of a real sketch."""
    rng = np.random.default_rng(seed)
    sketch = sketch_of(REFERENCE, rng, rows) if rows else None
    r = report(DEVICE, seed, T0 + timedelta(minutes=seed), sketch)
    r.resources = Resources(rss_bytes=123_456, cpu_seconds=1.5, uptime_seconds=60)
    r.dropped_reports = 2
    return r.to_bytes()


def strict(payload: bytes) -> ParsedReport | None:
    try:
        parsed = TelemetryReport.from_bytes(payload)
    except ContractError:
        return None
    return ParsedReport.of_report(parsed) if parsed.device_id == DEVICE else None


def assert_same(fast: ParsedReport, slow: ParsedReport) -> None:
    for name in ("device_id", "seq", "window_start", "window_end", "dropped_reports"):
        assert getattr(fast, name) == getattr(slow, name), name
    assert (fast.rss_bytes, fast.cpu_seconds) == (slow.rss_bytes, slow.cpu_seconds)
    assert len(fast.models) == len(slow.models)
    for a, b in zip(fast.models, slow.models, strict=True):
        assert (a.model_name, a.model_version, a.target, a.inferences, a.errors) == (
            b.model_name,
            b.model_version,
            b.target,
            b.inferences,
            b.errors,
        )
        assert np.array_equal(a.latency, b.latency)
        assert json.loads(a.latency_json) == json.loads(b.latency_json)
        assert (a.drift_json is None) == (b.drift_json is None)
        if a.drift_json is not None and b.drift_json is not None:
            kept = DriftSketch.model_validate_json(a.drift_json)
            assert kept == DriftSketch.model_validate_json(b.drift_json)
            assert kept.features == []  # the rollups hold them; the window keeps the rest
            assert a.sketch is not None
            sent = a.sketch.sketch()
            assert (kept.reference_id, kept.predictions) == (sent.reference_id, sent.predictions)
        assert (a.sketch is None) == (b.sketch is None)
        if a.sketch is not None and b.sketch is not None:
            assert a.sketch.reference_id == b.sketch.reference_id
            assert a.sketch.features == b.sketch.features
            assert np.array_equal(a.sketch.counts, b.sketch.counts)
            assert np.array_equal(a.sketch.moments, b.sketch.moments)
            for part in ("class_counts", "confidence_counts", "value_counts"):
                x, y = getattr(a.sketch, part), getattr(b.sketch, part)
                assert (x is None and y is None) or np.array_equal(x, y), part
            assert a.sketch.value_moments == b.sketch.value_moments
            assert a.sketch.sketch() == b.sketch.sketch()


@pytest.mark.parametrize("seed", range(5))
def test_what_agents_send_takes_the_fast_path_and_reads_the_same(seed: int) -> None:
    payload = agent_payload(seed, rows=0 if seed == 4 else 50 + 100 * seed)
    fast = parse_fast(DEVICE, payload)
    slow = strict(payload)
    assert fast is not None and slow is not None
    assert_same(fast, slow)


def test_a_report_without_models_or_resources_takes_the_fast_path() -> None:
    payload = orjson.dumps(
        {
            "schema": "ef.telemetry",
            "schema_version": 1,
            "device_id": DEVICE,
            "seq": 0,
            "window_start": "2026-11-02T00:00:00Z",
            "window_end": "2026-11-02T01:01:00+01:00",
        }
    )
    fast, slow = parse_fast(DEVICE, payload), strict(payload)
    assert fast is not None and slow is not None
    assert_same(fast, slow)


def edit(payload: bytes, change: Any) -> bytes:
    data = json.loads(payload)
    change(data)
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def window(data: dict[str, Any]) -> dict[str, Any]:
    first: dict[str, Any] = data["models"][0]
    return first


def feature(data: dict[str, Any]) -> dict[str, Any]:
    first: dict[str, Any] = window(data)["drift"]["features"][0]
    return first


CASES: dict[str, Any] = {
    "seq as a string": lambda d: d.update(seq="7"),
    "seq as a float": lambda d: d.update(seq=7.0),
    "seq as a boolean": lambda d: d.update(seq=True),
    "negative seq": lambda d: d.update(seq=-1),
    "seq past 64 bits": lambda d: d.update(seq=2**64),
    "a newer schema version": lambda d: d.update(schema_version=2),
    "another schema": lambda d: d.update(schema="ef.event"),
    "no schema": lambda d: d.pop("schema"),
    "another device": lambda d: d.update(device_id="dev-2"),
    "a naive time": lambda d: d.update(window_start="2026-11-02T00:00:00"),
    "a time with a space": lambda d: d.update(window_start="2026-11-02 00:00:00Z"),
    "a 13th month": lambda d: d.update(window_start="2026-13-02T00:00:00Z"),
    "end before start": lambda d: d.update(window_end="2026-11-01T00:00:00Z"),
    "an unknown field": lambda d: d.update(extra={"kept": 1}),
    "an unknown window field": lambda d: window(d).update(extra=1),
    "a bad model name": lambda d: window(d).update(model_name="-bad"),
    "model version 0": lambda d: window(d).update(model_version=0),
    "a short latency histogram": lambda d: window(d)["latency_ms"]["counts"].pop(),
    "a negative latency count": lambda d: window(d)["latency_ms"]["counts"].__setitem__(0, -1),
    "a float count": lambda d: feature(d)["counts"].__setitem__(0, 3.0),
    "a string count": lambda d: feature(d)["counts"].__setitem__(0, "3"),
    "a negative count": lambda d: feature(d)["counts"].__setitem__(0, -3),
    "a nested count": lambda d: feature(d)["counts"].__setitem__(0, [3]),
    "too many counts": lambda d: feature(d).update(counts=[1] * 80),
    "an empty feature name": lambda d: feature(d).update(name=""),
    "moments n as a float": lambda d: feature(d)["moments"].update(n=2.5),
    "negative m2": lambda d: feature(d)["moments"].update(m2=-1.0),
    "no min": lambda d: feature(d)["moments"].update(min=None),
    "moments as null": lambda d: feature(d).update(moments=None),
    "a bad reference id": lambda d: window(d)["drift"].update(reference_id="abc"),
    "negative class counts": lambda d: window(d)["drift"]["predictions"].update(
        class_counts=[-1] * 3
    ),
    "resources as null": lambda d: d.update(resources=None),
    "negative rss": lambda d: d["resources"].update(rss_bytes=-1),
    "models as an object": lambda d: d.update(models={}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_fast_path_never_takes_what_the_strict_one_refuses(case: str) -> None:
    payload = edit(agent_payload(), CASES[case])
    fast, slow = parse_fast(DEVICE, payload), strict(payload)
    if slow is None:
        assert fast is None
    if fast is not None:
        assert slow is not None
        assert_same(fast, slow)


@pytest.mark.parametrize(
    "payload",
    [
        b'{"schema":"ef.telemetry","schema":"ef.telemetry"}',
        b"[1, 2]",
        b"{not json",
        b"",
        b"\xff\xfe",
    ],
)
def test_broken_payloads_go_to_the_strict_path(payload: bytes) -> None:
    assert parse_fast(DEVICE, payload) is None


def test_a_repeated_key_anywhere_goes_to_the_strict_path_which_refuses_it() -> None:
    payload = agent_payload()
    twice = payload.replace(b'"inferences":', b'"errors":0,"inferences":', 1)
    twice = twice.replace(b'"errors":0,', b"", 0)
    assert twice.count(b'"errors":') == payload.count(b'"errors":') + 1
    assert parse_fast(DEVICE, twice) is None
    assert strict(twice) is None
    with pytest.raises(IngestRejected) as refused:
        parse_report(device_topic(DEVICE, Channel.TELEMETRY), twice)
    assert refused.value.reason == "malformed" and "twice" in str(refused.value)


def test_other_spacing_is_read_by_the_strict_path_and_stored_the_same() -> None:
    payload = agent_payload()
    spaced = json.dumps(json.loads(payload), indent=1).encode()
    assert parse_fast(DEVICE, spaced) is None
    topic = device_topic(DEVICE, Channel.TELEMETRY)
    assert_same(parse_report(topic, spaced), parse_report(topic, payload))


JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.lists(st.integers(min_value=-5, max_value=5), max_size=3),
    st.builds(dict),
)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value[:3]):
            out += paths(item, (*prefix, i))
    return out


BASE = json.loads(agent_payload(seed=1, rows=80))
PATHS = [p for p in paths(BASE) if p]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(
        st.tuples(st.sampled_from(PATHS), JSON_LEAVES, st.booleans()), min_size=1, max_size=3
    )
)
def test_any_edit_is_refused_by_both_or_read_the_same(
    edits: list[tuple[tuple[Any, ...], Any, bool]],
) -> None:
    data = json.loads(json.dumps(BASE))
    for path, value, remove in edits:
        parent = data
        try:
            for step in path[:-1]:
                parent = parent[step]
            if remove and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = json.loads(json.dumps(value))  # a copy: no shared objects
        except (KeyError, IndexError, TypeError):
            continue
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
    fast, slow = parse_fast(DEVICE, payload), strict(payload)
    if fast is not None:
        assert slow is not None
        assert_same(fast, slow)


@pytest.mark.parametrize("seed", range(3))
def test_flattening_arrays_is_flattening_the_sketch(seed: int) -> None:
    payload = agent_payload(seed, rows=100)
    fast = parse_fast(DEVICE, payload)
    assert fast is not None and fast.models[0].sketch is not None
    arrays = fast.models[0].sketch
    sketch = arrays.sketch()
    for layout in (
        Layout.of_sketch(sketch),
        Layout.of_reference(make_reference(n_bins=6)),
        Layout(features=Layout.of_sketch(sketch).features, class_counts=4),
        Layout(features=Layout.of_sketch(sketch).features[:-1]),
    ):
        try:
            expected = layout.flatten(sketch)
        except LayoutError as e:
            with pytest.raises(LayoutError) as refused:
                layout.flatten_arrays(arrays)
            assert str(refused.value) == str(e)
            continue
        counts, moments = layout.flatten_arrays(arrays)
        assert np.array_equal(counts, expected[0])
        assert np.array_equal(moments, expected[1])
