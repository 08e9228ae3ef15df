"""Independent oracles for the planner, written apart from routing.search.

- `enumerate_routes` walks every itinerary of up to `max_legs` legs by depth-first search (every
  lane, every boardable flight, recharge or not at each depot) and evaluates each with its own
  simulation of the rules, so the planner's optimum can be checked by brute force.
- `time_expanded_arrival` builds a time-expanded graph (one node per flight boarding, waiting
  edges between boardings at an airport) and asks `networkx.dijkstra_path_length` for the
  earliest delivery.
- `random_network` makes small random networks across time zones, borders and the date line.

Only the rules are shared with the planner (they are the specification); the search is not.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from functools import cache
from zoneinfo import ZoneInfo

import networkx as nx

from routing import (
    Flight,
    Lane,
    LaneMode,
    Network,
    Objective,
    Plan,
    ReceivingHours,
    Site,
    SiteKind,
)

STEP = 300  # every instant in the random networks is a multiple of 5 minutes


@cache
def open_at(opens: time, closes: time, tz: str, instant: int) -> int:
    """First instant >= `instant` when the site is open, by scanning 5-minute steps."""
    zone = ZoneInfo(tz)
    t = instant
    for _ in range(3 * 24 * 12):
        local = datetime.fromtimestamp(t, UTC).astimezone(zone).time()
        inside = opens <= local < closes if opens < closes else (local >= opens or local < closes)
        if inside:
            return t
        t = (t // STEP + 1) * STEP
    raise AssertionError("never open")


@dataclass(frozen=True)
class Outcome:
    delivered: int
    legs: int
    risk: float
    cost: float
    margin: int
    flights: tuple[int, ...]

    def key(self, objective: Objective) -> tuple[float, ...]:
        if objective is Objective.FASTEST:
            return (self.delivered, self.legs)
        if objective is Objective.SAFEST:
            return (-self.margin, self.risk, self.delivered)
        return (self.cost, self.delivered, self.legs)


def plan_key(plan: Plan, objective: Objective) -> tuple[float, ...]:
    outcome = Outcome(
        delivered=int(plan.delivered_at.timestamp()),
        legs=len(plan.legs),
        risk=plan.risk,
        cost=plan.cost,
        margin=int(plan.hold_margin.total_seconds()),
        flights=(),
    )
    return outcome.key(objective)


@dataclass
class _State:
    site: str
    now: int
    clock: int
    hold: int
    floating: bool
    mmin: float
    legs: int
    risk_weight: float
    cost: float
    flights: tuple[int, ...]


def enumerate_routes(
    network: Network,
    origin: str,
    destination: str,
    depart: int,
    hold: int,
    recharge_hold: int,
    recharge: int,
    max_legs: int,
    latest: int,
    enforce_hold: bool = True,
) -> Iterator[Outcome]:
    """Every feasible delivery of every itinerary with at most `max_legs` legs."""
    sites = network.sites
    flights = list(network.flights)

    def arrive(
        state: _State, to: str, ready: int, cost: float, p: float, flight: int | None
    ) -> list[_State]:
        here, there = sites[state.site], sites[to]
        if here.country != there.country:
            ready += there.customs_minutes * 60
        clock, floating = state.clock, state.floating
        if there.hours is not None:
            opened = open_at(there.hours.opens, there.hours.closes, there.tz, ready)
            if floating and opened > ready:
                clock += opened - ready
                floating = False
            ready = opened
        if ready > latest or (enforce_hold and ready - clock > state.hold):
            return []
        nxt = _State(
            to,
            ready,
            clock,
            state.hold,
            floating,
            state.mmin,
            state.legs + 1,
            state.risk_weight + -math.log1p(-p),
            state.cost + cost,
            state.flights + ((flight,) if flight is not None else ()),
        )
        out = [nxt]
        if there.ln2_recharge and to != destination:
            done = ready + recharge
            if done <= latest:
                margin = state.hold - (ready - clock)
                out.append(
                    _State(
                        to,
                        done,
                        done,
                        recharge_hold,
                        True,
                        min(state.mmin, margin),
                        nxt.legs,
                        nxt.risk_weight,
                        nxt.cost,
                        nxt.flights,
                    )
                )
        return out

    def walk(state: _State) -> Iterator[Outcome]:
        if state.site == destination:
            yield Outcome(
                state.now,
                state.legs,
                -math.expm1(-state.risk_weight),
                state.cost,
                int(min(state.mmin, state.hold - (state.now - state.clock))),
                state.flights,
            )
            return
        if state.legs >= max_legs:
            return
        for lane in network.lanes:
            if lane.origin == state.site:
                for nxt in arrive(
                    state,
                    lane.destination,
                    state.now + lane.minutes * 60,
                    lane.cost,
                    lane.risk,
                    None,
                ):
                    yield from walk(nxt)
        site = sites[state.site]
        for number, f in enumerate(flights):
            if f.origin != state.site:
                continue
            dep = int(f.departs_at.timestamp())
            tender = dep - site.connect_minutes * 60
            if tender < state.now:
                continue
            boarded = _State(**state.__dict__)
            if boarded.floating:
                boarded.clock += tender - state.now
                boarded.floating = False
            ready = int(f.arrives_at.timestamp()) + sites[f.destination].recovery_minutes * 60
            for nxt in arrive(boarded, f.destination, ready, f.cost, f.risk, number):
                yield from walk(nxt)

    start = _State(origin, depart, depart, hold, False, math.inf, 0, 0.0, 0.0, ())
    yield from walk(start)
    if sites[origin].ln2_recharge:
        done = depart + recharge
        yield from walk(_State(origin, done, done, recharge_hold, True, hold, 0, 0.0, 0.0, ()))


def time_expanded_arrival(network: Network, origin: str, destination: str, depart: int) -> int:
    """Earliest delivery by Dijkstra on a time-expanded graph (no hold limit, no recharge).

    Nodes are boardings (flight index: ready at its airport by the tender cutoff), the source,
    one arrival node per flight and the sink; waiting edges join consecutive boardings at an
    airport, weights are elapsed seconds. Ground lanes join the source, arrivals and the sink.
    Ground chains of up to three lanes are followed from every place the shipment is ready.
    """
    sites = network.sites
    graph: nx.DiGraph[object] = nx.DiGraph()
    boardings: dict[str, list[tuple[int, int]]] = {}
    for number, f in enumerate(network.flights):
        tender = int(f.departs_at.timestamp()) - sites[f.origin].connect_minutes * 60
        boardings.setdefault(f.origin, []).append((tender, number))
    for row in boardings.values():
        row.sort()
        for (t1, n1), (t2, n2) in zip(row, row[1:], strict=False):
            graph.add_edge(("board", n1), ("board", n2), weight=t2 - t1)

    def customs(a: str, b: str) -> int:
        return sites[b].customs_minutes * 60 if sites[a].country != sites[b].country else 0

    def deliver(site: str, ready: int) -> int:
        hours = sites[site].hours
        return ready if hours is None else open_at(hours.opens, hours.closes, sites[site].tz, ready)

    def link(node: object, at: str, ready: int, when: int) -> None:
        """From `node` (at time `when`), being ready at airport `at` at `ready`."""
        for tender, number in boardings.get(at, []):
            if tender >= ready:
                edge = ("board", number)
                if not graph.has_edge(node, edge) or graph[node][edge]["weight"] > tender - when:
                    graph.add_edge(node, edge, weight=tender - when)
                break

    def place(node: object, site: str, ready: int, when: int, hops: int = 0) -> None:
        """From `node` (at time `when`), being ready at `site`: deliver, board, or drive on."""
        if site == destination:
            weight = deliver(site, ready) - when
            if not graph.has_edge(node, "sink") or graph[node]["sink"]["weight"] > weight:
                graph.add_edge(node, "sink", weight=weight)
            return
        link(node, site, ready, when)
        if hops >= 3:
            return
        for lane in network.lanes:
            if lane.origin == site and lane.destination != origin:
                end = ready + lane.minutes * 60 + customs(site, lane.destination)
                place(node, lane.destination, end, when, hops + 1)

    place("source", origin, depart, depart)
    for number, f in enumerate(network.flights):
        tender = int(f.departs_at.timestamp()) - sites[f.origin].connect_minutes * 60
        arrival = ("arrive", number)
        ready = (
            int(f.arrives_at.timestamp())
            + sites[f.destination].recovery_minutes * 60
            + customs(f.origin, f.destination)
        )
        graph.add_edge(("board", number), arrival, weight=ready - tender)
        place(arrival, f.destination, ready, ready)
    if "sink" not in graph or "source" not in graph:
        return -1
    try:
        return depart + int(nx.dijkstra_path_length(graph, "source", "sink"))
    except nx.NetworkXNoPath:
        return -1


ZONES = (
    ("US", "America/New_York", 40.7, -74.0),
    ("NL", "Europe/Amsterdam", 52.3, 4.8),
    ("NZ", "Pacific/Auckland", -37.0, 174.8),
    ("US", "America/Los_Angeles", 34.0, -118.4),
    ("JP", "Asia/Tokyo", 35.5, 139.8),
)


def random_network(rng: random.Random, start: datetime, recharge: float = 0.2) -> Network:
    """A small network: an origin, a destination, 3 airports, maybe a depot; 3 days of flights.

    `recharge` is the chance that the origin or an airport can recharge LN2. Lanes touch
    airports and the two ends only (the time-expanded oracle relies on it).
    """
    zones = rng.sample(ZONES, 3)
    airports = []
    for i, (country, tz, lat, lon) in enumerate(zones):
        airports.append(
            Site(
                id=f"A{i}",
                name=f"airport {i}",
                kind=SiteKind.AIRPORT,
                lat=lat + rng.uniform(-1, 1),
                lon=lon + rng.uniform(-1, 1),
                tz=tz,
                country=country,
                iata=f"AA{i}",
                customs_minutes=rng.choice((0, 60, 180)),
                connect_minutes=rng.choice((30, 60, 120)),
                recovery_minutes=rng.choice((15, 60)),
                ln2_recharge=rng.random() < recharge,
            )
        )
    a0, a_last = airports[0], airports[-1]
    hours = rng.choice((None, ReceivingHours(time(8), time(17)), ReceivingHours(time(22), time(6))))
    origin = Site(
        "O",
        "origin",
        SiteKind.MANUFACTURING,
        a0.lat + 0.2,
        a0.lon,
        a0.tz,
        a0.country,
        ln2_recharge=rng.random() < recharge,
    )
    dest = Site(
        "D",
        "destination",
        SiteKind.TREATMENT_CENTER,
        a_last.lat + 0.2,
        a_last.lon,
        a_last.tz,
        a_last.country,
        customs_minutes=rng.choice((0, 90)),
        hours=hours,
    )
    sites = [origin, dest, *airports]
    if rng.random() < 0.5:
        host = rng.choice(airports)
        sites.append(
            Site(
                "R",
                "depot",
                SiteKind.DEPOT,
                host.lat + 0.05,
                host.lon,
                host.tz,
                host.country,
                ln2_recharge=True,
            )
        )
    lanes = []

    def lane(a: str, b: str, far: bool = False) -> None:
        minutes = rng.choice((600, 1500, 3000) if far else (20, 45, 90, 240))
        lanes.append(
            Lane(
                a,
                b,
                rng.choice(list(LaneMode)),
                minutes,
                round(rng.uniform(50, 300), 2),
                round(rng.uniform(0, 0.01), 4),
            )
        )

    # Local courier legs at both ends; driving across borders is rare and long.
    lane("O", a0.id)
    lane(a_last.id, "D")
    for airport in airports[1:]:
        if rng.random() < 0.15:
            lane("O", airport.id, far=True)
    for airport in airports[:-1]:
        if rng.random() < 0.15:
            lane(airport.id, "D", far=True)
    if any(s.id == "R" for s in sites):
        for airport in airports:
            if rng.random() < 0.7:
                lane(airport.id, "R")
                lane("R", airport.id)
    if rng.random() < 0.2:
        lane("O", "D", far=True)
    flights = []
    for n in range(rng.randint(10, 22)):
        a, b = rng.sample(airports, 2)
        dep = start + timedelta(minutes=5 * rng.randrange(0, 3 * 24 * 12))
        block = timedelta(minutes=5 * rng.randrange(12, 14 * 12))
        flights.append(
            Flight(
                "XX",
                str(100 + n),
                a.id,
                b.id,
                dep,
                dep + block,
                round(rng.uniform(100, 900), 2),
                round(rng.uniform(0, 0.02), 4),
            )
        )
    return Network.build(sites, lanes, flights)
