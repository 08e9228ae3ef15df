"""Plan requests in, ranked plans out: the best route, k real alternatives, and re-planning.

The planner turns a `PlanRequest` into a search `Query` and runs the exact search of
`routing.search` once per plan wanted. Alternatives are really different, not the same flights
with a different wait or on another day: each alternative is the best route, by the same
objective, that uses none of the flight services (carrier and flight number, any date) of the
plans before it, so it survives the cancellation of any of their flights; at most one plan is
ground-only. Because each search is over a subset of the previous one's routes, the plans come
out in objective order, and there may be fewer than asked for when the services run out. When
nothing is feasible, `routing.diagnosis` explains which constraint fails and what would be
needed.

Re-planning is planning from where the shipment is now: its current site and time, the hold it
has left (after a tipped dewar, say), and without the flights that were cancelled; a recharge on
the way restores the full usable hold of the original request.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timedelta

from routing.diagnosis import diagnose
from routing.itinerary import PlanResult
from routing.network import FlightKey
from routing.request import Objective, PlanRequest, PlanRequestError
from routing.search import MAX_LEGS, PairOrders, Query, search
from routing.timetable import RouteIndex

log = logging.getLogger(__name__)


def query_for(index: RouteIndex, request: PlanRequest) -> Query:
    """The search query for `request`; raises PlanRequestError for an unknown site."""
    for name in ("origin", "destination"):
        site_id = getattr(request, name)
        if site_id not in index.number:
            raise PlanRequestError(f"{name}: unknown site {site_id!r}")
    depart = _seconds(request.depart_at)
    latest = depart + int(request.horizon_hours * 3600)
    if request.deliver_by is not None:
        latest = min(latest, _seconds(request.deliver_by))
    recharge_hold = request.recharge_hold_hours
    return Query(
        origin=index.number[request.origin],
        destination=index.number[request.destination],
        depart=depart,
        hold=round(request.hold_hours * 3600),
        recharge_hold=round(
            (request.hold_hours if recharge_hold is None else recharge_hold) * 3600
        ),
        recharge_seconds=request.recharge_minutes * 60,
        latest=latest,
        max_legs=MAX_LEGS if request.max_handoffs is None else request.max_handoffs + 1,
        objective=request.objective,
        excluded=frozenset(
            index.flight_number[key]
            for key in request.exclude_flights
            if key in index.flight_number
        ),
    )


def plan(index: RouteIndex, request: PlanRequest) -> PlanResult:
    """Answer `request` on the network version `index` was built from.

    Returns up to `request.alternatives` plans, best first; with none, `infeasible` says why.
    Raises PlanRequestError when the request names a site the network does not have.
    """
    query = query_for(index, request)
    plans = []
    excluded = set(query.excluded)
    need_flight = hold_binds = False
    orders = PairOrders(query.destination)  # the same for every alternative
    for _ in range(request.alternatives):
        found = search(
            index,
            replace(
                query,
                excluded=frozenset(excluded),
                need_flight=need_flight,
                hold_binds=hold_binds,
            ),
            orders=orders,
        )
        if found is None:
            break
        plans.append(found)
        for leg in found.legs:
            if leg.carrier is not None and leg.flight is not None:
                excluded.update(index.service[leg.carrier, leg.flight])
        need_flight = need_flight or not found.flights
        # The fastest plan takes longer than the hold only when the fastest route with the hold
        # ignored does (that one is never later, and is the answer when it keeps within the
        # hold). Each later search is over a subset of these routes, so its fastest route with
        # the hold ignored is no earlier: it breaks the hold too, and is not worth searching for.
        hold_binds = hold_binds or (
            query.objective is Objective.FASTEST and found.duration > timedelta(seconds=query.hold)
        )
    log.debug("planned %s -> %s: %d plan(s)", request.origin, request.destination, len(plans))
    if plans:
        return PlanResult(request=request, plans=tuple(plans))
    return PlanResult(request=request, plans=(), infeasible=diagnose(index, query, request))


def replan(
    index: RouteIndex,
    request: PlanRequest,
    *,
    at_site: str,
    at_time: datetime,
    hold_left_hours: float,
    cancelled: Iterable[FlightKey] = (),
    handoffs_made: int = 0,
) -> PlanResult:
    """Plan again for a shipment under way: from `at_site` at `at_time`, with `hold_left_hours`.

    `request` is the shipment's original request: its destination, deadline, objective and
    alternatives stay; `cancelled` flights are left out from now on; `handoffs_made` counts
    against `max_handoffs`. A recharge restores the original usable hold (`hold_hours`, or
    `recharge_hold_hours` when the request set it). For a customs hold, pass the expected
    release time as `at_time`.
    """
    full_hold = (
        request.hold_hours if request.recharge_hold_hours is None else request.recharge_hold_hours
    )
    max_handoffs = request.max_handoffs
    if max_handoffs is not None:
        max_handoffs = max(0, max_handoffs - handoffs_made)
    return plan(
        index,
        replace(
            request,
            origin=at_site,
            depart_at=at_time,
            hold_hours=hold_left_hours,
            recharge_hold_hours=full_hold,
            max_handoffs=max_handoffs,
            exclude_flights=request.exclude_flights | frozenset(cancelled),
        ),
    )


def _seconds(instant: datetime) -> int:
    return int(instant.timestamp())
