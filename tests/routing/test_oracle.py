"""The planner against independent oracles on hundreds of random small networks."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from routing import Network, Objective, PlanRequest, RouteIndex, plan
from tests.routing.oracle import enumerate_routes, plan_key, random_network, time_expanded_arrival

START = datetime(2026, 3, 27, tzinfo=UTC)  # the week of the EU daylight-saving change
HORIZON_HOURS = 7 * 24
NETWORKS = 300


def _case(seed: int) -> tuple[Network, datetime, float, datetime | None]:
    rng = random.Random(seed)
    network = random_network(rng, START)
    depart = START + timedelta(minutes=5 * rng.randrange(0, 24 * 12))
    hold = rng.choice((8.0, 24.0, 48.0, 96.0))
    deliver_by = depart + timedelta(hours=rng.choice((24, 48))) if rng.random() < 0.3 else None
    return network, depart, hold, deliver_by


@pytest.mark.parametrize("chunk", range(10))
@pytest.mark.parametrize("objective", list(Objective))
def test_constrained_optimum_equals_brute_force(chunk: int, objective: Objective) -> None:
    feasible = 0
    for seed in range(chunk, NETWORKS, 10):
        network, depart, hold, deliver_by = _case(seed)
        max_handoffs = 3
        request = PlanRequest(
            "O",
            "D",
            depart,
            hold,
            deliver_by=deliver_by,
            objective=objective,
            max_handoffs=max_handoffs,
            recharge_minutes=90,
            recharge_hold_hours=hold * 0.75,
            horizon_hours=HORIZON_HOURS,
        )
        result = plan(RouteIndex(network), request)
        latest = int(depart.timestamp()) + HORIZON_HOURS * 3600
        if deliver_by is not None:
            latest = min(latest, int(deliver_by.timestamp()))
        outcomes = list(
            enumerate_routes(
                network,
                "O",
                "D",
                int(depart.timestamp()),
                int(hold * 3600),
                int(hold * 0.75 * 3600),
                90 * 60,
                max_handoffs + 1,
                latest,
            )
        )
        if not outcomes:
            assert result.best is None, f"seed {seed}: planner found a route the oracle did not"
            assert result.infeasible is not None
            continue
        feasible += 1
        best = min(o.key(objective) for o in outcomes)
        assert result.best is not None, f"seed {seed}: oracle found {best}, planner none"
        assert plan_key(result.best, objective) == best, f"seed {seed}"
    assert feasible > 0  # the chunk really compared optima


@pytest.mark.parametrize("chunk", range(4))
def test_earliest_arrival_equals_time_expanded_dijkstra(chunk: int) -> None:
    compared = 0
    for seed in range(chunk, NETWORKS, 4):
        network, depart, _, _ = _case(seed)
        # The time-expanded oracle walks one ground lane at a time: leave the depot out.
        network = Network.build(
            [s for s in network.sites.values() if s.id != "R"],
            [x for x in network.lanes if "R" not in (x.origin, x.destination)],
            network.flights,
        )
        request = PlanRequest("O", "D", depart, 10_000.0, horizon_hours=HORIZON_HOURS)
        result = plan(RouteIndex(network), request)
        expected = time_expanded_arrival(network, "O", "D", int(depart.timestamp()))
        if expected < 0:
            assert result.best is None, f"seed {seed}"
            continue
        compared += 1
        assert result.best is not None, f"seed {seed}"
        assert int(result.best.delivered_at.timestamp()) == expected, f"seed {seed}"
    assert compared > 10
