"""Time ranges of the drift view: parsing ``since`` / ``until``, buckets, and query plans.

Rollups exist per hour, per 6 hours (00, 06, 12, 18 h) and per day (UTC); a window
counts in the buckets in which it started. A range is answered at hour resolution:
``since`` is floored and ``until`` ceiled to whole hours, and the effective range is
reported with every answer. :func:`plan` covers a range with the coarsest buckets that
fit -- whole days as day rows, whole 6-hour blocks as 6-hour rows, the hours at either
end as hour rows -- so a query reads few rows per device. Integer sums (counts,
windows) may also be read by :func:`count_plan`, which may take rows away: a day mostly
inside the range as its day row *minus* the rest, a 6-hour block as its row minus its
hours outside. A rolling 24 h then reads at most 9 rows per device (from 09:00 or
15:00), 4 from 12:00 and 3 from 01:00, where hour rows alone were 24.

What always holds: pure functions of their arguments and ``now`` (no clock read
here); every datetime returned is aware UTC; a plan's segments are disjoint, sorted,
and together cover exactly ``[plan.since, plan.until)``; a count plan counts every
hour of that range once, net, and no other hour.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from server.drift.errors import TimeRangeError

__all__ = [
    "MAX_RANGE",
    "CountPlan",
    "Period",
    "Plan",
    "Segment",
    "ceil_to",
    "count_plan",
    "floor_to",
    "parse_instant",
    "plan",
    "resolve_range",
]

MAX_RANGE = timedelta(days=800)
"""The longest range a query may ask for (longer than any default retention)."""

_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+)([mhdw])")


class Period(StrEnum):
    HOUR = "hour"
    SIX_HOURS = "6h"
    DAY = "day"

    @property
    def length(self) -> timedelta:
        return _LENGTHS[self]

    @property
    def tier(self) -> str:
        """The retention tier whose mark bounds this period's rows: 6-hour rows are kept
        (and deleted) with the hour rows they add up."""
        return "day" if self is Period.DAY else "hour"


_LENGTHS = {
    Period.HOUR: timedelta(hours=1),
    Period.SIX_HOURS: timedelta(hours=6),
    Period.DAY: timedelta(days=1),
}


def floor_to(moment: datetime, period: Period) -> datetime:
    """The start of the bucket of ``period`` holding ``moment`` (aware, UTC)."""
    if moment.tzinfo is None:
        raise ValueError("naive datetimes are not bucketed; use an aware UTC datetime")
    utc = moment.astimezone(UTC)
    if period is Period.HOUR:
        return utc.replace(minute=0, second=0, microsecond=0)
    if period is Period.SIX_HOURS:
        return utc.replace(hour=utc.hour - utc.hour % 6, minute=0, second=0, microsecond=0)
    return utc.replace(hour=0, minute=0, second=0, microsecond=0)


def ceil_to(moment: datetime, period: Period) -> datetime:
    floored = floor_to(moment, period)
    return floored if floored == moment.astimezone(UTC) else floored + period.length


def parse_instant(text: str, *, now: datetime, name: str) -> datetime:
    """``24h`` / ``7d`` / ``1d12h`` / ``90m`` / ``2w`` ago, ``now``, or an ISO 8601 time.

    An ISO time without an offset is taken as UTC. ``name`` (``since``, ``until``) is
    what an error message calls the parameter.
    """
    compact = text.strip().lower().replace(" ", "")
    if compact == "now":
        return now.astimezone(UTC)
    parts = _DURATION.findall(compact)
    if parts and "".join(n + u for n, u in parts) == compact:
        seconds = sum(int(n) * _UNITS[u] for n, u in parts)
        if seconds <= 0:
            raise TimeRangeError(f"{name}={text!r}: a duration must be longer than zero")
        if seconds > MAX_RANGE.total_seconds():
            raise TimeRangeError(f"{name}={text!r}: at most {MAX_RANGE.days} days back")
        return (now - timedelta(seconds=seconds)).astimezone(UTC)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise TimeRangeError(
            f"{name}={text!r}: use a duration ago (30m, 24h, 7d, 1d12h, 2w), 'now', "
            "or an ISO 8601 time such as 2026-11-29T12:00:00Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def resolve_range(since: str, until: str | None, *, now: datetime) -> tuple[datetime, datetime]:
    """Parse and snap a range to whole hours: ``[floor(since), ceil(until))``."""
    start = floor_to(parse_instant(since, now=now, name="since"), Period.HOUR)
    end = ceil_to(
        parse_instant(until, now=now, name="until") if until else now.astimezone(UTC), Period.HOUR
    )
    if start >= end:
        raise TimeRangeError(
            f"since ({start.isoformat()}) must be before until ({end.isoformat()})"
        )
    if end - start > MAX_RANGE:
        raise TimeRangeError(f"the range is longer than {MAX_RANGE.days} days")
    return start, end


@dataclass(frozen=True, slots=True)
class Segment:
    """Rows of ``period`` whose bucket starts in ``[start, end)``."""

    period: Period
    start: datetime
    end: datetime


@dataclass(frozen=True, slots=True)
class Plan:
    """Which rollup rows answer a range, and the range they answer exactly."""

    since: datetime
    until: datetime
    segments: tuple[Segment, ...]
    widened: bool
    """The range had to grow to whole days: the hours at its ends were deleted."""
    clipped: bool
    """The range had to shrink: its start was deleted from every tier."""


def plan(
    since: datetime,
    until: datetime,
    *,
    hour_deleted_before: datetime | None = None,
    day_deleted_before: datetime | None = None,
) -> Plan:
    """Cover ``[since, until)`` (whole hours) with the fewest rows per device.

    Whole days inside the range are read as day rows, the rest as hour rows. Hours
    whose hour rows were deleted are read from their day's row instead, which widens
    the range to that whole day; a start before even the day rows' retention is moved
    up to it. Either is flagged on the plan.
    """
    clipped = False
    if day_deleted_before is not None and since < day_deleted_before:
        since = ceil_to(day_deleted_before, Period.DAY)
        clipped = True
        if since >= until:
            raise TimeRangeError(
                f"everything before {since.isoformat()} has been deleted (retention); "
                "the range holds no data that is kept"
            )
    first_day = ceil_to(since, Period.DAY)
    last_day = floor_to(until, Period.DAY)
    hours: list[tuple[datetime, datetime]] = []
    days: list[tuple[datetime, datetime]] = []
    if first_day < last_day:
        days.append((first_day, last_day))
        hours += [(since, first_day), (last_day, until)]
    else:
        hours.append((since, until))
    widened = False
    kept_hours = []
    for start, end in hours:
        while start < end:  # one day at a time: a deleted hour costs its own day only
            stop = min(end, floor_to(start, Period.DAY) + Period.DAY.length)
            if hour_deleted_before is not None and start < hour_deleted_before:
                days.append((floor_to(start, Period.DAY), ceil_to(stop, Period.DAY)))
                widened = True
            else:
                kept_hours.append((start, stop))
            start = stop
    sixes: list[tuple[datetime, datetime]] = []
    single_hours: list[tuple[datetime, datetime]] = []
    for start, end in _merge(kept_hours):  # whole 6-hour blocks inside as 6-hour rows
        first = ceil_to(start, Period.SIX_HOURS)
        last = max(first, floor_to(end, Period.SIX_HOURS))
        if first < last:
            sixes.append((first, last))
            single_hours += [(start, first), (last, end)]
        else:
            single_hours.append((start, end))
    segments = [Segment(Period.DAY, s, e) for s, e in _merge(days)]
    segments += [Segment(Period.SIX_HOURS, s, e) for s, e in _merge(sixes)]
    segments += [Segment(Period.HOUR, s, e) for s, e in _merge(single_hours) if s < e]
    segments.sort(key=lambda s: s.start)
    return Plan(
        since=segments[0].start,
        until=segments[-1].end,
        segments=tuple(segments),
        widened=widened,
        clipped=clipped,
    )


def _merge(spans: list[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    merged: list[tuple[datetime, datetime]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


@dataclass(frozen=True, slots=True)
class CountPlan:
    """Rows whose integer sums, ``plus`` minus ``minus``, are the sums over a plan's range.

    Only for what adds up exactly and can be taken away again (counts, windows): not
    moments, whose min and max do not subtract.
    """

    plus: tuple[Segment, ...]
    minus: tuple[Segment, ...]


_HOURS_PER_SIX = 6


def count_plan(covered: Plan, *, hour_deleted_before: datetime | None = None) -> CountPlan:
    """``covered``'s range with the fewest rows per device, taking rows away where that
    reads fewer: a day mostly inside the range as its day row minus the rest of the day,
    a 6-hour block mostly inside as its row minus its hours outside.

    Each day's part of the range (one run of hours) is costed block by block: a 6-hour
    block with ``k`` hours inside costs ``min(k, 1 + (6 - k))`` rows read directly, or
    ``min(6 - k, 1 + k)`` as the part of the day row to take away; the day row minus
    its outside is used when that costs less. Only rows whose hours are all kept (none
    before ``hour_deleted_before``) are read that way; a day or 6-hour row is the exact
    sum of its hour rows, all being written in one transaction, so reading them in one
    statement gives the plan's sums exactly.
    """
    plus: list[Segment] = []
    minus: list[Segment] = []
    by_day: dict[datetime, list[tuple[datetime, datetime]]] = {}
    for segment in covered.segments:
        if segment.period is Period.DAY:
            plus.append(segment)
            continue
        start = segment.start
        while start < segment.end:  # split runs at midnight
            day = floor_to(start, Period.DAY)
            stop = min(segment.end, day + Period.DAY.length)
            by_day.setdefault(day, []).append((start, stop))
            start = stop
    hour = Period.HOUR.length
    for day, spans in sorted(by_day.items()):
        inside = [False] * 24
        for start, stop in spans:
            for h in range((start - day) // hour, (stop - day) // hour):
                inside[h] = True

        def kept(start: datetime) -> bool:
            return hour_deleted_before is None or hour_deleted_before <= start

        direct: list[tuple[int, list[int], list[int], list[int]]] = []
        """Per block: cost, then the hours to add, the blocks to add, the hours to take away."""
        outside: list[tuple[int, list[int], list[int], list[int]]] = []
        """The same for the block's hours *outside* the range (what a day row has too much)."""
        for block in range(24 // _HOURS_PER_SIX):
            hours = list(range(block * _HOURS_PER_SIX, (block + 1) * _HOURS_PER_SIX))
            ins = [h for h in hours if inside[h]]
            outs = [h for h in hours if not inside[h]]
            whole = kept(day + block * _HOURS_PER_SIX * hour)
            direct.append(_cheapest(ins, outs, block, whole))
            outside.append(_cheapest(outs, ins, block, whole))
        cost_direct = sum(c for c, *_ in direct)
        cost_minus = 1 + sum(c for c, *_ in outside)
        if kept(day) and cost_minus < cost_direct:
            plus.append(Segment(Period.DAY, day, day + Period.DAY.length))
            for _, add_hours, add_blocks, take_hours in outside:  # signs flip: day minus these
                minus += _hour_segments(day, add_hours) + _six_segments(day, add_blocks)
                plus += _hour_segments(day, take_hours)
        else:
            for _, add_hours, add_blocks, take_hours in direct:
                plus += _hour_segments(day, add_hours) + _six_segments(day, add_blocks)
                minus += _hour_segments(day, take_hours)
    return CountPlan(plus=_merged(plus), minus=_merged(minus))


def _cheapest(
    wanted: list[int], others: list[int], block: int, block_kept: bool
) -> tuple[int, list[int], list[int], list[int]]:
    """The hours ``wanted`` of one 6-hour block: as hour rows, or (if the block's row is
    kept and it costs less) the block's row minus the ``others``."""
    if not wanted:
        return 0, [], [], []
    if block_kept and 1 + len(others) < len(wanted):
        return 1 + len(others), [], [block], others
    if block_kept and not others:
        return 1, [], [block], []
    return len(wanted), wanted, [], []


def _hour_segments(day: datetime, hours: list[int]) -> list[Segment]:
    hour = Period.HOUR.length
    return [Segment(Period.HOUR, day + h * hour, day + (h + 1) * hour) for h in hours]


def _six_segments(day: datetime, blocks: list[int]) -> list[Segment]:
    six = Period.SIX_HOURS.length
    return [Segment(Period.SIX_HOURS, day + b * six, day + (b + 1) * six) for b in blocks]


def _merged(segments: list[Segment]) -> tuple[Segment, ...]:
    out: list[Segment] = []
    for period in Period:
        spans = _merge([(s.start, s.end) for s in segments if s.period is period])
        out += [Segment(period, a, b) for a, b in spans]
    return tuple(sorted(out, key=lambda s: (s.start, s.period)))
