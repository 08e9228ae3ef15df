"""The live stream (`GET /api/v1/live`, a WebSocket): readings and alarm changes as they happen.

Each event is encoded once and queued to every client, and sent as those very bytes. A client's
queue is bounded in events and in bytes (an event at peak ingest is a whole batch of readings,
hundreds of kilobytes); a client that falls that far behind is disconnected at once rather than
allowed to grow the service's memory; it reconnects and reloads. Clients send nothing; the
stream is one-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Final

import msgspec
from aiohttp import WSMsgType, web

from coldchain.metrics import Registry

logger = logging.getLogger(__name__)

QUEUE_LIMIT: Final = 256
QUEUE_BYTES: Final = 8 * 1024 * 1024
"""Most bytes held for one client: 2 s of the stream at 20,000 readings/s, minutes at a fleet's
ordinary pace."""
_encoder: Final = msgspec.json.Encoder()


class _Client:
    __slots__ = ("queue", "queued_bytes", "slow", "task")

    def __init__(self, task: asyncio.Task[Any] | None) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(QUEUE_LIMIT)
        self.queued_bytes = 0
        self.slow = False
        self.task = task


class LiveHub:
    """Fans events out to connected WebSocket clients."""

    def __init__(self, registry: Registry, *, queue_bytes: int = QUEUE_BYTES) -> None:
        self._clients: set[_Client] = set()
        self._queue_bytes = queue_bytes
        registry.gauge(
            "coldchain_live_clients",
            "WebSocket clients connected",
            source=lambda: float(len(self._clients)),
        )
        self._dropped = registry.counter(
            "coldchain_live_dropped_clients_total", "WebSocket clients dropped for falling behind"
        )

    @property
    def clients(self) -> int:
        return len(self._clients)

    def publish(self, kind: str, data: Any) -> None:
        """Queue one event for every client; never blocks."""
        if not self._clients:
            return
        message = _encoder.encode({"type": kind, "data": data})
        for client in list(self._clients):
            if client.slow:
                continue
            if client.queued_bytes + len(message) <= self._queue_bytes:
                try:
                    client.queue.put_nowait(message)
                    client.queued_bytes += len(message)
                    continue
                except asyncio.QueueFull:
                    pass
            # It is this far behind: drop it. Its sender may be stuck writing to a socket the
            # client no longer reads, so stop that task rather than wait for it.
            client.slow = True
            self._dropped.inc()
            if client.task is not None:
                client.task.cancel()

    async def serve(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=4096)
        await ws.prepare(request)
        client = _Client(asyncio.current_task())
        self._clients.add(client)
        reader = asyncio.create_task(self._drain_incoming(ws))
        try:
            await ws.send_str('{"type":"hello","data":{}}')
            while not ws.closed:
                getter = asyncio.ensure_future(client.queue.get())
                await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()  # the client went away
                    break
                message = getter.result()
                client.queued_bytes -= len(message)
                await ws.send_frame(message, WSMsgType.TEXT)  # UTF-8 JSON already: no copy
        except ConnectionError:
            pass  # the client went away mid-send
        except asyncio.CancelledError:
            if not client.slow:
                raise
        finally:
            self._clients.discard(client)
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            if client.slow and request.transport is not None:
                request.transport.abort()  # a close frame would wait behind the backlog
            elif not ws.closed:
                await ws.close()
        return ws

    @staticmethod
    async def _drain_incoming(ws: web.WebSocketResponse) -> None:
        # Clients send nothing meaningful; reading keeps pings answered and notices a close.
        async for _ in ws:
            pass
