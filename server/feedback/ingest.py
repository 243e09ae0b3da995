"""Feedback from devices: the ingestor's consumer of ``ef/v1/dev/{id}/feedback``.

Each :class:`~shared.messages.FeedbackReport` is validated against its topic like
telemetry (:func:`server.ingest.consumers.parse_device_message`); its outcomes are
stored by :func:`server.feedback.service.store_device_feedback` in the batch's
transaction -- once per ``(device_id, prediction_id)``, so a redelivered report changes
nothing. An outcome that cannot be stored (unknown model or version, a regression
model, a label the model does not know, a prediction labelled otherwise before) is
dropped and counted per device under that reason; the report's other outcomes stay.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlmodel import Session

from server.feedback.service import FeedbackInput, store_device_feedback
from server.ingest.consumers import ConsumerResult, DeviceMessage, parse_device_message
from server.ingest.telemetry import IngestRejected
from shared.messages import FeedbackReport
from shared.topics import Channel

__all__ = ["FeedbackConsumer"]


class FeedbackConsumer:
    """:class:`~server.ingest.consumers.ChannelConsumer` for device feedback."""

    channel = Channel.FEEDBACK

    def parse(self, topic: str, payload: bytes) -> FeedbackReport:
        return parse_device_message(topic, payload, channel=self.channel, cls=FeedbackReport)

    def store(
        self, session: Session, messages: Sequence[DeviceMessage], *, now: datetime
    ) -> ConsumerResult:
        items = [
            FeedbackInput(
                device_id=report.device_id,
                prediction_id=outcome.prediction_id,
                model_name=outcome.model_name,
                model_version=outcome.model_version,
                predicted_label=outcome.predicted_label,
                true_label=outcome.true_label,
                predicted_at=outcome.predicted_at,
                labelled_at=outcome.labelled_at,
            )
            for report in messages
            if isinstance(report, FeedbackReport)
            for outcome in report.outcomes
        ]
        stored = store_device_feedback(session, items, now=now)
        return ConsumerResult(
            stored=stored.stored,
            duplicates=stored.duplicates,
            drops=[
                IngestRejected(r.reason, r.device_id, f"prediction {r.prediction_id}: {r.detail}")
                for r in stored.refused
            ],
        )
