"""Schedules: Proxmox Backup Server calendar events and 5-field cron lines.

Calendar events (PBS, after systemd.time): `[WEEKDAYS] [[YEAR-]MONTH-DAY] [HOUR:MINUTE[:SECOND]]`.
Weekdays are `mon`..`sun` (lists `sat,sun`, ranges `mon..fri`). Every number field takes `*`, a value,
a list `a,b`, a range `a..b` and a repetition `start/step` or `a..b/step` (`*:0/15` = every 15
minutes, `*:*:0/5` = every 5 seconds). A missing time means 00:00, missing seconds mean :00, a
missing date means every day; a bare `*` means every minute. Shortcuts: minutely, hourly, daily,
weekly, monthly, yearly (also quarterly, semiannually as in PBS).

Cron lines: `MINUTE HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK` with `*`, `a-b`, `a,b`, `*/n`, `a-b/n` and
names (jan, mon); day of week 0-7 (0 and 7 are Sunday); when both day fields are restricted a day
matching either one counts, as cron does.

Times are wall-clock times in a given time zone: the server's local zone unless one is passed
(`next_after(t, tz)`). Across a DST gap a wall time that does not exist resolves as Python's
`astimezone` does (fold=0).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo

from repo_server.engine.errors import Invalid

MAX_LEN = 200
SEARCH_YEARS = 100  # an event with no occurrence within this many years never occurs
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DAY_NAMES = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
SHORTCUTS = {
    "minutely": "*:*", "hourly": "*:0", "daily": "0:0", "weekly": "mon 0:0", "monthly": "*-*-01 0:0",
    "yearly": "*-01-01 0:0", "annually": "*-01-01 0:0", "quarterly": "*-01,04,07,10-01 0:0",
    "semiannually": "*-01,07-01 0:0",
}
SYNTAX = ('a schedule is a calendar event "[WEEKDAYS] [[YEAR-]MONTH-DAY] HOUR:MINUTE[:SECOND]" '
          '(e.g. "mon..fri 22:00", "sat,sun 03:30", "*:0/15", "*:*:0/5", "*-*-01 02:00"; numbers take *, '
          'a,b, a..b and start/step), a shortcut (minutely, hourly, daily, weekly, monthly, yearly), '
          'or a 5-field cron line "MINUTE HOUR DAY MONTH WEEKDAY" (e.g. "30 22 * * 1-5")')


def _fail(expr: str, why: str) -> Invalid:
    return Invalid(f"bad schedule {expr[:80]!r}: {why}; {SYNTAX}", "bad_schedule")


def _number(text: str, names: tuple[str, ...], base: int, expr: str, what: str) -> int:
    if names and text.lower() in names:
        return names.index(text.lower()) + base
    if not text.isdigit() or len(text) > 4:
        raise _fail(expr, f"{what} {text[:20]!r} is not a number")
    return int(text)


def _field(text: str, lo: int, hi: int, expr: str, what: str, *, sep: str = "..",
           names: tuple[str, ...] = (), base: int = 0) -> tuple[int, ...] | None:
    """The sorted values a field allows, or None for every value (`*`)."""
    if text == "*":
        return None
    values: set[int] = set()
    for item in text.split(","):
        body, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or len(step_text) > 4 or int(step_text) == 0:
                raise _fail(expr, f"the step in {what} {item[:20]!r} must be a positive number")
            step = int(step_text)
        if body == "*":
            first, last = lo, hi
        elif sep in body:
            a, _, b = body.partition(sep)
            first, last = (_number(a, names, base, expr, what), _number(b, names, base, expr, what))
            if first > last:
                raise _fail(expr, f"the range {what} {body[:20]!r} runs backwards")
        else:
            first = _number(body, names, base, expr, what)
            last = hi if slash else first
        for value in (first, last):
            if not lo <= value <= hi:
                raise _fail(expr, f"{what} {value} is out of range {lo}..{hi}")
        values.update(range(first, last + 1, step))
    return tuple(sorted(values))


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule. Fields hold the allowed values, None meaning any."""

    text: str
    years: tuple[int, ...] | None
    months: tuple[int, ...] | None
    days: tuple[int, ...] | None
    weekdays: tuple[int, ...] | None  # 0 = Monday
    hours: tuple[int, ...]
    minutes: tuple[int, ...]
    seconds: tuple[int, ...]
    either_day: bool = False  # cron: with both day fields restricted, either may match

    def _day_ok(self, d: date) -> bool:
        if self.years is not None and d.year not in self.years:
            return False
        if self.months is not None and d.month not in self.months:
            return False
        day_ok = self.days is None or d.day in self.days
        weekday_ok = self.weekdays is None or d.weekday() in self.weekdays
        if self.either_day and self.days is not None and self.weekdays is not None:
            return day_ok or weekday_ok
        return day_ok and weekday_ok

    def _time_after(self, h: int, m: int, s: int) -> tuple[int, int, int] | None:
        """The first allowed time of day strictly after h:m:s (-1 for s means "from h:m:00")."""
        for hour in self.hours[bisect.bisect_left(self.hours, h):]:
            for minute in self.minutes[bisect.bisect_left(self.minutes, m) if hour == h else 0:]:
                same = hour == h and minute == m
                i = bisect.bisect_right(self.seconds, s) if same else 0
                if i < len(self.seconds):
                    return hour, minute, self.seconds[i]
        return None

    def next_after(self, t: datetime, tz: tzinfo | None = None) -> datetime | None:
        """The first occurrence strictly after t (an aware datetime), in tz (default: the local zone);
        None when there is none within SEARCH_YEARS."""
        local = t.astimezone(tz)
        wall = local.replace(tzinfo=None)
        d, cutoff = wall.date(), (wall.hour, wall.minute, wall.second)
        end = date(min(d.year + SEARCH_YEARS, 9999), 12, 31)
        while d <= end:
            if self.years is not None and d.year not in self.years:
                later = [y for y in self.years if y > d.year]
                if not later:
                    return None
                d, cutoff = date(later[0], 1, 1), (0, 0, -1)
                continue
            if self.months is not None and d.month not in self.months:
                d, cutoff = (date(d.year + 1, 1, 1) if d.month == 12 else date(d.year, d.month + 1, 1)), (0, 0, -1)
                continue
            if self._day_ok(d):
                hms = self._time_after(*cutoff)
                if hms is not None:
                    naive = datetime(d.year, d.month, d.day, *hms)
                    found = naive.replace(tzinfo=tz) if tz is not None else naive.astimezone()
                    if found > t:
                        return found
                    cutoff = hms  # a DST fold put it before t: look further the same day
                    continue
            if d == date.max:
                return None
            d, cutoff = d + timedelta(days=1), (0, 0, -1)
        return None


def _parse_cron(expr: str, parts: list[str]) -> Schedule:
    minute, hour, dom, month, dow = parts
    dows = _field(dow, 0, 7, expr, "day of week", sep="-", names=WEEKDAYS[6:] + WEEKDAYS[:6])
    weekdays = None if dows is None else tuple(sorted({(v - 1) % 7 for v in dows}))  # cron 0 = Sunday
    days = _field(dom, 1, 31, expr, "day of month", sep="-")
    return Schedule(expr, None, _field(month, 1, 12, expr, "month", sep="-", names=MONTHS, base=1), days,
                    weekdays, _all(_field(hour, 0, 23, expr, "hour", sep="-"), 24),
                    _all(_field(minute, 0, 59, expr, "minute", sep="-"), 60), (0,),
                    either_day=dom != "*" and dow != "*")


def _all(values: tuple[int, ...] | None, n: int) -> tuple[int, ...]:
    return tuple(range(n)) if values is None else values


def parse(expr: object) -> Schedule:
    """Parse a calendar event or cron line; raises Invalid with the accepted syntax."""
    if not isinstance(expr, str):
        raise Invalid(f"a schedule must be a string; {SYNTAX}", "bad_schedule")
    if len(expr) > MAX_LEN:
        raise Invalid(f"a schedule is at most {MAX_LEN} characters; {SYNTAX}", "bad_schedule")
    text = " ".join(expr.split())
    if not text:
        raise _fail(expr, "it is empty")
    if not text.isascii() or not text.isprintable():
        raise _fail(expr, "it holds characters other than letters, digits and * , . / : -")
    parts = text.split(" ")
    if len(parts) == 5 and ":" not in text and ".." not in text:
        schedule = _parse_cron(text, parts)
    else:
        schedule = _parse_event(text, SHORTCUTS.get(text.lower(), text))
    now = datetime.now().astimezone()
    if schedule.next_after(now) is None and schedule.next_after(datetime(1970, 1, 2).astimezone()) is None:
        raise _fail(expr, "it never occurs")
    return schedule


def _parse_event(expr: str, text: str) -> Schedule:
    parts = text.split(" ")
    weekdays = None
    if parts[0][:1].isalpha():
        days: set[int] = set()
        for item in parts.pop(0).lower().split(","):
            a, dots, b = item.partition("..")
            first = _weekday(a, expr)
            last = _weekday(b, expr) if dots else first
            if first > last:
                raise _fail(expr, f"the weekday range {item[:20]!r} runs backwards (use mon..fri, sat,sun)")
            days.update(range(first, last + 1))
        weekdays = tuple(sorted(days))
    years = months = mdays = None
    if parts and "-" in parts[0]:
        fields = parts.pop(0).split("-")
        if len(fields) not in (2, 3):
            raise _fail(expr, "a date is [YEAR-]MONTH-DAY")
        if len(fields) == 3:
            years = _field(fields.pop(0), 1970, 9999, expr, "year")
        months = _field(fields[0], 1, 12, expr, "month")
        mdays = _field(fields[1], 1, 31, expr, "day")
    hours, minutes, seconds = (0,), (0,), (0,)
    if parts:
        spec = parts.pop(0)
        fields = ["*", "*"] if spec == "*" else spec.split(":")
        if len(fields) not in (2, 3):
            raise _fail(expr, f"the time {spec[:20]!r} must be HOUR:MINUTE or HOUR:MINUTE:SECOND")
        hours = _all(_field(fields[0], 0, 23, expr, "hour"), 24)
        minutes = _all(_field(fields[1], 0, 59, expr, "minute"), 60)
        seconds = _all(_field(fields[2], 0, 59, expr, "second"), 60) if len(fields) == 3 else (0,)
    if parts:
        raise _fail(expr, f"unexpected {parts[0][:20]!r} (the order is weekdays, date, time)")
    return Schedule(expr, years, months, mdays, weekdays, hours, minutes, seconds)


def _weekday(text: str, expr: str) -> int:
    if len(text) >= 3 and text[:3] in WEEKDAYS and DAY_NAMES[WEEKDAYS.index(text[:3])].startswith(text):
        return WEEKDAYS.index(text[:3])
    raise _fail(expr, f"{text[:20]!r} is not a weekday (mon, tue, wed, thu, fri, sat, sun)")
