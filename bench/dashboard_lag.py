"""How far behind the dashboard runs with a real fleet: 1,000 active shipments each reporting
every second, the fleet screen open in headless Chromium.

`python -m bench.dashboard_lag [--shipments 1000] [--seconds 30]` prints the update lag (a reading's
device time to the moment the page drew it) at p50/p95, and the same for a bare WebSocket client
on the live stream in the same run (the baseline: what the service itself adds), and their ratio.
Uses COLDCHAIN_TEST_DATABASE_URL / COLDCHAIN_TEST_MQTT_URL when set, else embedded servers."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from coldchain.auth import Role
from coldchain.embedded import EmbeddedBroker, EmbeddedPostgres
from coldchain.settings import MqttAddress
from coldchain.store import Store
from routing import example_network
from sensors import Reading, encode_reading, telemetry_topic
from tests.e2e.browser import CHROMIUM_ARGS, chromium_path, missing
from tests.support import eventually, make_token, running_service, service_settings


def _percentiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q = statistics.quantiles(values, n=100)
    return statistics.median(values), q[94]


class _Publisher:
    """One QoS 1 connection that sends a reading per dewar each second."""

    def __init__(self, mqtt_url: str) -> None:
        address = MqttAddress.parse(mqtt_url)
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"lag-{uuid.uuid4().hex[:8]}"
        )
        self.client.max_inflight_messages_set(2000)
        self.client.max_queued_messages_set(0)
        self.client.connect(address.host, address.port)
        self.client.loop_start()

    def tick(self, dewars: list[str], seq: int) -> None:
        now = datetime.now(UTC)
        for i, dewar in enumerate(dewars):
            reading = Reading(
                seq=seq,
                ts=now,
                temp_c=-190.0 + (i % 7) * 0.1,
                ln2_level_pct=90.0,
                tilt_deg=2.0,
                lat=50.0 + (i % 50) * 0.1,
                lon=8.0 + (i // 50) * 0.1,
            )
            self.client.publish(telemetry_topic(dewar), encode_reading(reading), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def _baseline(base: str, token: str, samples: list[float], stop: asyncio.Event) -> None:
    url = base.replace("http", "ws", 1) + f"/api/v1/live?token={token}"
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        while not stop.is_set():
            try:
                message = await asyncio.wait_for(ws.receive(), 0.5)
            except TimeoutError:
                continue
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            event = json.loads(message.data)
            if event["type"] == "readings":
                now = time.time()
                for r in event["data"]:
                    samples.append((now - datetime.fromisoformat(r["ts"]).timestamp()) * 1000)


async def measure(
    database_url: str, mqtt_url: str, shipments: int, seconds: int
) -> dict[str, float]:
    from playwright.async_api import async_playwright

    store = await Store.open(database_url, max_size=2)
    try:
        await store.migrate()
        await store.import_sites(list(example_network().sites.values()), "lag")
    finally:
        await store.close()
    planner = await make_token(database_url, Role.PLANNER)
    operator = await make_token(database_url, Role.OPERATOR)
    viewer = await make_token(database_url, Role.VIEWER)
    settings = service_settings(database_url, mqtt_url, f"lag-{uuid.uuid4().hex[:8]}")
    dewars = [f"DW-L{i:05d}" for i in range(shipments)]
    async with running_service(settings) as base, aiohttp.ClientSession() as http:
        sem = asyncio.Semaphore(16)
        packed = (datetime.now(UTC) - timedelta(minutes=10)).isoformat()

        async def ship(dewar: str) -> None:
            async with sem:
                body = {
                    "dewar_id": dewar,
                    "profile": "cryo-vapor",
                    "origin": "MFG-MPN",
                    "destination": "TC-CHA",
                }
                async with http.post(
                    f"{base}/api/v1/shipments",
                    json=body,
                    headers={"Authorization": f"Bearer {planner}"},
                ) as r:
                    sid = (await r.json())["id"]
                async with http.post(
                    f"{base}/api/v1/shipments/{sid}/events",
                    json={"type": "packed", "at": packed},
                    headers={"Authorization": f"Bearer {operator}"},
                ) as r:
                    assert r.status == 201

        await asyncio.gather(*(ship(d) for d in dewars))
        publisher = _Publisher(mqtt_url)
        baseline: list[float] = []
        stop = asyncio.Event()
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(f"{base}/")
            await page.fill("#token", viewer)
            await page.click("#sign-in-form button[type=submit]")
            rows = page.locator("#fleet-table tbody tr")
            await eventually(rows.count, lambda n: n >= shipments, within=120, interval=0.5)
            watcher = asyncio.create_task(_baseline(base, viewer, baseline, stop))
            warmup = 5
            for second in range(warmup + seconds):
                started = time.monotonic()
                await asyncio.to_thread(publisher.tick, dewars, second)
                if second == warmup - 1:
                    await page.evaluate("window.__coldchain.resetLag()")
                    baseline.clear()
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
            await asyncio.sleep(3)
            stop.set()
            await watcher
            drawn: list[float] = await page.evaluate("window.__coldchain.lagSamples()")
            await browser.close()
        publisher.close()
    page50, page95 = _percentiles(drawn)
    base50, base95 = _percentiles(baseline)
    return {
        "shipments": shipments,
        "seconds": seconds,
        "readings_drawn": len(drawn),
        "readings_expected": shipments * seconds,
        "baseline_readings": len(baseline),
        "page_p50_ms": page50,
        "page_p95_ms": page95,
        "ws_p50_ms": base50,
        "ws_p95_ms": base95,
        "ratio_p50": page50 / base50 if base50 else float("nan"),
        "ratio_p95": page95 / base95 if base95 else float("nan"),
    }


async def _main(shipments: int, seconds: int) -> dict[str, float]:
    database_url = os.environ.get("COLDCHAIN_TEST_DATABASE_URL")
    mqtt_url = os.environ.get("COLDCHAIN_TEST_MQTT_URL")
    with tempfile.TemporaryDirectory() as tmp:
        pg = broker = None
        if not database_url:
            pg = EmbeddedPostgres(Path(tmp) / "pg")
            database_url = pg.start()
        if not mqtt_url:
            broker = EmbeddedBroker(Path(tmp) / "mqtt")
            mqtt_url = broker.start()
        try:
            import asyncpg

            name = f"coldchain_lag_{uuid.uuid4().hex[:8]}"
            admin = await asyncpg.connect(database_url)
            await admin.execute(f'CREATE DATABASE "{name}"')
            await admin.close()
            url = database_url.rsplit("/", 1)[0] + f"/{name}"
            return await measure(url, mqtt_url, shipments, seconds)
        finally:
            if broker:
                broker.stop()
            if pg:
                pg.destroy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shipments", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=30)
    args = parser.parse_args()
    reason = missing()
    if reason:
        sys.stderr.write(f"cannot measure: {reason}\n")
        return 2
    result = asyncio.run(_main(args.shipments, args.seconds))
    sys.stdout.write(
        f"dashboard update lag, {result['shipments']:.0f} shipments x 1 reading/s for "
        f"{result['seconds']:.0f} s: page p50 {result['page_p50_ms']:.0f} ms, "
        f"p95 {result['page_p95_ms']:.0f} ms ({result['readings_drawn']:.0f} of "
        f"{result['readings_expected']:.0f} readings drawn); bare WebSocket client p50 "
        f"{result['ws_p50_ms']:.0f} ms, p95 {result['ws_p95_ms']:.0f} ms; "
        f"ratio p50 {result['ratio_p50']:.2f}, p95 {result['ratio_p95']:.2f}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
