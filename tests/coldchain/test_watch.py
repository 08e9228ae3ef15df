"""The watch hands the rules only what they have not seen: after a catch-up that already fed the
readings of batches still queued, those batches are not fed again (which would make the engine
replay from the store for nothing), while a genuinely late reading still is. And it judges the
hold time against the later of the deadline and the planned route's ETA."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest

from coldchain.alarms import Alarm
from coldchain.auth import Actor, Role
from coldchain.errors import StoreUnavailable
from coldchain.excursions import HOLD_AT_RISK, RuleState, feed
from coldchain.metrics import Registry
from coldchain.profiles import BUILT_IN
from coldchain.shipments import Shipment, Status
from coldchain.store import IncomingReading, Notification, Store, Transition
from coldchain.watch import Watch, _Tracked, _unseen, cold_until
from routing import example_network
from sensors import Reading
from tests.support import eventually

PROFILE = {p.name: p for p in BUILT_IN}["cryo-vapor"]
T0 = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)


def _item(seq: int, received: datetime, minutes: float | None = None) -> IncomingReading:
    at = T0 + timedelta(minutes=seq if minutes is None else minutes)
    return IncomingReading("DW-1", Reading(seq=seq, ts=at, temp_c=-190.0), received)


def _tracked_after_catch_up(items: list[IncomingReading]) -> _Tracked:
    shipment = Shipment(
        "SH-1", "DW-1", "cryo-vapor", "A", "B", None, None, None, Status.IN_TRANSIT,
        T0, "test", T0, None,
    )  # fmt: skip
    tracked = _Tracked(shipment, RuleState(), None)
    outcome = feed(PROFILE, tracked.state, [i.reading for i in items])
    assert outcome.replay is None
    tracked.fed_through = max(i.received_at for i in items)
    return tracked


def test_readings_a_catch_up_already_fed_are_not_fed_again() -> None:
    received = T0 + timedelta(hours=1)
    queued = [_item(seq, received + timedelta(milliseconds=seq)) for seq in range(10)]
    tracked = _tracked_after_catch_up(queued)
    assert _unseen(tracked, queued[:4]) == []
    assert _unseen(tracked, queued) == []
    # Fed again they would ask for a replay: this is what the watch now spares the store.
    assert feed(PROFILE, tracked.state, [i.reading for i in queued[:4]]).replay is not None


def test_new_readings_and_late_ones_received_afterwards_are_kept() -> None:
    received = T0 + timedelta(hours=1)
    fed = [_item(seq, received) for seq in range(10)]
    tracked = _tracked_after_catch_up(fed)
    later = received + timedelta(seconds=5)
    newer = [_item(10, later), _item(11, later)]
    assert _unseen(tracked, newer) == newer
    # A backlog reading from before the watermark that arrived after the catch-up: kept, so
    # the engine replays it into its place.
    late = _item(100, later, minutes=3.5)
    assert _unseen(tracked, [late, *newer]) == [late, *newer]
    mixed = [fed[9], late, newer[0]]
    assert _unseen(tracked, mixed) == [late, newer[0]]


D1, D2 = T0 + timedelta(hours=30), T0 + timedelta(hours=48)


@pytest.mark.parametrize(
    ("deliver_by", "eta", "expected"),
    [(None, None, None), (D1, None, D1), (None, D2, D2), (D1, D2, D2), (D2, D1, D2)],
)
def test_the_product_must_stay_cold_until_the_later_of_deadline_and_eta(
    deliver_by: datetime | None, eta: datetime | None, expected: datetime | None
) -> None:
    assert cold_until(deliver_by, eta) == expected


def _losing_ln2(dewar: str) -> list[IncomingReading]:
    """4 h of a dewar upright but losing 6 %/h from 60 %: it runs dry about 10 h in."""
    received = T0 + timedelta(hours=5)
    return [
        IncomingReading(
            dewar,
            Reading(
                seq=i,
                ts=T0 + timedelta(minutes=5 * i),
                temp_c=-185.0 + (i % 4) * 0.1,
                ln2_level_pct=60.0 - 6.0 * i / 12,
                tilt_deg=2.0,
            ),
            received,
        )
        for i in range(48)
    ]


@pytest.mark.postgres
async def test_hold_at_risk_uses_the_route_eta_when_the_shipment_has_no_deadline(
    store: Store, unique: str
) -> None:
    await store.import_sites(list(example_network().sites.values()), "test")
    planner = Actor(1, "planner", Role.PLANNER)
    ids = {}
    for which in ("routed", "unrouted"):
        dewar = f"DW-{which}-{unique}"
        shipment = Shipment(
            f"SH-{which}-{unique}", dewar, "cryo-vapor", "MFG-MPN", "TC-NKI", None, None, None,
            Status.IN_TRANSIT, T0, "test", T0, None,
        )  # fmt: skip
        await store.create_shipment(shipment, planner)
        await store.write_batch(_losing_ln2(dewar), [])
        ids[which] = shipment.id
    # Planned to arrive in 48 h: the charge (about 10 h) runs out long before that.
    await store.add_route(ids["routed"], "MFG-MPN", D2, {"legs": []}, {}, planner)
    changed: list[Alarm] = []
    watch = Watch(store, Registry(), on_change=changed.extend)
    running = asyncio.create_task(watch.run())
    try:
        # Start-up catches the shipments up; the alarm writer applies what that raised.
        await asyncio.wait_for(watch.ready.wait(), 30)

        async def routed_alarms() -> list[Alarm]:
            return [a for a in await store.open_alarms(ids["routed"]) if a.rule == HOLD_AT_RISK]

        routed = await eventually(routed_alarms, lambda found: len(found) > 0)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await watch.flush()
    assert len(routed) == 1
    # Measured against the route's ETA: the message names it as the delivery.
    assert f"delivery ({D2:%Y-%m-%d %H:%M} UTC)" in routed[0].message
    unrouted = await store.open_alarms(ids["unrouted"])
    assert all(a.rule != HOLD_AT_RISK for a in unrouted)
    assert any(a.rule == HOLD_AT_RISK and a.shipment_id == ids["routed"] for a in changed)


@contextlib.asynccontextmanager
async def _running(watch: Watch) -> AsyncIterator[None]:
    """The watch running, once it has caught up; stopped on the way out."""
    running = asyncio.create_task(watch.run())
    try:
        await asyncio.wait_for(watch.ready.wait(), 30)
        yield
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


class _Outage(Store):
    """The real store, whose alarm writes fail as if PostgreSQL were away until `back`."""

    down = True
    attempts = 0

    async def apply_transitions_of(
        self,
        work: Sequence[tuple[Shipment, Sequence[Transition]]],
        *,
        claim: int = 0,
        claimed: list[Notification] | None = None,
    ) -> list[Alarm]:
        self.attempts += 1
        if self.down:
            raise StoreUnavailable("PostgreSQL is away (test)")
        return await super().apply_transitions_of(work, claim=claim, claimed=claimed)


@pytest.mark.postgres
async def test_alarm_changes_wait_out_an_outage_and_no_state_is_saved_ahead_of_them(
    database_url: str, unique: str
) -> None:
    store = await _Outage.open(database_url)
    try:
        await store.migrate()
        await store.import_sites(list(example_network().sites.values()), "test")
        dewar = f"DW-OUT-{unique}"
        shipment = Shipment(
            f"SH-OUT-{unique}", dewar, "cryo-vapor", "MFG-MPN", "TC-NKI", None, None, None,
            Status.IN_TRANSIT, T0, "test", T0, None,
        )  # fmt: skip
        await store.create_shipment(shipment, Actor(1, "planner", Role.PLANNER))
        # 20 min above the glass transition: critical after its 1 min delay.
        warm = [
            IncomingReading(dewar, Reading(seq=i, ts=T0 + timedelta(minutes=i), temp_c=-120.0), T0)
            for i in range(20)
        ]
        await store.write_batch(warm, [])
        watch = Watch(store, Registry(), on_change=lambda alarms: None)
        async with _running(watch):
            await eventually(lambda: _attempts(store), lambda n: n >= 2)
            # The rules have moved on, but their state may not be saved ahead of the alarm.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(watch._save(list(watch._tracked.values())), 0.5)
            assert await store.rule_states([shipment.id]) == {}
            store.down = False

            async def glass() -> list[Alarm]:
                found = await store.open_alarms(shipment.id)
                return [a for a in found if a.rule == "temp_glass_transition"]

            raised = await eventually(glass, lambda found: len(found) == 1)
            assert raised[0].started_at == T0
            await watch._save(list(watch._tracked.values()))
            assert shipment.id in await store.rule_states([shipment.id])
    finally:
        await store.close()


async def _attempts(store: _Outage) -> int:
    return store.attempts


async def _in_transit(store: Store, dewar: str, shipment_id: str, packed: datetime) -> Shipment:
    """A cryo-vapor shipment of `dewar`, in transit since `packed`, stored."""
    await store.migrate()
    await store.import_sites(list(example_network().sites.values()), "test")
    shipment = Shipment(
        shipment_id, dewar, "cryo-vapor", "MFG-MPN", "TC-NKI", None, None, None,
        Status.IN_TRANSIT, packed, "test", packed, None,
    )  # fmt: skip
    await store.create_shipment(shipment, Actor(1, "planner", Role.PLANNER))
    return shipment


def _reading(
    dewar: str, packed: datetime, seq: int, minutes: float, shock: float = 0.1
) -> IncomingReading:
    """A calm reading (or a knock, with `shock` over 10 g) `minutes` after pack-out."""
    at = packed + timedelta(minutes=minutes)
    return IncomingReading(
        dewar, Reading(seq=seq, ts=at, temp_c=-190.0, shock_g=shock), datetime.now(UTC)
    )


@pytest.mark.postgres
async def test_readings_the_catch_up_fed_count_as_received_for_signal_lost(
    database_url: str, unique: str
) -> None:
    """A dewar that reported while the service was down (or before the watch learned of its
    shipment) is not silent: the catch-up feeds its readings, and they count as received, also
    when the batch that carried them reaches the watch afterwards and is not fed again."""
    store = await Store.open(database_url)
    try:
        dewar = f"DW-CATCH-{unique}"
        now = datetime.now(UTC)
        packed = now - timedelta(hours=2)  # far longer ago than the 15 min of signal lost
        shipment = await _in_transit(store, dewar, f"SH-CATCH-{unique}", packed)
        received = [
            IncomingReading(
                dewar, Reading(seq=i, ts=packed + timedelta(minutes=i), temp_c=-190.0), now
            )
            for i in range(5)
        ]
        await store.write_batch(received, [])
        watch = Watch(store, Registry(), on_change=lambda alarms: None, beat_s=3600)
        async with _running(watch):
            watch.arrived(received)  # the batch, handed over while the watch caught up
            await eventually(lambda: _queued(watch), lambda n: n == 0)
            tracked = watch._tracked[shipment.id]
            assert tracked.last_received == now
            await watch._check_silence(datetime.now(UTC))
            assert [t.rule for _, ts in watch._pending for t in ts] == []
            # Silence after the readings still counts from their arrival.
            await watch._check_silence(now + timedelta(minutes=16))
            assert [t.rule for _, ts in watch._pending for t in ts] == ["signal_lost"]
    finally:
        await store.close()


async def _queued(watch: Watch) -> int:
    return watch.backlog


class _Gate:
    """An ingest whose uncommitted readings are committed only when the test opens the gate."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.open.set()
        self.waiting = 0

    async def settled(self) -> None:
        self.waiting += 1
        try:
            await self.open.wait()
        finally:
            self.waiting -= 1

    def relieved(self) -> None:
        pass


@pytest.mark.postgres
async def test_a_late_reading_judged_on_arrival_is_replayed_once_it_is_stored(
    database_url: str, unique: str
) -> None:
    """The rules see a reading before it is committed. A late one makes them replay the stored
    history, which must then hold it: they wait for the ingest to settle, and the excursion only
    the late reading shows is raised once it is in the store."""
    store = await Store.open(database_url)
    try:
        dewar = f"DW-GATE-{unique}"
        packed = datetime.now(UTC) - timedelta(hours=1)
        shipment = await _in_transit(store, dewar, f"SH-GATE-{unique}", packed)
        calm = [_reading(dewar, packed, i, 10 + i) for i in range(5)]
        await store.write_batch(calm, [])
        gate = _Gate()
        watch = Watch(store, Registry(), on_change=lambda alarms: None, beat_s=3600, source=gate)
        async with _running(watch):
            watch.arrived(calm)
            await eventually(lambda: _queued(watch), lambda n: n == 0)
            gate.open.clear()
            knock = _reading(dewar, packed, 99, 11.5, shock=25.0)  # late: between two it has seen
            watch.arrived([knock])
            await eventually(lambda: _waiting(gate), lambda n: n == 1)
            assert not [t for _, ts in watch._pending for t in ts]
            await store.write_batch([knock], [])
            gate.open.set()
            await eventually(
                lambda: _open_rules(store, shipment.id), lambda rules: rules == ["shock"]
            )
    finally:
        await store.close()


async def _waiting(gate: _Gate) -> int:
    return gate.waiting


async def _open_rules(store: Store, shipment_id: str) -> list[str]:
    return [a.rule for a in await store.open_alarms(shipment_id)]


@pytest.mark.postgres
async def test_readings_passed_over_before_the_watch_knew_the_shipment_are_caught_up(
    database_url: str, unique: str
) -> None:
    """Readings of a dewar whose shipment the watch does not know yet are passed over when they
    arrive; when it learns of the shipment, its catch-up reads them back from the store, so it
    first waits for the ingest to commit them."""
    store = await Store.open(database_url)
    try:
        await store.migrate()
        dewar = f"DW-LATE-SHIP-{unique}"
        packed = datetime.now(UTC) - timedelta(hours=1)
        gate = _Gate()
        watch = Watch(store, Registry(), on_change=lambda alarms: None, beat_s=3600, source=gate)
        async with _running(watch):
            shipment = await _in_transit(store, dewar, f"SH-LATE-SHIP-{unique}", packed)
            gate.open.clear()
            knock = _reading(dewar, packed, 1, 11, shock=25.0)
            watch.arrived([knock])  # the watch does not know the shipment: passed over
            await eventually(lambda: _queued(watch), lambda n: n == 0)
            watch.shipments_changed()
            calm = _reading(dewar, packed, 2, 12)
            watch.arrived([calm])
            await eventually(lambda: _waiting(gate), lambda n: n == 1)
            await store.write_batch([knock, calm], [])
            gate.open.set()
            await eventually(
                lambda: _open_rules(store, shipment.id), lambda rules: rules == ["shock"]
            )
    finally:
        await store.close()


async def test_rule_states_are_saved_a_slice_at_a_time_each_in_its_turn(database_url: str) -> None:
    """Every shipment's changed state once per `SAVE_EVERY_S`, spread over the beat's ticks
    rather than all at once; unchanged states are passed over."""
    store = await Store.open(database_url)
    try:
        watch = Watch(store, Registry(), on_change=lambda alarms: None)
        for n in range(30):
            shipment = Shipment(
                f"SH-{n}", f"DW-{n}", "cryo-vapor", "A", "B", None, None, None,
                Status.IN_TRANSIT, T0, "test", T0, None,
            )  # fmt: skip
            tracked = _Tracked(shipment, RuleState(), T0)
            tracked.dirty = n % 3 != 0
            watch._tracked[shipment.id] = tracked
            watch._save_order[shipment.id] = None
        slices = [[t.shipment.id for t in watch._next_to_save(1.0)] for _ in range(15)]
        assert max(len(s) for s in slices) == 2  # 30 shipments over 15 ticks of a second
        saved = [sid for s in slices for sid in s]
        assert sorted(saved) == sorted(f"SH-{n}" for n in range(30) if n % 3 != 0)
        assert saved[:2] == ["SH-1", "SH-2"]  # in turn, from the first
        assert [t.shipment.id for t in watch._next_to_save(15.0)] == saved  # a whole round
        # The states written are those taken; nothing is marked saved until `_save`.
        assert all(watch._tracked[sid].dirty for sid in saved)
    finally:
        await store.close()
