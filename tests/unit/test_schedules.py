"""Schedules: slots of `every` and cron expressions, timezones and DST, catch-up policies."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from omniq.schedules import Schedule, ScheduleError

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
BERLIN = ZoneInfo("Europe/Berlin")


def every(seconds: float, **kw: object) -> Schedule:
    return Schedule(name="s", func="omniq.examples:add", every=seconds, created_at=T0, **kw)


def cron(expr: str, tz: str = "UTC", **kw: object) -> Schedule:
    return Schedule(name="c", func="omniq.examples:add", cron=expr, timezone=tz,
                    created_at=kw.pop("created_at", T0), **kw)  # type: ignore[arg-type]


def test_every_slots_sit_on_a_grid_from_creation() -> None:
    s = every(30)
    assert s.due(T0 + timedelta(seconds=29)) == []
    assert s.due(T0 + timedelta(seconds=31)) == [T0 + timedelta(seconds=30)]
    fired = s.fired(T0 + timedelta(seconds=30))
    assert fired.due(T0 + timedelta(seconds=59)) == []  # the fired slot is not due again
    assert fired.due(T0 + timedelta(seconds=60)) == [T0 + timedelta(seconds=60)]
    assert s.next_slot(T0 + timedelta(seconds=45)) == T0 + timedelta(seconds=60)


def test_catch_up_latest_runs_the_newest_missed_slot_once() -> None:
    s = every(60).fired(T0 + timedelta(minutes=1))
    now = T0 + timedelta(minutes=10, seconds=20)  # no worker ran for nine slots
    assert s.due(now) == [T0 + timedelta(minutes=10)]


def test_catch_up_all_runs_each_missed_slot_up_to_the_limit() -> None:
    s = every(60, catch_up="all", catch_up_limit=5).fired(T0 + timedelta(minutes=1))
    now = T0 + timedelta(minutes=10, seconds=20)
    assert s.due(now) == [T0 + timedelta(minutes=m) for m in range(6, 11)]
    few = every(60, catch_up="all").fired(T0 + timedelta(minutes=1))
    assert len(few.due(now)) == 9


def test_catch_up_none_skips_missed_slots() -> None:
    s = every(60, catch_up="none").fired(T0 + timedelta(minutes=1))
    assert s.due(T0 + timedelta(minutes=10, seconds=20)) == []  # missed: skipped
    assert s.due(T0 + timedelta(minutes=11, seconds=1)) == [T0 + timedelta(minutes=11)]


def test_cron_in_a_timezone() -> None:
    s = cron("0 9 * * *", "Europe/Berlin")
    assert s.next_slot(T0) == datetime(2026, 1, 2, 9, 0, tzinfo=BERLIN).astimezone(UTC)
    assert s.next_slot(T0).hour == 8  # 09:00 CET is 08:00 UTC in winter
    summer = datetime(2026, 7, 1, tzinfo=UTC)
    assert s.next_slot(summer).hour == 7  # CEST


def test_cron_across_spring_forward_runs_a_skipped_time_after_the_gap() -> None:
    # 2026-03-29 02:00-03:00 does not exist in Berlin: the 02:30 job runs at 03:00.
    s = cron("30 2 * * *", "Europe/Berlin", created_at=datetime(2026, 3, 28, 12, tzinfo=UTC))
    slot = s.next_slot(datetime(2026, 3, 28, 12, tzinfo=UTC))
    assert slot.astimezone(BERLIN) == datetime(2026, 3, 29, 3, 0, tzinfo=BERLIN)
    after = s.next_slot(slot)
    assert after.astimezone(BERLIN).replace(tzinfo=None) == datetime(2026, 3, 30, 2, 30)


def test_cron_across_fall_back_fires_a_fixed_time_once() -> None:
    # 02:30 happens twice on 2026-10-25 in Berlin; a daily 02:30 job runs once.
    start = datetime(2026, 10, 24, 12, tzinfo=UTC)
    s = cron("30 2 * * *", "Europe/Berlin", created_at=start, catch_up="all")
    slots = s.due(datetime(2026, 10, 26, 12, tzinfo=UTC))
    assert [x.astimezone(BERLIN).day for x in slots] == [25, 26]


def test_slot_keys_are_unique_per_schedule_and_instant() -> None:
    s = every(30)
    a, b = T0 + timedelta(seconds=30), T0 + timedelta(seconds=60)
    assert s.slot_key(a) != s.slot_key(b)
    assert s.slot_key(a) == s.slot_key(a.astimezone(BERLIN))  # one instant, one key
    assert replace(s, name="t").slot_key(a) != s.slot_key(a)


def test_a_record_round_trips() -> None:
    s = cron("*/5 * * * *", "Europe/Berlin", args=(1, 2), kwargs={"k": "v"}, queue="q",
             options={"retries": 2}, paused=True).fired(T0 + timedelta(minutes=5))
    assert Schedule.from_record(s.to_record()) == s


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"every": 30, "cron": "* * * * *"}, "either `cron` or `every`"),
        ({}, "either `cron` or `every`"),
        ({"every": 0.5}, "at least 1 second"),
        ({"cron": "61 * * * *"}, "bad cron expression"),
        ({"every": 30, "timezone": "Mars/Olympus"}, "unknown timezone"),
        ({"every": 30, "catch_up": "some"}, "catch_up must be one of"),
        ({"every": 30, "queue": "bad queue"}, "invalid queue name"),
        ({"every": 30, "options": {"unique_key": "x"}}, "unknown task option"),
        ({"every": 30, "name": "no spaces"}, "schedule name"),
    ],
)
def test_a_schedule_that_cannot_work_is_refused(values: dict[str, object], message: str) -> None:
    values = {"name": "s", "func": "omniq.examples:add", **values}
    with pytest.raises(ScheduleError, match=message):
        Schedule(**values)  # type: ignore[arg-type]
