"""Rollup maintenance: adding model windows to the hour and day rollups, in the caller's
transaction.

:func:`add_windows` is called by :func:`server.ingest.telemetry.store_reports` with the
model windows of the reports that transaction inserted -- and only those, so each
report adds to the rollups exactly once. It sums the windows per rollup key in
memory, then per table reads and locks the rows that exist (``SELECT ... FOR UPDATE`` on
PostgreSQL; SQLite has one writer at a time), adds to them, and inserts the rest,
always in key order, so concurrent ingestion workers never lose an update.

What always holds:

- Counts are exact integer sums; moments are merged with Chan's formula.
- A drift sketch is rolled up only under the layout recorded for its reference id
  (the first sketch of a reference id records it). A sketch that does not fit -- other
  features, other lengths -- is refused: its window still counts (inferences, errors,
  latency) under ``reference_id = ""``, and the refusal is logged and returned.
- A tier never takes data older than its retention mark (those buckets are deleted).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Table, bindparam, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from server.db import utcnow
from server.drift.layout import (
    Layout,
    LayoutError,
    merge_moment_stack,
    pack_counts,
    pack_moments,
    unpack_counts,
    unpack_moments,
)
from server.drift.models import DriftFleetRollup, DriftLayout, DriftRollup, RetentionMark
from server.drift.timerange import Period, floor_to
from shared.drift import DriftSketch
from shared.latency import N_LATENCY_BUCKETS

__all__ = [
    "RollupResult",
    "WindowInput",
    "add_windows",
    "device_table",
    "fleet_table",
    "layouts_for",
    "retention_marks",
]

log = logging.getLogger(__name__)

_CHUNK = 400
"""Keys per ``IN (...)`` lookup: far below every backend's bind-parameter limit."""

DEVICE_KEY = ("model_name", "model_version", "reference_id", "period", "bucket_start", "device_id")
FLEET_KEY = DEVICE_KEY[:-1]


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
    latency: Sequence[int]
    sketch: DriftSketch | None


@dataclass
class RollupResult:
    windows: int = 0
    refused_sketches: list[tuple[str, str]] = field(default_factory=list)
    """``(device_id, why)`` of each sketch that did not fit its reference's layout."""
    expired: int = 0
    """Tier additions skipped because the bucket was already deleted by retention."""


class _Sum:
    """What one rollup row gains: parts collected as they come, added up once at the end."""

    __slots__ = ("counts", "errors", "inferences", "latency", "moments", "windows")

    def __init__(self) -> None:
        self.windows = 0
        self.inferences = 0
        self.errors = 0
        self.latency: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []
        self.moments: list[np.ndarray] = []

    def add(
        self,
        windows: int,
        inferences: int,
        errors: int,
        latency: np.ndarray,
        counts: np.ndarray | None,
        moments: np.ndarray | None,
    ) -> None:
        self.windows += windows
        self.inferences += inferences
        self.errors += errors
        self.latency.append(latency)
        if counts is not None and moments is not None:
            self.counts.append(counts)
            self.moments.append(moments)


def _columns(sums: Sequence[_Sum]) -> list[dict[str, Any]]:
    """Each row's columns: counts added, moments merged with the k-way Chan update.

    Rows with the same number and shape of parts are added up in one numpy call each,
    so a batch costs a handful of calls rather than a few per row.
    """
    out: list[dict[str, Any]] = [
        {"windows": s.windows, "inferences": s.inferences, "errors": s.errors} for s in sums
    ]

    def grouped(parts_of: Callable[[_Sum], list[np.ndarray]]) -> dict[Any, list[int]]:
        groups: dict[Any, list[int]] = {}
        for i, s in enumerate(sums):
            parts = parts_of(s)
            groups.setdefault((len(parts), parts[0].shape if parts else None), []).append(i)
        return groups

    for name, parts_of in (("latency", _latency_of), ("counts", _counts_of)):
        for (k, _), rows in grouped(parts_of).items():
            if k == 0:
                for i in rows:
                    out[i][name] = None
                continue
            totals = np.stack([np.stack(parts_of(sums[i])) for i in rows]).sum(axis=1)
            for i, total in zip(rows, totals, strict=True):
                out[i][name] = pack_counts(total)
    for (k, _), rows in grouped(_moments_of).items():
        if k == 0:
            for i in rows:
                out[i]["moments"] = None
            continue
        stack = np.stack([np.stack(sums[i].moments) for i in rows])  # (rows, k, m, 5)
        merged = stack[:, 0] if k == 1 else _merge_rows(stack)
        for i, moments in zip(rows, merged, strict=True):
            out[i]["moments"] = pack_moments(moments)
    return out


def _latency_of(s: _Sum) -> list[np.ndarray]:
    return s.latency


def _counts_of(s: _Sum) -> list[np.ndarray]:
    return s.counts


def _moments_of(s: _Sum) -> list[np.ndarray]:
    return s.moments


def _merge_rows(stack: np.ndarray) -> np.ndarray:
    """(rows, k, m, 5) -> (rows, m, 5): the k parts of every row merged at once."""
    rows, k, m, _ = stack.shape
    parts = stack.transpose(1, 0, 2, 3).reshape(k, rows * m, 5)
    return merge_moment_stack(parts).reshape(rows, m, 5)


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
    windows: Iterable[WindowInput],
    *,
    marks: dict[str, datetime] | None = None,
) -> RollupResult:
    """Add model windows to the device and fleet rollups of both tiers (see the module doc).

    ``marks`` are the retention marks if the caller has read them already.
    """
    items = list(windows)
    result = RollupResult(windows=len(items))
    if not items:
        return result
    if marks is None:
        marks = retention_marks(session)
    first_sketch: dict[str, DriftSketch] = {}
    for item in items:
        if item.sketch is not None:
            first_sketch.setdefault(item.sketch.reference_id, item.sketch)
    layouts = _record_layouts(session, first_sketch)

    device_sums: dict[tuple[Any, ...], _Sum] = {}
    fleet_sums: dict[tuple[Any, ...], _Sum] = {}
    for item in items:
        reference_id, counts, moments = "", None, None
        if item.sketch is not None:
            try:
                counts, moments = layouts[item.sketch.reference_id].flatten(item.sketch)
                reference_id = item.sketch.reference_id
            except LayoutError as e:
                result.refused_sketches.append((item.device_id, str(e)))
                log.warning(
                    "drift sketch refused",
                    extra={"device_id": item.device_id, "model": item.model_name, "detail": str(e)},
                )
        latency = np.asarray(item.latency, dtype=np.int64)
        for period in Period:
            bucket = floor_to(item.window_start, period)
            mark = marks.get(period.value)
            if mark is not None and bucket < mark:
                result.expired += 1
                continue
            fleet_key = (item.model_name, item.model_version, reference_id, period.value, bucket)
            for sums, key in (
                (device_sums, (*fleet_key, item.device_id)),
                (fleet_sums, fleet_key),
            ):
                target = sums.get(key)
                if target is None:
                    target = sums[key] = _Sum()
                target.add(1, item.inferences, item.errors, latency, counts, moments)
    _apply(session, device_table(), DEVICE_KEY, device_sums, layouts)
    _apply(session, fleet_table(), FLEET_KEY, fleet_sums, layouts)
    return result


_SUM_COLUMNS = ("windows", "inferences", "errors", "latency", "counts", "moments")


def _apply(
    session: Session,
    table: Table,
    key_names: tuple[str, ...],
    sums: dict[tuple[Any, ...], _Sum],
    layouts: dict[str, Layout],
) -> None:
    """Add ``sums`` to their rows: lock and read the rows that exist, insert the rest.

    Keys are handled in sorted order (one lock order for every writer). A row another
    writer inserted between our read and our insert is read (locked) and added to.
    """
    if not sums:
        return
    keys = sorted(sums)
    key_columns = [table.c[name] for name in key_names]

    def lock_and_read(wanted: list[tuple[Any, ...]]) -> dict[tuple[Any, ...], Any]:
        found = {}
        for start in range(0, len(wanted), _CHUNK):
            rows = session.execute(
                select(table)
                .where(tuple_(*key_columns).in_(wanted[start : start + _CHUNK]))
                .order_by(*key_columns)
                .with_for_update()
            ).mappings()
            for row in rows:
                found[tuple(row[name] for name in key_names)] = row
        return found

    existing = lock_and_read(keys)
    missing = [key for key in keys if key not in existing]
    if missing:
        statement = (
            _insert(session, table)
            .on_conflict_do_nothing(index_elements=list(key_names))
            .returning(*key_columns)
        )
        rows = [
            dict(zip(key_names, key, strict=True)) | columns
            for key, columns in zip(missing, _columns([sums[key] for key in missing]), strict=True)
        ]
        inserted = {tuple(row) for row in session.execute(statement, rows)}
        raced = [key for key in missing if key not in inserted]
        if raced:
            existing |= lock_and_read(raced)
    if not existing:
        return
    ordered = sorted(existing)
    for key in ordered:
        row = existing[key]
        sums[key].add(
            row["windows"],
            row["inferences"],
            row["errors"],
            unpack_counts(row["latency"], N_LATENCY_BUCKETS),
            *_stored_drift(row, layouts),
        )
    changes = [
        {f"k_{name}": value for name, value in zip(key_names, key, strict=True)}
        | {f"v_{name}": value for name, value in columns.items()}
        for key, columns in zip(ordered, _columns([sums[key] for key in ordered]), strict=True)
    ]
    statement = (
        update(table)
        .where(*(column == bindparam(f"k_{column.name}") for column in key_columns))
        .values({name: bindparam(f"v_{name}") for name in _SUM_COLUMNS})
    )
    session.execute(statement, changes)


def _stored_drift(
    row: Any, layouts: dict[str, Layout]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    if row["counts"] is None or row["moments"] is None:
        return None, None
    layout = layouts[row["reference_id"]]
    return unpack_counts(row["counts"], layout.size), unpack_moments(
        row["moments"], layout.moment_rows
    )
