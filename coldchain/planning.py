"""Route planning inside the service: the route network from PostgreSQL, its search index
built once per network version (in a thread), and plans computed off the event loop."""

from __future__ import annotations

import asyncio
import gc
import logging
import time

from coldchain.store import Store
from routing import Flight, Lane, Network, PlanRequest, PlanResult, RouteIndex, Site, plan

logger = logging.getLogger(__name__)


class Planner:
    """Answers plan requests against the current network version."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._version = -1
        self._index: RouteIndex | None = None
        self._lock = asyncio.Lock()

    async def index(self) -> RouteIndex:
        """The index of the current network version, rebuilt when an import changed it."""
        version = await self._store.network_version()
        async with self._lock:
            if self._index is None or version != self._version:
                version, sites, lanes, flights = await self._store.network()
                started = time.perf_counter()
                self._index = await asyncio.to_thread(_build, sites, lanes, flights)
                self._version = version
                logger.info(
                    "route index for network version %d built in %.2f s (%d sites, %d flights)",
                    version,
                    time.perf_counter() - started,
                    len(sites),
                    len(flights),
                )
            return self._index

    async def plan(self, request: PlanRequest) -> PlanResult:
        index = await self.index()
        return await asyncio.to_thread(plan, index, request)


def _build(sites: list[Site], lanes: list[Lane], flights: list[Flight]) -> RouteIndex:
    index = RouteIndex(Network.build(sites, lanes, flights))
    # Millions of long-lived objects: keep the collector from walking them on every pass.
    gc.collect()
    gc.freeze()
    return index
