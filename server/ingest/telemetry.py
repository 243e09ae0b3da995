"""Telemetry ingestion: device reports from the broker into the database, each exactly once.

:class:`TelemetryIngestor` subscribes to ``ef/v1/dev/+/telemetry`` -- through a shared
subscription (``$share/<group>/…``) when several ingestors run, so reports spread over
processes. paho's network thread only appends to a queue; a writer thread validates
and stores them in batches. Most payloads are validated by the fast path
(:func:`server.ingest.reports.parse_fast`: orjson and hand-written checks of the
contract's rules); whatever it is not sure of goes through ``shared``'s model, which
decides. What needs no database -- parsing, the rows, the drift
sketches flattened into their layouts (:func:`prepare_reports`) -- is done before the
batch's transaction, so on SQLite (one writer at a time, a write lock between
workers) the workers do it in parallel.

What always holds:

- Exactly-once effect on top of QoS 1: ``(device_id, seq)`` is the primary key of a
  report, and inserts skip rows that exist, so a redelivered or replayed report
  changes nothing. A report is acknowledged to the broker (manual PUBACK) only after
  the transaction holding it committed: a crash before that makes the broker deliver
  it again, never lose it.
- Every payload is validated with ``shared``'s schema. What fails -- a topic that is
  not a device topic, an oversized or malformed payload, a report about another
  device than the topic's, a device that is not an accepted member of the fleet -- is
  dropped, counted per device and reason in ``ingest_drops``, logged, and
  acknowledged (redelivery would not make it valid). Nothing a device sends stops the
  writer.
- Rows are written with the bulk statements of :mod:`server.drift.bulk` (the
  session's transaction, SQLAlchemy's own binding of every value).
- The model windows of the reports a batch newly stored are added to the drift
  rollups (:mod:`server.drift.rollups`) in the same transaction -- so exactly once,
  too. A report older than the raw-retention mark is refused as ``expired``; a drift
  sketch that does not fit its reference's layout is counted as ``drift_layout`` (the
  rest of its report is kept).
- More device channels ride along (:mod:`server.ingest.consumers`): each
  :class:`~server.ingest.consumers.ChannelConsumer` given is subscribed to on the same
  connection and shared-subscription group, and its messages are validated, refused
  for unaccepted devices, stored in the batch's transaction and acknowledged after
  the commit -- exactly as reports are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import Engine, delete, select, tuple_
from sqlmodel import Session

from server.db import utcnow
from server.drift import bulk
from server.drift.layout import Layout, LayoutError
from server.drift.rollups import FlatWindow, WindowInput, add_windows, retention_marks
from server.fleet.models import Device, DeviceStatus
from server.ingest.models import IngestDrop, ModelWindowRecord, TelemetryRecord
from server.ingest.reports import ParsedReport, ParsedWindow, parse_fast
from shared.errors import ContractError, PayloadTooLargeError
from shared.messages import TelemetryReport
from shared.topics import Channel, fleet_filter, parse_topic

if TYPE_CHECKING:
    from server.ingest.consumers import ChannelConsumer, DeviceMessage

__all__ = [
    "IngestRejected",
    "IngestStats",
    "PreparedReports",
    "TelemetryIngestor",
    "parse_report",
    "prepare_reports",
    "store_reports",
]

log = logging.getLogger(__name__)


class IngestRejected(Exception):
    """A payload never to be stored: ``reason`` is a short code, ``device_id`` who sent it."""

    def __init__(self, reason: str, device_id: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.device_id = device_id


def parse_report(topic: str, payload: bytes) -> ParsedReport:
    """Validate one telemetry payload against its topic, or raise :class:`IngestRejected`.

    Most payloads take the fast path (:func:`server.ingest.reports.parse_fast`); what it
    is not sure of is parsed by ``shared``'s :class:`~shared.messages.TelemetryReport`,
    which decides and words every refusal.
    """
    try:
        parsed = parse_topic(topic)
    except ContractError as e:
        raise IngestRejected("bad_topic", "?", f"{topic!r}: {e}") from e
    if parsed.channel != Channel.TELEMETRY:
        raise IngestRejected("bad_topic", parsed.device_id, f"{topic!r} is not a telemetry topic")
    if len(payload) <= TelemetryReport.MAX_BYTES:
        fast = parse_fast(parsed.device_id, payload)
        if fast is not None:
            return fast
    try:
        report = TelemetryReport.from_bytes(payload)
    except PayloadTooLargeError as e:
        raise IngestRejected("oversized", parsed.device_id, str(e)) from e
    except ContractError as e:
        raise IngestRejected("malformed", parsed.device_id, str(e)) from e
    if report.device_id != parsed.device_id:
        raise IngestRejected(
            "wrong_device",
            parsed.device_id,
            f"a report about {report.device_id!r} published on {parsed.device_id!r}'s topic",
        )
    return ParsedReport.of_report(report)


_REPORT_COLUMNS = (
    "device_id",
    "seq",
    "window_start",
    "window_end",
    "received_at",
    "dropped_reports",
    "rss_bytes",
    "cpu_seconds",
)
_WINDOW_COLUMNS = (
    "device_id",
    "seq",
    "model_name",
    "model_version",
    "target",
    "window_start",
    "window_end",
    "inferences",
    "errors",
    "latency_json",
    "drift_json",
)


@dataclass(frozen=True, slots=True)
class PreparedReports:
    """A batch of reports turned into rows ahead of its transaction (no database needed):
    per ``(device_id, seq)``, the report, its ``model_windows`` rows and its model
    windows flattened for the rollups (:func:`server.drift.rollups.flatten_windows`)."""

    reports: dict[tuple[str, int], ParsedReport]
    window_rows: dict[tuple[str, int], list[tuple[Any, ...]]]
    """Values in :data:`_WINDOW_COLUMNS` order."""
    windows: dict[tuple[str, int], list[WindowInput | FlatWindow]]


def _rollup_window(
    report: ParsedReport, m: ParsedWindow, layouts: Mapping[str, Layout]
) -> WindowInput | FlatWindow:
    """One model window ready for the rollups: flattened if its layout is known (as
    :func:`server.drift.rollups.flatten_window` does), else with its sketch as a model."""
    window = WindowInput(
        device_id=report.device_id,
        model_name=m.model_name,
        model_version=m.model_version,
        window_start=report.window_start,
        inferences=m.inferences,
        errors=m.errors,
        latency=m.latency,
        sketch=None,
    )
    arrays = m.sketch
    if arrays is None:
        return FlatWindow(window, m.latency, "", None, None)
    layout = layouts.get(arrays.reference_id)
    if layout is None:  # recorded (or read) in the transaction, then flattened there
        return dataclasses.replace(window, sketch=arrays.sketch())
    try:
        counts, moments = layout.flatten_arrays(arrays)
    except LayoutError as e:
        return FlatWindow(window, m.latency, "", None, None, refused=str(e))
    return FlatWindow(window, m.latency, arrays.reference_id, counts, moments)


def prepare_reports(
    reports: Iterable[TelemetryReport | ParsedReport],
    *,
    layouts: Mapping[str, Layout] | None = None,
) -> PreparedReports:
    """The CPU part of storing ``reports``: done before the transaction, so ingestion
    workers do it in parallel even where the database takes one writer at a time.

    ``layouts`` are drift layouts known to be recorded; sketches of other references
    are flattened in the transaction, once their layout is recorded.
    """
    batch: dict[tuple[str, int], ParsedReport] = {}
    for r in reports:  # a duplicate within the batch, too
        parsed = r if isinstance(r, ParsedReport) else ParsedReport.of_report(r)
        batch[(parsed.device_id, parsed.seq)] = parsed
    known = layouts or {}
    window_rows: dict[tuple[str, int], list[tuple[Any, ...]]] = {}
    windows: dict[tuple[str, int], list[WindowInput | FlatWindow]] = {}
    for key, r in batch.items():
        window_rows[key] = [
            (
                r.device_id,
                r.seq,
                m.model_name,
                m.model_version,
                m.target,
                r.window_start,
                r.window_end,
                m.inferences,
                m.errors,
                m.latency_json,
                m.drift_json,
            )
            for m in r.models
        ]
        windows[key] = [_rollup_window(r, m, known) for m in r.models]
    return PreparedReports(reports=batch, window_rows=window_rows, windows=windows)


def store_reports(
    session: Session,
    reports: Iterable[TelemetryReport | ParsedReport] | PreparedReports,
    *,
    layouts: dict[str, Layout] | None = None,
    shard: int = 0,
) -> int:
    """Insert reports not stored yet (in the caller's transaction); return how many were new.

    Which reports are new is what the insert itself reports (``RETURNING`` the rows it
    wrote), so only those add to the drift rollups (:func:`server.drift.rollups.add_windows`)
    -- exactly once, even with several ingestion workers. A report that ended before
    the raw-retention mark is refused as ``expired`` (and its row taken out again): its
    copy may have been counted and deleted already. The marks are read after the insert,
    under a share lock, so a purge running meanwhile is either seen or waits.

    ``reports`` may come prepared (:func:`prepare_reports`). ``layouts`` is the caller's
    cache of recorded drift layouts; this adds the ones it reads or records, which are
    only recorded for sure once the transaction commits. ``shard`` is the fleet rollup
    rows' shard (the ingestion worker's index, see :func:`~server.drift.rollups.add_windows`).
    """
    prepared = (
        reports
        if isinstance(reports, PreparedReports)
        else prepare_reports(reports, layouts=layouts)
    )
    batch = prepared.reports
    if not batch:
        return 0
    table = TelemetryRecord.__table__  # type: ignore[attr-defined]
    received = utcnow()
    keys = list(batch)
    inserted = bulk.insert_returning(
        session,
        table,
        _REPORT_COLUMNS,
        [
            (
                r.device_id,
                r.seq,
                r.window_start,
                r.window_end,
                received,
                r.dropped_reports,
                r.rss_bytes,
                r.cpu_seconds,
            )
            for r in batch.values()
        ],
        ("device_id", "seq"),
        ("device_id", "seq"),
    )
    new = [key for key, row in zip(keys, inserted, strict=True) if row is not None]
    marks = retention_marks(session, lock=True)
    raw_mark = marks.get("raw")
    expired = [] if raw_mark is None else [k for k in new if batch[k].window_end < raw_mark]
    if expired:
        session.execute(delete(table).where(tuple_(table.c.device_id, table.c.seq).in_(expired)))
        assert raw_mark is not None
        record_drops(
            session,
            [
                IngestRejected(
                    "expired",
                    batch[key].device_id,
                    f"report {batch[key].seq} ended at {batch[key].window_end.isoformat()}, "
                    f"before the retention mark {raw_mark.isoformat()}",
                )
                for key in expired
            ],
            at=received,
        )
        log.warning("expired telemetry refused", extra={"reports": len(expired)})
        gone = set(expired)
        new = [key for key in new if key not in gone]
    bulk.insert_ignore(
        session,
        ModelWindowRecord.__table__,  # type: ignore[attr-defined]
        _WINDOW_COLUMNS,
        [row for key in new for row in prepared.window_rows[key]],
        ("device_id", "seq", "model_name"),
    )
    rolled = add_windows(
        session,
        [window for key in new for window in prepared.windows[key]],
        marks=marks,
        layouts=layouts,
        shard=shard,
    )
    if rolled.refused_sketches:  # the report counts; its drift sketch did not fit
        record_drops(
            session,
            [IngestRejected("drift_layout", d, why) for d, why in rolled.refused_sketches],
            at=received,
        )
    return len(new)


def _only(prepared: PreparedReports, devices: set[str]) -> PreparedReports:
    """The reports of ``devices`` out of a prepared batch."""
    keys = [key for key in prepared.reports if key[0] in devices]
    return PreparedReports(
        reports={key: prepared.reports[key] for key in keys},
        window_rows={key: prepared.window_rows[key] for key in keys},
        windows={key: prepared.windows[key] for key in keys},
    )


def record_drops(session: Session, drops: Iterable[IngestRejected], *, at: datetime) -> None:
    """Add refused payloads to the per-device, per-reason counters."""
    counts = Counter((d.device_id, d.reason) for d in drops)
    details = {(d.device_id, d.reason): str(d)[:1000] for d in drops}
    for (device_id, reason), count in counts.items():
        row = session.get(IngestDrop, (device_id[:64], reason))
        if row is None:
            row = IngestDrop(device_id=device_id[:64], reason=reason, count=0)
        row.count += count
        row.last_at = at
        row.last_detail = details[(device_id, reason)]
        session.add(row)


def accepted_devices(session: Session, device_ids: Iterable[str]) -> set[str]:
    ids = list(set(device_ids))
    if not ids:
        return set()
    rows = session.execute(
        select(Device.id).where(  # type: ignore[call-overload]
            Device.id.in_(ids),  # type: ignore[attr-defined]
            Device.status == DeviceStatus.ACCEPTED.value,
        )
    )
    return {row[0] for row in rows}


@dataclass
class IngestStats:
    received: int = 0
    stored: int = 0
    duplicates: int = 0
    dropped: int = 0
    batches: int = 0
    errors: int = 0


class TelemetryIngestor:
    """Consume telemetry from the broker into the database (see the module docstring)."""

    def __init__(
        self,
        engine: Engine,
        *,
        host: str,
        port: int,
        username: str | None = None,
        password: str | None = None,
        share_group: str | None = None,
        client_id: str | None = None,
        batch_size: int = 500,
        flush_interval: float = 0.2,
        max_queue: int = 50_000,
        client_factory: Callable[[], mqtt.Client] | None = None,
        consumers: Sequence[ChannelConsumer] = (),
        write_lock: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
        shard: int = 0,
    ) -> None:
        self.engine = engine
        self.shard = shard
        """The fleet rollup rows' shard this ingestor writes (its worker index)."""
        self._write_lock = write_lock or contextlib.nullcontext
        self.consumers = {consumer.channel: consumer for consumer in consumers}
        if Channel.TELEMETRY in self.consumers or len(self.consumers) != len(consumers):
            raise ValueError("each channel needs one consumer, and telemetry is the ingestor's own")
        self.host, self.port = host, port
        self.share_group = share_group
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self._queue: queue.Queue[tuple[str, bytes, int, int]] = queue.Queue(max_queue)
        self._stopping = threading.Event()
        self._writer: threading.Thread | None = None
        self._stats = IngestStats()
        self._lock = threading.Lock()
        self._layouts: dict[str, Layout] = {}
        """Drift layouts recorded in this database (one never changes once recorded)."""
        if client_factory is not None:
            self._client = client_factory()
        else:
            self._client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id or "",
                protocol=mqtt.MQTTv311,
                clean_session=client_id is None,
                manual_ack=True,
            )
        if username is not None:
            self._client.username_pw_set(username, password)
        self.subscribed = threading.Event()
        """Set once the broker granted every subscription (cleared while reconnecting)."""
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.reconnect_delay_set(0.5, 30)

    # -- paho's thread: enqueue only, never raise

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.subscribed.clear()
        if not reason.is_failure:
            client.subscribe(
                [
                    (fleet_filter(channel, share_group=self.share_group), 1)
                    for channel in (Channel.TELEMETRY, *self.consumers)
                ]
            )

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        if codes and not any(code.is_failure for code in codes):
            self.subscribed.set()
        else:
            log.error("the broker refused an ingest subscription: %s", codes)

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self._queue.put_nowait(
                (message.topic, bytes(message.payload), message.mid, message.qos)
            )
        except queue.Full:  # not acknowledged: the broker delivers it again later
            log.warning("ingest queue full; a report waits for redelivery")

    # -- lifecycle

    def start(self) -> None:
        self._writer = threading.Thread(target=self._write_loop, name="ingest-writer", daemon=True)
        self._writer.start()
        self._client.connect_async(self.host, self.port, keepalive=30)
        self._client.loop_start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._writer is not None:
            self._writer.join(timeout)
        with contextlib.suppress(Exception):
            self._client.disconnect()
        self._client.loop_stop()

    def stats(self) -> IngestStats:
        with self._lock:
            return IngestStats(**self._stats.__dict__)

    # -- the writer

    def _take_batch(self) -> list[tuple[str, bytes, int, int]]:
        try:
            first = self._queue.get(timeout=self.flush_interval)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.flush_interval
        while len(batch) < self.batch_size:
            remaining = deadline - time.monotonic()
            try:
                batch.append(
                    self._queue.get(timeout=max(remaining, 0))
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
        return batch

    def _write_loop(self) -> None:
        while not self._stopping.is_set() or not self._queue.empty():
            batch = self._take_batch()
            if not batch:
                continue
            try:
                self._write(batch)
            except Exception:  # the database is down, say: keep the batch unacknowledged
                log.exception("storing a telemetry batch failed; it will be redelivered")
                with self._lock:
                    self._stats.errors += 1
                time.sleep(1.0)

    def _consumer_of(self, topic: str) -> ChannelConsumer | None:
        for channel, consumer in self.consumers.items():
            if topic.endswith(f"/{channel.value}"):
                return consumer
        return None

    def _write(self, batch: list[tuple[str, bytes, int, int]]) -> None:
        reports: list[ParsedReport] = []
        others: dict[Channel, list[DeviceMessage]] = {}
        drops: list[IngestRejected] = []
        for topic, payload, _mid, _qos in batch:
            consumer = self._consumer_of(topic)
            try:
                if consumer is None:
                    reports.append(parse_report(topic, payload))
                else:
                    others.setdefault(consumer.channel, []).append(consumer.parse(topic, payload))
            except IngestRejected as e:
                drops.append(e)
        stored = duplicates = 0
        # Rows and flattened sketches are made before the write lock: on SQLite the
        # workers' transactions run one at a time, their preparation need not.
        prepared = prepare_reports(reports, layouts=self._layouts)
        with self._write_lock(), Session(self.engine) as session:
            known = accepted_devices(
                session,
                [r.device_id for r in reports]
                + [m.device_id for messages in others.values() for m in messages],
            )
            for report in reports:
                if report.device_id not in known:
                    drops.append(
                        IngestRejected(
                            "unknown_device",
                            report.device_id,
                            f"{report.device_id!r} is not an accepted device of this fleet",
                        )
                    )
            if any(r.device_id not in known for r in reports):
                reports = [r for r in reports if r.device_id in known]
                prepared = _only(prepared, known)
            layouts = dict(self._layouts)  # kept only once the layouts it adds are committed
            stored = store_reports(session, prepared, layouts=layouts, shard=self.shard)
            duplicates = len(reports) - stored
            now = utcnow()
            for channel, messages in others.items():
                for message in messages:
                    if message.device_id not in known:
                        drops.append(
                            IngestRejected(
                                "unknown_device",
                                message.device_id,
                                f"{message.device_id!r} is not an accepted device of this fleet",
                            )
                        )
                result = self.consumers[channel].store(
                    session, [m for m in messages if m.device_id in known], now=now
                )
                stored += result.stored
                duplicates += result.duplicates
                drops.extend(result.drops)
            if drops:
                record_drops(session, drops, at=utcnow())
            session.commit()
        self._layouts = layouts
        for drop in drops:
            log.warning(
                "telemetry dropped",
                extra={"device_id": drop.device_id, "reason": drop.reason, "detail": str(drop)},
            )
        for _topic, _payload, mid, qos in batch:  # only now: the batch is durable
            if qos > 0:
                self._client.ack(mid, qos)
        with self._lock:
            self._stats.received += len(batch)
            self._stats.stored += stored
            self._stats.duplicates += duplicates
            self._stats.dropped += len(drops)
            self._stats.batches += 1
