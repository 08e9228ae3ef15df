"""The search's bounds: never optimistic-wrong (answers stay exact) and never looser than they
were (the search does not quietly do more work).

The planner is exact only while every bound it prunes or orders by is admissible: time to the
destination and to the nearest recharge site never overestimated, hold margin never
underestimated. A bound that is too tight shows up as a wrong answer, so the first tests check
the index's bounds against brute force and compare plans on networks where recharges decide
the answer. A bound that is looser than needed gives the same answers, only slower; the last
test holds the search's work on a fixed set of requests (labels settled, heap entries pushed:
deterministic counts, not timings) to what it was when the bounds were last tightened.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta

import pytest

from routing import (
    Objective,
    PlanRequest,
    ReceivingHours,
    RouteIndex,
    SiteKind,
    example_network,
    plan,
)
from routing.planner import query_for
from routing.search import SearchStats, search
from routing.timetable import NEVER
from tests.routing.oracle import enumerate_routes, plan_key, random_network

START = datetime(2026, 3, 27, tzinfo=UTC)
WEEK = 7 * 24 * 3600


@pytest.mark.parametrize("seed", range(12))
def test_index_bounds_never_overestimate(seed: int) -> None:
    """Time and legs to the destination, and time to a recharge site, against every route."""
    rng = random.Random(7000 + seed)
    network = random_network(rng, START, recharge=0.4)
    index = RouteIndex(network)
    destination = index.number["D"]
    recharge_sites = [s.id for s in network.sites.values() if s.ln2_recharge]
    for site in network.sites:
        if site == "D":
            continue
        u = index.number[site]
        for hour in (0, 13, 30):
            depart = int((START + timedelta(hours=hour)).timestamp())
            routes = list(
                enumerate_routes(network, site, "D", depart, WEEK, WEEK, 0, 4, depart + WEEK)
            )
            if routes:
                assert (
                    index.time_bounds(destination)[u] <= min(r.delivered for r in routes) - depart
                )
                assert index.leg_bounds(destination)[u] <= min(r.legs for r in routes)
            for depot in recharge_sites:
                if depot == site:
                    assert index.recharge_bounds[u] == 0
                    continue
                to_depot = enumerate_routes(
                    network, site, depot, depart, WEEK, WEEK, 0, 4, depart + WEEK
                )
                for route in to_depot:
                    assert index.recharge_bounds[u] <= route.delivered - depart, (seed, site)


@pytest.mark.parametrize("chunk", range(6))
@pytest.mark.parametrize("objective", [Objective.SAFEST, Objective.FASTEST])
def test_optimum_with_recharge_stops_equals_brute_force(chunk: int, objective: Objective) -> None:
    """Short holds and many recharge sites: the optimum often recharges, sometimes twice, and a
    margin bound that underestimates what a recharge gives back would miss it."""
    recharged = compared = 0
    for seed in range(chunk, 180, 6):
        rng = random.Random(9000 + seed)
        network = random_network(rng, START, recharge=0.6)
        depart = START + timedelta(minutes=5 * rng.randrange(0, 24 * 12))
        hold = rng.choice((5.0, 8.0, 12.0, 20.0))
        recharge_hold = hold * rng.choice((0.5, 1.0, 1.5))
        request = PlanRequest(
            "O",
            "D",
            depart,
            hold,
            objective=objective,
            max_handoffs=3,
            recharge_minutes=rng.choice((0, 45, 120)),
            recharge_hold_hours=recharge_hold,
            horizon_hours=72,
        )
        best = plan(RouteIndex(network), request).best
        start = int(depart.timestamp())
        outcomes = list(
            enumerate_routes(
                network,
                "O",
                "D",
                start,
                round(hold * 3600),
                round(recharge_hold * 3600),
                request.recharge_minutes * 60,
                4,
                start + 72 * 3600,
            )
        )
        if not outcomes:
            assert best is None, f"seed {seed}"
            continue
        compared += 1
        assert best is not None, f"seed {seed}"
        assert plan_key(best, objective) == min(o.key(objective) for o in outcomes), f"seed {seed}"
        recharged += best.recharges > 0
    assert compared >= 10
    assert recharged >= 3  # the chunk really had optima that need a recharge


def test_search_work_is_not_looser_than_recorded() -> None:
    """Labels settled and heap entries pushed over fixed requests on the bundled network.

    The numbers were recorded with the bounds as they are; a change that loosens a bound (a
    smaller margin cut, a time bound that forgets tender or recovery, a recharge bound that
    ignores the depots) makes them grow and fails here, though every answer stays right. When
    a change really tightens a bound, lower the numbers.
    """
    index = RouteIndex(example_network())
    origins = ["MFG-MPN", "MFG-ELS", "MFG-HFD", "MFG-DEV", "MFG-GNT"]
    centres = sorted(s.id for s in index.sites if s.kind is SiteKind.TREATMENT_CENTER)
    depart = datetime(2026, 10, 20, 13, 0, tzinfo=UTC)
    recorded = {
        Objective.FASTEST: SearchStats(settled=423, pushed=1836),
        Objective.SAFEST: SearchStats(settled=1900, pushed=7284),
        Objective.CHEAPEST: SearchStats(settled=2937, pushed=22959),
    }
    for objective, budget in recorded.items():
        stats = SearchStats()
        found = 0
        for i, origin in enumerate(origins):
            for centre in centres[i::5][:4]:
                for hold in (24.0, 72.0):
                    request = PlanRequest(
                        origin,
                        centre,
                        depart + timedelta(hours=7 * i),
                        hold,
                        objective=objective,
                        max_handoffs=5,
                    )
                    found += search(index, query_for(index, request), stats) is not None
        assert found == 39, objective
        assert stats.settled <= budget.settled, (objective, stats)
        assert stats.pushed <= budget.pushed, (objective, stats)


def test_unreachable_after_exclusions_is_answered_without_search() -> None:
    """When the flights left out cut every link, reachability alone answers (no long search)."""
    index = RouteIndex(example_network())
    depart = datetime(2026, 10, 20, 13, 0, tzinfo=UTC)
    request = PlanRequest("MFG-MPN", "TC-NKI", depart, 72.0)
    query = query_for(index, request)
    everything = frozenset(range(len(index.network.flights)))
    stats = SearchStats()
    assert search(index, replace(query, excluded=everything), stats) is None
    assert stats == SearchStats()
    assert index.time_bounds(query.destination)[query.origin] < NEVER


@pytest.mark.parametrize(
    ("opens", "closes", "tz"),
    [(8, 17, "Europe/Amsterdam"), (22, 6, "America/New_York"), (18, 20, "Pacific/Auckland")],
)
def test_opening_times_give_next_open_across_daylight_saving(
    opens: int, closes: int, tz: str
) -> None:
    """The search bounds delivery with `opening_times`; it must agree with `next_open`."""
    hours = ReceivingHours(time(opens), time(closes))
    start = int(datetime(2026, 3, 26, tzinfo=UTC).timestamp())  # EU: 29 Mar, NZ: 5 Apr
    end = start + 11 * 24 * 3600
    starts, ends = hours.opening_times(start, end, tz)
    for t in range(start, end, 1234):
        j = bisect_right(ends, t)
        assert max(t, starts[j]) == hours.next_open(t, tz), t
