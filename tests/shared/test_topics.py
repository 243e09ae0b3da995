from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import TopicError
from shared.topics import (
    CHANNELS,
    Channel,
    Direction,
    check_device_id,
    device_filter,
    device_topic,
    fleet_filter,
    parse_topic,
)

VALID_IDS = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-",
    min_size=1,
    max_size=64,
).filter(lambda s: set(s) != {"."})


def test_every_channel_builds_and_parses() -> None:
    for channel in Channel:
        topic = device_topic("cam-7", channel)
        assert topic == f"ef/v1/dev/cam-7/{channel.value}"
        parsed = parse_topic(topic)
        assert (parsed.device_id, parsed.channel) == ("cam-7", channel)
        assert str(parsed) == topic


def test_channel_table_matches_the_architecture() -> None:
    retained = {c for c, spec in CHANNELS.items() if spec.retain}
    assert retained == {Channel.DESIRED, Channel.STATE, Channel.PRESENCE}
    assert all(spec.qos == 1 for spec in CHANNELS.values())
    to_device = {c for c, spec in CHANNELS.items() if spec.direction is Direction.TO_DEVICE}
    assert to_device == {Channel.DESIRED, Channel.ARTIFACT_BLOCK}


@pytest.mark.parametrize(
    "bad",
    ["", "a" * 65, "cam/1", "cam+1", "cam#", "$SYS", "a b", "ü", ".", "..", "...", "cam\x00"],
)
def test_bad_device_ids_are_refused_with_a_clear_error(bad: str) -> None:
    with pytest.raises(TopicError, match="invalid device id"):
        device_topic(bad, Channel.STATE)


def test_non_string_id_is_refused() -> None:
    with pytest.raises(TopicError):
        check_device_id(42)  # type: ignore[arg-type]


@given(VALID_IDS, st.sampled_from(list(Channel)))
def test_round_trip_for_any_valid_id(device_id: str, channel: Channel) -> None:
    topic = device_topic(device_id, channel)
    assert "+" not in topic.split("/", 4)[3] and "#" not in topic
    assert parse_topic(topic).device_id == device_id


@given(st.text(max_size=80))
def test_parse_never_accepts_a_wildcard_or_foreign_topic(text: str) -> None:
    try:
        parsed = parse_topic(text)
    except TopicError:
        return
    assert parsed.device_id == check_device_id(parsed.device_id)
    assert "+" not in parsed.device_id and "#" not in parsed.device_id


@pytest.mark.parametrize(
    "topic",
    [
        "ef/v2/dev/cam-1/state",
        "ef/v1/dev/cam-1",
        "ef/v1/dev/cam-1/",
        "ef/v1/dev/cam-1/unknown",
        "ef/v1/dev/+/state",
        "ef/v1/dev/#",
        "ef/v1/dev/cam-1/state/extra",
        "ef/v1/dev/" + "a" * 300 + "/state",
    ],
)
def test_parse_refuses(topic: str) -> None:
    with pytest.raises(TopicError):
        parse_topic(topic)


def test_filters() -> None:
    assert device_filter("cam-1") == "ef/v1/dev/cam-1/#"
    assert fleet_filter(Channel.TELEMETRY) == "ef/v1/dev/+/telemetry"
    assert fleet_filter("events", share_group="ingest") == "$share/ingest/ef/v1/dev/+/events"
    with pytest.raises(TopicError):
        fleet_filter("telemetry", share_group="a/b")
    with pytest.raises(TopicError):
        fleet_filter("nope")
