"""LN2 hold-time forecast: when will a dry shipper run out, judging by its recent level trend.

LN2 loss is close to linear in time while a shipper stays in one orientation (DOMAIN.md, "The
product and the container"), but the rate changes when it tips over: lying on its side it can lose
most of its hold time within hours. So the forecast fits a straight line to the level, but only to
the points taken in the shipper's *current* orientation when there are enough of them; until then
it uses the whole recent window (which lags a fresh tip-over by a few points, and lags a return
upright in the safe direction).

The slope is the Theil-Sen estimator (the median of the slopes between every pair of points), so
a few wild readings from a sloshing weight sensor do not move it, and its 95 % confidence bound
(Sen 1968, normal approximation; ties and autocorrelation ignored) gives a pessimistic loss rate
and with it the earliest plausible depletion; the lower bound gives the latest plausible one,
which is what an alarm should wait for so that a few noisy points cannot raise it. The line is
anchored at the latest point's time through the median residual, so the current level is robust
too.

Everything here is pure: times come in as numbers or aware datetimes, nothing reads a clock.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

TIPPED_DEG: Final = 45.0
"""A shipper tilted beyond this is "tipped": its loss rate is fitted separately."""
MIN_POINTS: Final = 4
"""Fewer points than this (in the segment used) give no forecast."""
MIN_SPAN_S: Final = 15 * 60.0
"""Points spanning less device time than this give no forecast."""
MIN_LOSS_PCT_PER_H: Final = 0.01
"""A fitted loss slower than this counts as "not falling": no depletion is forecast."""
_Z95: Final = 1.959964
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Forecast:
    """A depletion forecast made at `as_of` (the latest point's time).

    `tipped` says the rate was fitted on the tipped shipper's own points.
    `depletion_at` is None when the level is not falling. `earliest_at` and `latest_at` are the
    depletions implied by the upper and lower 95 % bounds of the loss rate (`latest_at` is None
    when the level is not significantly falling): `earliest_at <= depletion_at <= latest_at`.
    """

    as_of: datetime
    level_pct: float
    loss_pct_per_h: float
    depletion_at: datetime | None
    earliest_at: datetime | None
    latest_at: datetime | None
    points_used: int
    tipped: bool


@dataclass(frozen=True, slots=True)
class Fit:
    """The same forecast on plain numbers (seconds since the epoch), as the rule engine keeps it."""

    as_of_s: float
    level_pct: float
    loss_pct_per_h: float
    depletion_s: float | None
    earliest_s: float | None
    latest_s: float | None
    points_used: int
    tipped: bool


def fit(points: Sequence[tuple[float, float, bool]]) -> Fit | None:
    """Fit `(t_seconds, level_pct, tipped)` points in time order; None when there are too few.

    Uses the trailing run of points in the latest orientation when that run alone has
    `MIN_POINTS` spanning `MIN_SPAN_S`, else every point given.
    """
    if not points:
        return None
    tipped = points[-1][2]
    start = len(points) - 1
    while start > 0 and points[start - 1][2] == tipped:
        start -= 1
    segment = points[start:]
    if not _enough(segment):
        tipped = False  # the rate below is not (yet) the tipped shipper's own
        segment = points
        if not _enough(segment):
            return None
    ts = [p[0] for p in segment]
    ys = [p[1] for p in segment]
    n = len(segment)
    slopes = sorted(
        (ys[j] - ys[i]) / (ts[j] - ts[i])
        for i in range(n)
        for j in range(i + 1, n)
        if ts[j] > ts[i]
    )
    if not slopes:
        return None
    m = len(slopes)
    slope = _median(slopes)
    t_last = ts[-1]
    level = _median(sorted(y - slope * (t - t_last) for t, y in zip(ts, ys, strict=True)))
    # Sen's bound: the slope ranked C/2 below the median, C from the Mann-Kendall variance.
    c = _Z95 * math.sqrt(n * (n - 1) * (2 * n + 5) / 18.0)
    steep = slopes[max(0, min(m - 1, math.floor((m - c) / 2.0)))]
    shallow = slopes[max(0, min(m - 1, math.ceil((m + c) / 2.0)))]
    loss = -slope * 3600.0
    left = max(level, 0.0)
    depletion = earliest = latest = None
    if loss > MIN_LOSS_PCT_PER_H:
        depletion = t_last + left / -slope
        earliest = t_last + left / -steep if steep < slope else depletion
    if -shallow * 3600.0 > MIN_LOSS_PCT_PER_H:
        latest = t_last + left / -shallow
    return Fit(t_last, level, loss, depletion, earliest, latest, n, tipped)


def forecast(points: Sequence[tuple[datetime, float, float | None]]) -> Forecast | None:
    """Forecast LN2 depletion from `(ts, ln2_level_pct, tilt_deg)` in time order.

    A missing tilt keeps the previous orientation (upright at first). An LN2 recharge (a jump up)
    is not detected here: pass only the points since the last recharge (the rule engine does).
    """
    tipped = False
    numeric: list[tuple[float, float, bool]] = []
    for ts, level, tilt in points:
        if tilt is not None:
            tipped = tilt > TIPPED_DEG
        numeric.append(((ts - _EPOCH).total_seconds(), level, tipped))
    result = fit(numeric)
    if result is None:
        return None
    return Forecast(
        as_of=_at(result.as_of_s),
        level_pct=result.level_pct,
        loss_pct_per_h=result.loss_pct_per_h,
        depletion_at=None if result.depletion_s is None else _at(result.depletion_s),
        earliest_at=None if result.earliest_s is None else _at(result.earliest_s),
        latest_at=None if result.latest_s is None else _at(result.latest_s),
        points_used=result.points_used,
        tipped=result.tipped,
    )


def _enough(points: Sequence[tuple[float, float, bool]]) -> bool:
    return len(points) >= MIN_POINTS and points[-1][0] - points[0][0] >= MIN_SPAN_S


def _median(values: Sequence[float]) -> float:
    n = len(values)
    mid = n // 2
    return values[mid] if n % 2 else (values[mid - 1] + values[mid]) / 2.0


def _at(seconds: float) -> datetime:
    return _EPOCH + timedelta(seconds=seconds)
