"""The LN2 depletion forecast: straight-line loss, robust to wild readings, tilt-aware."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from coldchain.forecast import forecast

T0 = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)


def _series(
    hours: float, every_min: float, start: float, loss_per_h: float, tilt: float = 2.0
) -> list[tuple[datetime, float, float | None]]:
    n = int(hours * 60 / every_min) + 1
    return [
        (T0 + timedelta(minutes=every_min * i), start - loss_per_h * every_min * i / 60, tilt)
        for i in range(n)
    ]


def test_linear_loss_runs_out_where_the_line_meets_zero() -> None:
    result = forecast(_series(4, 15, 50.0, 0.5))
    assert result is not None
    assert abs(result.loss_pct_per_h - 0.5) < 1e-9
    assert abs(result.level_pct - 48.0) < 1e-9
    assert result.depletion_at == T0 + timedelta(hours=100)
    assert result.earliest_at == result.depletion_at == result.latest_at  # no scatter, no doubt


def test_wild_readings_do_not_move_the_forecast() -> None:
    points = _series(4, 15, 50.0, 0.5)
    points[3] = (points[3][0], 5.0, 2.0)  # the scale saw a bump
    points[9] = (points[9][0], 95.0, 2.0)
    result = forecast(points)
    assert result is not None and result.depletion_at is not None
    assert abs((result.depletion_at - (T0 + timedelta(hours=100))).total_seconds()) < 3600


def test_noise_widens_the_bounds_around_the_estimate() -> None:
    rng = random.Random(3)
    points = [
        (ts, level + rng.uniform(-0.5, 0.5), tilt) for ts, level, tilt in _series(6, 15, 60, 1)
    ]
    result = forecast(points)
    assert result is not None
    assert result.earliest_at is not None and result.depletion_at is not None
    assert result.latest_at is not None
    assert result.earliest_at < result.depletion_at < result.latest_at
    assert 0.8 < result.loss_pct_per_h < 1.2


def test_a_level_that_is_not_falling_never_runs_out() -> None:
    result = forecast(_series(4, 15, 50.0, 0.0))
    assert result is not None and result.depletion_at is None and result.latest_at is None


def test_too_few_points_give_no_forecast() -> None:
    assert forecast(_series(0.5, 15, 50.0, 0.5)) is None  # 3 points
    assert forecast([]) is None


def test_a_tipped_shipper_is_fitted_on_its_tipped_points() -> None:
    upright = _series(4, 15, 60.0, 0.4)
    last = upright[-1]
    tipped: list[tuple[datetime, float, float | None]] = [
        (last[0] + timedelta(minutes=5 * (i + 1)), last[1] - 6.0 * 5 * (i + 1) / 60, 90.0)
        for i in range(6)
    ]
    result = forecast(upright + tipped)
    assert result is not None and result.tipped
    assert abs(result.loss_pct_per_h - 6.0) < 1e-9
    only_upright = forecast(upright + tipped[:2])  # too few tipped points yet: whole window
    assert only_upright is not None and not only_upright.tipped
    assert only_upright.loss_pct_per_h < 1.0
