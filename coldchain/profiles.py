"""Product profiles: the limits a shipment's readings are judged against (DOMAIN.md, "What counts
as an excursion"). Limits differ per product label, so profiles are data: the built-in ones below
are created by the migrations and admins edit or add others through the API.

A limit watches one measured quantity against a threshold: `above` it, `below` it, or `outside`
the range from `low` to `threshold` (below `low` or above `threshold`: one condition, so a budget
counts time too warm and too cold together). It alarms when the breach has lasted `delay_s`
continuously (or, with `budget_s`, when the time out of range summed over the whole shipment
passes the budget), and clears only once the value is back inside the threshold by the
`hysteresis` deadband (on both sides of a range), so a value hovering at the limit does not flap.
Rules that are not a threshold (signal lost, sensor fault, rate of change, hold time at risk)
carry their own settings in `Profile`.
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from typing import Annotated, Final

import msgspec
from msgspec import Meta

PROFILE_NAME: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")

ENGINE_RULES: Final = frozenset(
    {"signal_lost", "sensor_jump", "sensor_stuck", "rate_of_change", "hold_at_risk"}
)
"""Rule names the excursion engine uses for the rules that are not limits; no limit may take one."""


class Severity(StrEnum):
    INFO = "info"
    WARNING = "warning"
    MAJOR = "major"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _SEVERITY_RANK[self]


_SEVERITY_RANK: Final = {
    Severity.INFO: 0,
    Severity.WARNING: 1,
    Severity.MAJOR: 2,
    Severity.CRITICAL: 3,
}


class Metric(StrEnum):
    """A quantity of a reading that a limit can watch."""

    TEMP_C = "temp_c"
    LN2_LEVEL_PCT = "ln2_level_pct"
    TILT_DEG = "tilt_deg"
    SHOCK_G = "shock_g"
    LID_OPEN = "lid_open"  # 1 while open, 0 while closed
    BATTERY_PCT = "battery_pct"


class Direction(StrEnum):
    ABOVE = "above"
    BELOW = "below"
    OUTSIDE = "outside"  # below `Limit.low` or above `Limit.threshold`


RuleName = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
Threshold = Annotated[float, Meta(ge=-1e6, le=1e6)]
ProfileName = Annotated[str, Meta(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
Seconds = Annotated[float, Meta(ge=0, le=366 * 86400)]


class Limit(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One threshold rule. `rule` names it in alarms (for example `temp_high_critical`).
    `threshold` is the upper bound of an `outside` limit, `low` its lower bound (only there)."""

    rule: RuleName
    metric: Metric
    direction: Direction
    threshold: Threshold
    severity: Severity
    delay_s: Seconds = 0.0
    budget_s: Annotated[float, Meta(gt=0, le=366 * 86400)] | None = None
    hysteresis: Annotated[float, Meta(ge=0, le=1e6)] = 0.0
    message: Annotated[str, Meta(max_length=500)] = ""
    low: Threshold | None = None

    @property
    def bounds(self) -> tuple[float, float]:
        """`(low, high)`: the value is inside while `low <= value <= high` (an open side is
        infinite)."""
        if self.direction is Direction.ABOVE:
            return -math.inf, self.threshold
        if self.direction is Direction.BELOW:
            return self.threshold, math.inf
        return -math.inf if self.low is None else self.low, self.threshold

    def breached(self, value: float) -> bool:
        if self.direction is Direction.ABOVE:
            return value > self.threshold
        if self.direction is Direction.BELOW:
            return value < self.threshold
        low, high = self.bounds
        return value > high or value < low

    def recovered(self, value: float) -> bool:
        """Back inside by the deadband: only then does an open episode clear."""
        if self.direction is Direction.ABOVE:
            return value <= self.threshold - self.hysteresis
        if self.direction is Direction.BELOW:
            return value >= self.threshold + self.hysteresis
        low, high = self.bounds
        return low + self.hysteresis <= value <= high - self.hysteresis

    def worse(self, value: float, than: float) -> bool:
        """Whether `value` is further past the limit than `than` (the episode's worst so far)."""
        if self.direction is Direction.ABOVE:
            return value > than
        if self.direction is Direction.BELOW:
            return value < than
        low, high = self.bounds
        return max(value - high, low - value) > max(than - high, low - than)

    def bound(self, value: float) -> float:
        """The threshold `value` is judged against: for a range, the side it is on."""
        if self.direction is Direction.OUTSIDE and self.low is not None:
            return self.low if value < (self.low + self.threshold) / 2 else self.threshold
        return self.threshold


class Profile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A product's limits and the settings of the rules that are not thresholds."""

    name: ProfileName
    description: Annotated[str, Meta(max_length=1000)]
    limits: Annotated[tuple[Limit, ...], Meta(max_length=100)]
    expected_interval_s: Annotated[float, Meta(gt=0, le=86400)] = 300.0
    signal_lost_factor: Annotated[float, Meta(ge=1, le=100)] = 3.0
    signal_lost_severity: Severity = Severity.MAJOR
    rate_limit_c_per_min: Annotated[float, Meta(gt=0, le=1000)] | None = 2.0
    rate_severity: Severity = Severity.WARNING
    max_jump_c: Annotated[float, Meta(gt=0, le=1000)] = 40.0
    stuck_readings: Annotated[int, Meta(ge=2, le=10000)] = 12
    sensor_fault_severity: Severity = Severity.WARNING
    hold_margin_h: Annotated[float, Meta(ge=0, le=24 * 60)] = 24.0
    hold_severity: Severity = Severity.MAJOR
    forecast_hold: bool = True
    tags: tuple[str, ...] = ()

    @property
    def signal_lost_after_s(self) -> float:
        """No reading for this long raises "signal lost" (3x the expected interval: 15 min)."""
        return self.expected_interval_s * self.signal_lost_factor


def _cryo_vapor() -> Profile:
    return Profile(
        name="cryo-vapor",
        description="Cryopreserved cells in an LN2 dry vapour shipper: at or below -150 °C "
        "(glass transition about -135 °C).",
        limits=(
            Limit(
                "temp_high",
                Metric.TEMP_C,
                Direction.ABOVE,
                -150.0,
                Severity.MAJOR,
                delay_s=300,
                hysteresis=2.0,
                message="payload warmer than -150 °C",
            ),
            Limit(
                "temp_glass_transition",
                Metric.TEMP_C,
                Direction.ABOVE,
                -135.0,
                Severity.CRITICAL,
                delay_s=60,
                hysteresis=2.0,
                message="payload above the glass transition (-135 °C): cells at risk",
            ),
            Limit(
                "ln2_low",
                Metric.LN2_LEVEL_PCT,
                Direction.BELOW,
                20.0,
                Severity.MAJOR,
                hysteresis=2.0,
                message="LN2 charge below 20 %",
            ),
            Limit(
                "ln2_critical",
                Metric.LN2_LEVEL_PCT,
                Direction.BELOW,
                10.0,
                Severity.CRITICAL,
                hysteresis=2.0,
                message="LN2 charge below 10 %",
            ),
            Limit(
                "tilt",
                Metric.TILT_DEG,
                Direction.ABOVE,
                45.0,
                Severity.MAJOR,
                delay_s=600,
                hysteresis=5.0,
                message="dewar tilted over 45°: hold time falls fast",
            ),
            Limit(
                "shock",
                Metric.SHOCK_G,
                Direction.ABOVE,
                10.0,
                Severity.WARNING,
                message="shock over 10 g",
            ),
            Limit(
                "lid_open",
                Metric.LID_OPEN,
                Direction.ABOVE,
                0.5,
                Severity.MAJOR,
                delay_s=120,
                message="lid open over 2 minutes",
            ),
            Limit(
                "battery_low",
                Metric.BATTERY_PCT,
                Direction.BELOW,
                15.0,
                Severity.WARNING,
                hysteresis=2.0,
                message="logger battery below 15 %",
            ),
        ),
        rate_limit_c_per_min=2.0,
        max_jump_c=40.0,
    )


def _band(name: str, low: float, high: float, description: str, *, freezing: bool) -> Profile:
    limits = [
        Limit(
            "temp_high",
            Metric.TEMP_C,
            Direction.ABOVE,
            high,
            Severity.MAJOR,
            delay_s=900,
            hysteresis=0.5,
            message=f"above {high:g} °C for 15 minutes",
        ),
        Limit(
            "temp_low",
            Metric.TEMP_C,
            Direction.BELOW,
            low,
            Severity.MAJOR,
            delay_s=900,
            hysteresis=0.5,
            message=f"below {low:g} °C for 15 minutes",
        ),
        Limit(
            "temp_out_of_range_budget",
            Metric.TEMP_C,
            Direction.OUTSIDE,
            high,
            Severity.CRITICAL,
            budget_s=3600,
            hysteresis=0.5,
            message=f"over an hour outside {low:g}-{high:g} °C in this shipment",
            low=low,
        ),
        Limit(
            "shock",
            Metric.SHOCK_G,
            Direction.ABOVE,
            10.0,
            Severity.WARNING,
            message="shock over 10 g",
        ),
        Limit(
            "battery_low",
            Metric.BATTERY_PCT,
            Direction.BELOW,
            15.0,
            Severity.WARNING,
            hysteresis=2.0,
            message="logger battery below 15 %",
        ),
    ]
    if freezing:
        limits.append(
            Limit(
                "freezing",
                Metric.TEMP_C,
                Direction.BELOW,
                0.0,
                Severity.CRITICAL,
                delay_s=60,
                hysteresis=0.5,
                message="below 0 °C: a refrigerated product is freezing",
            )
        )
    return Profile(
        name=name,
        description=description,
        limits=tuple(limits),
        rate_limit_c_per_min=1.0,
        max_jump_c=15.0,
        forecast_hold=False,
    )


BUILT_IN: Final[tuple[Profile, ...]] = (
    _cryo_vapor(),
    _band("refrigerated", 2.0, 8.0, "Fresh cells or reagents kept at 2-8 °C.", freezing=True),
    _band("ambient", 15.0, 25.0, "Controlled room temperature, 15-25 °C.", freezing=False),
)

_profile_decoder: Final = msgspec.json.Decoder(Profile)


def profile_from_json(data: bytes) -> Profile:
    """Decode and check a profile; raises ValueError with a reason a person can act on."""
    try:
        profile = _profile_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(str(exc)) from exc
    check(profile)
    return profile


def check(profile: Profile) -> None:
    """Rules a type cannot say. Raises ValueError."""
    if not PROFILE_NAME.fullmatch(profile.name):
        raise ValueError("name must be 1-64 of a-z 0-9 . _ - starting with a letter or digit")
    rules = [limit.rule for limit in profile.limits]
    if len(set(rules)) != len(rules):
        raise ValueError("each limit needs its own rule name")
    for limit in profile.limits:
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,63}", limit.rule):
            raise ValueError(f"rule {limit.rule!r}: use a-z 0-9 _ starting with a letter")
        if limit.rule in ENGINE_RULES:
            raise ValueError(f"rule {limit.rule!r} is reserved for the rule engine's own alarms")
        if limit.delay_s < 0 or limit.hysteresis < 0:
            raise ValueError(f"rule {limit.rule}: delay_s and hysteresis cannot be negative")
        if limit.budget_s is not None and limit.budget_s <= 0:
            raise ValueError(f"rule {limit.rule}: budget_s must be positive")
        _check_range(limit)
    if profile.expected_interval_s <= 0 or profile.signal_lost_factor < 1:
        raise ValueError("expected_interval_s must be positive and signal_lost_factor at least 1")
    if profile.stuck_readings < 2:
        raise ValueError("stuck_readings must be at least 2")
    if profile.hold_margin_h < 0:
        raise ValueError("hold_margin_h cannot be negative")
    if profile.rate_limit_c_per_min is not None and profile.rate_limit_c_per_min <= 0:
        raise ValueError("rate_limit_c_per_min must be positive (or null to turn the rule off)")
    if profile.max_jump_c <= 0:
        raise ValueError("max_jump_c must be positive")


def _check_range(limit: Limit) -> None:
    if limit.direction is not Direction.OUTSIDE:
        if limit.low is not None:
            raise ValueError(
                f"rule {limit.rule}: low is the lower bound of an 'outside' limit; "
                f"a limit {limit.direction} a threshold has none"
            )
        return
    if limit.low is None:
        raise ValueError(
            f"rule {limit.rule}: an 'outside' limit needs low (the lower bound) as well as "
            "threshold (the upper bound)"
        )
    if not limit.low < limit.threshold:
        raise ValueError(
            f"rule {limit.rule}: low ({limit.low:g}) must be below threshold "
            f"({limit.threshold:g}), the upper bound of the range"
        )
    if limit.threshold - limit.low <= 2 * limit.hysteresis:
        raise ValueError(
            f"rule {limit.rule}: the range {limit.low:g} to {limit.threshold:g} is too narrow "
            f"for a deadband of {limit.hysteresis:g} on each side: an alarm could never clear"
        )
