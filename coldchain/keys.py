"""Typed keys for everything the application holds; the one place app state is declared."""

from __future__ import annotations

from aiohttp import web

from coldchain.auth import Actor, FailureLimiter
from coldchain.broker import BrokerLink
from coldchain.ingest import Ingest
from coldchain.metrics import Registry
from coldchain.settings import Settings
from coldchain.store import Store

SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Registry)
STORE = web.AppKey("store", Store)
INGEST = web.AppKey("ingest", Ingest)
BROKER = web.AppKey("broker", BrokerLink)
AUTH_FAILURES = web.AppKey("auth_failures", FailureLimiter)

# Per request: who is calling (set by the auth middleware on every authenticated request).
ACTOR = web.RequestKey("actor", Actor)
