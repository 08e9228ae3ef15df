"""The network files of CONTRACT.md section 6: read (with errors that name file and line) and write.

Each file is parsed completely before anything is returned, and every bad row is collected, so
an import either gets all rows of a file or a `NetworkFileError` listing what is wrong where;
nothing from a bad file is applied. References between files (a lane to a site, a flight to an
airport by IATA code) are checked here, against the sites, and reported on the referring line.
Extra columns are ignored, so the files can grow compatibly.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, time
from pathlib import Path
from typing import Final, TextIO, TypeVar

from routing.hours import ReceivingHours
from routing.network import Flight, Lane, LaneMode, Network, NetworkError, Site, SiteKind

SITE_COLUMNS: Final = (
    "id",
    "name",
    "kind",
    "lat",
    "lon",
    "tz",
    "iata",
    "country",
    "ln2_recharge",
    "customs_minutes",
    "connect_minutes",
    "recovery_minutes",
    "opens",
    "closes",
)
LANE_COLUMNS: Final = ("origin", "destination", "mode", "minutes", "cost", "risk")
FLIGHT_COLUMNS: Final = (
    "carrier",
    "flight",
    "origin",
    "destination",
    "departs_at",
    "arrives_at",
    "cost",
    "risk",
)
MAX_PROBLEMS: Final = 50

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class RowProblem:
    line: int
    message: str


class NetworkFileError(ValueError):
    """A network file with bad rows; `problems` has each one with its line (the header is 1)."""

    def __init__(self, source: str, problems: Sequence[RowProblem]) -> None:
        self.source = source
        self.problems = tuple(problems)
        first = self.problems[0]
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        super().__init__(f"{source} line {first.line}: {first.message}{more}")

    def lines(self) -> list[str]:
        """One line of text per problem, for an operator."""
        return [f"{self.source} line {p.line}: {p.message}" for p in self.problems]


class _RowError(ValueError):
    pass


def _rows(
    stream: Iterable[str],
    source: str,
    columns: Sequence[str],
    parse: Callable[[dict[str, str]], _T],
) -> list[tuple[int, _T]]:
    reader = csv.DictReader(stream)
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise NetworkFileError(source, [RowProblem(1, f"missing column(s): {', '.join(missing)}")])
    out: list[tuple[int, _T]] = []
    problems: list[RowProblem] = []
    for row in reader:
        line = reader.line_num
        if None in row or any(row.get(c) is None for c in columns):
            problems.append(RowProblem(line, "wrong number of fields"))
            continue
        try:
            out.append((line, parse({k: (v or "").strip() for k, v in row.items() if k})))
        except (_RowError, NetworkError) as exc:
            problems.append(RowProblem(line, str(exc)))
        if len(problems) >= MAX_PROBLEMS:
            break
    if problems:
        raise NetworkFileError(source, problems)
    return out


def _number(row: Mapping[str, str], name: str, default: float | None = None) -> float:
    text = row[name]
    if not text and default is not None:
        return default
    try:
        return float(text)
    except ValueError:
        raise _RowError(f"{name}: {text!r} is not a number") from None


def _whole(row: Mapping[str, str], name: str, default: int | None = None) -> int:
    text = row[name]
    if not text and default is not None:
        return default
    try:
        return int(text)
    except ValueError:
        raise _RowError(f"{name}: {text!r} is not a whole number") from None


def _required(row: Mapping[str, str], name: str) -> str:
    if not row[name]:
        raise _RowError(f"{name} is required")
    return row[name]


def _clock(row: Mapping[str, str], name: str) -> time | None:
    text = row[name]
    if not text:
        return None
    try:
        return time.fromisoformat(text)
    except ValueError:
        raise _RowError(f"{name}: {text!r} is not a local time HH:MM") from None


def _flag(row: Mapping[str, str], name: str) -> bool:
    text = row[name].lower()
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0", ""):
        return False
    raise _RowError(f"{name}: {row[name]!r} is not true or false")


def _instant(row: Mapping[str, str], name: str) -> datetime:
    text = _required(row, name)
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise _RowError(f"{name}: {text!r} is not an RFC 3339 time") from None
    if value.utcoffset() is None:
        raise _RowError(f"{name}: {text!r} has no UTC offset")
    return value


def _choice(row: Mapping[str, str], name: str, kind: type[SiteKind] | type[LaneMode]) -> str:
    text = row[name]
    allowed = [m.value for m in kind]
    if text not in allowed:
        raise _RowError(f"{name}: {text!r} is not one of {'|'.join(allowed)}")
    return text


def _site(row: Mapping[str, str]) -> Site:
    opens, closes = _clock(row, "opens"), _clock(row, "closes")
    if (opens is None) != (closes is None):
        raise _RowError("opens and closes go together: give both or neither")
    try:
        hours = ReceivingHours(opens, closes) if opens and closes else None
    except ValueError as exc:
        raise _RowError(str(exc)) from None
    return Site(
        id=_required(row, "id"),
        name=row["name"] or row["id"],
        kind=SiteKind(_choice(row, "kind", SiteKind)),
        lat=_number(row, "lat"),
        lon=_number(row, "lon"),
        tz=_required(row, "tz"),
        country=_required(row, "country").upper(),
        iata=row["iata"].upper() or None,
        ln2_recharge=_flag(row, "ln2_recharge"),
        customs_minutes=_whole(row, "customs_minutes", 0),
        connect_minutes=_whole(row, "connect_minutes", 0),
        recovery_minutes=_whole(row, "recovery_minutes", 0),
        hours=hours,
    )


def parse_sites(stream: Iterable[str], source: str = "sites.csv") -> list[Site]:
    """Sites from CSV text (an open file or lines); raises NetworkFileError."""
    rows = _rows(stream, source, SITE_COLUMNS, _site)
    problems: list[RowProblem] = []
    seen: dict[str, int] = {}
    iata: dict[str, int] = {}
    for line, site in rows:
        if site.id in seen:
            problems.append(
                RowProblem(line, f"site {site.id} already defined on line {seen[site.id]}")
            )
        seen.setdefault(site.id, line)
        if site.kind is SiteKind.AIRPORT and site.iata:
            if site.iata in iata:
                problems.append(
                    RowProblem(line, f"IATA {site.iata} already used on line {iata[site.iata]}")
                )
            iata.setdefault(site.iata, line)
    if problems:
        raise NetworkFileError(source, problems)
    return [site for _, site in rows]


def parse_lanes(
    stream: Iterable[str], sites: Iterable[Site], source: str = "lanes.csv"
) -> list[Lane]:
    """Lanes from CSV text, checked against `sites`; raises NetworkFileError."""
    known = {s.id for s in sites}

    def lane(row: Mapping[str, str]) -> Lane:
        for end in ("origin", "destination"):
            if _required(row, end) not in known:
                raise _RowError(f"{end}: no site {row[end]!r}")
        return Lane(
            origin=row["origin"],
            destination=row["destination"],
            mode=LaneMode(_choice(row, "mode", LaneMode)),
            minutes=_whole(row, "minutes"),
            cost=_number(row, "cost", 0.0),
            risk=_number(row, "risk", 0.0),
        )

    rows = _rows(stream, source, LANE_COLUMNS, lane)
    _check_unique(rows, lambda x: x.key, "lane", source)
    return [x for _, x in rows]


def parse_flights(
    stream: Iterable[str], sites: Iterable[Site], source: str = "flights.csv"
) -> list[Flight]:
    """Flights from CSV text; their IATA codes are resolved to airport site ids of `sites`."""
    by_iata = {s.iata: s.id for s in sites if s.kind is SiteKind.AIRPORT and s.iata}

    def flight(row: Mapping[str, str]) -> Flight:
        ends = []
        for end in ("origin", "destination"):
            code = _required(row, end).upper()
            if code not in by_iata:
                raise _RowError(f"{end}: no airport site with IATA code {code!r}")
            ends.append(by_iata[code])
        return Flight(
            carrier=_required(row, "carrier"),
            flight=_required(row, "flight"),
            origin=ends[0],
            destination=ends[1],
            departs_at=_instant(row, "departs_at"),
            arrives_at=_instant(row, "arrives_at"),
            cost=_number(row, "cost", 0.0),
            risk=_number(row, "risk", 0.0),
        )

    rows = _rows(stream, source, FLIGHT_COLUMNS, flight)
    _check_unique(rows, lambda x: x.key, "flight", source)
    return [x for _, x in rows]


def _check_unique(
    rows: list[tuple[int, _T]], key: Callable[[_T], object], what: str, source: str
) -> None:
    seen: dict[object, int] = {}
    problems = []
    for line, item in rows:
        k = key(item)
        if k in seen:
            problems.append(RowProblem(line, f"{what} already defined on line {seen[k]}"))
        seen.setdefault(k, line)
    if problems:
        raise NetworkFileError(source, problems)


def load_network(sites: Path | str, lanes: Path | str, flights: Path | str) -> Network:
    """The network in the three CSV files. Raises NetworkFileError naming file and line."""
    with open(sites, newline="", encoding="utf-8") as f:
        site_list = parse_sites(f, str(sites))
    with open(lanes, newline="", encoding="utf-8") as f:
        lane_list = parse_lanes(f, site_list, str(lanes))
    with open(flights, newline="", encoding="utf-8") as f:
        flight_list = parse_flights(f, site_list, str(flights))
    return Network.build(site_list, lane_list, flight_list)


def write_sites(stream: TextIO, sites: Iterable[Site]) -> None:
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(SITE_COLUMNS)
    for s in sites:
        writer.writerow(
            [
                s.id,
                s.name,
                s.kind.value,
                f"{s.lat:.6f}",
                f"{s.lon:.6f}",
                s.tz,
                s.iata or "",
                s.country,
                "true" if s.ln2_recharge else "false",
                s.customs_minutes,
                s.connect_minutes,
                s.recovery_minutes,
                f"{s.hours.opens:%H:%M}" if s.hours else "",
                f"{s.hours.closes:%H:%M}" if s.hours else "",
            ]
        )


def write_lanes(stream: TextIO, lanes: Iterable[Lane]) -> None:
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(LANE_COLUMNS)
    for lane in lanes:
        writer.writerow(
            [lane.origin, lane.destination, lane.mode.value, lane.minutes, lane.cost, lane.risk]
        )


def write_flights(stream: TextIO, flights: Iterable[Flight], sites: Mapping[str, Site]) -> None:
    """Flights with IATA codes and local times (with their offsets) at each end."""
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(FLIGHT_COLUMNS)
    for f in flights:
        a, b = sites[f.origin], sites[f.destination]
        writer.writerow(
            [
                f.carrier,
                f.flight,
                a.iata,
                b.iata,
                a.local(f.departs_at).isoformat(),
                b.local(f.arrives_at).isoformat(),
                f.cost,
                f.risk,
            ]
        )
