"""The exact route search: multi-criteria, time-dependent A* with lazily enumerated flights.

Why this algorithm. Earliest arrival over a timetable is exact with time-dependent Dijkstra when
leaving later never arrives earlier; per airport pair, a suffix minimum of arrival times makes
that true even where a later flight overtakes an earlier one. But a cold-chain route is judged on
more than arrival: hold time that runs out and is reset by LN2 recharges, a deadline, a handoff
limit, cost and risk. So the search is label-setting with Pareto labels (resource-constrained
shortest path), in the order of an admissible lower bound of the objective (A*):

- A label is "the shipment is ready at site u at time t" with its hold clock, handoffs, cost,
  risk and the smallest hold margin so far. A label is dropped when another one at the same
  site is at least as good in every one of these (dominance), so the search is exact. The check
  is made when a label is queued as well as when it is taken off the heap, and for `fastest` a
  whole airport pair is skipped when a settled label at its far end already dominates anything
  its flights could bring.
- Labels come off a heap in lexicographic order of a bound on the final objective key: time uses
  the index's per-destination bound (quickest possible hops) pushed through the destination's
  receiving hours (delivery is monotone in arrival), legs the fewest hops to the destination,
  margin the time to the nearest recharge site or the destination. Ties go to the earliest
  arrival bound. The first delivery taken off the heap is therefore optimal.
- Pruning, all exact: a label whose bounds already break the deadline or the handoff limit, or
  whose hold runs out before it could reach a recharge site or the destination, is dropped; so
  is one whose bound is worse than a known feasible plan (the incumbent, below).
- Flights are not expanded all at once. For each airport pair a *cursor* stands for "this flight
  and every later one"; its bound uses the pair's suffix minima. Popping a cursor yields one
  flight and the cursor for the next. A later, cheaper or safer flight is thus still found, but
  only when its bound says it can matter; for `fastest` the next cursor is only queued when a
  later flight overtakes this one (or the label is floating), since otherwise it is dominated.
- Nor, for `fastest`, are a label's airport pairs: they wait on the heap behind one *pending*
  entry, in order of a bound that needs no timetable (the pair's quickest flight), and each
  pair's cursor is worked out only when the heap comes to that bound. Most never are: the plan
  is found first. Each cursor keeps the place in the heap's order, ties included, that it
  would have had if pushed at once, so the search finds the very same plan (`label_search`).

How a query is answered (`search`). Taking the recharges out of a route keeps its flights, lanes
and legs and makes every later step ready no later (waiting for a tender cutoff or receiving
hours is monotone). So:

- `fastest` first searches with the hold ignored, which needs no recharges and compares labels
  on fewer criteria. If that route keeps within the hold, it is the answer; if there is no route
  at all, nothing is feasible. Only when the hold rules the quickest routes out does the full
  search with recharges run. Alternatives after a plan that took longer than the hold go
  straight to it (`Query.hold_binds`): their routes are a subset, so the first search would
  only fail again.
- `safest` and `cheapest` first ask for the fastest plan under the same constraints. None means
  infeasible, proved far sooner than by a search ordered by margin or cost. Otherwise that plan
  is feasible, so its margin (or cost) is an incumbent the optimum can only improve on.
- Before any of it, when flights are left out (alternatives, cancellations), a reachability
  check over the links that still have a flight or a lane answers "no route" without a search.

Hold semantics. The hold clock starts at pack-out (`depart_at`). Arriving at an LN2 recharge
site, a shipment may be recharged: the stretch so far ends there (its margin is recorded), the
recharge takes `recharge_minutes`, and the fresh charge is counted from when the dewar leaves
the depot: waiting for its first fixed appointment (a flight's tender cutoff, or a site's
receiving hours) happens topped up at the depot. A label in that state is "floating".
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from heapq import heappop, heappush
from typing import Any, Final, cast

from routing.itinerary import Leg, LegMode, Plan
from routing.request import Objective
from routing.timetable import NEVER, PairTimetable, RouteIndex, combined_risk

_LABEL: Final = 0
_CURSOR: Final = 1
_DELIVERY: Final = 2
_PENDING: Final = 3

#: Without max_handoffs, routes are still bounded: no real route has more legs than this.
MAX_LEGS: Final = 24

_NO_MARGIN: Final = NEVER  # the margin of a route with no finished stretch yet

#: Whether this module runs compiled by mypyc (see `setup.py`) or as the Python source.
COMPILED: Final = not __file__.endswith(".py")


@dataclass(frozen=True, slots=True)
class Query:
    """One search, in the index's terms (site numbers, POSIX seconds)."""

    origin: int
    destination: int
    depart: int
    hold: int
    recharge_hold: int
    recharge_seconds: int
    latest: int
    max_legs: int
    objective: Objective
    enforce_hold: bool = True
    excluded: frozenset[int] = frozenset()
    need_flight: bool = False
    #: Known to the caller: even the fastest route with the hold ignored breaks the hold (an
    #: earlier search over a superset of these routes found so), so only routes with a recharge
    #: can be feasible and `search` goes straight to the search with recharges.
    hold_binds: bool = False


class _Label:
    __slots__ = (
        "clock",
        "cost",
        "floating",
        "flown",
        "legs",
        "mmin",
        "parent",
        "rank",
        "risk",
        "seg",
        "site",
        "step",
        "t",
    )

    def __init__(
        self,
        site: int,
        t: int,
        clock: int,
        seg: int,
        floating: bool,
        legs: int,
        cost: float,
        risk: float,
        mmin: int,
        flown: bool,
        parent: _Label | None,
        step: tuple[int, int, int, int] | None,
    ) -> None:
        self.site = site
        self.t = t
        self.clock = clock
        self.seg = seg
        self.floating = floating
        self.legs = legs
        self.cost = cost
        self.risk = risk
        self.mmin = mmin
        self.flown = flown
        self.parent = parent
        # (kind, lane or flight number, departure, arrival); kind -1 marks a recharge.
        self.step = step
        # Set when the label is settled: how many were settled before it (`rank` is unset
        # until then, and only settled labels are looked up by it).
        self.rank: int

    def margin(self) -> int:
        """Hold left now, or the smallest left at the end of any finished stretch."""
        return min(self.mmin, self.seg - (self.t - self.clock))

    def dominates(self, other: _Label, objective: Objective, hold: bool = True) -> bool:
        """Whether every route on from `other` is matched by one on from this label, as good
        by `objective`; `hold` False when the hold is not a constraint (then not compared)."""
        if not (
            self.t <= other.t
            and self.legs <= other.legs
            and (self.flown or not other.flown)
            and (objective is not Objective.SAFEST or self.risk <= other.risk)
            and (objective is not Objective.CHEAPEST or self.cost <= other.cost)
            and (objective is not Objective.SAFEST or self.mmin >= other.mmin)
        ):
            return False
        if not hold:
            return True
        if other.floating:
            return (
                self.floating
                and self.clock - self.t >= other.clock - other.t
                and self.seg >= other.seg
            )
        return self.clock + self.seg >= other.clock + other.seg


@dataclass
class SearchStats:
    """What searches did, summed: labels settled (taken off the heap and kept) and heap
    entries pushed (labels, cursors and pending pairs). Deterministic for a given network and
    query, so tests can hold the bounds to account: a looser bound makes the search settle
    more."""

    settled: int = 0
    pushed: int = 0


_KIND_LANE: Final = 0
_KIND_FLIGHT: Final = 1
_KIND_RECHARGE: Final = -1

Priority = tuple[float, ...]


class PairOrders:
    """Each site's airport pairs in the order of their bound to one destination, as
    `label_search` looks at them: worked out when a search first expands the site, and kept for
    the other searches of the same request (its alternatives), which all end there. For one
    thread at a time: a planner makes one per request."""

    __slots__ = ("by_site", "destination")

    def __init__(self, destination: int) -> None:
        self.destination = destination
        self.by_site: dict[int, list[tuple[int, int, PairTimetable]]] = {}


def search(
    index: RouteIndex,
    q: Query,
    stats: SearchStats | None = None,
    orders: PairOrders | None = None,
) -> Plan | None:
    """The best plan for `q` by its objective, or None when no route meets its constraints.

    `fastest` is one label search. The other objectives first ask for the fastest plan under
    the same constraints: when there is none, nothing is feasible, which that search proves
    far sooner than a search ordered by margin or cost; when there is one, it is feasible, so
    its margin (safest) or cost (cheapest) bounds the optimum and prunes the second search.
    """
    if q.excluded and not index.can_reach(q.origin, q.destination, q.excluded):
        return None
    if q.objective is Objective.FASTEST:
        if not q.enforce_hold or q.hold_binds:
            return label_search(index, q, stats=stats, orders=orders)
        # Taking the recharges out of a route keeps its legs and makes it no later, so the
        # fastest route with the hold ignored is the answer when it keeps within the hold, and
        # when there is none, nothing is feasible. Only otherwise do recharges matter.
        relaxed = label_search(index, replace(q, enforce_hold=False), stats=stats, orders=orders)
        if relaxed is None or relaxed.duration <= timedelta(seconds=q.hold):
            return relaxed
        return label_search(index, q, stats=stats, orders=orders)
    fastest = search(index, replace(q, objective=Objective.FASTEST), stats, orders)
    if fastest is None:
        return None
    return label_search(index, q, plan_key(q.objective, fastest)[0], stats, orders)


def label_search(
    index: RouteIndex,
    q: Query,
    incumbent: float | None = None,
    stats: SearchStats | None = None,
    orders: PairOrders | None = None,
) -> Plan | None:
    """The label-setting search. `incumbent` is the first component of the objective key of a
    plan known to be feasible (for safest, minus its margin; for cheapest, its cost): anything
    whose bound on that component is worse is dropped, which is exact because the optimum is at
    least as good as the incumbent."""
    dest = q.destination
    bounds = index.time_bounds(dest)
    hops = index.leg_bounds(dest)
    if bounds[q.origin] == NEVER or hops[q.origin] > q.max_legs:
        return None
    recharge_bounds = index.recharge_bounds
    opens, closes = _receiving_windows(index, q)
    windows = len(opens)
    deliver = _delivery_bound(opens, closes)

    def to_dest(u: int) -> int:
        return bounds[u]

    def to_stop(u: int) -> int:
        """Bound on the time until the current stretch can end (recharge or delivery)."""
        return min(to_dest(u), recharge_bounds[u])

    key = _key_function(q.objective)
    # Heap entries are flat: the objective bound's components, the arrival bound, a counter
    # (unique, so nothing after it is compared), the kind, the label, and for a cursor its
    # pair and position. One tuple per entry keeps the garbage collector out of the way.
    heap: list[tuple[Any, ...]] = []
    counter = 0  # orders ties; not every value is used (see `expand_fastest`)
    pushed = 0
    limit = incumbent

    def push(
        priority: Priority,
        arrival: int,
        kind: int,
        label: _Label,
        pair: PairTimetable | None = None,
        j: int = 0,
    ) -> None:
        """Queue `label` by its objective bound, then by its bound on arrival (not delivery: a
        site's hours make many bounds equal) so that ties go to the most promising."""
        nonlocal counter, pushed
        if limit is not None and priority[0] > limit:
            return
        counter += 1
        pushed += 1
        heappush(heap, (*priority, arrival, counter, kind, label, pair, j))

    def margin_bound(label: _Label, t: int, u: int) -> int:
        # Waiting while floating is not counted, but travel from here to the next stop is.
        return min(label.mmin, label.clock + label.seg - t - to_stop(u))

    def push_label(label: _Label) -> None:
        u = label.site
        if bounds[u] == NEVER:
            return
        if u == dest:
            priority = key(label.t, label.legs, label.risk, label.cost, label.margin())
            push(priority, label.t, _DELIVERY, label)
            return
        to_u = bounds[u]
        t_bound = label.t + to_u
        legs = label.legs + hops[u]
        if legs > max_legs or t_bound > latest:
            return
        if enforce_hold:
            hold_left = label.clock + label.seg - label.t
            if hold_left < to_u and hold_left < recharge_bounds[u]:
                return  # the hold runs out before any recharge site or the destination
        others = settled.get(u)
        if others is not None and _dominated(label, others, q.objective, hold):
            return
        if fastest:  # `push` without the tuple `key` makes; `fastest` has no incumbent
            nonlocal counter, pushed
            counter += 1
            pushed += 1
            heappush(heap, (deliver(t_bound), legs, t_bound, counter, _LABEL, label, None, 0))
            return
        priority = key(
            deliver(t_bound),
            label.legs + hops[u],
            label.risk,
            label.cost,
            margin_bound(label, label.t, u),
        )
        push(priority, t_bound, _LABEL, label)

    fastest = q.objective is Objective.FASTEST
    latest, max_legs, enforce_hold = q.latest, q.max_legs, q.enforce_hold
    # Whether hold and recharges matter at all: not when the hold is not enforced and the
    # objective is not the margin (then a recharge only costs time).
    hold = enforce_hold or q.objective is Objective.SAFEST
    settled: dict[int, list[_Label]] = {}

    def push_cursor(label: _Label, pair: PairTimetable, j: int) -> None:
        tender = pair.tender[j]
        if tender > latest:
            return
        if enforce_hold and not label.floating and tender - label.clock > label.seg:
            return
        b = pair.destination
        legs = label.legs + 1 + hops[b]
        if legs > max_legs:  # also when `b` cannot reach the destination at all
            return
        ready = pair.min_arrives[j] + pair.landing
        t_bound = ready + bounds[b]
        if t_bound > latest:
            return
        # A floating label's clock starts when it boards, later for a later flight: it is not
        # bounded here but checked on arrival.
        hold_end = label.clock + label.seg
        if enforce_hold and not label.floating and hold_end - ready < to_stop(b):
            return  # the hold runs out before any recharge site or the destination
        if fastest:
            others = settled.get(b)
            if (
                not label.floating
                and others is not None
                and _covers(others, ready, label.legs + 1, hold_end if hold else -NEVER)
            ):
                return
            push((deliver(t_bound), legs), t_bound, _CURSOR, label, pair, j)
            return
        margin = (
            margin_bound(label, label.t, label.site)
            if label.floating
            else min(label.mmin, label.clock + label.seg - ready - to_stop(b))
        )
        priority = key(
            deliver(t_bound),
            legs,
            label.risk + pair.min_risk[j],
            label.cost + pair.min_cost[j],
            margin,
        )
        push(priority, t_bound, _CURSOR, label, pair, j)

    def customs(a: int, b: int) -> int:
        return customs_seconds(index, a, b)

    def arrive(
        prev: _Label,
        v: int,
        ready: int,
        clock: int,
        floating: bool,
        cost: float,
        risk: float,
        flown: bool,
        step: tuple[int, int, int, int],
    ) -> None:
        hours = index.hours[v]
        if hours is not None:
            opened = hours.next_open(ready, index.tz[v])
            if opened > ready and floating:
                clock += opened - ready
                floating = False
            ready = opened
        if ready > q.latest or (q.enforce_hold and ready - clock > prev.seg):
            return
        legs = prev.legs + 1
        if v == dest:
            if q.need_flight and not flown:
                return
        elif legs >= q.max_legs:
            return
        label = _Label(
            v, ready, clock, prev.seg, floating, legs, cost, risk, prev.mmin, flown, prev, step
        )
        push_label(label)
        if hold and index.recharge[v] and v != dest:
            recharged_at = ready + q.recharge_seconds
            if recharged_at <= q.latest:
                fresh = _Label(
                    v,
                    recharged_at,
                    recharged_at,
                    q.recharge_hold,
                    True,
                    legs,
                    cost,
                    risk,
                    label.margin(),
                    flown,
                    label,
                    (_KIND_RECHARGE, 0, 0, 0),
                )
                push_label(fresh)

    def expand(label: _Label) -> None:
        u = label.site
        for lane in index.lanes[u]:
            v = lane.destination
            arrival = label.t + lane.seconds
            arrive(
                label,
                v,
                arrival + customs(u, v),
                label.clock,
                label.floating,
                label.cost + lane.cost,
                label.risk + lane.risk,
                label.flown,
                (_KIND_LANE, lane.lane, label.t, arrival),
            )
        if fastest:
            expand_fastest(label)
            return
        for pair in index.pairs[u]:
            j = bisect_left(pair.tender, label.t)
            if j < len(pair.tender):
                push_cursor(label, pair, j)

    # For `fastest`, the airport pairs from a settled label are not looked at all at once but
    # lazily, in order of a bound that needs no timetable: a label ready at `t` cannot be ready
    # beyond pair `p` before `t + pair_quickest[p]`, so no cursor of that pair can have a
    # smaller bound than `t + pair_quickest[p] + bounds[b]`. Each site's pairs are sorted by it
    # (once per request: `PairOrders`), and a *pending* heap entry keyed by the smallest such
    # bound of the pairs not yet looked at stands for them all. The pairs are looked at when it
    # comes off the heap (or at once, when they could be first anyway); most never are, because
    # the plan is found first. A cursor keeps the place in the heap's order it would have had
    # if it had been pushed when its label was expanded: its counter is reserved then, and the
    # check whether a settled label covers it sees only the labels settled by then. So the
    # search takes every label and cursor off the heap in the same order, and finds the same
    # plan, as one that pushes every cursor at once.
    pair_quickest = index.pair_quickest
    if orders is None or orders.destination != dest:
        orders = PairOrders(dest)
    by_site = orders.by_site

    def pair_order(u: int) -> list[tuple[int, int, PairTimetable]]:
        """The pairs from `u` that can reach the destination, as (bound on the seconds from a
        label's time to delivery, position in `index.pairs[u]`, pair), by the bound."""
        order = [
            (hop + bounds[b], position, pair)
            for hop, position, b, pair in pair_quickest[u]
            if bounds[b] != NEVER
        ]
        order.sort()
        by_site[u] = order
        return order

    def expand_fastest(label: _Label) -> None:
        """Reserve the counters of the label's cursors and look at its pairs, or queue them."""
        nonlocal counter
        u = label.site
        base = counter + 1
        counter = base + len(index.pairs[u])
        order = by_site.get(u)
        if order is None:
            order = pair_order(u)
        if order:
            look_at(label, order, 0, base)

    def look_at(
        label: _Label, order: list[tuple[int, int, PairTimetable]], first: int, base: int
    ) -> None:
        """`push_cursor` for the label's pairs from `order[first]` on, inlined for `fastest` (the
        innermost loop of the search), until the next one's bound is beyond the smallest on the
        heap: that one and the rest then wait there, pending."""
        nonlocal pushed
        t, legs_after, fixed = label.t, label.legs + 1, not label.floating
        hold_end = label.clock + label.seg
        check_hold = enforce_hold and fixed
        last_tender = min(latest, hold_end) if check_hold else latest
        cover_end = hold_end if hold else -NEVER
        seen = label.rank + 1  # the labels settled when `label` was expanded
        for i in range(first, len(order)):
            quickest, position, pair = order[i]
            t_least = t + quickest
            if t_least > latest:
                return  # and so for the rest, whose bounds are no smaller
            if heap and t_least > heap[0][0]:
                # No cursor of the rest has fewer legs than the fewest from the label's site.
                pushed += 1
                fewest = label.legs + hops[label.site]
                heappush(heap, (deliver(t_least), fewest, t_least, base, _PENDING, label, order, i))
                return
            b = pair.destination
            legs = legs_after + hops[b]
            if legs > max_legs:
                continue
            tenders = pair.tender
            j = bisect_left(tenders, t)
            if j == len(tenders) or tenders[j] > last_tender:
                continue
            ready = pair.min_arrives[j] + pair.landing
            to_b = bounds[b]
            t_bound = ready + to_b
            if t_bound > latest:
                continue
            if check_hold and (hold_end - ready < to_b and hold_end - ready < recharge_bounds[b]):
                continue
            if fixed:
                others = settled.get(b)
                if others is not None and _covers(others, ready, legs_after, cover_end, seen):
                    continue
            w = bisect_right(closes, t_bound)  # `deliver(t_bound)`, written out
            delivered = t_bound if w == windows or opens[w] <= t_bound else opens[w]
            pushed += 1
            heappush(heap, (delivered, legs, t_bound, base + 1 + position, _CURSOR, label, pair, j))

    def board(label: _Label, pair: PairTimetable, j: int) -> None:
        flight = pair.flight[j]
        excluded = flight in q.excluded
        if j + 1 < len(pair.tender) and (
            excluded or not fastest or label.floating or pair.min_arrives[j + 1] < pair.arrives[j]
        ):
            # For `fastest`, a later flight of the pair from the same label lands no earlier
            # with as many legs and the same clock, so it is dominated, unless it overtakes
            # this one or the label is floating (boarding later then leaves more hold).
            push_cursor(label, pair, j + 1)
        if excluded:
            return
        u, v = label.site, pair.destination
        # Boarding fixes the schedule: a floating clock starts at the tender cutoff.
        clock = label.clock + (pair.tender[j] - label.t) if label.floating else label.clock
        arrival = pair.arrives[j]
        arrive(
            label,
            v,
            arrival + index.recovery[v] + customs(u, v),
            clock,
            False,
            label.cost + pair.cost[j],
            label.risk + pair.risk[j],
            True,
            (_KIND_FLIGHT, flight, pair.departs[j], arrival),
        )

    start = _Label(
        q.origin, q.depart, q.depart, q.hold, False, 0, 0.0, 0.0, _NO_MARGIN, False, None, None
    )
    push_label(start)
    if hold and index.recharge[q.origin]:
        at = q.depart + q.recharge_seconds
        push_label(
            _Label(
                q.origin,
                at,
                at,
                q.recharge_hold,
                True,
                0,
                0.0,
                0.0,
                start.margin(),
                False,
                start,
                (_KIND_RECHARGE, 0, 0, 0),
            )
        )

    found: Plan | None = None
    ranks = 0
    while heap:
        entry = heappop(heap)
        kind, label = entry[-4], entry[-3]
        if kind == _CURSOR:
            board(label, entry[-2], entry[-1])
            continue
        if kind == _PENDING:
            look_at(label, entry[-2], entry[-1], entry[3])
            continue
        if kind == _DELIVERY:
            found = _plan(index, q, label)
            break
        here = settled.get(label.site)
        if here is None:
            here = settled[label.site] = []
        elif _dominated(label, here, q.objective, hold):
            continue
        label.rank = ranks
        ranks += 1
        here.append(label)
        expand(label)
    if stats is not None:
        stats.settled += ranks
        stats.pushed += pushed
    return found


def _dominated(label: _Label, others: list[_Label], objective: Objective, hold: bool) -> bool:
    """Whether one of `others` (settled at the label's site) dominates `label`: the same as
    `any(other.dominates(label, objective, hold) for other in others)`, with the comparisons
    that `fastest` makes written out, because it makes them most."""
    if objective is not Objective.FASTEST:
        return any(other.dominates(label, objective, hold) for other in others)
    t, legs, flown = label.t, label.legs, label.flown
    if not hold:
        for other in others:
            if other.t <= t and other.legs <= legs and (other.flown or not flown):
                return True
        return False
    if label.floating:
        slack, seg = label.clock - t, label.seg
        for other in others:
            if (
                other.t <= t
                and other.legs <= legs
                and (other.flown or not flown)
                and other.floating
                and other.clock - other.t >= slack
                and other.seg >= seg
            ):
                return True
        return False
    hold_end = label.clock + label.seg
    for other in others:
        if (
            other.t <= t
            and other.legs <= legs
            and (other.flown or not flown)
            and other.clock + other.seg >= hold_end
        ):
            return True
    return False


def _covers(settled: list[_Label], ready: int, legs: int, hold_end: int, seen: int = NEVER) -> bool:
    """For fastest: whether a settled label dominates whatever a flight from a label with a
    fixed clock can bring to its site (ready at `ready` or later, with `legs` legs, flown, the
    hold running out at `hold_end`). Its recharged twin, if any, then dominates theirs. Only
    the labels among the first `seen` settled count."""
    for other in settled:
        if other.rank >= seen:
            break
        if (
            other.t <= ready
            and other.legs <= legs
            and other.flown
            and other.clock + other.seg >= hold_end
        ):
            return True
    return False


def _receiving_windows(index: RouteIndex, q: Query) -> tuple[list[int], list[int]]:
    """The destination's receiving hours over the query's span as ascending opens and closes
    (none when it always receives): arriving at `t` means delivery at `max(t, opens[j])` for
    the first window `j` that closes after `t`, or at `t` past the last one."""
    hours = index.hours[q.destination]
    if hours is None:
        return [], []
    return hours.opening_times(q.depart, q.latest, index.tz[q.destination])


def _delivery_bound(opens: list[int], closes: list[int]) -> Callable[[int], int]:
    """Arriving at the destination at `t` means delivery no earlier than this (see
    `_receiving_windows`); monotone, so applied to a bound on arrival it bounds delivery."""
    if not opens:
        return lambda t: t
    windows = len(opens)

    def opened(t: int) -> int:
        j = bisect_right(closes, t)
        return t if j == windows or opens[j] <= t else opens[j]

    return opened


def customs_seconds(index: RouteIndex, a: int, b: int) -> int:
    """Customs dwell on arriving at `b` from `a`: only when the leg crosses a border."""
    return index.customs[b] if index.country[a] != index.country[b] else 0


def _key_function(objective: Objective) -> Callable[[int, int, float, float, int], Priority]:
    """The lexicographic objective key, smaller is better, from (arrival, legs, risk, cost,
    margin); applied to bounds it is a bound of the key. Each objective ranks on few criteria
    so that labels need to be compared on few (see `_Label.dominates`)."""
    if objective is Objective.FASTEST:
        return lambda t, legs, risk, cost, margin: (t, legs)
    if objective is Objective.SAFEST:
        return lambda t, legs, risk, cost, margin: (-margin, risk, t)
    return lambda t, legs, risk, cost, margin: (cost, t, legs)


def plan_key(objective: Objective, plan: Plan) -> Priority:
    """The objective key of a finished plan (used to order alternatives and in tests)."""
    return _key_function(objective)(
        int(plan.delivered_at.timestamp()),
        len(plan.legs),
        plan.risk,
        plan.cost,
        int(plan.hold_margin.total_seconds()),
    )


def _instant(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _plan(index: RouteIndex, q: Query, last: _Label) -> Plan:
    chain: list[_Label] = []
    node: _Label | None = last
    while node is not None:
        chain.append(node)
        node = node.parent
    chain.reverse()
    network = index.network
    legs: list[Leg] = []
    for prev, label in zip(chain, chain[1:], strict=False):
        kind, number, departs, arrives = cast(tuple[int, int, int, int], label.step)
        if kind == _KIND_RECHARGE:
            if legs:  # a recharge at the origin has no leg to mark
                legs[-1] = replace(legs[-1], recharged=True)
            continue
        a, b = index.sites[prev.site], index.sites[label.site]
        carrier: str | None = None
        flight_number: str | None = None
        if kind == _KIND_LANE:
            lane = network.lanes[number]
            mode, cost, risk = LegMode(lane.mode.value), lane.cost, lane.risk
        else:
            flight = network.flights[number]
            mode, cost, risk = LegMode.FLIGHT, flight.cost, flight.risk
            carrier, flight_number = flight.carrier, flight.flight
        legs.append(
            Leg(
                mode=mode,
                origin=a.id,
                destination=b.id,
                departs_at=_instant(departs),
                arrives_at=_instant(arrives),
                ready_at=_instant(label.t),
                origin_tz=a.tz,
                destination_tz=b.tz,
                cost=cost,
                risk=risk,
                carrier=carrier,
                flight=flight_number,
                customs=timedelta(seconds=customs_seconds(index, prev.site, label.site)),
            )
        )
    return Plan(
        legs=tuple(legs),
        depart_at=_instant(q.depart),
        delivered_at=_instant(last.t),
        hold_margin=timedelta(seconds=last.margin()),
        cost=last.cost,
        risk=combined_risk(last.risk),
    )
