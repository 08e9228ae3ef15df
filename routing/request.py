"""What a caller asks the planner: a plan request, checked once when it is made.

The fields follow CONTRACT.md section 3 (`POST /api/v1/routes/plan`). `alternatives` is the
number of plans wanted, the best one included. Two optional fields extend it compatibly:
`recharge_minutes` (time an LN2 recharge takes at a depot) and `recharge_hold_hours` (usable
hold after a recharge; by default the same as `hold_hours`, and different when re-planning a
shipment that has already used part of its hold). `exclude_flights` leaves cancelled flights out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Final

from routing.network import FlightKey

DEFAULT_RECHARGE_MINUTES: Final = 120
DEFAULT_HORIZON_HOURS: Final = 14 * 24.0
MAX_ALTERNATIVES: Final = 10


class Objective(StrEnum):
    """How plans are ranked. Every objective keeps all constraints; ties fall to the next key.

    - fastest: earliest delivery, then fewest handoffs.
    - safest: largest hold margin (over every stretch between charges), then least risk, then
      earliest delivery.
    - cheapest: lowest cost, then earliest delivery, then fewest handoffs.
    """

    FASTEST = "fastest"
    SAFEST = "safest"
    CHEAPEST = "cheapest"


class PlanRequestError(ValueError):
    """A plan request that cannot be answered as asked (a bad field, an unknown site)."""


@dataclass(frozen=True, slots=True)
class PlanRequest:
    """One route question. Times must be timezone-aware; they are compared as instants."""

    origin: str
    destination: str
    depart_at: datetime
    hold_hours: float
    deliver_by: datetime | None = None
    objective: Objective = Objective.FASTEST
    alternatives: int = 1
    max_handoffs: int | None = None
    recharge_minutes: int = DEFAULT_RECHARGE_MINUTES
    recharge_hold_hours: float | None = None
    exclude_flights: frozenset[FlightKey] = field(default_factory=frozenset)
    horizon_hours: float = DEFAULT_HORIZON_HOURS

    def __post_init__(self) -> None:
        if not self.origin or not self.destination:
            raise PlanRequestError("origin and destination are required")
        if self.origin == self.destination:
            raise PlanRequestError("origin and destination are the same site")
        for name in ("depart_at", "deliver_by"):
            value = getattr(self, name)
            if value is not None and value.utcoffset() is None:
                raise PlanRequestError(f"{name} needs a UTC offset")
        for name in ("hold_hours", "recharge_hold_hours", "horizon_hours"):
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise PlanRequestError(f"{name} must be a finite number of hours, at least 0")
        if not 1 <= self.alternatives <= MAX_ALTERNATIVES:
            raise PlanRequestError(f"alternatives must be between 1 and {MAX_ALTERNATIVES}")
        if self.max_handoffs is not None and self.max_handoffs < 0:
            raise PlanRequestError("max_handoffs must not be negative")
        if self.recharge_minutes < 0:
            raise PlanRequestError("recharge_minutes must not be negative")
        if not isinstance(self.objective, Objective):
            raise PlanRequestError(f"unknown objective {self.objective!r}")
