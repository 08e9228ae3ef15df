"""A dry vapour shipper ("dewar") in software: believable physics, one reading per interval.

The model, and why it is shaped this way (figures from docs DOMAIN.md):

* **LN2 level.** A charged dry shipper loses liquid nitrogen at a nearly constant rate while it
  stands upright, so the level falls linearly from its charge to empty over the unit's *real* hold
  time. Vendors validate about ten days, but the same model varies by up to 40 % and ages, so a
  unit's real hold time is drawn once from ``[hold_days * 0.6, hold_days]``: the validated figure
  is a best case, variation and age only shorten it. Orientation multiplies the boil-off rate,
  interpolated linearly over a table of tilt angles: 1x upright, 2x at 45 deg, 4x on its side
  (90 deg), 10x at 135 deg and 24x upside down, where ten days of hold become ten hours. An open
  lid adds 3x on top while it is open.
* **Temperature.** The payload sits in nitrogen vapour near -190 degC, a few degrees warmer as the
  charge runs down (the vapour column shortens). It stays flat until only ``TEMP_RISE_LEVEL_PCT``
  (3 %) of LN2 is left; below that the temperature the dewar settles to climbs linearly to ambient
  (20 degC) at empty. The payload follows that settling temperature as a first-order system, solved
  exactly per sub-step: warming through the vacuum insulation is slow (time constant 30 h, so a
  freshly exhausted dewar takes hours to pass -150 degC and days to reach ambient), cooling by
  LN2 is fast (10 min). An open lid lets room air in: the payload heads for ambient with a 15 min
  time constant (tens of degrees within minutes) and recovers once the lid closes, as long as LN2
  remains. The sensor adds Gaussian noise (sigma 0.15 degC) and reports two decimals.
* **The rest.** Tilt wanders 0-5 deg while upright; shock is the peak acceleration since the last
  reading, mostly 0.1-1 g with an occasional bump of a few g, and a hard knock when the dewar
  tips over; battery drains about 0.3 % an hour; position moves along an optional route of
  (lat, lon) waypoints at a constant speed, on great circles, and stays at the last waypoint.

The physics is integrated in sub-steps of at most one minute, so a long measurement interval
does not blur a five-minute lid opening; faults are judged at each sub-step's midpoint. Every
random draw comes from the ``random.Random`` given, so a seed replays a run exactly.

Faults are scheduled at an offset from the start and written as a small language, parsed by
:func:`parse_faults`::

    spec     = fault { "," fault }
    fault    = [ dewar_id ":" ] kind [ "=" degrees ] "@" offset [ "+" duration ]
    kind     = "tip_over" | "lid_open" | "link_loss" | "ln2_exhaustion" | "stuck_sensor"
    offset   = duration
    duration = number unit { number unit } | number      (a bare number is seconds)
    unit     = "s" | "m" | "h" | "d"

For example ``tip_over@2h,lid_open@30m+5m,link_loss@1h+1h,stuck_sensor@3h`` or
``DW-0003:tip_over=180@90m+4h``. What each fault does, and its duration when none is given:

* ``tip_over[=degrees]`` - the dewar lies at ``degrees`` from upright (default 90, on its side;
  180 is upside down), LN2 boils off faster. Default: it stays down for the rest of the run.
* ``lid_open`` - the lid is open; the temperature spikes and LN2 goes faster. Default: 5 min.
* ``link_loss`` - the device keeps measuring but cannot send; :meth:`DewarSimulator.link_up_at`
  says so and the publisher holds the readings in its backlog. Default: 1 h.
* ``ln2_exhaustion`` - the dewar loses its LN2 (a failed vacuum) at a rate that would empty a
  full charge within the duration, after which the temperature rises. Default: 2 h.
* ``stuck_sensor`` - the temperature sensor repeats its last value exactly while the payload's
  real temperature moves on. Default: for the rest of the run.

A fault without a dewar id applies to every simulated dewar it is given to.
"""

from __future__ import annotations

import enum
import logging
import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from sensors.schema import Reading
from sensors.topics import DEWAR_ID_PATTERN

logger = logging.getLogger(__name__)

AMBIENT_C: Final = 20.0
VAPOUR_FULL_C: Final = -190.0
VAPOUR_LOW_C: Final = -182.0
TEMP_RISE_LEVEL_PCT: Final = 3.0
HOLD_VARIATION: Final = 0.4
MAX_SUBSTEP_S: Final = 60.0

WARM_TAU_S: Final = 30 * 3600.0
COOL_TAU_S: Final = 10 * 60.0
LID_OPEN_TAU_S: Final = 15 * 60.0
LID_OPEN_LOSS_EXTRA: Final = 3.0
TEMP_NOISE_C: Final = 0.15
LEVEL_NOISE_PCT: Final = 0.1
BATTERY_DRAIN_PCT_PER_H: Final = 0.3
EARTH_RADIUS_KM: Final = 6371.0

# Boil-off multiplier by tilt from upright, interpolated linearly between the rows.
TILT_LOSS_TABLE: Final[tuple[tuple[float, float], ...]] = (
    (0.0, 1.0),
    (15.0, 1.2),
    (45.0, 2.0),
    (90.0, 4.0),
    (135.0, 10.0),
    (180.0, 24.0),
)


def loss_multiplier(tilt_deg: float) -> float:
    """How many times faster than upright LN2 boils off at this tilt (0-180 deg)."""
    tilt = min(max(tilt_deg, 0.0), 180.0)
    for (a0, m0), (a1, m1) in zip(TILT_LOSS_TABLE, TILT_LOSS_TABLE[1:], strict=False):
        if tilt <= a1:
            return m0 + (m1 - m0) * (tilt - a0) / (a1 - a0)
    return TILT_LOSS_TABLE[-1][1]


class FaultKind(enum.StrEnum):
    """What can go wrong with a dewar on the road."""

    TIP_OVER = "tip_over"
    LID_OPEN = "lid_open"
    LINK_LOSS = "link_loss"
    LN2_EXHAUSTION = "ln2_exhaustion"
    STUCK_SENSOR = "stuck_sensor"


# None: lasts for the rest of the run.
DEFAULT_DURATIONS: Final[dict[FaultKind, timedelta | None]] = {
    FaultKind.TIP_OVER: None,
    FaultKind.LID_OPEN: timedelta(minutes=5),
    FaultKind.LINK_LOSS: timedelta(hours=1),
    FaultKind.LN2_EXHAUSTION: timedelta(hours=2),
    FaultKind.STUCK_SENSOR: None,
}
DEFAULT_EXHAUSTION: Final = timedelta(hours=2)
DEFAULT_TIP_DEG: Final = 90.0


@dataclass(frozen=True, slots=True)
class Fault:
    """One scheduled fault: ``kind`` starts ``at`` after the simulation's start.

    ``duration`` None means the kind's default (see the module docstring); ``value`` is the tilt
    in degrees for ``tip_over``; ``dewar_id`` None means every dewar.
    """

    kind: FaultKind
    at: timedelta
    duration: timedelta | None = None
    value: float | None = None
    dewar_id: str | None = None

    def __post_init__(self) -> None:
        if self.at < timedelta(0):
            raise ValueError(f"{self.kind}: the start offset must not be negative, got {self.at}")
        if self.duration is not None and self.duration <= timedelta(0):
            raise ValueError(f"{self.kind}: the duration must be positive, got {self.duration}")
        if self.value is not None:
            if self.kind is not FaultKind.TIP_OVER:
                raise ValueError(f"{self.kind} takes no value; only tip_over=DEGREES does")
            if not 0.0 <= self.value <= 180.0:
                raise ValueError(f"tip_over angle must be 0-180 degrees, got {self.value:g}")
        if self.dewar_id is not None and not DEWAR_ID_PATTERN.fullmatch(self.dewar_id):
            raise ValueError(
                f"bad dewar id {self.dewar_id!r}: 1-64 characters of A-Z a-z 0-9 . _ -"
            )

    @property
    def effective_duration(self) -> timedelta | None:
        """How long the fault lasts, defaults applied; None for the rest of the run."""
        return self.duration if self.duration is not None else DEFAULT_DURATIONS[self.kind]

    def active(self, elapsed: timedelta) -> bool:
        """Whether the fault is in force ``elapsed`` after the start."""
        if elapsed < self.at:
            return False
        duration = self.effective_duration
        return duration is None or elapsed < self.at + duration

    def __str__(self) -> str:
        text = f"{self.dewar_id}:" if self.dewar_id else ""
        text += self.kind.value
        if self.value is not None:
            text += f"={self.value:g}"
        text += "@" + format_duration(self.at)
        if self.duration is not None:
            text += "+" + format_duration(self.duration)
        return text


_FAULT_RE: Final = re.compile(
    r"(?:(?P<dewar>[^:@=+]+):)?(?P<kind>[a-z0-9_]+)(?:=(?P<value>[^@]*))?"
    r"@(?P<at>[^+]*)(?:\+(?P<duration>.*))?"
)
_DURATION_RE: Final = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``1h30m``, ``2d`` or a bare number of seconds, as a timedelta."""
    compact = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", compact):
        return timedelta(seconds=float(compact))
    if not compact or not re.fullmatch(r"(?:\d+(?:\.\d+)?[smhd])+", compact):
        raise ValueError(
            f"bad duration {text!r}: use a number with s, m, h or d, e.g. 90s, 30m, 1h30m, 2d"
        )
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_RE.findall(compact))
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """The shortest spelling :func:`parse_duration` reads back, e.g. ``1h30m``."""
    seconds = value.total_seconds()
    if seconds == 0:
        return "0s"
    if not seconds.is_integer():
        return f"{seconds:g}s"
    rest = int(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return "".join(parts)


def parse_faults(spec: str) -> list[Fault]:
    """Parse a fault spec (grammar in the module docstring); an empty spec means no faults.

    Raises ValueError naming the offending item and what was expected.
    """
    faults: list[Fault] = []
    if not spec.strip():
        return faults
    kinds = ", ".join(k.value for k in FaultKind)
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            raise ValueError(f"empty fault in {spec!r}: remove the extra comma")
        match = _FAULT_RE.fullmatch(item)
        if match is None:
            if "@" not in item:
                raise ValueError(
                    f"fault {item!r} has no start offset: write KIND@OFFSET, e.g. {item}@2h"
                )
            raise ValueError(
                f"bad fault {item!r}: expected [DEWAR:]KIND[=DEGREES]@OFFSET[+DURATION], "
                "e.g. lid_open@30m+5m"
            )
        try:
            kind = FaultKind(match["kind"])
        except ValueError:
            raise ValueError(
                f"unknown fault {match['kind']!r} in {item!r}: expected one of {kinds}"
            ) from None
        value: float | None = None
        if match["value"] is not None:
            try:
                value = float(match["value"])
            except ValueError:
                raise ValueError(
                    f"bad angle {match['value']!r} in {item!r}: give degrees, e.g. tip_over=90@2h"
                ) from None
        try:
            at = parse_duration(match["at"])
            duration = None if match["duration"] is None else parse_duration(match["duration"])
            faults.append(Fault(kind, at, duration, value, match["dewar"]))
        except ValueError as exc:
            raise ValueError(f"in fault {item!r}: {exc}") from None
    return faults


def _to_vector(lat: float, lon: float) -> tuple[float, float, float]:
    phi, lam = math.radians(lat), math.radians(lon)
    return (math.cos(phi) * math.cos(lam), math.cos(phi) * math.sin(lam), math.sin(phi))


def great_circle_km(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Distance between two (lat, lon) points on a spherical Earth, in km (haversine)."""
    phi1, phi2 = math.radians(a[0]), math.radians(b[0])
    dphi, dlam = phi2 - phi1, math.radians(b[1] - a[1])
    h = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlam / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def _interpolate(
    a: tuple[float, float], b: tuple[float, float], fraction: float
) -> tuple[float, float]:
    """The point ``fraction`` of the way from a to b along the great circle."""
    va, vb = _to_vector(*a), _to_vector(*b)
    omega = math.acos(max(-1.0, min(1.0, sum(x * y for x, y in zip(va, vb, strict=True)))))
    if omega < 1e-12:
        return a
    sa, sb = math.sin((1 - fraction) * omega), math.sin(fraction * omega)
    x, y, z = ((sa * p + sb * q) / math.sin(omega) for p, q in zip(va, vb, strict=True))
    return (math.degrees(math.atan2(z, math.hypot(x, y))), math.degrees(math.atan2(y, x)))


@dataclass(frozen=True, slots=True)
class Route:
    """Waypoints as (lat, lon) in degrees, travelled at a constant ``speed_kmh``."""

    waypoints: tuple[tuple[float, float], ...]
    speed_kmh: float

    def __post_init__(self) -> None:
        if not self.waypoints:
            raise ValueError("a route needs at least one waypoint")
        for lat, lon in self.waypoints:
            if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
                raise ValueError(f"waypoint ({lat}, {lon}) is not a valid latitude, longitude")
        if not self.speed_kmh > 0:
            raise ValueError(f"route speed must be positive, got {self.speed_kmh} km/h")

    @property
    def length_km(self) -> float:
        pairs = zip(self.waypoints, self.waypoints[1:], strict=False)
        return sum(great_circle_km(a, b) for a, b in pairs)

    def position(self, elapsed_s: float) -> tuple[float, float]:
        """Where the dewar is ``elapsed_s`` seconds after leaving the first waypoint."""
        remaining = max(0.0, elapsed_s) / 3600.0 * self.speed_kmh
        for a, b in zip(self.waypoints, self.waypoints[1:], strict=False):
            leg = great_circle_km(a, b)
            if remaining < leg:
                return _interpolate(a, b, remaining / leg)
            remaining -= leg
        return self.waypoints[-1]


class DewarSimulator:
    """One simulated dewar: call :meth:`step` (or :meth:`advance`) to get its next readings.

    The first reading has ``seq`` 0 and ``ts == start``; each next one is ``interval_s`` later.
    """

    def __init__(
        self,
        dewar_id: str,
        start: datetime,
        *,
        interval_s: float = 60.0,
        rng: random.Random | None = None,
        hold_days: float = 10.0,
        ln2_start_pct: float = 100.0,
        route: Route | None = None,
        faults: Sequence[Fault] = (),
        first_seq: int = 0,
    ) -> None:
        if not DEWAR_ID_PATTERN.fullmatch(dewar_id):
            raise ValueError(f"bad dewar id {dewar_id!r}: 1-64 characters of A-Z a-z 0-9 . _ -")
        if start.tzinfo is None or start.utcoffset() is None:
            raise ValueError("start must be a timezone-aware datetime")
        if not 1.0 <= interval_s <= 86400.0:
            raise ValueError(f"interval must be 1 s to 1 day, got {interval_s} s")
        if not 0.1 <= hold_days <= 60.0:
            raise ValueError(
                f"hold time must be 0.1-60 days (dry shippers validate about 10), got {hold_days}"
            )
        if not 0.0 <= ln2_start_pct <= 100.0:
            raise ValueError(f"LN2 charge must be 0-100 %, got {ln2_start_pct}")
        if first_seq < 0:
            raise ValueError(f"first_seq must be 0 or more, got {first_seq}")
        for fault in faults:
            if fault.dewar_id is not None and fault.dewar_id != dewar_id:
                raise ValueError(f"fault {fault} is for {fault.dewar_id}, not {dewar_id}")
        self.dewar_id = dewar_id
        self.start = start.astimezone(UTC)
        self.interval_s = float(interval_s)
        self.rng = rng if rng is not None else random.Random()  # noqa: S311 - simulation only
        self.hold_days = hold_days
        self.hold_s = hold_days * 86400.0 * self.rng.uniform(1.0 - HOLD_VARIATION, 1.0)
        self.route = route
        self.faults = tuple(faults)
        # A real logger's counter never restarts; a simulator restarted for the same dewar must
        # not reuse sequence numbers, or the service keeps the first reading of each (dewar, seq).
        self.first_seq = first_seq

        self._seq = 0
        self._clock = self.start  # where advance() has got to
        self._last_ts: datetime | None = None
        self._elapsed_s = 0.0  # physics time, seconds after start
        self._level_pct = ln2_start_pct
        self._temp_c = self._settling_temp(ln2_start_pct)
        self._base_tilt = self.rng.uniform(0.5, 3.0)
        self._battery_pct = self.rng.uniform(85.0, 100.0)
        self._drain_pct_per_s = BATTERY_DRAIN_PCT_PER_H * self.rng.uniform(0.8, 1.2) / 3600.0
        self._peak_shock = 0.0
        self._was_tipped = False
        self._stuck_value: float | None = None
        self._last_reported_temp: float | None = None

    # What the outside sees -------------------------------------------------------------------

    @property
    def next_ts(self) -> datetime:
        """Device time of the next reading :meth:`step` returns."""
        return self.start + timedelta(seconds=self._seq * self.interval_s)

    @property
    def ln2_level_pct(self) -> float:
        """The true LN2 charge left (the reported one carries sensor noise)."""
        return self._level_pct

    @property
    def temp_c(self) -> float:
        """The payload's true temperature (a stuck sensor may report something else)."""
        return self._temp_c

    @property
    def hold_left_s(self) -> float:
        """Seconds until the LN2 is gone if the dewar stood upright from now on."""
        return self._level_pct / 100.0 * self.hold_s

    def link_up_at(self, ts: datetime) -> bool:
        """Whether the device can reach the network at device time ``ts``."""
        elapsed = ts - self.start
        return not any(f.kind is FaultKind.LINK_LOSS and f.active(elapsed) for f in self.faults)

    @property
    def link_up(self) -> bool:
        """Whether the last reading :meth:`step` returned could be sent when it was taken
        (before the first reading: whether the link is up at the start)."""
        return self.link_up_at(self._last_ts or self.start)

    def step(self) -> Reading:
        """Measure once: the reading at :attr:`next_ts`, physics advanced up to it."""
        ts = self.next_ts
        target_s = self._seq * self.interval_s
        while self._elapsed_s < target_s:
            dt = min(MAX_SUBSTEP_S, target_s - self._elapsed_s)
            self._integrate(dt)
        reading = self._measure(ts)
        self._last_ts = ts
        self._seq += 1
        self._peak_shock = 0.0
        return reading

    def readings_until(self, when: datetime) -> Iterator[Reading]:
        """Every reading with a device time at or before ``when``, oldest first."""
        while self.next_ts <= when:
            yield self.step()

    def advance(self, seconds: float) -> Iterator[Reading]:
        """The readings taken in the next ``seconds`` of device time, the clock starting at
        ``start``: ``advance(3600)`` at a 60 s interval yields seq 0-59, the next call 60-119."""
        if seconds < 0:
            raise ValueError(f"cannot advance by a negative time ({seconds} s)")
        self._clock += timedelta(seconds=seconds)
        until = self._clock
        while self.next_ts < until:
            yield self.step()

    # Physics ---------------------------------------------------------------------------------

    def _active(self, kind: FaultKind, elapsed_s: float) -> list[Fault]:
        elapsed = timedelta(seconds=elapsed_s)
        return [f for f in self.faults if f.kind is kind and f.active(elapsed)]

    def _tilt(self, elapsed_s: float) -> float:
        tipped = self._active(FaultKind.TIP_OVER, elapsed_s)
        if tipped:
            return max(DEFAULT_TIP_DEG if f.value is None else f.value for f in tipped)
        return self._base_tilt

    @staticmethod
    def _settling_temp(level_pct: float) -> float:
        """Where the payload temperature heads with the lid shut, given the LN2 left."""
        if level_pct >= TEMP_RISE_LEVEL_PCT:
            drift = (100.0 - min(level_pct, 100.0)) / (100.0 - TEMP_RISE_LEVEL_PCT)
            return VAPOUR_FULL_C + (VAPOUR_LOW_C - VAPOUR_FULL_C) * drift
        gone = (TEMP_RISE_LEVEL_PCT - max(level_pct, 0.0)) / TEMP_RISE_LEVEL_PCT
        return VAPOUR_LOW_C + (AMBIENT_C - VAPOUR_LOW_C) * gone

    def _integrate(self, dt: float) -> None:
        mid = self._elapsed_s + dt / 2
        tilt = self._tilt(mid)
        lid_open = bool(self._active(FaultKind.LID_OPEN, mid))

        rate = loss_multiplier(tilt)
        if lid_open:
            rate += LID_OPEN_LOSS_EXTRA
        for fault in self._active(FaultKind.LN2_EXHAUSTION, mid):
            duration = fault.effective_duration or DEFAULT_EXHAUSTION
            rate += self.hold_s / duration.total_seconds()
        self._level_pct = max(0.0, self._level_pct - 100.0 * rate * dt / self.hold_s)

        if lid_open:
            target, tau = AMBIENT_C, LID_OPEN_TAU_S
        else:
            target = self._settling_temp(self._level_pct)
            cooling = self._temp_c > target and self._level_pct > 0.0
            tau = COOL_TAU_S if cooling else WARM_TAU_S
        self._temp_c = target + (self._temp_c - target) * math.exp(-dt / tau)

        tipped_now = tilt >= 45.0
        if tipped_now and not self._was_tipped:
            self._peak_shock = max(self._peak_shock, self.rng.uniform(6.0, 15.0))
        self._was_tipped = tipped_now
        self._battery_pct = max(0.0, self._battery_pct - self._drain_pct_per_s * dt)
        self._elapsed_s += dt

    def _measure(self, ts: datetime) -> Reading:
        elapsed_s = self._seq * self.interval_s
        rng = self.rng
        temp = round(min(99.0, self._temp_c + rng.gauss(0.0, TEMP_NOISE_C)), 2)
        if self._active(FaultKind.STUCK_SENSOR, elapsed_s):
            if self._stuck_value is None:
                last = self._last_reported_temp
                self._stuck_value = temp if last is None else last
                logger.debug(
                    "%s: temperature sensor stuck at %.2f", self.dewar_id, self._stuck_value
                )
            temp = self._stuck_value
        else:
            self._stuck_value = None
        self._last_reported_temp = temp

        level = round(min(100.0, max(0.0, self._level_pct + rng.gauss(0.0, LEVEL_NOISE_PCT))), 2)
        if self._level_pct == 0.0:
            level = 0.0
        tilt = self._tilt(elapsed_s)
        tilt = round(min(180.0, max(0.0, tilt + rng.gauss(0.0, 0.4))), 1)
        shock = rng.uniform(0.1, 0.6) + rng.expovariate(1 / 0.1)
        if rng.random() < 0.01:
            shock += rng.uniform(1.5, 6.0)  # a bump: a dropped box, a pothole, a conveyor
        shock = round(max(shock, self._peak_shock), 2)
        lat = lon = None
        if self.route is not None:
            lat, lon = (round(x, 5) for x in self.route.position(elapsed_s))
        return Reading(
            seq=self.first_seq + self._seq,
            ts=ts,
            temp_c=temp,
            ln2_level_pct=level,
            tilt_deg=tilt,
            shock_g=shock,
            lid_open=bool(self._active(FaultKind.LID_OPEN, elapsed_s)),
            battery_pct=round(self._battery_pct, 1),
            lat=lat,
            lon=lon,
        )
