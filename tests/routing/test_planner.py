"""Planner behaviour a user notices: hold, recharge, customs, receiving hours, DST, date line,
alternatives, re-planning, and the two output formats."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta

import pytest

from routing import (
    Constraint,
    Flight,
    FlightKey,
    Lane,
    LaneMode,
    Network,
    Objective,
    PlanRequest,
    PlanRequestError,
    ReceivingHours,
    RouteIndex,
    Site,
    SiteKind,
    example_network,
    plan,
    plan_request_from_dict,
    plan_result_to_dict,
    plan_result_to_text,
    replan,
)
from tests.routing.oracle import random_network

T0 = datetime(2026, 10, 24, 12, 0, tzinfo=UTC)  # EU clocks go back on 25 Oct 2026


def _site(sid: str, kind: SiteKind, tz: str, country: str, **kw: object) -> Site:
    return Site(sid, sid, kind, 50.0, 5.0, tz, country, **kw)  # type: ignore[arg-type]


def _line(
    hours: ReceivingHours | None = None, recharge: bool = False, customs: int = 120
) -> Network:
    """M -> A1 (US) --flight 20 h--> A2 (NL) -> T, optionally a depot beside A2."""
    sites = [
        _site("M", SiteKind.MANUFACTURING, "America/New_York", "US"),
        _site("A1", SiteKind.AIRPORT, "America/New_York", "US", iata="AAA", connect_minutes=120),
        _site(
            "A2",
            SiteKind.AIRPORT,
            "Europe/Amsterdam",
            "NL",
            iata="BBB",
            recovery_minutes=60,
            customs_minutes=customs,
        ),
        _site("T", SiteKind.TREATMENT_CENTER, "Europe/Amsterdam", "NL", hours=hours),
        _site("R", SiteKind.DEPOT, "Europe/Amsterdam", "NL", ln2_recharge=recharge),
    ]
    lanes = [
        Lane("M", "A1", LaneMode.COURIER, 60, 100.0, 0.001),
        Lane("A2", "T", LaneMode.COURIER, 60, 100.0, 0.001),
        Lane("A2", "R", LaneMode.COURIER, 30, 50.0, 0.001),
        Lane("R", "T", LaneMode.COURIER, 60, 100.0, 0.001),
    ]
    dep = T0 + timedelta(hours=4)
    flights = [Flight("XX", "1", "A1", "A2", dep, dep + timedelta(hours=20), 800.0, 0.003)]
    return Network.build(sites, lanes, flights)


def test_recharge_depot_makes_an_infeasible_plan_feasible() -> None:
    # 1 h courier + 3 h wait + 20 h flight + 1 h recovery + 2 h customs + 1 h courier = 28 h.
    request = PlanRequest("M", "T", T0, hold_hours=26.0)
    without = plan(RouteIndex(_line(recharge=False)), request)
    assert without.best is None and without.infeasible is not None
    assert without.infeasible.constraint is Constraint.HOLD
    assert without.infeasible.needed_hold == timedelta(hours=2)
    assert "needs 2.0 h more hold time, or a recharge stop" in without.infeasible.message
    # The depot is 30 min from A2 and 27.5 h after pack-out: too late for 26 h ...
    assert plan(RouteIndex(_line(recharge=True)), request).best is None
    # ... but with 28 h usable hold it resets the clock and the route has margin left.
    request = replace(request, hold_hours=28.0, recharge_minutes=60)
    direct = plan(RouteIndex(_line(recharge=False)), replace(request, objective=Objective.SAFEST))
    recharged = plan(RouteIndex(_line(recharge=True)), replace(request, objective=Objective.SAFEST))
    assert direct.best is not None and recharged.best is not None
    assert direct.best.hold_margin == timedelta(0)
    assert recharged.best.recharges == 1
    assert recharged.best.hold_margin > direct.best.hold_margin


def test_customs_dwell_delays_and_removing_it_never_does() -> None:
    request = PlanRequest("M", "T", T0, 72.0)
    with_customs = plan(RouteIndex(_line(customs=120)), request).best
    without = plan(RouteIndex(_line(customs=0)), request).best
    assert with_customs is not None and without is not None
    assert with_customs.delivered_at - without.delivered_at == timedelta(hours=2)
    assert with_customs.legs[1].customs == timedelta(hours=2)


def test_receiving_hours_across_the_daylight_saving_change() -> None:
    # Lands 25 Oct 12:00 UTC, ready 15:00 UTC at A2 and at T 16:00 UTC = 17:00 CET (UTC+1).
    # A centre that opens 18:00 local receives at 17:00 UTC on that day (CET), not 16:00 (CEST).
    network = _line(hours=ReceivingHours(time(18), time(20)))
    best = plan(RouteIndex(network), PlanRequest("M", "T", T0, 72.0)).best
    assert best is not None
    assert best.delivered_at == datetime(2026, 10, 25, 17, 0, tzinfo=UTC)
    assert best.legs[-1].ready_local.strftime("%H:%M %Z") == "18:00 CET"
    # Overnight hours 22:00-06:00: closed at 17:00 CET, receives at 22:00 CET.
    night = plan(
        RouteIndex(_line(hours=ReceivingHours(time(22), time(6)))), PlanRequest("M", "T", T0, 72.0)
    ).best
    assert night is not None
    assert night.delivered_at == datetime(2026, 10, 25, 21, 0, tzinfo=UTC)


def test_date_line_flight_keeps_utc_arithmetic_and_local_dates() -> None:
    sites = [
        _site("LAX", SiteKind.AIRPORT, "America/Los_Angeles", "US", iata="LAX"),
        _site("AKL", SiteKind.AIRPORT, "Pacific/Auckland", "NZ", iata="AKL"),
        _site("T", SiteKind.TREATMENT_CENTER, "Pacific/Auckland", "NZ"),
    ]
    dep = datetime(2026, 7, 1, 6, 0, tzinfo=UTC)  # 30 Jun 23:00 PDT
    flights = [Flight("NZ", "5", "LAX", "AKL", dep, dep + timedelta(hours=13), 900.0, 0.002)]
    network = Network.build(sites, [Lane("AKL", "T", LaneMode.COURIER, 30, 80.0, 0.0)], flights)
    best = plan(RouteIndex(network), PlanRequest("LAX", "T", dep - timedelta(hours=3), 24.0)).best
    assert best is not None
    flight = best.legs[0]
    assert flight.departs_local.strftime("%d %b %H:%M") == "30 Jun 23:00"
    assert flight.arrives_local.strftime("%d %b %H:%M") == "02 Jul 07:00"  # a day skipped
    assert best.duration == timedelta(hours=16, minutes=30)
    assert best.hold_margin == timedelta(hours=7, minutes=30)


@pytest.mark.parametrize("seed", range(40))
def test_more_hold_never_makes_the_best_plan_worse(seed: int) -> None:
    rng = random.Random(1000 + seed)
    network = random_network(rng, T0)
    index = RouteIndex(network)
    for objective in Objective:
        results = [
            plan(index, PlanRequest("O", "D", T0, hold, objective=objective)).best
            for hold in (6.0, 12.0, 24.0, 48.0)
        ]
        for shorter, longer in zip(results, results[1:], strict=False):
            if shorter is None:
                continue
            assert longer is not None
            if objective is Objective.FASTEST:
                assert longer.delivered_at <= shorter.delivered_at
            elif objective is Objective.CHEAPEST:
                assert longer.cost <= shorter.cost
            else:
                assert longer.hold_margin >= shorter.hold_margin


def test_alternatives_share_no_flight_and_come_in_objective_order() -> None:
    index = RouteIndex(example_network())
    depart = datetime(2026, 10, 20, 13, 0, tzinfo=UTC)
    result = plan(index, PlanRequest("MFG-MPN", "TC-NKI", depart, 72.0, alternatives=5))
    assert len(result.plans) == 5
    services = [{(x.carrier, x.flight) for x in p.legs if x.flight} for p in result.plans]
    for i, a in enumerate(services):
        for b in services[i + 1 :]:
            assert not a & b
    arrivals = [p.delivered_at for p in result.plans]
    assert arrivals == sorted(arrivals)


def test_an_alternative_is_not_the_same_service_on_another_day() -> None:
    network = _line()
    flight = network.flights[0]
    day = timedelta(days=1)
    later = [
        replace(flight, departs_at=flight.departs_at + day, arrives_at=flight.arrives_at + day),
        replace(
            flight,
            carrier="YY",
            flight="7",
            departs_at=flight.departs_at + 2 * day,
            arrives_at=flight.arrives_at + 2 * day,
        ),
    ]
    network = Network.build(network.sites.values(), network.lanes, [flight, *later])
    result = plan(RouteIndex(network), PlanRequest("M", "T", T0, 96.0, alternatives=3))
    # XX1 tomorrow would arrive sooner than YY7, but a cancelled service is cancelled daily.
    assert [p.flights for p in result.plans] == [("XX1",), ("YY7",)]


def test_replan_after_a_cancelled_flight_and_a_tipped_dewar() -> None:
    index = RouteIndex(example_network())
    depart = datetime(2026, 10, 20, 13, 0, tzinfo=UTC)
    request = PlanRequest("MFG-MPN", "TC-NKI", depart, 72.0)
    first = plan(index, request).best
    assert first is not None
    courier, flight = first.legs[0], first.legs[1]
    assert flight.carrier is not None and flight.flight is not None
    cancelled = FlightKey(flight.carrier, flight.flight, flight.departs_at)
    again = replan(
        index,
        request,
        at_site=courier.destination,
        at_time=courier.ready_at,
        hold_left_hours=70.0,
        cancelled=[cancelled],
    )
    assert again.best is not None
    assert cancelled not in {
        FlightKey(x.carrier, x.flight, x.departs_at)
        for x in again.best.legs
        if x.carrier and x.flight
    }
    assert again.best.delivered_at >= first.delivered_at
    assert again.best.legs[0].origin == courier.destination
    # The dewar tipped over and kept 3 h of hold: only an LN2 recharge in New York saves it,
    # after which the full 72 h hold applies again.
    tipped = replan(
        index, request, at_site=courier.destination, at_time=courier.ready_at, hold_left_hours=3.0
    )
    assert tipped.best is not None
    assert tipped.best.legs[0].destination == "DEP-NYC" and tipped.best.legs[0].recharged
    # With 15 min left it cannot even reach the depot.
    lost = replan(
        index, request, at_site=courier.destination, at_time=courier.ready_at, hold_left_hours=0.25
    )
    assert lost.best is None and lost.infeasible is not None
    assert lost.infeasible.constraint is Constraint.HOLD


def test_json_and_text_outputs() -> None:
    index = RouteIndex(example_network())
    body = {
        "origin": "MFG-ELS",
        "destination": "TC-NCCH",
        "depart_at": "2026-10-20T06:00:00-07:00",
        "hold_hours": 96,
        "objective": "fastest",
        "alternatives": 2,
    }
    result = plan(index, plan_request_from_dict(body))
    data = plan_result_to_dict(result)
    json.dumps(data)  # JSON-able
    route = data["routes"][0]
    assert route["legs"][1]["flight"] == result.plans[0].legs[1].flight
    assert route["arrival"].endswith("Z")
    assert route["legs"][-1]["arrives_local"].endswith("+09:00")
    text = plan_result_to_text(result)
    assert "MFG-ELS" in text and "JST" in text and "#2" in text
    with pytest.raises(PlanRequestError, match="objective"):
        plan_request_from_dict({**body, "objective": "quickest"})
    with pytest.raises(PlanRequestError, match="unknown field"):
        plan_request_from_dict({**body, "deliverby": "2026-10-25T00:00:00Z"})
    with pytest.raises(PlanRequestError, match="unknown site"):
        plan(index, plan_request_from_dict({**body, "origin": "NOPE"}))
