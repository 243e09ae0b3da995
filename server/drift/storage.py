"""Reading rollup rows for a query plan and adding them up as they stream in.

:func:`read_sums` runs one ``SELECT`` over one table for the plan's segments and
reduces the rows in batches -- to scope totals, per-device counts and/or per-bucket
counts -- so no more than a batch of rows is ever held decoded.

:func:`read_device_counts` reads each device's drift counts alone over a
:class:`~server.drift.timerange.CountPlan` (day rows minus hour rows, where that reads
fewer rows).

What always holds: only rows of the plan's segments and only the columns asked for
are read, in one statement (one ``SELECT`` per segment under ``UNION ALL``, so each is
an index range); blobs are decoded with the layout recorded when they were written
(``drift_layouts``), a batch at a time; counts are added as int64, exactly.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import and_, literal, select, union_all
from sqlmodel import Session

from server.drift.compute import Sums
from server.drift.errors import RollupMismatchError
from server.drift.layout import (
    EMPTY_MOMENT,
    Layout,
    merge_moment_pair,
    merge_moment_stack,
    unpack_counts_many,
    unpack_moments,
)
from server.drift.rollups import device_table, fleet_table, layouts_for
from server.drift.timerange import CountPlan, Period, Segment, floor_to
from shared.latency import N_LATENCY_BUCKETS

__all__ = ["DeviceCounts", "Totals", "read_device_counts", "read_sums", "stored_layout"]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

_IN_LIST_LIMIT = 1000
"""Up to this many devices are filtered in SQL; more are read and filtered here."""

_BATCH = 2048


@dataclass
class Totals:
    """What a read added up."""

    sums: Sums
    """Scope totals: SLA columns of every row, drift counts and moments of the reference's."""
    device_ids: list[str] = field(default_factory=list)
    device_counts: IntArray | None = None
    """(len(device_ids), layout.size): each device's own drift counts (``per_device``)."""
    bucket_counts: dict[datetime, IntArray] = field(default_factory=dict)
    """Drift counts per bucket of ``per_bucket`` (buckets without counts are absent)."""
    rows: dict[str, int] = field(default_factory=dict)
    """Rows read, per period."""


def stored_layout(session: Session, reference_id: str) -> Layout | None:
    return layouts_for(session, [reference_id]).get(reference_id)


class _Reducer:
    """Adds up batches of drift rows: totals, per device, per bucket."""

    def __init__(
        self, layout: Layout, *, moments: bool, per_device: bool, per_bucket: Period | None
    ) -> None:
        self.layout = layout
        self.with_moments = moments
        self.per_device = per_device
        self.per_bucket = per_bucket
        self.total = np.zeros(layout.size, dtype=np.int64)
        self.moments = np.tile(np.asarray(EMPTY_MOMENT), (layout.moment_rows, 1))
        self.any = False
        self.device_index: dict[str, int] = {}
        self.device_rows: list[IntArray] = []  # grown in blocks of _BATCH devices
        self.buckets: dict[datetime, IntArray] = {}
        self._blobs: list[bytes] = []
        self._moment_blobs: list[bytes] = []
        self._devices: list[int] = []
        self._seen: set[int] = set()
        self._bucket_keys: list[datetime] = []

    def add(self, counts: bytes, moments: bytes | None, device_id: str, bucket: datetime) -> None:
        if self.per_device:
            index = self.device_index.get(device_id)
            if index is None:
                index = self.device_index[device_id] = len(self.device_index)
            if index in self._seen:  # one row per device per batch: plain fancy-index adds
                self.flush()
            self._seen.add(index)
            self._devices.append(index)
        if self.per_bucket is not None:
            self._bucket_keys.append(floor_to(bucket, self.per_bucket))
        self._blobs.append(counts)
        if self.with_moments and moments is not None:
            self._moment_blobs.append(moments)
        if len(self._blobs) >= _BATCH:
            self.flush()

    def flush(self) -> None:
        if not self._blobs:
            return
        self.any = True
        decoded = unpack_counts_many(self._blobs, self.layout.size)
        self.total += decoded.sum(axis=0)
        if self.per_device:
            index = np.asarray(self._devices, dtype=np.int64)
            need = int(index.max()) + 1
            while len(self.device_rows) * _BATCH < need:
                self.device_rows.append(np.zeros((_BATCH, self.layout.size), dtype=np.int64))
            block, offset = index // _BATCH, index % _BATCH
            for b in np.unique(block):
                mine = block == b
                self.device_rows[int(b)][offset[mine]] += decoded[mine]
        if self.per_bucket is not None:
            for key, row in zip(self._bucket_keys, decoded, strict=True):
                if key in self.buckets:
                    self.buckets[key] += row
                else:
                    self.buckets[key] = row.copy()
        if self._moment_blobs:
            stack = np.stack(
                [unpack_moments(b, self.layout.moment_rows) for b in self._moment_blobs]
            )
            self.moments = merge_moment_pair(self.moments, merge_moment_stack(stack))
        self._blobs, self._moment_blobs, self._devices = [], [], []
        self._bucket_keys = []
        self._seen.clear()

    def device_counts(self) -> tuple[list[str], IntArray]:
        ids = list(self.device_index)
        if not ids:
            return [], np.zeros((0, self.layout.size), dtype=np.int64)
        matrix = np.concatenate(self.device_rows)[: len(ids)]
        order = sorted(range(len(ids)), key=ids.__getitem__)
        return [ids[i] for i in order], matrix[order]


def read_sums(
    session: Session,
    *,
    fleet: bool,
    model_name: str,
    model_version: int,
    segments: Collection[Segment],
    reference_id: str,
    layout: Layout | None,
    device_ids: Collection[str] | None = None,
    sla: bool = True,
    moments: bool = True,
    per_device: bool = False,
    per_bucket: Period | None = None,
) -> Totals:
    """Add up the device (``fleet=False``) or fleet rows that ``segments`` cover.

    SLA columns (``sla``) count for every row of the version; drift counts (and
    ``moments``) only for rows of ``reference_id``, and only with a known ``layout``.
    """
    table = fleet_table() if fleet else device_table()
    c = table.c
    columns: list[Any] = [c.period, c.bucket_start, c.reference_id, c.counts]
    columns.append(c.device_id if not fleet else c.period)  # a placeholder keeps positions
    if moments:
        columns.append(c.moments)
    if sla:
        columns += [c.windows, c.inferences, c.errors, c.latency]
    conditions: list[Any] = [c.model_name == model_name, c.model_version == model_version]
    if not sla:
        conditions.append(c.reference_id == reference_id)
    wanted = None if device_ids is None or fleet else set(device_ids)
    if wanted is not None and len(wanted) <= _IN_LIST_LIMIT:
        conditions.append(c.device_id.in_(sorted(wanted)))
        wanted = None  # the database filtered already
    query = _by_segment([select(*columns).where(*conditions)], table, segments)
    reducer = (
        None
        if layout is None
        else _Reducer(layout, moments=moments, per_device=per_device, per_bucket=per_bucket)
    )
    rows: dict[str, int] = {}
    windows = inferences = errors = 0
    latency = np.zeros(N_LATENCY_BUCKETS, dtype=np.int64)
    latency_blobs: list[bytes] = []
    sla_at = 6 if moments else 5
    for part in _batches(session, query):
        for row in part:
            device_id = "" if fleet else row[4]
            if wanted is not None and device_id not in wanted:
                continue
            rows[row[0]] = rows.get(row[0], 0) + 1
            if sla:
                windows += row[sla_at]
                inferences += row[sla_at + 1]
                errors += row[sla_at + 2]
                latency_blobs.append(row[sla_at + 3])
                if len(latency_blobs) >= _BATCH:
                    latency += unpack_counts_many(latency_blobs, N_LATENCY_BUCKETS).sum(axis=0)
                    latency_blobs = []
            if reducer is not None and row[2] == reference_id and row[3] is not None:
                reducer.add(row[3], row[5] if moments else None, device_id, row[1])
    if latency_blobs:
        latency += unpack_counts_many(latency_blobs, N_LATENCY_BUCKETS).sum(axis=0)
    sums = Sums(windows=windows, inferences=inferences, errors=errors, latency=latency)
    totals = Totals(sums=sums, rows=rows)
    if reducer is not None:
        reducer.flush()
        if reducer.any:
            sums.counts = reducer.total
            sums.moments = reducer.moments if moments else None
        if per_device:
            totals.device_ids, totals.device_counts = reducer.device_counts()
        totals.bucket_counts = reducer.buckets
    return totals


@dataclass
class DeviceCounts:
    """Each device's drift counts over a range (devices with windows in it, sorted)."""

    device_ids: list[str]
    counts: IntArray
    """(len(device_ids), layout.size)."""
    rows: dict[str, int]
    """Rows read, per period."""


def _segment_clause(table: Any, segment: Segment) -> Any:
    c = table.c
    return and_(
        c.period == segment.period.value,
        c.bucket_start >= segment.start,
        c.bucket_start < segment.end,
    )


def _by_segment(queries: list[Any], table: Any, segments: Collection[Segment]) -> Any:
    """Each query restricted to each segment, as one statement (``UNION ALL``).

    Not one ``WHERE`` with an ``OR`` of the segments: PostgreSQL cannot turn that into
    index ranges and reads every row of the model version instead. One statement is one
    snapshot, so rows of several segments are read consistently.
    """
    parts = [query.where(_segment_clause(table, s)) for query in queries for s in segments]
    combined: Any = parts[0] if len(parts) == 1 else union_all(*parts)
    return combined


def read_device_counts(
    session: Session,
    *,
    model_name: str,
    model_version: int,
    counts_plan: CountPlan,
    reference_id: str,
    layout: Layout,
) -> DeviceCounts:
    """Each device's drift counts (rows of ``reference_id``) over a :class:`CountPlan`.

    One statement reads the ``plus`` and ``minus`` rows together (one snapshot, so a
    day row and its hours agree); rows are decoded and added -- or taken away -- a batch
    at a time. A device is in the answer if windows remain to it in the range.
    """
    table = device_table()
    c = table.c

    def rows_of(segments: Collection[Segment], sign: int) -> list[Any]:
        return [
            select(c.device_id, c.period, c.windows, c.counts, literal(sign)).where(
                c.model_name == model_name,
                c.model_version == model_version,
                c.reference_id == reference_id,
                c.counts.is_not(None),
                _segment_clause(table, s),
            )
            for s in segments
        ]

    parts = rows_of(counts_plan.plus, 1) + rows_of(counts_plan.minus, -1)
    if not parts:
        return DeviceCounts([], np.zeros((0, layout.size), dtype=np.int64), {})
    query: Any = parts[0] if len(parts) == 1 else union_all(*parts)
    index: dict[str, int] = {}
    capacity = _BATCH
    totals = np.zeros((capacity, layout.size), dtype=np.int64)
    windows = np.zeros(capacity, dtype=np.int64)
    rows: dict[str, int] = {}
    for part in _batches(session, query):
        positions = [index.setdefault(row[0], len(index)) for row in part]
        if len(index) > capacity:
            capacity = max(2 * capacity, len(index))
            totals = np.concatenate(
                [totals, np.zeros((capacity - len(totals), layout.size), dtype=np.int64)]
            )
            windows = np.concatenate([windows, np.zeros(capacity - len(windows), np.int64)])
        signs = np.fromiter((row[4] for row in part), dtype=np.int64, count=len(part))
        decoded = unpack_counts_many([row[3] for row in part], layout.size)
        if (signs < 0).any():
            decoded *= signs[:, None]
        at = np.asarray(positions, dtype=np.int64)
        gained = signs * np.fromiter((row[2] for row in part), np.int64, len(part))
        rest = np.arange(len(at))
        while rest.size:  # fancy-index adds need distinct devices: one pass per repeat
            distinct, first = np.unique(at[rest], return_index=True)
            totals[distinct] += decoded[rest[first]]
            windows[distinct] += gained[rest[first]]
            if first.size == rest.size:
                break
            later = np.ones(rest.size, dtype=bool)
            later[first] = False
            rest = rest[later]
        for row in part:
            rows[row[1]] = rows.get(row[1], 0) + 1
    n = len(index)
    totals, windows = totals[:n], windows[:n]
    if (windows < 0).any() or (totals < 0).any():  # a day row that is not its hours' sum
        raise RollupMismatchError(
            "the drift rollups disagree: a day's counts are below the sum of its hours"
        )
    ids = list(index)
    order = [i for i in sorted(range(n), key=ids.__getitem__) if windows[i] > 0]
    return DeviceCounts([ids[i] for i in order], totals[order], rows)


def _batches(session: Session, query: Any) -> Iterator[Sequence[Any]]:
    """The rows of ``query`` a batch at a time.

    On PostgreSQL through a server-side cursor in psycopg's binary format: blobs come
    as they are, not hex-encoded (twice the bytes, and decoding on both ends). The
    cursor runs on the session's connection, so in its transaction.
    """
    connection = session.connection()
    if connection.dialect.name != "postgresql":
        yield from session.execute(query.execution_options(yield_per=_BATCH)).partitions()
        return
    compiled = query.compile(
        dialect=connection.dialect, compile_kwargs={"render_postcompile": True}
    )
    raw: Any = connection.connection.dbapi_connection
    with raw.cursor(name=f"drift_{uuid.uuid4().hex}", binary=True) as cursor:
        cursor.itersize = _BATCH
        cursor.execute(str(compiled), compiled.params)
        while part := cursor.fetchmany(_BATCH):
            yield part
