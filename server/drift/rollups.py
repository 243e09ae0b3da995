"""Rollup maintenance: adding model windows to the hour, 6-hour and day rollups, in the
caller's transaction.

:func:`add_windows` is called by :func:`server.ingest.telemetry.store_reports` with the
model windows of the reports that transaction inserted -- and only those, so each
report adds to the rollups exactly once. Sketches are flattened into their layout
first (:func:`flatten_windows`, which ingestion runs before its transaction). The
windows are summed per rollup key in memory, then per table one upsert inserts the
rows that are new and locks and reads the rows that exist, and a second writes the
sums -- always in key order, so concurrent ingestion workers never lose an update.

What always holds:

- Counts are exact integer sums; moments are merged with Chan's formula.
- Fleet rows are written only under the caller's ``shard`` (its worker index), so
  concurrent workers lock disjoint fleet rows; a bucket's fleet sums are its shards'
  sums.
- A drift sketch is rolled up only under the layout recorded for its reference id
  (the first sketch of a reference id records it). A sketch that does not fit -- other
  features, other lengths -- is refused: its window still counts (inferences, errors,
  latency) under ``reference_id = ""``, and the refusal is logged and returned.
- A tier never takes data older than its retention mark (those buckets are deleted);
  6-hour rows go by the hour tier's mark.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from server.db import utcnow
from server.drift import bulk
from server.drift.layout import (
    Layout,
    LayoutError,
    merge_moment_pair,
    pack_counts_many,
    pack_moments_many,
    unpack_counts_many,
    unpack_moments_many,
)
from server.drift.models import DriftFleetRollup, DriftLayout, DriftRollup, RetentionMark
from server.drift.timerange import Period, floor_to
from shared.drift import DriftSketch
from shared.latency import N_LATENCY_BUCKETS

__all__ = [
    "FlatWindow",
    "RollupResult",
    "WindowInput",
    "add_windows",
    "device_table",
    "flatten_window",
    "flatten_windows",
    "fleet_table",
    "layouts_for",
    "retention_marks",
]

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

DEVICE_KEY = ("model_name", "model_version", "reference_id", "period", "bucket_start", "device_id")
FLEET_KEY = (*DEVICE_KEY[:-1], "shard")


def device_table() -> Table:
    table: Table = DriftRollup.__table__  # type: ignore[attr-defined]
    return table


def fleet_table() -> Table:
    table: Table = DriftFleetRollup.__table__  # type: ignore[attr-defined]
    return table


@dataclass(frozen=True, slots=True)
class WindowInput:
    """One model's share of one newly stored report."""

    device_id: str
    model_name: str
    model_version: int
    window_start: datetime
    inferences: int
    errors: int
    latency: Sequence[int] | IntArray
    sketch: DriftSketch | None


@dataclass
class RollupResult:
    windows: int = 0
    refused_sketches: list[tuple[str, str]] = field(default_factory=list)
    """``(device_id, why)`` of each sketch that did not fit its reference's layout."""
    expired: int = 0
    """Tier additions skipped because the bucket was already deleted by retention."""


@dataclass(frozen=True, slots=True)
class FlatWindow:
    """A window ready to add: its sketch flattened into its reference's layout.

    Made by :func:`flatten_windows`, which needs no database -- ingestion runs it before
    its transaction (and its write lock) starts.
    """

    window: WindowInput
    latency: IntArray
    reference_id: str
    """The sketch's reference id; ``""`` when there is no sketch or it was refused."""
    counts: IntArray | None
    moments: FloatArray | None
    refused: str | None = None
    """Why the sketch does not fit its reference's layout (None: it fits, or no sketch)."""


def flatten_window(window: WindowInput, layouts: Mapping[str, Layout]) -> FlatWindow | None:
    """``window`` flattened with the recorded layouts; None if its layout is not known."""
    latency = np.asarray(window.latency, dtype=np.int64)
    sketch = window.sketch
    if sketch is None:
        return FlatWindow(window, latency, "", None, None)
    layout = layouts.get(sketch.reference_id)
    if layout is None:
        return None
    try:
        counts, moments = layout.flatten(sketch)
    except LayoutError as e:
        return FlatWindow(window, latency, "", None, None, refused=str(e))
    return FlatWindow(window, latency, sketch.reference_id, counts, moments)


def flatten_windows(
    windows: Iterable[WindowInput], layouts: Mapping[str, Layout]
) -> list[WindowInput | FlatWindow]:
    """Each window flattened if its layout is in ``layouts``, else as it was."""
    out: list[WindowInput | FlatWindow] = []
    for window in windows:
        flat = flatten_window(window, layouts)
        out.append(window if flat is None else flat)
    return out


def retention_marks(session: Session, *, lock: bool = False) -> dict[str, datetime]:
    """Tier (raw, hour, day) -> the time before which its data has been deleted.

    ``lock`` takes a share lock on the marks (PostgreSQL ``FOR SHARE``) until the
    transaction ends, so a purge (which locks them for update first) waits for it.
    """
    query = select(RetentionMark)
    if lock:
        query = query.with_for_update(read=True)
    return {m.tier: m.before for m in session.execute(query).scalars()}


def layouts_for(session: Session, reference_ids: Iterable[str]) -> dict[str, Layout]:
    ids = sorted(set(reference_ids))
    if not ids:
        return {}
    table: Table = DriftLayout.__table__  # type: ignore[attr-defined]
    rows = session.execute(
        select(table.c.reference_id, table.c.layout_json).where(table.c.reference_id.in_(ids))
    )
    return {reference_id: Layout.from_json(text) for reference_id, text in rows}


def _insert(session: Session, table: Table) -> Any:
    dialect = session.get_bind().dialect.name
    return (postgresql if dialect == "postgresql" else sqlite).insert(table)


def _record_layouts(session: Session, sketches: dict[str, DriftSketch]) -> dict[str, Layout]:
    known = layouts_for(session, sketches)
    missing = [rid for rid in sorted(sketches) if rid not in known]
    if missing:
        now = utcnow()
        statement = _insert(session, DriftLayout.__table__).on_conflict_do_nothing(  # type: ignore[attr-defined]
            index_elements=["reference_id"]
        )
        session.execute(
            statement,
            [
                {
                    "reference_id": rid,
                    "layout_json": Layout.of_sketch(sketches[rid]).to_json(),
                    "created_at": now,
                }
                for rid in missing
            ],
        )
        known.update(layouts_for(session, missing))  # a concurrent writer may have won
    return known


def add_windows(
    session: Session,
    windows: Iterable[WindowInput | FlatWindow],
    *,
    marks: dict[str, datetime] | None = None,
    layouts: dict[str, Layout] | None = None,
    shard: int = 0,
) -> RollupResult:
    """Add model windows to the device and fleet rollups of every period (see the module doc).

    ``shard`` is the fleet rows' shard the windows go to: the ingestion worker's index
    (0 for the in-server consumer), so two workers never lock the same fleet row.

    ``marks`` are the retention marks if the caller has read them already. ``layouts``
    is a cache of recorded layouts (reference id -> layout) that windows not flattened
    yet are flattened with; layouts recorded here are added to it. A layout never
    changes once recorded, so a cache is valid for as long as its database lives.
    """
    items = list(windows)
    result = RollupResult(windows=len(items))
    if not items:
        return result
    if marks is None:
        marks = retention_marks(session)
    cache = {} if layouts is None else layouts
    first_sketch: dict[str, DriftSketch] = {}
    for pending in items:
        sketch = pending.sketch if isinstance(pending, WindowInput) else None
        if sketch is not None and sketch.reference_id not in cache:
            first_sketch.setdefault(sketch.reference_id, sketch)
    if first_sketch:
        cache.update(_record_layouts(session, first_sketch))
    flats: list[FlatWindow] = []
    for item in items:
        flat = item if isinstance(item, FlatWindow) else flatten_window(item, cache)
        assert flat is not None  # every layout is known now
        if flat.refused is not None:
            result.refused_sketches.append((flat.window.device_id, flat.refused))
            log.warning(
                "drift sketch refused",
                extra={
                    "device_id": flat.window.device_id,
                    "model": flat.window.model_name,
                    "detail": flat.refused,
                },
            )
        flats.append(flat)

    device_parts: dict[tuple[Any, ...], list[int]] = {}
    fleet_parts: dict[tuple[Any, ...], list[int]] = {}
    buckets_of: dict[datetime, list[tuple[Period, datetime]]] = {}  # a batch shares starts
    for index, flat in enumerate(flats):
        item = flat.window
        buckets = buckets_of.get(item.window_start)
        if buckets is None:
            buckets = [(period, floor_to(item.window_start, period)) for period in Period]
            buckets_of[item.window_start] = buckets
        for period, bucket in buckets:
            mark = marks.get(period.tier)
            if mark is not None and bucket < mark:
                result.expired += 1
                continue
            fleet_key = (
                item.model_name,
                item.model_version,
                flat.reference_id,
                period.value,
                bucket,
            )
            device_parts.setdefault((*fleet_key, item.device_id), []).append(index)
            fleet_parts.setdefault((*fleet_key, shard), []).append(index)
    needed = {flat.reference_id for flat in flats if flat.reference_id}
    known = {rid: cache[rid] for rid in needed}
    _apply(session, device_table(), DEVICE_KEY, device_parts, flats, known)
    _apply(session, fleet_table(), FLEET_KEY, fleet_parts, flats, known)
    return result


_SUM_COLUMNS = ("windows", "inferences", "errors", "latency", "counts", "moments")


def _apply(
    session: Session,
    table: Table,
    key_names: tuple[str, ...],
    parts: dict[tuple[Any, ...], list[int]],
    flats: list[FlatWindow],
    layouts: dict[str, Layout],
) -> None:
    """Add each key's windows (``parts``: indexes into ``flats``) to its row, in two upserts.

    The first inserts the rows that do not exist yet -- placeholders marked by a
    negative ``windows`` -- and, for those that do, locks them and returns what they
    hold (its conflict update changes nothing); the second writes every row's new sums.
    Both find rows by the primary key's conflict check, not by a query plan, so a fresh
    table whose statistics are stale cannot send them scanning. Keys go in sorted order
    (one lock order for every writer); a row another writer inserts meanwhile is a
    conflict like any other: we wait for its transaction and add to what it committed.
    A placeholder is never seen by anyone else: the second upsert overwrites it in the
    same transaction.
    """
    if not parts:
        return
    keys = sorted(parts)
    claimed = bulk.insert_returning(
        session,
        table,
        [*key_names, "windows", "inferences", "errors", "latency"],
        [(*key, -1, 0, 0, b"") for key in keys],
        key_names,
        [*key_names, *_SUM_COLUMNS],
        on_conflict=f"DO UPDATE SET windows = {table.name}.windows",
    )
    if any(row is None for row in claimed):  # every row is inserted or claimed
        missing = sum(row is None for row in claimed)
        raise RuntimeError(f"{table.name}: {missing} rollup rows were not claimed")
    width = len(key_names)
    existing: dict[int, _Stored] = {}
    for position, row in enumerate(claimed):
        assert row is not None
        if row[width] > 0:
            existing[position] = _Stored(*row[width:])
    totals = _columns(keys, parts, flats, existing, layouts)
    bulk.upsert(
        session,
        table,
        [*key_names, *_SUM_COLUMNS],
        [(*key, *values) for key, values in zip(keys, totals, strict=True)],
        key_names,
        _SUM_COLUMNS,
    )


@dataclass(frozen=True, slots=True)
class _Stored:
    """What a rollup row held before this transaction added to it."""

    windows: int
    inferences: int
    errors: int
    latency: bytes
    counts: bytes | None
    moments: bytes | None


def _columns(
    keys: Sequence[tuple[Any, ...]],
    parts: dict[tuple[Any, ...], list[int]],
    flats: list[FlatWindow],
    stored: dict[int, _Stored],
    layouts: dict[str, Layout],
) -> list[tuple[Any, ...]]:
    """The new sums of each key's row, as ``_SUM_COLUMNS``: its windows plus the
    ``stored`` row (by position in ``keys``), if any -- counts by addition, moments by
    Chan's update (the k-way form among this batch's windows, then the pair form with
    what was stored).

    Every part of every row is stacked once and reduced by segments, and packed a
    width at a time, so a batch costs a handful of numpy calls per table and
    reference whatever its number of rows.
    """
    order: list[int] = []
    lengths: list[int] = []
    for key in keys:
        indexes = parts[key]
        order += indexes
        lengths.append(len(indexes))
    windows_in = [flats[i].window for i in order]
    windows = np.asarray(lengths, dtype=np.int64)
    starts = _starts(lengths)
    inferences = np.add.reduceat(
        np.fromiter((w.inferences for w in windows_in), np.int64, len(order)), starts
    )
    errors = np.add.reduceat(
        np.fromiter((w.errors for w in windows_in), np.int64, len(order)), starts
    )
    latency = _segment_sums([flats[i].latency for i in order], lengths)
    old = sorted(stored)
    if old:
        rows = [stored[p] for p in old]
        windows[old] += np.fromiter((r.windows for r in rows), np.int64, len(rows))
        inferences[old] += np.fromiter((r.inferences for r in rows), np.int64, len(rows))
        errors[old] += np.fromiter((r.errors for r in rows), np.int64, len(rows))
        latency[old] += unpack_counts_many([r.latency for r in rows], N_LATENCY_BUCKETS)
    latency_blobs = pack_counts_many(latency)
    counts_blobs: list[bytes | None] = [None] * len(keys)
    moments_blobs: list[bytes | None] = [None] * len(keys)

    by_reference: dict[str, list[int]] = {}
    for position, key in enumerate(keys):
        if key[2]:
            by_reference.setdefault(key[2], []).append(position)
    for reference_id, positions in by_reference.items():
        layout = layouts[reference_id]
        count_parts: list[IntArray] = []
        moment_parts: list[FloatArray] = []
        segment_lengths = []
        for position in positions:
            indexes = parts[keys[position]]
            for i in indexes:
                flat = flats[i]
                assert flat.counts is not None and flat.moments is not None
                count_parts.append(flat.counts)
                moment_parts.append(flat.moments)
            segment_lengths.append(len(indexes))
        counts = _segment_sums(count_parts, segment_lengths)
        moments = _segment_moments(moment_parts, segment_lengths)
        with_stored = [
            (j, stored[p])
            for j, p in enumerate(positions)
            if p in stored and stored[p].counts is not None and stored[p].moments is not None
        ]
        if with_stored:
            at = [j for j, _ in with_stored]
            previous = [row for _, row in with_stored]
            counts[at] += unpack_counts_many([row.counts for row in previous], layout.size)  # type: ignore[misc]
            mine = moments[at]
            theirs = unpack_moments_many([row.moments for row in previous], layout.moment_rows)  # type: ignore[misc]
            rows_total = mine.shape[0] * mine.shape[1]
            moments[at] = merge_moment_pair(
                mine.reshape(rows_total, 5), theirs.reshape(rows_total, 5)
            ).reshape(mine.shape)
        packed_counts = pack_counts_many(counts)
        packed_moments = pack_moments_many(moments)
        for j, position in enumerate(positions):
            counts_blobs[position] = packed_counts[j]
            moments_blobs[position] = packed_moments[j]
    return [
        (int(w), int(n), int(e), lat, c, m)
        for w, n, e, lat, c, m in zip(
            windows.tolist(),
            inferences.tolist(),
            errors.tolist(),
            latency_blobs,
            counts_blobs,
            moments_blobs,
            strict=True,
        )
    ]


def _starts(lengths: Sequence[int]) -> IntArray:
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    return starts


def _segment_sums(parts: list[IntArray], lengths: Sequence[int]) -> IntArray:
    """Consecutive runs of ``lengths`` parts added up: ``(len(lengths), size)``."""
    stack = np.stack(parts)
    longest = max(lengths)
    if longest == 1:
        return stack
    starts = _starts(lengths)
    if longest == 2:  # the usual device rows: this batch's window plus what was stored
        total: IntArray = stack[starts]
        two = np.asarray(lengths) == 2
        total[two] += stack[starts[two] + 1]
        return total
    total = np.add.reduceat(stack, starts, axis=0)
    return total


def _segment_moments(parts: list[FloatArray], lengths: Sequence[int]) -> FloatArray:
    """Consecutive runs of ``lengths`` moment arrays ``(m, 5)`` merged: ``(runs, m, 5)``.

    The k-way Chan update of :func:`server.drift.layout.merge_moment_stack`, by segments;
    a run of one part is that part, unchanged.
    """
    stack = np.stack(parts)
    longest = max(lengths)
    if longest == 1:
        return stack
    starts = _starts(lengths)
    if longest == 2:  # pairs: Chan's update for two parts, rows of one part kept as they are
        merged = stack[starts]
        two = np.asarray(lengths) == 2
        first, second = stack[starts[two]], stack[starts[two] + 1]
        rows = first.shape[0] * first.shape[1]
        merged[two] = merge_moment_pair(first.reshape(rows, 5), second.reshape(rows, 5)).reshape(
            first.shape
        )
        return merged
    n_i = stack[:, :, 0]
    n = np.add.reduceat(n_i, starts, axis=0)
    safe = np.where(n > 0, n, 1.0)
    mean = np.add.reduceat(n_i * stack[:, :, 1], starts, axis=0) / safe
    spread = np.where(n_i > 0, n_i * (stack[:, :, 1] - np.repeat(mean, lengths, axis=0)) ** 2, 0.0)
    m2 = np.add.reduceat(stack[:, :, 2], starts, axis=0) + np.add.reduceat(spread, starts, axis=0)
    merged: FloatArray = np.stack(
        [
            n,
            np.where(n > 0, mean, 0.0),
            np.maximum(m2, 0.0),
            np.minimum.reduceat(stack[:, :, 3], starts, axis=0),
            np.maximum.reduceat(stack[:, :, 4], starts, axis=0),
        ],
        axis=2,
    )
    single = np.asarray(lengths) == 1
    if single.any():
        merged[single] = stack[starts[single]]
    return merged
