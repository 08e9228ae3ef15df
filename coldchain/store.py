"""PostgreSQL access: the one module that holds SQL and imports asyncpg.

It hands out the project's own dataclasses, never asyncpg records, and turns errors about the
server's state (unreachable, read-only, out of disk, shutting down...) into `StoreUnavailable`,
which callers treat as "wait and retry"; the ingest's writes turn errors about the data itself
into `Unstorable`.
Schema changes are numbered SQL files under `coldchain/migrations/`, applied in order, each once.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, Self

import asyncpg
import msgspec

from coldchain.alarms import (
    REMIND_AFTER,
    Alarm,
    AlarmChange,
    AlarmState,
    Channel,
    Recipient,
    acknowledge_check,
    alert_body,
    close_check,
)
from coldchain.auth import Actor, Role
from coldchain.errors import BadRequest, Conflict, NotFound, StoreUnavailable, Unstorable
from coldchain.lanes import DeliveredShipment
from coldchain.profiles import BUILT_IN, ENGINE_RULES, Profile, Severity
from coldchain.shipments import AuditEntry, CustodyEvent, EventType, Shipment, Status, next_status
from routing import Flight, Lane, LaneMode, ReceivingHours, Site, SiteKind
from sensors import Reading
from sensors.schema import epoch_micros

logger = logging.getLogger(__name__)

READING_CSV_COLUMNS: Final = (
    "ts",
    "seq",
    "temp_c",
    "ln2_level_pct",
    "tilt_deg",
    "shock_g",
    "lid_open",
    "battery_pct",
    "lat",
    "lon",
)
"""The columns of `shipment_readings_csv`, in order."""

if TYPE_CHECKING:
    # What the pool hands out: a proxy with the Connection API (generic only in the stubs).
    Connection = asyncpg.pool.PoolConnectionProxy[asyncpg.Record]

# The errors that are about the server's state, not the work: the same work may succeed later,
# so the caller holds it and retries. Besides the driver's own (no route, a closed connection,
# a timeout), SQLSTATE classes 08 (connection), 40 (serialization failure, deadlock), 53
# (insufficient resources: disk full, out of memory, too many connections), 57 (operator
# intervention: shutdown, restart, cancel), 58 (system error: I/O) and XX (internal error,
# corruption), and three codes of their own: 25006 (a read-only transaction, as on a standby
# after a failover), 25P03 (idle-in-transaction timeout), 55P03 (a lock not available).
_TRANSIENT: Final = (OSError, TimeoutError, asyncpg.exceptions.InterfaceError)
_TRANSIENT_CLASSES: Final = frozenset({"08", "40", "53", "57", "58", "XX"})
_TRANSIENT_STATES: Final = frozenset({"25006", "25P03", "55P03"})

# The errors that are about the data written and nothing else: a value PostgreSQL cannot hold
# (class 22, or out of range for the driver), a constraint (class 23), a size limit (class 54).
# Only these may make the ingest dead-letter a message.
_REFUSED_DATA: Final = (
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.IntegrityConstraintViolationError,
    asyncpg.exceptions.ProgramLimitExceededError,
    OverflowError,
)


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, asyncpg.PostgresError):
        state = str(exc.sqlstate)
        return state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_STATES
    return isinstance(exc, _TRANSIENT)


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

# Rows made and encoded for COPY between turns of the event loop: about 1 ms of CPU here.
COPY_ROWS_PER_TURN: Final = 400
MAX_KNOWN_DEWARS: Final = 100_000  # dewar ids a store remembers having a row (then it starts over)

# Per connection, a staging table for COPY: rows land here, then move into `readings` with
# ON CONFLICT DO NOTHING, so a redelivered reading is stored once and counted as a duplicate.
# Its times are microseconds since the epoch, made timestamptz by the INSERT: asyncpg's binary
# encoder for timestamptz costs about 2 µs a value here, and a bigint a fraction of that, so a
# row of the COPY went from 5.3 to 1.0 µs of the service's CPU.
_STAGE_DDL: Final = """
CREATE TEMP TABLE IF NOT EXISTS readings_stage (
    dewar_id text, seq bigint, ts bigint, received_at bigint, temp_c double precision,
    ln2_level_pct real, tilt_deg real, shock_g real, lid_open boolean, battery_pct real,
    lat double precision, lon double precision, extra jsonb
) ON COMMIT DELETE ROWS
"""

_MERGE_STAGE: Final = """
INSERT INTO readings (dewar_id, seq, ts, received_at, temp_c, ln2_level_pct, tilt_deg, shock_g,
                      lid_open, battery_pct, lat, lon, extra)
SELECT dewar_id, seq,
       timestamptz 'epoch' + ts * interval '1 microsecond',  -- exact
       timestamptz 'epoch' + received_at * interval '1 microsecond',
       temp_c, ln2_level_pct, tilt_deg, shock_g, lid_open, battery_pct, lat, lon, extra
FROM readings_stage ORDER BY dewar_id, seq
ON CONFLICT DO NOTHING
"""

_MIGRATION_NAME: Final = re.compile(r"(\d{3})_([a-z0-9_]+)\.sql")
# Any constant will do: it only keeps two instances that start together from racing.
_MIGRATION_LOCK: Final = 0x636F6C64

_json_encoder: Final = msgspec.json.Encoder()


class IncomingReading(msgspec.Struct, frozen=True, gc=False):
    """A validated reading with where and when the service got it.

    A Struct rather than a frozen dataclass: one is made per reading on the ingest hot path,
    and a Struct is made in about 90 ns where the dataclass took about 670 ns (measured).
    It holds no reference cycles, so the garbage collector need not track it."""

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


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Give a connection back to the pool as it is. asyncpg's default sends a reset query on
    every release (unlock advisory locks, close cursors, UNLISTEN, RESET ALL): a round trip per
    unit of work, and the largest single cost of the alarm pipeline under load. This store
    leaves no session state behind: no session SET, LISTEN or cursor, and the one advisory lock
    (migrations) is released where it is taken. An open transaction is still rolled back by
    asyncpg itself before this is called."""


class TelemetryStore:
    """A pool of connections to PostgreSQL and the queries of the ingest."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        # Unacknowledged alarms are reminded every REMIND_AFTER[severity] times this.
        self.remind_scale = 1.0
        # Dewars known to have their row (rows are never deleted): a batch inserts only the
        # others. Listing every batch's dewars cost PostgreSQL 3 ms a 4,000-row batch, and a
        # round trip, though after the first minute nearly every dewar has its row.
        self._known_dewars: set[str] = set()

    @classmethod
    async def open(cls, url: str, *, max_size: int = 4, connect_timeout: float = 5.0) -> Self:
        """A pool that connects lazily, so the service starts while PostgreSQL is still down."""
        pool = await asyncpg.create_pool(
            url,
            min_size=0,
            max_size=max_size,
            init=_init_connection,
            timeout=connect_timeout,
            command_timeout=30,
            max_inactive_connection_lifetime=60,
            reset=_keep_session,
        )
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Connection]:
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except (
            asyncpg.exceptions.InvalidAuthorizationSpecificationError,  # 28000, 28P01 password
            asyncpg.exceptions.InvalidCatalogNameError,  # 3D000 no such database
        ) as exc:
            # The pool connects lazily, so this is where a wrong password, role or database
            # shows. PostgreSQL's message names the user or database, never the password; the
            # service keeps retrying, as it does while PostgreSQL is down.
            raise StoreUnavailable(
                f"PostgreSQL refused the connection: {exc} (check COLDCHAIN_DATABASE_URL)"
            ) from exc
        except (
            asyncpg.exceptions.CharacterNotInRepertoireError,
            asyncpg.exceptions.UntranslatableCharacterError,
        ) as exc:
            # Text PostgreSQL cannot hold (a NUL character, in text or inside jsonb): the
            # caller's input, not our fault.
            raise BadRequest("text with a NUL character cannot be stored or searched") from exc
        except Exception as exc:
            if not _transient(exc):
                raise
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
                # Built-in profiles exist after every migrate; an admin's edits are kept.
                await conn.executemany(
                    "INSERT INTO profiles (name, body, built_in) VALUES ($1, $2, true)"
                    " ON CONFLICT (name) DO NOTHING",
                    [(p.name, msgspec.to_builtins(p)) for p in BUILT_IN],
                )
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

        On return everything is durable (the caller may acknowledge the messages). On
        Unstorable nothing is, because PostgreSQL refused something in the batch itself; on
        any other error nothing is either, and the same batch can be written again later.
        """
        try:
            return await self._write_batch(readings, dead_letters, statuses)
        except _REFUSED_DATA as exc:
            raise Unstorable(f"PostgreSQL refused the data: {type(exc).__name__}: {exc}") from exc
        except BadRequest as exc:  # text with NUL, as `_connection` reports it
            raise Unstorable(exc.message) from exc

    async def _write_batch(
        self,
        readings: Sequence[IncomingReading],
        dead_letters: Sequence[DeadLetter],
        statuses: Sequence[DewarStatus],
    ) -> BatchResult:
        new_dewars = {r.dewar_id for r in readings}
        new_dewars.difference_update(self._known_dewars)
        async with self._connection() as conn, conn.transaction():
            stored = 0
            if readings:
                await conn.copy_records_to_table(
                    "readings_stage",
                    records=_reading_records(readings),
                    columns=_READING_COLUMNS,
                )
                if new_dewars:
                    # In id order: two writers' batches lock the rows the same way round.
                    await conn.execute(
                        "INSERT INTO dewars (id) SELECT unnest($1::text[]) ORDER BY 1"
                        " ON CONFLICT (id) DO NOTHING",
                        sorted(new_dewars),
                    )
                # In key order: two writers' batches holding the same redelivered readings then
                # wait for each other instead of deadlocking.
                status = await conn.execute(_MERGE_STAGE)
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
        # Only once committed: a batch rolled back leaves its dewars to be inserted again.
        if len(self._known_dewars) + len(new_dewars) > MAX_KNOWN_DEWARS:
            self._known_dewars.clear()
        self._known_dewars |= new_dewars
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


async def _reading_records(readings: Sequence[IncomingReading]) -> AsyncIterator[tuple[Any, ...]]:
    """Rows for `readings_stage`, with times in microseconds since the epoch, made as COPY
    takes them. The readings of one read of the socket share their `received_at`, so it is
    converted once for them.

    Every `COPY_ROWS_PER_TURN` rows it lets the event loop run others: making and encoding a
    4,000-reading batch's rows is several milliseconds of CPU, and done in one step it held up
    each alarm's round trips and deliveries behind it (`docs/alarms.md`)."""
    received: datetime | None = None
    received_us = 0
    for n, item in enumerate(readings, 1):
        r = item.reading
        if item.received_at is not received:
            received = item.received_at
            received_us = epoch_micros(received)
        yield (
            item.dewar_id,
            r.seq,
            epoch_micros(r.ts),
            received_us,
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
        if n % COPY_ROWS_PER_TURN == 0:
            await asyncio.sleep(0)


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


# --- shipments, sites, profiles, tokens, audit ------------------------------------------------

_profile_decoder: Final = msgspec.json.Decoder(Profile)


@dataclass(frozen=True, slots=True)
class StoredProfile:
    profile: Profile
    built_in: bool
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ImportReport:
    """What an import changed, by id."""

    added: list[str]
    updated: list[str]
    unchanged: int


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: int
    name: str
    role: Role
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class Bucket:
    start: datetime
    count: int
    temp_min: float
    temp_max: float
    temp_mean: float
    ln2_min: float | None
    ln2_max: float | None
    ln2_mean: float | None


@dataclass(frozen=True, slots=True)
class ShipmentRoute:
    """A route planned for a shipment: `plan` is one route as the planner answers it (legs,
    arrival, margin...), `request` what was asked; the newest of a shipment's is current."""

    id: int
    shipment_id: str
    from_site: str
    eta: datetime
    plan: dict[str, Any]
    request: dict[str, Any]
    planned_at: datetime
    planned_by: str


class TokenRejected(Exception):
    """Why a presented token does not authenticate (unknown, revoked or expired)."""


def _shipment(row: asyncpg.Record) -> Shipment:
    return Shipment(
        id=row["id"],
        dewar_id=row["dewar_id"],
        profile=row["profile"],
        origin=row["origin"],
        destination=row["destination"],
        deliver_by=row["deliver_by"],
        planned_departure=row["planned_departure"],
        chain_of_identity=row["chain_of_identity"],
        status=Status(row["status"]),
        created_at=row["created_at"],
        created_by=row["created_by"],
        starts_at=row["starts_at"],
        ends_at=row["ends_at"],
    )


def _route(row: asyncpg.Record) -> ShipmentRoute:
    return ShipmentRoute(
        id=row["id"],
        shipment_id=row["shipment_id"],
        from_site=row["from_site"],
        eta=row["eta"],
        plan=row["plan"],
        request=row["request"],
        planned_at=row["planned_at"],
        planned_by=row["planned_by"],
    )


def _event(row: asyncpg.Record) -> CustodyEvent:
    return CustodyEvent(
        id=row["id"],
        shipment_id=row["shipment_id"],
        type=EventType(row["type"]),
        at=row["at"],
        location=row["location"],
        note=row["note"],
        actor=row["actor"],
        recorded_at=row["recorded_at"],
    )


def _site(row: asyncpg.Record) -> Site:
    hours = None
    if row["opens"] is not None and row["closes"] is not None:
        hours = ReceivingHours(row["opens"], row["closes"])
    return Site(
        id=row["id"],
        name=row["name"],
        kind=SiteKind(row["kind"]),
        lat=row["lat"],
        lon=row["lon"],
        tz=row["tz"],
        country=row["country"],
        iata=row["iata"],
        ln2_recharge=row["ln2_recharge"],
        customs_minutes=row["customs_minutes"],
        connect_minutes=row["connect_minutes"],
        recovery_minutes=row["recovery_minutes"],
        hours=hours,
    )


def _site_values(site: Site) -> tuple[Any, ...]:
    return (
        site.id,
        site.name,
        str(site.kind),
        site.lat,
        site.lon,
        site.tz,
        site.iata,
        site.country,
        site.ln2_recharge,
        site.customs_minutes,
        site.connect_minutes,
        site.recovery_minutes,
        site.hours.opens if site.hours else None,
        site.hours.closes if site.hours else None,
    )


_AUDIT: Final = (
    "INSERT INTO audit_log (actor, action, entity, entity_id, detail) VALUES ($1, $2, $3, $4, $5)"
)


async def _audit(
    conn: Connection, actor: str, action: str, entity: str, entity_id: str, detail: object = None
) -> None:
    await conn.execute(_AUDIT, actor, action, entity, entity_id, detail)


#: An audit entry as written: actor, action, entity, entity id, detail.
_AuditRow = tuple[str, str, str, str, object]


async def _refuse_overlap(
    conn: Connection, dewar_id: str, shipment_id: str, start: datetime, what: str
) -> None:
    """Conflict if a shipment owning the dewar's readings from `start` on would take some that
    another of its shipments owns: a reading belongs to the one shipment active at its time."""
    row = await conn.fetchrow(
        "SELECT id, ends_at FROM shipments WHERE dewar_id = $1 AND id <> $2"
        " AND ends_at > $3 AND ends_at > starts_at ORDER BY ends_at DESC LIMIT 1",
        dewar_id,
        shipment_id,
        start,
    )
    if row is not None:
        raise Conflict(
            f"{what} at {start.isoformat()} is before dewar {dewar_id}'s previous shipment "
            f"{row['id']} ended at {row['ends_at'].isoformat()}: the dewar's readings of that "
            "time belong to that shipment"
        )


class ShipmentStore(TelemetryStore):
    """The ingest's queries and those about shipments, custody, sites, profiles, tokens and
    the audit log."""

    # Profiles ------------------------------------------------------------------------------

    async def profiles(self) -> list[StoredProfile]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT name, body, built_in, updated_at FROM profiles ORDER BY name"
            )
        return [_stored_profile(r) for r in rows]

    async def profile(self, name: str) -> StoredProfile | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT name, body, built_in, updated_at FROM profiles WHERE name = $1", name
            )
        return None if row is None else _stored_profile(row)

    async def put_profile(self, profile: Profile, actor: Actor) -> bool:
        """Create or replace a profile; True when it was created."""
        body = msgspec.to_builtins(profile)
        async with self._connection() as conn, conn.transaction():
            before = await conn.fetchval(
                "SELECT body FROM profiles WHERE name = $1 FOR UPDATE", profile.name
            )
            await conn.execute(
                "INSERT INTO profiles (name, body) VALUES ($1, $2) ON CONFLICT (name)"
                " DO UPDATE SET body = EXCLUDED.body, updated_at = now()",
                profile.name,
                body,
            )
            await _audit(
                conn,
                actor.label,
                "profile.created" if before is None else "profile.updated",
                "profile",
                profile.name,
                {"before": before, "after": body},
            )
        return before is None

    # Sites and the route network -----------------------------------------------------------

    async def sites(self, kind: SiteKind | None = None) -> list[Site]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT * FROM sites WHERE ($1::text IS NULL OR kind = $1) ORDER BY id",
                None if kind is None else str(kind),
            )
        return [_site(r) for r in rows]

    async def site_ids(self) -> set[str]:
        async with self._connection() as conn:
            return {r["id"] for r in await conn.fetch("SELECT id FROM sites")}

    async def import_sites(self, sites: Sequence[Site], actor: str) -> ImportReport:
        """Add or update sites by id, in one transaction; never removes one."""
        async with self._connection() as conn, conn.transaction():
            current = {r["id"]: r for r in await conn.fetch("SELECT * FROM sites FOR UPDATE")}
            added, updated, unchanged = [], [], 0
            for site in sites:
                row = current.get(site.id)
                if row is None:
                    added.append(site.id)
                elif _site(row) != site:
                    updated.append(site.id)
                else:
                    unchanged += 1
            changed = [s for s in sites if s.id in set(added) | set(updated)]
            await conn.executemany(
                "INSERT INTO sites (id, name, kind, lat, lon, tz, iata, country, ln2_recharge,"
                " customs_minutes, connect_minutes, recovery_minutes, opens, closes)"
                " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14)"
                " ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, kind = EXCLUDED.kind,"
                " lat = EXCLUDED.lat, lon = EXCLUDED.lon, tz = EXCLUDED.tz,"
                " iata = EXCLUDED.iata, country = EXCLUDED.country,"
                " ln2_recharge = EXCLUDED.ln2_recharge,"
                " customs_minutes = EXCLUDED.customs_minutes,"
                " connect_minutes = EXCLUDED.connect_minutes,"
                " recovery_minutes = EXCLUDED.recovery_minutes, opens = EXCLUDED.opens,"
                " closes = EXCLUDED.closes, updated_at = now()",
                [_site_values(s) for s in changed],
            )
            if added or updated:
                await conn.execute("SELECT nextval('network_version')")
                await _audit(
                    conn,
                    actor,
                    "sites.imported",
                    "network",
                    "sites",
                    {"added": added, "updated": updated},
                )
        return ImportReport(added, updated, unchanged)

    async def import_lanes(self, lanes: Sequence[Lane], actor: str) -> ImportReport:
        """Add or update ground lanes by (origin, destination, mode)."""
        async with self._connection() as conn, conn.transaction():
            rows = await conn.fetch("SELECT * FROM lanes FOR UPDATE")
            current = {(r["origin"], r["destination"], r["mode"]): r for r in rows}
            added, updated, unchanged = [], [], 0
            changed = []
            for lane in lanes:
                key = (lane.origin, lane.destination, str(lane.mode))
                row = current.get(key)
                values = (lane.minutes, lane.cost, lane.risk)
                if row is None:
                    added.append("/".join(key))
                elif (row["minutes"], row["cost"], row["risk"]) != values:
                    updated.append("/".join(key))
                else:
                    unchanged += 1
                    continue
                changed.append((*key, *values))
            await conn.executemany(
                "INSERT INTO lanes (origin, destination, mode, minutes, cost, risk)"
                " VALUES ($1,$2,$3,$4,$5,$6) ON CONFLICT (origin, destination, mode)"
                " DO UPDATE SET minutes = EXCLUDED.minutes, cost = EXCLUDED.cost,"
                " risk = EXCLUDED.risk",
                changed,
            )
            if changed:
                await conn.execute("SELECT nextval('network_version')")
                await _audit(
                    conn,
                    actor,
                    "lanes.imported",
                    "network",
                    "lanes",
                    {"added": len(added), "updated": len(updated)},
                )
        return ImportReport(added, updated, unchanged)

    async def import_flights(self, flights: Sequence[Flight], actor: str) -> ImportReport:
        """Add or update dated flights by (carrier, flight, departure)."""
        async with self._connection() as conn, conn.transaction():
            rows = await conn.fetch("SELECT * FROM flights FOR UPDATE")
            current = {(r["carrier"], r["flight"], r["departs_at"]): r for r in rows}
            added, updated, unchanged = [], [], 0
            changed = []
            for f in flights:
                key = (f.carrier, f.flight, f.departs_at)
                values = (f.origin, f.destination, f.arrives_at, f.cost, f.risk)
                row = current.get(key)
                label = f"{f.carrier}{f.flight}@{f.departs_at.isoformat()}"
                if row is None:
                    added.append(label)
                elif (
                    row["origin"],
                    row["destination"],
                    row["arrives_at"],
                    row["cost"],
                    row["risk"],
                ) != values:
                    updated.append(label)
                else:
                    unchanged += 1
                    continue
                changed.append((*key, *values))
            await conn.executemany(
                "INSERT INTO flights (carrier, flight, departs_at, origin, destination,"
                " arrives_at, cost, risk) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)"
                " ON CONFLICT (carrier, flight, departs_at) DO UPDATE SET"
                " origin = EXCLUDED.origin, destination = EXCLUDED.destination,"
                " arrives_at = EXCLUDED.arrives_at, cost = EXCLUDED.cost, risk = EXCLUDED.risk",
                changed,
            )
            if changed:
                await conn.execute("SELECT nextval('network_version')")
                await _audit(
                    conn,
                    actor,
                    "flights.imported",
                    "network",
                    "flights",
                    {"added": len(added), "updated": len(updated)},
                )
        return ImportReport(added, updated, unchanged)

    async def network_version(self) -> int:
        async with self._connection() as conn:
            version: int = await conn.fetchval(
                "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM network_version"
            )
        return version

    async def network(self) -> tuple[int, list[Site], list[Lane], list[Flight]]:
        """The whole route network with its version (which changes on every import)."""
        async with self._connection() as conn, conn.transaction(isolation="repeatable_read"):
            version = await conn.fetchval(
                "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM network_version"
            )
            sites = [_site(r) for r in await conn.fetch("SELECT * FROM sites")]
            lanes = [
                Lane(
                    r["origin"],
                    r["destination"],
                    LaneMode(r["mode"]),
                    r["minutes"],
                    r["cost"],
                    r["risk"],
                )
                for r in await conn.fetch("SELECT * FROM lanes")
            ]
            flights = [
                Flight(
                    r["carrier"],
                    r["flight"],
                    r["origin"],
                    r["destination"],
                    r["departs_at"],
                    r["arrives_at"],
                    r["cost"],
                    r["risk"],
                )
                for r in await conn.fetch("SELECT * FROM flights")
            ]
        return int(version), sites, lanes, flights

    # Shipments -----------------------------------------------------------------------------

    async def create_shipment(self, shipment: Shipment, actor: Actor) -> Shipment:
        async with self._connection() as conn, conn.transaction():
            missing = [
                f"{what} {value!r}"
                for what, value, sql in (
                    ("profile", shipment.profile, "SELECT 1 FROM profiles WHERE name = $1"),
                    ("origin site", shipment.origin, "SELECT 1 FROM sites WHERE id = $1"),
                    ("destination site", shipment.destination, "SELECT 1 FROM sites WHERE id = $1"),
                )
                if await conn.fetchval(sql, value) is None
            ]
            if missing:
                raise BadRequest("unknown " + " and ".join(missing))
            active = await conn.fetchval(
                "SELECT id FROM shipments WHERE dewar_id = $1"
                " AND status NOT IN ('delivered', 'cancelled')",
                shipment.dewar_id,
            )
            if active is not None:
                raise Conflict(
                    f"dewar {shipment.dewar_id} is already in active shipment "
                    f"{active}; deliver or cancel that one first"
                )
            await _refuse_overlap(
                conn, shipment.dewar_id, shipment.id, shipment.starts_at, "the shipment's start"
            )
            try:
                row = await conn.fetchrow(
                    "INSERT INTO shipments (id, dewar_id, profile, origin, destination,"
                    " deliver_by, planned_departure, chain_of_identity, status, created_at,"
                    " created_by, starts_at, ends_at) VALUES"
                    " ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13) RETURNING *",
                    shipment.id,
                    shipment.dewar_id,
                    shipment.profile,
                    shipment.origin,
                    shipment.destination,
                    shipment.deliver_by,
                    shipment.planned_departure,
                    shipment.chain_of_identity,
                    str(shipment.status),
                    shipment.created_at,
                    shipment.created_by,
                    shipment.starts_at,
                    shipment.ends_at,
                )
            except asyncpg.UniqueViolationError as exc:
                if "shipments_pkey" in str(exc.constraint_name):
                    raise Conflict(f"shipment {shipment.id} already exists") from exc
                raise Conflict(
                    f"dewar {shipment.dewar_id} is already in an active shipment"
                ) from exc
            if row is None:
                raise RuntimeError("INSERT ... RETURNING returned no row")
            created = _shipment(row)
            await _audit(
                conn,
                actor.label,
                "shipment.created",
                "shipment",
                created.id,
                {
                    "dewar_id": created.dewar_id,
                    "profile": created.profile,
                    "origin": created.origin,
                    "destination": created.destination,
                    "deliver_by": _iso(created.deliver_by),
                    "chain_of_identity": created.chain_of_identity,
                },
            )
        return created

    async def shipments(
        self,
        *,
        status: Status | None = None,
        limit: int = 50,
        before: tuple[datetime, str] | None = None,
    ) -> list[Shipment]:
        """Newest first; `before` is the (created_at, id) of the last item of the previous page."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT * FROM shipments"
                " WHERE ($1::text IS NULL OR status = $1)"
                " AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))"
                " ORDER BY created_at DESC, id DESC LIMIT $4",
                None if status is None else str(status),
                None if before is None else before[0],
                None if before is None else before[1],
                limit,
            )
        return [_shipment(r) for r in rows]

    async def shipment(self, shipment_id: str) -> Shipment:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM shipments WHERE id = $1",
                shipment_id,
            )
        if row is None:
            raise NotFound(f"no shipment {shipment_id!r}")
        return _shipment(row)

    async def events(self, shipment_id: str) -> list[CustodyEvent]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT * FROM custody_events WHERE shipment_id = $1 ORDER BY at, id", shipment_id
            )
        return [_event(r) for r in rows]

    async def record_event(
        self,
        shipment_id: str,
        kind: EventType,
        at: datetime,
        location: str | None,
        note: str | None,
        actor: Actor,
    ) -> tuple[Shipment, CustodyEvent]:
        """Record a custody event in order and move the shipment's status; Conflict if it makes
        no sense now (out of order, or not allowed from the current status)."""
        now = datetime.now(UTC)
        if at - now > timedelta(minutes=5):
            raise BadRequest(f"event time {at.isoformat()} is in the future")
        async with self._connection() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM shipments WHERE id = $1 FOR UPDATE",
                shipment_id,
            )
            if row is None:
                raise NotFound(f"no shipment {shipment_id!r}")
            shipment = _shipment(row)
            last = await conn.fetchval(
                "SELECT max(at) FROM custody_events WHERE shipment_id = $1", shipment_id
            )
            if last is not None and at < last:
                raise Conflict(
                    f"events are recorded in order: {at.isoformat()} is before the "
                    f"last event at {last.isoformat()}"
                )
            if at < shipment.created_at - timedelta(days=1):
                raise Conflict("an event cannot be more than a day before the shipment was created")
            status = next_status(shipment.status, kind)
            if kind is EventType.PACKED:
                await _refuse_overlap(conn, shipment.dewar_id, shipment_id, at, "pack-out")
            starts_at = at if kind is EventType.PACKED else shipment.starts_at
            ends_at = at if not status.active else None
            updated = await conn.fetchrow(
                "UPDATE shipments SET status = $2, starts_at = $3, ends_at = $4 WHERE id = $1"
                " RETURNING *",
                shipment_id,
                str(status),
                starts_at,
                ends_at,
            )
            event_row = await conn.fetchrow(
                "INSERT INTO custody_events (shipment_id, type, at, location, note, actor)"
                " VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
                shipment_id,
                str(kind),
                at,
                location,
                note,
                actor.label,
            )
            await _audit(
                conn,
                actor.label,
                f"custody.{kind}",
                "shipment",
                shipment_id,
                {
                    "at": at.isoformat(),
                    "location": location,
                    "note": note,
                    "status": {"before": str(shipment.status), "after": str(status)},
                },
            )
        if updated is None or event_row is None:
            raise RuntimeError("UPDATE/INSERT ... RETURNING returned no row")
        return _shipment(updated), _event(event_row)

    # Planned routes ------------------------------------------------------------------------

    async def add_route(
        self,
        shipment_id: str,
        from_site: str,
        eta: datetime,
        plan: dict[str, Any],
        request: dict[str, Any],
        actor: Actor,
    ) -> ShipmentRoute:
        """Store a plan as the shipment's current route (the earlier ones stay as history);
        Conflict once the shipment is delivered or cancelled."""
        async with self._connection() as conn, conn.transaction():
            status = await conn.fetchval(
                "SELECT status FROM shipments WHERE id = $1 FOR UPDATE", shipment_id
            )
            if status is None:
                raise NotFound(f"no shipment {shipment_id!r}")
            if not Status(status).active:
                raise Conflict(
                    f"shipment {shipment_id} is {status}: its route can no longer change"
                )
            row = await conn.fetchrow(
                "INSERT INTO shipment_routes (shipment_id, from_site, eta, plan, request,"
                " planned_by) VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
                shipment_id,
                from_site,
                eta,
                plan,
                request,
                actor.label,
            )
            if row is None:
                raise RuntimeError("INSERT ... RETURNING returned no row")
            stored = _route(row)
            await _audit(
                conn,
                actor.label,
                "route.planned",
                "shipment",
                shipment_id,
                {
                    "route_id": stored.id,
                    "from_site": from_site,
                    "eta": _iso(eta),
                    "flights": [
                        f"{leg['carrier']}{leg['flight']}"
                        for leg in plan.get("legs", ())
                        if leg.get("flight") is not None
                    ],
                    "request": request,
                },
            )
        return stored

    async def routes(self, shipment_id: str, limit: int = 100) -> list[ShipmentRoute]:
        """A shipment's planned routes, newest (the current one) first."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT * FROM shipment_routes WHERE shipment_id = $1 ORDER BY id DESC LIMIT $2",
                shipment_id,
                limit,
            )
        return [_route(r) for r in rows]

    async def route_etas(self) -> dict[str, datetime]:
        """The current route's ETA of every active shipment that has one (for the rules)."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT DISTINCT ON (r.shipment_id) r.shipment_id, r.eta"
                " FROM shipment_routes r JOIN shipments s ON s.id = r.shipment_id"
                " WHERE s.status NOT IN ('delivered', 'cancelled')"
                " ORDER BY r.shipment_id, r.id DESC"
            )
        return {r["shipment_id"]: r["eta"] for r in rows}

    async def last_reading(self, shipment: Shipment) -> IncomingReading | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT * FROM readings WHERE dewar_id = $1 AND ts >= $2"
                " AND ($3::timestamptz IS NULL OR ts < $3) ORDER BY ts DESC, seq DESC LIMIT 1",
                shipment.dewar_id,
                shipment.starts_at,
                shipment.ends_at,
            )
        return None if row is None else _incoming(row)

    async def shipment_readings(
        self, shipment: Shipment, start: datetime | None, end: datetime | None, limit: int
    ) -> list[IncomingReading]:
        """The shipment's readings in [start, end) within its own window, by device time."""
        lower, upper = _window(shipment, start, end)
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT * FROM readings WHERE dewar_id = $1 AND ts >= $2"
                " AND ($3::timestamptz IS NULL OR ts < $3) ORDER BY ts, seq LIMIT $4",
                shipment.dewar_id,
                lower,
                upper,
                limit,
            )
        return [_incoming(r) for r in rows]

    async def shipment_readings_csv(self, shipment: Shipment) -> bytes:
        """Every reading of the shipment as CSV (`READING_CSV_COLUMNS`, a header row, by device
        time, times in UTC ISO 8601): COPY hands a million rows over in a second or two where
        fetching records takes several times as long."""
        lower, upper = _window(shipment, None, None)
        chunks: list[bytes] = []

        async def take(data: bytes) -> None:
            chunks.append(data)

        async with self._connection() as conn:
            await conn.copy_from_query(
                "SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS ts,"
                " seq, temp_c, ln2_level_pct, tilt_deg, shock_g, lid_open, battery_pct, lat, lon"
                " FROM readings WHERE dewar_id = $1 AND ts >= $2"
                " AND ($3::timestamptz IS NULL OR ts < $3) ORDER BY readings.ts, seq",
                shipment.dewar_id,
                lower,
                upper,
                output=take,
                format="csv",
                header=True,
            )
        return b"".join(chunks)

    async def shipment_buckets(
        self,
        shipment: Shipment,
        start: datetime | None,
        end: datetime | None,
        every: timedelta,
        limit: int,
    ) -> list[Bucket]:
        """Min/max/mean per `every` of device time, computed in PostgreSQL."""
        lower, upper = _window(shipment, start, end)
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT date_bin($4, ts, $2) AS start, count(*) AS n,"
                " min(temp_c) AS tmin, max(temp_c) AS tmax, avg(temp_c) AS tmean,"
                " min(ln2_level_pct) AS lmin, max(ln2_level_pct) AS lmax,"
                " avg(ln2_level_pct) AS lmean"
                " FROM readings WHERE dewar_id = $1 AND ts >= $2"
                " AND ($3::timestamptz IS NULL OR ts < $3)"
                " GROUP BY 1 ORDER BY 1 LIMIT $5",
                shipment.dewar_id,
                lower,
                upper,
                every,
                limit,
            )
        return [
            Bucket(
                r["start"],
                r["n"],
                r["tmin"],
                r["tmax"],
                r["tmean"],
                r["lmin"],
                r["lmax"],
                r["lmean"],
            )
            for r in rows
        ]

    # Tokens --------------------------------------------------------------------------------

    async def create_token(
        self, name: str, role: Role, token_hash: bytes, expires_at: datetime | None, actor: str
    ) -> int:
        async with self._connection() as conn, conn.transaction():
            token_id: int = await conn.fetchval(
                "INSERT INTO api_tokens (name, role, hash, expires_at) VALUES ($1, $2, $3, $4)"
                " RETURNING id",
                name,
                str(role),
                token_hash,
                expires_at,
            )
            await _audit(
                conn,
                actor,
                "token.created",
                "token",
                str(token_id),
                {"name": name, "role": str(role), "expires_at": _iso(expires_at)},
            )
        return token_id

    async def actor_for(self, token_hash: bytes) -> Actor:
        """The actor a token stands for; TokenRejected says why not."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT id, name, role, expires_at, revoked_at FROM api_tokens WHERE hash = $1",
                token_hash,
            )
        if row is None:
            raise TokenRejected("unknown token")
        if row["revoked_at"] is not None:
            raise TokenRejected("token revoked")
        if row["expires_at"] is not None and row["expires_at"] <= datetime.now(UTC):
            raise TokenRejected("token expired")
        return Actor(row["id"], row["name"], Role(row["role"]))

    async def tokens(self) -> list[TokenInfo]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT id, name, role, created_at, expires_at, revoked_at"
                " FROM api_tokens ORDER BY id"
            )
        return [
            TokenInfo(
                r["id"],
                r["name"],
                Role(r["role"]),
                r["created_at"],
                r["expires_at"],
                r["revoked_at"],
            )
            for r in rows
        ]

    async def revoke_token(self, token_id: int, actor: str) -> None:
        async with self._connection() as conn, conn.transaction():
            status = await conn.execute(
                "UPDATE api_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
                token_id,
            )
            if status.endswith(" 0"):
                exists = await conn.fetchval("SELECT 1 FROM api_tokens WHERE id = $1", token_id)
                if exists is None:
                    raise NotFound(f"no token {token_id}")
                return
            await _audit(conn, actor, "token.revoked", "token", str(token_id))

    # Audit ---------------------------------------------------------------------------------

    async def audit_entries(
        self,
        *,
        entity: str | None = None,
        entity_id: str | None = None,
        limit: int = 100,
        before: int | None = None,
    ) -> list[AuditEntry]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT * FROM audit_log WHERE ($1::text IS NULL OR entity = $1)"
                " AND ($2::text IS NULL OR entity_id = $2) AND ($3::bigint IS NULL OR id < $3)"
                " ORDER BY id DESC LIMIT $4",
                entity,
                entity_id,
                before,
                limit,
            )
        return [
            AuditEntry(
                r["id"], r["at"], r["actor"], r["action"], r["entity"], r["entity_id"], r["detail"]
            )
            for r in rows
        ]


def _stored_profile(row: asyncpg.Record) -> StoredProfile:
    profile = msgspec.convert(row["body"], Profile)
    return StoredProfile(profile, row["built_in"], row["updated_at"])


def _window(
    shipment: Shipment, start: datetime | None, end: datetime | None
) -> tuple[datetime, datetime | None]:
    lower = shipment.starts_at if start is None else max(start, shipment.starts_at)
    upper = shipment.ends_at
    if end is not None:
        upper = end if upper is None else min(end, upper)
    return lower, upper


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


# --- alarms, recipients, the notification outbox ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Transition:
    """What the rule engine says happened to an episode (see `coldchain.excursions`)."""

    episode_key: str
    rule: str
    severity: Severity
    kind: str  # raised | cleared | retracted | reopened
    started_at: datetime
    at: datetime
    value: float
    limit: float
    message: str


#: How long a claim on an outbox row holds: after it, the row is due again (its sender died).
CLAIM_FOR: Final = timedelta(seconds=60)


@dataclass(frozen=True, slots=True)
class Notification:
    id: int
    alarm_id: int
    channel: Channel
    recipient: Recipient | None
    body: dict[str, Any]
    attempts: int
    created_at: datetime
    # pending (to send, or to try again) | sent | failed (given up) | superseded (held by
    # quiet hours when a later change of the alarm took its place)
    status: str = "pending"

    @property
    def recipient_id(self) -> int | None:
        """The recipient's id; None for the alert topic, which has no recipient."""
        return self.recipient.id if self.recipient is not None else None


@dataclass(frozen=True, slots=True)
class AttemptInfo:
    at: datetime
    ok: bool
    detail: str | None
    duration_ms: float | None


def _row(row: asyncpg.Record | None) -> asyncpg.Record:
    if row is None:
        raise RuntimeError("a row that must exist was not found")
    return row


def _alarm(row: asyncpg.Record) -> Alarm:
    return Alarm(
        id=row["id"],
        shipment_id=row["shipment_id"],
        dewar_id=row["dewar_id"],
        rule=row["rule"],
        episode_key=row["episode_key"],
        severity=Severity(row["severity"]),
        state=AlarmState(row["state"]),
        condition_active=row["condition_active"],
        started_at=row["started_at"],
        raised_at=row["raised_at"],
        cleared_at=row["cleared_at"],
        acknowledged_at=row["acknowledged_at"],
        acknowledged_by=row["acknowledged_by"],
        ack_comment=row["ack_comment"],
        closed_at=row["closed_at"],
        closed_by=row["closed_by"],
        close_comment=row["close_comment"],
        value=row["value"],
        limit=row["limit_value"],
        message=row["message"],
        escalation_level=row["escalation_level"],
        next_notify_at=row["next_notify_at"],
    )


def _fresh_columns(alarms: Sequence[Alarm]) -> list[list[Any]]:
    """New alarms as the columns `_record_changes` inserts, in its order."""
    return [
        [a.id for a in alarms],
        [a.shipment_id for a in alarms],
        [a.dewar_id for a in alarms],
        [a.rule for a in alarms],
        [a.episode_key for a in alarms],
        [str(a.severity) for a in alarms],
        [str(a.state) for a in alarms],
        [a.condition_active for a in alarms],
        [a.started_at for a in alarms],
        [a.raised_at for a in alarms],
        [a.cleared_at for a in alarms],
        [a.value for a in alarms],
        [a.limit for a in alarms],
        [a.message for a in alarms],
        [a.next_notify_at for a in alarms],
    ]


def _after(alarm: Alarm, t: Transition) -> tuple[Alarm, bool]:
    """The alarm after transition `t` of its episode, and whether that is a change people hear
    of; the same alarm object when `t` changes nothing (a repeat, redelivered or re-derived)."""
    if t.kind == "raised":
        if alarm.state is AlarmState.VOID:
            reraised = replace(
                alarm,
                state=AlarmState.OPEN,
                condition_active=True,
                cleared_at=None,
                value=t.value,
                message=t.message,
            )
            return reraised, True
        # Already known: the latest value and wording, quietly.
        return replace(alarm, value=t.value, message=t.message), False
    if t.kind == "cleared":
        if not alarm.condition_active:
            return alarm, False
        kept = alarm.state in (AlarmState.CLOSED, AlarmState.VOID)
        cleared = replace(
            alarm,
            condition_active=False,
            cleared_at=t.at,
            state=alarm.state if kept else AlarmState.CLEARED,
            value=t.value,
        )
        return cleared, True
    if t.kind == "retracted":
        if alarm.state is AlarmState.VOID:
            return alarm, False
        voided = replace(
            alarm,
            state=AlarmState.VOID,
            condition_active=False,
            next_notify_at=None,
            message=f"retracted: late readings show this did not happen ({alarm.message})",
        )
        return voided, True
    if t.kind == "reopened":
        if alarm.condition_active:
            return alarm, False
        state = AlarmState.OPEN if alarm.acknowledged_at is None else AlarmState.ACKNOWLEDGED
        return replace(alarm, state=state, condition_active=True, cleared_at=None), True
    raise ValueError(f"unknown transition kind {t.kind!r}")


def urgency(body: dict[str, Any]) -> int:
    """Critical first, then major, warning, info: the order notifications are sent in."""
    try:
        return 3 - Severity(str(body.get("severity"))).rank
    except ValueError:
        return 4


def _alarm_change(row: asyncpg.Record) -> AlarmChange:
    return AlarmChange(
        row["id"],
        row["alarm_id"],
        AlarmState(row["state"]),
        Severity(row["severity"]),
        row["at"],
        row["actor"],
        row["comment"],
        row["escalation_level"],
    )


def _recipient(row: asyncpg.Record) -> Recipient:
    return Recipient(
        id=row["id"],
        name=row["name"],
        channel=Channel(row["channel"]),
        address=row["address"],
        secret=row["secret"],
        min_severity=Severity(row["min_severity"]),
        site_id=row["site_id"],
        shipment_id=row["shipment_id"],
        tier=row["tier"],
        quiet_from=row["quiet_from"],
        quiet_until=row["quiet_until"],
        tz=row["tz"],
        active=row["active"],
    )


# Who the audit log names for the alarm changes the service makes itself (21 CFR 11.10(e)):
# the rule engine raises, clears, voids and reopens; the service's reminders escalate.
RULES_ACTOR: Final = "rules"
SERVICE_ACTOR: Final = "coldchain"
_TRANSITION_ACTIONS: Final = {
    "raised": "alarm.raised",
    "cleared": "alarm.cleared",
    "retracted": "alarm.voided",
    "reopened": "alarm.reopened",
}

#: How many times an alarm write is read, worked out and written before it gives up, each
#: time because something it read changed before it could write (`apply_transitions_of`).
_WRITE_ATTEMPTS: Final = 3
#: Alarms whose row version an alarm writer remembers from its own writes (then the oldest go).
_KNOWN_ALARMS: Final = 20_000
#: Ids an alarm write's read takes beyond what it needs, for the next writes to use.
_SPARE_IDS: Final = 64


@dataclass(frozen=True, slots=True)
class _Episodes:
    """What an alarm write reads before it works out the changes (`Store._read_episodes`)."""

    current: dict[tuple[str, str], Alarm]  # by (shipment, episode key)
    versions: dict[int, str]  # each alarm's row version (`xmin`) as read
    recipients: list[Recipient]
    fingerprint: str  # the recipients' version (`coldchain_recipients_version()`)
    change_ids: list[int]
    alarm_ids: list[int]


class Store(ShipmentStore):
    """Every query the service makes: telemetry, shipments, and alarms with their outbox."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        # Alarm writes that found what they read changed, and were worked out again.
        self.alarm_write_retries = 0
        # What the alarm writer learnt from its last read and its own writes, so that the
        # next write can go without reading first (`_known_episodes`): alarms by episode with
        # their row versions, the recipients with theirs, and ids taken but not yet used.
        self._known: dict[tuple[str, str], tuple[Alarm, str]] = {}
        self._known_recipients: tuple[list[Recipient], str] | None = None
        self._spare_change_ids: list[int] = []
        self._spare_alarm_ids: list[int] = []

    async def apply_transitions(
        self, shipment: Shipment, transitions: Sequence[Transition]
    ) -> list[Alarm]:
        """Upsert the episodes' alarms, record each change, and queue its notifications, in one
        transaction. Idempotent: a transition already applied changes nothing."""
        return await self.apply_transitions_of([(shipment, transitions)])

    async def apply_transitions_of(
        self,
        work: Sequence[tuple[Shipment, Sequence[Transition]]],
        *,
        claim: int = 0,
        claimed: list[Notification] | None = None,
    ) -> list[Alarm]:
        """`apply_transitions` for several shipments at once (a committed batch's worth), each
        shipment's in order, all or nothing. Set-based, and in two round trips when nobody else
        changes the same alarms meanwhile: the episodes' alarms, the recipients and ids are read
        in one statement (without a lock, outside a transaction), each transition's effect is
        worked out here in order, and everything is written in one more statement, which first
        checks that what was read is unchanged (`_record_changes`). When it is not (a person
        acknowledged one of the alarms meanwhile), nothing was written, and it is all read and
        worked out again. Without a transaction open across the round trips, each of which
        waits a turn of a busy event loop, there are two of them instead of four.

        With `claim`, up to that many of the outbox rows due at once are written claimed (as
        `due_notifications` claims them) and appended to `claimed`, for the caller's dispatcher
        to send without reading them back."""
        items = [(shipment, t) for shipment, transitions in work for t in transitions]
        if not items:
            return []
        async with self._connection() as conn:
            for attempt in range(_WRITE_ATTEMPTS - 1):
                try:
                    return await self._write_transitions(
                        conn, items, claim, claimed, known=attempt == 0
                    )
                except asyncpg.SerializationError:
                    # Not a word of it was written; `claimed` is only appended to after the write.
                    self.alarm_write_retries += 1
            return await self._write_transitions(conn, items, claim, claimed, known=False)

    async def _write_transitions(
        self,
        conn: Connection,
        items: Sequence[tuple[Shipment, Transition]],
        claim: int,
        claimed: list[Notification] | None,
        *,
        known: bool,
    ) -> list[Alarm]:
        """One attempt; with `known`, from what this store already knows if it knows enough
        (one round trip), else from a read (two)."""
        read = await self._episodes(conn, items, known=known)
        current = read.current
        alarm_ids = iter(read.alarm_ids)
        now = datetime.now(UTC)
        fresh: dict[tuple[str, str], Alarm] = {}  # new episodes' alarms, in their latest state
        touched: dict[int, Alarm] = {}  # alarms that were there before, in their new state
        changes: list[tuple[Alarm, Shipment, Transition]] = []
        for shipment, t in items:
            key = (shipment.id, t.episode_key)
            alarm = current.get(key)
            if alarm is None:
                if t.kind != "raised":
                    logger.warning(
                        "transition %s for unknown episode %s of %s; ignored",
                        t.kind,
                        t.episode_key,
                        shipment.id,
                    )
                    continue
                alarm = self._raised(next(alarm_ids), shipment, t, now)
                current[key] = fresh[key] = alarm
                changes.append((alarm, shipment, t))
                continue
            after, changed = _after(alarm, t)
            if after is alarm:
                continue
            current[key] = after
            if key in fresh:
                fresh[key] = after
            else:
                touched[after.id] = after
            if changed:
                changes.append((after, shipment, t))

        def audit(change_ids: Sequence[int]) -> list[_AuditRow]:
            return [
                (
                    RULES_ACTOR,
                    _TRANSITION_ACTIONS[t.kind],
                    "alarm",
                    str(a.id),
                    {
                        "change_id": change_id,
                        "rule": a.rule,
                        "shipment_id": a.shipment_id,
                        "state": str(a.state),
                        "severity": str(a.severity),
                        "at": t.at,  # device time
                        "value": t.value,
                        "limit": t.limit,
                        "message": a.message,
                    },
                )
                for (a, _, t), change_id in zip(changes, change_ids, strict=True)
            ]

        written: dict[int, str] = {}
        try:
            await self._record_changes(
                conn,
                [(a, s, None, None) for a, s, _ in changes],
                read.recipients,
                audit=audit,
                updated=list(touched.values()),
                change_ids=read.change_ids[: len(changes)],
                claim=claim,
                claimed=claimed,
                fresh=list(fresh.values()),
                unchanged=(read.versions, read.fingerprint),
                written=written,
            )
        except asyncpg.SerializationError:
            for key in {(s.id, t.episode_key) for s, t in items}:
                self._known.pop(key, None)
            self._known_recipients = None
            raise
        self._remember([*fresh.values(), *touched.values()], written)
        return [a for a, _, _ in changes]

    async def _episodes(
        self, conn: Connection, items: Sequence[tuple[Shipment, Transition]], *, known: bool
    ) -> _Episodes:
        if known:
            episodes = self._known_episodes(items)
            if episodes is not None:
                return episodes
        return await self._read_episodes(conn, items)

    def _known_episodes(self, items: Sequence[tuple[Shipment, Transition]]) -> _Episodes | None:
        """What `_read_episodes` would read, from this store's last read and its own writes
        since, or None if that is not enough: an episode it has no alarm for that the items do
        more than raise, or too few ids left. An episode it has no alarm for is taken to have
        none; the write's guard refuses it if one exists (raised by another instance, or before
        a restart), as it refuses a known alarm or recipient changed since, and the write is
        worked out again from a read."""
        if self._known_recipients is None:
            return None
        current: dict[tuple[str, str], Alarm] = {}
        versions: dict[int, str] = {}
        raised: set[tuple[str, str]] = set()
        for shipment, t in items:
            key = (shipment.id, t.episode_key)
            got = self._known.get(key)
            if got is not None:
                alarm, version = got
                current[key] = alarm
                versions[alarm.id] = version
            elif t.kind == "raised" or key in raised:
                raised.add(key)
            else:
                return None
        if len(self._spare_change_ids) < len(items) or len(self._spare_alarm_ids) < len(raised):
            return None
        change_ids = self._spare_change_ids[: len(items)]
        alarm_ids = self._spare_alarm_ids[: len(raised)]
        del self._spare_change_ids[: len(items)], self._spare_alarm_ids[: len(raised)]
        recipients, fingerprint = self._known_recipients
        return _Episodes(current, versions, recipients, fingerprint, change_ids, alarm_ids)

    def _remember(self, alarms: Sequence[Alarm], versions: Mapping[int, str]) -> None:
        """Keep the alarms this store wrote, as written, with their new row versions."""
        for alarm in alarms:
            key = (alarm.shipment_id, alarm.episode_key)
            self._known.pop(key, None)  # to the end: the oldest go first
            version = versions.get(alarm.id)
            if version is not None:
                self._known[key] = (alarm, version)
        while len(self._known) > _KNOWN_ALARMS:
            del self._known[next(iter(self._known))]

    def _raised(self, alarm_id: int, shipment: Shipment, t: Transition, now: datetime) -> Alarm:
        """The alarm of a new episode, as its first raise has it."""
        return Alarm(
            id=alarm_id,
            shipment_id=shipment.id,
            dewar_id=shipment.dewar_id,
            rule=t.rule,
            episode_key=t.episode_key,
            severity=t.severity,
            state=AlarmState.OPEN,
            condition_active=True,
            started_at=t.started_at,
            raised_at=now,
            cleared_at=None,
            acknowledged_at=None,
            acknowledged_by=None,
            ack_comment=None,
            closed_at=None,
            closed_by=None,
            close_comment=None,
            value=t.value,
            limit=t.limit,
            message=t.message,
            escalation_level=0,
            next_notify_at=self._next_reminder(t.severity, now),
        )

    def _next_reminder(self, severity: Severity, now: datetime) -> datetime | None:
        """When an unacknowledged alarm of `severity` is next reminded of, from `now`."""
        remind = REMIND_AFTER[severity]
        return None if remind is None else now + remind * self.remind_scale

    async def _read_episodes(
        self, conn: Connection, items: Sequence[tuple[Shipment, Transition]]
    ) -> _Episodes:
        """In one round trip, without locking anything: the alarms of the items' episodes that
        exist, each with its row version; the active recipients and their version; ids for as
        many alarm changes as there are items, and for an alarm of each episode that the items
        raise (ascending; those not used are skipped). All of it is remembered for the next
        writes (`_known_episodes`), with `_SPARE_IDS` more ids of each kind."""
        keys = {(s.id, t.episode_key) for s, t in items}
        raised = len({(s.id, t.episode_key) for s, t in items if t.kind == "raised"})
        need_changes = len(items)
        rows = await conn.fetch(
            "SELECT k.change_ids, k.alarm_ids, k.recipients, k.fingerprint, a.* FROM (SELECT"
            " (SELECT array_agg(nextval(pg_get_serial_sequence('alarm_changes', 'id')))"
            " FROM generate_series(1, $3)) AS change_ids,"
            " (SELECT array_agg(nextval(pg_get_serial_sequence('alarms', 'id')))"
            " FROM generate_series(1, $4)) AS alarm_ids,"
            " array(SELECT r FROM recipients r WHERE active ORDER BY id) AS recipients,"
            " coldchain_recipients_version() AS fingerprint) k"
            " LEFT JOIN LATERAL (SELECT a.xmin::text AS version, a.* FROM alarms a"
            " JOIN unnest($1::text[], $2::text[]) AS u (shipment_id, episode_key)"
            " USING (shipment_id, episode_key)) a ON true",
            [k[0] for k in keys],
            [k[1] for k in keys],
            need_changes + _SPARE_IDS,
            raised + _SPARE_IDS,
        )
        first = rows[0]
        alarms = [(_alarm(r), r["version"]) for r in rows if r["id"] is not None]
        recipients = [_recipient(r) for r in first["recipients"]]
        change_ids = sorted(first["change_ids"])
        alarm_ids = sorted(first["alarm_ids"])
        # The spares replace any older ones: a change written after this read then has a
        # higher id than any change to the same alarm made before it, by anyone.
        self._spare_change_ids = change_ids[need_changes:]
        self._spare_alarm_ids = alarm_ids[raised:]
        self._known_recipients = (recipients, first["fingerprint"])
        self._remember([a for a, _ in alarms], {a.id: version for a, version in alarms})
        return _Episodes(
            current={(a.shipment_id, a.episode_key): a for a, _ in alarms},
            versions={a.id: version for a, version in alarms},
            recipients=recipients,
            fingerprint=first["fingerprint"],
            change_ids=change_ids[:need_changes],
            alarm_ids=alarm_ids[:raised],
        )

    async def _record_changes(
        self,
        conn: Connection,
        changes: Sequence[tuple[Alarm, Shipment, str | None, str | None]],
        recipients: list[Recipient],
        *,
        audit: Callable[[Sequence[int]], Sequence[_AuditRow]] | None = None,
        updated: Sequence[Alarm] = (),
        change_ids: Sequence[int] | None = None,
        claim: int = 0,
        claimed: list[Notification] | None = None,
        fresh: Sequence[Alarm] = (),
        unchanged: tuple[Mapping[int, str], str] | None = None,
        written: dict[int, str] | None = None,
    ) -> list[int]:
        """Record alarm changes (the alarm as it is after each, who made it and why), in order,
        each with its outbox rows: the alert topic and every recipient who wants it. One
        statement, however many changes, that also inserts the `fresh` alarms, writes the
        `updated` alarms' new state and the audit entries `audit` makes of the changes' ids.
        Returns those ids (`change_ids` if given, else new ones). Up to `claim` rows due now
        are written claimed for a minute and appended to `claimed` (see
        `apply_transitions_of`).

        The statement writes nothing, and raises `asyncpg.SerializationError`, when a `fresh`
        alarm's episode already has one, or, with `unchanged` (each alarm's row version as
        read, and the recipients' fingerprint), when any of those alarms or the recipients
        changed since: then what the caller worked out from them may be wrong. `written`, if
        given, gets the new row version of each `fresh` and `updated` alarm."""
        if not changes and not updated and not fresh:
            return []
        if change_ids is None or len(change_ids) < len(changes):
            change_ids = sorted(
                await conn.fetchval(
                    "SELECT array_agg(nextval(pg_get_serial_sequence('alarm_changes', 'id')))"
                    " FROM generate_series(1, $1)",
                    len(changes),
                )
                or ()
            )
        ids = list(change_ids[: len(changes)])
        now = datetime.now(UTC)
        latest = {a.id: i for i, (a, *_) in enumerate(changes)}
        claim_until = now + CLAIM_FOR
        rows: list[tuple[Any, ...]] = []
        for i, ((alarm, shipment, actor, comment), change_id) in enumerate(
            zip(changes, ids, strict=True)
        ):
            body = alert_body(alarm, change_id=change_id, actor=actor, comment=comment)
            rows.append((change_id, alarm.id, "mqtt", None, body, now, None, "pending"))
            sites = (shipment.origin, shipment.destination)
            for r in recipients:
                if r.wants(alarm.severity, shipment.id, sites, alarm.escalation_level):
                    held = r.quiet_until_instant(alarm.severity, now)
                    status = "pending" if held is None or latest[alarm.id] == i else "superseded"
                    rows.append(
                        (change_id, alarm.id, str(r.channel), r.id, body, held or now, held, status)
                    )
        if claimed is None:
            claim = 0
        if claim:
            for i, row in enumerate(rows):
                if claim and row[7] == "pending" and row[6] is None:
                    rows[i] = (*row[:5], claim_until, *row[6:])
                    claim -= 1
        outbox = [list(column) for column in zip(*rows, strict=True)] or [[]] * 8
        outbox[4] = [_json_encoder.encode(body).decode() for body in outbox[4]]
        entries = list(audit(ids)) if audit is not None else []
        audit_columns = [list(column) for column in zip(*entries, strict=True)] or [[]] * 5
        audit_columns[4] = [_json_encoder.encode(detail).decode() for detail in audit_columns[4]]
        # One statement, so one round trip: the sub-statements all see the rows as they were
        # before it, so a recipient in quiet hours hears an alarm once when they end, in its
        # latest state: a change takes the place of the alarm's deliveries still held (earlier
        # reminders, or what came before someone acknowledged or closed it), and among this
        # statement's own rows those of earlier changes are written superseded (above).
        versions, fingerprint = unchanged if unchanged is not None else ({}, None)
        # The guard runs before anything is written (every write below is gated on it): it
        # locks the alarms that were read, keeping those whose row version is still the one
        # read (a lock waits for a writer in between and sees its row), and inserts the new
        # episodes' alarms, which a conflict skips.
        inserted = await conn.fetch(
            "WITH locked AS (SELECT a.id FROM alarms a JOIN unnest($29::bigint[], $30::text[])"
            " AS e (id, version) ON a.id = e.id WHERE a.xmin::text = e.version"
            " ORDER BY a.id FOR UPDATE OF a),"
            " fresh AS (INSERT INTO alarms (id, shipment_id, dewar_id, rule, episode_key,"
            " severity, state, condition_active, started_at, raised_at, cleared_at, value,"
            " limit_value, message, next_notify_at) SELECT * FROM unnest($31::bigint[],"
            " $32::text[], $33::text[], $34::text[], $35::text[], $36::text[], $37::text[],"
            " $38::bool[], $39::timestamptz[], $40::timestamptz[], $41::timestamptz[],"
            " $42::float8[], $43::float8[], $44::text[], $45::timestamptz[])"
            " ON CONFLICT (shipment_id, episode_key) DO NOTHING RETURNING id, xmin::text AS v),"
            " guard AS (SELECT coldchain_unchanged("
            "(SELECT count(*) FROM locked) = cardinality($29::bigint[])"
            " AND (SELECT count(*) FROM fresh) = cardinality($31::bigint[])"
            " AND ($46::text IS NULL OR $46::text = coldchain_recipients_version())) AS ok),"
            " alarm_update AS (UPDATE alarms a SET state = u.state,"
            " condition_active = u.active, cleared_at = u.cleared, value = u.value,"
            " message = u.message, next_notify_at = u.notify, updated_at = now()"
            " FROM unnest($1::bigint[], $2::text[], $3::bool[], $4::timestamptz[],"
            " $5::float8[], $6::text[], $7::timestamptz[])"
            " AS u (id, state, active, cleared, value, message, notify)"
            " WHERE a.id = u.id AND (SELECT ok FROM guard) RETURNING a.id, a.xmin::text AS v),"
            " change AS (INSERT INTO alarm_changes (id, alarm_id, state, severity, actor,"
            " comment, escalation_level) SELECT * FROM unnest($8::bigint[], $9::bigint[],"
            " $10::text[], $11::text[], $12::text[], $13::text[], $14::integer[])"
            " WHERE (SELECT ok FROM guard)),"
            " superseded AS (UPDATE notifications SET status = 'superseded'"
            " WHERE alarm_id = ANY($9::bigint[]) AND status = 'pending' AND held_until > $15"
            " AND (SELECT ok FROM guard)),"
            " audit AS (INSERT INTO audit_log (actor, action, entity, entity_id, detail)"
            " SELECT ac, ax, en, ei, d::jsonb FROM unnest($16::text[], $17::text[], $18::text[],"
            " $19::text[], $20::text[]) WITH ORDINALITY AS e (ac, ax, en, ei, d, n)"
            " WHERE (SELECT ok FROM guard) ORDER BY n),"
            " outbox AS (INSERT INTO notifications (change_id, alarm_id, channel, recipient_id,"
            " body, next_attempt_at, held_until, status)"
            " SELECT c, a, ch, r, b::jsonb, n, h, st FROM unnest($21::bigint[], $22::bigint[],"
            " $23::text[], $24::bigint[], $25::text[], $26::timestamptz[], $27::timestamptz[],"
            " $28::text[]) AS u (c, a, ch, r, b, n, h, st) WHERE (SELECT ok FROM guard)"
            " ON CONFLICT DO NOTHING RETURNING id, change_id, alarm_id, channel, recipient_id,"
            " next_attempt_at, status, created_at)"
            # The outbox rows written, then each alarm written with its new row version.
            " SELECT *, NULL AS version FROM outbox UNION ALL SELECT id, NULL, NULL, NULL, NULL,"
            " NULL, NULL, NULL, v FROM fresh WHERE (SELECT ok FROM guard) UNION ALL"
            " SELECT id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, v FROM alarm_update",
            [a.id for a in updated],
            [str(a.state) for a in updated],
            [a.condition_active for a in updated],
            [a.cleared_at for a in updated],
            [a.value for a in updated],
            [a.message for a in updated],
            [a.next_notify_at for a in updated],
            ids,
            [a.id for a, *_ in changes],
            [str(a.state) for a, *_ in changes],
            [str(a.severity) for a, *_ in changes],
            [actor for _, _, actor, _ in changes],
            [comment for *_, comment in changes],
            [a.escalation_level for a, *_ in changes],
            now,
            *audit_columns,
            *outbox,
            list(versions),
            list(versions.values()),
            *_fresh_columns(fresh),
            fingerprint,
        )
        if written is not None:
            written.update((got["id"], got["version"]) for got in inserted if got["version"])
        inserted = [got for got in inserted if got["version"] is None]
        if claimed is not None:
            by_id = {r.id: r for r in recipients}
            bodies = {(row[0], row[2], row[3]): row[4] for row in rows}
            for got in inserted:
                if got["status"] == "pending" and got["next_attempt_at"] == claim_until:
                    claimed.append(
                        Notification(
                            got["id"],
                            got["alarm_id"],
                            Channel(got["channel"]),
                            by_id.get(got["recipient_id"]),
                            bodies[got["change_id"], got["channel"], got["recipient_id"]],
                            0,
                            got["created_at"],
                        )
                    )
        return ids

    async def _recipients(self, conn: Connection) -> list[Recipient]:
        return [
            _recipient(r)
            for r in await conn.fetch("SELECT * FROM recipients WHERE active ORDER BY id")
        ]

    async def acknowledge_alarm(self, alarm_id: int, comment: str, actor: Actor) -> Alarm:
        return await self._person_acts(alarm_id, comment, actor, close=False)

    async def close_alarm(
        self, alarm_id: int, comment: str, actor: Actor, cumulative: bool
    ) -> Alarm:
        return await self._person_acts(alarm_id, comment, actor, close=True, cumulative=cumulative)

    async def _person_acts(
        self, alarm_id: int, comment: str, actor: Actor, *, close: bool, cumulative: bool = False
    ) -> Alarm:
        async with self._connection() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT * FROM alarms WHERE id = $1 FOR UPDATE", alarm_id)
            if row is None:
                raise NotFound(f"no alarm {alarm_id}")
            alarm = _alarm(row)
            if close:
                close_check(alarm, cumulative)
                updated = await conn.fetchrow(
                    "UPDATE alarms SET state = 'closed', closed_at = now(), closed_by = $2,"
                    " close_comment = $3, next_notify_at = NULL,"
                    " acknowledged_at = coalesce(acknowledged_at, now()),"
                    " acknowledged_by = coalesce(acknowledged_by, $2),"
                    " ack_comment = coalesce(ack_comment, $3), updated_at = now()"
                    " WHERE id = $1 RETURNING *",
                    alarm_id,
                    actor.label,
                    comment,
                )
            else:
                acknowledge_check(alarm)
                state = "cleared" if alarm.state is AlarmState.CLEARED else "acknowledged"
                updated = await conn.fetchrow(
                    "UPDATE alarms SET state = $4, acknowledged_at = now(),"
                    " acknowledged_by = $2, ack_comment = $3, next_notify_at = NULL,"
                    " updated_at = now() WHERE id = $1 RETURNING *",
                    alarm_id,
                    actor.label,
                    comment,
                    state,
                )
            if updated is None:
                raise RuntimeError("UPDATE ... RETURNING returned no row")
            result = _alarm(updated)
            shipment = _shipment(
                _row(
                    await conn.fetchrow("SELECT * FROM shipments WHERE id = $1", result.shipment_id)
                )
            )
            await self._record_changes(
                conn,
                [(result, shipment, actor.label, comment)],
                await self._recipients(conn),
                audit=lambda _: [
                    (
                        actor.label,
                        "alarm.closed" if close else "alarm.acknowledged",
                        "alarm",
                        str(alarm_id),
                        {
                            "comment": comment,
                            "rule": result.rule,
                            "shipment_id": result.shipment_id,
                        },
                    )
                ],
            )
        return result

    async def remind_due(self, now: datetime) -> list[Alarm]:
        """Repeat and escalate alarms nobody has acknowledged in time: one tier further each
        time; the change goes to the alert topic and to every tier up to the new level."""
        out: list[Alarm] = []
        async with self._connection() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT * FROM alarms WHERE next_notify_at <= $1 AND acknowledged_at IS NULL"
                " AND state IN ('open', 'cleared') ORDER BY next_notify_at LIMIT 200"
                " FOR UPDATE SKIP LOCKED",
                now,
            )
            if not rows:
                return out
            recipients = await self._recipients(conn)
            due = [_alarm(row) for row in rows]
            updated = await conn.fetch(
                "UPDATE alarms a SET escalation_level = a.escalation_level + 1,"
                " next_notify_at = d.next_notify_at, updated_at = now()"
                " FROM unnest($1::bigint[], $2::timestamptz[]) AS d (id, next_notify_at)"
                " WHERE a.id = d.id RETURNING a.*",
                [a.id for a in due],
                [self._next_reminder(a.severity, now) for a in due],
            )
            by_id = {r["id"]: _alarm(r) for r in updated}
            out = [by_id[a.id] for a in due if a.id in by_id]  # most overdue first
            shipments = {
                r["id"]: _shipment(r)
                for r in await conn.fetch(
                    "SELECT * FROM shipments WHERE id = ANY($1::text[])",
                    list({a.shipment_id for a in out}),
                )
            }
            comments = [
                f"not acknowledged: reminder {a.escalation_level}, escalated to "
                f"tier {a.escalation_level}"
                for a in out
            ]
            await self._record_changes(
                conn,
                [
                    (a, shipments[a.shipment_id], None, comment)
                    for a, comment in zip(out, comments, strict=True)
                ],
                recipients,
                audit=lambda change_ids: [
                    (
                        SERVICE_ACTOR,
                        "alarm.escalated",
                        "alarm",
                        str(a.id),
                        {
                            "change_id": change_id,
                            "rule": a.rule,
                            "shipment_id": a.shipment_id,
                            "escalation_level": a.escalation_level,
                            "comment": comment,
                        },
                    )
                    for a, comment, change_id in zip(out, comments, change_ids, strict=True)
                ],
            )
        return out

    async def alarms(
        self,
        *,
        state: AlarmState | None = None,
        shipment_id: str | None = None,
        severity: Severity | None = None,
        limit: int = 100,
        before: int | None = None,
    ) -> list[Alarm]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT * FROM alarms WHERE ($1::text IS NULL OR state = $1)"
                " AND ($2::text IS NULL OR shipment_id = $2)"
                " AND ($3::text IS NULL OR severity = $3) AND ($4::bigint IS NULL OR id < $4)"
                " ORDER BY id DESC LIMIT $5",
                None if state is None else str(state),
                shipment_id,
                None if severity is None else str(severity),
                before,
                limit,
            )
        return [_alarm(r) for r in rows]

    async def alarm(self, alarm_id: int) -> tuple[Alarm, list[AlarmChange]]:
        async with self._connection() as conn:
            row = await conn.fetchrow("SELECT * FROM alarms WHERE id = $1", alarm_id)
            if row is None:
                raise NotFound(f"no alarm {alarm_id}")
            changes = await conn.fetch(
                "SELECT * FROM alarm_changes WHERE alarm_id = $1 ORDER BY id", alarm_id
            )
        return _alarm(row), [_alarm_change(c) for c in changes]

    async def alarm_history(self, shipment_id: str) -> list[tuple[Alarm, list[AlarmChange]]]:
        """Every alarm of a shipment, oldest first, each with its changes in order."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT * FROM alarms WHERE shipment_id = $1 ORDER BY started_at, id", shipment_id
            )
            changes = await conn.fetch(
                "SELECT c.* FROM alarm_changes c JOIN alarms a ON a.id = c.alarm_id"
                " WHERE a.shipment_id = $1 ORDER BY c.id",
                shipment_id,
            )
        by_alarm: dict[int, list[AlarmChange]] = {r["id"]: [] for r in rows}
        for c in changes:
            by_alarm[c["alarm_id"]].append(_alarm_change(c))
        return [(_alarm(r), by_alarm[r["id"]]) for r in rows]

    async def open_alarms(self, shipment_id: str) -> list[Alarm]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT * FROM alarms WHERE shipment_id = $1"
                " AND state IN ('open', 'acknowledged', 'cleared') ORDER BY id",
                shipment_id,
            )
        return [_alarm(r) for r in rows]

    # Recipients ------------------------------------------------------------------------------

    async def recipients(self) -> list[Recipient]:
        async with self._connection() as conn:
            return [_recipient(r) for r in await conn.fetch("SELECT * FROM recipients ORDER BY id")]

    async def add_recipient(self, r: Recipient, actor: str) -> Recipient:
        async with self._connection() as conn, conn.transaction():
            try:
                row = await conn.fetchrow(
                    "INSERT INTO recipients (name, channel, address, secret, min_severity,"
                    " site_id, shipment_id, tier, quiet_from, quiet_until, tz, active)"
                    " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12) RETURNING *",
                    r.name,
                    str(r.channel),
                    r.address,
                    r.secret,
                    str(r.min_severity),
                    r.site_id,
                    r.shipment_id,
                    r.tier,
                    r.quiet_from,
                    r.quiet_until,
                    r.tz,
                    r.active,
                )
            except asyncpg.ForeignKeyViolationError as exc:
                raise BadRequest("unknown site_id or shipment_id") from exc
            if row is None:
                raise RuntimeError("INSERT ... RETURNING returned no row")
            added = _recipient(row)
            await _audit(
                conn,
                actor,
                "recipient.added",
                "recipient",
                str(added.id),
                {
                    "name": r.name,
                    "channel": str(r.channel),
                    "tier": r.tier,
                    "min_severity": str(r.min_severity),
                },
            )
        return added

    async def remove_recipient(self, recipient_id: int, actor: str) -> None:
        async with self._connection() as conn, conn.transaction():
            status = await conn.execute(
                "UPDATE recipients SET active = false WHERE id = $1 AND active", recipient_id
            )
            if status.endswith(" 0"):
                raise NotFound(f"no active recipient {recipient_id}")
            await _audit(conn, actor, "recipient.removed", "recipient", str(recipient_id))

    # Outbox ----------------------------------------------------------------------------------

    async def due_notifications(
        self,
        now: datetime,
        limit: int = 100,
        *,
        in_flight: Sequence[int] = (),
        busy: Mapping[int, int] | None = None,
        per_recipient: int = 1_000_000,
    ) -> list[Notification]:
        """Pending notifications whose time has come, claimed for a minute so that another
        instance does not send them at the same time. Not those `in_flight` here already, and
        no more for one recipient than `per_recipient` less its deliveries in flight (`busy`),
        so that a receiver that hangs cannot take every slot; the alert topic is not capped.
        Most urgent first: after a flood of lesser alarms (a network outage raising "signal
        lost" for a whole fleet), a critical one does not wait behind them."""
        busy = busy or {}
        async with self._connection() as conn, conn.transaction():
            rows = await conn.fetch(
                "WITH busy AS"
                " (SELECT * FROM unnest($3::bigint[], $4::int[]) AS b (recipient_id, n)),"
                " candidates AS (SELECT n.id, n.recipient_id, CASE a.severity"
                " WHEN 'critical' THEN 0 WHEN 'major' THEN 1 WHEN 'warning' THEN 2 ELSE 3 END"
                " AS urgency FROM notifications n JOIN alarms a ON a.id = n.alarm_id"
                " WHERE n.status = 'pending' AND n.next_attempt_at <= $1"
                " AND NOT n.id = ANY($5::bigint[])"
                " AND (n.recipient_id IS NULL OR n.recipient_id NOT IN"
                " (SELECT recipient_id FROM busy WHERE n >= $6))"
                " ORDER BY urgency, n.id LIMIT $7),"
                " ranked AS (SELECT c.id, c.urgency, c.recipient_id IS NULL OR coalesce(b.n, 0)"
                " + row_number() OVER (PARTITION BY c.recipient_id ORDER BY c.urgency, c.id)"
                " <= $6 AS fits FROM candidates c LEFT JOIN busy b USING (recipient_id)),"
                " chosen AS (SELECT id FROM ranked WHERE fits ORDER BY urgency, id LIMIT $2)"
                # Only the chosen rows are locked, by the UPDATE. Another instance that chose
                # the same rows waits for this claim and then finds them no longer due (READ
                # COMMITTED re-checks the condition on the row as this claim left it).
                " UPDATE notifications SET next_attempt_at = $8"
                " WHERE id IN (SELECT id FROM chosen) AND status = 'pending'"
                " AND next_attempt_at <= $1"
                " RETURNING *",
                now,
                limit,
                list(busy),
                list(busy.values()),
                list(in_flight),
                per_recipient,
                max(limit * 10, 500),
                now + CLAIM_FOR,
            )
            ids = {r["recipient_id"] for r in rows if r["recipient_id"] is not None}
            recipients = {}
            if ids:
                recipients = {
                    r["id"]: _recipient(r)
                    for r in await conn.fetch(
                        "SELECT * FROM recipients WHERE id = ANY($1)", list(ids)
                    )
                }
        return sorted(
            (
                Notification(
                    r["id"],
                    r["alarm_id"],
                    Channel(r["channel"]),
                    recipients.get(r["recipient_id"]),
                    r["body"],
                    r["attempts"],
                    r["created_at"],
                )
                for r in rows
            ),
            key=lambda n: (urgency(n.body), n.id),
        )

    async def delivered(self, sent: Sequence[tuple[int, str | None, float, datetime]]) -> None:
        """Record deliveries that went through: (notification id, detail, duration in ms, when
        sent). One statement, atomic on its own, for a dispatcher's worth of them.

        Recording the same send twice (the same id and send time: a statement cancelled at
        shutdown after the server had committed it, then written again) changes nothing the
        second time; another send of the same notification is recorded as its own attempt."""
        if not sent:
            return
        ids, details, durations, times = (list(c) for c in zip(*sent, strict=True))
        async with self._connection() as conn:
            await conn.execute(
                "WITH d AS (SELECT * FROM unnest($1::bigint[], $2::text[], $3::float8[],"
                " $4::timestamptz[]) AS d (id, detail, duration_ms, at)),"
                " sent AS (UPDATE notifications n SET status = 'sent', sent_at = d.at,"
                " attempts = n.attempts + 1, last_error = NULL FROM d WHERE n.id = d.id"
                " AND n.sent_at IS DISTINCT FROM d.at RETURNING n.id)"
                " INSERT INTO delivery_attempts (notification_id, at, ok, detail, duration_ms)"
                " SELECT d.id, d.at, true, d.detail, d.duration_ms FROM d JOIN sent USING (id)",
                ids,
                details,
                durations,
                times,
            )

    async def delivery_failed(
        self, notification_id: int, error: str, duration_ms: float, retry_at: datetime | None
    ) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "WITH failed AS (UPDATE notifications SET attempts = attempts + 1,"
                " last_error = $2,"
                " status = CASE WHEN $3::timestamptz IS NULL THEN 'failed' ELSE status END,"
                " next_attempt_at = coalesce($3, next_attempt_at) WHERE id = $1 RETURNING id)"
                " INSERT INTO delivery_attempts (notification_id, ok, detail, duration_ms)"
                " SELECT id, false, $2, $4 FROM failed",
                notification_id,
                error[:1000],
                retry_at,
                duration_ms,
            )

    async def delivery_log(self, alarm_id: int) -> list[tuple[Notification, list[AttemptInfo]]]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT * FROM notifications WHERE alarm_id = $1 ORDER BY id", alarm_id
            )
            attempts = await conn.fetch(
                "SELECT a.* FROM delivery_attempts a JOIN notifications n"
                " ON n.id = a.notification_id WHERE n.alarm_id = $1 ORDER BY a.id",
                alarm_id,
            )
            # On this connection: asking the pool for a second one while holding the first
            # could wait forever once the pool is exhausted.
            recipients = {
                r.id: r
                for r in map(_recipient, await conn.fetch("SELECT * FROM recipients ORDER BY id"))
            }
        by_notification: dict[int, list[AttemptInfo]] = {}
        for a in attempts:
            by_notification.setdefault(a["notification_id"], []).append(
                AttemptInfo(a["at"], a["ok"], a["detail"], a["duration_ms"])
            )
        return [
            (
                Notification(
                    r["id"],
                    r["alarm_id"],
                    Channel(r["channel"]),
                    recipients.get(r["recipient_id"]),
                    r["body"],
                    r["attempts"],
                    r["created_at"],
                    r["status"],
                ),
                by_notification.get(r["id"], []),
            )
            for r in rows
        ]

    # Rule state ------------------------------------------------------------------------------

    async def delivered_shipments(
        self, since: datetime, until: datetime
    ) -> list[DeliveredShipment]:
        """Shipments delivered in [`since`, `until`), for lane statistics (`coldchain.lanes`):
        whether each had an excursion (a major or critical alarm on a profile limit, not
        withdrawn), and its rule state as the rules last saw it."""
        engine_rules = sorted(ENGINE_RULES)
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT s.id, s.origin, s.destination, s.starts_at, s.ends_at AS delivered_at,"
                " s.deliver_by,"
                " EXISTS (SELECT 1 FROM alarms a WHERE a.shipment_id = s.id"
                "   AND a.state <> 'void' AND a.severity IN ('major', 'critical')"
                "   AND NOT (a.rule = ANY($3::text[]))) AS excursion,"
                " r.state AS rule_state"
                " FROM shipments s LEFT JOIN rule_state r ON r.shipment_id = s.id"
                " WHERE s.status = 'delivered' AND s.ends_at >= $1 AND s.ends_at < $2",
                since,
                until,
                engine_rules,
            )
        return [DeliveredShipment(**r) for r in rows]

    async def rule_states(self, shipment_ids: Sequence[str]) -> dict[str, tuple[bytes, datetime]]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT shipment_id, state, fed_through FROM rule_state"
                " WHERE shipment_id = ANY($1)",
                list(shipment_ids),
            )
        return {r["shipment_id"]: (bytes(r["state"]), r["fed_through"]) for r in rows}

    async def save_rule_states(self, states: Sequence[tuple[str, bytes, datetime]]) -> None:
        async with self._connection() as conn, conn.transaction():
            await conn.executemany(
                "INSERT INTO rule_state (shipment_id, state, fed_through) VALUES ($1, $2, $3)"
                " ON CONFLICT (shipment_id) DO UPDATE SET state = EXCLUDED.state,"
                " fed_through = EXCLUDED.fed_through, saved_at = now()",
                states,
            )

    async def active_shipments(self, dewar_ids: Sequence[str] | None = None) -> list[Shipment]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT * FROM shipments WHERE status NOT IN ('delivered', 'cancelled')"
                " AND ($1::text[] IS NULL OR dewar_id = ANY($1))",
                None if dewar_ids is None else list(dewar_ids),
            )
        return [_shipment(r) for r in rows]

    async def readings_since(
        self,
        shipment: Shipment,
        received_after: datetime | None,
        ts_from: datetime | None = None,
        limit: int = 100_000,
    ) -> list[IncomingReading]:
        """A shipment's readings received after a moment (or from a device time), in device
        order: what the rule engine has not seen, or must see again."""
        lower = shipment.starts_at if ts_from is None else max(ts_from, shipment.starts_at)
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT * FROM readings WHERE dewar_id = $1 AND ts >= $2"
                " AND ($3::timestamptz IS NULL OR ts < $3)"
                " AND ($4::timestamptz IS NULL OR received_at > $4)"
                " ORDER BY ts, seq LIMIT $5",
                shipment.dewar_id,
                lower,
                shipment.ends_at,
                received_after,
                limit,
            )
        return [_incoming(r) for r in rows]

    async def last_received(self) -> dict[str, datetime]:
        """When the newest reading of each active shipment's dewar arrived."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT s.id, (SELECT max(r.received_at) FROM readings r"
                " WHERE r.dewar_id = s.dewar_id AND r.ts >= s.starts_at) AS last"
                " FROM shipments s WHERE s.status NOT IN ('delivered', 'cancelled')"
            )
        return {r["id"]: r["last"] for r in rows if r["last"] is not None}
