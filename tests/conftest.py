"""Shared fixtures: real PostgreSQL and a real MQTT broker.

Where they come from:
- `COLDCHAIN_TEST_DATABASE_URL` / `COLDCHAIN_TEST_MQTT_URL` name servers to use (CI points them
  at the machine's PostgreSQL and Mosquitto). A configured server that does not answer fails the
  tests: it never skips them.
- Without them, the suite starts an embedded PostgreSQL (pgserver's binaries) and an embedded
  broker (Mosquitto if installed, else amqtt) once per run, so it passes on a fresh machine.

Each test that needs a database gets a fresh one, created and dropped around it.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from coldchain.embedded import EmbeddedBroker, EmbeddedPostgres
from coldchain.settings import MqttAddress
from coldchain.store import Store


def _check_reachable(host: str, port: int, what: str, variable: str) -> None:
    try:
        with socket.create_connection((host, port), timeout=3):
            return
    except OSError as exc:
        pytest.fail(
            f"{what} at {host}:{port} (from {variable}) is not reachable: {exc}. "
            "Start it, or unset the variable to let the tests start an embedded one.",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def server_database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server URL with rights to create databases."""
    configured = os.environ.get("COLDCHAIN_TEST_DATABASE_URL")
    if configured:
        parts = urlsplit(configured)
        _check_reachable(
            parts.hostname or "127.0.0.1",
            parts.port or 5432,
            "PostgreSQL",
            "COLDCHAIN_TEST_DATABASE_URL",
        )
        yield configured
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data")
    yield server.start()
    server.destroy()


@pytest.fixture(scope="session")
def mqtt_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An MQTT broker URL (anonymous access)."""
    configured = os.environ.get("COLDCHAIN_TEST_MQTT_URL")
    if configured:
        address = MqttAddress.parse(configured)
        _check_reachable(address.host, address.port, "MQTT broker", "COLDCHAIN_TEST_MQTT_URL")
        yield configured
        return
    broker = EmbeddedBroker(tmp_path_factory.mktemp("mqtt"))
    yield broker.start()
    broker.stop()


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@pytest.fixture
async def database_url(server_database_url: str) -> AsyncIterator[str]:
    """A fresh, empty database for one test, dropped afterwards."""
    name = f"coldchain_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield _with_database(server_database_url, name)
    admin = await asyncpg.connect(server_database_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    """A store on a fresh database with every migration applied."""
    opened = await Store.open(database_url)
    await opened.migrate()
    yield opened
    await opened.close()


@pytest.fixture
def unique() -> str:
    """A short id unique to this test, for dewar ids and MQTT client ids on a shared broker."""
    return uuid.uuid4().hex[:8]
