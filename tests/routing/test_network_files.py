"""Network files, airports and the bundled example network."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from routing import (
    BUNDLED_START,
    COORDINATE_OVERRIDES,
    NetworkFileError,
    airport_site,
    example_network,
    generate,
    load_network,
    parse_flights,
    parse_lanes,
    parse_sites,
    write_network,
)
from routing.network import great_circle_km

SITES = (
    (
        "id,name,kind,lat,lon,tz,iata,country,ln2_recharge,"
        "customs_minutes,connect_minutes,recovery_minutes,opens,closes\n"
    )
    + """M,Mfg,manufacturing,40.8,-74.4,America/New_York,,US,false,0,0,0,,
EWR,Newark,airport,40.69,-74.17,America/New_York,EWR,US,false,240,120,60,,
"""
)


def test_bad_site_row_names_file_and_line() -> None:
    bad = SITES + "T,Centre,treatment_center,abc,4.8,Europe/Amsterdam,,NL,false,0,0,0,08:00,17:00\n"
    with pytest.raises(NetworkFileError) as caught:
        parse_sites(io.StringIO(bad), "sites.csv")
    assert str(caught.value).startswith("sites.csv line 4: lat: 'abc' is not a number")


def test_every_bad_row_is_listed_and_nothing_is_returned() -> None:
    text = "origin,destination,mode,minutes,cost,risk\nM,EWR,courier,45,100,0.001\n"
    text += "M,XXX,courier,45,100,0.001\nEWR,M,bike,45,100,0.001\n"
    sites = parse_sites(io.StringIO(SITES))
    with pytest.raises(NetworkFileError) as caught:
        parse_lanes(io.StringIO(text), sites, "lanes.csv")
    assert caught.value.lines() == [
        "lanes.csv line 3: destination: no site 'XXX'",
        "lanes.csv line 4: mode: 'bike' is not one of road|courier",
    ]


def test_flight_with_unknown_airport_or_no_offset_is_refused() -> None:
    sites = parse_sites(io.StringIO(SITES))
    head = "carrier,flight,origin,destination,departs_at,arrives_at,cost,risk\n"
    rows = "UA,1,EWR,AMS,2026-06-01T10:00:00-04:00,2026-06-01T23:00:00+02:00,500,0.002\n"
    rows += "UA,2,EWR,EWR,2026-06-01T10:00:00,2026-06-01T12:00:00-04:00,500,0.002\n"
    with pytest.raises(NetworkFileError) as caught:
        parse_flights(io.StringIO(head + rows), sites, "flights.csv")
    assert caught.value.lines() == [
        "flights.csv line 2: destination: no airport site with IATA code 'AMS'",
        "flights.csv line 3: departs_at: '2026-06-01T10:00:00' has no UTC offset",
    ]


def test_missing_column_is_reported_on_the_header() -> None:
    with pytest.raises(NetworkFileError, match=r"sites.csv line 1: missing column\(s\): tz"):
        parse_sites(io.StringIO(SITES.replace(",tz,", ",zone,")), "sites.csv")


def test_brussels_is_corrected_and_known_airports_are_where_they_are() -> None:
    bru = airport_site("BRU")
    assert (bru.lat, bru.lon) == COORDINATE_OVERRIDES["BRU"]
    known = {  # published aerodrome reference points
        "BRU": (50.9014, 4.4844),
        "AMS": (52.3086, 4.7639),
        "JFK": (40.6398, -73.7789),
        "LHR": (51.4700, -0.4543),
        "SFO": (37.6190, -122.3750),
        "HND": (35.5523, 139.7800),
    }
    for code, (lat, lon) in known.items():
        site = airport_site(code)
        assert great_circle_km(site.lat, site.lon, lat, lon) < 3.0, code


def test_bundled_example_is_the_generated_week(tmp_path: Path) -> None:
    bundled = example_network()
    regenerated = generate(BUNDLED_START)
    assert bundled.flights == regenerated.flights
    assert bundled.lanes == regenerated.lanes
    assert dict(bundled.sites) == dict(regenerated.sites)
    assert len(bundled.flights) > 4000
    paths = write_network(regenerated, tmp_path)
    assert load_network(paths.sites, paths.lanes, paths.flights).flights == bundled.flights
