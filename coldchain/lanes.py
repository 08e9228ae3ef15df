"""Lane statistics: how each lane (a shipment's origin and destination) has done.

Over the shipments delivered in a period, per lane:

- **on time**: delivered (the `delivered` event's time) no later than the shipment's
  `deliver_by`. Shipments without a `deliver_by` count neither way: `on_time_rate` is over those
  with one.
- **excursion**: at least one alarm on a limit of the shipment's profile (temperature, LN2,
  tilt, lid...; not the engine's own rules: signal lost, sensor faults, rate of change, hold at
  risk) of severity major or critical that was not withdrawn. A warning (a knock, a low
  battery) is not an excursion.
- **hold margin at delivery**: the LN2 forecast as the rules last saw it before delivery (the
  rule state kept for the shipment): forecast depletion minus delivery, in hours. None for
  profiles without an LN2 forecast or a level that was not falling.
- **transit**: pack-out (`starts_at`) to delivery.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

import msgspec

from coldchain.errors import BadRequest
from coldchain.excursions import decode_state

#: The period covered when a request names no start.
DEFAULT_DAYS: Final = 90


@dataclass(frozen=True, slots=True)
class DeliveredShipment:
    """What the statistics need of one delivered shipment (`Store.delivered_shipments`)."""

    id: str
    origin: str
    destination: str
    starts_at: datetime
    delivered_at: datetime
    deliver_by: datetime | None
    excursion: bool
    rule_state: bytes | None


class LaneStats(msgspec.Struct, frozen=True):
    origin: str
    destination: str
    delivered: int
    with_deadline: int
    on_time: int
    on_time_rate: float | None
    with_excursion: int
    excursion_rate: float
    transit_hours_median: float
    transit_hours_max: float
    with_forecast: int
    hold_margin_hours_min: float | None
    hold_margin_hours_median: float | None


class LaneStatsPage(msgspec.Struct, frozen=True):
    """Lane statistics over the shipments delivered in [`from`, `to`)."""

    since: datetime = msgspec.field(name="from")
    until: datetime = msgspec.field(name="to")
    delivered: int = 0
    lanes: list[LaneStats] = msgspec.field(default_factory=list)


def period(since: datetime | None, until: datetime | None) -> tuple[datetime, datetime]:
    """[`since`, `until`) with the defaults filled in: until now, from `DEFAULT_DAYS` before."""
    until = until or datetime.now(UTC)
    since = since or until - timedelta(days=DEFAULT_DAYS)
    if until <= since:
        raise BadRequest("`to` must be after `from`")
    return since, until


def summarise(
    shipments: Sequence[DeliveredShipment], since: datetime, until: datetime
) -> LaneStatsPage:
    return LaneStatsPage(since, until, len(shipments), lane_stats(shipments))


def hold_margin_hours(shipment: DeliveredShipment) -> float | None:
    """Forecast LN2 depletion minus delivery, in hours, from the shipment's rule state."""
    if shipment.rule_state is None:
        return None
    try:
        fit = decode_state(shipment.rule_state).current.ln2_fit
    except msgspec.DecodeError:
        return None  # a state of another version: no forecast to report
    if fit is None or fit.depletion is None:
        return None
    return (fit.depletion / 1e6 - shipment.delivered_at.timestamp()) / 3600


def lane_stats(shipments: Sequence[DeliveredShipment]) -> list[LaneStats]:
    """Per lane, busiest first (then by origin and destination)."""
    lanes: defaultdict[tuple[str, str], list[DeliveredShipment]] = defaultdict(list)
    for s in shipments:
        lanes[s.origin, s.destination].append(s)
    out = []
    for (origin, destination), group in lanes.items():
        deadlines = [s for s in group if s.deliver_by is not None]
        on_time = sum(s.deliver_by is not None and s.delivered_at <= s.deliver_by for s in group)
        transit = [(s.delivered_at - s.starts_at).total_seconds() / 3600 for s in group]
        margins = [m for m in map(hold_margin_hours, group) if m is not None]
        excursions = sum(s.excursion for s in group)
        out.append(
            LaneStats(
                origin=origin,
                destination=destination,
                delivered=len(group),
                with_deadline=len(deadlines),
                on_time=on_time,
                on_time_rate=on_time / len(deadlines) if deadlines else None,
                with_excursion=excursions,
                excursion_rate=excursions / len(group),
                transit_hours_median=statistics.median(transit),
                transit_hours_max=max(transit),
                with_forecast=len(margins),
                hold_margin_hours_min=min(margins) if margins else None,
                hold_margin_hours_median=statistics.median(margins) if margins else None,
            )
        )
    out.sort(key=lambda lane: (-lane.delivered, lane.origin, lane.destination))
    return out


def to_text(page: LaneStatsPage) -> str:
    """The statistics as a table for a terminal."""
    head = (
        f"{page.delivered} shipment(s) delivered {page.since:%Y-%m-%d %H:%M} to "
        f"{page.until:%Y-%m-%d %H:%M} UTC"
    )
    if not page.lanes:
        return head
    rows = [
        ("lane", "delivered", "on time", "excursions", "transit h (median/max)", "hold margin h")
    ]
    for lane in page.lanes:
        on_time = (
            "-"
            if lane.on_time_rate is None
            else f"{lane.on_time}/{lane.with_deadline} ({lane.on_time_rate:.0%})"
        )
        margin = (
            "-"
            if lane.hold_margin_hours_min is None or lane.hold_margin_hours_median is None
            else f"min {lane.hold_margin_hours_min:.0f}, median {lane.hold_margin_hours_median:.0f}"
        )
        rows.append(
            (
                f"{lane.origin} -> {lane.destination}",
                str(lane.delivered),
                on_time,
                f"{lane.with_excursion} ({lane.excursion_rate:.0%})",
                f"{lane.transit_hours_median:.1f}/{lane.transit_hours_max:.1f}",
                margin,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join([head, "", *(line.rstrip() for line in lines)])
