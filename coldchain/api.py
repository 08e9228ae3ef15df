"""The HTTP API under /api/v1 (CONTRACT.md section 3): thin handlers over the store.

Each handler names the permission it needs with `@requires`; the auth middleware checks it.
Bodies are JSON, decoded into the wire models of `coldchain.schemas`; responses are encoded from
them. Errors are raised as `ColdchainError`s and rendered by the error middleware.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from aiohttp import web

from coldchain import keys, lanes
from coldchain.alarms import Alarm, AlarmState, Channel, Recipient
from coldchain.auth import ROLE_PERMISSIONS, Actor, Permission, new_token, token_hash
from coldchain.errors import BadRequest, Conflict, NoFeasibleRoute, NotFound
from coldchain.excursions import RECHARGE_JUMP_PCT
from coldchain.forecast import forecast
from coldchain.profiles import Profile, Severity, check
from coldchain.schemas import (
    REPORT_FORMATS,
    AlarmDetail,
    AlarmPage,
    AuditOut,
    AuditPage,
    BucketOut,
    CommentIn,
    DeadLetterOut,
    DeadLetterPage,
    DeliveryOut,
    EventIn,
    EventOut,
    EventRecorded,
    HoldOut,
    MeOut,
    ProfileList,
    ReadingOut,
    RecipientIn,
    RecipientList,
    RecipientOut,
    RoutePlanIn,
    RoutePlanOut,
    ShipmentDetail,
    ShipmentIn,
    ShipmentOut,
    ShipmentPage,
    ShipmentRouteIn,
    ShipmentRouteList,
    ShipmentRouteOut,
    SiteList,
    SiteOut,
    StoredProfileOut,
    TelemetryOut,
    TokenCreated,
    TokenIn,
    TokenList,
    TokenOut,
    alarm_change_out,
    alarm_out,
)
from coldchain.shipments import (
    ID_PATTERN,
    CustodyEvent,
    Shipment,
    Status,
    new_shipment_id,
)
from coldchain.store import IncomingReading, Notification, ShipmentRoute, StoredDeadLetter
from coldchain.watch import live_alarm
from routing import (
    FlightKey,
    Objective,
    PlanRequest,
    PlanRequestError,
    SiteKind,
    plan_request_from_dict,
    plan_result_to_dict,
)

routes = web.RouteTableDef()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PERMISSION_ATTRIBUTE: Final = "coldchain_permission"
T = TypeVar("T")

_EVERY: Final = re.compile(r"([1-9]\d{0,5})(s|m|h|d)")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_READINGS: Final = 10_000
MAX_BUCKETS: Final = 10_000


def requires(permission: Permission) -> Callable[[Handler], Handler]:
    """Mark a handler with the permission the auth middleware must find in the caller's role."""

    def mark(handler: Handler) -> Handler:
        setattr(handler, PERMISSION_ATTRIBUTE, permission)
        return handler

    return mark


def actor(request: web.Request) -> Actor:
    found: Actor = request[keys.ACTOR]
    return found


def reply(value: object, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(value), status=status, content_type="application/json"
    )


async def decode_body(request: web.Request, kind: type[T]) -> T:
    """The JSON body as `kind`, or a 4xx that says what is wrong with it."""
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(
            reason=f"send JSON with Content-Type: application/json, not {request.content_type!r}"
        )
    data = await request.read()
    try:
        return msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid body: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from exc


def _int(request: web.Request, name: str, default: int, *, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise BadRequest(f"query parameter {name} must be an integer, got {raw[:40]!r}") from exc
    if not low <= value <= high:
        raise BadRequest(f"query parameter {name} must be between {low} and {high}, got {value}")
    return value


def _text(request: web.Request, name: str) -> str | None:
    """An optional text parameter: absent is None; present it must not be empty."""
    raw = request.query.get(name)
    if raw is None:
        return None
    if raw == "":
        raise BadRequest(f"query parameter {name} is empty; leave it out instead")
    return raw


def _instant(request: web.Request, name: str) -> datetime | None:
    raw = _text(request, name)
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError as exc:
        raise BadRequest(
            f"query parameter {name} must be an RFC 3339 time, got {raw[:40]!r}"
        ) from exc
    if value.tzinfo is None:
        raise BadRequest(f"query parameter {name} needs an offset (Z or +hh:mm)")
    return value.astimezone(UTC)


def _every(raw: str) -> timedelta:
    match = _EVERY.fullmatch(raw)
    if match is None:
        raise BadRequest(f"every must be a positive width like 30s, 5m, 1h or 1d, got {raw[:40]!r}")
    return timedelta(seconds=int(match[1]) * _UNITS[match[2]])


def _cursor(*parts: str) -> str:
    return base64.urlsafe_b64encode("\n".join(parts).encode()).decode()


def _uncursor(raw: str, count: int) -> list[str]:
    try:
        parts = base64.urlsafe_b64decode(raw.encode()).decode().split("\n")
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise BadRequest("bad page cursor; use the `next` link of the previous page") from exc
    if len(parts) != count:
        raise BadRequest("bad page cursor; use the `next` link of the previous page")
    return parts


def _shipment_id(request: web.Request) -> str:
    shipment_id = request.match_info["shipment_id"]
    if not ID_PATTERN.fullmatch(shipment_id):
        raise NotFound("no such shipment (ids are 1-64 of A-Z a-z 0-9 . _ -)")
    return shipment_id


def shipment_out(s: Shipment) -> ShipmentOut:
    return ShipmentOut(
        id=s.id,
        dewar_id=s.dewar_id,
        profile=s.profile,
        origin=s.origin,
        destination=s.destination,
        deliver_by=s.deliver_by,
        planned_departure=s.planned_departure,
        chain_of_identity=s.chain_of_identity,
        status=s.status,
        created_at=s.created_at,
        created_by=s.created_by,
        starts_at=s.starts_at,
        ends_at=s.ends_at,
    )


def event_out(e: CustodyEvent) -> EventOut:
    return EventOut(
        id=e.id,
        type=e.type,
        at=e.at,
        location=e.location,
        note=e.note,
        actor=e.actor,
        recorded_at=e.recorded_at,
    )


def reading_out(item: IncomingReading) -> ReadingOut:
    r = item.reading
    return ReadingOut(
        seq=r.seq,
        ts=r.ts,
        received_at=item.received_at,
        temp_c=r.temp_c,
        ln2_level_pct=r.ln2_level_pct,
        tilt_deg=r.tilt_deg,
        shock_g=r.shock_g,
        lid_open=r.lid_open,
        battery_pct=r.battery_pct,
        lat=r.lat,
        lon=r.lon,
        extra=r.extra,
    )


# Shipments -----------------------------------------------------------------------------------


@routes.get("/api/v1/shipments")
@requires(Permission.READ)
async def list_shipments(request: web.Request) -> web.Response:
    """Shipments, newest first; filter with `status`, page with `limit` and `next`."""
    raw_status = _text(request, "status")
    try:
        status = Status(raw_status) if raw_status is not None else None
    except ValueError as exc:
        raise BadRequest(f"status must be one of {', '.join(Status)}") from exc
    limit = _int(request, "limit", 50, low=1, high=500)
    before = None
    cursor = _text(request, "cursor")
    if cursor is not None:
        at, shipment_id = _uncursor(cursor, 2)
        try:
            before = (datetime.fromisoformat(at), shipment_id)
        except ValueError as exc:
            raise BadRequest("bad page cursor") from exc
    rows = await request.app[keys.STORE].shipments(status=status, limit=limit, before=before)
    next_link = None
    if len(rows) == limit:
        last = rows[-1]
        query = f"limit={limit}&cursor={_cursor(last.created_at.isoformat(), last.id)}"
        if status is not None:
            query += f"&status={status}"
        next_link = f"/api/v1/shipments?{query}"
    return reply(ShipmentPage([shipment_out(s) for s in rows], next_link))


@routes.post("/api/v1/shipments")
@requires(Permission.SHIPMENTS)
async def create_shipment(request: web.Request) -> web.Response:
    """Create a shipment for a dewar, with a product profile and origin/destination sites."""
    body = await decode_body(request, ShipmentIn)
    if body.origin == body.destination:
        raise BadRequest("origin and destination must be different sites")
    now = datetime.now(UTC)
    who = actor(request)
    shipment = Shipment(
        id=body.id or new_shipment_id(now),
        dewar_id=body.dewar_id,
        profile=body.profile,
        origin=body.origin,
        destination=body.destination,
        deliver_by=body.deliver_by,
        planned_departure=body.planned_departure,
        chain_of_identity=body.chain_of_identity,
        status=Status.CREATED,
        created_at=now,
        created_by=who.label,
        starts_at=now,
        ends_at=None,
    )
    created = await request.app[keys.STORE].create_shipment(shipment, who)
    request.app[keys.WATCH].shipments_changed()
    response = reply(shipment_out(created), status=201)
    response.headers["Location"] = f"/api/v1/shipments/{created.id}"
    return response


@routes.get("/api/v1/shipments/{shipment_id}")
@requires(Permission.READ)
async def get_shipment(request: web.Request) -> web.Response:
    """A shipment with its last reading, custody events, open alarms, hold forecast and route."""
    store = request.app[keys.STORE]
    shipment = await store.shipment(_shipment_id(request))
    last = await store.last_reading(shipment)
    events = await store.events(shipment.id)
    last_seen = None
    if last is not None:
        last_seen = (datetime.now(UTC) - last.received_at).total_seconds()
    open_alarms = await store.open_alarms(shipment.id)
    recent = await store.shipment_readings(
        shipment, (last.reading.ts - timedelta(hours=12)) if last else None, None, 2000
    )
    current = next(iter(await store.routes(shipment.id, limit=1)), None)
    detail = ShipmentDetail(
        shipment=shipment_out(shipment),
        last_reading=None if last is None else reading_out(last),
        last_seen_s=last_seen,
        events=[event_out(e) for e in events],
        open_alarms=[alarm_out(a) for a in open_alarms],
        hold=hold_forecast(shipment, recent),
        route=None if current is None else route_out(current),
        eta=None if current is None else current.eta,
    )
    return reply(detail)


def route_out(r: ShipmentRoute) -> ShipmentRouteOut:
    """A stored route: the plan as `/routes/plan` answers it, with who planned it and when."""
    return msgspec.convert(
        r.plan
        | {
            "id": r.id,
            "shipment_id": r.shipment_id,
            "from_site": r.from_site,
            "eta": r.eta,
            "planned_at": r.planned_at,
            "planned_by": r.planned_by,
            "request": r.request,
        },
        ShipmentRouteOut,
    )


@routes.post("/api/v1/shipments/{shipment_id}/route")
@requires(Permission.ROUTES)
async def plan_shipment_route(request: web.Request) -> web.Response:
    """Plan the shipment's route to its destination inside its deliver_by, from its origin or,
    to re-plan, from `from_site` (where it is now) without the cancelled `exclude_flights`; the
    best plan becomes its current route (earlier ones stay as history). 409 `no_feasible_route`
    with the planner's reason when nothing is feasible (nothing is stored), 409 `conflict` for
    a delivered or cancelled shipment."""
    shipment_id = _shipment_id(request)
    body = await decode_body(request, ShipmentRouteIn)
    store = request.app[keys.STORE]
    shipment = await store.shipment(shipment_id)
    if not shipment.status.active:
        raise Conflict(
            f"shipment {shipment.id} is {shipment.status}: its route can no longer change"
        )
    from_site = body.from_site or shipment.origin
    depart_at = body.depart_at or shipment.planned_departure or datetime.now(UTC)
    excluded = [FlightKey(f.carrier, f.flight, f.departs_at) for f in body.exclude_flights]
    try:
        plan_request = PlanRequest(
            origin=from_site,
            destination=shipment.destination,
            depart_at=depart_at.astimezone(UTC),
            hold_hours=body.hold_hours,
            deliver_by=shipment.deliver_by,
            objective=Objective(body.objective),
            max_handoffs=body.max_handoffs,
            recharge_hold_hours=body.recharge_hold_hours,
            exclude_flights=frozenset(excluded),
        )
        result = await request.app[keys.PLANNER].plan(plan_request)
    except PlanRequestError as exc:
        raise BadRequest(str(exc)) from exc
    best = result.best
    if best is None:
        reason = result.infeasible
        why = f" ({reason.constraint}): {reason.message}" if reason is not None else ""
        raise NoFeasibleRoute(
            f"no feasible route for shipment {shipment.id} from {from_site} to "
            f"{shipment.destination}{why}; nothing was stored"
        )
    answer = plan_result_to_dict(result)
    asked = answer["request"] | {
        "recharge_hold_hours": body.recharge_hold_hours,
        "exclude_flights": [
            {
                "carrier": key.carrier,
                "flight": key.flight,
                "departs_at": key.departs_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            }
            for key in excluded
        ],
    }
    stored = await store.add_route(
        shipment.id, from_site, best.delivered_at, answer["routes"][0], asked, actor(request)
    )
    request.app[keys.WATCH].shipments_changed()
    response = reply(route_out(stored), status=201)
    response.headers["Location"] = f"/api/v1/shipments/{shipment.id}/route"
    return response


@routes.get("/api/v1/shipments/{shipment_id}/route")
@requires(Permission.READ)
async def shipment_routes(request: web.Request) -> web.Response:
    """Every route planned for the shipment, newest (the current one) first."""
    store = request.app[keys.STORE]
    shipment = await store.shipment(_shipment_id(request))
    rows = await store.routes(shipment.id)
    return reply(ShipmentRouteList([route_out(r) for r in rows]))


def hold_forecast(shipment: Shipment, recent: list[IncomingReading]) -> HoldOut | None:
    """The LN2 forecast from the recent level since the last recharge (a jump up)."""
    points = [
        (i.reading.ts, i.reading.ln2_level_pct, i.reading.tilt_deg)
        for i in recent
        if i.reading.ln2_level_pct is not None
    ]
    for k in range(len(points) - 1, 0, -1):
        if (
            points[k][1] is not None
            and points[k - 1][1] is not None
            and (points[k][1] - points[k - 1][1] >= RECHARGE_JUMP_PCT)
        ):
            points = points[k:]
            break
    found = forecast([(ts, float(level), tilt) for ts, level, tilt in points if level is not None])
    if found is None:
        return None
    left = None
    if found.depletion_at is not None:
        left = (found.depletion_at - found.as_of).total_seconds() / 3600
    margin = None
    if found.depletion_at is not None and shipment.deliver_by is not None:
        margin = (found.depletion_at - shipment.deliver_by).total_seconds() / 3600
    return HoldOut(
        found.level_pct,
        found.loss_pct_per_h,
        found.depletion_at,
        found.earliest_at,
        left,
        margin,
        found.tipped,
    )


# Alarms --------------------------------------------------------------------------------------


@routes.get("/api/v1/alarms")
@requires(Permission.READ)
async def list_alarms(request: web.Request) -> web.Response:
    """Alarms, newest first; filter by `state`, `shipment_id`, `severity`."""
    raw_state = _text(request, "state")
    raw_severity = _text(request, "severity")
    try:
        state = AlarmState(raw_state) if raw_state is not None else None
        severity = Severity(raw_severity) if raw_severity is not None else None
    except ValueError as exc:
        raise BadRequest(
            "state must be open, acknowledged, cleared or closed; severity "
            "info, warning, major or critical"
        ) from exc
    limit = _int(request, "limit", 100, low=1, high=1000)
    before = _int(request, "before", 0, low=0, high=2**63 - 1) or None
    rows = await request.app[keys.STORE].alarms(
        state=state,
        shipment_id=_text(request, "shipment_id"),
        severity=severity,
        limit=limit,
        before=before,
    )
    next_link = None
    if rows and len(rows) == limit:
        next_link = f"{request.path}?{_requery(request, before=str(rows[-1].id))}"
    return reply(AlarmPage([alarm_out(a) for a in rows], next_link))


def _requery(request: web.Request, **changes: str) -> str:
    query = dict(request.query)
    query.update(changes)
    return "&".join(f"{quote(k)}={quote(v)}" for k, v in query.items())


def _alarm_id(request: web.Request) -> int:
    raw = request.match_info["alarm_id"]
    if not raw.isdigit() or len(raw) > 18:
        raise NotFound("no such alarm")
    return int(raw)


@routes.get("/api/v1/alarms/{alarm_id}")
@requires(Permission.READ)
async def get_alarm(request: web.Request) -> web.Response:
    """An alarm with every change (who, when, comment) and every notification's delivery."""
    store = request.app[keys.STORE]
    alarm, changes = await store.alarm(_alarm_id(request))
    deliveries = []
    now = datetime.now(UTC)
    for n, attempts in await store.delivery_log(alarm.id):
        last = attempts[-1] if attempts else None
        deliveries.append(
            DeliveryOut(
                id=n.id,
                channel=str(n.channel),
                recipient=n.recipient.name if n.recipient else None,
                state=_delivery_state(n, now),
                attempts=len(attempts),
                last_attempt_at=last.at if last else None,
                last_detail=last.detail if last else None,
            )
        )
    return reply(
        AlarmDetail(
            alarm_out(alarm),
            [alarm_change_out(c) for c in changes],
            deliveries,
        )
    )


def _delivery_state(n: Notification, now: datetime) -> str:
    """sent, failed (given up: the last attempt says why), retrying, held (by the recipient's
    quiet hours), superseded (held, and a later change of the alarm goes in its place), or
    pending (about to go)."""
    if n.status in ("sent", "failed", "superseded"):
        return n.status
    if n.attempts:
        return "retrying"
    held_until = (
        n.recipient.quiet_until_instant(Severity(n.body["severity"]), n.created_at)
        if n.recipient is not None
        else None
    )
    return "held" if held_until is not None and held_until > now else "pending"


@routes.post("/api/v1/alarms/{alarm_id}/ack")
@requires(Permission.ALARMS)
async def acknowledge_alarm(request: web.Request) -> web.Response:
    """Acknowledge an alarm: who (from the token), when, and a required comment."""
    alarm_id = _alarm_id(request)
    body = await decode_body(request, CommentIn)
    if not body.comment.strip():
        raise BadRequest("comment must say something")
    alarm = await request.app[keys.STORE].acknowledge_alarm(
        alarm_id, body.comment.strip(), actor(request)
    )
    _after_person_acted(request, alarm)
    return reply(alarm_out(alarm))


@routes.post("/api/v1/alarms/{alarm_id}/close")
@requires(Permission.ALARMS)
async def close_alarm(request: web.Request) -> web.Response:
    """Close an alarm whose condition has cleared (or a spent budget), with a comment."""
    alarm_id = _alarm_id(request)
    body = await decode_body(request, CommentIn)
    if not body.comment.strip():
        raise BadRequest("comment must say something")
    store = request.app[keys.STORE]
    current, _ = await store.alarm(alarm_id)
    shipment = await store.shipment(current.shipment_id)
    profile = await store.profile(shipment.profile)
    cumulative = profile is not None and any(
        limit.rule == current.rule and limit.budget_s is not None
        for limit in profile.profile.limits
    )
    alarm = await store.close_alarm(alarm_id, body.comment.strip(), actor(request), cumulative)
    _after_person_acted(request, alarm)
    return reply(alarm_out(alarm))


def _after_person_acted(request: web.Request, alarm: Alarm) -> None:
    request.app[keys.DISPATCHER].wake()
    request.app[keys.LIVE].publish("alarm", live_alarm(alarm))


# Recipients ----------------------------------------------------------------------------------


def recipient_out(r: Recipient) -> RecipientOut:
    return RecipientOut(
        r.id,
        r.name,
        str(r.channel),
        r.address,
        r.secret is not None,
        str(r.min_severity),
        r.site_id,
        r.shipment_id,
        r.tier,
        r.quiet_from,
        r.quiet_until,
        r.tz,
        r.active,
    )


@routes.get("/api/v1/recipients")
@requires(Permission.RECIPIENTS)
async def list_recipients(request: web.Request) -> web.Response:
    rows = await request.app[keys.STORE].recipients()
    return reply(RecipientList([recipient_out(r) for r in rows]))


@routes.post("/api/v1/recipients")
@requires(Permission.RECIPIENTS)
async def add_recipient(request: web.Request) -> web.Response:
    """Who hears about alarms: e-mail or webhook, by severity, site or shipment, and tier."""
    body = await decode_body(request, RecipientIn)
    try:
        ZoneInfo(body.tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise BadRequest(f"unknown time zone {body.tz!r}") from exc
    if (body.quiet_from is None) != (body.quiet_until is None):
        raise BadRequest("quiet_from and quiet_until come together")
    if body.channel == "webhook" and not body.address.startswith(("http://", "https://")):
        raise BadRequest("a webhook address is an http:// or https:// URL")
    if body.channel == "webhook" and body.secret is None:
        raise BadRequest(
            "a webhook needs a secret (16 to 200 characters): every delivery is signed with it "
            "(X-Coldchain-Signature), so the receiver can tell it came from coldchain"
        )
    if body.channel == "email" and "@" not in body.address:
        raise BadRequest("an e-mail address needs an @")
    added = await request.app[keys.STORE].add_recipient(
        Recipient(
            id=0,
            name=body.name,
            channel=Channel(body.channel),
            address=body.address,
            secret=body.secret,
            min_severity=Severity(body.min_severity),
            site_id=body.site_id,
            shipment_id=body.shipment_id,
            tier=body.tier,
            quiet_from=body.quiet_from,
            quiet_until=body.quiet_until,
            tz=body.tz,
            active=True,
        ),
        actor(request).label,
    )
    return reply(recipient_out(added), status=201)


@routes.delete("/api/v1/recipients/{recipient_id}")
@requires(Permission.RECIPIENTS)
async def remove_recipient(request: web.Request) -> web.Response:
    raw = request.match_info["recipient_id"]
    if not raw.isdigit() or len(raw) > 18:
        raise NotFound("no such recipient")
    await request.app[keys.STORE].remove_recipient(int(raw), actor(request).label)
    return web.Response(status=204)


@routes.get("/api/v1/live")
@requires(Permission.READ)
async def live(request: web.Request) -> web.StreamResponse:
    """WebSocket: readings and alarm changes as they happen (JSON text frames)."""
    return await request.app[keys.LIVE].serve(request)


@routes.post("/api/v1/shipments/{shipment_id}/events")
@requires(Permission.CUSTODY)
async def record_event(request: web.Request) -> web.Response:
    """Record a custody or status event; the actor comes from the token."""
    shipment_id = _shipment_id(request)
    body = await decode_body(request, EventIn)
    at = (body.at or datetime.now(UTC)).astimezone(UTC)
    shipment, event = await request.app[keys.STORE].record_event(
        shipment_id, body.type, at, body.location, body.note, actor(request)
    )
    request.app[keys.WATCH].shipments_changed()
    return reply(EventRecorded(event_out(event), shipment_out(shipment)), status=201)


@routes.get("/api/v1/shipments/{shipment_id}/telemetry")
@requires(Permission.READ)
async def telemetry(request: web.Request) -> web.Response:
    """Readings in [`from`, `to`) of device time, or with `every=5m` min/max/mean buckets."""
    store = request.app[keys.STORE]
    shipment = await store.shipment(_shipment_id(request))
    start, end = _instant(request, "from"), _instant(request, "to")
    if start is not None and end is not None and end <= start:
        raise BadRequest("`to` must be after `from`")
    every = _text(request, "every")
    lower = shipment.starts_at if start is None else max(start, shipment.starts_at)
    if every:
        step = _every(every)
        limit = _int(request, "limit", MAX_BUCKETS, low=1, high=MAX_BUCKETS)
        buckets = await store.shipment_buckets(shipment, start, end, step, limit + 1)
        out = [
            BucketOut(
                b.start,
                b.count,
                b.temp_min,
                b.temp_max,
                b.temp_mean,
                b.ln2_min,
                b.ln2_max,
                b.ln2_mean,
            )
            for b in buckets[:limit]
        ]
        return reply(
            TelemetryOut(
                shipment.id,
                shipment.dewar_id,
                lower,
                end,
                step.total_seconds(),
                buckets=out,
                truncated=len(buckets) > limit,
            )
        )
    limit = _int(request, "limit", MAX_READINGS, low=1, high=MAX_READINGS)
    readings = await store.shipment_readings(shipment, start, end, limit + 1)
    return reply(
        TelemetryOut(
            shipment.id,
            shipment.dewar_id,
            lower,
            end,
            None,
            readings=[reading_out(r) for r in readings[:limit]],
            truncated=len(readings) > limit,
        )
    )


@routes.get("/api/v1/shipments/{shipment_id}/report")
@requires(Permission.READ)
async def shipment_report(request: web.Request) -> web.Response:
    """The excursion report: `format=json` (default), `pdf`, or `csv` (every reading with the
    limits it passed). Built off the event loop."""
    # pandas and numpy (some 40 MiB) are loaded when the first report is asked for.
    from coldchain import report

    fmt = _text(request, "format") or "json"
    if fmt not in REPORT_FORMATS:
        raise BadRequest(f"format must be one of {', '.join(REPORT_FORMATS)}, got {fmt[:20]!r}")
    inputs = await report.gather(
        request.app[keys.STORE], _shipment_id(request), actor(request).name
    )
    rendered = await asyncio.to_thread(report.render, inputs, fmt)
    disposition = "inline" if fmt == "json" else "attachment"
    return web.Response(
        body=rendered.body,
        content_type=rendered.content_type,
        headers={"Content-Disposition": f'{disposition}; filename="{rendered.filename}"'},
    )


# Profiles and sites --------------------------------------------------------------------------


@routes.get("/api/v1/profiles")
@requires(Permission.READ)
async def list_profiles(request: web.Request) -> web.Response:
    rows = await request.app[keys.STORE].profiles()
    return reply(ProfileList([StoredProfileOut(p.profile, p.built_in, p.updated_at) for p in rows]))


@routes.put("/api/v1/profiles/{name}")
@requires(Permission.PROFILES)
async def put_profile(request: web.Request) -> web.Response:
    """Create or replace a product profile (admins)."""
    name = request.match_info["name"]
    profile = await decode_body(request, Profile)
    if profile.name != name:
        raise BadRequest(f"the body's name {profile.name!r} differs from the path's {name!r}")
    try:
        check(profile)
    except ValueError as exc:
        raise BadRequest(f"invalid profile: {exc}") from exc
    store = request.app[keys.STORE]
    created = await store.put_profile(profile, actor(request))
    stored = await store.profile(name)
    if stored is None:
        raise NotFound(f"no profile {name!r}")
    return reply(
        StoredProfileOut(stored.profile, stored.built_in, stored.updated_at),
        status=201 if created else 200,
    )


@routes.get("/api/v1/sites")
@requires(Permission.READ)
async def list_sites(request: web.Request) -> web.Response:
    """The route network's sites; filter with `kind`."""
    raw = _text(request, "kind")
    try:
        kind = SiteKind(raw) if raw is not None else None
    except ValueError as exc:
        raise BadRequest(f"kind must be one of {', '.join(SiteKind)}") from exc
    sites = await request.app[keys.STORE].sites(kind)
    return reply(
        SiteList(
            [
                SiteOut(
                    id=s.id,
                    name=s.name,
                    kind=str(s.kind),
                    lat=s.lat,
                    lon=s.lon,
                    tz=s.tz,
                    country=s.country,
                    iata=s.iata,
                    ln2_recharge=s.ln2_recharge,
                    customs_minutes=s.customs_minutes,
                    connect_minutes=s.connect_minutes,
                    recovery_minutes=s.recovery_minutes,
                    opens=s.hours.opens if s.hours else None,
                    closes=s.hours.closes if s.hours else None,
                )
                for s in sites
            ]
        )
    )


# Dead letters, audit, tokens -----------------------------------------------------------------


def _dead_letter_out(d: StoredDeadLetter) -> DeadLetterOut:
    try:
        text: str | None = d.payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return DeadLetterOut(
        id=d.id,
        received_at=d.received_at,
        topic=d.topic,
        dewar_id=d.dewar_id,
        item_index=d.item_index,
        reason=d.reason,
        size=len(d.payload),
        payload=text,
        payload_base64=base64.b64encode(d.payload).decode() if text is None else None,
    )


@routes.get("/api/v1/dead-letters")
@requires(Permission.READ)
async def dead_letters(request: web.Request) -> web.Response:
    """Rejected messages with their reasons, newest first; `before` pages back by id."""
    limit = _int(request, "limit", 100, low=1, high=1000)
    before = _int(request, "before", 0, low=0, high=2**63 - 1) or None
    dewar_id = _text(request, "dewar_id")
    rows = await request.app[keys.STORE].dead_letters(
        limit=limit, before_id=before, dewar_id=dewar_id
    )
    next_link = None
    if rows and len(rows) == limit:
        next_link = f"/api/v1/dead-letters?limit={limit}&before={rows[-1].id}"
    return reply(DeadLetterPage([_dead_letter_out(d) for d in rows], next_link))


@routes.get("/api/v1/lanes/stats")
@requires(Permission.READ)
async def lanes_stats(request: web.Request) -> web.Response:
    """On-time rate, excursion rate, transit time and hold margin at delivery per lane, over the
    shipments delivered in [`from`, `to`) (default: the 90 days to now; see coldchain.lanes)."""
    since, until = lanes.period(_instant(request, "from"), _instant(request, "to"))
    delivered = await request.app[keys.STORE].delivered_shipments(since, until)
    return reply(lanes.summarise(delivered, since, until))


@routes.get("/api/v1/audit")
@requires(Permission.AUDIT)
async def audit(request: web.Request) -> web.Response:
    """The append-only audit trail, newest first (admins)."""
    limit = _int(request, "limit", 100, low=1, high=1000)
    before = _int(request, "before", 0, low=0, high=2**63 - 1) or None
    rows = await request.app[keys.STORE].audit_entries(
        entity=_text(request, "entity"),
        entity_id=_text(request, "entity_id"),
        limit=limit,
        before=before,
    )
    next_link = None
    if rows and len(rows) == limit:
        next_link = f"/api/v1/audit?limit={limit}&before={rows[-1].id}"
    return reply(
        AuditPage(
            [
                AuditOut(a.id, a.at, a.actor, a.action, a.entity, a.entity_id, a.detail)
                for a in rows
            ],
            next_link,
        )
    )


@routes.get("/api/v1/tokens")
@requires(Permission.TOKENS)
async def list_tokens(request: web.Request) -> web.Response:
    rows = await request.app[keys.STORE].tokens()
    return reply(
        TokenList(
            [TokenOut(t.id, t.name, t.role, t.created_at, t.expires_at, t.revoked_at) for t in rows]
        )
    )


@routes.post("/api/v1/tokens")
@requires(Permission.TOKENS)
async def create_token(request: web.Request) -> web.Response:
    """Make a token; the response is the only time it is shown."""
    body = await decode_body(request, TokenIn)
    expires = None
    if body.expires_in_days is not None:
        expires = datetime.now(UTC) + timedelta(days=body.expires_in_days)
    token = new_token()
    token_id = await request.app[keys.STORE].create_token(
        body.name, body.role, token_hash(token), expires, actor(request).label
    )
    return reply(TokenCreated(token_id, token, body.name, body.role, expires), status=201)


@routes.delete("/api/v1/tokens/{token_id}")
@requires(Permission.TOKENS)
async def revoke_token(request: web.Request) -> web.Response:
    raw = request.match_info["token_id"]
    if not raw.isdigit() or len(raw) > 18:
        raise NotFound("no such token")
    await request.app[keys.STORE].revoke_token(int(raw), actor(request).label)
    return web.Response(status=204)


def public(handler: Handler) -> bool:
    """True for handlers that need no token (health, metrics, the API document, static files)."""
    return getattr(handler, PERMISSION_ATTRIBUTE, None) is None


def permission_of(handler: Any) -> Permission | None:
    found: Permission | None = getattr(handler, PERMISSION_ATTRIBUTE, None)
    return found


# Routes --------------------------------------------------------------------------------------


@routes.post("/api/v1/routes/plan")
@requires(Permission.ROUTES)
async def plan_route(request: web.Request) -> web.Response:
    """Plan routes: earliest arrival, or safest/cheapest, with k alternatives, inside the hold
    time and the delivery window; or the reason none is feasible and what would be needed."""
    body = await decode_body(request, RoutePlanIn)
    fields = {k: v for k, v in msgspec.to_builtins(body).items() if v is not None}
    try:
        plan_request = plan_request_from_dict(fields)
        result = await request.app[keys.PLANNER].plan(plan_request)
    except PlanRequestError as exc:
        raise BadRequest(str(exc)) from exc
    return reply(msgspec.convert(plan_result_to_dict(result), RoutePlanOut))


@routes.get("/api/v1/me")
@requires(Permission.READ)
async def me(request: web.Request) -> web.Response:
    """The caller's token name, role and permissions."""
    who = actor(request)
    return reply(MeOut(who.name, who.role, sorted(str(p) for p in ROLE_PERMISSIONS[who.role])))
