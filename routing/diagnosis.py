"""Why a request has no feasible plan, and what would make it feasible.

The diagnosis relaxes one constraint at a time and searches again, in the order DOMAIN.md
ranks them: is there a route at all; can anything arrive by `deliver_by`; how much more hold
time the best route would need; how many handoffs the fastest feasible route needs. The first
relaxation that explains the failure is the answer; when each constraint can be met alone but
not all together, it says so. Only infeasible requests pay for these extra searches.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from routing.itinerary import Constraint, Infeasibility
from routing.request import Objective, PlanRequest
from routing.search import MAX_LEGS, Query, search
from routing.timetable import RouteIndex


def diagnose(index: RouteIndex, query: Query, request: PlanRequest) -> Infeasibility:
    """The reason `query` (built from `request`) has no feasible plan."""
    free = replace(
        query,
        enforce_hold=False,
        latest=query.depart + int(request.horizon_hours * 3600),
        max_legs=max(query.max_legs, MAX_LEGS),
        objective=Objective.FASTEST,
    )
    fastest = search(index, free)
    origin, destination = request.origin, request.destination
    if fastest is None:
        if not index.can_reach(query.origin, query.destination):
            message = f"no lanes or flights join {origin} to {destination}"
        else:
            last = datetime.fromtimestamp(index.last_departure, UTC)
            message = (
                f"no route from {origin} to {destination} leaves at or after "
                f"{_utc(request.depart_at)} within {request.horizon_hours:g} h "
                f"(the timetable's last flight departs {_utc(last)})"
            )
        return Infeasibility(Constraint.ROUTE, message)

    earliest = fastest.delivered_at
    if request.deliver_by is not None and earliest > request.deliver_by:
        late = earliest - request.deliver_by
        return Infeasibility(
            Constraint.DELIVER_BY,
            f"the earliest delivery is {_utc(earliest)}, {_hours(late)} h after deliver_by "
            f"{_utc(request.deliver_by)}; needs a later deliver_by or an earlier departure",
            earliest_delivery=earliest,
        )

    safest = search(index, replace(query, enforce_hold=False, objective=Objective.SAFEST))
    if safest is not None and safest.hold_margin < timedelta(0):
        short = -safest.hold_margin
        return Infeasibility(
            Constraint.HOLD,
            f"needs {_hours(short)} h more hold time, or a recharge stop: the best route keeps "
            f"the dewar {_hours(timedelta(hours=request.hold_hours) + short)} h between charges "
            f"and the usable hold is {request.hold_hours:g} h",
            needed_hold=short,
            earliest_delivery=earliest,
        )

    if request.max_handoffs is not None:
        for legs in range(query.max_legs + 1, MAX_LEGS + 1):
            if search(index, replace(query, max_legs=legs)) is not None:
                return Infeasibility(
                    Constraint.MAX_HANDOFFS,
                    f"needs at least {legs - 1} handoffs; max_handoffs is {request.max_handoffs}",
                    needed_handoffs=legs - 1,
                    earliest_delivery=earliest,
                )

    return Infeasibility(
        Constraint.COMBINATION,
        "no route meets the hold time, deliver_by and max_handoffs together, though each can "
        "be met alone; relax one of them",
        earliest_delivery=earliest,
    )


def _hours(span: timedelta) -> str:
    return f"{span.total_seconds() / 3600:.1f}"


def _utc(instant: datetime) -> str:
    return instant.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
