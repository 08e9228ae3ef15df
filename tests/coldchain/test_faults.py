"""Faults that must lose nothing: the service killed, the broker restarted, PostgreSQL gone for
20 s. Each test starts the servers it breaks (a private broker, and for the database outage a
private PostgreSQL cluster) and checks that every published reading is stored exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from coldchain.embedded import EmbeddedBroker, EmbeddedPostgres, free_port, mosquitto_binary
from coldchain.settings import MqttAddress
from coldchain.store import Store
from sensors import Reading
from sensors.publisher import StoreAndForwardPublisher
from tests.support import eventually, running_service, service_settings

pytestmark = [pytest.mark.fault, pytest.mark.postgres, pytest.mark.mqtt]

DEWARS = 20


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A private broker this test may stop and start (Mosquitto if installed, else amqtt)."""
    server = EmbeddedBroker(tmp_path / "broker")
    server.start()
    yield server
    server.stop()


def stream(count: int, unique: str) -> list[tuple[str, Reading]]:
    """`count` readings spread over DEWARS dewars, in device-time order."""
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    out = []
    for i in range(count):
        dewar = f"F{unique}-{i % DEWARS:02d}"
        seq = i // DEWARS
        out.append(
            (
                dewar,
                Reading(
                    seq=seq, ts=start + timedelta(seconds=seq), temp_c=-189.5, ln2_level_pct=70.0
                ),
            )
        )
    return out


class Feeder:
    """Publishes a stream in chunks from a background thread, so faults land mid-stream."""

    def __init__(
        self,
        mqtt_url: str,
        client_id: str,
        items: list[tuple[str, Reading]],
        *,
        chunk: int = 200,
        pause_s: float = 0.05,
    ) -> None:
        address = MqttAddress.parse(mqtt_url)
        self.publisher = StoreAndForwardPublisher(
            address.host, address.port, client_id=client_id, reconnect_max_delay=2
        )
        self._items = items
        self._chunk = chunk
        self._pause_s = pause_s

    async def run(self) -> None:
        self.publisher.start()
        for i in range(0, len(self._items), self._chunk):
            for dewar, reading in self._items[i : i + self._chunk]:
                self.publisher.submit(dewar, reading)
            await asyncio.sleep(self._pause_s)

    async def finish(self) -> None:
        done = await asyncio.to_thread(self.publisher.flush, 60)
        assert done, f"publisher could not deliver everything: {self.publisher.stats}"
        await asyncio.to_thread(self.publisher.close, 10)


async def stored_count(database_url: str, unique: str) -> int:
    conn = await asyncpg.connect(database_url, timeout=3)
    try:
        value: int = await conn.fetchval(
            "SELECT count(*) FROM readings WHERE dewar_id LIKE $1", f"F{unique}-%"
        )
        return value
    finally:
        await conn.close()


async def assert_exactly_once(
    database_url: str, unique: str, items: list[tuple[str, Reading]]
) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT dewar_id, seq FROM readings WHERE dewar_id LIKE $1", f"F{unique}-%"
        )
    finally:
        await conn.close()
    keys = [(r["dewar_id"], r["seq"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(items)
    assert set(keys) == {(dewar, reading.seq) for dewar, reading in items}


async def get(url: str) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        body: dict[str, object] = await response.json()
        return response.status, body


@pytest.fixture
async def migrated(database_url: str) -> str:
    store = await Store.open(database_url)
    await store.migrate()
    await store.close()
    return database_url


class ServiceProcess:
    """`coldchain serve` in a child process, as an operator runs it."""

    def __init__(
        self, database_url: str, mqtt_url: str, client_id: str, log: Path, **settings: str
    ) -> None:
        self.port = free_port()
        # A long flush interval keeps a second's worth of readings received but uncommitted,
        # so a kill lands while the service holds work it must not have acknowledged yet.
        self.env = {
            **os.environ,
            "COLDCHAIN_DATABASE_URL": database_url,
            "COLDCHAIN_MQTT_URL": mqtt_url,
            "COLDCHAIN_HTTP_PORT": str(self.port),
            "COLDCHAIN_MQTT_CLIENT_ID": client_id,
            "COLDCHAIN_LOG_LEVEL": "INFO",
            "COLDCHAIN_FLUSH_INTERVAL_S": "1.0",
            "COLDCHAIN_BATCH_SIZE": "20000",
            **{f"COLDCHAIN_{name.upper()}": value for name, value in settings.items()},
        }
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "coldchain.cli", "serve"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    async def start(self) -> None:
        """Spawn the service and wait until /readyz says ready."""
        self.spawn()

        async def ready() -> int:
            try:
                status, _ = await get(f"{self.base}/readyz")
            except aiohttp.ClientError:
                return 0
            return status

        await eventually(ready, lambda status: status == 200, within=30)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(20)


@pytest.fixture
def service_process(
    migrated: str, broker: EmbeddedBroker, unique: str, tmp_path: Path
) -> Iterator[ServiceProcess]:
    service = ServiceProcess(migrated, broker.url, f"svc-{unique}", tmp_path / "service.log")
    yield service
    service.stop()


async def test_service_killed_mid_stream_loses_nothing(
    service_process: ServiceProcess, broker: EmbeddedBroker, migrated: str, unique: str
) -> None:
    """Fault 1: SIGKILL in the middle of a stream of QoS 1 readings, then a restart."""
    items = stream(6000, unique)
    await service_process.start()
    feeder = Feeder(broker.url, f"pub-{unique}", items)
    feeding = asyncio.create_task(feeder.run())
    await eventually(lambda: stored_count(migrated, unique), lambda n: n >= 1000, interval=0.02)
    service_process.kill()
    killed_at = await stored_count(migrated, unique)
    await asyncio.sleep(1.0)
    await service_process.start()
    await feeding
    await feeder.finish()
    await eventually(lambda: stored_count(migrated, unique), lambda n: n >= len(items), within=60)
    assert killed_at < len(items), "the kill landed after the stream ended; the test proved nothing"
    await assert_exactly_once(migrated, unique, items)


@pytest.mark.skipif(
    mosquitto_binary() is None and os.environ.get("CI") != "true",
    reason="restarting a broker with its sessions needs Mosquitto "
    "(apt-get install mosquitto); CI installs it",
)
async def test_broker_restarted_mid_stream_loses_nothing(
    database_url: str, tmp_path: Path, unique: str
) -> None:
    """Fault 2: the broker (Mosquitto with persistence) is restarted mid-stream."""
    broker = EmbeddedBroker(tmp_path / "mosquitto", prefer="mosquitto")
    broker.start()
    items = stream(6000, unique)
    settings = service_settings(database_url, broker.url, f"svc-{unique}")
    try:
        async with running_service(settings) as base:
            feeder = Feeder(broker.url, f"pub-{unique}", items)
            feeding = asyncio.create_task(feeder.run())
            await eventually(
                lambda: stored_count(database_url, unique), lambda n: n >= 1500, interval=0.02
            )
            await asyncio.to_thread(broker.stop)
            stopped_at = await stored_count(database_url, unique)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(broker.start)
            await feeding
            await feeder.finish()
            await eventually(
                lambda: stored_count(database_url, unique), lambda n: n >= len(items), within=60
            )
            status, _ = await get(f"{base}/readyz")
            assert status == 200
    finally:
        broker.stop()
    assert stopped_at < len(items), "the restart landed after the stream ended"
    await assert_exactly_once(database_url, unique, items)


@pytest.fixture
async def private_postgres(tmp_path: Path) -> AsyncIterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path / "pg")
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.destroy)


async def metric(base: str, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as response:
        text = await response.text()
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))


async def test_database_unreachable_for_20_seconds_loses_nothing(
    private_postgres: EmbeddedPostgres, broker: EmbeddedBroker, unique: str, tmp_path: Path
) -> None:
    """Fault 3: PostgreSQL stops for 20 s mid-stream. Ingestion holds its messages
    unacknowledged, /readyz says not ready, and everything is stored once it is back.

    To prove "unacknowledged", the service is also killed near the end of the outage: what it
    held in memory survives only if it never told the broker it had it.
    """
    url = private_postgres.url
    store = await Store.open(url)
    await store.migrate()
    await store.close()
    items = stream(6000, unique)
    # A small window, so the outage shows that what the service holds stays bounded.
    service = ServiceProcess(
        url, broker.url, f"svc-{unique}", tmp_path / "service.log", mqtt_receive_maximum="300"
    )
    await service.start()
    try:
        feeder = Feeder(broker.url, f"pub-{unique}", items, chunk=100, pause_s=0.1)
        feeding = asyncio.create_task(feeder.run())
        await eventually(lambda: stored_count(url, unique), lambda n: n >= 1000, interval=0.02)
        await asyncio.to_thread(private_postgres.stop)
        down_since = time.monotonic()
        statuses = []
        pending = []
        while time.monotonic() - down_since < 18:
            status, body = await get(f"{service.base}/readyz")
            statuses.append((status, body["checks"]))
            pending.append(await metric(service.base, "coldchain_ingest_pending_messages"))
            await asyncio.sleep(1.0)
        service.kill()
        await asyncio.sleep(2.0)
        await asyncio.to_thread(private_postgres.start)
        await service.start()
        await feeding
        await feeder.finish()
        await eventually(lambda: stored_count(url, unique), lambda n: n >= len(items), within=60)
    finally:
        service.stop()
    # Every probe during the outage said "not ready", naming the database.
    assert len(statuses) >= 12
    assert all(status == 503 for status, _ in statuses), statuses
    assert all(
        str(checks["database"]).startswith("unavailable")  # type: ignore[index]
        for _, checks in statuses
    )
    # The service was holding messages when it was killed, and never more than its window plus
    # what one socket read can carry (64 KiB: a few hundred messages) while PostgreSQL was away.
    assert pending[-1] > 0
    assert max(pending) <= 300 + 400, pending
    await assert_exactly_once(url, unique, items)


async def test_database_unreachable_for_20_seconds_the_service_recovers_by_itself(
    private_postgres: EmbeddedPostgres, broker: EmbeddedBroker, unique: str, tmp_path: Path
) -> None:
    """Fault 3 with no help: PostgreSQL stops for 20 s mid-stream while the same service
    process keeps running. It says not ready throughout, holds what it receives, and when
    PostgreSQL is back it stores every reading once and says ready again, all by itself."""
    url = private_postgres.url
    store = await Store.open(url)
    await store.migrate()
    await store.close()
    items = stream(6000, unique)
    service = ServiceProcess(
        url, broker.url, f"svc-{unique}", tmp_path / "service.log", mqtt_receive_maximum="300"
    )
    await service.start()
    assert service.process is not None
    pid = service.process.pid
    try:
        feeder = Feeder(broker.url, f"pub-{unique}", items, chunk=100, pause_s=0.1)
        feeding = asyncio.create_task(feeder.run())
        await eventually(lambda: stored_count(url, unique), lambda n: n >= 1000, interval=0.02)
        await asyncio.to_thread(private_postgres.stop)
        down_since = time.monotonic()
        statuses = []
        pending = []
        while time.monotonic() - down_since < 20:
            status, body = await get(f"{service.base}/readyz")
            statuses.append((status, body["checks"]))
            pending.append(await metric(service.base, "coldchain_ingest_pending_messages"))
            await asyncio.sleep(1.0)
        await asyncio.to_thread(private_postgres.start)
        back_at = await eventually(
            lambda: get(f"{service.base}/readyz"), lambda r: r[0] == 200, within=30
        )
        await feeding
        await feeder.finish()
        await eventually(lambda: stored_count(url, unique), lambda n: n >= len(items), within=60)
        after, _ = await get(f"{service.base}/readyz")
        assert service.process.poll() is None and service.process.pid == pid, "it was restarted"
    finally:
        service.stop()
    assert len(statuses) >= 15
    assert all(status == 503 for status, _ in statuses), statuses
    assert all(
        str(checks["database"]).startswith("unavailable")  # type: ignore[index]
        for _, checks in statuses
    )
    assert back_at[1]["checks"] == {"database": "ok", "mqtt": "ok"}
    assert after == 200
    assert max(pending) > 0, "the outage landed after the stream was stored"
    await assert_exactly_once(url, unique, items)
