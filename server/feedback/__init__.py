"""Feedback: ground-truth labels for past predictions, and the live accuracy they give.

Labels come from any service (``POST /api/v1/feedback``) or from devices, whose agents
forward what was posted to their local API over MQTT (``ef/v1/dev/{id}/feedback``,
ingested by :mod:`server.feedback.ingest`). :mod:`server.feedback.service` stores them
once per ``(device_id, prediction_id)`` and answers accuracy per model version, group
or device list and time range (:func:`server.feedback.service.accuracy`).
"""

__all__: list[str] = []
