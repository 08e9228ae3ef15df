"""The watch hands the rules only what they have not seen: after a catch-up that already fed the
readings of batches still queued, those batches are not fed again (which would make the engine
replay from the store for nothing), while a genuinely late reading still is."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from coldchain.excursions import RuleState, feed
from coldchain.profiles import BUILT_IN
from coldchain.shipments import Shipment, Status
from coldchain.store import IncomingReading
from coldchain.watch import _Tracked, _unseen
from sensors import Reading

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
