"""More device channels for the ingestor: the seam between ingestion and what stores them.

:class:`~server.ingest.telemetry.TelemetryIngestor` always consumes telemetry; each
:class:`ChannelConsumer` it is given adds one more device-to-server channel, received
over the same connection (and the same shared subscription) and stored in the same
transaction as the telemetry of its batch, before the batch is acknowledged. So each
channel inherits the ingestor's guarantees: nothing is acknowledged before it is
committed, a payload that fails validation is dropped and counted per device and
reason, and an unaccepted device's messages are refused as ``unknown_device``.

A consumer makes the exactly-once effect its own way (a unique key per message) and
must not raise on bad data: refusals come back in :class:`ConsumerResult` (a raise
means "try the whole batch again later", for faults such as a lost database).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, TypeVar

from sqlmodel import Session

from server.ingest.telemetry import IngestRejected
from shared.errors import ContractError, PayloadTooLargeError
from shared.model import Message
from shared.topics import Channel, parse_topic

__all__ = ["ChannelConsumer", "ConsumerResult", "DeviceMessage", "parse_device_message"]

M = TypeVar("M", bound=Message)


class DeviceMessage(Protocol):
    """A parsed device-to-server message: it names its sender."""

    @property
    def device_id(self) -> str: ...


@dataclass
class ConsumerResult:
    stored: int = 0
    duplicates: int = 0
    drops: list[IngestRejected] = field(default_factory=list)


class ChannelConsumer(Protocol):
    """Parses and stores one device-to-server channel for the ingestor."""

    @property
    def channel(self) -> Channel: ...

    def parse(self, topic: str, payload: bytes) -> DeviceMessage:
        """Validate a payload against its topic, or raise :class:`IngestRejected`."""
        ...

    def store(
        self, session: Session, messages: Sequence[DeviceMessage], *, now: datetime
    ) -> ConsumerResult:
        """Store messages from accepted devices in the caller's transaction (no commit)."""
        ...


def parse_device_message(topic: str, payload: bytes, *, channel: Channel, cls: type[M]) -> M:
    """Validate a payload of ``cls`` published on ``channel``, or raise :class:`IngestRejected`
    with the telemetry path's reasons (``bad_topic``, ``oversized``, ``malformed``,
    ``wrong_device``). ``cls`` must have a ``device_id`` field."""
    try:
        parsed = parse_topic(topic)
    except ContractError as e:
        raise IngestRejected("bad_topic", "?", f"{topic!r}: {e}") from e
    if parsed.channel != channel:
        raise IngestRejected(
            "bad_topic", parsed.device_id, f"{topic!r} is not a {channel.value} topic"
        )
    try:
        message = cls.from_bytes(payload)
    except PayloadTooLargeError as e:
        raise IngestRejected("oversized", parsed.device_id, str(e)) from e
    except ContractError as e:
        raise IngestRejected("malformed", parsed.device_id, str(e)) from e
    sender = getattr(message, "device_id", None)
    if sender != parsed.device_id:
        raise IngestRejected(
            "wrong_device",
            parsed.device_id,
            f"a {cls.SCHEMA} message about {sender!r} published on {parsed.device_id!r}'s topic",
        )
    return message
