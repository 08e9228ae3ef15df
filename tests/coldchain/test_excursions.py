"""The excursion engine against scenarios a courier would recognise, one row per scenario, and
the promises about late readings, restarts and redelivery, checked as properties."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coldchain import excursions
from coldchain.excursions import (
    AlarmTransition,
    Kind,
    RuleState,
    decode_state,
    encode_state,
    feed,
    replay,
    silence,
)
from coldchain.profiles import BUILT_IN, Direction, Limit, Metric, Profile, Severity
from sensors.schema import Reading

T0 = datetime(2026, 11, 25, 8, 0, tzinfo=UTC)
PROFILES = {p.name: p for p in BUILT_IN}
CRYO = PROFILES["cryo-vapor"]
FRIDGE = PROFILES["refrigerated"]
AMBIENT = PROFILES["ambient"]
CRYO_BASE: dict[str, float | bool | None] = {
    "ln2_level_pct": 60.0,
    "tilt_deg": 2.0,
    "shock_g": 0.5,
    "lid_open": False,
    "battery_pct": 80.0,
}
BAND_BASE: dict[str, float | bool | None] = {"shock_g": 0.5, "battery_pct": 80.0}
WOBBLE = (0.0, 0.1, 0.2, 0.1)  # keeps steady traces from looking like a stuck sensor

Series = Sequence[float | bool | None] | float | bool | None


def steady(value: float, n: int) -> list[float]:
    """n readings near `value` (never two identical in a row, never more than 0.2 above)."""
    return [round(value + WOBBLE[i % 4], 3) for i in range(n)]


def trace(
    temps: Sequence[float],
    *,
    every: float = 60,
    start: datetime = T0,
    base: dict[str, float | bool | None] | None = None,
    **series: Series,
) -> list[Reading]:
    """Readings every `every` seconds from `start`: one per temperature, other fields from
    `series` (a value for all or one per reading) or `base`."""
    fields: dict[str, Series] = {**(base or {}), **series}
    readings = []
    for i, temp in enumerate(temps):
        extra = {
            name: (value[i] if isinstance(value, Sequence) else value)
            for name, value in fields.items()
        }
        readings.append(
            Reading(
                seq=i,
                ts=start + timedelta(seconds=every * i),
                temp_c=temp,
                **extra,  # type: ignore[arg-type]
            )
        )
    return readings


def minutes(m: float) -> datetime:
    return T0 + timedelta(minutes=m)


@dataclass
class Alarm:
    rule: str
    severity: Severity
    started_at: datetime
    cleared_at: datetime | None
    value: float
    limit: float


@dataclass
class Book:
    """What the service does with transitions: upsert alarms by episode key."""

    alarms: dict[str, Alarm] = field(default_factory=dict)

    def apply(self, transitions: Iterable[AlarmTransition]) -> None:
        for t in transitions:
            alarm = self.alarms.get(t.episode_key)
            if t.kind is Kind.RAISED:
                if alarm is None:
                    self.alarms[t.episode_key] = Alarm(
                        t.rule, t.severity, t.started_at, None, t.value, t.limit
                    )
                else:
                    alarm.value, alarm.limit = t.value, t.limit
            elif t.kind is Kind.RETRACTED:
                assert alarm is not None, t
                del self.alarms[t.episode_key]
            else:
                assert alarm is not None, t
                alarm.cleared_at = t.at if t.kind is Kind.CLEARED else None

    def episodes(self) -> list[tuple[str, Severity, datetime, datetime | None]]:
        return sorted(
            (a.rule, a.severity, a.started_at, a.cleared_at) for a in self.alarms.values()
        )


def in_order(
    profile: Profile, readings: Sequence[Reading], deliver_by: datetime | None = None
) -> tuple[Book, RuleState, list[AlarmTransition]]:
    """Feed one reading at a time, in device-time order, as live telemetry arrives."""
    state = RuleState()
    book = Book()
    emitted: list[AlarmTransition] = []
    for reading in readings:
        outcome = feed(profile, state, [reading], deliver_by=deliver_by)
        assert outcome.replay is None
        emitted.extend(outcome.transitions)
        book.apply(outcome.transitions)
    return book, state, emitted


def arrive(
    profile: Profile,
    batches: Iterable[Sequence[Reading]],
    deliver_by: datetime | None = None,
    *,
    restart_after: frozenset[int] = frozenset(),
) -> tuple[Book, RuleState]:
    """The documented procedure: store each batch, feed the new readings, and when the outcome
    asks for a replay, re-feed the stored readings from `from_ts`. After the batches numbered in
    `restart_after` the state goes through JSON, as across a service restart."""
    stored: dict[int, Reading] = {}
    state = RuleState()
    book = Book()
    for number, batch in enumerate(batches):
        new = [r for r in batch if r.seq not in stored]
        stored.update((r.seq, r) for r in new)
        outcome = feed(profile, state, new, deliver_by=deliver_by)
        book.apply(outcome.transitions)
        if outcome.replay is not None:
            since = outcome.replay.from_ts
            again = [r for r in stored.values() if since is None or r.ts >= since]
            book.apply(replay(profile, state, outcome.replay, again, deliver_by=deliver_by))
        if number in restart_after:
            state = decode_state(encode_state(state))
    return book, state


# The scenario table ------------------------------------------------------------------------

Window = tuple[float, float]  # started or cleared somewhere in [a, b] minutes


@dataclass(frozen=True)
class Row:
    id: str
    profile: Profile
    readings: list[Reading]
    expected: list[tuple[str, Severity, float | Window, float | Window | None]]
    deliver_by: datetime | None = None


def _noisy_cryo(hours: float, seed: int) -> list[Reading]:
    rng = random.Random(seed)
    n = int(hours * 12)
    return trace(
        [-185 + rng.uniform(-1, 1) for _ in range(n)],
        every=300,
        ln2_level_pct=[80 - 0.4 * i / 12 + rng.uniform(-0.8, 0.8) for i in range(n)],
        tilt_deg=[rng.uniform(0, 15) for _ in range(n)],
        shock_g=[rng.uniform(0, 4) for _ in range(n)],
        lid_open=False,
        battery_pct=[80 - 0.1 * i / 12 for i in range(n)],
    )


def _noise(seed: int, n: int, size: float) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(-size, size) for _ in range(n)]


def _tipped(seed: int, *, recharge: bool, noise: float = 0.3) -> list[Reading]:
    """6 h upright losing 0.4 %/h, then tipped on its side losing 6 %/h for 3 h; optionally set
    upright again and recharged to 95 %, then 2 h upright. Readings every 5 minutes."""
    rng = random.Random(seed)
    levels: list[float] = []
    tilts: list[float] = []
    level = 70.0
    for i in range(108 + (24 if recharge else 0)):
        if i < 72:
            level -= 0.4 / 12
            tilts.append(2.0)
        elif i < 108:
            level -= 6.0 / 12
            tilts.append(90.0)
        else:
            level = 95.0 if i == 108 else level - 0.4 / 12
            tilts.append(2.0)
        levels.append(level + rng.uniform(-noise, noise))
    temps = [-185 + rng.uniform(-0.5, 0.5) for _ in levels]
    return trace(temps, every=300, base=CRYO_BASE, ln2_level_pct=levels, tilt_deg=tilts)


M, C, W = Severity.MAJOR, Severity.CRITICAL, Severity.WARNING
FIVE_MIN = 300

ROWS = [
    # cryo-vapor: temperature
    Row(
        "cryo-temp-high-after-delay",
        CRYO,
        trace(steady(-185, 3) + steady(-146, 8) + steady(-185, 3), base=CRYO_BASE),
        [("temp_high", M, 3, 11)],
    ),
    Row(
        "cryo-temp-high-shorter-than-delay",
        CRYO,
        trace(steady(-185, 3) + steady(-146, 5) + steady(-185, 3), base=CRYO_BASE),
        [],
    ),
    Row(
        "cryo-glass-transition",
        CRYO,
        trace(steady(-170, 3) + steady(-131, 7) + steady(-170, 3), base=CRYO_BASE),
        [("temp_glass_transition", C, 3, 10), ("temp_high", M, 3, 10)],
    ),
    Row(
        "cryo-temp-hovering-at-limit-one-episode",
        CRYO,
        trace(
            steady(-185, 2)
            + steady(-148, 6)
            + [-149.5, -150.5, -149.4, -150.6, -149.6, -151.5, -149.3]
            + steady(-160, 3),
            base=CRYO_BASE,
        ),
        [("temp_high", M, 2, 15)],
    ),
    # cryo-vapor: LN2, tilt, shock, lid, battery
    Row(
        "cryo-ln2-low-then-critical-then-recharged",
        CRYO,
        trace(
            steady(-185, 8),
            base=CRYO_BASE,
            ln2_level_pct=[25, 22, 19.5, 18, 9.5, 9.2, 90, 90],
        ),
        [("ln2_critical", C, 4, 6), ("ln2_low", M, 2, 6)],
    ),
    Row(
        "cryo-ln2-hovering-and-missing-one-episode",
        CRYO,
        trace(
            steady(-185, 10),
            base=CRYO_BASE,
            ln2_level_pct=[21, 19.9, 20.1, None, None, 19.8, 21.5, 19.9, 22.5, 23],
        ),
        [("ln2_low", M, 1, 8)],
    ),
    Row(
        "cryo-tilt-after-delay",
        CRYO,
        trace(steady(-185, 18), base=CRYO_BASE, tilt_deg=[2.0] * 3 + [60.0] * 12 + [30.0] * 3),
        [("tilt", M, 3, 15)],
    ),
    Row(
        "cryo-tilt-shorter-than-delay",
        CRYO,
        trace(steady(-185, 15), base=CRYO_BASE, tilt_deg=[2.0] * 3 + [60.0] * 9 + [2.0] * 3),
        [],
    ),
    Row(
        "cryo-shock",
        CRYO,
        trace(steady(-185, 7), base=CRYO_BASE, shock_g=[0.5] * 3 + [12.0] + [0.5] * 3),
        [("shock", W, 3, 4)],
    ),
    Row(
        "cryo-lid-open-after-delay",
        CRYO,
        trace(steady(-185, 9), base=CRYO_BASE, lid_open=[False] * 3 + [True] * 4 + [False] * 2),
        [("lid_open", M, 3, 7)],
    ),
    Row(
        "cryo-lid-open-shorter-than-delay",
        CRYO,
        trace(steady(-185, 7), base=CRYO_BASE, lid_open=[False] * 3 + [True] * 2 + [False] * 2),
        [],
    ),
    Row(
        "cryo-battery-hovering-one-episode",
        CRYO,
        trace(
            steady(-185, 9),
            base=CRYO_BASE,
            battery_pct=[20, 16, 14.9, 15.1, 14.8, 16.5, 14.9, 17.2, 18],
        ),
        [("battery_low", W, 2, 7)],
    ),
    Row(
        "cryo-missing-optional-fields-temperature-still-judged",
        CRYO,
        trace(steady(-185, 3) + steady(-146, 8) + steady(-185, 3)),
        [("temp_high", M, 3, 11)],
    ),
    # refrigerated (2-8 °C), readings every 5 minutes
    Row(
        "fridge-temp-high-after-delay",
        FRIDGE,
        trace(steady(5, 3) + steady(9.5, 5) + steady(5, 3), every=FIVE_MIN, base=BAND_BASE),
        [("temp_high", M, 15, 40)],
    ),
    Row(
        "fridge-temp-high-shorter-than-delay",
        FRIDGE,
        trace(steady(5, 3) + steady(9.5, 3) + steady(5, 3), every=FIVE_MIN, base=BAND_BASE),
        [],
    ),
    Row(
        "fridge-temp-low-after-delay",
        FRIDGE,
        trace(steady(5, 3) + steady(1.5, 5) + steady(5, 3), every=FIVE_MIN, base=BAND_BASE),
        [("temp_low", M, 15, 40)],
    ),
    Row(
        "fridge-freezing-is-critical-quickly",
        FRIDGE,
        trace(steady(5, 3) + steady(-1, 3) + steady(5, 3), every=FIVE_MIN, base=BAND_BASE),
        [("freezing", C, 15, 30)],
    ),
    Row(
        "fridge-budget-spent-by-five-short-excursions",
        FRIDGE,
        trace(steady(5, 2) + (steady(9, 3) + steady(5, 2)) * 5, every=FIVE_MIN, base=BAND_BASE),
        [("temp_out_of_range_budget", C, 10, None)],
    ),
    Row(
        "fridge-four-short-excursions-stay-within-budget",
        FRIDGE,
        trace(steady(5, 2) + (steady(9, 3) + steady(5, 2)) * 4, every=FIVE_MIN, base=BAND_BASE),
        [],
    ),
    Row(
        "fridge-budget-below-range",
        FRIDGE,
        trace(steady(5, 2) + (steady(1, 3) + steady(5, 2)) * 5, every=FIVE_MIN, base=BAND_BASE),
        [("temp_out_of_range_budget", C, 10, None)],
    ),
    Row(
        # 45 min too warm, then 45 min too cold: 90 min out of range in all, one budget.
        "fridge-budget-spent-warm-and-cold-together",
        FRIDGE,
        trace(
            steady(5, 2) + steady(9, 9) + steady(5, 3) + steady(1, 9) + steady(5, 3),
            every=FIVE_MIN,
            base=BAND_BASE,
        ),
        [
            ("temp_high", M, 10, 55),
            ("temp_low", M, 70, 115),
            ("temp_out_of_range_budget", C, 10, None),
        ],
    ),
    Row(
        "fridge-budget-warm-and-cold-within-the-hour",
        FRIDGE,
        trace(
            steady(5, 2) + steady(9, 6) + steady(5, 3) + steady(1, 6) + steady(5, 3),
            every=FIVE_MIN,
            base=BAND_BASE,
        ),
        [("temp_high", M, 10, 40), ("temp_low", M, 55, 85)],
    ),
    Row(
        "fridge-rate-of-change",
        FRIDGE,
        trace([3.0, 4.5, 6.0, 7.5, *steady(7.5, 5)], base=BAND_BASE),
        [("rate_of_change", W, 0, 4)],
    ),
    Row(
        "fridge-impossible-jump",
        FRIDGE,
        trace(steady(5, 3) + [25.0] + steady(5, 3), every=FIVE_MIN, base=BAND_BASE),
        [("sensor_jump", W, 15, 25)],
    ),
    Row(
        "fridge-shock-and-battery",
        FRIDGE,
        trace(
            steady(5, 4),
            every=FIVE_MIN,
            base=BAND_BASE,
            shock_g=[0.5, 11.0, 0.5, 0.5],
            battery_pct=[16.0, 14.0, 14.5, 18.0],
        ),
        [("battery_low", W, 5, 15), ("shock", W, 5, 10)],
    ),
    # ambient (15-25 °C)
    Row(
        "ambient-temp-high-after-delay",
        AMBIENT,
        trace(steady(20, 3) + steady(27, 5) + steady(20, 3), every=FIVE_MIN, base=BAND_BASE),
        [("temp_high", M, 15, 40)],
    ),
    Row(
        "ambient-temp-low-after-delay",
        AMBIENT,
        trace(steady(20, 3) + steady(12, 5) + steady(20, 3), every=FIVE_MIN, base=BAND_BASE),
        [("temp_low", M, 15, 40)],
    ),
    Row(
        "ambient-budget-above-range",
        AMBIENT,
        trace(steady(20, 2) + (steady(26, 3) + steady(20, 2)) * 5, every=FIVE_MIN, base=BAND_BASE),
        [("temp_out_of_range_budget", C, 10, None)],
    ),
    Row(
        "ambient-cold-is-not-freezing-rule",
        AMBIENT,
        trace(steady(20, 2) + steady(12, 2) + steady(20, 2), every=FIVE_MIN, base=BAND_BASE),
        [],
    ),
    Row(
        "ambient-budget-below-range",
        AMBIENT,
        trace(steady(20, 2) + (steady(14, 3) + steady(20, 2)) * 5, every=FIVE_MIN, base=BAND_BASE),
        [("temp_out_of_range_budget", C, 10, None)],
    ),
    Row(
        "ambient-budget-spent-warm-and-cold-together",
        AMBIENT,
        trace(
            steady(20, 2) + (steady(26, 2) + steady(20, 2) + steady(14, 2) + steady(20, 2)) * 4,
            every=FIVE_MIN,
            base=BAND_BASE,
        ),
        [("temp_out_of_range_budget", C, 10, None)],
    ),
    Row(
        "ambient-shock-and-battery",
        AMBIENT,
        trace(
            steady(20, 4),
            every=FIVE_MIN,
            base=BAND_BASE,
            shock_g=[0.5, 0.5, 30.0, 0.5],
            battery_pct=[14.0, 14.0, 16.0, 17.5],
        ),
        [("battery_low", W, 0, 15), ("shock", W, 10, 15)],
    ),
    Row(
        "ambient-impossible-jump",
        AMBIENT,
        trace(steady(20, 3) + [-5.0] + steady(20, 3), every=FIVE_MIN, base=BAND_BASE),
        [("sensor_jump", W, 15, 25)],
    ),
    Row(
        "ambient-rate-of-change",
        AMBIENT,
        trace([16.0, 17.5, 19.0, *steady(19, 4)], base=BAND_BASE),
        [("rate_of_change", W, 0, 3)],
    ),
    Row(
        "ambient-stuck-sensor",
        AMBIENT,
        trace([20.0] * 14 + steady(21, 2), every=FIVE_MIN, base=BAND_BASE),
        [("sensor_stuck", W, 0, 70)],
    ),
    Row(
        "fridge-stuck-sensor",
        FRIDGE,
        trace(steady(5, 2) + [4.5] * 12 + [4.6], every=FIVE_MIN, base=BAND_BASE),
        [("sensor_stuck", W, 10, 70)],
    ),
    # sensor faults and rate on the cryo profile
    Row(
        "cryo-impossible-jump-single-spike",
        CRYO,
        trace(steady(-185, 3) + [-100.0] + steady(-185, 3), every=FIVE_MIN, base=CRYO_BASE),
        [("sensor_jump", W, 15, 25)],
    ),
    Row(
        "cryo-stuck-sensor",
        CRYO,
        trace(steady(-185, 3) + [-185.0] * 12 + steady(-184.5, 3), every=FIVE_MIN, base=CRYO_BASE),
        [("sensor_stuck", W, 15, 75)],
    ),
    Row(
        "cryo-eleven-identical-readings-are-not-stuck",
        CRYO,
        trace(steady(-185, 3) + [-185.0] * 11 + steady(-184.5, 3), every=FIVE_MIN, base=CRYO_BASE),
        [],
    ),
    Row(
        "cryo-rate-of-change",
        CRYO,
        trace([-185.0, -182.0, -179.0, -176.0, *steady(-176, 4)], base=CRYO_BASE),
        [("rate_of_change", W, 0, 4)],
    ),
    Row(
        "cryo-one-noisy-sample-is-not-a-rate",
        CRYO,
        trace(steady(-185, 4) + [-178.0] + steady(-185, 4), base=CRYO_BASE),
        [],
    ),
    # hold time at risk
    Row(
        "cryo-tipped-dewar-hold-at-risk-before-ln2-low",
        CRYO,
        _tipped(seed=4, recharge=False),
        [("hold_at_risk", M, (360, 420), None), ("tilt", M, 360, None)],
        deliver_by=T0 + timedelta(hours=48),
    ),
    Row(
        "cryo-hold-recovers-after-recharge",
        CRYO,
        _tipped(seed=5, recharge=True, noise=0.15),
        [("hold_at_risk", M, (360, 420), (540, 660)), ("tilt", M, 360, 540)],
        deliver_by=T0 + timedelta(hours=48),
    ),
    Row(
        "cryo-tipped-without-deliver-by-no-hold-rule",
        CRYO,
        _tipped(seed=4, recharge=False),
        [("tilt", M, 360, None)],
    ),
    # noise robustness: a day of noisy but safe telemetry raises nothing
    Row("cryo-noisy-but-safe-day", CRYO, _noisy_cryo(24, seed=1), [], T0 + timedelta(hours=72)),
    Row(
        "fridge-noisy-but-safe-day",
        FRIDGE,
        trace(
            [5 + x for x in _noise(seed=2, n=288, size=1.5)],
            every=FIVE_MIN,
            base=BAND_BASE,
        ),
        [],
    ),
]


def _matches(actual: datetime | None, expected: float | Window | None) -> bool:
    if expected is None or actual is None:
        return expected is None and actual is None
    if isinstance(expected, tuple):
        return minutes(expected[0]) <= actual <= minutes(expected[1])
    return actual == minutes(expected)


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_scenario(row: Row) -> None:
    book, _, _ = in_order(row.profile, row.readings, row.deliver_by)
    got = book.episodes()
    assert [(rule, severity) for rule, severity, _, _ in got] == [
        (rule, severity) for rule, severity, _, _ in sorted(row.expected, key=lambda e: e[0])
    ], got
    for (rule, _, started, cleared), (_, _, want_start, want_clear) in zip(
        got, sorted(row.expected, key=lambda e: e[0]), strict=True
    ):
        assert _matches(started, want_start), (rule, started)
        assert _matches(cleared, want_clear), (rule, cleared)


def test_every_built_in_rule_has_a_scenario_that_raises_it() -> None:
    raised = {(row.profile.name, rule) for row in ROWS for rule, _, _, _ in row.expected}
    for profile in BUILT_IN:
        rules = {limit.rule for limit in profile.limits}
        rules |= {"sensor_jump", "sensor_stuck", "rate_of_change"}
        if profile.forecast_hold:
            rules.add("hold_at_risk")
        missing = rules - {rule for name, rule in raised if name == profile.name}
        assert not missing, (profile.name, missing)


# Messages and fields ----------------------------------------------------------------------


def test_raised_alarm_says_what_and_keys_on_the_true_start() -> None:
    readings = trace(steady(-185, 3) + [-146.0, -141.2, -145.0, -146.0, -147.0, -146.5, -185.0])
    _, _, emitted = in_order(CRYO, readings)
    raised, cleared = [t for t in emitted if t.rule == "temp_high"]
    assert raised.kind is Kind.RAISED and cleared.kind is Kind.CLEARED
    assert raised.episode_key == cleared.episode_key == "temp_high@2026-11-25T08:03:00+00:00"
    assert raised.started_at == minutes(3) and raised.at == minutes(8)
    assert raised.value == -141.2 and raised.limit == -150.0
    assert raised.message == "payload warmer than -150 °C for 5 min (max -141.2 °C)"
    assert cleared.at == minutes(9)


def test_hold_alarm_says_when_ln2_runs_out() -> None:
    row = next(r for r in ROWS if r.id == "cryo-tipped-dewar-hold-at-risk-before-ln2-low")
    _, _, emitted = in_order(CRYO, row.readings, row.deliver_by)
    hold = next(t for t in emitted if t.rule == "hold_at_risk")
    assert hold.message.startswith("LN2 forecast to run out at 2026-11-")
    assert "before delivery (2026-11-27 08:00 UTC) + 24 h margin" in hold.message
    assert "tipped" in hold.message
    assert 5 < hold.value < hold.limit  # hours of LN2 left, hours needed
    level_at_raise = next(r.ln2_level_pct for r in row.readings if r.ts == hold.at)
    assert level_at_raise is not None and level_at_raise > 50  # long before "LN2 low"


def test_warm_then_cold_spends_one_budget_raised_once_with_its_true_start() -> None:
    # 45 min above 8 °C from 08:10, back in range, then 45 min below 2 °C from 09:10: neither
    # side alone passes the hour, together they do, at 09:30 (the 5-minute reading after the
    # 60th out-of-range minute).
    readings = trace(
        steady(5, 2) + steady(9, 9) + steady(5, 3) + steady(1, 9) + steady(5, 3),
        every=FIVE_MIN,
        base=BAND_BASE,
    )
    _, _, emitted = in_order(FRIDGE, readings)
    budget = [t for t in emitted if t.rule == "temp_out_of_range_budget"]
    assert [(t.kind, t.started_at, t.at) for t in budget] == [
        (Kind.RAISED, minutes(10), minutes(90))
    ]
    raised = budget[0]
    assert raised.episode_key == "temp_out_of_range_budget@2026-11-25T08:10:00+00:00"
    assert (raised.value, raised.limit) == (9.2, 8.0)  # the furthest out, and its bound
    assert raised.message == (
        "over an hour outside 2-8 °C in this shipment: 65 min out of range since "
        "2026-11-25 08:10 UTC, budget 60 min (max 9.2 °C)"
    )
    # Two budgets, one a side (the built-ins before the combined one), never raise on it.
    separate = msgspec.structs.replace(
        FRIDGE,
        limits=tuple(lim for lim in FRIDGE.limits if lim.rule != "temp_out_of_range_budget")
        + (
            Limit(
                "warm_budget", Metric.TEMP_C, Direction.ABOVE, 8, Severity.CRITICAL, budget_s=3600
            ),
            Limit(
                "cold_budget", Metric.TEMP_C, Direction.BELOW, 2, Severity.CRITICAL, budget_s=3600
            ),
        ),
    )
    _, _, apart = in_order(separate, readings)
    assert not [t for t in apart if t.rule.endswith("_budget")]


OUTSIDE_2_8 = Limit(
    "temp_out",
    Metric.TEMP_C,
    Direction.OUTSIDE,
    8.0,
    Severity.MAJOR,
    delay_s=600,
    hysteresis=0.5,
    message="outside 2-8 °C",
    low=2.0,
)
OUTSIDE_PROFILE = msgspec.structs.replace(
    FRIDGE,
    name="fridge-outside",
    limits=(
        OUTSIDE_2_8,
        Limit(
            "temp_out_budget",
            Metric.TEMP_C,
            Direction.OUTSIDE,
            8.0,
            Severity.CRITICAL,
            budget_s=1800,
            hysteresis=0.5,
            low=2.0,
        ),
    ),
    rate_limit_c_per_min=None,
)


def test_an_outside_limit_is_one_episode_across_both_sides_with_a_deadband_on_each() -> None:
    # Warm, then straight to cold without coming back in by the deadband: one episode, whose
    # delay counts from the first warm reading; inside 7.5 does not end it, 2.5 does.
    temps = [5.0, 9.0, 9.5, 0.3, 1.5, 7.7, 2.3, 2.5, 5.0]
    _, _, emitted = in_order(OUTSIDE_PROFILE, trace(temps, every=FIVE_MIN, base=BAND_BASE))
    out = [(t.kind, t.started_at, t.at, t.value, t.limit) for t in emitted if t.rule == "temp_out"]
    assert out == [
        (Kind.RAISED, minutes(5), minutes(15), 0.3, 2.0),  # 1.7 below is worse than 1.5 above
        (Kind.CLEARED, minutes(5), minutes(35), 0.3, 2.0),
    ]
    raised = next(t for t in emitted if t.rule == "temp_out")
    assert raised.message == "outside 2-8 °C for 10 min (min 0.3 °C)"
    # Back in by the deadband but out again at once: the delay starts over.
    temps = [5.0, 9.0, 7.4, 1.0, 5.0]
    _, _, emitted = in_order(OUTSIDE_PROFILE, trace(temps, every=FIVE_MIN, base=BAND_BASE))
    assert [t for t in emitted if t.rule == "temp_out"] == []


def _full_rule_plan(profile: Profile) -> excursions._Plan:
    """A plan whose every limit takes the full rule: no value is ever "inside" infinite
    bounds the wrong way round, so neither quiet fast path (the whole reading's, each
    limit's) ever runs."""
    plan = excursions._Plan(profile)
    plan.quiet = tuple((metric, math.inf, -math.inf) for metric, _, _ in plan.quiet)
    plan.limits = tuple(
        (rule, metric, math.inf, -math.inf, False, False, budget, limit)
        for rule, metric, _, _, _, _, budget, limit in plan.limits
    )
    return plan


def _kept(state: RuleState) -> excursions.Snapshot:
    """The current snapshot without tracks still as new: the full rule makes one for every
    limit it looks at, the fast paths only once a limit is breached."""
    current = state.current
    fresh = excursions.Track()
    tracks = {rule: track for rule, track in current.tracks.items() if track != fresh}
    return msgspec.structs.replace(current, tracks=tracks)


# One limit each, so that no other limit's state hides a slip of the fast path: a breach
# waiting out its delay, or a budget counting, must keep every reading on the full rule.
DELAY_ONLY = msgspec.structs.replace(
    OUTSIDE_PROFILE, name="delay-only", limits=(OUTSIDE_2_8,), max_jump_c=100.0
)
BUDGET_ONLY = msgspec.structs.replace(
    OUTSIDE_PROFILE, name="budget-only", limits=OUTSIDE_PROFILE.limits[1:], max_jump_c=100.0
)

_EDGES = st.sampled_from([5.0, 5.1, 8.0, 8.2, 7.5, 7.6, 9.0, 2.0, 1.9, 2.5, 2.4, 0.0, -1.0, 30.0])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.one_of(_EDGES, st.floats(-5, 15, allow_nan=False)), min_size=1, max_size=60),
    st.lists(st.sampled_from([0.5, 12.0, None]), min_size=60, max_size=60),
    st.sampled_from([60, 300, 1200]),
    st.sampled_from([FRIDGE, AMBIENT, OUTSIDE_PROFILE, CRYO, DELAY_ONLY, BUDGET_ONLY]),
)
def test_the_quiet_fast_path_is_exactly_the_full_rule(
    temps: list[float], shock: list[float | None], every: int, profile: Profile
) -> None:
    readings = trace(temps, every=every, base=BAND_BASE, shock_g=shock[: len(temps)])
    _, fast, fast_out = in_order(profile, readings)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(excursions, "_plan", _full_rule_plan)
        _, full, full_out = in_order(profile, readings)
    assert fast_out == full_out
    assert _kept(fast) == _kept(full)


# Late readings, restarts, redelivery ------------------------------------------------------


def _day_with_excursions() -> list[Reading]:
    temps = (
        steady(-185, 20)
        + steady(-146, 8)  # temp_high
        + steady(-185, 20)
        + steady(-131, 4)  # glass transition and temp_high
        + steady(-185, 30)
        + steady(-146, 3)  # shorter than the delay
        + steady(-185, 20)
    )
    n = len(temps)
    shock = [12.0 if i in (5, 70, 71) else 0.5 for i in range(n)]
    tilt = [60.0 if 80 <= i < 95 else 2.0 for i in range(n)]
    return trace(temps, base=CRYO_BASE, shock_g=shock, tilt_deg=tilt)


def test_backlog_shuffled_gives_the_same_alarms_as_in_order() -> None:
    readings = _day_with_excursions()
    expected, final, _ = in_order(CRYO, readings)
    assert len(expected.alarms) >= 6
    shuffled = readings[:]
    random.Random(7).shuffle(shuffled)
    batches = [shuffled[i : i + 9] for i in range(0, len(shuffled), 9)]
    book, state = arrive(CRYO, batches)
    assert book.episodes() == expected.episodes()
    assert state.current == final.current


def test_excursion_inside_a_backlog_is_raised_and_cleared_with_true_times() -> None:
    readings = trace(steady(-185, 10) + steady(-146, 8) + steady(-185, 10), base=CRYO_BASE)
    state = RuleState()
    assert feed(CRYO, state, readings[:5]).transitions == []
    # offline from minute 5; the live reading of minute 27 arrives before the backlog
    live = feed(CRYO, state, [readings[27]])
    assert live.transitions == [] and live.replay is None
    late = feed(CRYO, state, readings[5:27])
    assert late.transitions == [] and late.replay is not None
    assert late.replay.earliest_ts == minutes(5)
    assert late.replay.from_ts is not None and late.replay.from_ts <= minutes(4)
    stored = [r for r in readings if r.ts >= late.replay.from_ts]
    changes = replay(CRYO, state, late.replay, stored)
    assert [(t.rule, t.kind, t.started_at, t.at) for t in changes] == [
        ("temp_high", Kind.RAISED, minutes(10), minutes(15)),
        ("temp_high", Kind.CLEARED, minutes(10), minutes(18)),
    ]
    # the same backlog redelivered changes nothing
    again = feed(CRYO, state, readings[5:27])
    assert again.replay is not None
    assert replay(CRYO, state, again.replay, stored) == []


def test_late_readings_move_an_episode_start_and_retract_the_wrong_one() -> None:
    readings = trace(steady(-185, 15) + steady(-146, 15) + steady(-185, 3), base=CRYO_BASE)
    state = RuleState()
    book = Book()
    book.apply(feed(CRYO, state, readings[:10]).transitions)
    # minutes 10-19 are delayed; live readings from minute 20 show a breach "starting" at 20
    book.apply(feed(CRYO, state, readings[20:27]).transitions)
    assert [(a.rule, a.started_at) for a in book.alarms.values()] == [("temp_high", minutes(20))]
    late = feed(CRYO, state, readings[10:20])
    assert late.replay is not None
    changes = replay(CRYO, state, late.replay, readings[:27])
    assert {(t.kind, t.started_at) for t in changes} == {
        (Kind.RAISED, minutes(15)),
        (Kind.RETRACTED, minutes(20)),
    }
    book.apply(changes)
    assert book.episodes() == [("temp_high", M, minutes(15), None)]


def test_late_reading_that_undoes_a_clear_reopens_the_episode() -> None:
    # A spike raised sensor_jump; it cleared on the first reading that did not jump. A late
    # reading just before that one shows the sensor still wild, so the episode has not ended.
    readings = trace([5.0, 25.0, 5.1, 5.2], every=FIVE_MIN, base=BAND_BASE)
    state = RuleState()
    book = Book()
    book.apply(feed(FRIDGE, state, readings).transitions)
    assert book.episodes() == [("sensor_jump", W, minutes(5), minutes(15))]
    wild = Reading(seq=99, ts=minutes(12.5), temp_c=25.0, shock_g=0.5, battery_pct=80.0)
    outcome = feed(FRIDGE, state, [wild])
    assert outcome.replay is not None
    changes = replay(FRIDGE, state, outcome.replay, [*readings, wild])
    assert [(t.kind, t.started_at) for t in changes] == [(Kind.REOPENED, minutes(5))]
    book.apply(changes)
    expected, _, _ = in_order(FRIDGE, sorted([*readings, wild], key=lambda r: r.ts))
    assert book.episodes() == expected.episodes() == [("sensor_jump", W, minutes(5), None)]


def test_restart_mid_delay_keeps_the_delay() -> None:
    readings = trace(steady(-185, 3) + steady(-146, 8) + steady(-185, 3), base=CRYO_BASE)
    _, never_stopped, emitted = in_order(CRYO, readings)
    state = RuleState()
    before = feed(CRYO, state, readings[:6]).transitions  # breach began at 3, delay 5 min
    assert before == []
    blob = encode_state(state)
    restored = decode_state(blob)
    assert restored == state and encode_state(restored) == blob
    after = feed(CRYO, restored, readings[6:]).transitions
    assert after == emitted
    assert after[0].started_at == minutes(3) and after[0].at == minutes(8)
    assert restored.current == never_stopped.current


def test_redelivered_readings_raise_no_duplicates() -> None:
    readings = trace(steady(-185, 3) + steady(-146, 8) + steady(-185, 3), base=CRYO_BASE)
    book, _ = arrive(CRYO, [readings[:9], readings[5:9], readings[9:], readings])
    expected, _, _ = in_order(CRYO, readings)
    assert book.episodes() == expected.episodes() == [("temp_high", M, minutes(3), minutes(11))]
    state = RuleState()
    first = feed(CRYO, state, readings).transitions
    assert len(first) == 2
    assert feed(CRYO, state, readings[-1:]).transitions == []  # the last one again: skipped


def test_state_round_trips_with_checkpoints_and_forecast() -> None:
    row = next(r for r in ROWS if r.id == "cryo-hold-recovers-after-recharge")
    _, state, _ = in_order(CRYO, row.readings, row.deliver_by)
    assert state.checkpoints and state.current.ln2 and state.journal
    assert decode_state(encode_state(state)) == state
    assert len(state.checkpoints) <= 16


# Signal lost ---------------------------------------------------------------------------------


def test_silence_raises_after_three_intervals_and_clears_when_readings_resume() -> None:
    last = T0
    assert silence(CRYO, last, T0 + timedelta(minutes=15), None) is None
    raised = silence(CRYO, last, T0 + timedelta(minutes=15, seconds=1), None)
    assert raised is not None and raised.kind is Kind.RAISED
    assert raised.rule == "signal_lost" and raised.severity is Severity.MAJOR
    assert raised.started_at == T0 and raised.episode_key == "signal_lost@2026-11-25T08:00:00+00:00"
    assert "no reading received for 15 min" in raised.message
    # re-checked later (or after a restart) with nothing received: same key, no new episode
    assert silence(CRYO, last, T0 + timedelta(hours=2), raised.started_at) is None
    again = silence(CRYO, last, T0 + timedelta(hours=2), None)
    assert again is not None and again.episode_key == raised.episode_key
    resumed = T0 + timedelta(hours=3)
    cleared = silence(CRYO, resumed, resumed + timedelta(seconds=1), raised.started_at)
    assert cleared is not None and cleared.kind is Kind.CLEARED
    assert cleared.episode_key == raised.episode_key and cleared.at == resumed


def test_silence_follows_the_profile_interval() -> None:
    fast = msgspec.structs.replace(FRIDGE, expected_interval_s=60.0)
    assert silence(fast, T0, T0 + timedelta(minutes=3, seconds=1), None) is not None
    assert silence(FRIDGE, T0, T0 + timedelta(minutes=3, seconds=1), None) is None


# Properties ----------------------------------------------------------------------------------

_TEMPS = st.sampled_from([5.0, 5.3, 5.1, 9.0, 9.4, 1.0, -1.0, 30.0, 7.9, 8.2])


@st.composite
def _arrivals(draw: st.DrawFn) -> tuple[list[Reading], list[list[Reading]], frozenset[int]]:
    temps = draw(st.lists(_TEMPS, min_size=5, max_size=60))
    shock = draw(st.lists(st.sampled_from([0.5, 12.0, None]), min_size=len(temps)))
    readings = trace(
        temps,
        every=draw(st.sampled_from([60, 300])),
        base=BAND_BASE,
        shock_g=shock[: len(temps)],
    )
    order = draw(st.permutations(readings))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(order) - 1)), max_size=8)))
    batches = [list(order[a:b]) for a, b in zip([0, *cuts], [*cuts, len(order)], strict=True)]
    batches = [b for b in batches if b]
    if draw(st.booleans()):  # redeliver one batch
        batches.append(batches[draw(st.integers(0, len(batches) - 1))])
    restarts = frozenset(draw(st.sets(st.integers(0, len(batches)), max_size=3)))
    return readings, batches, restarts


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_arrivals())
def test_any_arrival_order_gives_the_in_order_alarms(
    case: tuple[list[Reading], list[list[Reading]], frozenset[int]],
) -> None:
    readings, batches, restarts = case
    expected, final, _ = in_order(FRIDGE, readings)
    book, state = arrive(FRIDGE, batches, restart_after=restarts)
    assert book.episodes() == expected.episodes()
    assert {k: (a.value, a.limit) for k, a in book.alarms.items()} == {
        k: (a.value, a.limit) for k, a in expected.alarms.items()
    }
    assert state.current == final.current


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), chunk=st.integers(1, 40), recharge=st.booleans())
def test_hold_rule_is_order_independent_too(seed: int, chunk: int, recharge: bool) -> None:
    readings = _tipped(seed, recharge=recharge)
    deliver_by = T0 + timedelta(hours=48)
    expected, final, _ = in_order(CRYO, readings, deliver_by)
    shuffled = readings[:]
    random.Random(seed).shuffle(shuffled)
    batches = [shuffled[i : i + chunk] for i in range(0, len(shuffled), chunk)]
    book, state = arrive(CRYO, batches, deliver_by, restart_after=frozenset({1, 3}))
    assert book.episodes() == expected.episodes()
    assert state.current == final.current


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-190, -120, allow_nan=False), min_size=2, max_size=40),
    st.integers(1, 39),
)
def test_restart_anywhere_changes_nothing(temps: list[float], split: int) -> None:
    readings = trace(temps, base=CRYO_BASE)
    _, final, emitted = in_order(CRYO, readings)
    state = RuleState()
    out = feed(CRYO, state, readings[:split]).transitions
    state = decode_state(encode_state(state))
    out += feed(CRYO, state, readings[split:]).transitions
    assert out == emitted
    assert state.current == final.current
