"""Samples from devices: the ingestor's consumer of ``ef/v1/dev/{id}/samples``.

Each :class:`~shared.messages.SampleBatch` is validated against its topic like telemetry
(:func:`server.ingest.consumers.parse_device_message`: size first, then schema, then
the sender) and stored once per ``(device_id, seq, model_name, part)`` in the batch's
transaction (:func:`server.samples.service.store_sample_batches`).

Storage is bounded in time: at most once an hour, in the same transaction, batches from
windows that ended more than ``retention`` ago are deleted
(:func:`server.samples.service.purge_samples`); with several workers each does so.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlmodel import Session

from server.ingest.consumers import ConsumerResult, DeviceMessage, parse_device_message
from server.samples.service import purge_samples, store_sample_batches
from shared.messages import SampleBatch
from shared.topics import Channel

__all__ = ["SamplesConsumer"]


class SamplesConsumer:
    """:class:`~server.ingest.consumers.ChannelConsumer` for captured samples."""

    channel = Channel.SAMPLES
    PURGE_EVERY = timedelta(hours=1)

    def __init__(self, *, retention: timedelta = timedelta(days=30)) -> None:
        if retention <= timedelta(0):
            raise ValueError("samples retention must be positive")
        self.retention = retention
        self._purged_at: datetime | None = None
        self.purged = 0

    def parse(self, topic: str, payload: bytes) -> SampleBatch:
        return parse_device_message(topic, payload, channel=self.channel, cls=SampleBatch)

    def store(
        self, session: Session, messages: Sequence[DeviceMessage], *, now: datetime
    ) -> ConsumerResult:
        batches = [m for m in messages if isinstance(m, SampleBatch)]
        stored, duplicates = store_sample_batches(session, batches, now=now)
        if self._purged_at is None or now - self._purged_at >= self.PURGE_EVERY:
            self.purged += purge_samples(session, before=now - self.retention)
            self._purged_at = now
        return ConsumerResult(stored=stored, duplicates=duplicates)
