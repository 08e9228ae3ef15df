"""The HTTP API's wire models. Handlers decode request bodies into these and encode responses
from them, and the OpenAPI document is generated from the same types, so the two cannot drift."""

from __future__ import annotations

from datetime import datetime, time
from typing import Annotated, Any, Final

import msgspec
from msgspec import Meta

from coldchain.alarms import Alarm, AlarmChange
from coldchain.auth import Role
from coldchain.lanes import LaneStatsPage as LaneStatsPage
from coldchain.profiles import Profile, Severity
from coldchain.shipments import EventType, Status

Id = Annotated[
    str, Meta(pattern=r"^[A-Za-z0-9._-]{1,64}$", description="1-64 of A-Z a-z 0-9 . _ -")
]
Instant = Annotated[datetime, Meta(tz=True, description="RFC 3339 with offset")]
ShortText = Annotated[str, Meta(min_length=1, max_length=200)]
Note = Annotated[str, Meta(max_length=2000)]


class ErrorDetail(msgspec.Struct, frozen=True):
    code: str
    message: str


class ErrorBody(msgspec.Struct, frozen=True):
    error: ErrorDetail


class ShipmentIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    dewar_id: Id
    profile: Id
    origin: Id
    destination: Id
    id: Id | None = None
    deliver_by: Instant | None = None
    chain_of_identity: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    planned_departure: Instant | None = None


class ShipmentOut(msgspec.Struct, frozen=True):
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


class ShipmentPage(msgspec.Struct, frozen=True):
    items: list[ShipmentOut]
    next: str | None = None


class EventIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    type: EventType
    at: Instant | None = None
    location: ShortText | None = None
    note: Note | None = None


class EventOut(msgspec.Struct, frozen=True):
    id: int
    type: EventType
    at: datetime
    location: str | None
    note: str | None
    actor: str
    recorded_at: datetime


class EventRecorded(msgspec.Struct, frozen=True):
    event: EventOut
    shipment: ShipmentOut


class ReadingOut(msgspec.Struct, frozen=True):
    seq: int
    ts: datetime
    received_at: datetime
    temp_c: float
    ln2_level_pct: float | None = None
    tilt_deg: float | None = None
    shock_g: float | None = None
    lid_open: bool | None = None
    battery_pct: float | None = None
    lat: float | None = None
    lon: float | None = None
    extra: dict[str, Any] | None = None


class HoldOut(msgspec.Struct, frozen=True):
    """The LN2 forecast: when the charge runs out at the current rate of loss."""

    level_pct: float
    loss_pct_per_h: float
    depletion_at: datetime | None
    earliest_at: datetime | None
    hours_left: float | None
    margin_h: float | None  # hours between forecast depletion and deliver_by
    tipped: bool


class ShipmentDetail(msgspec.Struct, frozen=True):
    shipment: ShipmentOut
    last_reading: ReadingOut | None
    last_seen_s: float | None
    events: list[EventOut]
    open_alarms: list[AlarmOut]
    hold: HoldOut | None
    route: ShipmentRouteOut | None  # the current planned route, if one was stored
    eta: datetime | None = None  # the current route's delivery instant


class BucketOut(msgspec.Struct, frozen=True):
    start: datetime
    count: int
    temp_c_min: float
    temp_c_max: float
    temp_c_mean: float
    ln2_level_pct_min: float | None
    ln2_level_pct_max: float | None
    ln2_level_pct_mean: float | None


class TelemetryOut(msgspec.Struct, frozen=True):
    shipment_id: str
    dewar_id: str
    start: datetime
    end: datetime | None
    every_s: float | None
    readings: list[ReadingOut] | None = None
    buckets: list[BucketOut] | None = None
    truncated: bool = False


class StoredProfileOut(msgspec.Struct, frozen=True):
    profile: Profile
    built_in: bool
    updated_at: datetime


class ProfileList(msgspec.Struct, frozen=True):
    items: list[StoredProfileOut]


class SiteOut(msgspec.Struct, frozen=True):
    id: str
    name: str
    kind: str
    lat: float
    lon: float
    tz: str
    country: str
    iata: str | None
    ln2_recharge: bool
    customs_minutes: int
    connect_minutes: int
    recovery_minutes: int
    opens: time | None
    closes: time | None


class SiteList(msgspec.Struct, frozen=True):
    items: list[SiteOut]


class DeadLetterOut(msgspec.Struct, frozen=True):
    id: int
    received_at: datetime
    topic: str
    dewar_id: str | None
    item_index: int | None
    reason: str
    size: int
    payload: str | None
    payload_base64: str | None


class DeadLetterPage(msgspec.Struct, frozen=True):
    items: list[DeadLetterOut]
    next: str | None = None


class AuditOut(msgspec.Struct, frozen=True):
    id: int
    at: datetime
    actor: str
    action: str
    entity: str
    entity_id: str
    detail: Any


class AuditPage(msgspec.Struct, frozen=True):
    items: list[AuditOut]
    next: str | None = None


class TokenIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=100)]
    role: Role
    expires_in_days: Annotated[float, Meta(gt=0, le=3650)] | None = None


class TokenOut(msgspec.Struct, frozen=True):
    id: int
    name: str
    role: Role
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


class TokenCreated(msgspec.Struct, frozen=True):
    id: int
    token: str
    name: str
    role: Role
    expires_at: datetime | None


class TokenList(msgspec.Struct, frozen=True):
    items: list[TokenOut]


class Health(msgspec.Struct, frozen=True):
    status: str


class Readiness(msgspec.Struct, frozen=True):
    ready: bool
    checks: dict[str, str]


class AlarmOut(msgspec.Struct, frozen=True):
    id: int
    shipment_id: str
    dewar_id: str
    rule: str
    severity: str
    state: str
    condition_active: bool
    started_at: datetime
    raised_at: datetime
    cleared_at: datetime | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    ack_comment: str | None
    closed_at: datetime | None
    closed_by: str | None
    close_comment: str | None
    value: float | None
    limit: float | None
    message: str
    escalation_level: int


class AlarmPage(msgspec.Struct, frozen=True):
    items: list[AlarmOut]
    next: str | None = None


class AlarmChangeOut(msgspec.Struct, frozen=True):
    id: int
    state: str
    severity: str
    at: datetime
    actor: str | None
    comment: str | None
    escalation_level: int


def alarm_out(a: Alarm) -> AlarmOut:
    return AlarmOut(
        id=a.id,
        shipment_id=a.shipment_id,
        dewar_id=a.dewar_id,
        rule=a.rule,
        severity=str(a.severity),
        state=a.state.public,
        condition_active=a.condition_active,
        started_at=a.started_at,
        raised_at=a.raised_at,
        cleared_at=a.cleared_at,
        acknowledged_at=a.acknowledged_at,
        acknowledged_by=a.acknowledged_by,
        ack_comment=a.ack_comment,
        closed_at=a.closed_at,
        closed_by=a.closed_by,
        close_comment=a.close_comment,
        value=a.value,
        limit=a.limit,
        message=a.message,
        escalation_level=a.escalation_level,
    )


def alarm_change_out(c: AlarmChange) -> AlarmChangeOut:
    return AlarmChangeOut(
        c.id, c.state.public, str(c.severity), c.at, c.actor, c.comment, c.escalation_level
    )


class DeliveryOut(msgspec.Struct, frozen=True):
    id: int
    channel: str
    recipient: str | None
    state: str
    attempts: int
    last_attempt_at: datetime | None
    last_detail: str | None


class AlarmDetail(msgspec.Struct, frozen=True):
    alarm: AlarmOut
    changes: list[AlarmChangeOut]
    deliveries: list[DeliveryOut]


class CommentIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    comment: Annotated[str, Meta(min_length=1, max_length=2000)]


class RecipientIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=100)]
    channel: Annotated[str, Meta(pattern="^(email|webhook)$")]
    address: Annotated[str, Meta(min_length=3, max_length=2000)]
    secret: (
        Annotated[
            str,
            Meta(
                min_length=16,
                max_length=200,
                description="Required for webhooks: the key of their X-Coldchain-Signature HMAC",
            ),
        ]
        | None
    ) = None
    min_severity: Annotated[str, Meta(pattern="^(info|warning|major|critical)$")] = "warning"
    site_id: Id | None = None
    shipment_id: Id | None = None
    tier: Annotated[int, Meta(ge=0, le=9)] = 0
    quiet_from: time | None = None
    quiet_until: time | None = None
    tz: Annotated[str, Meta(min_length=1, max_length=64)] = "UTC"


class RecipientOut(msgspec.Struct, frozen=True):
    id: int
    name: str
    channel: str
    address: str
    has_secret: bool
    min_severity: str
    site_id: str | None
    shipment_id: str | None
    tier: int
    quiet_from: time | None
    quiet_until: time | None
    tz: str
    active: bool


class RecipientList(msgspec.Struct, frozen=True):
    items: list[RecipientOut]


class RoutePlanIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    origin: Id
    destination: Id
    depart_at: Instant
    hold_hours: Annotated[float, Meta(ge=0, le=24 * 60)]
    deliver_by: Instant | None = None
    objective: Annotated[str, Meta(pattern="^(fastest|safest|cheapest)$")] = "fastest"
    alternatives: Annotated[int, Meta(ge=1, le=10)] = 1
    max_handoffs: Annotated[int, Meta(ge=0, le=50)] | None = None
    recharge_minutes: Annotated[int, Meta(ge=1, le=24 * 60)] | None = None
    recharge_hold_hours: Annotated[float, Meta(ge=0, le=24 * 60)] | None = None


class RouteLegOut(msgspec.Struct, frozen=True, rename={"from_": "from"}):
    mode: str
    from_: str
    to: str
    carrier: str | None
    flight: str | None
    departs_at: str
    departs_local: str
    arrives_at: str
    arrives_local: str
    ready_at: str
    ready_local: str
    customs_minutes: int
    recharged: bool
    cost: float
    risk: float


class RouteOut(msgspec.Struct, frozen=True):
    depart_at: str
    arrival: str
    arrival_local: str | None
    duration_hours: float
    hold_margin_hours: float
    handoffs: int
    recharges: int
    cost: float
    risk: float
    legs: list[RouteLegOut]


class InfeasibleOut(msgspec.Struct, frozen=True):
    constraint: str
    message: str
    needed_hold_hours: float | None
    earliest_delivery: str | None
    needed_handoffs: int | None


class RoutePlanOut(msgspec.Struct, frozen=True):
    request: dict[str, Any]
    feasible: bool
    routes: list[RouteOut]
    infeasible: InfeasibleOut | None


class FlightKeyIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A dated flight, as a route leg names it: carrier, flight number, departure."""

    carrier: Annotated[str, Meta(min_length=1, max_length=8)]
    flight: Annotated[str, Meta(min_length=1, max_length=8)]
    departs_at: Instant


class ShipmentRouteIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Plan (or re-plan) a shipment's route to its destination, inside its deliver_by."""

    hold_hours: Annotated[
        float, Meta(ge=0, le=24 * 60, description="usable hold left from depart_at, in hours")
    ]
    depart_at: (
        Annotated[
            datetime,
            Meta(tz=True, description="default: the shipment's planned_departure, else now"),
        ]
        | None
    ) = None
    from_site: (
        Annotated[
            str,
            Meta(
                pattern=r"^[A-Za-z0-9._-]{1,64}$",
                description="where the shipment is now; default: its origin",
            ),
        ]
        | None
    ) = None
    objective: Annotated[str, Meta(pattern="^(fastest|safest|cheapest)$")] = "fastest"
    exclude_flights: Annotated[
        list[FlightKeyIn], Meta(max_length=1000, description="cancelled flights, left out")
    ] = []
    max_handoffs: Annotated[int, Meta(ge=0, le=50)] | None = None
    recharge_hold_hours: (
        Annotated[float, Meta(ge=0, le=24 * 60, description="usable hold after an LN2 recharge")]
        | None
    ) = None


class ShipmentRouteOut(RouteOut, frozen=True):
    """A route stored for a shipment: the plan (as `/routes/plan` answers one), its ETA, who
    planned it and when, and what was asked."""

    id: int
    shipment_id: str
    from_site: str
    eta: datetime
    planned_at: datetime
    planned_by: str
    request: dict[str, Any]


class ShipmentRouteList(msgspec.Struct, frozen=True):
    items: list[ShipmentRouteOut]  # newest (the current route) first


class MeOut(msgspec.Struct, frozen=True):
    """Who the token belongs to and what it may do (the dashboard hides what it may not)."""

    name: str
    role: Role
    permissions: list[str]


# The excursion report (`GET /shipments/{id}/report`, computed by `coldchain.report`) ----------

REPORT_FORMATS: Final = ("json", "csv", "pdf")


class LimitSummary(msgspec.Struct, frozen=True):
    """How long one limit's threshold was passed, and what was raised for it."""

    rule: str
    metric: str
    direction: str
    threshold: float
    condition: str
    severity: Severity
    beyond_s: float
    longest_s: float
    stretches: int
    alarms: int
    budget_s: float | None = None
    worst: float | None = None
    low: float | None = None  # the lower bound of an `outside` limit (`threshold` the upper)


class TemperatureSummary(msgspec.Struct, frozen=True):
    min_c: float | None
    max_c: float | None
    mean_c: float | None
    in_range_s: float
    in_range_pct: float | None
    mkt_c: float | None


class Ln2Summary(msgspec.Struct, frozen=True):
    start_pct: float
    end_pct: float
    min_pct: float


class HandlingSummary(msgspec.Struct, frozen=True):
    max_tilt_deg: float | None
    max_shock_g: float | None
    lid_open_s: float
    lid_openings: int


class SiteRef(msgspec.Struct, frozen=True):
    id: str
    name: str | None
    tz: str | None


class ReportAlarm(msgspec.Struct, frozen=True):
    """An alarm of the report with every change it went through."""

    alarm: AlarmOut
    changes: list[AlarmChangeOut]


class CustodyEntry(msgspec.Struct, frozen=True):
    type: EventType
    at: datetime
    location: str | None
    actor: str
    note: str | None


class Series(msgspec.Struct, frozen=True):
    """A plotted series: device times and values (downsampled to at most PLOT_POINTS)."""

    ts: list[datetime]
    values: list[float]


class Report(msgspec.Struct, frozen=True):
    """The excursion report; `format=json` is this, encoded."""

    shipment_id: str
    dewar_id: str
    chain_of_identity: str | None
    profile: str
    profile_description: str
    status: str
    origin: SiteRef
    destination: SiteRef
    created_at: datetime
    packed_at: datetime | None
    picked_up_at: datetime | None
    delivered_at: datetime | None
    deliver_by: datetime | None
    on_time: bool | None
    period_start: datetime
    period_end: datetime
    readings: int
    first_reading_at: datetime | None
    last_reading_at: datetime | None
    monitored_s: float
    unmonitored_s: float
    signal_lost_after_s: float
    excursion: bool
    verdict: str
    temperature: TemperatureSummary
    ln2: Ln2Summary | None
    handling: HandlingSummary
    limits: list[LimitSummary]
    alarms: list[ReportAlarm]
    custody: list[CustodyEntry]
    temperature_limits: list[LimitSummary]  # the temperature rows of `limits`, for the plot
    temperature_series: Series
    ln2_series: Series
    generated_at: datetime
    generated_by: str


ReportOut = Report
