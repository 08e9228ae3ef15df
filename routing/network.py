"""The route network: sites, ground lanes and dated flights, as frozen values.

A `Network` is an immutable snapshot (one "network version"). It checks its own references once,
when it is built, so the search index and the planner never meet a lane to an unknown site or a
flight that lands before it departs. Flights name their airports by site id; the CSV loader
translates the contract's IATA codes into ids at the edge.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from types import MappingProxyType
from typing import TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from routing.hours import ReceivingHours

_T = TypeVar("_T")

EARTH_RADIUS_KM = 6371.0088


class SiteKind(StrEnum):
    MANUFACTURING = "manufacturing"
    TREATMENT_CENTER = "treatment_center"
    AIRPORT = "airport"
    DEPOT = "depot"


class LaneMode(StrEnum):
    ROAD = "road"
    COURIER = "courier"


class NetworkError(ValueError):
    """A network that cannot be planned on: an unknown reference, an impossible value."""


@dataclass(frozen=True, slots=True)
class Site:
    """A place a shipment can be: where it starts, changes hands, is recharged or delivered.

    `customs_minutes` is the dwell on arrival when the shipment crosses a border (the previous
    site is in another country). At airports `connect_minutes` is the tender cutoff (the
    shipment must be handed over that long before departure) and `recovery_minutes` the time
    from landing until it can be collected. `hours` are local receiving hours; None is always.
    """

    id: str
    name: str
    kind: SiteKind
    lat: float
    lon: float
    tz: str
    country: str
    iata: str | None = None
    ln2_recharge: bool = False
    customs_minutes: int = 0
    connect_minutes: int = 0
    recovery_minutes: int = 0
    hours: ReceivingHours | None = None

    def __post_init__(self) -> None:
        if not self.id:
            raise NetworkError("a site needs an id")
        if not (-90.0 <= self.lat <= 90.0 and -180.0 <= self.lon <= 180.0):
            raise NetworkError(f"site {self.id}: coordinates {self.lat}, {self.lon} out of range")
        try:
            ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise NetworkError(f"site {self.id}: unknown time zone {self.tz!r}") from exc
        for name in ("customs_minutes", "connect_minutes", "recovery_minutes"):
            if getattr(self, name) < 0:
                raise NetworkError(f"site {self.id}: {name} must not be negative")
        if self.kind is SiteKind.AIRPORT and not self.iata:
            raise NetworkError(f"site {self.id}: an airport needs an IATA code")

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)

    def local(self, instant: datetime) -> datetime:
        """`instant` as wall-clock time at this site."""
        return instant.astimezone(self.zone)

    def distance_km(self, other: Site) -> float:
        """Great-circle distance (haversine)."""
        return great_circle_km(self.lat, self.lon, other.lat, other.lon)


def great_circle_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def _check_risk(risk: float, what: str) -> None:
    if not 0.0 <= risk < 1.0:
        raise NetworkError(f"{what}: risk {risk} is not a probability in [0, 1)")


@dataclass(frozen=True, slots=True)
class Lane:
    """A ground leg on demand: a courier leaves as soon as the shipment is ready."""

    origin: str
    destination: str
    mode: LaneMode
    minutes: int
    cost: float
    risk: float

    def __post_init__(self) -> None:
        what = f"lane {self.origin}->{self.destination}"
        if self.origin == self.destination:
            raise NetworkError(f"{what}: origin and destination are the same")
        if self.minutes < 0 or self.cost < 0:
            raise NetworkError(f"{what}: minutes and cost must not be negative")
        _check_risk(self.risk, what)

    @property
    def key(self) -> tuple[str, str, LaneMode]:
        return (self.origin, self.destination, self.mode)


@dataclass(frozen=True, slots=True)
class Flight:
    """One dated departure. `origin` and `destination` are airport site ids."""

    carrier: str
    flight: str
    origin: str
    destination: str
    departs_at: datetime
    arrives_at: datetime
    cost: float
    risk: float

    def __post_init__(self) -> None:
        what = f"flight {self.carrier}{self.flight}"
        if self.departs_at.tzinfo is None or self.arrives_at.tzinfo is None:
            raise NetworkError(f"{what}: departure and arrival need a UTC offset")
        if self.arrives_at <= self.departs_at:
            raise NetworkError(f"{what}: arrives at or before it departs")
        if self.arrives_at - self.departs_at > timedelta(hours=24):
            raise NetworkError(f"{what}: longer than 24 h in the air")
        if self.origin == self.destination:
            raise NetworkError(f"{what}: origin and destination are the same")
        if self.cost < 0:
            raise NetworkError(f"{what}: cost must not be negative")
        _check_risk(self.risk, what)

    @property
    def key(self) -> FlightKey:
        return FlightKey(self.carrier, self.flight, self.departs_at)


@dataclass(frozen=True, slots=True)
class FlightKey:
    """Identifies a dated flight, as the contract does: carrier, flight number, departure."""

    carrier: str
    flight: str
    departs_at: datetime

    def __str__(self) -> str:
        return f"{self.carrier}{self.flight} {self.departs_at:%Y-%m-%dT%H:%MZ}"


@dataclass(frozen=True)
class Network:
    """One version of the route network. Build it with `Network.build`, which checks references."""

    sites: Mapping[str, Site]
    lanes: tuple[Lane, ...]
    flights: tuple[Flight, ...]
    by_iata: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(
        cls, sites: Iterable[Site], lanes: Iterable[Lane] = (), flights: Iterable[Flight] = ()
    ) -> Network:
        by_id: dict[str, Site] = {}
        for site in sites:
            if site.id in by_id:
                raise NetworkError(f"site {site.id} is defined twice")
            by_id[site.id] = site
        by_iata = {s.iata: s.id for s in by_id.values() if s.kind is SiteKind.AIRPORT and s.iata}
        lane_list = _unique(lanes, lambda lane: lane.key, "lane")
        for lane in lane_list:
            for end in (lane.origin, lane.destination):
                if end not in by_id:
                    raise NetworkError(f"lane {lane.origin}->{lane.destination}: no site {end}")
        flight_list = _unique(flights, lambda f: f.key, "flight")
        for flight in flight_list:
            for end in (flight.origin, flight.destination):
                airport = by_id.get(end)
                if airport is None or airport.kind is not SiteKind.AIRPORT:
                    raise NetworkError(f"flight {flight.key}: {end} is not an airport site")
        return cls(
            sites=MappingProxyType(by_id),
            lanes=tuple(lane_list),
            flights=tuple(sorted(flight_list, key=lambda f: (f.departs_at, f.carrier, f.flight))),
            by_iata=MappingProxyType(by_iata),
        )

    def site(self, site_id: str) -> Site:
        try:
            return self.sites[site_id]
        except KeyError:
            raise NetworkError(f"unknown site {site_id!r}") from None

    def airport(self, iata: str) -> Site:
        """The airport site with this IATA code."""
        site_id = self.by_iata.get(iata.upper())
        if site_id is None:
            raise NetworkError(f"no airport with IATA code {iata!r}")
        return self.sites[site_id]


def _unique(items: Iterable[_T], key: Callable[[_T], Hashable], what: str) -> list[_T]:
    seen: dict[Hashable, _T] = {}
    for item in items:
        k = key(item)
        if k in seen:
            raise NetworkError(f"{what} {k} is defined twice")
        seen[k] = item
    return list(seen.values())
