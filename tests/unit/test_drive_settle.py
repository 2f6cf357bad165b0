"""When a choice among same-named Drive items can no longer change (adapters/drive/settle.py)."""

from __future__ import annotations

import pytest

from dicomflow.adapters.drive.settle import ANCHOR_MAX_AGE, MARGIN, DriveClock, drive_time, rank, settled

pytestmark = pytest.mark.unit

T = "2025-11-06T10:15:30.123Z"


class Monotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_oldest_ranks_first_and_a_same_millisecond_tie_goes_to_the_smaller_id() -> None:
    items = [
        {"id": "1b", "createdTime": T},
        {"id": "1a", "createdTime": T},
        {"id": "0z", "createdTime": "2025-11-06T10:15:30.124Z"},
    ]
    assert [i["id"] for i in sorted(items, key=rank)] == ["1a", "1b", "0z"]


def test_drive_time_reads_milliseconds() -> None:
    assert drive_time("1970-01-01T00:00:01.250Z") == 1.25


def test_a_listing_settles_only_when_sent_later_than_the_winner_plus_the_margin() -> None:
    created = drive_time(T)
    assert not settled(T, None)  # nothing known about Drive's clock
    assert not settled(T, created)  # a sibling may still be stamped this very millisecond
    assert not settled(T, created + MARGIN)
    assert settled(T, created + MARGIN + 0.001)


def test_the_clock_bound_grows_with_local_time_from_the_latest_stamp_drive_returned() -> None:
    local = Monotonic()
    clock = DriveClock(local)
    assert clock.now() is None
    clock.saw([T, None, "2025-11-06T10:15:29.000Z"])
    local.now += 2.0
    assert clock.now() == pytest.approx(drive_time(T) + 2.0)
    clock.saw(["2025-11-06T10:15:31.000Z"])  # older than what we already know Drive has passed: ignored
    assert clock.now() == pytest.approx(drive_time(T) + 2.0)
    clock.saw(["2025-11-06T10:15:40.000Z"])
    assert clock.now() == pytest.approx(drive_time("2025-11-06T10:15:40.000Z"))


def test_an_old_anchor_is_not_extrapolated() -> None:
    local = Monotonic()
    clock = DriveClock(local)
    clock.saw([T])
    local.now += ANCHOR_MAX_AGE + 1
    assert clock.now() is None


def test_waiting_past_a_fresh_stamp_takes_the_margin_and_no_more() -> None:
    local = Monotonic()
    clock = DriveClock(local)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        local.now += min(seconds, 0.05)  # a capped sleep, like DriveConnection.sleep in tests

    clock.wait_past(T, sleep)
    assert MARGIN < sum(min(s, 0.05) for s in slept) < MARGIN + 0.06
    assert settled(T, clock.now())
    slept.clear()
    clock.wait_past("2025-11-06T10:15:29.000Z", sleep)  # already past: no wait
    assert slept == []
