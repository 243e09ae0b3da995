"""The install window of a deployment: when it is open, when it next opens, and how it
travels -- absent from the payload when there is none, kept whole (unknown fields too)
when there is one."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.errors import MessageError
from shared.messages import DesiredState, InstallWindow
from tests.shared.conftest import make_desired

DAY = datetime(2026, 11, 29, tzinfo=UTC)


def at(hour: int, minute: int = 0) -> datetime:
    return DAY.replace(hour=hour, minute=minute)


def test_a_window_contains_its_start_and_not_its_end() -> None:
    night = InstallWindow(start="02:00", end="04:30")
    assert not night.contains(at(1, 59))
    assert night.contains(at(2, 0)) and night.contains(at(4, 29))
    assert not night.contains(at(4, 30))
    # Any timezone: 03:00 UTC is 04:00 in UTC+1.
    assert night.contains(datetime(2026, 11, 29, 4, 0, tzinfo=timezone(timedelta(hours=1))))
    with pytest.raises(ValueError, match="timezone-aware"):
        night.contains(datetime(2026, 11, 29, 3, 0))  # naive: refused


def test_a_window_may_wrap_midnight() -> None:
    late = InstallWindow(start="22:00", end="02:00")
    assert late.contains(at(23, 30)) and late.contains(at(0, 0)) and late.contains(at(1, 59))
    assert not late.contains(at(2, 0)) and not late.contains(at(12, 0))
    assert late.next_opening(at(12, 0)) == at(22, 0)
    assert late.next_opening(at(23, 0)) == at(23, 0)  # open now: now
    assert str(late) == "22:00-02:00 UTC"


def test_the_next_opening_is_today_or_tomorrow() -> None:
    night = InstallWindow(start="02:00", end="04:00")
    assert night.next_opening(at(1, 0)) == at(2, 0)
    assert night.next_opening(at(4, 0)) == at(2, 0) + timedelta(days=1)
    assert night.next_opening(at(3, 15)) == at(3, 15)


@given(
    start=st.integers(0, 24 * 60 - 1),
    length=st.integers(1, 24 * 60 - 1),
    moment=st.datetimes(
        min_value=datetime(2020, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC)
    ),
)
def test_the_next_opening_is_open_and_nothing_before_it_is(
    start: int, length: int, moment: datetime
) -> None:
    end = (start + length) % (24 * 60)
    window = InstallWindow(
        start=f"{start // 60:02d}:{start % 60:02d}", end=f"{end // 60:02d}:{end % 60:02d}"
    )
    opening = window.next_opening(moment)
    assert moment <= opening < moment + timedelta(days=1)
    assert window.contains(opening)
    if opening > moment:  # closed until then: the minute before it is outside the window
        assert not window.contains(opening - timedelta(minutes=1))
        assert opening.second == opening.microsecond == 0


@pytest.mark.parametrize(
    ("start", "end"),
    [("02:00", "02:00"), ("2:00", "04:00"), ("24:00", "01:00"), ("01:60", "02:00")],
)
def test_a_window_is_two_different_times_of_day(start: str, end: str) -> None:
    with pytest.raises(ValueError):
        InstallWindow(start=start, end=end)


def test_a_window_is_a_value() -> None:
    night = InstallWindow(start="02:00", end="04:00")
    assert night == InstallWindow(start="02:00", end="04:00")
    assert len({night, InstallWindow(start="02:00", end="04:00")}) == 1
    with pytest.raises(ValueError):
        night.start = "03:00"  # type: ignore[misc]


def test_without_a_window_the_payload_is_what_it_was_before_the_field() -> None:
    desired = make_desired()
    raw = json.loads(desired.to_bytes())
    assert "install_window" not in raw["deployments"][0]
    assert DesiredState.from_bytes(desired.to_bytes()).deployments[0].install_window is None


def test_a_window_round_trips_with_fields_a_newer_peer_added() -> None:
    desired = make_desired(
        deployments=[
            {
                "model_name": "digits",
                "model_version": 3,
                "target": "edge-arm64-litert",
                "artifact": {"sha256": "ab" * 32, "length": 4096},
                "install_window": {"start": "22:00", "end": "02:00", "weekdays": "mon-fri"},
            }
        ]
    )
    again = DesiredState.from_bytes(desired.to_bytes())
    assert again.to_bytes() == desired.to_bytes()
    (deployment,) = again.deployments
    window = deployment.install_window
    assert window is not None and (window.start, window.end) == ("22:00", "02:00")
    assert window.contains(at(23, 0))
    raw = json.loads(again.to_bytes())["deployments"][0]["install_window"]
    assert raw == {"start": "22:00", "end": "02:00", "weekdays": "mon-fri"}


def test_a_bad_window_refuses_the_whole_desired_state() -> None:
    raw = json.loads(make_desired().to_bytes())
    raw["deployments"][0]["install_window"] = {"start": "03:00", "end": "03:00"}
    with pytest.raises(MessageError, match="install_window"):
        DesiredState.from_bytes(json.dumps(raw).encode())
