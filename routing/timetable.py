"""The search index over one network version: built once, shared by every query.

Flights are grouped by airport pair and sorted by tender cutoff (departure minus the origin's
tender minutes). For each pair the index keeps suffix minima of arrival time, cost and risk, so
that from any boarding position the planner can bound, in O(1), everything the remaining flights
of that pair could still offer. That is what lets the search be time-dependent Dijkstra (one
binary search per pair gives the earliest usable flight, also when a later departure overtakes
an earlier one) and still enumerate every later flight lazily, only when its bound is good enough
to matter.

The index also provides the A* bounds. Time to the destination: a backwards Dijkstra over the
quickest each lane and airport pair can ever be (tender, block time, recovery, customs), with the
fewest legs beside it (a backwards breadth-first search). Both are part of the index for every
treatment centre (where plans end) and computed on first use, then cached, for any other
destination. Time to the nearest LN2 recharge site: the same backwards Dijkstra from all recharge
sites at once, and never less than great-circle distance over the fastest speed of any leg.
Every bound is a lower bound whatever the clock, so the search that uses them stays exact.

Instants are POSIX seconds (int) inside the index and the search; risk is kept additive as
-log(1 - p), so the combined chance of failure of a route is 1 - exp(-sum).
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from itertools import accumulate
from threading import Lock
from typing import Final, TypeVar

from routing.hours import ReceivingHours
from routing.network import FlightKey, Network, Site, SiteKind

_N = TypeVar("_N", int, float)

#: An instant or a duration that never comes: later than any timetable.
NEVER: Final = 2**62

#: Destinations whose time bounds are kept (a few MB at 3,000 sites).
BOUNDS_CACHED: Final = 256


def risk_weight(p: float) -> float:
    """The additive form of a chance of failure: -log(1 - p)."""
    return -math.log1p(-p)


def combined_risk(weight: float) -> float:
    """The chance that at least one leg fails, from summed `risk_weight`s."""
    return -math.expm1(-weight)


@dataclass(frozen=True, slots=True)
class PairTimetable:
    """Flights between two airports, sorted by tender cutoff, with suffix minima."""

    destination: int
    #: Seconds from landing until the shipment is ready: recovery, and customs across a border.
    landing: int
    tender: tuple[int, ...]
    departs: tuple[int, ...]
    arrives: tuple[int, ...]
    cost: tuple[float, ...]
    risk: tuple[float, ...]
    flight: tuple[int, ...]
    min_arrives: tuple[int, ...]
    min_cost: tuple[float, ...]
    min_risk: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class LaneEntry:
    destination: int
    seconds: int
    cost: float
    risk: float
    lane: int


def _suffix_min(values: list[_N]) -> tuple[_N, ...]:
    return tuple(reversed(list(accumulate(reversed(values), min))))


class RouteIndex:
    """Everything the planner needs from one network version, in search-friendly form.

    Build it once per network version (`RouteIndex(network)`); it is immutable afterwards and
    safe to share between threads.
    """

    def __init__(self, network: Network) -> None:
        self.network = network
        self.site_ids: tuple[str, ...] = tuple(sorted(network.sites))
        self.number: dict[str, int] = {sid: i for i, sid in enumerate(self.site_ids)}
        sites = [network.sites[sid] for sid in self.site_ids]
        self.sites: tuple[Site, ...] = tuple(sites)
        countries = {c: i for i, c in enumerate(sorted({s.country for s in sites}))}
        self.country: tuple[int, ...] = tuple(countries[s.country] for s in sites)
        self.customs: tuple[int, ...] = tuple(s.customs_minutes * 60 for s in sites)
        self.connect: tuple[int, ...] = tuple(s.connect_minutes * 60 for s in sites)
        self.recovery: tuple[int, ...] = tuple(s.recovery_minutes * 60 for s in sites)
        self.recharge: tuple[bool, ...] = tuple(s.ln2_recharge for s in sites)
        self.hours: tuple[ReceivingHours | None, ...] = tuple(s.hours for s in sites)
        self.tz: tuple[str, ...] = tuple(s.tz for s in sites)

        speed = 0.0  # km per second, the fastest any leg moves
        lanes: list[list[LaneEntry]] = [[] for _ in sites]
        for i, lane in enumerate(network.lanes):
            a, b = self.number[lane.origin], self.number[lane.destination]
            seconds = lane.minutes * 60
            speed = max(speed, _speed(sites[a], sites[b], seconds))
            lanes[a].append(LaneEntry(b, seconds, lane.cost, risk_weight(lane.risk), i))
        self.lanes: tuple[tuple[LaneEntry, ...], ...] = tuple(tuple(x) for x in lanes)

        grouped: defaultdict[tuple[int, int], list[tuple[int, int, int, float, float, int]]]
        grouped = defaultdict(list)
        for i, f in enumerate(network.flights):
            a, b = self.number[f.origin], self.number[f.destination]
            dep, arr = int(f.departs_at.timestamp()), int(f.arrives_at.timestamp())
            speed = max(speed, _speed(sites[a], sites[b], arr - dep))
            grouped[a, b].append((dep - self.connect[a], dep, arr, f.cost, risk_weight(f.risk), i))
        pairs: list[list[PairTimetable]] = [[] for _ in sites]
        for (a, b), rows in sorted(grouped.items()):
            rows.sort()
            tender, deps, arrs, costs, risks, ids = (list(col) for col in zip(*rows, strict=True))
            pairs[a].append(
                PairTimetable(
                    destination=b,
                    landing=self.recovery[b] + self._customs(a, b),
                    tender=tuple(tender),
                    departs=tuple(deps),
                    arrives=tuple(arrs),
                    cost=tuple(costs),
                    risk=tuple(risks),
                    flight=tuple(ids),
                    min_arrives=_suffix_min(arrs),
                    min_cost=_suffix_min(costs),
                    min_risk=_suffix_min(risks),
                )
            )
        self.pairs: tuple[tuple[PairTimetable, ...], ...] = tuple(tuple(x) for x in pairs)
        self.speed_km_s = speed
        self.flight_number: dict[FlightKey, int] = {f.key: i for i, f in enumerate(network.flights)}
        services: defaultdict[tuple[str, str], list[int]] = defaultdict(list)
        for i, f in enumerate(network.flights):
            services[f.carrier, f.flight].append(i)
        #: Every dated flight of a service (carrier and flight number).
        self.service: dict[tuple[str, str], tuple[int, ...]] = {
            k: tuple(v) for k, v in services.items()
        }
        #: The sites each flight joins (by flight number), and how many ways each such link
        #: has: its flights, plus one when a lane joins the same two sites.
        self.flight_link: tuple[tuple[int, int], ...] = tuple(
            (self.number[f.origin], self.number[f.destination]) for f in network.flights
        )
        ways = Counter(self.flight_link)
        for a in range(len(sites)):
            for lane_entry in self.lanes[a]:
                ways[a, lane_entry.destination] += 1
        self.link_ways: dict[tuple[int, int], int] = dict(ways)
        self.last_departure = max(
            (int(f.departs_at.timestamp()) for f in network.flights), default=0
        )

        recharge_sites = [s for s in sites if s.ln2_recharge]
        self.recharge_km: tuple[float, ...] = tuple(
            min((s.distance_km(r) for r in recharge_sites), default=math.inf) for s in sites
        )
        # Static reachability (ignoring the clock): who can reach whom at all.
        reverse: list[set[int]] = [set() for _ in sites]
        for a in range(len(sites)):
            for lane_entry in self.lanes[a]:
                reverse[lane_entry.destination].add(a)
            for pair in self.pairs[a]:
                reverse[pair.destination].add(a)
        self.predecessors: tuple[frozenset[int], ...] = tuple(frozenset(r) for r in reverse)

        # The quickest each hop can ever be, whatever the clock: for the A* bound.
        quickest: list[dict[int, int]] = [{} for _ in sites]
        pair_quickest: list[tuple[tuple[int, int, int, PairTimetable], ...]] = []
        for a in range(len(sites)):
            for lane_entry in self.lanes[a]:
                b = lane_entry.destination
                hop = lane_entry.seconds + self._customs(a, b)
                quickest[b][a] = min(quickest[b].get(a, NEVER), hop)
            hops = []
            for position, pair in enumerate(self.pairs[a]):
                b = pair.destination
                block = min(arr - dep for dep, arr in zip(pair.departs, pair.arrives, strict=True))
                hop = self.connect[a] + block + self.recovery[b] + self._customs(a, b)
                quickest[b][a] = min(quickest[b].get(a, NEVER), hop)
                hops.append((hop, position, b, pair))
            pair_quickest.append(tuple(hops))
        #: For every site, its airport pairs as (the fewest seconds from a tender cutoff to
        #: ready at the far end that any flight of the pair takes, the pair's position in
        #: `pairs`, its far end, the pair). A shipment ready at `t` cannot be ready there
        #: before `t` plus those seconds, whichever flight it boards.
        self.pair_quickest: tuple[tuple[tuple[int, int, int, PairTimetable], ...], ...] = tuple(
            pair_quickest
        )
        self._quickest_into: tuple[tuple[tuple[int, int], ...], ...] = tuple(
            tuple(q.items()) for q in quickest
        )
        self._bounds: OrderedDict[int, tuple[list[int], list[int]]] = OrderedDict()
        self._bounds_lock = Lock()
        # Treatment centres are where plans end: their bounds are part of the index, the
        # bounds of any other destination are computed when first asked for and cached.
        self._centre_bounds: dict[int, tuple[list[int], list[int]]] = {
            i: self._compute_bounds(i)
            for i, s in enumerate(sites)
            if s.kind is SiteKind.TREATMENT_CENTER
        }
        #: For every site, a lower bound on the seconds until a shipment ready there can be
        #: ready at an LN2 recharge site (0 at one; NEVER when none can be reached).
        self.recharge_bounds: tuple[int, ...] = tuple(
            max(hops, self.seconds_bound(km))
            for hops, km in zip(
                self._backwards([i for i, s in enumerate(sites) if s.ln2_recharge]),
                self.recharge_km,
                strict=True,
            )
        )

    def _customs(self, a: int, b: int) -> int:
        return self.customs[b] if self.country[a] != self.country[b] else 0

    def time_bounds(self, destination: int) -> list[int]:
        """For every site, a lower bound on the seconds from being ready there to delivery at
        `destination` (NEVER when it cannot be reached): Dijkstra backwards over the quickest
        each lane and airport pair can be, counting tender, recovery and customs. Built with
        the index for treatment centres, cached for the most recent other destinations."""
        return self._destination_bounds(destination)[0]

    def leg_bounds(self, destination: int) -> list[int]:
        """For every site, the fewest legs of any route from there to `destination`, whatever
        the time (NEVER when none). Cached with `time_bounds`."""
        return self._destination_bounds(destination)[1]

    def _destination_bounds(self, destination: int) -> tuple[list[int], list[int]]:
        centre = self._centre_bounds.get(destination)
        if centre is not None:
            return centre
        with self._bounds_lock:
            cached = self._bounds.get(destination)
            if cached is not None:
                self._bounds.move_to_end(destination)
                return cached
        bounds = self._compute_bounds(destination)
        with self._bounds_lock:
            self._bounds[destination] = bounds
            while len(self._bounds) > BOUNDS_CACHED:
                self._bounds.popitem(last=False)
        return bounds

    def _compute_bounds(self, destination: int) -> tuple[list[int], list[int]]:
        legs = [NEVER] * len(self.sites)
        legs[destination] = 0
        frontier = [destination]
        while frontier:
            following = []
            for b in frontier:
                for a in self.predecessors[b]:
                    if legs[a] == NEVER:
                        legs[a] = legs[b] + 1
                        following.append(a)
            frontier = following
        return self._backwards([destination]), legs

    def _backwards(self, targets: list[int]) -> list[int]:
        """Dijkstra backwards from `targets` over the quickest each lane and airport pair can
        ever be: for every site, a lower bound on the seconds to the nearest target."""
        bounds = [NEVER] * len(self.sites)
        heap = []
        for target in targets:
            bounds[target] = 0
            heap.append((0, target))
        into = self._quickest_into
        while heap:
            d, b = heapq.heappop(heap)
            if d > bounds[b]:
                continue
            for a, hop in into[b]:
                nd = d + hop
                if nd < bounds[a]:
                    bounds[a] = nd
                    heapq.heappush(heap, (nd, a))
        return bounds

    def seconds_bound(self, km: float) -> int:
        """A lower bound on the seconds any route needs to cover `km` of great-circle distance."""
        if math.isinf(km):
            return NEVER
        if self.speed_km_s == 0.0 or math.isinf(self.speed_km_s):
            return 0
        return max(0, int(km / self.speed_km_s) - 1)

    def can_reach(
        self, origin: int, destination: int, excluded: Collection[int] = frozenset()
    ) -> bool:
        """Whether any sequence of lanes and flights joins the two sites, whatever the time,
        without the `excluded` flights (by number)."""
        used = Counter(self.flight_link[f] for f in excluded)
        dead = {link for link, n in used.items() if n == self.link_ways[link]}
        seen = {destination}
        frontier = [destination]
        while frontier:
            node = frontier.pop()
            if node == origin:
                return True
            for prev in self.predecessors[node]:
                if prev not in seen and (prev, node) not in dead:
                    seen.add(prev)
                    frontier.append(prev)
        return False


def _speed(a: Site, b: Site, seconds: int) -> float:
    km = a.distance_km(b)
    if seconds <= 0:
        return math.inf if km > 0 else 0.0
    return km / seconds
