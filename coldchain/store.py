"""PostgreSQL access: the one module that holds SQL and imports asyncpg.

It hands out the project's own dataclasses, never asyncpg records, and turns the driver's
connection failures into `StoreUnavailable`, which callers treat as "wait and retry".
Schema changes are numbered SQL files under `coldchain/migrations/`, applied in order, each once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import msgspec

from coldchain.errors import StoreUnavailable
from sensors import Reading

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    # What the pool hands out: a proxy with the Connection API (generic only in the stubs).
    Connection = asyncpg.pool.PoolConnectionProxy[asyncpg.Record]

# The errors after which the same work may succeed later: the server went away, refused us,
# is starting or shutting down, or chose this transaction as a deadlock victim.
_TRANSIENT: Final = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)

_READING_COLUMNS: Final = (
    "dewar_id",
    "seq",
    "ts",
    "received_at",
    "temp_c",
    "ln2_level_pct",
    "tilt_deg",
    "shock_g",
    "lid_open",
    "battery_pct",
    "lat",
    "lon",
    "extra",
)
_DEAD_LETTER_COLUMNS: Final = (
    "received_at",
    "topic",
    "dewar_id",
    "item_index",
    "reason",
    "payload",
)

# Per connection, a staging table for COPY: rows land here, then move into `readings` with
# ON CONFLICT DO NOTHING, so a redelivered reading is stored once and counted as a duplicate.
_STAGE_DDL: Final = """
CREATE TEMP TABLE IF NOT EXISTS readings_stage (
    dewar_id text, seq bigint, ts timestamptz, received_at timestamptz, temp_c double precision,
    ln2_level_pct real, tilt_deg real, shock_g real, lid_open boolean, battery_pct real,
    lat double precision, lon double precision, extra jsonb
) ON COMMIT DELETE ROWS
"""

_MIGRATION_NAME: Final = re.compile(r"(\d{3})_([a-z0-9_]+)\.sql")
# Any constant will do: it only keeps two instances that start together from racing.
_MIGRATION_LOCK: Final = 0x636F6C64

_json_encoder: Final = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class IncomingReading:
    """A validated reading with where and when the service got it."""

    dewar_id: str
    reading: Reading
    received_at: datetime


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message, or one reading of a batch, that could not be accepted, kept for an operator."""

    received_at: datetime
    topic: str
    dewar_id: str | None
    item_index: int | None
    reason: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class StoredDeadLetter(DeadLetter):
    id: int


@dataclass(frozen=True, slots=True)
class DewarStatus:
    """A device's own online/offline report (its retained status topic, or its last will)."""

    dewar_id: str
    state: str
    at: datetime


@dataclass(frozen=True, slots=True)
class BatchResult:
    stored: int
    duplicates: int
    dead_letters: int

    def __add__(self, other: BatchResult) -> BatchResult:
        return BatchResult(
            self.stored + other.stored,
            self.duplicates + other.duplicates,
            self.dead_letters + other.dead_letters,
        )


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    """The migrations shipped with this version of the service, in order."""
    found = []
    for entry in resources.files("coldchain.migrations").iterdir():
        match = _MIGRATION_NAME.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a number: {versions}")
    return found


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Binary format, so COPY can write jsonb too: a version byte (1) and then the JSON text.
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda value: b"\x01" + _json_encoder.encode(value),
        decoder=lambda data: msgspec.json.decode(data[1:]),
        schema="pg_catalog",
        format="binary",
    )
    await conn.execute(_STAGE_DDL)


class Store:
    """A pool of connections to PostgreSQL and every query the service makes."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, url: str, *, max_size: int = 4, connect_timeout: float = 5.0) -> Store:
        """A pool that connects lazily, so the service starts while PostgreSQL is still down."""
        pool = await asyncpg.create_pool(
            url,
            min_size=0,
            max_size=max_size,
            init=_init_connection,
            timeout=connect_timeout,
            command_timeout=30,
            max_inactive_connection_lifetime=60,
        )
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except _TRANSIENT as exc:
            raise StoreUnavailable(f"PostgreSQL unavailable: {type(exc).__name__}: {exc}") from exc

    async def ping(self) -> None:
        """Raise StoreUnavailable unless a round trip to PostgreSQL succeeds."""
        async with self._connection() as conn:
            await conn.fetchval("SELECT 1", timeout=2)

    async def migrate(self) -> list[Migration]:
        """Apply every migration not yet recorded; return those applied now."""
        async with self._connection() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version integer PRIMARY KEY, name text NOT NULL,"
                    " applied_at timestamptz NOT NULL DEFAULT now())"
                )
                rows = await conn.fetch("SELECT version FROM schema_migrations")
                done = {r["version"] for r in rows}
                applied = []
                for migration in available_migrations():
                    if migration.version in done:
                        continue
                    async with conn.transaction():
                        await conn.execute(migration.sql)
                        await conn.execute(
                            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                            migration.version,
                            migration.name,
                        )
                    logger.info("applied migration %03d_%s", migration.version, migration.name)
                    applied.append(migration)
                return applied
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)

    async def write_batch(
        self,
        readings: Sequence[IncomingReading],
        dead_letters: Sequence[DeadLetter],
        statuses: Sequence[DewarStatus] = (),
    ) -> BatchResult:
        """Store readings, dead letters and device statuses in one transaction.

        On return everything is durable (the caller may acknowledge the messages);
        on StoreUnavailable nothing is, and the same batch can be written again.
        """
        async with self._connection() as conn, conn.transaction():
            stored = 0
            if readings:
                await conn.copy_records_to_table(
                    "readings_stage", records=_reading_records(readings), columns=_READING_COLUMNS
                )
                await conn.execute(
                    "INSERT INTO dewars (id) SELECT DISTINCT dewar_id FROM readings_stage"
                    " ORDER BY 1 ON CONFLICT (id) DO NOTHING"
                )
                status = await conn.execute(
                    "INSERT INTO readings SELECT * FROM readings_stage ON CONFLICT DO NOTHING"
                )
                stored = int(status.rsplit(" ", 1)[1])
            if dead_letters:
                await conn.copy_records_to_table(
                    "dead_letters",
                    records=[
                        (d.received_at, d.topic, d.dewar_id, d.item_index, d.reason, d.payload)
                        for d in dead_letters
                    ],
                    columns=_DEAD_LETTER_COLUMNS,
                )
            if statuses:
                # The newest report wins, whatever order they arrive in.
                await conn.executemany(
                    "INSERT INTO dewars (id, status, status_at) VALUES ($1, $2, $3)"
                    " ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status,"
                    " status_at = EXCLUDED.status_at"
                    " WHERE dewars.status_at IS NULL OR dewars.status_at <= EXCLUDED.status_at",
                    [(s.dewar_id, s.state, s.at) for s in sorted(statuses, key=_by_dewar)],
                )
        return BatchResult(stored, len(readings) - stored, len(dead_letters))

    async def dead_letters(
        self, *, limit: int = 100, before_id: int | None = None, dewar_id: str | None = None
    ) -> list[StoredDeadLetter]:
        """Newest dead letters first; page with `before_id` (the last id of the previous page)."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT id, received_at, topic, dewar_id, item_index, reason, payload"
                " FROM dead_letters"
                " WHERE ($1::bigint IS NULL OR id < $1) AND ($2::text IS NULL OR dewar_id = $2)"
                " ORDER BY id DESC LIMIT $3",
                before_id,
                dewar_id,
                limit,
            )
        return [
            StoredDeadLetter(
                id=r["id"],
                received_at=r["received_at"],
                topic=r["topic"],
                dewar_id=r["dewar_id"],
                item_index=r["item_index"],
                reason=r["reason"],
                payload=bytes(r["payload"]),
            )
            for r in rows
        ]

    async def readings(
        self,
        dewar_id: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int = 10_000,
    ) -> list[IncomingReading]:
        """A dewar's readings in device-time order within [start, end)."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT * FROM readings WHERE dewar_id = $1"
                " AND ($2::timestamptz IS NULL OR ts >= $2)"
                " AND ($3::timestamptz IS NULL OR ts < $3)"
                " ORDER BY ts, seq LIMIT $4",
                dewar_id,
                start,
                end,
                limit,
            )
        return [_incoming(r) for r in rows]

    async def reading_count(self) -> int:
        async with self._connection() as conn:
            count: int = await conn.fetchval("SELECT count(*) FROM readings")
            return count


def _by_dewar(status: DewarStatus) -> str:
    return status.dewar_id


def _reading_records(readings: Sequence[IncomingReading]) -> list[tuple[Any, ...]]:
    return [
        (
            item.dewar_id,
            r.seq,
            r.ts,
            item.received_at,
            r.temp_c,
            r.ln2_level_pct,
            r.tilt_deg,
            r.shock_g,
            r.lid_open,
            r.battery_pct,
            r.lat,
            r.lon,
            r.extra,
        )
        for item in readings
        for r in (item.reading,)
    ]


def _incoming(row: asyncpg.Record) -> IncomingReading:
    reading = Reading(
        seq=row["seq"],
        ts=row["ts"],
        temp_c=row["temp_c"],
        ln2_level_pct=row["ln2_level_pct"],
        tilt_deg=row["tilt_deg"],
        shock_g=row["shock_g"],
        lid_open=row["lid_open"],
        battery_pct=row["battery_pct"],
        lat=row["lat"],
        lon=row["lon"],
        extra=row["extra"],
    )
    return IncomingReading(row["dewar_id"], reading, row["received_at"])
