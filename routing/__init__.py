"""Hold-time-aware route planning for cryogenic shipments: a pure, synchronous library.

A network model in (`Network`, from CSV with `load_network` or built in Python), a search index
built once per network version (`RouteIndex`), plans out (`plan`, `replan`). No I/O beyond
reading the network files, no event loop: callers in async code run `plan` in a thread.
"""

from routing.airports import COORDINATE_OVERRIDES, airport_codes, airport_site
from routing.example import BUNDLED_START, example_network, generate, write_network
from routing.formats import (
    plan_request_from_dict,
    plan_result_to_dict,
    plan_result_to_text,
)
from routing.hours import ReceivingHours
from routing.itinerary import Constraint, Infeasibility, Leg, LegMode, Plan, PlanResult
from routing.loader import (
    NetworkFileError,
    RowProblem,
    load_network,
    parse_flights,
    parse_lanes,
    parse_sites,
)
from routing.network import (
    Flight,
    FlightKey,
    Lane,
    LaneMode,
    Network,
    NetworkError,
    Site,
    SiteKind,
)
from routing.planner import plan, replan
from routing.request import Objective, PlanRequest, PlanRequestError
from routing.timetable import RouteIndex

__all__ = [
    "BUNDLED_START",
    "COORDINATE_OVERRIDES",
    "Constraint",
    "Flight",
    "FlightKey",
    "Infeasibility",
    "Lane",
    "LaneMode",
    "Leg",
    "LegMode",
    "Network",
    "NetworkError",
    "NetworkFileError",
    "Objective",
    "Plan",
    "PlanRequest",
    "PlanRequestError",
    "PlanResult",
    "ReceivingHours",
    "RouteIndex",
    "RowProblem",
    "Site",
    "SiteKind",
    "airport_codes",
    "airport_site",
    "example_network",
    "generate",
    "load_network",
    "parse_flights",
    "parse_lanes",
    "parse_sites",
    "plan",
    "plan_request_from_dict",
    "plan_result_to_dict",
    "plan_result_to_text",
    "replan",
    "write_network",
]
