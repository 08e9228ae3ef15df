"""Airport sites seeded from the `airportsdata` package, with corrections.

`airportsdata` (MIT) gives IATA codes, coordinates and IANA time zones for some 7,900 airports.
A few of its coordinates are wrong; `COORDINATE_OVERRIDES` holds the corrected ones and wins
over the package (Brussels BRU is about 42 km off there, reported upstream). The tests check
known coordinates, so a package update that moves an airport is noticed.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Final, cast

import airportsdata

from routing.network import NetworkError, Site, SiteKind

#: IATA code -> (lat, lon) where airportsdata is known to be wrong.
COORDINATE_OVERRIDES: Final[Mapping[str, tuple[float, float]]] = MappingProxyType(
    {
        # Brussels Airport (EBBR), Zaventem; airportsdata places it near Halle, ~42 km SW.
        "BRU": (50.9014, 4.4844),
    }
)


@lru_cache(maxsize=1)
def _table() -> Mapping[str, Mapping[str, Any]]:
    return cast(Mapping[str, Mapping[str, Any]], airportsdata.load("IATA"))


def airport_codes() -> list[str]:
    """Every IATA code airportsdata knows, sorted."""
    return sorted(_table())


def airport_site(
    iata: str,
    *,
    site_id: str | None = None,
    connect_minutes: int = 120,
    recovery_minutes: int = 60,
    customs_minutes: int = 0,
    ln2_recharge: bool = False,
) -> Site:
    """A `Site` for the airport with this IATA code (id defaults to the code itself).

    Defaults follow DOMAIN.md: tender about 2 h before departure, about 1 h recovery.
    """
    code = iata.upper()
    record = _table().get(code)
    if record is None:
        raise NetworkError(f"airportsdata has no airport {code!r}")
    lat, lon = COORDINATE_OVERRIDES.get(code, (float(record["lat"]), float(record["lon"])))
    return Site(
        id=site_id or code,
        name=str(record["name"]),
        kind=SiteKind.AIRPORT,
        lat=lat,
        lon=lon,
        tz=str(record["tz"]),
        country=str(record["country"]),
        iata=code,
        ln2_recharge=ln2_recharge,
        customs_minutes=customs_minutes,
        connect_minutes=connect_minutes,
        recovery_minutes=recovery_minutes,
    )
