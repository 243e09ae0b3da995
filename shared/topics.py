"""MQTT topic names: the only place where topic strings are built or taken apart.

Every device topic is ``ef/v1/dev/{device_id}/{channel}``. A device id is 1-64
characters of ``[A-Za-z0-9._-]`` and not made of dots alone, so the MQTT
wildcards ``+`` and ``#``, the level separator ``/``, ``$`` (system topics) and
path tricks such as ``..`` can never reach a topic, an ACL pattern or a file name.

:data:`CHANNELS` records, per channel, who publishes it and with which QoS and
retain flag; publishers and the broker configuration read it from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from shared.errors import TopicError

__all__ = [
    "CHANNELS",
    "PREFIX",
    "Channel",
    "ChannelSpec",
    "DeviceTopic",
    "Direction",
    "check_device_id",
    "device_filter",
    "device_topic",
    "fleet_filter",
    "parse_topic",
]

PREFIX = "ef/v1"
_DEVICE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_MAX_TOPIC_BYTES = 256
_SHARE_GROUP = re.compile(r"[A-Za-z0-9_-]{1,32}")


class Channel(StrEnum):
    """The last level(s) of a device topic."""

    DESIRED = "desired"
    STATE = "state"
    PRESENCE = "presence"
    EVENTS = "events"
    TELEMETRY = "telemetry"
    ARTIFACT_REQUEST = "artifact/req"
    ARTIFACT_BLOCK = "artifact/blk"
    FEEDBACK = "feedback"
    SAMPLES = "samples"


class Direction(StrEnum):
    TO_DEVICE = "server->device"
    FROM_DEVICE = "device->server"


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    direction: Direction
    qos: int
    retain: bool
    summary: str


CHANNELS: dict[Channel, ChannelSpec] = {
    Channel.DESIRED: ChannelSpec(
        Direction.TO_DEVICE, 1, True, "signed desired deployment; latest wins"
    ),
    Channel.STATE: ChannelSpec(Direction.FROM_DEVICE, 1, True, "what the device runs now"),
    Channel.PRESENCE: ChannelSpec(
        Direction.FROM_DEVICE, 1, True, "online / offline; offline is the Last Will"
    ),
    Channel.EVENTS: ChannelSpec(Direction.FROM_DEVICE, 1, False, "update lifecycle events"),
    Channel.TELEMETRY: ChannelSpec(
        Direction.FROM_DEVICE, 1, False, "one report per window, keyed by (device_id, seq)"
    ),
    Channel.ARTIFACT_REQUEST: ChannelSpec(
        Direction.FROM_DEVICE, 1, False, "request for artifact blocks"
    ),
    Channel.ARTIFACT_BLOCK: ChannelSpec(
        Direction.TO_DEVICE, 1, False, "artifact blocks (binary frame)"
    ),
    Channel.FEEDBACK: ChannelSpec(
        Direction.FROM_DEVICE, 1, False, "ground-truth labels for past predictions"
    ),
    Channel.SAMPLES: ChannelSpec(
        Direction.FROM_DEVICE, 1, False, "captured input samples (opt-in), keyed by window seq"
    ),
}


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    device_id: str
    channel: Channel

    def __str__(self) -> str:
        return device_topic(self.device_id, self.channel)


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` unchanged if it is a valid device id, else raise :class:`TopicError`."""
    if not isinstance(device_id, str):
        raise TopicError(f"device id must be a string, not {type(device_id).__name__}")
    if not _DEVICE_ID.fullmatch(device_id):
        shown = device_id if len(device_id) <= 80 else device_id[:77] + "..."
        raise TopicError(
            f"invalid device id {shown!r}: use 1-64 characters of letters, digits, '.', '_' or '-'"
        )
    if set(device_id) == {"."}:
        raise TopicError(f"invalid device id {device_id!r}: it may not consist of dots only")
    return device_id


def device_topic(device_id: str, channel: Channel | str) -> str:
    """The topic of ``channel`` for ``device_id``, e.g. ``ef/v1/dev/cam-7/telemetry``."""
    return f"{PREFIX}/dev/{check_device_id(device_id)}/{_channel(channel).value}"


def device_filter(device_id: str) -> str:
    """The filter covering every topic of one device: what its ACL allows."""
    return f"{PREFIX}/dev/{check_device_id(device_id)}/#"


def fleet_filter(channel: Channel | str, *, share_group: str | None = None) -> str:
    """The filter for one channel of every device, optionally as a shared subscription.

    ``fleet_filter("telemetry", share_group="ingest")`` is
    ``$share/ingest/ef/v1/dev/+/telemetry``: the broker hands each message to one
    member of the group, so ingestion scales out across processes.
    """
    topic_filter = f"{PREFIX}/dev/+/{_channel(channel).value}"
    if share_group is None:
        return topic_filter
    if not _SHARE_GROUP.fullmatch(share_group):
        raise TopicError(f"invalid shared-subscription group {share_group!r}")
    return f"$share/{share_group}/{topic_filter}"


def parse_topic(topic: str) -> DeviceTopic:
    """Split a concrete device topic into device id and channel, or raise :class:`TopicError`."""
    if not isinstance(topic, str):
        raise TopicError(f"topic must be a string, not {type(topic).__name__}")
    if len(topic.encode("utf-8", "surrogatepass")) > _MAX_TOPIC_BYTES:
        raise TopicError(f"topic is longer than {_MAX_TOPIC_BYTES} bytes")
    head = f"{PREFIX}/dev/"
    if not topic.startswith(head):
        raise TopicError(f"topic {topic!r} is not under {head!r}")
    rest = topic[len(head) :]
    device_id, sep, channel_name = rest.partition("/")
    if not sep:
        raise TopicError(f"topic {topic!r} has no channel")
    check_device_id(device_id)
    try:
        channel = Channel(channel_name)
    except ValueError:
        raise TopicError(f"topic {topic!r} names unknown channel {channel_name!r}") from None
    return DeviceTopic(device_id, channel)


def _channel(channel: Channel | str) -> Channel:
    try:
        return Channel(channel)
    except ValueError:
        raise TopicError(f"unknown channel {channel!r}") from None
