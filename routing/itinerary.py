"""What the planner answers: plans made of legs, or the reason none is feasible.

All instants are UTC `datetime`s; each leg carries the time zones of its two ends, so local
times are derived at the edge (`departs_local`, `arrives_local`) and never stored twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

from routing.request import PlanRequest


class LegMode(StrEnum):
    ROAD = "road"
    COURIER = "courier"
    FLIGHT = "flight"


@dataclass(frozen=True, slots=True)
class Leg:
    """One hand of custody: a ground lane or a dated flight.

    `ready_at` is when the shipment can move on at `destination`: after recovery (airports),
    customs (when the leg crosses a border) and waiting for receiving hours. `recharged` says
    the dewar's LN2 is recharged at `destination`, which resets its hold clock.
    """

    mode: LegMode
    origin: str
    destination: str
    departs_at: datetime
    arrives_at: datetime
    ready_at: datetime
    origin_tz: str
    destination_tz: str
    cost: float
    risk: float
    carrier: str | None = None
    flight: str | None = None
    customs: timedelta = timedelta(0)
    recharged: bool = False

    @property
    def departs_local(self) -> datetime:
        return self.departs_at.astimezone(ZoneInfo(self.origin_tz))

    @property
    def arrives_local(self) -> datetime:
        return self.arrives_at.astimezone(ZoneInfo(self.destination_tz))

    @property
    def ready_local(self) -> datetime:
        return self.ready_at.astimezone(ZoneInfo(self.destination_tz))


@dataclass(frozen=True, slots=True)
class Plan:
    """A feasible route. `hold_margin` is the smallest hold left over any stretch between
    charges (pack-out or a recharge) and the next recharge or the delivery."""

    legs: tuple[Leg, ...]
    depart_at: datetime
    delivered_at: datetime
    hold_margin: timedelta
    cost: float
    risk: float

    @property
    def handoffs(self) -> int:
        return max(0, len(self.legs) - 1)

    @property
    def recharges(self) -> int:
        return sum(leg.recharged for leg in self.legs)

    @property
    def duration(self) -> timedelta:
        return self.delivered_at - self.depart_at

    @property
    def flights(self) -> tuple[str, ...]:
        return tuple(f"{leg.carrier}{leg.flight}" for leg in self.legs if leg.flight is not None)


class Constraint(StrEnum):
    """The constraint that makes a request infeasible."""

    ROUTE = "route"
    DELIVER_BY = "deliver_by"
    HOLD = "hold"
    MAX_HANDOFFS = "max_handoffs"
    COMBINATION = "combination"


@dataclass(frozen=True, slots=True)
class Infeasibility:
    """Why no plan is feasible, and what would make one so (`needed`, in words in `message`).

    `needed_hold` is the extra usable hold the best route would need; `earliest_delivery` the
    earliest delivery any route makes; `needed_handoffs` the fewest handoffs of a feasible route.
    """

    constraint: Constraint
    message: str
    needed_hold: timedelta | None = None
    earliest_delivery: datetime | None = None
    needed_handoffs: int | None = None


@dataclass(frozen=True, slots=True)
class PlanResult:
    """The answer to one request: plans, best first, or the reason there are none."""

    request: PlanRequest
    plans: tuple[Plan, ...]
    infeasible: Infeasibility | None = None

    @property
    def best(self) -> Plan | None:
        return self.plans[0] if self.plans else None
