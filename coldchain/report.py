"""The excursion report of one shipment (DOMAIN.md, "Reports"): what a quality person signs off.

Per shipment: time in range and time beyond each limit, min/max/mean, mean kinetic temperature
for products kept above freezing, the alarm log with every acknowledgement, the custody log, and
the series behind the temperature and LN2 plots.

How time is counted: each reading's values hold until the next reading (sample and hold, as a
logger counts its intervals), but never for longer than the profile's signal-lost threshold;
time past it is *unmonitored* and reported as such, never counted as in range. "Beyond a limit"
is the time the value was past the threshold, whatever the limit's delay and deadband: those
decide when an alarm is raised, and the alarms raised are listed beside it.

`gather` reads everything from the store; `build` is pure and CPU-bound (pandas over every
reading of the shipment), so callers run it in a thread; `report_json` and `readings_csv` encode
the result. The PDF lives in `coldchain.pdf`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import msgspec
import numpy as np
import numpy.typing as npt
import pandas as pd

from coldchain.alarms import Alarm, AlarmChange
from coldchain.profiles import Direction, Limit, Metric, Profile
from coldchain.schemas import (
    REPORT_FORMATS,
    CustodyEntry,
    HandlingSummary,
    LimitSummary,
    Ln2Summary,
    Report,
    ReportAlarm,
    Series,
    SiteRef,
    TemperatureSummary,
    alarm_change_out,
    alarm_out,
)
from coldchain.shipments import CustodyEvent, EventType, Shipment
from coldchain.store import Store
from routing import Site

FloatArray = npt.NDArray[np.float64]

ACTIVATION_K: Final = 10_000.0
"""ΔH/R for the mean kinetic temperature, in kelvin (ΔH = 83.144 kJ/mol, USP <1160>)."""

PLOT_POINTS: Final = 1500
"""Most points a plotted series keeps; longer series keep each bucket's min and max."""


_UNITS: Final = {
    Metric.TEMP_C: " °C",
    Metric.LN2_LEVEL_PCT: " %",
    Metric.TILT_DEG: "°",
    Metric.SHOCK_G: " g",
    Metric.BATTERY_PCT: " %",
    Metric.LID_OPEN: "",
}


@dataclass(frozen=True, slots=True)
class ReportInputs:
    """Everything a report is made of, as read from the store at one moment."""

    shipment: Shipment
    profile: Profile
    origin: Site | None
    destination: Site | None
    readings_csv: bytes  # store.READING_CSV_COLUMNS, with a header row, by device time
    alarms: list[tuple[Alarm, list[AlarmChange]]]
    events: list[CustodyEvent]
    generated_at: datetime
    generated_by: str


async def gather(store: Store, shipment_id: str, generated_by: str) -> ReportInputs:
    """Read a shipment's report inputs (NotFound for an unknown shipment)."""
    shipment = await store.shipment(shipment_id)
    stored = await store.profile(shipment.profile)
    if stored is None:
        raise RuntimeError(f"shipment {shipment.id} names a profile that does not exist")
    sites = {s.id: s for s in await store.sites()}
    return ReportInputs(
        shipment=shipment,
        profile=stored.profile,
        origin=sites.get(shipment.origin),
        destination=sites.get(shipment.destination),
        readings_csv=await store.shipment_readings_csv(shipment),
        alarms=await store.alarm_history(shipment.id),
        events=await store.events(shipment.id),
        generated_at=datetime.now(UTC),
        generated_by=generated_by,
    )


def frame(readings_csv: bytes) -> pd.DataFrame:
    """The readings as a frame: `t` (seconds since the epoch) and one column per quantity."""
    df = pd.read_csv(
        io.BytesIO(readings_csv),
        dtype={
            "seq": "int64",
            "temp_c": "float64",
            "ln2_level_pct": "float64",
            "tilt_deg": "float64",
            "shock_g": "float64",
            "battery_pct": "float64",
            "lat": "float64",
            "lon": "float64",
            "lid_open": "object",
        },
    )
    stamps = pd.to_datetime(df["ts"], utc=True, format="ISO8601")
    # Whatever resolution pandas parsed to (ns or µs), seconds since the epoch.
    df["t"] = (stamps - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    df["lid_open"] = df["lid_open"].map({"t": 1.0, "f": 0.0}).astype("float64")
    return df


def durations(t: FloatArray, end: float, cap: float) -> FloatArray:
    """How long each reading's values held: until the next reading (the last: until `end`),
    at most `cap` seconds."""
    if len(t) == 0:
        return np.zeros(0)
    following = np.append(t[1:], max(end, t[-1]))
    return np.clip(following - t, 0.0, cap)


def mean_kinetic_temperature(temps_c: FloatArray, weights: FloatArray) -> float | None:
    """USP <1160>: T_mk = (ΔH/R) / -ln(Σ t_i·exp(-ΔH/(R·T_i)) / Σ t_i), in °C."""
    keep = ~np.isnan(temps_c)
    temps, w = temps_c[keep], weights[keep]
    if len(temps) == 0:
        return None
    if w.sum() <= 0:
        w = np.ones_like(temps)
    kelvin = temps + 273.15
    mean_factor = float(np.sum(w * np.exp(-ACTIVATION_K / kelvin)) / np.sum(w))
    return ACTIVATION_K / -math.log(mean_factor) - 273.15


def mkt_applies(profile: Profile) -> bool:
    """MKT means something only for products kept above freezing (2-8 °C, 15-25 °C): the
    profile's upper temperature limit is above 0 °C."""
    uppers = [
        lim.threshold
        for lim in profile.limits
        if lim.metric is Metric.TEMP_C and lim.direction in (Direction.ABOVE, Direction.OUTSIDE)
    ]
    return bool(uppers) and max(uppers) > 0.0


def condition(limit: Limit) -> str:
    """A limit in words: `> -150 °C for 5 min`, `< 20 %`, `lid open for 2 min`,
    `outside 2-8 °C, 1 h 00 min in all`."""
    if limit.metric is Metric.LID_OPEN:
        text = "lid open"
    elif limit.direction is Direction.OUTSIDE:
        low, high = limit.bounds
        text = f"outside {range_text(low, high)}{_UNITS[limit.metric]}"
    else:
        sign = ">" if limit.direction is Direction.ABOVE else "<"
        text = f"{sign} {limit.threshold:g}{_UNITS[limit.metric]}"
    if limit.budget_s is not None:
        return f"{text}, {duration_text(limit.budget_s)} in all"
    if limit.delay_s > 0:
        return f"{text} for {duration_text(limit.delay_s)}"
    return text


def range_text(low: float, high: float) -> str:
    """`2-8`, `-190 to -150`: a range a person reads at a glance."""
    return f"{low:g}-{high:g}" if low >= 0 else f"{low:g} to {high:g}"


def duration_text(seconds: float) -> str:
    """`0 s`, `45 s`, `12 min`, `3 h 05 min`, `2 d 4 h`."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    minutes = round(s / 60)
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def _breached(limit: Limit, values: FloatArray) -> npt.NDArray[np.bool_]:
    with np.errstate(invalid="ignore"):
        if limit.direction is Direction.ABOVE:
            return values > limit.threshold
        if limit.direction is Direction.BELOW:
            return values < limit.threshold
        low, high = limit.bounds
        return (values > high) | (values < low)


def _worst(limit: Limit, breached: FloatArray) -> float:
    """The breached value furthest past the limit (for a range: out of it, either side)."""
    if limit.direction is Direction.ABOVE:
        return float(breached.max())
    if limit.direction is Direction.BELOW:
        return float(breached.min())
    low, high = limit.bounds
    return float(breached[np.argmax(np.maximum(breached - high, low - breached))])


def _stretches(mask: npt.NDArray[np.bool_], held: FloatArray) -> FloatArray:
    """The summed duration of each run of consecutive breached readings."""
    if not mask.any():
        return np.zeros(0)
    edges = np.diff(np.concatenate(([0], mask.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    sums = np.concatenate(([0.0], np.cumsum(held)))
    return np.asarray(sums[ends] - sums[starts], dtype=np.float64)


def _series(t: FloatArray, values: FloatArray) -> Series:
    keep = ~np.isnan(values)
    t, values = t[keep], values[keep]
    if len(t) > PLOT_POINTS:
        # Keep each bucket's extremes, in time order, so no spike disappears from the plot.
        buckets = PLOT_POINTS // 2
        bounds = np.linspace(0, len(t), buckets + 1).astype(int)
        picks: list[int] = []
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            if hi <= lo:
                continue
            chunk = values[lo:hi]
            picks.extend(sorted({lo + int(np.argmin(chunk)), lo + int(np.argmax(chunk))}))
        t, values = t[picks], values[picks]
    return Series(
        ts=[datetime.fromtimestamp(x, UTC) for x in t.tolist()],
        values=[round(v, 3) for v in values.tolist()],
    )


def _first(events: list[CustodyEvent], kind: EventType) -> datetime | None:
    return next((e.at for e in events if e.type is kind), None)


def _site_ref(site_id: str, site: Site | None) -> SiteRef:
    return SiteRef(site_id, None if site is None else site.name, None if site is None else site.tz)


def build(inputs: ReportInputs) -> Report:
    """The report, computed from its inputs (pure; seconds of CPU for a million readings)."""
    shipment, profile = inputs.shipment, inputs.profile
    df = frame(inputs.readings_csv)
    period_end = shipment.ends_at or inputs.generated_at
    t = df["t"].to_numpy(dtype=np.float64)
    held = durations(t, period_end.timestamp(), profile.signal_lost_after_s)
    monitored = float(held.sum())
    period_s = max(0.0, (period_end - shipment.starts_at).total_seconds())

    raised: dict[str, int] = {}
    for alarm, _ in inputs.alarms:
        raised[alarm.rule] = raised.get(alarm.rule, 0) + 1

    limits: list[LimitSummary] = []
    temp_breach = np.zeros(len(df), dtype=bool)
    for limit in profile.limits:
        values = df[str(limit.metric)].to_numpy(dtype=np.float64)
        mask = _breached(limit, values)
        if limit.metric is Metric.TEMP_C:
            temp_breach |= mask
        runs = _stretches(mask, held)
        worst = None
        if mask.any():
            worst = _worst(limit, values[mask])
        limits.append(
            LimitSummary(
                rule=limit.rule,
                metric=str(limit.metric),
                direction=str(limit.direction),
                threshold=limit.threshold,
                low=limit.low,
                condition=condition(limit),
                severity=limit.severity,
                beyond_s=float(held[mask].sum()),
                longest_s=float(runs.max()) if len(runs) else 0.0,
                stretches=len(runs),
                alarms=raised.get(limit.rule, 0),
                budget_s=limit.budget_s,
                worst=worst,
            )
        )

    temps = df["temp_c"].to_numpy(dtype=np.float64)
    in_range_s = float(held[~temp_breach].sum())
    temperature = TemperatureSummary(
        min_c=float(temps.min()) if len(temps) else None,
        max_c=float(temps.max()) if len(temps) else None,
        mean_c=float(temps.mean()) if len(temps) else None,
        in_range_s=in_range_s,
        in_range_pct=100.0 * in_range_s / monitored if monitored > 0 else None,
        mkt_c=mean_kinetic_temperature(temps, held) if mkt_applies(profile) else None,
    )

    ln2_values = df["ln2_level_pct"].dropna().to_numpy(dtype=np.float64)
    ln2 = None
    if len(ln2_values):
        ln2 = Ln2Summary(float(ln2_values[0]), float(ln2_values[-1]), float(ln2_values.min()))
    lid = df["lid_open"].to_numpy(dtype=np.float64)
    lid_mask = np.nan_to_num(lid) > 0.5
    tilt, shock = df["tilt_deg"].dropna(), df["shock_g"].dropna()
    handling = HandlingSummary(
        max_tilt_deg=float(tilt.max()) if len(tilt) else None,
        max_shock_g=float(shock.max()) if len(shock) else None,
        lid_open_s=float(held[lid_mask].sum()),
        lid_openings=len(_stretches(lid_mask, held)),
    )

    events = inputs.events
    delivered = _first(events, EventType.DELIVERED)
    on_time = None
    if shipment.deliver_by is not None and delivered is not None:
        on_time = delivered <= shipment.deliver_by
    alarms = [
        ReportAlarm(alarm_out(a), [alarm_change_out(c) for c in changes])
        for a, changes in inputs.alarms
    ]
    excursion = any(lim.beyond_s > 0 for lim in limits if lim.metric == Metric.TEMP_C)
    temperature_limits = [lim for lim in limits if lim.metric == Metric.TEMP_C]

    return Report(
        shipment_id=shipment.id,
        dewar_id=shipment.dewar_id,
        chain_of_identity=shipment.chain_of_identity,
        profile=profile.name,
        profile_description=profile.description,
        status=str(shipment.status),
        origin=_site_ref(shipment.origin, inputs.origin),
        destination=_site_ref(shipment.destination, inputs.destination),
        created_at=shipment.created_at,
        packed_at=_first(events, EventType.PACKED),
        picked_up_at=_first(events, EventType.PICKED_UP),
        delivered_at=delivered,
        deliver_by=shipment.deliver_by,
        on_time=on_time,
        period_start=shipment.starts_at,
        period_end=period_end,
        readings=len(df),
        first_reading_at=datetime.fromtimestamp(t[0], UTC) if len(t) else None,
        last_reading_at=datetime.fromtimestamp(t[-1], UTC) if len(t) else None,
        monitored_s=monitored,
        unmonitored_s=max(0.0, period_s - monitored),
        signal_lost_after_s=profile.signal_lost_after_s,
        excursion=excursion,
        verdict=verdict(excursion, temperature, temperature_limits, alarms, len(df)),
        temperature=temperature,
        ln2=ln2,
        handling=handling,
        limits=limits,
        alarms=alarms,
        custody=[CustodyEntry(e.type, e.at, e.location, e.actor, e.note) for e in events],
        temperature_limits=temperature_limits,
        temperature_series=_series(t, temps),
        ln2_series=_series(t, df["ln2_level_pct"].to_numpy(dtype=np.float64)),
        generated_at=inputs.generated_at,
        generated_by=inputs.generated_by,
    )


def verdict(
    excursion: bool,
    temperature: TemperatureSummary,
    temperature_limits: list[LimitSummary],
    alarms: list[ReportAlarm],
    readings: int,
) -> str:
    """One sentence a person reads first."""
    if readings == 0:
        return "No readings were received for this shipment: its temperature is unknown."
    unacknowledged = sum(1 for a in alarms if a.alarm.state == "open")
    tail = f" {unacknowledged} alarm(s) not yet acknowledged." if unacknowledged else ""
    if not excursion:
        return "No temperature excursion: within every temperature limit." + tail
    worst = max(
        (lim for lim in temperature_limits if lim.beyond_s > 0),
        key=lambda lim: (lim.severity.rank, lim.beyond_s),
    )
    if worst.direction == Direction.OUTSIDE and worst.low is not None:
        what = f"outside {range_text(worst.low, worst.threshold)} °C"
    else:
        what = f"{'>' if worst.direction == Direction.ABOVE else '<'} {worst.threshold:g} °C"
    pct = temperature.in_range_pct
    share = f", {100 - pct:.1f} % of monitored time" if pct is not None else ""
    return (
        f"TEMPERATURE EXCURSION: {what} for "
        f"{duration_text(worst.beyond_s)} in all{share}; highest severity {worst.severity}." + tail
    )


def report_json(report: Report) -> bytes:
    return msgspec.json.encode(report)


def readings_csv(inputs: ReportInputs) -> bytes:
    """Every reading of the shipment with how long it held and which limits it passed: the
    data behind the report, for a spreadsheet."""
    df = frame(inputs.readings_csv)
    end = (inputs.shipment.ends_at or inputs.generated_at).timestamp()
    held = durations(df["t"].to_numpy(dtype=np.float64), end, inputs.profile.signal_lost_after_s)
    flags: list[list[str]] = [[] for _ in range(len(df))]
    for limit in inputs.profile.limits:
        mask = _breached(limit, df[str(limit.metric)].to_numpy(dtype=np.float64))
        for i in np.flatnonzero(mask).tolist():
            flags[i].append(limit.rule)
    # The stored text as it is (no float round trip), plus the two derived columns.
    out = pd.read_csv(io.BytesIO(inputs.readings_csv), dtype=str, keep_default_na=False)
    out["lid_open"] = out["lid_open"].map({"t": "true", "f": "false", "": ""})
    out.insert(0, "dewar_id", inputs.shipment.dewar_id)
    out.insert(0, "shipment_id", inputs.shipment.id)
    out["held_s"] = np.round(held, 3)
    out["beyond_limits"] = [";".join(f) for f in flags]
    return out.to_csv(index=False, lineterminator="\n").encode()


class Rendered(msgspec.Struct, frozen=True):
    body: bytes
    content_type: str
    filename: str


def render(inputs: ReportInputs, fmt: str) -> Rendered:
    """The report in one of FORMATS (CPU-bound: run it in a thread)."""
    stem = f"{inputs.shipment.id}-report"
    if fmt == "csv":
        return Rendered(readings_csv(inputs), "text/csv", f"{stem}.csv")
    report = build(inputs)
    if fmt == "pdf":
        from coldchain import pdf  # fpdf2 is loaded only when a PDF is asked for

        return Rendered(pdf.render(report), "application/pdf", f"{stem}.pdf")
    if fmt == "json":
        return Rendered(report_json(report), "application/json", f"{stem}.json")
    raise ValueError(f"no report format {fmt!r}: choose one of {', '.join(REPORT_FORMATS)}")
