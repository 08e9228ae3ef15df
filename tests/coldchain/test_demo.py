"""The demo's set-up: a shipment for every dewar the simulated fleet runs, and for no other."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from coldchain.demo import seed
from coldchain.store import Store
from sensors.fleet import Fleet

pytestmark = pytest.mark.postgres


async def test_every_simulated_dewar_has_its_shipment_and_no_shipment_is_without_one(
    store: Store,
) -> None:
    start = datetime.now(UTC) - timedelta(hours=1)
    fleet = Fleet(7, start=start)
    await seed(store, dewars=7, fleet_start=start)
    shipped = {s.dewar_id for s in await store.shipments(limit=100) if s.status.active}
    # A shipment whose dewar the fleet does not run would raise "signal lost" from the start,
    # and a dewar without one would be evaluated by no rule.
    assert shipped == {s.dewar_id for s in fleet.simulators}


async def test_a_restart_with_a_smaller_fleet_cancels_the_shipments_of_dewars_it_no_longer_runs(
    store: Store,
) -> None:
    start = datetime.now(UTC) - timedelta(hours=1)
    await seed(store, dewars=5, fleet_start=start)
    await seed(store, dewars=3, fleet_start=start)
    shipped = {s.dewar_id for s in await store.shipments(limit=100) if s.status.active}
    assert shipped == {s.dewar_id for s in Fleet(3, start=start).simulators}
