"""Liveness, readiness and metrics: the unauthenticated endpoints an orchestrator scrapes."""

from __future__ import annotations

import asyncio

from aiohttp import web

from coldchain import keys
from coldchain.errors import StoreUnavailable

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """The process is up and its event loop answers."""
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Ready only while both PostgreSQL and the MQTT broker are reachable, and the ingest is
    committing: a load balancer or operator can trust a 200 here."""
    app = request.app
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(app[keys.STORE].ping(), timeout=2)
    except (StoreUnavailable, TimeoutError) as exc:
        checks["database"] = f"unavailable: {exc}" if str(exc) else "unavailable: timed out"
    else:
        # PostgreSQL answers, but may still refuse writes (read-only, disk full...).
        problem = app[keys.INGEST].store_problem
        checks["database"] = (
            "ok" if problem is None else f"unavailable: last write failed: {problem}"
        )
    checks["mqtt"] = "ok" if app[keys.BROKER].connected else "unavailable: not connected"
    ready = all(value == "ok" for value in checks.values())
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[keys.METRICS].render().encode(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )
