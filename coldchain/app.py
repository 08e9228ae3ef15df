"""The application factory. `create_app` does no I/O; every long-lived resource is a cleanup
context that starts, yields, and stops, so cleanup runs only for what started."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Final

from aiohttp import web

from coldchain import api, health, keys, openapi
from coldchain.alarms import Alarm
from coldchain.auth import FailureLimiter, Proxies
from coldchain.broker import BrokerLink
from coldchain.errors import StoreUnavailable
from coldchain.ingest import Ingest
from coldchain.live import LiveHub
from coldchain.metrics import Registry
from coldchain.middleware import authenticate, errors
from coldchain.notify import Dispatcher
from coldchain.planning import Planner
from coldchain.settings import Settings
from coldchain.store import IncomingReading, Store
from coldchain.watch import Watch, live_alarm
from sensors import STATUS_FILTER, TELEMETRY_FILTER, shared

logger = logging.getLogger(__name__)

_MAX_BODY = 1024 * 1024


def create_app(settings: Settings) -> web.Application:
    app = web.Application(middlewares=[errors, authenticate], client_max_size=_MAX_BODY)
    app[keys.SETTINGS] = settings
    app[keys.METRICS] = Registry()
    app[keys.AUTH_FAILURES] = FailureLimiter()
    app[keys.PROXIES] = Proxies(settings.trusted_proxies)
    app[keys.LIVE] = LiveHub(app[keys.METRICS])
    app[keys.MIGRATED] = asyncio.Event()
    app.add_routes(health.routes)
    app.add_routes(api.routes)
    app.add_routes(openapi.routes)
    _serve_dashboard(app, settings)
    app.cleanup_ctx.append(_loop_lag)
    app.cleanup_ctx.append(_store)
    app.cleanup_ctx.append(_ingest)
    app.cleanup_ctx.append(_alerting)
    return app


def supervise(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """Start a background worker whose crash is logged, never silent."""
    task = asyncio.create_task(coro, name=name)
    task.add_done_callback(_log_crash)
    return task


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("background task %s crashed", task.get_name(), exc_info=task.exception())


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise


async def _store(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    store = await Store.open(settings.database_url, max_size=settings.db_pool_size)
    app[keys.STORE] = store
    app[keys.PLANNER] = Planner(store)
    yield
    await store.close()


async def migrate_when_reachable(store: Store, backoff_cap_s: float) -> None:
    """Apply migrations, waiting for PostgreSQL with capped backoff if it is down."""
    delay = 0.25
    while True:
        try:
            await store.migrate()
        except StoreUnavailable as exc:
            logger.warning(
                "PostgreSQL not reachable for migrations (%s); retrying in %.1f s", exc, delay
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, backoff_cap_s)
        else:
            return


async def _ingest(app: web.Application) -> AsyncIterator[None]:
    settings = app[keys.SETTINGS]
    store = app[keys.STORE]
    ingest = Ingest(
        store,
        app[keys.METRICS],
        batch_size=settings.batch_size,
        flush_interval_s=settings.flush_interval_s,
        backoff_cap_s=settings.backoff_cap_s,
        max_outstanding=settings.mqtt_receive_maximum,
        writers=settings.ingest_writers,
    )
    topics = [TELEMETRY_FILTER, STATUS_FILTER]
    if settings.mqtt_shared_group:
        topics = [shared(t, settings.mqtt_shared_group) for t in topics]
        logger.warning(
            "sharing telemetry with the other instances of group %r: every reading is stored "
            "once, but this instance's rules see only the readings it takes, so alarms are "
            "evaluated on part of each dewar's stream (see README, Deployment)",
            settings.mqtt_shared_group,
        )
    broker = BrokerLink(
        settings.mqtt,
        client_id=settings.mqtt_client_id,
        subscriptions=topics,
        handler=ingest.handle_many,
        receive_maximum=settings.mqtt_receive_maximum,
        session_expiry_s=settings.mqtt_session_expiry_s,
        backoff_cap_s=settings.backoff_cap_s,
    )
    ingest.attach(broker)
    app[keys.INGEST] = ingest
    app[keys.BROKER] = broker

    async def run() -> None:
        await migrate_when_reachable(store, settings.backoff_cap_s)
        app[keys.MIGRATED].set()
        await asyncio.gather(broker.run(), ingest.run_writer())

    task = supervise(run(), "ingest")
    yield
    # Close the link first: no acknowledgement can leave after this. Messages not yet committed
    # stay with the broker's session and come again on the next start.
    await broker.close()
    await stop(task)
    ingest.abandon()


def run(settings: Settings, *, print_fn: Callable[..., None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM; aiohttp owns the signals and the graceful shutdown."""
    tune_gc()
    web.run_app(
        create_app(settings),
        host=settings.http_host,
        port=settings.http_port,
        print=print_fn,
        access_log=None,
        shutdown_timeout=10,
    )


def _reading_event(item: IncomingReading) -> dict[str, object]:
    r = item.reading
    return {
        "dewar_id": item.dewar_id,
        "seq": r.seq,
        "ts": r.ts,
        "temp_c": r.temp_c,
        "ln2_level_pct": r.ln2_level_pct,
        "tilt_deg": r.tilt_deg,
        "shock_g": r.shock_g,
        "lid_open": r.lid_open,
        "battery_pct": r.battery_pct,
        "lat": r.lat,
        "lon": r.lon,
    }


#: How often the event loop's lag is sampled.
LOOP_TICK_S: Final = 0.05

#: The cyclic garbage collector's thresholds for a serving process (Python's are 700, 10, 10).
#: Nearly everything the ingest allocates is freed by reference counting at once, but the
#: default first threshold still ran a collection every few dozen readings, and every tenth of
#: a tenth of those a full one over the rule states of every shipment: measured under
#: `bench/alert_latency.py`'s load, 4,150 collections and 31 full ones of 57 ms each in 20 s, each
#: a stop of the one event loop. At 50,000 the same load ran one.
GC_THRESHOLDS: Final = (50_000, 20, 100)


def tune_gc() -> None:
    """Set `GC_THRESHOLDS` for this process (the service's own, not a test's)."""
    gc.set_threshold(*GC_THRESHOLDS)


async def _loop_lag(app: web.Application) -> AsyncIterator[None]:
    """Sample how late the event loop runs a timer: the wait that every callback, database
    reply and alarm step has on top of its own work. Under load this, more than any one stage,
    is where alert latency goes (`docs/alarms.md`). And time the garbage collector's pauses,
    which stop the loop."""
    buckets = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
    metrics = app[keys.METRICS]
    lag = metrics.histogram(
        "coldchain_event_loop_lag_seconds",
        f"How late the event loop ran a timer due every {LOOP_TICK_S * 1000:.0f} ms",
        buckets,
    )
    pauses = metrics.histogram(
        "coldchain_gc_pause_seconds", "Pauses of the cyclic garbage collector", buckets
    )
    began = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            pauses.observe(time.perf_counter() - began[0])

    gc.callbacks.append(timed)

    async def sample() -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + LOOP_TICK_S
            await asyncio.sleep(LOOP_TICK_S)
            lag.observe(max(0.0, loop.time() - due))

    task = supervise(sample(), "event loop lag")
    yield
    gc.callbacks.remove(timed)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _alerting(app: web.Application) -> AsyncIterator[None]:
    """The rules, the notification dispatcher and the live stream's feed."""
    store, live = app[keys.STORE], app[keys.LIVE]
    dispatcher = Dispatcher(
        store, app[keys.BROKER], app[keys.METRICS], smtp_url=app[keys.SETTINGS].smtp_url
    )

    def changed(alarms: list[Alarm]) -> None:
        # The watch wakes the dispatcher for outbox rows it did not hand over (`Outbox`).
        for alarm in alarms:
            live.publish("alarm", live_alarm(alarm))

    settings = app[keys.SETTINGS]
    store.remind_scale = settings.remind_scale
    ingest = app[keys.INGEST]
    watch = Watch(
        store,
        app[keys.METRICS],
        on_change=changed,
        beat_s=settings.rules_beat_s,
        source=ingest,
        outbox=dispatcher,
    )
    migrated = app[keys.MIGRATED]

    async def after_migrations(work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        await migrated.wait()
        await work()

    async def committed(readings: list[IncomingReading]) -> None:
        if live.clients:
            live.publish("readings", [_reading_event(r) for r in readings])

    # The rules judge readings as they arrive; the live stream shows them once stored.
    ingest.feed_arrivals(watch)
    ingest.after_commit(committed)
    app[keys.WATCH] = watch
    app[keys.DISPATCHER] = dispatcher
    tasks = [
        supervise(after_migrations(watch.run), "rules"),
        supervise(after_migrations(dispatcher.run), "notifications"),
    ]
    yield
    for task in tasks:
        await stop(task)
    await watch.flush()


def _serve_dashboard(app: web.Application, settings: Settings) -> None:
    """The operator dashboard's static files (dashboards/web), public; the page signs in with a
    token and calls the API. Absent files (an install without the dashboard) serve nothing."""
    root = settings.dashboard_dir
    if root is None or not (root / "index.html").is_file():
        return

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(
            root / "index.html",
            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )

    app.router.add_get("/", index)
    app.router.add_static("/ui/", root, show_index=False, follow_symlinks=False)
