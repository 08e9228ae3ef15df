"""Typed keys for everything the application holds; the one place app state is declared."""

from __future__ import annotations

import asyncio

from aiohttp import web

from coldchain.auth import Actor, FailureLimiter, Proxies
from coldchain.broker import BrokerLink
from coldchain.ingest import Ingest
from coldchain.live import LiveHub
from coldchain.metrics import Registry
from coldchain.notify import Dispatcher
from coldchain.planning import Planner
from coldchain.settings import Settings
from coldchain.store import Store
from coldchain.watch import Watch

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Registry)
STORE = web.AppKey("store", Store)
INGEST = web.AppKey("ingest", Ingest)
BROKER = web.AppKey("broker", BrokerLink)
AUTH_FAILURES = web.AppKey("auth_failures", FailureLimiter)
PROXIES = web.AppKey("proxies", Proxies)
LIVE = web.AppKey("live", LiveHub)
# Set once the database schema is current; everything that queries waits for it.
MIGRATED = web.AppKey("migrated", asyncio.Event)
WATCH = web.AppKey("watch", Watch)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
PLANNER = web.AppKey("planner", Planner)

# Per request: who is calling (set by the auth middleware on every authenticated request).
ACTOR = web.RequestKey("actor", Actor)
