"""Ranges and plans: what since / until mean, and which rollup rows answer a range."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.drift.errors import TimeRangeError
from server.drift.timerange import (
    CountPlan,
    Period,
    Segment,
    ceil_to,
    count_plan,
    floor_to,
    parse_instant,
    plan,
    resolve_range,
)

NOW = datetime(2026, 11, 29, 13, 37, 12, tzinfo=UTC)
H, S, D = Period.HOUR, Period.SIX_HOURS, Period.DAY


def at(day: int, hour: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", NOW - timedelta(hours=24)),
        ("7d", NOW - timedelta(days=7)),
        ("1d12h", NOW - timedelta(hours=36)),
        ("90m", NOW - timedelta(minutes=90)),
        ("2w", NOW - timedelta(weeks=2)),
        ("now", NOW),
        ("2026-11-28T10:00:00Z", at(28, 10)),
        ("2026-11-28T11:00:00+01:00", at(28, 10)),
        ("2026-11-28 10:00", at(28, 10)),  # no offset: UTC
    ],
)
def test_instants(text: str, expected: datetime) -> None:
    assert parse_instant(text, now=NOW, name="since") == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("yesterday", "since='yesterday': use a duration ago"),
        ("0h", "longer than zero"),
        ("900d", "at most 800 days"),
        ("24x", "use a duration ago"),
    ],
)
def test_bad_instants_name_the_parameter(text: str, message: str) -> None:
    with pytest.raises(TimeRangeError, match=message):
        parse_instant(text, now=NOW, name="since")


def test_ranges_snap_outward_to_whole_hours() -> None:
    assert resolve_range("24h", None, now=NOW) == (at(28, 13), at(29, 14))
    assert resolve_range("2026-11-28T10:30:00Z", "2026-11-28T12:00:00Z", now=NOW) == (
        at(28, 10),
        at(28, 12),
    )
    with pytest.raises(TimeRangeError, match="must be before until"):
        resolve_range("1h", "2h", now=NOW)
    with pytest.raises(TimeRangeError, match=r"until='soon'"):
        resolve_range("1h", "soon", now=NOW)


def test_floor_and_ceil() -> None:
    berlin = timezone(timedelta(hours=1))
    moment = datetime(2026, 11, 29, 0, 30, tzinfo=berlin)  # 23:30 UTC the day before
    assert floor_to(moment, D) == at(28)
    assert floor_to(moment, H) == at(28, 23)
    assert ceil_to(at(28, 5), H) == at(28, 5)
    assert ceil_to(moment, D) == at(29)
    with pytest.raises(ValueError, match="naive"):
        floor_to(datetime(2026, 1, 1), H)


def test_whole_days_are_read_as_day_rows_and_the_ends_as_hours() -> None:
    covered = plan(at(27, 13), at(29, 14))
    assert covered.segments == (
        Segment(H, at(27, 13), at(27, 18)),
        Segment(S, at(27, 18), at(28)),
        Segment(D, at(28), at(29)),
        Segment(S, at(29), at(29, 12)),
        Segment(H, at(29, 12), at(29, 14)),
    )
    assert (covered.since, covered.until, covered.widened, covered.clipped) == (
        at(27, 13),
        at(29, 14),
        False,
        False,
    )
    assert plan(at(28), at(30)).segments == (Segment(D, at(28), at(30)),)
    assert plan(at(28, 3), at(28, 9)).segments == (Segment(H, at(28, 3), at(28, 9)),)


def test_deleted_hours_widen_to_their_day_and_deleted_days_clip() -> None:
    widened = plan(at(27, 13), at(29, 14), hour_deleted_before=at(28, 6))
    assert widened.segments == (
        Segment(D, at(27), at(29)),
        Segment(S, at(29), at(29, 12)),
        Segment(H, at(29, 12), at(29, 14)),
    )
    assert widened.widened and (widened.since, widened.until) == (at(27), at(29, 14))
    clipped = plan(at(20, 5), at(29, 14), day_deleted_before=at(24, 12))
    assert clipped.clipped and clipped.since == at(25)
    with pytest.raises(TimeRangeError, match="deleted"):
        plan(at(20), at(21), day_deleted_before=at(24))


hours = st.integers(0, 24 * 20)


@given(hours, st.integers(1, 24 * 10), st.none() | hours, st.none() | st.integers(0, 20))
def test_plans_cover_their_range_once(
    start: int, length: int, hour_mark: int | None, day_mark: int | None
) -> None:
    base = at(1)
    since, until = base + timedelta(hours=start), base + timedelta(hours=start + length)
    hour_deleted = None if hour_mark is None else base + timedelta(hours=hour_mark)
    day_deleted = None if day_mark is None else base + timedelta(days=day_mark)
    try:
        covered = plan(
            since, until, hour_deleted_before=hour_deleted, day_deleted_before=day_deleted
        )
    except TimeRangeError:
        assert day_deleted is not None and ceil_to(day_deleted, D) >= until
        return
    # disjoint, sorted, gapless: exactly [since, until)
    edges = [(s.start, s.end) for s in covered.segments]
    assert edges[0][0] == covered.since and edges[-1][1] == covered.until
    assert all(a[1] == b[0] for a, b in itertools.pairwise(edges))
    for segment in covered.segments:
        assert segment.start < segment.end
        if segment.period is D:
            assert floor_to(segment.start, D) == segment.start
            assert ceil_to(segment.end, D) == segment.end
            assert day_deleted is None or segment.start >= day_deleted
        else:
            assert hour_deleted is None or segment.start >= hour_deleted
    # never less than asked, unless deleted; never more, unless widened to whole days
    assert covered.since <= since or covered.clipped
    assert covered.until >= until
    if not covered.widened and not covered.clipped:
        assert (covered.since, covered.until) == (since, until)
    if covered.widened:
        assert covered.until <= ceil_to(until, D) and covered.since >= floor_to(since, D)


def test_a_count_plan_reads_a_mostly_covered_day_as_its_row_minus_the_other_hours() -> None:
    rolling = plan(at(28, 1), at(29, 1))
    assert count_plan(rolling) == CountPlan(
        plus=(Segment(D, at(28), at(29)), Segment(H, at(29), at(29, 1))),
        minus=(Segment(H, at(28), at(28, 1)),),
    )
    # half a day each side: two 6-hour rows each
    assert count_plan(plan(at(28, 12), at(29, 12))) == CountPlan(
        plus=(Segment(S, at(28, 12), at(29, 12)),), minus=()
    )
    # from 09:00: three hours, then 6-hour rows, then three hours (9 rows, the most)
    assert count_plan(plan(at(28, 9), at(29, 9))) == CountPlan(
        plus=(
            Segment(H, at(28, 9), at(28, 12)),
            Segment(S, at(28, 12), at(29, 6)),
            Segment(H, at(29, 6), at(29, 9)),
        ),
        minus=(),
    )
    # five hours of a 6-hour block: its row minus the sixth
    assert count_plan(plan(at(28, 7), at(28, 12))) == CountPlan(
        plus=(Segment(S, at(28, 6), at(28, 12)),), minus=(Segment(H, at(28, 6), at(28, 7)),)
    )
    # both ends of one day taken off
    assert count_plan(plan(at(28, 2), at(28, 21))) == CountPlan(
        plus=(Segment(D, at(28), at(29)),),
        minus=(Segment(H, at(28), at(28, 2)), Segment(H, at(28, 21), at(29))),
    )
    # a day whose first hour was deleted is read hour by hour
    assert count_plan(rolling, hour_deleted_before=at(28, 1)).minus == ()


@given(
    st.integers(0, 24 * 5 - 1),
    st.integers(1, 24 * 5),
    st.one_of(st.none(), st.integers(0, 24 * 6)),
)
def test_count_plans_cover_each_hour_exactly_once(
    first: int, length: int, mark: int | None
) -> None:
    """Every hour of the plan's range is counted once net, every other hour zero times."""
    since = at(25) + timedelta(hours=first)
    until = since + timedelta(hours=length)
    hour_mark = None if mark is None else at(25) + timedelta(hours=mark)
    covered = plan(since, until, hour_deleted_before=hour_mark)
    counted = count_plan(covered, hour_deleted_before=hour_mark)
    net: dict[datetime, int] = {}
    for sign, segments in ((1, counted.plus), (-1, counted.minus)):
        for segment in segments:
            moment = segment.start
            while moment < segment.end:
                net[moment] = net.get(moment, 0) + sign
                moment += timedelta(hours=1)
            assert segment.period is D or hour_mark is None or segment.start >= hour_mark
    hours = {k for k, v in net.items() if v}
    assert set(net.values()) <= {0, 1}
    expected = set()
    moment = covered.since
    while moment < covered.until:
        expected.add(moment)
        moment += timedelta(hours=1)
    assert hours == expected
