"""Retention: raw telemetry and fine rollups are deleted after a while, coarse ones later.

Three tiers, each with its own age limit (``EDGEFLEET_DRIFT_RETENTION_DAYS``):
``raw`` (``telemetry_reports`` and ``model_windows``, by ``window_end``), ``hour`` and
``day`` (the device and fleet rollups of that period, by ``bucket_start``; the 6-hour
rollups go with the hour tier).
:func:`purge_expired` deletes what is older than each tier's horizon;
:class:`RetentionJob` runs it periodically on a thread.

What always holds:

- A tier's mark (``retention_marks``) only moves forward, and is moved *before* its
  rows are deleted, in the same transaction. Ingestion reads the marks under a share
  lock and refuses reports that ended before the raw mark, so a report whose copy
  was deleted is never counted a second time; no tier takes data from before its mark.
- Queries never read below a mark: :func:`server.drift.timerange.plan` widens or
  clips the range instead, and says so.
- Every run deletes everything below the marks, so rows a racing writer left there
  are gone by the next run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, Table, delete, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.db import session_scope
from server.drift.models import RetentionMark
from server.drift.rollups import device_table, fleet_table
from server.drift.timerange import Period, floor_to
from server.errors import ConfigurationError
from server.ingest.models import ModelWindowRecord, TelemetryRecord

__all__ = [
    "DEFAULT_RETENTION_DAYS",
    "PurgeResult",
    "RetentionJob",
    "RetentionPolicy",
    "purge_expired",
]

log = logging.getLogger(__name__)

DEFAULT_RETENTION_DAYS = {"raw": 7, "hour": 30, "day": 400}
TIERS = ("raw", "hour", "day")


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """How many days each tier is kept."""

    raw_days: int = DEFAULT_RETENTION_DAYS["raw"]
    hour_days: int = DEFAULT_RETENTION_DAYS["hour"]
    day_days: int = DEFAULT_RETENTION_DAYS["day"]

    @classmethod
    def from_days(cls, days: Mapping[str, int]) -> RetentionPolicy:
        """From the ``drift_retention_days`` setting; missing tiers keep their defaults."""
        unknown = set(days) - set(TIERS)
        if unknown:
            raise ConfigurationError(
                f"drift retention: unknown tier(s) {sorted(unknown)}; use raw, hour and day"
            )
        merged = DEFAULT_RETENTION_DAYS | dict(days)
        for tier, value in merged.items():
            if not isinstance(value, int) or value < 1:
                raise ConfigurationError(
                    f"drift retention: {tier} must be a whole number of days >= 1, not {value!r}"
                )
        return cls(raw_days=merged["raw"], hour_days=merged["hour"], day_days=merged["day"])

    def horizons(self, now: datetime) -> dict[str, datetime]:
        """Per tier, the time before which its data is deleted (whole hours / days)."""
        return {
            "raw": floor_to(now - timedelta(days=self.raw_days), Period.HOUR),
            "hour": floor_to(now - timedelta(days=self.hour_days), Period.HOUR),
            "day": floor_to(now - timedelta(days=self.day_days), Period.DAY),
        }


@dataclass(frozen=True, slots=True)
class PurgeResult:
    marks: dict[str, datetime]
    reports: int
    windows: int
    hour_rows: int
    """Hour and 6-hour rows deleted."""
    day_rows: int


def purge_expired(session: Session, *, policy: RetentionPolicy, now: datetime) -> PurgeResult:
    """Move the marks to the policy's horizons and delete what lies before them.

    Runs in the caller's transaction (the caller commits).
    """
    horizons = policy.horizons(now)
    current = {
        m.tier: m for m in session.execute(select(RetentionMark).with_for_update()).scalars()
    }
    marks: dict[str, datetime] = {}
    for tier in TIERS:
        row = current.get(tier)
        if row is None:
            row = RetentionMark(tier=tier, before=horizons[tier], updated_at=now)
        elif horizons[tier] > row.before:
            row.before, row.updated_at = horizons[tier], now
        marks[tier] = row.before
        session.add(row)
    session.flush()  # the marks move first: ingestion waits on them, then sees them

    def removed(table: Table, *conditions: ColumnElement[bool]) -> int:
        result = cast(CursorResult[Any], session.execute(delete(table).where(*conditions)))
        return int(result.rowcount)

    reports_table: Table = TelemetryRecord.__table__  # type: ignore[attr-defined]
    windows_table: Table = ModelWindowRecord.__table__  # type: ignore[attr-defined]
    reports = removed(reports_table, reports_table.c.window_end < marks["raw"])
    windows = removed(windows_table, windows_table.c.window_end < marks["raw"])
    tier_rows = {"hour": 0, "day": 0}
    for period in Period:
        tier_rows[period.tier] += sum(
            removed(
                table,
                table.c.period == period.value,
                table.c.bucket_start < marks[period.tier],
            )
            for table in (device_table(), fleet_table())
        )
    return PurgeResult(
        marks=marks,
        reports=reports,
        windows=windows,
        hour_rows=tier_rows["hour"],
        day_rows=tier_rows["day"],
    )


class RetentionJob:
    """Run :func:`purge_expired` every ``interval`` seconds on a thread until :meth:`stop`."""

    def __init__(
        self,
        engine: Engine,
        *,
        policy: RetentionPolicy,
        interval: float = 3600.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.engine = engine
        self.policy = policy
        self.interval = interval
        self.clock = clock
        self.last: PurgeResult | None = None
        self.runs = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> PurgeResult:
        with session_scope(self.engine) as session:
            result = purge_expired(session, policy=self.policy, now=self.clock())
        self.last = result
        self.runs += 1
        log.info(
            "retention purge",
            extra={
                "reports": result.reports,
                "windows": result.windows,
                "hour_rows": result.hour_rows,
                "day_rows": result.day_rows,
            },
        )
        return result

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="drift-retention", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # the database is down, say: try again next time
                log.exception("retention purge failed")
            self._stop.wait(self.interval)
