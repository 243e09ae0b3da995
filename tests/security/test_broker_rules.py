"""The broker access rules (pure): who may publish, subscribe to and receive which topic."""

from __future__ import annotations

import pytest

from server.brokerconf.rules import (
    Access,
    device_rules,
    filter_covered,
    may_publish,
    may_receive,
    may_subscribe,
    service_rules,
    split_shared,
    topic_matches,
)
from shared.errors import TopicError
from shared.topics import CHANNELS, Channel, Direction, device_topic

DEVICE = device_rules("dev-a")
SERVICE = service_rules()


def test_a_device_reads_what_flows_to_it_and_writes_what_flows_from_it() -> None:
    for channel, spec in CHANNELS.items():
        own = device_topic("dev-a", channel)
        other = device_topic("dev-b", channel)
        to_device = spec.direction == Direction.TO_DEVICE
        assert may_receive(DEVICE, own) is to_device
        assert may_subscribe(DEVICE, own) is to_device
        assert may_publish(DEVICE, own) is not to_device
        assert not may_receive(DEVICE, other) and not may_publish(DEVICE, other)
        assert not may_subscribe(DEVICE, other)
    assert {rule.access for rule in DEVICE} == {Access.READ, Access.WRITE}


def test_the_service_sends_to_every_device_and_hears_from_every_device() -> None:
    for channel, spec in CHANNELS.items():
        topic = device_topic("any-device", channel)
        to_device = spec.direction == Direction.TO_DEVICE
        assert may_publish(SERVICE, topic) is to_device
        assert may_receive(SERVICE, topic) is not to_device
        shared = f"$share/ingest/ef/v1/dev/+/{channel.value}"
        assert may_subscribe(SERVICE, shared) is not to_device
    assert may_subscribe(SERVICE, "ef/v1/dev/+/telemetry")
    assert may_subscribe(SERVICE, "ef/v1/dev/cam-1/state")


@pytest.mark.parametrize(
    "topic_filter",
    [
        "#",
        "+/#",
        "ef/#",
        "ef/v1/dev/#",
        "ef/v1/dev/dev-a/#",  # would also match its own state, which it may not read
        "ef/v1/dev/+/desired",
        "ef/v1/dev/dev-a/+",
        "ef/v1/dev/dev-a/artifact/#",
        "$SYS/#",
        "$share/g/ef/v1/dev/dev-a/desired",  # devices take no shared subscriptions
        "ef/v1/dev/dev-a/desired/#",
        "ef/v1/dev/dev-a/desi+",
        "ef/v1/dev/dev-a/#/desired",
        "",
    ],
)
def test_a_device_may_not_subscribe_to_filters_that_reach_past_its_own_topics(
    topic_filter: str,
) -> None:
    assert not may_subscribe(DEVICE, topic_filter)


@pytest.mark.parametrize(
    "topic_filter",
    ["#", "ef/v1/dev/#", "ef/v1/dev/+/#", "$share/g/#", "$share//ef/v1/dev/+/state", "$share/g"],
)
def test_the_service_may_not_subscribe_to_everything(topic_filter: str) -> None:
    assert not may_subscribe(SERVICE, topic_filter)


@pytest.mark.parametrize(
    "topic",
    ["ef/v1/dev/+/state", "ef/v1/dev/dev-a/#", "$SYS/broker/x", "", "ef/v1/dev/dev-a/state/x"],
)
def test_wildcards_dollar_topics_and_unknown_levels_are_never_published(topic: str) -> None:
    assert not may_publish(DEVICE, topic) and not may_publish(SERVICE, topic)


@pytest.mark.parametrize(
    ("requested", "allowed", "covered"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/+", True),
        ("a/+", "a/+", True),
        ("a/+", "a/b", False),
        ("a/#", "a/+", False),
        ("a/#", "a/#", True),
        ("a", "a/#", True),
        ("a/b/c", "a/#", True),
        ("a/b/c", "a/+", False),
        ("+/b", "a/b", False),
        ("a", "a/b", False),
        ("#", "a/#", False),
    ],
)
def test_filter_coverage(requested: str, allowed: str, covered: bool) -> None:
    assert filter_covered(requested, allowed) is covered


def test_topic_matching_follows_mqtt() -> None:
    assert topic_matches("a", "a/#") and topic_matches("a/b/c", "a/#")
    assert topic_matches("a/b", "a/+") and not topic_matches("a/b/c", "a/+")
    assert not topic_matches("$SYS/x", "#") and not topic_matches("$SYS/x", "+/x")
    assert split_shared("$share/g/a/b") == ("g", "a/b") and split_shared("a/b") == (None, "a/b")
    with pytest.raises(TopicError):
        split_shared("$share/+/a")


@pytest.mark.parametrize("device_id", ["+", "#", "a/b", "dev-a/#", "$SYS", "..", "a b", ""])
def test_an_id_that_is_no_device_id_gets_no_rules(device_id: str) -> None:
    with pytest.raises(TopicError):
        device_rules(device_id)


def test_every_channel_has_a_rule_for_each_side() -> None:
    assert {rule.topic_filter for rule in DEVICE} == {
        device_topic("dev-a", channel) for channel in Channel
    }
    assert len(SERVICE) == len(CHANNELS)
