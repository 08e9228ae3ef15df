"""The live stream's fan-out: every client gets every event, and a client that stops reading is
dropped once its bounded queue is full, without holding up the others or growing memory."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import WSMsgType, web

from coldchain.embedded import free_port
from coldchain.live import QUEUE_LIMIT, LiveHub
from coldchain.metrics import Registry


async def _serve(hub: LiveHub) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/live", hub.serve)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"ws://127.0.0.1:{port}/live"


async def test_every_client_gets_every_event_and_a_stalled_one_is_dropped() -> None:
    registry = Registry()
    hub = LiveHub(registry)
    runner, url = await _serve(hub)
    try:
        async with aiohttp.ClientSession() as session:
            readers = [await session.ws_connect(url) for _ in range(5)]
            # A client that never reads (its transport is paused below).
            stalled = await session.ws_connect(url)
            for ws in [*readers, stalled]:
                hello = await ws.receive(timeout=5)
                assert json.loads(hello.data)["type"] == "hello"
            stalled_transport = stalled._response.connection.transport  # type: ignore[union-attr]
            assert stalled_transport is not None
            stalled_transport.pause_reading()
            big = "x" * 100_000  # enough to fill the stalled socket's buffers many times over
            counts = [0] * len(readers)

            async def read(i: int, ws: aiohttp.ClientWebSocketResponse) -> None:
                while counts[i] < 3 * QUEUE_LIMIT:
                    msg = await ws.receive(timeout=20)
                    assert msg.type == WSMsgType.TEXT
                    counts[i] += 1

            consumers = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(readers)]
            for n in range(3 * QUEUE_LIMIT):
                hub.publish("readings", {"n": n, "pad": big})
                await asyncio.sleep(0.002)  # the readers keep up; the stalled client does not
            await asyncio.wait_for(asyncio.gather(*consumers), 60)
            assert counts == [3 * QUEUE_LIMIT] * len(readers)
            # The stalled client was dropped, and the hub no longer holds anything for it.
            assert hub.clients == len(readers)
            assert "coldchain_live_dropped_clients_total 1" in registry.render()
            for ws in readers:
                await ws.close()
            await stalled.close()
    finally:
        await runner.cleanup()


async def test_a_stalled_client_is_dropped_by_bytes_long_before_its_event_limit() -> None:
    # At peak ingest an event is a whole batch of readings: the queue is bounded in bytes too.
    registry = Registry()
    hub = LiveHub(registry, queue_bytes=1_000_000)
    runner, url = await _serve(hub)
    events = QUEUE_LIMIT // 2  # never enough to fill the queue by count
    try:
        async with aiohttp.ClientSession() as session:
            reader = await session.ws_connect(url, max_msg_size=1 << 20)
            stalled = await session.ws_connect(url, max_msg_size=1 << 20)
            for ws in (reader, stalled):
                assert json.loads((await ws.receive(timeout=5)).data)["type"] == "hello"
            transport = stalled._response.connection.transport  # type: ignore[union-attr]
            assert transport is not None
            transport.pause_reading()
            got = 0

            async def read() -> None:
                nonlocal got
                while got < events:
                    msg = await reader.receive(timeout=20)
                    assert msg.type == WSMsgType.TEXT
                    assert json.loads(msg.data)["data"]["n"] == got
                    got += 1

            consumer = asyncio.create_task(read())
            pad = "y" * 200_000  # 128 events of 200 kB: far more than the socket buffers hold
            for n in range(events):
                hub.publish("readings", {"n": n, "pad": pad})
                await asyncio.sleep(0.005)
            await asyncio.wait_for(consumer, 60)
            assert got == events
            assert hub.clients == 1
            assert "coldchain_live_dropped_clients_total 1" in registry.render()
            await reader.close()
            await stalled.close()
    finally:
        await runner.cleanup()
