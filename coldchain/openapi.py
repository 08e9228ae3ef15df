"""The OpenAPI 3.1 document of the HTTP API, served at /api/v1/openapi.json.

Schemas come from the same msgspec types the handlers decode and encode (`coldchain.schemas`),
and each operation below names its handler, so a test can check that every route of the
application is documented and every documented operation exists.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
from aiohttp import web

from coldchain import api, schemas
from coldchain.profiles import Profile

routes = web.RouteTableDef()


@dataclass(frozen=True)
class Param:
    name: str
    where: str  # "query" or "path"
    schema: dict[str, Any]
    description: str = ""
    required: bool = False


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    handler: api.Handler
    summary: str
    response: type | None
    status: int = 200
    body: type | None = None
    params: tuple[Param, ...] = ()
    errors: tuple[int, ...] = field(default=(400, 401, 403, 429))
    media: tuple[str, ...] = ()  # other media types the success response may have


_ID = {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"}
_TIME = {"type": "string", "format": "date-time"}
_LIMIT = Param("limit", "query", {"type": "integer", "minimum": 1}, "page size")
SHIPMENT_ID = Param("shipment_id", "path", _ID, "shipment id", required=True)
ALARM_ID = Param("alarm_id", "path", {"type": "string", "pattern": "^[0-9]{1,18}$"}, required=True)

OPERATIONS: Final[tuple[Operation, ...]] = (
    Operation(
        "get",
        "/api/v1/shipments",
        api.list_shipments,
        "List shipments, newest first",
        schemas.ShipmentPage,
        params=(
            Param(
                "status",
                "query",
                {
                    "type": "string",
                    "enum": [
                        "created",
                        "packed",
                        "in_transit",
                        "customs_hold",
                        "delivered",
                        "cancelled",
                    ],
                },
            ),
            Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 500}),
            Param("cursor", "query", {"type": "string"}, "the `next` link's cursor"),
        ),
    ),
    Operation(
        "post",
        "/api/v1/shipments",
        api.create_shipment,
        "Create a shipment",
        schemas.ShipmentOut,
        201,
        schemas.ShipmentIn,
        errors=(400, 401, 403, 409, 415, 429),
    ),
    Operation(
        "get",
        "/api/v1/shipments/{shipment_id}",
        api.get_shipment,
        "A shipment with its last reading, events, alarms, hold forecast and route",
        schemas.ShipmentDetail,
        params=(SHIPMENT_ID,),
        errors=(401, 403, 404, 429),
    ),
    Operation(
        "post",
        "/api/v1/shipments/{shipment_id}/events",
        api.record_event,
        "Record a custody or status event",
        schemas.EventRecorded,
        201,
        schemas.EventIn,
        (SHIPMENT_ID,),
        (400, 401, 403, 404, 409, 415, 429),
    ),
    Operation(
        "post",
        "/api/v1/shipments/{shipment_id}/route",
        api.plan_shipment_route,
        "Plan or re-plan the shipment's route (from where it is now, without cancelled "
        "flights); the best plan becomes its current route. 409 `no_feasible_route` says why "
        "none is feasible, and nothing is stored",
        schemas.ShipmentRouteOut,
        201,
        schemas.ShipmentRouteIn,
        (SHIPMENT_ID,),
        (400, 401, 403, 404, 409, 415, 429),
    ),
    Operation(
        "get",
        "/api/v1/shipments/{shipment_id}/route",
        api.shipment_routes,
        "The shipment's planned routes, newest (the current one) first",
        schemas.ShipmentRouteList,
        params=(SHIPMENT_ID,),
        errors=(401, 403, 404, 429),
    ),
    Operation(
        "get",
        "/api/v1/shipments/{shipment_id}/telemetry",
        api.telemetry,
        "Readings of the shipment in a window, or min/max/mean buckets",
        schemas.TelemetryOut,
        params=(
            SHIPMENT_ID,
            Param("from", "query", _TIME),
            Param("to", "query", _TIME),
            Param(
                "every",
                "query",
                {"type": "string", "pattern": "^[1-9][0-9]{0,5}[smhd]$"},
                "bucket width, e.g. 5m",
            ),
            Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 10000}),
        ),
        errors=(400, 401, 403, 404, 429),
    ),
    Operation(
        "get",
        "/api/v1/shipments/{shipment_id}/report",
        api.shipment_report,
        "Excursion report: time in range, limits, MKT, alarm and custody logs (JSON, CSV, PDF)",
        schemas.ReportOut,
        params=(
            SHIPMENT_ID,
            Param(
                "format",
                "query",
                {"type": "string", "enum": ["json", "csv", "pdf"]},
                "json (default), pdf, or csv: every reading with the limits it passed",
            ),
        ),
        errors=(400, 401, 403, 404, 429),
        media=("text/csv", "application/pdf"),
    ),
    Operation(
        "get",
        "/api/v1/profiles",
        api.list_profiles,
        "Product profiles and their limits",
        schemas.ProfileList,
    ),
    Operation(
        "put",
        "/api/v1/profiles/{name}",
        api.put_profile,
        "Create or replace a product profile",
        schemas.StoredProfileOut,
        200,
        Profile,
        (Param("name", "path", {"type": "string"}, required=True),),
        (400, 401, 403, 404, 415, 429),
    ),
    Operation(
        "get",
        "/api/v1/sites",
        api.list_sites,
        "The route network's sites",
        schemas.SiteList,
        params=(
            Param(
                "kind",
                "query",
                {
                    "type": "string",
                    "enum": ["manufacturing", "treatment_center", "airport", "depot"],
                },
            ),
        ),
    ),
    Operation(
        "get",
        "/api/v1/dead-letters",
        api.dead_letters,
        "Rejected messages with reasons",
        schemas.DeadLetterPage,
        params=(
            Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000}),
            Param("before", "query", {"type": "integer", "minimum": 0}),
            Param("dewar_id", "query", {"type": "string"}),
        ),
    ),
    Operation(
        "get",
        "/api/v1/lanes/stats",
        api.lanes_stats,
        "Per lane: on-time rate, excursion rate, transit time, hold margin at delivery",
        schemas.LaneStatsPage,
        params=(
            Param("from", "query", _TIME, "start of the period (default: 90 days before `to`)"),
            Param("to", "query", _TIME, "end of the period, exclusive (default: now)"),
        ),
    ),
    Operation(
        "get",
        "/api/v1/audit",
        api.audit,
        "The append-only audit trail (admins)",
        schemas.AuditPage,
        params=(
            Param("entity", "query", {"type": "string"}),
            Param("entity_id", "query", {"type": "string"}),
            Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000}),
            Param("before", "query", {"type": "integer", "minimum": 0}),
        ),
    ),
    Operation(
        "get",
        "/api/v1/alarms",
        api.list_alarms,
        "Alarms, newest first",
        schemas.AlarmPage,
        params=(
            Param(
                "state",
                "query",
                {"type": "string", "enum": ["open", "acknowledged", "cleared", "closed"]},
            ),
            Param(
                "severity",
                "query",
                {"type": "string", "enum": ["info", "warning", "major", "critical"]},
            ),
            Param("shipment_id", "query", {"type": "string", "minLength": 1}),
            Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 1000}),
            Param("before", "query", {"type": "integer", "minimum": 0}),
        ),
    ),
    Operation(
        "get",
        "/api/v1/alarms/{alarm_id}",
        api.get_alarm,
        "An alarm with its changes and deliveries",
        schemas.AlarmDetail,
        params=(ALARM_ID,),
        errors=(401, 403, 404, 429),
    ),
    Operation(
        "post",
        "/api/v1/alarms/{alarm_id}/ack",
        api.acknowledge_alarm,
        "Acknowledge an alarm (comment required)",
        schemas.AlarmOut,
        200,
        schemas.CommentIn,
        (ALARM_ID,),
        (400, 401, 403, 404, 409, 415, 429),
    ),
    Operation(
        "post",
        "/api/v1/alarms/{alarm_id}/close",
        api.close_alarm,
        "Close an alarm (comment required)",
        schemas.AlarmOut,
        200,
        schemas.CommentIn,
        (ALARM_ID,),
        (400, 401, 403, 404, 409, 415, 429),
    ),
    Operation(
        "get",
        "/api/v1/recipients",
        api.list_recipients,
        "Alarm recipients (admins)",
        schemas.RecipientList,
    ),
    Operation(
        "post",
        "/api/v1/recipients",
        api.add_recipient,
        "Add an alarm recipient",
        schemas.RecipientOut,
        201,
        schemas.RecipientIn,
        errors=(400, 401, 403, 415, 429),
    ),
    Operation(
        "delete",
        "/api/v1/recipients/{recipient_id}",
        api.remove_recipient,
        "Remove an alarm recipient",
        None,
        204,
        params=(Param("recipient_id", "path", {"type": "string"}, required=True),),
        errors=(401, 403, 404, 429),
    ),
    Operation(
        "get",
        "/api/v1/live",
        api.live,
        "WebSocket stream of readings and alarm changes ({type, data} JSON frames); "
        "browsers may pass the token as ?token=",
        None,
        101,
        params=(Param("token", "query", {"type": "string"}, "token, for browsers"),),
        errors=(400, 401, 403, 429),
    ),
    Operation(
        "post",
        "/api/v1/routes/plan",
        api.plan_route,
        "Plan routes inside the hold time and delivery window",
        schemas.RoutePlanOut,
        200,
        schemas.RoutePlanIn,
        errors=(400, 401, 403, 415, 429),
    ),
    Operation(
        "get",
        "/api/v1/me",
        api.me,
        "The caller: token name, role and permissions",
        schemas.MeOut,
        errors=(401, 403, 429),
    ),
    Operation("get", "/api/v1/tokens", api.list_tokens, "API tokens (admins)", schemas.TokenList),
    Operation(
        "post",
        "/api/v1/tokens",
        api.create_token,
        "Make a token; shown only once",
        schemas.TokenCreated,
        201,
        schemas.TokenIn,
        errors=(400, 401, 403, 415, 429),
    ),
    Operation(
        "delete",
        "/api/v1/tokens/{token_id}",
        api.revoke_token,
        "Revoke a token",
        None,
        204,
        params=(Param("token_id", "path", {"type": "string"}, required=True),),
        errors=(401, 403, 404, 429),
    ),
)

PUBLIC_PATHS: Final = {
    "/healthz": ("Liveness: the process answers", schemas.Health, (200,)),
    "/readyz": (
        "Readiness: PostgreSQL and the broker are reachable",
        schemas.Readiness,
        (200, 503),
    ),
}


def _models() -> list[type]:
    found: list[type] = [schemas.ErrorBody]
    for op in OPERATIONS:
        found += [t for t in (op.response, op.body) if t is not None]
    found += [spec[1] for spec in PUBLIC_PATHS.values()]
    return list(dict.fromkeys(found))


def _ref(kind: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{kind.__name__}"}


def _json(kind: type) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(kind)}}


_REASONS: Final = {
    400: "Bad request",
    401: "No valid token",
    403: "The role may not do this",
    404: "Not found",
    409: "Conflicts with the current state",
    413: "Body too large",
    415: "Not JSON",
    429: "Too many failed sign-ins",
    503: "Not ready",
}


def document() -> dict[str, Any]:
    models = _models()
    _, components = msgspec.json.schema_components(
        models, ref_template="#/components/schemas/{name}"
    )
    paths: dict[str, dict[str, Any]] = {}
    for path, (summary, model, statuses) in PUBLIC_PATHS.items():
        paths[path] = {
            "get": {
                "summary": summary,
                "operationId": path.strip("/"),
                "security": [],
                "responses": {
                    str(s): {
                        "description": "OK" if s == 200 else _REASONS[s],
                        "content": _json(model),
                    }
                    for s in statuses
                },
            }
        }
    paths["/metrics"] = {
        "get": {
            "summary": "Prometheus metrics",
            "operationId": "metrics",
            "security": [],
            "responses": {
                "200": {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        }
    }
    for op in OPERATIONS:
        responses: dict[str, Any] = {
            str(op.status): {"description": "OK"}
            if op.response is None
            else {"description": "OK", "content": _json(op.response)}
        }
        for media in op.media:
            schema = {"type": "string", "contentMediaType": media}
            responses[str(op.status)].setdefault("content", {})[media] = {"schema": schema}
        for status in op.errors:
            responses[str(status)] = {
                "description": _REASONS[status],
                "content": _json(schemas.ErrorBody),
            }
        operation: dict[str, Any] = {
            "summary": op.summary,
            "operationId": op.handler.__name__,
            "description": f"Needs the `{api.permission_of(op.handler)}` permission.",
            "parameters": [
                {
                    "name": p.name,
                    "in": p.where,
                    "required": p.required or p.where == "path",
                    "schema": p.schema,
                    **({"description": p.description} if p.description else {}),
                }
                for p in op.params
            ],
            "responses": responses,
        }
        if op.body is not None:
            operation["requestBody"] = {"required": True, "content": _json(op.body)}
        paths.setdefault(op.path, {})[op.method] = operation
    spec = {
        "openapi": "3.1.0",
        "info": {
            "title": "coldchain",
            "version": "1",
            "description": "Telemetry, shipments and routes for cryogenic cell-therapy "
            'shipments. Errors: {"error": {"code", "message"}}.',
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": paths,
    }
    # As served: plain JSON types (msgspec writes tuple defaults as Python tuples).
    decoded: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(spec))
    return decoded


@functools.cache
def _encoded() -> bytes:
    return msgspec.json.encode(document())


@routes.get("/api/v1/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 description of this API."""
    return web.Response(body=_encoded(), content_type="application/json")
