"""Schedules (repo_server/fleet/calendar.py): next occurrences computed by hand, in UTC, and bad input."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from repo_server.engine.errors import Invalid
from repo_server.fleet.calendar import parse

T0 = datetime(2026, 11, 25, 15, 50, 7, tzinfo=UTC)  # a Wednesday


def nexts(expr: str, start: datetime = T0, n: int = 3) -> list[str]:
    schedule, out, t = parse(expr), [], start
    for _ in range(n):
        t = schedule.next_after(t, UTC)
        if t is None:
            break
        out.append(t.strftime("%a %Y-%m-%d %H:%M:%S"))
    return out


@pytest.mark.parametrize(("expr", "expected"), [
    ("mon..fri 22:00", ["Wed 2026-11-25 22:00:00", "Thu 2026-11-26 22:00:00", "Fri 2026-11-27 22:00:00"]),
    ("sat,sun 03:30", ["Sat 2026-11-28 03:30:00", "Sun 2026-11-29 03:30:00", "Sat 2026-12-05 03:30:00"]),
    ("sat 03:30", ["Sat 2026-11-28 03:30:00", "Sat 2026-12-05 03:30:00", "Sat 2026-12-12 03:30:00"]),
    ("mon,wed..fri 12:00:30", ["Thu 2026-11-26 12:00:30", "Fri 2026-11-27 12:00:30", "Mon 2026-11-30 12:00:30"]),
    ("Monday 01:02", ["Mon 2026-11-30 01:02:00", "Mon 2026-12-07 01:02:00", "Mon 2026-12-14 01:02:00"]),
    ("daily", ["Thu 2026-11-26 00:00:00", "Fri 2026-11-27 00:00:00", "Sat 2026-11-28 00:00:00"]),
    ("hourly", ["Wed 2026-11-25 16:00:00", "Wed 2026-11-25 17:00:00", "Wed 2026-11-25 18:00:00"]),
    ("minutely", ["Wed 2026-11-25 15:51:00", "Wed 2026-11-25 15:52:00", "Wed 2026-11-25 15:53:00"]),
    ("weekly", ["Mon 2026-11-30 00:00:00", "Mon 2026-12-07 00:00:00", "Mon 2026-12-14 00:00:00"]),
    ("monthly", ["Tue 2026-12-01 00:00:00", "Fri 2027-01-01 00:00:00", "Mon 2027-02-01 00:00:00"]),
    ("yearly", ["Fri 2027-01-01 00:00:00", "Sat 2028-01-01 00:00:00", "Mon 2029-01-01 00:00:00"]),
    ("*", ["Wed 2026-11-25 15:51:00", "Wed 2026-11-25 15:52:00", "Wed 2026-11-25 15:53:00"]),
    ("*:0/15", ["Wed 2026-11-25 16:00:00", "Wed 2026-11-25 16:15:00", "Wed 2026-11-25 16:30:00"]),
    ("*:*:0/5", ["Wed 2026-11-25 15:50:10", "Wed 2026-11-25 15:50:15", "Wed 2026-11-25 15:50:20"]),
    ("*:*:0/2", ["Wed 2026-11-25 15:50:08", "Wed 2026-11-25 15:50:10", "Wed 2026-11-25 15:50:12"]),
    ("mon..wed *:30/10", ["Wed 2026-11-25 16:30:00", "Wed 2026-11-25 16:40:00", "Wed 2026-11-25 16:50:00"]),
    ("fri 12..13:5/20", ["Fri 2026-11-27 12:05:00", "Fri 2026-11-27 12:25:00", "Fri 2026-11-27 12:45:00"]),
    ("12/2:5", ["Wed 2026-11-25 16:05:00", "Wed 2026-11-25 18:05:00", "Wed 2026-11-25 20:05:00"]),
    ("mon..fri 8..17,22:0/15", ["Wed 2026-11-25 16:00:00", "Wed 2026-11-25 16:15:00", "Wed 2026-11-25 16:30:00"]),
    ("8..18/5:00", ["Wed 2026-11-25 18:00:00", "Thu 2026-11-26 08:00:00", "Thu 2026-11-26 13:00:00"]),
    ("sat *-1..7 15:00", ["Sat 2026-12-05 15:00:00", "Sat 2027-01-02 15:00:00", "Sat 2027-02-06 15:00:00"]),
    ("*-*-31 00:00", ["Thu 2026-12-31 00:00:00", "Sun 2027-01-31 00:00:00", "Wed 2027-03-31 00:00:00"]),
    ("*-02-29 12:00", ["Tue 2028-02-29 12:00:00", "Sun 2032-02-29 12:00:00", "Fri 2036-02-29 12:00:00"]),
    ("*-05", ["Sat 2026-12-05 00:00:00", "Tue 2027-01-05 00:00:00", "Fri 2027-02-05 00:00:00"]),
    ("2030-10-21", ["Mon 2030-10-21 00:00:00"]),
    ("2026..2027-12-31 23:59:59", ["Thu 2026-12-31 23:59:59", "Fri 2027-12-31 23:59:59"]),
    ("  mon..fri   22:00 ", ["Wed 2026-11-25 22:00:00", "Thu 2026-11-26 22:00:00", "Fri 2026-11-27 22:00:00"]),
    # cron: minute hour day month weekday
    ("30 22 * * 1-5", ["Wed 2026-11-25 22:30:00", "Thu 2026-11-26 22:30:00", "Fri 2026-11-27 22:30:00"]),
    ("*/20 * * * *", ["Wed 2026-11-25 16:00:00", "Wed 2026-11-25 16:20:00", "Wed 2026-11-25 16:40:00"]),
    ("0 0 * * 0", ["Sun 2026-11-29 00:00:00", "Sun 2026-12-06 00:00:00", "Sun 2026-12-13 00:00:00"]),
    ("0 0 * * 7", ["Sun 2026-11-29 00:00:00", "Sun 2026-12-06 00:00:00", "Sun 2026-12-13 00:00:00"]),
    ("0 3 * * sat,sun", ["Sat 2026-11-28 03:00:00", "Sun 2026-11-29 03:00:00", "Sat 2026-12-05 03:00:00"]),
    ("0 0 29 2 *", ["Tue 2028-02-29 00:00:00", "Sun 2032-02-29 00:00:00", "Fri 2036-02-29 00:00:00"]),
    ("0 12 1 * mon", ["Mon 2026-11-30 12:00:00", "Tue 2026-12-01 12:00:00", "Mon 2026-12-07 12:00:00"]),
    ("15 4 31 jan,mar *", ["Sun 2027-01-31 04:15:00", "Wed 2027-03-31 04:15:00", "Mon 2028-01-31 04:15:00"]),
    ("0 9-17/4 * * *", ["Wed 2026-11-25 17:00:00", "Thu 2026-11-26 09:00:00", "Thu 2026-11-26 13:00:00"]),
])
def test_next_occurrences(expr: str, expected: list[str]) -> None:
    assert nexts(expr) == expected


def test_strictly_after_and_year_and_month_ends() -> None:
    exact = datetime(2026, 11, 25, 22, 0, tzinfo=UTC)
    assert nexts("mon..fri 22:00", exact, 1) == ["Thu 2026-11-26 22:00:00"]  # never t itself
    assert nexts("*:*:*", datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC), 2) == [
        "Fri 2027-01-01 00:00:00", "Fri 2027-01-01 00:00:01"]
    assert nexts("*-*-30 06:00", datetime(2027, 1, 30, 7, tzinfo=UTC), 2) == [
        "Tue 2027-03-30 06:00:00", "Fri 2027-04-30 06:00:00"]  # February has no 30th
    assert nexts("2030-10-21", datetime(2031, 1, 1, tzinfo=UTC)) == []  # a past date never comes again


def test_zones() -> None:
    plus2 = timezone(timedelta(hours=2))
    t = parse("daily").next_after(T0, plus2)  # 17:50 at +02:00: the next midnight there
    assert t == datetime(2026, 11, 26, 0, 0, tzinfo=plus2)
    assert t.astimezone(UTC) == datetime(2026, 11, 25, 22, 0, tzinfo=UTC)
    local = parse("hourly").next_after(T0)  # default: the server's local zone
    assert local > T0 and local.minute == 0 and local.second == 0 and local - T0 <= timedelta(hours=1)


@pytest.mark.parametrize(("expr", "why"), [
    ("", "empty"), ("   ", "empty"), ("garbage", "not a weekday"), ("25:00", "hour 25 is out of range"),
    ("*:60", "minute 60 is out of range"), ("*:*:61", "second 61 is out of range"), ("mon..", "not a weekday"),
    ("fri..mon 10:00", "runs backwards"), ("*:0/0", "must be a positive number"), ("*:0/x", "positive number"),
    ("x" * 300, "at most 200"), ("10", "HOUR:MINUTE"), ("1:2:3:4", "HOUR:MINUTE"), ("*-02-30", "never occurs"),
    ("*-13-01", "month 13 is out of range"), ("*-00-01", "month 0 is out of range"), ("1-2-3-4", "[YEAR-]MONTH-DAY"),
    ("mon 10:00 extra", "unexpected"), ("\x00", "characters"), ("mön 10:00", "characters"),
    ("10..5:00", "runs backwards"), ("99999:00", "not a number"), ("-1:00", "[YEAR-]MONTH-DAY"),
    ("60 * * * *", "minute 60 is out of range"), ("* * * * 8", "day of week 8 is out of range"),
    ("* * 0 * *", "day of month 0"), ("* 24 * * *", "hour 24"), ("* * * 13 *", "month 13"),
    ("* * * foo *", "not a number"), ("1,,2 * * * *", "not a number"), ("1 2 3", "HOUR:MINUTE"),
])
def test_malformed(expr: str, why: str) -> None:
    with pytest.raises(Invalid) as e:
        parse(expr)
    assert why in e.value.message
    assert "mon..fri 22:00" in e.value.message and "30 22 * * 1-5" in e.value.message  # shows the syntax
    assert e.value.code == "bad_schedule"


@pytest.mark.parametrize("value", [None, 5, ["daily"], {"a": 1}, b"daily"])
def test_not_a_string(value: object) -> None:
    with pytest.raises(Invalid, match="must be a string"):
        parse(value)
