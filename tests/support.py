"""Helpers the tests share: a QoS 1 publisher that waits for every PUBACK, a poll-until helper,
and the service running in-process on a free port."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TypeVar

import aiohttp
import paho.mqtt.client as paho
from aiohttp import web
from paho.mqtt.enums import CallbackAPIVersion

from coldchain.app import create_app
from coldchain.auth import Role, new_token, token_hash
from coldchain.embedded import free_port
from coldchain.settings import MqttAddress, Settings
from coldchain.store import Store

T = TypeVar("T")


def publish_all(
    mqtt_url: str, messages: Iterable[tuple[str, bytes]], *, client_id: str, timeout: float = 60.0
) -> int:
    """Publish (topic, payload) pairs at QoS 1 and return once the broker acknowledged each."""
    address = MqttAddress.parse(mqtt_url)
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(address.host, address.port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise TimeoutError(f"broker did not acknowledge message {info.mid} in time")
        return len(infos)
    finally:
        client.disconnect()
        client.loop_stop()


async def eventually(
    probe: Callable[[], Awaitable[T]],
    check: Callable[[T], bool],
    *,
    within: float = 20.0,
    interval: float = 0.1,
) -> T:
    """Poll `probe` until `check` accepts its value; fail with the last value seen."""
    deadline = time.monotonic() + within
    value = await probe()
    while not check(value):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s; last value: {value!r}")
        await asyncio.sleep(interval)
        value = await probe()
    return value


def service_settings(
    database_url: str, mqtt_url: str, client_id: str, **changes: object
) -> Settings:
    """Settings for a service under test: short MQTT session expiry, so the sessions that tests
    leave behind on a shared broker do not queue messages for long."""
    base = Settings(
        database_url=database_url,
        mqtt_url=mqtt_url,
        http_port=free_port(),
        mqtt_client_id=client_id,
        mqtt_session_expiry_s=120,
        backoff_cap_s=1.0,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


@asynccontextmanager
async def running_service(settings: Settings) -> AsyncIterator[str]:
    """The whole service in this process; yields its base URL once MQTT is connected."""
    app = create_app(settings)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.http_port)
    await site.start()
    base = f"http://{settings.http_host}:{settings.http_port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def ready() -> int:
                async with session.get(f"{base}/readyz") as response:
                    return response.status

            await eventually(ready, lambda status: status == 200, within=30)
        yield base
    finally:
        await runner.cleanup()


async def make_token(database_url: str, role: Role = Role.VIEWER) -> str:
    """A fresh API token of `role` in the database at `database_url` (migrated first)."""
    store = await Store.open(database_url, max_size=1)
    try:
        await store.migrate()
        token = new_token()
        await store.create_token(f"test {role}", role, token_hash(token), None, "tests")
        return token
    finally:
        await store.close()
