"""The planner's two faces: JSON-able dicts (HTTP API, `--json`) and a text table (CLI).

Requests are parsed from JSON-like dicts here, once, with errors that name the field, so the
HTTP endpoint and the CLI accept exactly the same thing. Instants are written as RFC 3339: UTC
with `Z`, local times with the site's offset. Durations are hours with one decimal in text and
exact floats in JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from routing.itinerary import Infeasibility, Leg, Plan, PlanResult
from routing.request import (
    DEFAULT_HORIZON_HOURS,
    DEFAULT_RECHARGE_MINUTES,
    Objective,
    PlanRequest,
    PlanRequestError,
)

_REQUEST_FIELDS = frozenset(
    {
        "origin",
        "destination",
        "depart_at",
        "deliver_by",
        "hold_hours",
        "objective",
        "alternatives",
        "max_handoffs",
        "recharge_minutes",
        "recharge_hold_hours",
    }
)


def _utc(instant: datetime) -> str:
    return instant.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _hours(span: timedelta) -> float:
    return span.total_seconds() / 3600


def _time(data: Mapping[str, Any], name: str, required: bool) -> datetime | None:
    value = data.get(name)
    if value is None:
        if required:
            raise PlanRequestError(f"{name} is required")
        return None
    if not isinstance(value, str):
        raise PlanRequestError(f"{name} must be an RFC 3339 string")
    try:
        instant = datetime.fromisoformat(value)
    except ValueError:
        raise PlanRequestError(f"{name}: {value!r} is not an RFC 3339 time") from None
    if instant.utcoffset() is None:
        raise PlanRequestError(f"{name}: {value!r} needs a UTC offset")
    return instant


def _int(data: Mapping[str, Any], name: str, default: int | None) -> int | None:
    value = data.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanRequestError(f"{name} must be a whole number")
    return value


def _float(data: Mapping[str, Any], name: str) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PlanRequestError(f"{name} must be a number")
    return float(value)


def _string(data: Mapping[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise PlanRequestError(f"{name} is required and must be a site id")
    return value


def plan_request_from_dict(data: Mapping[str, Any]) -> PlanRequest:
    """A `PlanRequest` from the JSON body of `POST /api/v1/routes/plan`.

    Raises PlanRequestError with the offending field; unknown fields are refused so a typo
    (`deliverby`) is not silently ignored.
    """
    unknown = sorted(set(data) - _REQUEST_FIELDS)
    if unknown:
        raise PlanRequestError(f"unknown field(s): {', '.join(unknown)}")
    objective = data.get("objective", Objective.FASTEST.value)
    if objective not in {o.value for o in Objective}:
        raise PlanRequestError(
            f"objective must be one of {', '.join(o.value for o in Objective)}, not {objective!r}"
        )
    hold = _float(data, "hold_hours")
    if hold is None:
        raise PlanRequestError("hold_hours is required")
    depart_at = _time(data, "depart_at", required=True)
    if depart_at is None:  # unreachable: required=True raises instead
        raise PlanRequestError("depart_at is required")
    return PlanRequest(
        origin=_string(data, "origin"),
        destination=_string(data, "destination"),
        depart_at=depart_at,
        deliver_by=_time(data, "deliver_by", required=False),
        hold_hours=hold,
        objective=Objective(objective),
        alternatives=_int(data, "alternatives", 1) or 1,
        max_handoffs=_int(data, "max_handoffs", None),
        recharge_minutes=_int(data, "recharge_minutes", DEFAULT_RECHARGE_MINUTES)
        or DEFAULT_RECHARGE_MINUTES,
        recharge_hold_hours=_float(data, "recharge_hold_hours"),
        horizon_hours=DEFAULT_HORIZON_HOURS,
    )


def request_to_dict(request: PlanRequest) -> dict[str, Any]:
    return {
        "origin": request.origin,
        "destination": request.destination,
        "depart_at": _utc(request.depart_at),
        "deliver_by": _utc(request.deliver_by) if request.deliver_by else None,
        "hold_hours": request.hold_hours,
        "objective": request.objective.value,
        "alternatives": request.alternatives,
        "max_handoffs": request.max_handoffs,
    }


def leg_to_dict(leg: Leg) -> dict[str, Any]:
    return {
        "mode": leg.mode.value,
        "from": leg.origin,
        "to": leg.destination,
        "carrier": leg.carrier,
        "flight": leg.flight,
        "departs_at": _utc(leg.departs_at),
        "departs_local": leg.departs_local.isoformat(),
        "arrives_at": _utc(leg.arrives_at),
        "arrives_local": leg.arrives_local.isoformat(),
        "ready_at": _utc(leg.ready_at),
        "ready_local": leg.ready_local.isoformat(),
        "customs_minutes": int(leg.customs.total_seconds() // 60),
        "recharged": leg.recharged,
        "cost": leg.cost,
        "risk": leg.risk,
    }


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    last = plan.legs[-1] if plan.legs else None
    return {
        "depart_at": _utc(plan.depart_at),
        "arrival": _utc(plan.delivered_at),
        "arrival_local": last.ready_local.isoformat() if last else None,
        "duration_hours": _hours(plan.duration),
        "hold_margin_hours": _hours(plan.hold_margin),
        "handoffs": plan.handoffs,
        "recharges": plan.recharges,
        "cost": round(plan.cost, 2),
        "risk": plan.risk,
        "legs": [leg_to_dict(leg) for leg in plan.legs],
    }


def infeasibility_to_dict(reason: Infeasibility) -> dict[str, Any]:
    return {
        "constraint": reason.constraint.value,
        "message": reason.message,
        "needed_hold_hours": _hours(reason.needed_hold) if reason.needed_hold else None,
        "earliest_delivery": _utc(reason.earliest_delivery) if reason.earliest_delivery else None,
        "needed_handoffs": reason.needed_handoffs,
    }


def plan_result_to_dict(result: PlanResult) -> dict[str, Any]:
    """The JSON body answering a plan request: `routes` best first, `infeasible` when none."""
    return {
        "request": request_to_dict(result.request),
        "feasible": bool(result.plans),
        "routes": [plan_to_dict(p) for p in result.plans],
        "infeasible": infeasibility_to_dict(result.infeasible) if result.infeasible else None,
    }


def _local(instant: datetime) -> str:
    return instant.strftime("%a %d %b %H:%M %Z")


def plan_result_to_text(result: PlanResult) -> str:
    """A human table: one block per plan, one row per leg, local times at each end."""
    r = result.request
    head = (
        f"{r.objective.value} route {r.origin} -> {r.destination}, pack-out {_utc(r.depart_at)}, "
        f"hold {r.hold_hours:g} h" + (f", deliver by {_utc(r.deliver_by)}" if r.deliver_by else "")
    )
    lines = [head]
    if result.infeasible is not None:
        reason = result.infeasible
        lines.append(f"no feasible route ({reason.constraint.value}): {reason.message}")
        return "\n".join(lines)
    for rank, p in enumerate(result.plans, 1):
        lines.append("")
        lines.append(
            f"#{rank}  delivered {_utc(p.delivered_at)} ({_local(p.legs[-1].ready_local)}), "
            f"{_hours(p.duration):.1f} h, margin {_hours(p.hold_margin):.1f} h, "
            f"{p.handoffs} handoffs, {p.recharges} recharges, cost {p.cost:,.2f}, "
            f"risk {p.risk:.3%}"
        )
        rows = [("mode", "from", "to", "departs (local)", "arrives (local)", "ready", "flight")]
        for leg in p.legs:
            rows.append(
                (
                    leg.mode.value,
                    leg.origin,
                    leg.destination,
                    _local(leg.departs_local),
                    _local(leg.arrives_local),
                    f"{leg.ready_local:%H:%M}" + (" LN2" if leg.recharged else ""),
                    f"{leg.carrier}{leg.flight}" if leg.flight else "",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            cells = (c.ljust(w) for c, w in zip(row, widths, strict=True))
            lines.append(("  " + "  ".join(cells)).rstrip())
    if len(result.plans) < r.alternatives:
        lines.append("")
        lines.append(
            f"only {len(result.plans)} of {r.alternatives} requested routes exist that share no "
            "flight with a better one"
        )
    return "\n".join(lines)
