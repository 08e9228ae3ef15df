"""Route planner benchmark: a world-sized network, the planner against a time-expanded baseline.

Run:  .venv/bin/python -m bench.routing [--queries 60] [--baseline 30] [--seed 7]

Builds a network of ~3,000 airports (airportsdata) plus manufacturing sites, treatment centres
and LN2 depots, with >200,000 dated flights over one week (hub and spoke, `synthesize_flights`).
Then it times, per query: an earliest-arrival (`fastest`) plan, a constrained `safest` plan
(deliver within 48 h, at most 5 handoffs) and k=5 `fastest` alternatives; and the same
earliest-arrival queries answered by `networkx.dijkstra_path` on a straightforward
time-expanded graph (one node per flight boarding and per landing), checking that both give the
same delivery time. Index and graph building are reported apart: they happen once per network
version. Both are then frozen out of the cyclic garbage collector (`gc.freeze()`, what a
long-running service does after loading a network version), so that no query of either side
pays for a full collection of the other's millions of objects. Nothing here is a pass/fail
assertion on time; the figures are printed. The machine is shared: take the median of a couple
of runs. The output says whether the route search ran compiled (`setup.py` compiles it with
mypyc when it can); for the pure Python figures, reinstall with
`COLDCHAIN_PURE_PYTHON=1 .venv/bin/pip install -e .` first.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import TypeVar

import networkx as nx

from routing import (
    Lane,
    LaneMode,
    Network,
    Objective,
    PlanRequest,
    ReceivingHours,
    RouteIndex,
    Site,
    SiteKind,
    airport_codes,
    airport_site,
    plan,
    search,
)
from routing.example import synthesize_flights

START = date(2026, 6, 1)
_T = TypeVar("_T")


@dataclass(frozen=True)
class World:
    network: Network
    manufacturing: list[str]
    centres: list[str]


def build_world(seed: int, airports: int = 2700, hubs: int = 120) -> World:
    rng = random.Random(seed)
    codes = rng.sample(airport_codes(), airports)
    sites = [airport_site(c, customs_minutes=180) for c in codes]
    hub_sites = rng.sample(sites, hubs)
    hub_ids = {h.id for h in hub_sites}
    routes: list[tuple[str, Site, Site, int]] = []
    seen: set[tuple[str, str]] = set()

    def route(a: Site, b: Site, per_day: int) -> None:
        for x, y in ((a, b), (b, a)):
            if (x.id, y.id) not in seen:
                seen.add((x.id, y.id))
                routes.append((f"C{len(routes) % 40:02d}", x, y, per_day))

    for s in sites:
        near = sorted(hub_sites, key=s.distance_km)
        if s.id in hub_ids:
            for h in near[1:13] + rng.sample(hub_sites, 4):
                if h.id != s.id:
                    route(s, h, rng.randint(3, 5))
        else:
            for h in near[:2]:
                route(s, h, rng.randint(2, 3))
    flights = synthesize_flights(routes, START, 7, rng)

    extra: list[Site] = []
    lanes: list[Lane] = []
    manufacturing: list[str] = []
    centres: list[str] = []
    hours = ReceivingHours(
        datetime.min.time().replace(hour=8), datetime.min.time().replace(hour=18)
    )
    for i in range(420):
        kind = (SiteKind.MANUFACTURING, SiteKind.TREATMENT_CENTER, SiteKind.DEPOT)[i % 3]
        host = rng.choice(hub_sites if kind is SiteKind.DEPOT else sites)
        site = Site(
            id=f"{kind.value[:3].upper()}-{i:03d}",
            name=f"{kind.value} {i}",
            kind=kind,
            lat=max(-89.0, min(89.0, host.lat + rng.uniform(-0.4, 0.4))),
            lon=max(-179.0, min(179.0, host.lon + rng.uniform(-0.4, 0.4))),
            tz=host.tz,
            country=host.country,
            ln2_recharge=kind is SiteKind.DEPOT,
            hours=hours if kind is SiteKind.TREATMENT_CENTER else None,
        )
        extra.append(site)
        minutes = int(site.distance_km(host) / 50 * 60) + 15
        lane_out = Lane(site.id, host.id, LaneMode.COURIER, minutes, 150.0, 0.001)
        lane_in = Lane(host.id, site.id, LaneMode.COURIER, minutes, 150.0, 0.001)
        if kind is not SiteKind.TREATMENT_CENTER:
            lanes.append(lane_out)
        if kind is not SiteKind.MANUFACTURING:
            lanes.append(lane_in)
        (manufacturing if kind is SiteKind.MANUFACTURING else centres).append(site.id)
    centres = [c for c in centres if c.startswith("TRE")]
    return World(Network.build([*sites, *extra], lanes, flights), manufacturing, centres)


def bench_queries(world: World, seed: int, n: int) -> list[tuple[str, str, datetime]]:
    """The benchmark's requests: (manufacturing site, treatment centre, departure) in the first
    two days of the week, drawn from `seed`."""
    rng = random.Random(seed + 1)
    start = datetime.combine(START, datetime.min.time(), tzinfo=UTC)
    return [
        (
            rng.choice(world.manufacturing),
            rng.choice(world.centres),
            start + timedelta(minutes=5 * rng.randrange(0, 2 * 24 * 12)),
        )
        for _ in range(n)
    ]


class TimeExpanded:
    """The baseline: a time-expanded graph searched with networkx.dijkstra_path.

    Nodes: ("b", i) = ready to board flight i by its tender cutoff; ("a", i) = ready after its
    landing (recovery and customs). Edges: board -> land (flight), land -> next boarding at that
    airport, boarding -> next boarding at the same airport (waiting). A query adds a source,
    a sink and the courier edges at both ends.
    """

    def __init__(self, network: Network) -> None:
        self.network = network
        sites = network.sites
        self.graph: nx.DiGraph[object] = nx.DiGraph()
        self.boardings: dict[str, tuple[list[int], list[int]]] = {}
        rows: dict[str, list[tuple[int, int]]] = {}
        self.ready: list[int] = []
        for i, f in enumerate(network.flights):
            tender = int(f.departs_at.timestamp()) - sites[f.origin].connect_minutes * 60
            rows.setdefault(f.origin, []).append((tender, i))
            a, b = sites[f.origin], sites[f.destination]
            customs = b.customs_minutes * 60 if a.country != b.country else 0
            self.ready.append(int(f.arrives_at.timestamp()) + b.recovery_minutes * 60 + customs)
        for airport, row in rows.items():
            row.sort()
            self.boardings[airport] = ([t for t, _ in row], [i for _, i in row])
            for (t1, i1), (t2, i2) in zip(row, row[1:], strict=False):
                self.graph.add_edge(("b", i1), ("b", i2), weight=t2 - t1)
        for i, f in enumerate(network.flights):
            t_board = int(f.departs_at.timestamp()) - sites[f.origin].connect_minutes * 60
            self.graph.add_edge(("b", i), ("a", i), weight=self.ready[i] - t_board)
            nxt = self._next_boarding(f.destination, self.ready[i])
            if nxt is not None:
                self.graph.add_edge(("a", i), ("b", nxt[1]), weight=nxt[0] - self.ready[i])
        self.arrivals: dict[str, list[int]] = {}
        for i, f in enumerate(network.flights):
            self.arrivals.setdefault(f.destination, []).append(i)

    def _next_boarding(self, airport: str, ready: int) -> tuple[int, int] | None:
        row = self.boardings.get(airport)
        if row is None:
            return None
        j = bisect.bisect_left(row[0], ready)
        return (row[0][j], row[1][j]) if j < len(row[0]) else None

    def earliest_delivery(self, origin: str, destination: str, depart: int) -> int | None:
        sites, g = self.network.sites, self.graph
        added: list[tuple[object, object]] = []
        dest = sites[destination]
        for lane in self.network.lanes:
            if lane.origin == origin:
                a = sites[lane.destination]
                customs = a.customs_minutes * 60 if a.country != sites[origin].country else 0
                nxt = self._next_boarding(a.id, depart + lane.minutes * 60 + customs)
                if nxt is not None:
                    g.add_edge("src", ("b", nxt[1]), weight=nxt[0] - depart)
                    added.append(("src", ("b", nxt[1])))
            if lane.destination == destination:
                b = sites[lane.origin]
                customs = dest.customs_minutes * 60 if dest.country != b.country else 0
                for i in self.arrivals.get(b.id, []):
                    ready = self.ready[i] + lane.minutes * 60 + customs
                    if dest.hours is not None:
                        ready = dest.hours.next_open(ready, dest.tz)
                    g.add_edge(("a", i), "snk", weight=ready - self.ready[i])
                    added.append((("a", i), "snk"))
        try:
            if "src" not in g or "snk" not in g:
                return None
            path = nx.dijkstra_path(g, "src", "snk")
            return depart + int(nx.path_weight(g, path, "weight"))
        except nx.NetworkXNoPath:
            return None
        finally:
            g.remove_edges_from(added)
            for node in ("src", "snk"):
                if node in g:
                    g.remove_node(node)


def _timed(fn: Callable[[], _T]) -> tuple[float, _T]:
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1000, out


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--baseline", type=int, default=30, help="queries also run on baseline")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    ms, world = _timed(lambda: build_world(args.seed))
    net = world.network
    print(
        f"network: {len(net.sites)} sites, {len(net.lanes)} lanes, {len(net.flights)} flights "
        f"in one week (generated in {ms / 1000:.1f} s)"
    )
    ms, index = _timed(lambda: RouteIndex(net))
    print(f"planner index build (once per network version): {ms / 1000:.2f} s")
    print(
        "route search: "
        + (
            "compiled with mypyc (setup.py)"
            if search.COMPILED
            else "pure Python (not compiled: see setup.py)"
        )
    )
    ms, baseline = _timed(lambda: TimeExpanded(net))
    print(
        f"baseline time-expanded graph build: {ms / 1000:.2f} s "
        f"({baseline.graph.number_of_nodes()} nodes, {baseline.graph.number_of_edges()} edges)"
    )

    # Both the index and the baseline graph are millions of long-lived objects: freeze them out
    # of the cyclic garbage collector, as a service does after loading a network version, so
    # that neither side's timings include a full collection of the other's heap.
    gc.collect()
    gc.freeze()

    queries = bench_queries(world, args.seed, args.queries)
    timings: dict[str, list[float]] = {"fastest": [], "safest": [], "k5": [], "baseline": []}
    feasible = {"fastest": 0, "safest": 0, "k5": 0}
    plans_k5 = 0
    agree = compared = 0
    for n, (origin, dest, depart) in enumerate(queries):
        fastest = PlanRequest(origin, dest, depart, 72.0)
        safest = PlanRequest(
            origin,
            dest,
            depart,
            72.0,
            objective=Objective.SAFEST,
            deliver_by=depart + timedelta(hours=48),
            max_handoffs=5,
        )
        k5 = PlanRequest(origin, dest, depart, 72.0, alternatives=5)
        ms, res = _timed(partial(plan, index, fastest))
        timings["fastest"].append(ms)
        best = res.best
        feasible["fastest"] += best is not None
        ms, res2 = _timed(partial(plan, index, safest))
        timings["safest"].append(ms)
        feasible["safest"] += res2.best is not None
        ms, res3 = _timed(partial(plan, index, k5))
        timings["k5"].append(ms)
        feasible["k5"] += bool(res3.plans)
        plans_k5 += len(res3.plans)
        if n < args.baseline:
            ask = partial(baseline.earliest_delivery, origin, dest, int(depart.timestamp()))
            ms, expected = _timed(ask)
            timings["baseline"].append(ms)
            got = int(best.delivered_at.timestamp()) if best is not None else None
            # The planner also enforces the 72 h hold; the baseline has none.
            if expected is not None and got is None:
                expected = None if expected - int(depart.timestamp()) > 72 * 3600 else expected
            compared += 1
            agree += got == expected
    print()
    print(f"{'query':<34}{'n':>5}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}  feasible")
    labels = {
        "fastest": "earliest arrival (fastest)",
        "safest": "safest, deliver<=48h, <=5 handoffs",
        "k5": "fastest, k=5 alternatives",
        "baseline": "baseline: TE graph + dijkstra_path",
    }
    for name, label in labels.items():
        values = timings[name]
        extra = f"  {feasible[name]}/{len(values)}" if name in feasible else ""
        print(
            f"{label:<34}{len(values):>5}{_pct(values, 0.5):>10.1f}{_pct(values, 0.95):>10.1f}"
            f"{max(values):>10.1f}{extra}"
        )
    sub = timings["fastest"][: len(timings["baseline"])]
    print()
    print(f"k=5: {plans_k5 / max(1, feasible['k5']):.1f} plans per feasible query")
    print(f"baseline agreement on delivery time: {agree}/{compared} queries identical")
    print(
        f"speed-up vs baseline on the same queries: p50 "
        f"{statistics.median(timings['baseline']) / statistics.median(sub):.0f}x, mean "
        f"{statistics.mean(timings['baseline']) / statistics.mean(sub):.0f}x"
    )
    print(
        f"reproduce: .venv/bin/python -m bench.routing --queries {args.queries} "
        f"--baseline {args.baseline} --seed {args.seed}   (python {sys.version.split()[0]})"
    )


if __name__ == "__main__":
    main()
