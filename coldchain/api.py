"""The HTTP API under /api/v1 (CONTRACT.md section 3): thin handlers over the store."""

from __future__ import annotations

import base64

from aiohttp import web

from coldchain import keys
from coldchain.errors import BadRequest
from coldchain.store import StoredDeadLetter

routes = web.RouteTableDef()


def _int_param(
    request: web.Request, name: str, default: int | None, *, low: int, high: int
) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise BadRequest(f"query parameter {name} must be an integer, got {raw[:40]!r}") from exc
    if not low <= value <= high:
        raise BadRequest(f"query parameter {name} must be between {low} and {high}, got {value}")
    return value


def _dead_letter_json(d: StoredDeadLetter) -> dict[str, object]:
    try:
        text: str | None = d.payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {
        "id": d.id,
        "received_at": d.received_at.isoformat(),
        "topic": d.topic,
        "dewar_id": d.dewar_id,
        "item_index": d.item_index,
        "reason": d.reason,
        "size": len(d.payload),
        "payload": text,
        "payload_base64": base64.b64encode(d.payload).decode() if text is None else None,
    }


@routes.get("/api/v1/dead-letters")
async def dead_letters(request: web.Request) -> web.Response:
    """Rejected messages with their reasons, newest first; `before` pages back by id."""
    limit = _int_param(request, "limit", 100, low=1, high=1000)
    before = _int_param(request, "before", None, low=1, high=2**63 - 1)
    dewar_id = request.query.get("dewar_id") or None
    rows = await request.app[keys.STORE].dead_letters(
        limit=limit or 100, before_id=before, dewar_id=dewar_id
    )
    body: dict[str, object] = {"items": [_dead_letter_json(d) for d in rows]}
    if rows and len(rows) == limit:
        body["next"] = f"/api/v1/dead-letters?limit={limit}&before={rows[-1].id}"
    return web.json_response(body)
