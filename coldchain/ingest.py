"""The telemetry ingest: MQTT messages in, committed rows out, acknowledgements after commit.

Each message is parsed at once (`sensors.parse_message`) into good readings and dead letters and
parked with its MQTT packet id. A writer task takes parked messages in arrival order, writes
them as one batch (COPY into a staging table, then an insert that drops duplicates), and only
after the transaction commits hands their packet ids to the broker link, which acknowledges the
whole batch in one write. Two writers take turns (`writers`): while one batch commits the next
is written, and batches are acknowledged and handed to the rules in the order they were taken.
A batch is written when it holds `batch_size` readings or `flush_interval_s` after its first
message. No task or future is made per message: at tens of
thousands of messages a second those were a third of the service's CPU.

If a write fails for any reason but the data itself (PostgreSQL unreachable, read-only after a
failover, out of disk or memory, shutting down, or an error nobody expected), the writer keeps
the same batch and retries with capped backoff, and the store is not ready; nothing is
acknowledged meanwhile, and once `max_outstanding` messages are held the link stops
reading, so memory stays bounded and the broker keeps the rest. A crash at any point loses
nothing: unacknowledged messages are delivered again and their readings are stored once by
`(dewar_id, seq)`. Only when PostgreSQL refuses the data itself (`Unstorable`: a value, a
constraint, a size limit) are the batch's messages written one at a time, and each one refused
on its own becomes a dead letter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final, Protocol

import msgspec

from coldchain.errors import StoreUnavailable, Unstorable
from coldchain.metrics import Registry
from coldchain.store import BatchResult, DeadLetter, DewarStatus, IncomingReading, Store
from sensors import parse_message
from sensors.schema import TOO_DEEP, Timestamp
from sensors.topics import dewar_id_of

if TYPE_CHECKING:
    from coldchain.broker import Message

logger = logging.getLogger(__name__)

_BATCH_BUCKETS: Final = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000)
_LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class BrokerControl(Protocol):
    """What the ingest needs of the MQTT link (see `coldchain.broker.BrokerLink`)."""

    def acknowledge(self, packet_ids: list[int]) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class ArrivalSink(Protocol):
    """Takes each message's readings as they arrive, before commit (`coldchain.watch.Watch`)."""

    def arrived(self, readings: list[IncomingReading]) -> None: ...

    @property
    def backlog(self) -> int:
        """Readings taken and not yet dealt with: they count against `max_outstanding`."""
        ...


class _StatusMessage(msgspec.Struct, frozen=True):
    state: str
    ts: Timestamp


_status_decoder: Final = msgspec.json.Decoder(_StatusMessage)


class _Parked(msgspec.Struct, gc=False):
    """One message taken and waiting for its batch's commit (a Struct: one is made per message,
    in 0.33 µs here against 0.70 µs for the slotted dataclass it was)."""

    topic: str
    payload: bytes
    readings: list[IncomingReading]
    dead_letters: list[DeadLetter]
    statuses: list[DewarStatus]
    arrived: float
    packet_id: int | None  # None for QoS 0: nothing to acknowledge
    index: int = 0  # messages handled before this one


class IngestMetrics:
    """What `/metrics` shows of the ingest."""

    def __init__(self, r: Registry) -> None:
        self.messages = r.counter(
            "coldchain_ingest_messages_total",
            "MQTT messages received on telemetry and status topics",
        )
        self.received = r.counter(
            "coldchain_ingest_readings_received_total",
            "Valid readings received (before de-duplication)",
        )
        self.stored = r.counter(
            "coldchain_ingest_readings_stored_total",
            "Readings committed to PostgreSQL for the first time",
        )
        self.duplicates = r.counter(
            "coldchain_ingest_readings_duplicate_total",
            "Readings received again (same dewar and seq), not stored twice",
        )
        self.dead_letters = r.counter(
            "coldchain_ingest_dead_letters_total",
            "Messages or batch items rejected and kept as dead letters",
        )
        self.commit_failures = r.counter(
            "coldchain_ingest_commit_failures_total",
            "Batch writes that failed and were held for a retry: PostgreSQL was unavailable",
        )
        self.read_pauses = r.counter(
            "coldchain_ingest_read_pauses_total",
            "Times the ingest held its limit of uncommitted messages and stopped reading",
        )
        self.batch_size = r.histogram(
            "coldchain_ingest_batch_readings", "Readings per committed batch", _BATCH_BUCKETS
        )
        self.commit_seconds = r.histogram(
            "coldchain_ingest_commit_seconds",
            "Time to write and commit one batch",
            _LATENCY_BUCKETS,
        )
        self.lag_seconds = r.histogram(
            "coldchain_ingest_lag_seconds",
            "From a message's arrival to its commit (consumer lag)",
            _LATENCY_BUCKETS,
        )


class Ingest:
    """Parses, batches and writes telemetry; `handle` is the MQTT message handler."""

    def __init__(
        self,
        store: Store,
        registry: Registry,
        *,
        batch_size: int,
        flush_interval_s: float,
        backoff_cap_s: float = 5.0,
        max_outstanding: int = 16000,
        writers: int = 2,
    ) -> None:
        self._store = store
        self._batch_size = batch_size
        self._flush_interval_s = flush_interval_s
        self._backoff_cap_s = backoff_cap_s
        self._parked: deque[_Parked] = deque()
        self._writers = writers
        self._writing_messages = 0  # in the batches being written (`outstanding`, per message)
        self._tickets = 0  # batches ever taken
        self._handed = 0  # batches acknowledged and handed on, in the order they were taken
        self._turn = asyncio.Condition()
        self._parked_readings = 0
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._store_problem: str | None = None
        self._max_outstanding = max_outstanding
        self._link: BrokerControl | None = None
        self._after_commit: Callable[[list[IncomingReading]], Awaitable[None]] | None = None
        self._sink: ArrivalSink | None = None
        self._handled = 0  # messages ever handled
        self._settled = 0  # messages handled before the oldest not yet committed
        self._settling = asyncio.Event()
        self._paused = False
        self.metrics = IngestMetrics(registry)
        registry.gauge(
            "coldchain_ingest_pending_messages",
            "Messages received and not yet committed (awaiting acknowledgement)",
            source=lambda: float(self.outstanding),
        )
        registry.gauge(
            "coldchain_ingest_oldest_pending_seconds",
            "Age of the oldest message not yet committed (consumer lag now)",
            source=self._oldest_pending_age,
        )

    def after_commit(self, hook: Callable[[list[IncomingReading]], Awaitable[None]]) -> None:
        """Called with each committed batch's new readings, after they are acknowledged (the
        rules and the live stream); the writer waits for it, so it pushes back on ingest."""
        self._after_commit = hook

    def feed_arrivals(self, sink: ArrivalSink) -> None:
        """Hand each message's valid readings to `sink` as soon as they are parsed, before they
        are committed (the rules: an alarm need not wait for its batch to be written). What the
        sink holds counts against `max_outstanding`; it calls `relieved` as it catches up."""
        self._sink = sink

    async def settled(self) -> None:
        """Return once every message handled so far is committed, or refused for good (what
        the rules wait for before they read readings back from the store)."""
        target = self._handled
        while self._settled < target:
            self._settling.clear()
            await self._settling.wait()

    def relieved(self) -> None:
        """The sink caught up on some readings: read from the broker again if there is room."""
        self._maybe_resume()

    def _held(self) -> int:
        return self.outstanding + (self._sink.backlog if self._sink is not None else 0)

    def _maybe_resume(self) -> None:
        if self._link is not None and self._paused and self._held() <= self._max_outstanding // 2:
            self._paused = False
            logger.debug("down to %d held messages: reading from the broker again", self._held())
            self._link.resume_reading()

    def attach(self, link: BrokerControl) -> None:
        """The broker link: told which messages to acknowledge after each commit, to stop
        reading when `max_outstanding` messages are held, and to read again at half that."""
        self._link = link

    @property
    def outstanding(self) -> int:
        """Messages received and not yet committed: parked plus the batches being written."""
        return len(self._parked) + self._writing_messages

    @property
    def store_ok(self) -> bool:
        """False from a failed write until the next successful one."""
        return self._store_problem is None

    @property
    def store_problem(self) -> str | None:
        """Why the last write failed, until one succeeds; None while writes go through."""
        return self._store_problem

    @property
    def pending(self) -> int:
        return len(self._parked)

    def _oldest_pending_age(self) -> float:
        return time.monotonic() - self._parked[0].arrived if self._parked else 0.0

    def handle(self, topic: str, payload: bytes, packet_id: int | None) -> None:
        """Take one message; it is acknowledged (by `packet_id`) once committed."""
        self.handle_many([(topic, payload, packet_id)])

    def handle_many(self, messages: list[Message]) -> None:
        """Take messages in the order they came (what one read of the socket held); each is
        acknowledged by its packet id once committed. Taken together, so that what is the same
        for all of them (the time, the counters, waking the writer, handing readings to the
        rules, the window) is done once per read rather than once per message."""
        if not messages:
            return
        self.metrics.messages.inc(len(messages))
        now = datetime.now(UTC)
        arrived = time.monotonic()
        parked_queue = self._parked
        readings: list[IncomingReading] = []
        for topic, payload, packet_id in messages:
            try:
                if topic.endswith("/status"):
                    parked = self._status(topic, payload, now, packet_id, arrived)
                else:
                    parked = self._telemetry(topic, payload, now, packet_id, arrived)
            except Exception as exc:
                # Parsing never raises for what a device sends; if it does, that is a bug, but
                # the message still becomes a dead letter instead of holding its slot
                # unacknowledged.
                logger.exception("message on %s could not be parsed; dead-lettered", topic)
                reason = f"could not be parsed ({type(exc).__name__})"
                letter = DeadLetter(now, topic, dewar_id_of(topic), None, reason, payload)
                parked = _Parked(topic, payload, [], [letter], [], arrived, packet_id)
            self._handled += 1
            parked.index = self._handled
            parked_queue.append(parked)
            if parked.readings:
                readings += parked.readings
        if self._sink is not None and readings:
            self._sink.arrived(readings)
        self._parked_readings += len(readings)
        self._arrived.set()
        if self._parked_readings >= self._batch_size:
            self._full.set()
        if not self._paused and self._link is not None and self._held() >= self._max_outstanding:
            self._paused = True
            self.metrics.read_pauses.inc()
            logger.debug(
                "holding %d uncommitted or unjudged messages: pausing reads from the broker",
                self._held(),
            )
            self._link.pause_reading()

    def _telemetry(
        self, topic: str, payload: bytes, now: datetime, packet_id: int | None, arrived: float
    ) -> _Parked:
        parsed = parse_message(topic, payload, now)
        dewar_id = parsed.dewar_id
        readings = [IncomingReading(dewar_id, r, now) for r in parsed.readings] if dewar_id else []
        dead = [
            DeadLetter(now, topic, dewar_id, j.index, j.reason, j.raw) for j in parsed.rejections
        ]
        if dead:
            logger.warning("dead-lettered %d item(s) on %s: %s", len(dead), topic, dead[0].reason)
        return _Parked(topic, payload, readings, dead, [], arrived, packet_id)

    def _status(
        self, topic: str, payload: bytes, now: datetime, packet_id: int | None, arrived: float
    ) -> _Parked:
        status = _parse_status(topic, payload)
        if isinstance(status, DewarStatus):
            return _Parked(topic, payload, [], [], [status], arrived, packet_id)
        logger.warning("dead-lettered status message on %s: %s", topic, status)
        letter = DeadLetter(now, topic, dewar_id_of(topic), None, status, payload)
        return _Parked(topic, payload, [], [letter], [], arrived, packet_id)

    async def run_writer(self) -> None:
        """The writers, until cancelled: up to `writers` batches are written at once (so
        PostgreSQL works on one while the next is taken, and on two cores on both), and each is
        acknowledged and handed on only after every batch taken before it, so the rules and the
        live stream see readings in arrival order."""
        await asyncio.gather(*(self._write_batches() for _ in range(self._writers)))

    async def _write_batches(self) -> None:
        while True:
            await self._arrived.wait()
            if self._parked_readings < self._batch_size:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._flush_interval_s)
            if not self._parked:
                continue  # another writer took them
            ticket = self._tickets
            self._tickets += 1
            batch = self._take_batch()
            last = batch[-1].index
            self._writing_messages += len(batch)
            try:
                stored = await self._write(batch)
                async with self._turn:
                    while self._handed != ticket:
                        await self._turn.wait()
                self._writing_messages -= len(batch)
                self._settled = last  # batches are handed on in the order they were taken
                self._settling.set()
                if self._link is not None:
                    self._link.acknowledge([p.packet_id for p in stored if p.packet_id is not None])
                if self._after_commit is not None:
                    await self._after_commit([r for p in stored for r in p.readings])
            finally:
                async with self._turn:
                    self._handed += 1
                    self._turn.notify_all()
            self._maybe_resume()

    def abandon(self) -> None:
        """On shutdown, after the broker link is closed: forget what is held. None of it was
        acknowledged, so the broker delivers it again to the next session."""
        self._writing_messages = 0
        self._parked.clear()
        self._parked_readings = 0

    def _take_batch(self) -> list[_Parked]:
        batch: list[_Parked] = []
        count = 0
        while self._parked and (
            not batch or count + len(self._parked[0].readings) <= self._batch_size
        ):
            parked = self._parked.popleft()
            batch.append(parked)
            count += len(parked.readings)
        self._parked_readings -= count
        if not self._parked:
            self._arrived.clear()
        if self._parked_readings < self._batch_size:
            self._full.clear()
        return batch

    async def _write(self, batch: list[_Parked]) -> list[_Parked]:
        """Commit a batch; return the messages that may be acknowledged (normally all)."""
        readings = [r for p in batch for r in p.readings]
        dead = [d for p in batch for d in p.dead_letters]
        statuses = [s for p in batch for s in p.statuses]
        started = time.monotonic()
        try:
            result = await self._commit(readings, dead, statuses)
        except Unstorable as exc:
            # PostgreSQL refused something in the batch itself. Store message by message, so
            # the culprit becomes a dead letter and its neighbours go in as usual.
            logger.warning(
                "a batch of %d message(s) was refused (%s); storing them one by one",
                len(batch),
                exc,
            )
            result = BatchResult(0, 0, 0)
            kept = []
            for parked in batch:
                alone = await self._write_alone(parked)
                if alone is not None:
                    result = result + alone
                    kept.append(parked)
            batch = kept
        finished = time.monotonic()
        m = self.metrics
        m.received.inc(result.stored + result.duplicates)
        m.stored.inc(result.stored)
        m.duplicates.inc(result.duplicates)
        m.dead_letters.inc(result.dead_letters)
        m.batch_size.observe(len(readings))
        m.commit_seconds.observe(finished - started)
        for parked in batch:
            m.lag_seconds.observe(finished - parked.arrived)
        return batch

    async def _write_alone(self, parked: _Parked) -> BatchResult | None:
        try:
            return await self._commit(parked.readings, parked.dead_letters, parked.statuses)
        except Unstorable as exc:
            reason = f"could not be stored ({exc.message[:300]})".replace("\x00", "\\u0000")
            logger.warning(
                "message on %s refused by the database; dead-lettered: %s", parked.topic, exc
            )
            letter = DeadLetter(
                datetime.now(UTC),
                parked.topic,
                dewar_id_of(parked.topic),
                None,
                reason,
                parked.payload,
            )
            try:
                return await self._commit([], [letter], [])
            except Unstorable:
                logger.exception(
                    "could not even dead-letter the message on %s; it stays unacknowledged",
                    parked.topic,
                )
                return None

    async def _commit(
        self, readings: list[IncomingReading], dead: list[DeadLetter], statuses: list[DewarStatus]
    ) -> BatchResult:
        """Write and commit, holding the work and retrying with capped backoff through any
        failure but `Unstorable` (the data itself refused), which propagates."""
        delay = 0.1
        while True:
            try:
                result = await self._store.write_batch(readings, dead, statuses)
            except Unstorable:
                raise
            except StoreUnavailable as exc:
                problem: str | None = str(exc)
            except Exception as exc:
                # Not the data: an error nobody foresaw. Log it with its traceback and treat it
                # as the server's trouble, since dead-lettering on a guess could cost readings.
                problem = f"{type(exc).__name__}: {exc}"
                if self._store_problem is None:
                    logger.exception("telemetry write failed unexpectedly")
            else:
                problem = None
            if problem is not None:
                # PostgreSQL is away, read-only, out of disk or memory, shutting down...: none
                # of it is the messages' fault, so hold them all, say not ready, and try again.
                self.metrics.commit_failures.inc()
                if self._store_problem is None:
                    logger.error(
                        "cannot write telemetry (%s); holding messages unacknowledged and retrying",
                        problem,
                    )
                self._store_problem = problem
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff_cap_s)
                continue
            if self._store_problem is not None:
                logger.info("PostgreSQL takes writes again; telemetry writes resumed")
            self._store_problem = None
            return result


def _parse_status(topic: str, payload: bytes) -> DewarStatus | str:
    """A device status message, or the reason it is refused."""
    dewar_id = dewar_id_of(topic)
    if dewar_id is None:
        return f"bad topic {topic[:200]!r}"
    try:
        message = _status_decoder.decode(payload)
    except (msgspec.DecodeError, RecursionError) as exc:
        problem = TOO_DEEP if isinstance(exc, RecursionError) else str(exc)
        return (
            f"bad status message ({problem}); expected "
            '{"state": "online"|"offline", "ts": RFC 3339 time}'
        )
    if message.state not in ("online", "offline"):
        return f"bad status state {message.state!r}: expected online or offline"
    return DewarStatus(dewar_id, message.state, message.ts)
