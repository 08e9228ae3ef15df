"""The watch: runs the excursion rules over every reading as it arrives and turns their
transitions into alarms, notifications and live events.

The ingest hands the valid readings of each read of the broker socket to `Watch.arrived` as it
parses them, before they are committed: an alarm need not wait for its reading's batch to be
written (under load that wait was most of an alert's latency). The watch takes what accumulated,
in arrival order, groups it by the shipment that owns each dewar at that device time, feeds it
to `coldchain.excursions.feed` (or `replay` for a late backlog, reading the stored history back
once the ingest has committed everything that arrived before it: `ArrivalSource.settled`), and
queues the transitions for the alarm writer, which applies all that accumulated in one
transaction with their outbox rows and wakes the dispatcher; evaluation goes on meanwhile.
Readings not yet evaluated count against the ingest's limit of held messages, so a watch that
falls behind makes the ingest stop reading from the broker.

Judging a reading before it is stored loses nothing. It is acknowledged only once committed; if
the service dies first, the broker delivers it again, the rules see it at or before their
watermark and replay the stored history, and whatever is derived again has the same episode key,
so it changes no alarm.

Durability: each shipment's rule state is saved every `SAVE_EVERY_S` with `fed_through`, the
arrival time of the newest reading fed, and only once every transition emitted before the state
was taken is applied. The shipments take turns, a slice of them each second, so that PostgreSQL
gets a steady trickle of upserts rather than a thousand at once (under load that burst held up
the alarms written beside it).
On start the watch reloads each active shipment's state and feeds what arrived after
`fed_through`, so a restart resets no delay; anything re-derived has the same episode key and
changes nothing. Evaluation assumes one instance evaluates a given dewar (one
instance, or instances that each own their dewars); with an MQTT shared subscription spreading
one dewar's messages over instances, alarms would be evaluated twice.

Hold time at risk is judged against the latest time the product must still be cold: the later of
the shipment's `deliver_by` and its current route's ETA (`cold_until`), so a shipment planned
without a deadline is covered too. Both are learnt with the shipments (`_refresh`, at most every
`SHIPMENTS_EVERY_S`, and at once after `shipments_changed`), never per reading.

Signal lost is checked every `beat_s` (`SILENCE_EVERY_S` by default) against the arrival time
of each shipment's last reading (its pack-out, until a first reading arrives). Unacknowledged
alarms are repeated and escalated by `Store.remind_due` on the same beat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Final, Protocol

import msgspec

from coldchain.alarms import Alarm, AlarmState, alert_body
from coldchain.errors import StoreUnavailable
from coldchain.excursions import AlarmTransition, RuleState, feed, replay, silence
from coldchain.metrics import Registry
from coldchain.profiles import Profile
from coldchain.shipments import Shipment
from coldchain.store import IncomingReading, Notification, Store, Transition

logger = logging.getLogger(__name__)

SAVE_EVERY_S: Final = 15.0
SILENCE_EVERY_S: Final = 15.0
SHIPMENTS_EVERY_S: Final = 2.0
TAKE_READINGS: Final = 4000  # readings evaluated per turn, at most (then the next turn)
MAX_PENDING: Final = 5000  # shipments' worth of alarm changes queued before evaluation waits
FLUSH_TIMEOUT_S: Final = 5.0
YIELD_EVERY_S: Final = 0.001  # longest stretch of evaluation without letting others run
# Rule state is saved as msgpack: compact, and several times cheaper to encode than JSON.
_state_encoder: Final = msgspec.msgpack.Encoder()
_state_decoder: Final = msgspec.msgpack.Decoder(RuleState)
_LATENCY: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _Tracked:
    __slots__ = (
        "cold_until",
        "dirty",
        "eta",
        "fed_through",
        "last_received",
        "shipment",
        "signal_lost_since",
        "state",
    )

    def __init__(
        self,
        shipment: Shipment,
        state: RuleState,
        fed_through: datetime | None,
        eta: datetime | None = None,
    ) -> None:
        self.shipment = shipment
        self.state = state
        self.fed_through = fed_through
        self.last_received = fed_through or shipment.starts_at
        self.signal_lost_since: datetime | None = None
        self.dirty = False
        self.eta = eta
        self.cold_until = cold_until(shipment.deliver_by, eta)

    def received(self, newest: datetime) -> None:
        """Readings of the dewar arrived, the newest received at `newest`: it is not silent,
        whether or not they are fed."""
        if newest > self.last_received:
            self.last_received = newest

    def update(self, shipment: Shipment, eta: datetime | None) -> None:
        self.shipment = shipment  # status, deliver_by and window may change
        self.eta = eta  # a re-plan moves it
        self.cold_until = cold_until(shipment.deliver_by, eta)


def cold_until(deliver_by: datetime | None, eta: datetime | None) -> datetime | None:
    """The latest time the product must still be cold: the later of its deliver_by and its
    current route's ETA (either may be missing). The hold-at-risk rule measures against it."""
    if deliver_by is None or eta is None:
        return deliver_by or eta
    return max(deliver_by, eta)


def _decode_state(data: bytes) -> RuleState | None:
    try:
        return _state_decoder.decode(data)
    except msgspec.DecodeError:
        # Saved by another version of the engine: catching up from the shipment's start
        # re-derives it (and its alarms, with the same keys).
        logger.warning("saved rule state could not be read; re-deriving it from the readings")
        return None


def _transition(t: AlarmTransition) -> Transition:
    return Transition(
        t.episode_key,
        t.rule,
        t.severity,
        str(t.kind),
        t.started_at,
        t.at,
        t.value,
        t.limit,
        t.message,
    )


class ArrivalSource(Protocol):
    """Where the readings handed to `Watch.arrived` come from (`coldchain.ingest.Ingest`)."""

    async def settled(self) -> None:
        """Return once every reading handed over so far is committed (or refused for good)."""

    def relieved(self) -> None:
        """The watch evaluated some readings: the source may read again if it had stopped."""


class Outbox(Protocol):
    """Who sends the alarm changes (`coldchain.notify.Dispatcher`): the alarm writer claims up
    to `room()` of the outbox rows it writes and hands them over with `take`, so that they are
    sent without first being read back from the outbox, and wakes it only for what is left."""

    def room(self) -> int: ...

    def take(self, claimed: list[Notification]) -> None: ...

    def wake(self) -> None:
        """Alarm changes were written whose outbox rows it must claim itself."""


class Watch:
    def __init__(
        self,
        store: Store,
        registry: Registry,
        *,
        on_change: Callable[[list[Alarm]], None],
        beat_s: float = SILENCE_EVERY_S,
        source: ArrivalSource | None = None,
        outbox: Outbox | None = None,
    ) -> None:
        """`source` None: every reading handed to `arrived` is already stored (tests); `outbox`
        None: the outbox rows are left for a dispatcher to claim."""
        self._beat_s = beat_s
        self._store = store
        self._on_change = on_change
        self._source = source
        self._outbox = outbox
        self._arrivals: deque[list[IncomingReading]] = deque()
        self._backlog = 0  # readings in `_arrivals`
        self._arrived = asyncio.Event()
        self._tracked: dict[str, _Tracked] = {}  # by shipment id
        self._save_order: dict[str, None] = {}  # shipment ids, next to save first
        self._by_dewar: dict[str, list[Shipment]] = {}
        self._profiles: dict[str, Profile] = {}
        self._refreshed = 0.0
        self._stale = False
        self.ready = asyncio.Event()
        # The alarm writer's queue: transitions in evaluation order, kept until applied.
        self._pending: list[tuple[Shipment, list[Transition]]] = []
        self._enqueued = 0  # entries ever put in `_pending`
        self._applied = 0  # entries ever applied (or given up on)
        self._work = asyncio.Event()
        self._progress = asyncio.Event()
        self._eval_seconds = registry.histogram(
            "coldchain_rules_batch_seconds",
            "Time to evaluate one batch of arrived readings",
            _LATENCY,
        )
        self._alarm_changes = registry.counter(
            "coldchain_alarm_changes_total", "Alarm changes made by the rules and reminders"
        )
        self._write_seconds = registry.histogram(
            "coldchain_alarm_write_seconds",
            "Time to apply the alarm changes that accumulated, in one transaction",
            _LATENCY,
        )

    def shipments_changed(self) -> None:
        """A shipment was created or changed here: look again before the next evaluation."""
        self._stale = True

    def arrived(self, readings: list[IncomingReading]) -> None:
        """Called by the ingest with the readings of each read of the socket, in arrival order."""
        if readings:
            self._arrivals.append(readings)
            self._backlog += len(readings)
            self._arrived.set()

    @property
    def backlog(self) -> int:
        """Readings handed to `arrived` and not yet evaluated."""
        return self._backlog

    def _take(self) -> list[IncomingReading]:
        """What arrived, oldest first, up to about `TAKE_READINGS`."""
        batch: list[IncomingReading] = []
        while self._arrivals and len(batch) < TAKE_READINGS:
            batch += self._arrivals.popleft()
        self._backlog -= len(batch)
        if not self._arrivals:
            self._arrived.clear()
        return batch

    # Start-up ------------------------------------------------------------------------------

    async def _refresh(self, force: bool = False) -> None:
        if not (force or self._stale) and time.monotonic() - self._refreshed < SHIPMENTS_EVERY_S:
            return
        self._refreshed = time.monotonic()
        self._stale = False
        shipments = await self._store.active_shipments()
        etas = await self._store.route_etas()
        self._profiles = {p.profile.name: p.profile for p in await self._store.profiles()}
        by_dewar: dict[str, list[Shipment]] = defaultdict(list)
        for s in shipments:
            by_dewar[s.dewar_id].append(s)
        self._by_dewar = dict(by_dewar)
        new = [s for s in shipments if s.id not in self._tracked]
        if new and self._source is not None:
            # The catch-ups read back the readings of these dewars that came before the watch
            # knew their shipments (they were passed over on arrival): they must be stored.
            # Once for all of them; what arrives meanwhile waits in `_arrivals` for the rules.
            await self._source.settled()
        states = await self._store.rule_states([s.id for s in new]) if new else {}
        for s in new:
            saved = states.get(s.id)
            state = _decode_state(saved[0]) if saved else None
            tracked = _Tracked(
                s, state or RuleState(), saved[1] if saved and state else None, etas.get(s.id)
            )
            self._tracked[s.id] = tracked
            self._save_order[s.id] = None
            await self._catch_up(tracked)
        for s in shipments:
            self._tracked[s.id].update(s, etas.get(s.id))
        active = {s.id for s in shipments}
        for gone in [sid for sid in self._tracked if sid not in active]:
            self._save_order.pop(gone, None)
            await self._save([self._tracked.pop(gone)])

    async def _catch_up(self, tracked: _Tracked) -> None:
        """Feed what arrived since the state was saved (all of it for a new shipment); the
        ingest has settled first (`_refresh`)."""
        readings = await self._store.readings_since(tracked.shipment, tracked.fed_through)
        if readings:
            newest = _newest(readings)
            tracked.received(newest)
            await self._evaluate(tracked, readings, newest)
        open_lost = [
            a
            for a in await self._store.open_alarms(tracked.shipment.id)
            if a.rule == "signal_lost" and a.condition_active
        ]
        if open_lost:
            tracked.signal_lost_since = open_lost[0].started_at

    # The loops -----------------------------------------------------------------------------

    async def run(self) -> None:
        writer = asyncio.create_task(self._write_alarms(), name="alarm writer")
        try:
            while True:
                try:
                    await self._refresh(force=True)
                    break
                except StoreUnavailable as exc:
                    logger.warning("rules cannot start yet: %s", exc)
                    await asyncio.sleep(1.0)
            self.ready.set()
            await asyncio.gather(self._consume(), self._beat(), writer)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _consume(self) -> None:
        while True:
            await self._arrived.wait()
            batch = self._take()
            if not batch:
                continue
            started = time.perf_counter()
            while True:
                try:
                    await self._handle(batch)
                    break
                except StoreUnavailable as exc:
                    logger.warning("rules waiting for PostgreSQL: %s", exc)
                    await asyncio.sleep(1.0)
                except Exception:
                    # A bug must not stop alarms for every other shipment. The readings are
                    # stored; the next restart's catch-up evaluates them again.
                    logger.exception("rules failed on a batch of %d readings", len(batch))
                    break
            self._eval_seconds.observe(time.perf_counter() - started)
            if self._source is not None:
                self._source.relieved()

    async def _beat(self) -> None:
        last_silence = time.monotonic()
        tick_s = min(1.0, self._beat_s)
        while True:
            await asyncio.sleep(tick_s)
            now = time.monotonic()
            try:
                await self._save(self._next_to_save(tick_s))
                if now - last_silence >= self._beat_s:
                    await self._refresh()
                    await self._check_silence(datetime.now(UTC))
                    reminded = await self._store.remind_due(datetime.now(UTC))
                    if reminded and self._outbox is not None:
                        self._outbox.wake()
                    self._changed(reminded)
                    last_silence = now
            except StoreUnavailable as exc:
                logger.warning("rules beat skipped: %s", exc)

    async def flush(self) -> None:
        """On shutdown, after `run` was cancelled: apply what the alarm writer had not, then
        save every changed rule state. If the transitions cannot be applied, no state is saved:
        the next start re-derives them from the readings (same episode keys)."""
        with contextlib.suppress(StoreUnavailable):
            if self._pending:
                try:
                    async with asyncio.timeout(FLUSH_TIMEOUT_S):
                        await self._store.apply_transitions_of(self._pending)
                except TimeoutError:
                    logger.warning(
                        "%d shipments' alarm changes not applied at shutdown; rule state not "
                        "saved, the next start re-derives them",
                        len(self._pending),
                    )
                    return
                self._applied += len(self._pending)
                self._pending.clear()
            await self._save([t for t in self._tracked.values() if t.dirty])

    # The alarm writer ------------------------------------------------------------------------

    def _enqueue(self, shipment: Shipment, transitions: list[Transition]) -> None:
        self._pending.append((shipment, transitions))
        self._enqueued += 1
        self._work.set()

    async def _write_alarms(self) -> None:
        """Apply queued transitions, all that accumulated in one transaction, in order. Rules go
        on evaluating the next batches meanwhile, so the database's round trips for alarms do
        not hold up evaluation. Nothing is dropped while PostgreSQL is away."""
        while True:
            await self._work.wait()
            self._work.clear()
            while self._pending:
                work = self._pending[:]
                started = time.perf_counter()
                claimed: list[Notification] = []
                room = self._outbox.room() if self._outbox is not None else 0
                left_due = True  # outbox rows may be due that nobody claimed
                try:
                    changed = await self._store.apply_transitions_of(
                        work, claim=room, claimed=claimed
                    )
                    left_due = len(claimed) >= room
                    self._write_seconds.observe(time.perf_counter() - started)
                except StoreUnavailable as exc:
                    logger.warning("alarm changes waiting for PostgreSQL: %s", exc)
                    await asyncio.sleep(1.0)
                    continue
                except Exception:
                    logger.exception(
                        "alarm changes of %d shipments failed together; trying each alone",
                        len(work),
                    )
                    changed = await self._apply_one_by_one(work)
                del self._pending[: len(work)]
                self._applied += len(work)
                self._progress.set()
                if self._outbox is not None:
                    if claimed:
                        self._outbox.take(claimed)
                    if changed and left_due:
                        self._outbox.wake()
                self._changed(changed)

    async def _apply_one_by_one(self, work: list[tuple[Shipment, list[Transition]]]) -> list[Alarm]:
        """After an unexpected failure: each shipment on its own, so that one shipment's bad
        transition (a bug) costs only its own alarms, and says so in the log."""
        changed: list[Alarm] = []
        for shipment, transitions in work:
            while True:
                try:
                    changed += await self._store.apply_transitions(shipment, transitions)
                    break
                except StoreUnavailable as exc:
                    logger.warning("alarm changes waiting for PostgreSQL: %s", exc)
                    await asyncio.sleep(1.0)
                except Exception:
                    logger.exception(
                        "alarm changes of shipment %s could not be applied: %s",
                        shipment.id,
                        ", ".join(f"{t.rule} {t.kind}" for t in transitions),
                    )
                    break
        return changed

    async def _applied_through(self, target: int) -> None:
        """Wait until the first `target` queued entries are applied."""
        while self._applied < target:
            self._progress.clear()
            await self._progress.wait()

    # Work ----------------------------------------------------------------------------------

    async def _handle(self, readings: list[IncomingReading]) -> None:
        by_dewar: dict[str, list[IncomingReading]] = defaultdict(list)
        for item in readings:
            by_dewar[item.dewar_id].append(item)
        if self._stale or not self._by_dewar.keys() >= by_dewar.keys():
            await self._refresh()
        clock = time.perf_counter
        started = clock()
        for dewar, items in by_dewar.items():
            if clock() - started > YIELD_EVERY_S:
                # A batch of thousands of readings is tens of milliseconds of evaluation: let
                # the deliveries and requests waiting on the event loop go on in between.
                await asyncio.sleep(0)
                started = clock()
            for shipment in self._by_dewar.get(dewar, ()):
                mine = _within(shipment, items)
                tracked = self._tracked.get(shipment.id)
                if not mine or tracked is None:
                    continue
                newest = _newest(mine)
                tracked.received(newest)  # even when the catch-up fed them already
                mine = _unseen(tracked, mine)
                if mine:
                    await self._evaluate(tracked, mine, newest)
                if tracked.signal_lost_since is not None:
                    self._silence_one(tracked, datetime.now(UTC))
        if len(self._pending) > MAX_PENDING:
            # PostgreSQL is slow or away: let the ingest feel it rather than hold more here.
            await self._applied_through(self._enqueued - MAX_PENDING // 2)

    async def _evaluate(
        self, tracked: _Tracked, items: Sequence[IncomingReading], newest: datetime
    ) -> None:
        """Feed `items` to the shipment's rules; `newest` is the latest `received_at` of the
        readings it arrived with (`items` may be fewer: `_unseen`)."""
        shipment = tracked.shipment
        profile = self._profiles.get(shipment.profile)
        if profile is None:
            logger.error(
                "shipment %s has unknown profile %s; not evaluated", shipment.id, shipment.profile
            )
            return
        outcome = feed(
            profile, tracked.state, [i.reading for i in items], deliver_by=tracked.cold_until
        )
        transitions = outcome.transitions
        if outcome.replay is not None:
            if self._source is not None:
                await self._source.settled()  # the replay reads these readings back
            history = await self._store.readings_since(
                shipment, None, ts_from=outcome.replay.from_ts
            )
            transitions = replay(
                profile,
                tracked.state,
                outcome.replay,
                [i.reading for i in history],
                deliver_by=tracked.cold_until,
            )
        tracked.fed_through = max(tracked.fed_through or newest, newest)
        tracked.dirty = True
        if transitions:
            self._enqueue(shipment, [_transition(t) for t in transitions])

    async def _check_silence(self, now: datetime) -> None:
        for tracked in list(self._tracked.values()):
            self._silence_one(tracked, now)

    def _silence_one(self, tracked: _Tracked, now: datetime) -> None:
        profile = self._profiles.get(tracked.shipment.profile)
        if profile is None:
            return
        t = silence(profile, tracked.last_received, now, tracked.signal_lost_since)
        if t is None:
            return
        tracked.signal_lost_since = t.started_at if str(t.kind) == "raised" else None
        self._enqueue(tracked.shipment, [_transition(t)])

    def _changed(self, alarms: list[Alarm]) -> None:
        if alarms:
            self._alarm_changes.inc(len(alarms))
            self._on_change(alarms)

    def _next_to_save(self, tick_s: float) -> list[_Tracked]:
        """The next shipments in turn, as many as make all of them once every `SAVE_EVERY_S`
        at one slice each `tick_s`: those of them whose rule state changed since it was saved."""
        order = self._save_order
        due: list[_Tracked] = []
        for _ in range(min(len(order), math.ceil(len(order) * tick_s / SAVE_EVERY_S))):
            sid = next(iter(order))
            del order[sid]
            order[sid] = None  # to the back of the line
            tracked = self._tracked[sid]
            if tracked.dirty:
                due.append(tracked)
        return due

    async def _save(self, tracked: Sequence[_Tracked]) -> None:
        """Save rule states, never ahead of the alarms: a state is written only once every
        transition emitted before it was taken is applied, so a crash in between cannot leave
        a saved state whose alarm changes are lost (the next start re-derives them)."""
        rows = [
            (t.shipment.id, _state_encoder.encode(t.state), t.fed_through)
            for t in tracked
            if t.fed_through is not None
        ]
        target = self._enqueued
        for t in tracked:
            t.dirty = False
        try:
            await self._applied_through(target)
            if rows:
                await self._store.save_rule_states(rows)
        except BaseException:
            for t in tracked:
                t.dirty = True
            raise


def _newest(items: Sequence[IncomingReading]) -> datetime:
    """The latest `received_at` of `items` (not empty)."""
    if len(items) == 1:  # the usual take under load
        return items[0].received_at
    return max(i.received_at for i in items)


def _within(shipment: Shipment, items: list[IncomingReading]) -> list[IncomingReading]:
    """The readings of the dewar that fall in the shipment's window (device time)."""
    starts, ends = shipment.starts_at, shipment.ends_at
    if len(items) == 1:  # the usual take under load: one reading of each dewar
        ts = items[0].reading.ts
        return items if ts >= starts and (ends is None or ts < ends) else []
    return [i for i in items if i.reading.ts >= starts and (ends is None or i.reading.ts < ends)]


def _unseen(tracked: _Tracked, items: list[IncomingReading]) -> list[IncomingReading]:
    """Drop readings the rules already saw: a catch-up (at start, or for a shipment the watch
    just learned of) reads every stored reading received after `fed_through`, including those
    of batches still queued here. Such a reading is at or before the watermark, so feeding it
    again would ask for a replay from the store, for nothing. A reading after the watermark is
    never dropped; one before it is dropped only if it was received by `fed_through`, i.e. it
    was in what was fed (a late backlog arrives after it, so it is kept and replayed)."""
    fed = tracked.fed_through
    if fed is None or (
        items[0].received_at > fed if len(items) == 1 else all(i.received_at > fed for i in items)
    ):
        return items  # the usual case: all received since the rules last ran
    watermark = tracked.state.watermark
    if watermark is None or all((i.reading.ts, i.reading.seq) > watermark for i in items):
        return items
    return [i for i in items if i.received_at > fed or (i.reading.ts, i.reading.seq) > watermark]


def live_alarm(alarm: Alarm) -> dict[str, object]:
    """An alarm change as the live stream carries it (the alert object)."""
    return alert_body(alarm, change_id=0) | {
        "state": alarm.state.public,
        "acknowledged": alarm.acknowledged_at is not None,
        "open": alarm.state not in (AlarmState.CLOSED, AlarmState.VOID),
    }
