"""The dewar simulator behaves like a dry vapour shipper, and its fault language parses."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from sensors.schema import encode_batch, encode_reading, parse_message
from sensors.simulator import (
    DewarSimulator,
    Fault,
    FaultKind,
    Route,
    great_circle_km,
    loss_multiplier,
    parse_duration,
    parse_faults,
)
from sensors.topics import telemetry_topic

START = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)


def make(
    faults: str = "",
    *,
    interval_s: float = 60.0,
    seed: int = 7,
    hold_days: float = 10.0,
    ln2_start_pct: float = 100.0,
) -> DewarSimulator:
    return DewarSimulator(
        "DW-T1",
        START,
        interval_s=interval_s,
        rng=random.Random(seed),
        hold_days=hold_days,
        ln2_start_pct=ln2_start_pct,
        faults=parse_faults(faults),
    )


def test_ln2_falls_linearly_while_upright_at_the_units_hold_time() -> None:
    sim = make(interval_s=600)
    rates = []
    for _ in range(6):  # six half-days
        last = list(sim.advance(12 * 3600))[-1]
        rates.append((100.0 - sim.ln2_level_pct) / (last.ts - START).total_seconds())
    assert max(rates) == pytest.approx(min(rates), rel=1e-9)  # a straight line
    # Empty after the unit's hold time (a few degrees of wobble cost a few % at most) ...
    assert 1.0 <= rates[0] * sim.hold_s / 100.0 < 1.05
    # ... which is at most the validated 10 days and at most 40 % shorter.
    assert 0.6 * 10 * 86400 <= sim.hold_s <= 10 * 86400


def test_reported_level_tracks_the_true_level_with_small_noise() -> None:
    sim = make(interval_s=600)
    for reading in sim.advance(86400):
        assert reading.ln2_level_pct is not None
        assert abs(reading.ln2_level_pct - sim.ln2_level_pct) < 1.0


def test_tipped_dewar_loses_ln2_several_times_faster() -> None:
    loss = {}
    for spec in ("", "tip_over@0s", "tip_over=180@0s"):
        sim = make(spec, interval_s=300, seed=1)
        list(sim.advance(3 * 3600))
        loss[spec] = 100.0 - sim.ln2_level_pct
    on_side = loss["tip_over@0s"] / loss[""]
    upside_down = loss["tip_over=180@0s"] / loss[""]
    assert 3.0 <= on_side <= 5.0
    assert upside_down >= 10.0


def test_loss_multiplier_grows_with_tilt() -> None:
    angles = range(0, 181, 5)
    values = [loss_multiplier(a) for a in angles]
    assert values == sorted(values)
    assert loss_multiplier(0) == 1.0
    assert loss_multiplier(3) < 1.1  # normal wobble costs almost nothing


def test_tip_over_reports_tilt_and_a_knock() -> None:
    readings = list(make("tip_over@1h", interval_s=60).advance(2 * 3600))
    before = [r for r in readings if r.ts < START + timedelta(hours=1)]
    after = [r for r in readings if r.ts >= START + timedelta(hours=1)]
    assert all(r.tilt_deg is not None and r.tilt_deg <= 5.0 for r in before)
    assert all(r.tilt_deg is not None and 85.0 <= r.tilt_deg <= 95.0 for r in after)
    assert max(r.shock_g or 0.0 for r in after[:2]) >= 5.0


def test_temperature_flat_until_ln2_nearly_gone_then_rises() -> None:
    # A dewar charged to 10 %: about a day of LN2 at a 10-day hold.
    sim = make(interval_s=600, ln2_start_pct=10.0)
    rows = []
    for reading in sim.advance(4 * 86400):
        rows.append((reading, sim.ln2_level_pct, sim.temp_c))
    with_ln2 = [temp for _, level, temp in rows if level > 5.0]
    assert with_ln2 and all(-192.0 <= t <= -180.0 for t in with_ln2)
    empty_at = next(r.ts for r, level, _ in rows if level == 0.0)
    after = [(r.ts, temp) for r, _, temp in rows if r.ts >= empty_at]
    temps = [t for _, t in after]
    assert temps == sorted(temps)  # warming without LN2 never reverses
    crossed = next(ts for ts, t in after if t > -150.0)
    assert timedelta(hours=1) < crossed - empty_at < timedelta(days=1)
    assert temps[-1] > -100.0


def test_lid_opening_spikes_temperature_and_recovers() -> None:
    readings = list(make("lid_open@1h+5m").advance(3 * 3600))
    baseline = max(r.temp_c for r in readings[:60])
    opened = [r for r in readings if r.lid_open]
    assert len(opened) == 5
    peak = max(r.temp_c for r in readings[60:75])
    assert peak > baseline + 30.0
    recovered = [r for r in readings if r.ts >= START + timedelta(hours=2)]
    assert all(r.temp_c < -185.0 for r in recovered)


def test_ln2_exhaustion_empties_the_dewar_and_temperature_rises() -> None:
    sim = make("ln2_exhaustion@1h+2h", interval_s=300)
    readings = list(sim.advance(12 * 3600))
    at_3h = next(r for r in readings if r.ts >= START + timedelta(hours=3, minutes=5))
    assert at_3h.ln2_level_pct == 0.0
    assert readings[-1].temp_c > -170.0


def test_stuck_sensor_repeats_the_same_value_exactly() -> None:
    readings = list(make("stuck_sensor@30m+1h").advance(2 * 3600))
    stuck = [r.temp_c for r in readings if 30 <= r.seq < 90]
    assert len(set(stuck)) == 1
    assert stuck[0] == readings[29].temp_c  # frozen at the last good value
    assert len({r.temp_c for r in readings[:30]}) > 5
    assert len({r.temp_c for r in readings[90:]}) > 5


def test_seq_counts_from_zero_and_ts_steps_by_the_interval() -> None:
    sim = make(interval_s=90)
    readings = list(sim.advance(3600)) + list(sim.advance(3600))
    assert [r.seq for r in readings] == list(range(80))
    assert readings[0].ts == START
    gaps = {b.ts - a.ts for a, b in zip(readings, readings[1:], strict=False)}
    assert gaps == {timedelta(seconds=90)}
    assert all(r.ts.utcoffset() == timedelta(0) for r in readings)


def test_readings_pass_the_service_schema() -> None:
    readings = list(make("lid_open@10m,tip_over@20m", interval_s=60).advance(6 * 3600))
    topic = telemetry_topic("DW-T1")
    now = readings[-1].ts
    single = parse_message(topic, encode_reading(readings[0]), now)
    assert single.rejections == [] and single.readings == [readings[0]]
    for i in range(0, len(readings), 1000):
        chunk = readings[i : i + 1000]
        parsed = parse_message(topic, encode_batch(chunk), now)
        assert parsed.rejections == []
        assert parsed.readings == chunk


def test_other_channels_are_plausible() -> None:
    readings = list(make(interval_s=300).advance(2 * 86400))
    shocks = sorted(r.shock_g or 0.0 for r in readings)
    assert 0.1 <= shocks[len(shocks) // 2] <= 1.0
    assert all(r.tilt_deg is not None and r.tilt_deg <= 5.0 for r in readings)
    battery = [r.battery_pct or 0.0 for r in readings]
    assert battery == sorted(battery, reverse=True)
    assert 10.0 < battery[0] - battery[-1] < 20.0  # about 0.3 % an hour


def test_link_loss_window_marks_readings_unsendable() -> None:
    sim = make("link_loss@1h+30m")
    flags = []
    for reading in sim.advance(2 * 3600):
        flags.append((reading.seq, sim.link_up))
    down = [seq for seq, up in flags if not up]
    assert down == list(range(60, 90))


def test_position_moves_along_the_route() -> None:
    newark, houston = (40.6895, -74.1745), (29.9902, -95.3368)
    route = Route((newark, houston), speed_kmh=500.0)
    sim = DewarSimulator("DW-T2", START, interval_s=600, rng=random.Random(2), route=route)
    readings = list(sim.advance(8 * 3600))
    first, last = readings[0], readings[-1]
    assert (first.lat, first.lon) == pytest.approx(newark, abs=1e-4)
    assert (last.lat, last.lon) == pytest.approx(houston, abs=1e-4)
    halfway = route.position(route.length_km / 2 / 500.0 * 3600)
    assert great_circle_km(newark, halfway) == pytest.approx(route.length_km / 2, rel=1e-3)


def test_same_seed_replays_the_same_readings() -> None:
    a = list(make("tip_over@1h", seed=3).advance(7200))
    b = list(make("tip_over@1h", seed=3).advance(7200))
    c = list(make("tip_over@1h", seed=4).advance(7200))
    assert a == b
    assert a != c


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: make(hold_days=0.0), "hold time"),
        (lambda: make(interval_s=0.5), "interval"),
        (lambda: make(ln2_start_pct=120.0), "LN2 charge"),
    ],
)
def test_bad_parameters_are_refused(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_naive_start_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        DewarSimulator("DW-T1", datetime(2025, 1, 1))  # noqa: DTZ001 - the point of the test


def test_fault_spec_parses() -> None:
    faults = parse_faults("tip_over@2h, lid_open@30m+5m,link_loss@1h+1h,stuck_sensor@3h")
    assert faults == [
        Fault(FaultKind.TIP_OVER, timedelta(hours=2)),
        Fault(FaultKind.LID_OPEN, timedelta(minutes=30), timedelta(minutes=5)),
        Fault(FaultKind.LINK_LOSS, timedelta(hours=1), timedelta(hours=1)),
        Fault(FaultKind.STUCK_SENSOR, timedelta(hours=3)),
    ]
    targeted = parse_faults("DW-0003:tip_over=180@1h30m+4h,ln2_exhaustion@90")
    assert targeted == [
        Fault(FaultKind.TIP_OVER, timedelta(minutes=90), timedelta(hours=4), 180.0, "DW-0003"),
        Fault(FaultKind.LN2_EXHAUSTION, timedelta(seconds=90)),
    ]
    assert parse_faults("  ") == []


def test_fault_spec_round_trips_through_str() -> None:
    spec = "DW-0003:tip_over=135@1h30m+4h,lid_open@30m+5m,ln2_exhaustion@1d2h,stuck_sensor@45s"
    faults = parse_faults(spec)
    assert ",".join(str(f) for f in faults) == spec
    assert parse_faults(",".join(str(f) for f in faults)) == faults


def test_default_durations_apply() -> None:
    lid, tip = parse_faults("lid_open@1h,tip_over@1h")
    assert lid.active(timedelta(minutes=64)) and not lid.active(timedelta(minutes=65))
    assert tip.active(timedelta(days=30))
    assert not tip.active(timedelta(minutes=59))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tip_over", "no start offset"),
        ("flood@2h", "unknown fault 'flood'"),
        ("tip_over@2x", "bad duration '2x'"),
        ("lid_open@30m+", "bad duration ''"),
        ("lid_open@30m+0m", "duration must be positive"),
        ("tip_over@2h,,lid_open@1h", "empty fault"),
        ("lid_open=90@1h", "takes no value"),
        ("tip_over=200@1h", "0-180 degrees"),
        ("tip_over=side@1h", "bad angle 'side'"),
        ("DW 1:tip_over@1h", "bad dewar id"),
    ],
)
def test_bad_fault_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_faults(spec)


def test_durations() -> None:
    assert parse_duration("1h30m") == timedelta(minutes=90)
    assert parse_duration("2d") == timedelta(days=2)
    assert parse_duration("45") == timedelta(seconds=45)
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration("h")
