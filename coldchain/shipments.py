"""Shipments and their custody: the records people act on, and the rules of the lifecycle.

A shipment moves through its statuses only by custody events, in time order:

    created --packed--> packed --picked_up--> in_transit --delivered--> delivered
                                              in_transit --handoff--> in_transit
                                              in_transit --customs_hold--> customs_hold
                                              customs_hold --customs_released--> in_transit
    any status but delivered/cancelled --cancelled--> cancelled

The shipment owns its dewar's readings (by device time) from pack-out, or from creation until
the dewar is packed, until delivery or cancellation. No two shipments of a dewar own the same
time: a shipment that would start (at creation or pack-out) before the dewar's previous one
ended is refused.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Final

from coldchain.errors import Conflict

ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")


class Status(StrEnum):
    CREATED = "created"
    PACKED = "packed"
    IN_TRANSIT = "in_transit"
    CUSTOMS_HOLD = "customs_hold"
    DELIVERED = "delivered"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self not in (Status.DELIVERED, Status.CANCELLED)


class EventType(StrEnum):
    PACKED = "packed"
    PICKED_UP = "picked_up"
    HANDOFF = "handoff"
    CUSTOMS_HOLD = "customs_hold"
    CUSTOMS_RELEASED = "customs_released"
    DELIVERED = "delivered"
    CANCELLED = "cancelled"


_TRANSITIONS: Final[dict[EventType, tuple[frozenset[Status], Status | None]]] = {
    EventType.PACKED: (frozenset({Status.CREATED}), Status.PACKED),
    EventType.PICKED_UP: (frozenset({Status.PACKED}), Status.IN_TRANSIT),
    EventType.HANDOFF: (frozenset({Status.IN_TRANSIT}), None),
    EventType.CUSTOMS_HOLD: (frozenset({Status.IN_TRANSIT}), Status.CUSTOMS_HOLD),
    EventType.CUSTOMS_RELEASED: (frozenset({Status.CUSTOMS_HOLD}), Status.IN_TRANSIT),
    EventType.DELIVERED: (frozenset({Status.IN_TRANSIT}), Status.DELIVERED),
    EventType.CANCELLED: (
        frozenset({Status.CREATED, Status.PACKED, Status.IN_TRANSIT, Status.CUSTOMS_HOLD}),
        Status.CANCELLED,
    ),
}

_NEEDS: Final = {
    EventType.PACKED: "a shipment is packed once, before it is picked up",
    EventType.PICKED_UP: "it must be packed first, and is picked up once",
    EventType.HANDOFF: "a handoff happens in transit (after pick-up, not during a customs hold)",
    EventType.CUSTOMS_HOLD: "customs can hold a shipment in transit",
    EventType.CUSTOMS_RELEASED: "only a shipment held by customs can be released",
    EventType.DELIVERED: "it must be picked up (and released by customs) before delivery",
    EventType.CANCELLED: "a delivered or cancelled shipment cannot be cancelled",
}


def next_status(current: Status, event: EventType) -> Status:
    """The status after `event`, or Conflict saying why the event makes no sense now."""
    allowed, after = _TRANSITIONS[event]
    if current not in allowed:
        raise Conflict(f"cannot record '{event}' on a shipment that is {current}: {_NEEDS[event]}")
    return current if after is None else after


def new_shipment_id(now: datetime) -> str:
    return f"SH-{now:%Y%m%d}-{secrets.token_hex(3).upper()}"


@dataclass(frozen=True, slots=True)
class Shipment:
    id: str
    dewar_id: str
    profile: str
    origin: str
    destination: str
    deliver_by: datetime | None
    planned_departure: datetime | None
    chain_of_identity: str | None
    status: Status
    created_at: datetime
    created_by: str
    starts_at: datetime
    ends_at: datetime | None


@dataclass(frozen=True, slots=True)
class CustodyEvent:
    id: int
    shipment_id: str
    type: EventType
    at: datetime
    location: str | None
    note: str | None
    actor: str
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    action: str
    entity: str
    entity_id: str
    detail: object
