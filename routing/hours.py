"""Receiving hours: when a site accepts a shipment, in its own local time.

Hours are written as local wall-clock times (`opens`, `closes`) and judged in the site's IANA
zone with `zoneinfo`, so a centre that opens at 08:00 opens at 08:00 on both sides of a
daylight-saving change. Instants stay UTC everywhere else: `next_open` takes and returns POSIX
seconds, which is what the planner's search works in. A window that closes before it opens
(22:00-06:00) runs over midnight.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo


@dataclass(frozen=True, slots=True)
class ReceivingHours:
    """Daily local receiving window; `closes` before `opens` means the window spans midnight."""

    opens: time
    closes: time

    def __post_init__(self) -> None:
        if self.opens == self.closes:
            raise ValueError("receiving hours open and close at the same time; leave both empty")

    def next_open(self, instant: int, tz: str) -> int:
        """The first instant at or after `instant` (POSIX seconds) when the site receives."""
        return _next_open(self.opens, self.closes, tz, instant)

    def opening_times(self, start: int, end: int, tz: str) -> tuple[list[int], list[int]]:
        """The daily windows around [`start`, `end`] (POSIX seconds) as two ascending lists,
        opens and closes: within that span, `next_open(t)` is `max(t, opens[j])` for the first
        window `j` that closes after `t`, found by bisection."""
        zone = ZoneInfo(tz)
        first = datetime.fromtimestamp(start, UTC).astimezone(zone).date() - timedelta(days=1)
        last = datetime.fromtimestamp(end, UTC).astimezone(zone).date() + timedelta(days=2)
        opens: list[int] = []
        closes: list[int] = []
        day = first
        while day <= last:
            window_start, window_end = _window(day, self.opens, self.closes, zone)
            opens.append(window_start)
            closes.append(window_end)
            day += timedelta(days=1)
        return opens, closes

    def __str__(self) -> str:
        return f"{self.opens:%H:%M}-{self.closes:%H:%M}"


def _window(day: date, opens: time, closes: time, zone: ZoneInfo) -> tuple[int, int]:
    start = datetime.combine(day, opens, tzinfo=zone)
    end_day = day if closes > opens else day + timedelta(days=1)
    end = datetime.combine(end_day, closes, tzinfo=zone)
    return int(start.timestamp()), int(end.timestamp())


@lru_cache(maxsize=65536)
def _next_open(opens: time, closes: time, tz: str, instant: int) -> int:
    zone = ZoneInfo(tz)
    today = datetime.fromtimestamp(instant, UTC).astimezone(zone).date()
    # Yesterday's window may still be open (over midnight); tomorrow's is the latest candidate.
    for offset in (-1, 0, 1, 2):
        start, end = _window(today + timedelta(days=offset), opens, closes, zone)
        if instant < end:
            return max(instant, start)
    raise AssertionError("a daily window always opens within two days")  # pragma: no cover
