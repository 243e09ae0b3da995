"""Who may use which topic: the broker access rules, as data, for every broker we configure.

The rules follow the wire contract's channel table (:data:`shared.topics.CHANNELS`):

- a **device** reads the channels that flow to it (``desired``, ``artifact/blk``) and
  writes the channels that flow from it (``state``, ``presence``, ``events``,
  ``telemetry``, ``artifact/req``) -- each under ``ef/v1/dev/<its own id>/`` only;
- the server's **service** identity writes the device-bound channels of every device
  (``ef/v1/dev/+/desired``, ``ef/v1/dev/+/artifact/blk``) and reads the device-sent
  ones, directly or through a shared subscription (``$share/<group>/ef/v1/dev/+/...``).

Nothing else is allowed: no other topic, no ``$SYS``, no reading what a device itself
sends, no writing what the server sends. The Mosquitto ACL file
(:mod:`server.brokerconf.render`) and the embedded broker's topic plugin
(:mod:`server.broker`) are both made from these rules, so the two brokers cannot drift.

Everything here is pure. What always holds:

- :func:`may_publish` and :func:`may_receive` take a concrete topic (no wildcards, no
  ``$`` prefix); anything else is refused.
- :func:`may_subscribe` allows a filter only when *every* topic it can match is
  readable (a filter that could also match something unreadable is refused whole), and
  a shared subscription only when the identity may read shared subscriptions at all.
- A device id that fails :func:`shared.topics.check_device_id` has no rules: it
  cannot smuggle ``+``, ``#``, ``/`` or ``$`` into a rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from shared.errors import TopicError
from shared.topics import CHANNELS, Direction, check_device_id, device_topic, fleet_filter

__all__ = [
    "SHARE_PREFIX",
    "Access",
    "Rules",
    "TopicRule",
    "device_rules",
    "filter_covered",
    "may_publish",
    "may_receive",
    "may_subscribe",
    "service_rules",
    "split_shared",
    "topic_matches",
]

SHARE_PREFIX = "$share/"


class Access(StrEnum):
    READ = "read"  # subscribe and receive
    WRITE = "write"  # publish (and a Last Will)


@dataclass(frozen=True, slots=True)
class TopicRule:
    access: Access
    topic_filter: str
    shared: bool = False
    """Also through ``$share/<group>/<topic_filter>`` (read rules only)."""


Rules = tuple[TopicRule, ...]


def device_rules(device_id: str) -> Rules:
    """What device ``device_id`` may do: its own device-bound channels read, the rest written."""
    check_device_id(device_id)
    return tuple(
        TopicRule(
            Access.READ if spec.direction == Direction.TO_DEVICE else Access.WRITE,
            device_topic(device_id, channel),
        )
        for channel, spec in CHANNELS.items()
    )


def service_rules() -> Rules:
    """What the server's own clients may do: send to every device, hear from every device."""
    return tuple(
        TopicRule(Access.WRITE, fleet_filter(channel))
        if spec.direction == Direction.TO_DEVICE
        else TopicRule(Access.READ, fleet_filter(channel), shared=True)
        for channel, spec in CHANNELS.items()
    )


# ----------------------------------------------------------------------------- matching


def _concrete(topic: str) -> bool:
    return bool(topic) and not topic.startswith("$") and "+" not in topic and "#" not in topic


def _valid_filter(topic_filter: str) -> bool:
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def topic_matches(topic: str, topic_filter: str) -> bool:
    """Whether concrete ``topic`` matches ``topic_filter`` (MQTT 3.1.1 section 4.7)."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False  # [MQTT-4.7.2-1]
    topic_levels = topic.split("/")
    filter_levels = topic_filter.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True  # also matches the parent level: "a/#" matches "a"
        if index >= len(topic_levels) or level not in ("+", topic_levels[index]):
            return False
    return len(topic_levels) == len(filter_levels)


def filter_covered(requested: str, allowed: str) -> bool:
    """Whether every topic that filter ``requested`` can match also matches ``allowed``."""
    requested_levels = requested.split("/")
    allowed_levels = allowed.split("/")
    for index, level in enumerate(allowed_levels):
        if level == "#":
            return True
        if index >= len(requested_levels):
            return False
        wanted = requested_levels[index]
        if wanted == "#":
            return False  # requested reaches deeper (and the parent) than allowed does
        if level == "+":
            continue
        if wanted != level:  # a literal covers only itself, never "+"
            return False
    return len(requested_levels) == len(allowed_levels)


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """``("group", "filter")`` for ``$share/group/filter``, else ``(None, topic_filter)``.

    Raises :class:`~shared.errors.TopicError` for a malformed shared subscription.
    """
    if not topic_filter.startswith(SHARE_PREFIX):
        return None, topic_filter
    group, sep, rest = topic_filter[len(SHARE_PREFIX) :].partition("/")
    if not sep or not group or not rest or "+" in group or "#" in group:
        raise TopicError(f"malformed shared subscription {topic_filter!r}")
    return group, rest


def may_publish(rules: Rules, topic: str) -> bool:
    """Whether a client with ``rules`` may publish to (or leave a Last Will on) ``topic``."""
    return _concrete(topic) and any(
        rule.access == Access.WRITE and topic_matches(topic, rule.topic_filter) for rule in rules
    )


def may_receive(rules: Rules, topic: str) -> bool:
    """Whether a message on concrete ``topic`` may be delivered to a client with ``rules``."""
    return _concrete(topic) and any(
        rule.access == Access.READ and topic_matches(topic, rule.topic_filter) for rule in rules
    )


def may_subscribe(rules: Rules, topic_filter: str) -> bool:
    """Whether a client with ``rules`` may subscribe to ``topic_filter`` (see the module doc)."""
    try:
        group, plain = split_shared(topic_filter)
    except TopicError:
        return False
    if plain.startswith("$") or not _valid_filter(plain):
        return False
    return any(
        rule.access == Access.READ
        and (group is None or rule.shared)
        and filter_covered(plain, rule.topic_filter)
        for rule in rules
    )
