"""Samples: input rows devices captured (opt-in), and the dataset versions made from them.

Agents send what their monitor captured over MQTT through their durable outbox
(``ef/v1/dev/{id}/samples``, :class:`shared.messages.SampleBatch`); the ingestor stores
each batch once (:mod:`server.samples.ingest`). :mod:`server.samples.service` joins the
rows with feedback labels by prediction id and adds them, with the model's training
data, as a new version of the model's dataset whose lineage names the devices and the
time range they came from.
"""

__all__: list[str] = []
