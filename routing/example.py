"""The bundled example network: real places, a synthetic but plausible week of flights.

Sites are real: cell-therapy manufacturing sites (Morris Plains NJ, El Segundo CA, Devens MA,
South San Francisco, San Diego, Hoofddorp NL, Ghent BE), US, European and Japanese cancer
centres, the airports that serve them and their carriers' hubs (seeded from airportsdata with
`routing.airports`), and LN2 recharge depots in the hub cities couriers publish (Philadelphia,
New York, Los Angeles, Miami, London, Frankfurt, Singapore, Tokyo). Flights are generated
deterministically from a route list with daily frequencies: departure slots are local times at
the origin (so they follow daylight saving), block times follow great-circle distance. The same
start date always gives the same files; `python -m routing --start 2026-06-01 --out DIR`
regenerates the week for any start date. `routing/data/` holds the week starting
`BUNDLED_START`.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from importlib.resources import files
from pathlib import Path
from typing import Final
from zoneinfo import ZoneInfo

from routing.airports import airport_site
from routing.hours import ReceivingHours
from routing.loader import load_network, write_flights, write_lanes, write_sites
from routing.network import Flight, Lane, LaneMode, Network, Site, SiteKind

BUNDLED_START: Final = date(2026, 10, 19)
CRUISE_KMH: Final = 830.0
TAXI_MINUTES: Final = 35

_US_CUSTOMS, _INTL_CUSTOMS = 240, 180

# id, name, kind, lat, lon, tz, country, recharge, hours, [(airport, minutes)]
_Place = tuple[str, str, SiteKind, float, float, str, str, bool, str, Sequence[tuple[str, int]]]
_NY, _LA, _CHI = "America/New_York", "America/Los_Angeles", "America/Chicago"
_M, _T, _D = SiteKind.MANUFACTURING, SiteKind.TREATMENT_CENTER, SiteKind.DEPOT
PLACES: Final[tuple[_Place, ...]] = (
    (
        "MFG-MPN",
        "Morris Plains NJ manufacturing",
        _M,
        40.8365,
        -74.4818,
        _NY,
        "US",
        False,
        "",
        (("EWR", 45), ("JFK", 95)),
    ),
    (
        "MFG-ELS",
        "El Segundo CA manufacturing",
        _M,
        33.9192,
        -118.4165,
        _LA,
        "US",
        False,
        "",
        (("LAX", 20),),
    ),
    (
        "MFG-DEV",
        "Devens MA manufacturing",
        _M,
        42.5445,
        -71.6134,
        _NY,
        "US",
        False,
        "",
        (("BOS", 65),),
    ),
    (
        "MFG-SSF",
        "South San Francisco manufacturing",
        _M,
        37.6547,
        -122.4077,
        _LA,
        "US",
        False,
        "",
        (("SFO", 15),),
    ),
    (
        "MFG-SAN",
        "San Diego manufacturing",
        _M,
        32.8998,
        -117.2010,
        _LA,
        "US",
        False,
        "",
        (("SAN", 25), ("LAX", 150)),
    ),
    (
        "MFG-HFD",
        "Hoofddorp NL manufacturing",
        _M,
        52.3030,
        4.6890,
        "Europe/Amsterdam",
        "NL",
        False,
        "",
        (("AMS", 20),),
    ),
    (
        "MFG-GNT",
        "Ghent BE manufacturing",
        _M,
        51.0543,
        3.7174,
        "Europe/Brussels",
        "BE",
        False,
        "",
        (("BRU", 60), ("AMS", 170)),
    ),
    (
        "TC-MSK",
        "Memorial Sloan Kettering, New York",
        _T,
        40.7644,
        -73.9558,
        _NY,
        "US",
        False,
        "07:00-19:00",
        (("JFK", 60), ("EWR", 55)),
    ),
    (
        "TC-MDA",
        "MD Anderson, Houston",
        _T,
        29.7074,
        -95.3972,
        _CHI,
        "US",
        False,
        "07:00-19:00",
        (("IAH", 50),),
    ),
    (
        "TC-DFCI",
        "Dana-Farber, Boston",
        _T,
        42.3377,
        -71.1082,
        _NY,
        "US",
        False,
        "07:00-18:00",
        (("BOS", 30),),
    ),
    (
        "TC-COH",
        "City of Hope, Duarte CA",
        _T,
        34.1300,
        -117.9700,
        _LA,
        "US",
        False,
        "08:00-18:00",
        (("LAX", 60),),
    ),
    (
        "TC-MAYO",
        "Mayo Clinic, Rochester MN",
        _T,
        44.0225,
        -92.4670,
        _CHI,
        "US",
        False,
        "07:00-17:00",
        (("MSP", 95),),
    ),
    (
        "TC-FHCC",
        "Fred Hutch, Seattle",
        _T,
        47.6275,
        -122.3301,
        _LA,
        "US",
        False,
        "07:00-19:00",
        (("SEA", 35),),
    ),
    (
        "TC-PENN",
        "Penn Medicine, Philadelphia",
        _T,
        39.9496,
        -75.1930,
        _NY,
        "US",
        False,
        "07:00-19:00",
        (("PHL", 25),),
    ),
    (
        "TC-MOF",
        "Moffitt Cancer Center, Tampa",
        _T,
        28.0637,
        -82.4210,
        _NY,
        "US",
        False,
        "08:00-17:00",
        (("TPA", 25),),
    ),
    (
        "TC-NKI",
        "Netherlands Cancer Institute, Amsterdam",
        _T,
        52.3475,
        4.8500,
        "Europe/Amsterdam",
        "NL",
        False,
        "08:00-17:00",
        (("AMS", 25),),
    ),
    (
        "TC-UZL",
        "UZ Leuven",
        _T,
        50.8798,
        4.6717,
        "Europe/Brussels",
        "BE",
        False,
        "08:00-17:00",
        (("BRU", 25),),
    ),
    (
        "TC-IGR",
        "Gustave Roussy, Villejuif",
        _T,
        48.7939,
        2.3545,
        "Europe/Paris",
        "FR",
        False,
        "08:00-18:00",
        (("CDG", 60),),
    ),
    (
        "TC-CHA",
        "Charite, Berlin",
        _T,
        52.5260,
        13.3766,
        "Europe/Berlin",
        "DE",
        False,
        "07:00-17:00",
        (("BER", 40),),
    ),
    (
        "TC-UKHD",
        "Heidelberg University Hospital",
        _T,
        49.4170,
        8.6660,
        "Europe/Berlin",
        "DE",
        False,
        "07:00-17:00",
        (("FRA", 60),),
    ),
    (
        "TC-HCB",
        "Hospital Clinic, Barcelona",
        _T,
        41.3895,
        2.1512,
        "Europe/Madrid",
        "ES",
        False,
        "08:00-18:00",
        (("BCN", 25),),
    ),
    (
        "TC-RMH",
        "Royal Marsden, London",
        _T,
        51.4898,
        -0.1710,
        "Europe/London",
        "GB",
        False,
        "08:00-18:00",
        (("LHR", 45),),
    ),
    (
        "TC-KS",
        "Karolinska, Stockholm",
        _T,
        59.3505,
        18.0353,
        "Europe/Stockholm",
        "SE",
        False,
        "07:00-16:00",
        (("ARN", 40),),
    ),
    (
        "TC-RH",
        "Rigshospitalet, Copenhagen",
        _T,
        55.6958,
        12.5665,
        "Europe/Copenhagen",
        "DK",
        False,
        "07:00-16:00",
        (("CPH", 25),),
    ),
    (
        "TC-USZ",
        "University Hospital Zurich",
        _T,
        47.3769,
        8.5510,
        "Europe/Zurich",
        "CH",
        False,
        "07:00-17:00",
        (("ZRH", 25),),
    ),
    (
        "TC-OSR",
        "Ospedale San Raffaele, Milan",
        _T,
        45.5058,
        9.2645,
        "Europe/Rome",
        "IT",
        False,
        "08:00-17:00",
        (("MXP", 50),),
    ),
    (
        "TC-NCCH",
        "National Cancer Center Hospital, Tokyo",
        _T,
        35.6655,
        139.7708,
        "Asia/Tokyo",
        "JP",
        False,
        "08:30-17:00",
        (("HND", 25),),
    ),
    (
        "DEP-PHL",
        "Philadelphia LN2 depot",
        _D,
        39.8850,
        -75.2300,
        _NY,
        "US",
        True,
        "",
        (("PHL", 20),),
    ),
    (
        "DEP-NYC",
        "New York LN2 depot (Jamaica)",
        _D,
        40.6700,
        -73.7900,
        _NY,
        "US",
        True,
        "",
        (("JFK", 20), ("EWR", 60)),
    ),
    (
        "DEP-LAX",
        "Los Angeles LN2 depot",
        _D,
        33.9550,
        -118.3900,
        _LA,
        "US",
        True,
        "",
        (("LAX", 15),),
    ),
    ("DEP-MIA", "Miami LN2 depot", _D, 25.8100, -80.3000, _NY, "US", True, "", (("MIA", 15),)),
    (
        "DEP-LON",
        "London LN2 depot (Heathrow)",
        _D,
        51.4800,
        -0.4400,
        "Europe/London",
        "GB",
        True,
        "",
        (("LHR", 20),),
    ),
    (
        "DEP-FRA",
        "Frankfurt LN2 depot",
        _D,
        50.0400,
        8.5600,
        "Europe/Berlin",
        "DE",
        True,
        "",
        (("FRA", 15),),
    ),
    (
        "DEP-SIN",
        "Singapore LN2 depot",
        _D,
        1.3600,
        103.9800,
        "Asia/Singapore",
        "SG",
        True,
        "",
        (("SIN", 20),),
    ),
    (
        "DEP-TYO",
        "Tokyo LN2 depot",
        _D,
        35.5600,
        139.7600,
        "Asia/Tokyo",
        "JP",
        True,
        "",
        (("HND", 20),),
    ),
)

#: Airports with a tender cutoff and recovery other than the 120/60 min default.
AIRPORT_TIMES: Final = {"JFK": (180, 90), "LHR": (150, 90), "EWR": (150, 75), "FRA": (150, 75)}

# carrier, hub airport, [(other airport, departures per day)], both directions
ROUTES: Final[tuple[tuple[str, str, Sequence[tuple[str, int]]], ...]] = (
    (
        "UA",
        "EWR",
        (
            ("LAX", 4),
            ("SFO", 4),
            ("SAN", 2),
            ("IAH", 4),
            ("MSP", 2),
            ("TPA", 3),
            ("BOS", 3),
            ("SEA", 2),
            ("AMS", 1),
            ("BRU", 1),
            ("FRA", 1),
            ("LHR", 2),
            ("CDG", 1),
            ("CPH", 1),
            ("ARN", 1),
            ("ZRH", 1),
        ),
    ),
    (
        "UA",
        "ORD",
        (
            ("EWR", 4),
            ("LAX", 3),
            ("SFO", 3),
            ("BOS", 3),
            ("SAN", 2),
            ("IAH", 3),
            ("MSP", 3),
            ("SEA", 2),
            ("PHL", 3),
            ("TPA", 2),
            ("FRA", 1),
            ("LHR", 1),
        ),
    ),
    ("UA", "SFO", (("IAH", 3), ("BOS", 2), ("SEA", 3), ("FRA", 1), ("ZRH", 1), ("HND", 1))),
    ("AA", "JFK", (("LAX", 4), ("SFO", 3), ("MIA", 3), ("LHR", 3), ("BCN", 1))),
    (
        "AA",
        "DFW",
        (
            ("LAX", 3),
            ("SFO", 2),
            ("SAN", 2),
            ("IAH", 3),
            ("BOS", 2),
            ("JFK", 3),
            ("PHL", 2),
            ("TPA", 2),
            ("MIA", 3),
            ("LHR", 1),
        ),
    ),
    ("AA", "PHL", (("BOS", 3), ("LAX", 2), ("MIA", 2), ("LHR", 1))),
    ("AA", "MIA", (("LAX", 2), ("BOS", 2), ("TPA", 2), ("LHR", 1))),
    (
        "DL",
        "ATL",
        (
            ("JFK", 4),
            ("LAX", 3),
            ("SFO", 3),
            ("BOS", 3),
            ("SAN", 2),
            ("IAH", 3),
            ("MSP", 3),
            ("SEA", 2),
            ("PHL", 3),
            ("TPA", 3),
            ("MIA", 3),
            ("CDG", 1),
            ("AMS", 1),
        ),
    ),
    ("DL", "MSP", (("LAX", 2), ("SEA", 2), ("BOS", 2), ("AMS", 1))),
    ("DL", "JFK", (("SAN", 1), ("BOS", 3), ("MXP", 1), ("BER", 1))),
    ("AS", "SEA", (("LAX", 4), ("SAN", 2))),
    (
        "KL",
        "AMS",
        (
            ("JFK", 2),
            ("SFO", 1),
            ("LAX", 1),
            ("IAH", 1),
            ("SEA", 1),
            ("LHR", 4),
            ("CDG", 4),
            ("FRA", 3),
            ("MUC", 3),
            ("BER", 3),
            ("BCN", 3),
            ("ZRH", 3),
            ("MXP", 3),
            ("CPH", 3),
            ("ARN", 3),
            ("BRU", 1),
            ("HND", 1),
            ("SIN", 1),
        ),
    ),
    (
        "LH",
        "FRA",
        (
            ("JFK", 1),
            ("LAX", 1),
            ("IAH", 1),
            ("BOS", 1),
            ("LHR", 3),
            ("CDG", 3),
            ("BER", 4),
            ("BCN", 3),
            ("ZRH", 3),
            ("MXP", 3),
            ("CPH", 3),
            ("ARN", 3),
            ("BRU", 3),
            ("MUC", 4),
            ("HND", 1),
        ),
    ),
    (
        "LH",
        "MUC",
        (
            ("JFK", 1),
            ("LAX", 1),
            ("BER", 4),
            ("BCN", 2),
            ("ZRH", 2),
            ("MXP", 2),
            ("CPH", 2),
            ("ARN", 2),
            ("BRU", 2),
        ),
    ),
    (
        "BA",
        "LHR",
        (
            ("BOS", 2),
            ("LAX", 2),
            ("SFO", 1),
            ("SEA", 1),
            ("IAH", 1),
            ("CDG", 3),
            ("MUC", 3),
            ("BER", 2),
            ("BCN", 3),
            ("ZRH", 3),
            ("MXP", 2),
            ("CPH", 3),
            ("ARN", 3),
            ("BRU", 2),
        ),
    ),
    (
        "AF",
        "CDG",
        (
            ("JFK", 2),
            ("LAX", 1),
            ("BCN", 3),
            ("ZRH", 2),
            ("MXP", 2),
            ("BER", 2),
            ("CPH", 2),
            ("ARN", 2),
            ("HND", 1),
        ),
    ),
    ("SN", "BRU", (("JFK", 1), ("BCN", 2), ("MXP", 1), ("BER", 2), ("ZRH", 1))),
    ("LX", "ZRH", (("JFK", 1), ("BOS", 1))),
    ("JL", "HND", (("LAX", 1), ("JFK", 1), ("LHR", 1), ("SIN", 2))),
    ("SQ", "SIN", (("FRA", 1), ("LHR", 2), ("SFO", 1), ("LAX", 1))),
)

#: Ground lanes between places that are not tied to one airport, both directions (minutes).
EXTRA_LANES: Final = (("EWR", "JFK", 75), ("MFG-GNT", "TC-UZL", 60), ("MFG-HFD", "TC-NKI", 30))


@dataclass(frozen=True, slots=True)
class ExampleFiles:
    sites: Path
    lanes: Path
    flights: Path


def bundled_files() -> ExampleFiles:
    """The CSV files shipped in `routing/data/`."""
    data = Path(str(files("routing") / "data"))
    return ExampleFiles(data / "sites.csv", data / "lanes.csv", data / "flights.csv")


def example_network(start: date | None = None, days: int = 7) -> Network:
    """The example network: the bundled files, or a freshly generated week from `start`."""
    if start is None:
        paths = bundled_files()
        return load_network(paths.sites, paths.lanes, paths.flights)
    return generate(start, days)


def _airports() -> dict[str, Site]:
    codes = {a for _, hub, others in ROUTES for a in (hub, *(o for o, _ in others))}
    codes |= {a for place in PLACES for a, _ in place[9]}
    out = {}
    for code in sorted(codes):
        connect, recovery = AIRPORT_TIMES.get(code, (120, 60))
        site = airport_site(code, connect_minutes=connect, recovery_minutes=recovery)
        customs = _US_CUSTOMS if site.country == "US" else _INTL_CUSTOMS
        out[code] = replace(site, customs_minutes=customs)
    return out


def _lane(origin: Site, destination: Site, minutes: int, rng: random.Random) -> Lane:
    mode = LaneMode.COURIER if minutes <= 120 else LaneMode.ROAD
    return Lane(
        origin=origin.id,
        destination=destination.id,
        mode=mode,
        minutes=minutes,
        cost=round(120 + 1.6 * minutes + rng.uniform(0, 40), 2),
        risk=round(0.0004 + 0.000004 * minutes + rng.uniform(0, 0.0003), 6),
    )


def generate(start: date, days: int = 7, seed: int = 5) -> Network:
    """The example network with `days` of flights from `start` (a local date at each origin)."""
    rng = random.Random(seed)  # noqa: S311 (synthetic timetable, not security)
    airports = _airports()
    places = {
        p[0]: Site(
            id=p[0],
            name=p[1],
            kind=p[2],
            lat=p[3],
            lon=p[4],
            tz=p[5],
            country=p[6],
            ln2_recharge=p[7],
            hours=_hours(p[8]),
        )
        for p in PLACES
    }
    sites = {**airports, **places}
    lanes = []
    for p in PLACES:
        for code, minutes in p[9]:
            site, airport = places[p[0]], airports[code]
            if site.kind is not SiteKind.TREATMENT_CENTER:
                lanes.append(_lane(site, airport, minutes, rng))
            if site.kind is not SiteKind.MANUFACTURING:
                lanes.append(_lane(airport, site, minutes, rng))
    for a, b, minutes in EXTRA_LANES:
        lanes.append(_lane(sites[a], sites[b], minutes, rng))
        if sites[b].kind is not SiteKind.TREATMENT_CENTER:
            lanes.append(_lane(sites[b], sites[a], minutes, rng))
    routes = []
    for carrier, hub, others in ROUTES:
        for other, per_day in others:
            routes.append((carrier, airports[hub], airports[other], per_day))
            routes.append((carrier, airports[other], airports[hub], per_day))
    flights = synthesize_flights(routes, start, days, rng)
    return Network.build(sites.values(), lanes, flights)


def _hours(text: str) -> ReceivingHours | None:
    if not text:
        return None
    opens, closes = text.split("-")
    return ReceivingHours(time.fromisoformat(opens), time.fromisoformat(closes))


def block_minutes(origin: Site, destination: Site) -> int:
    """Scheduled gate-to-gate time: cruise over the great circle plus taxi, in 5 min steps."""
    minutes = origin.distance_km(destination) / CRUISE_KMH * 60 + TAXI_MINUTES
    return int(5 * round(minutes / 5))


def synthesize_flights(
    routes: Iterable[tuple[str, Site, Site, int]],
    start: date,
    days: int,
    rng: random.Random,
    first_number: int = 100,
) -> list[Flight]:
    """Dated flights for `routes` (carrier, origin, destination, departures per day).

    Each route gets fixed daily slots in the origin's local time between 06:00 and 23:00, a
    flight number per slot, and a fare and failure risk that grow with distance. Deterministic
    for a given `rng` state.
    """
    flights = []
    number = first_number
    for carrier, a, b, per_day in routes:
        block = timedelta(minutes=block_minutes(a, b))
        km = a.distance_km(b)
        zone = ZoneInfo(a.tz)
        slots = sorted(rng.randrange(6 * 12, 23 * 12) * 5 for _ in range(per_day))
        for slot in slots:
            number += 1
            fare = 180 + 0.22 * km + rng.uniform(0, 150)
            risk = 0.0015 + km / 5_000_000 + rng.uniform(0, 0.002)
            for day in range(days):
                local = datetime.combine(start + timedelta(days=day), time(slot // 60, slot % 60))
                departs = local.replace(tzinfo=zone).astimezone(UTC)
                flights.append(
                    Flight(
                        carrier=carrier,
                        flight=str(number),
                        origin=a.id,
                        destination=b.id,
                        departs_at=departs,
                        arrives_at=departs + block,
                        cost=round(fare * rng.uniform(0.9, 1.1), 2),
                        risk=round(risk, 6),
                    )
                )
    return flights


def write_network(network: Network, directory: Path) -> ExampleFiles:
    """Write `network` as the contract's three CSV files into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = ExampleFiles(
        directory / "sites.csv", directory / "lanes.csv", directory / "flights.csv"
    )
    with paths.sites.open("w", encoding="utf-8", newline="") as f:
        write_sites(f, network.sites.values())
    with paths.lanes.open("w", encoding="utf-8", newline="") as f:
        write_lanes(f, network.lanes)
    with paths.flights.open("w", encoding="utf-8", newline="") as f:
        write_flights(f, network.flights, network.sites)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the example route network as CSV.")
    parser.add_argument("--start", type=date.fromisoformat, default=BUNDLED_START)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(str(files("routing") / "data")))
    args = parser.parse_args(argv)
    write_network(generate(args.start, args.days), args.out)


if __name__ == "__main__":
    main()
