"""The `coldchain` command line (CONTRACT.md section 4). Exit 0 on success; on error a one-line
reason on stderr and a non-zero status."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from coldchain.auth import Role, new_token, token_hash
from coldchain.errors import ColdchainError, ConfigError
from coldchain.settings import Settings
from coldchain.store import ImportReport, Store

logger = logging.getLogger("coldchain")
T = TypeVar("T")


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    # gmqtt logs every reconnect attempt at INFO with a traceback; ours say it once, clearly.
    logging.getLogger("gmqtt").setLevel(logging.WARNING if level != "DEBUG" else logging.DEBUG)
    # ...and warns of writes to a closed socket when a PUBACK is dropped on purpose at shutdown.
    logging.getLogger("gmqtt.mqtt.protocol").setLevel(logging.ERROR)
    # fpdf2's font subsetting logs every table it prunes at INFO, for every PDF report.
    logging.getLogger("fontTools").setLevel(logging.WARNING)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from coldchain.app import run

    run(settings, print_fn=lambda message: print(message, flush=True))
    return 0


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from coldchain.store import Store

    async def go() -> list[str]:
        store = await Store.open(settings.database_url, max_size=1)
        try:
            return [f"{m.version:03d}_{m.name}" for m in await store.migrate()]
        finally:
            await store.close()

    applied = asyncio.run(go())
    print(
        f"applied {len(applied)} migration(s)"
        + (f": {', '.join(applied)}" if applied else "; the schema is up to date")
    )
    return 0


def _simulate(args: argparse.Namespace, settings: Settings) -> int:
    from coldchain.demo import simulate

    return simulate(
        settings,
        dewars=args.dewars,
        interval_s=args.interval,
        speed=args.speed,
        faults=args.faults,
        duration_s=args.duration,
    )


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from coldchain.demo import demo

    return demo(settings, dewars=args.dewars, speed=args.speed, state_dir=args.state_dir)


def _store_call(settings: Settings, work: Callable[[Store], Awaitable[T]]) -> T:
    """Run one unit of work against the database (migrated first) and close the pool."""

    async def go() -> T:
        store = await Store.open(settings.database_url, max_size=2)
        try:
            await store.migrate()
            return await work(store)
        finally:
            await store.close()

    return asyncio.run(go())


def _token_create(args: argparse.Namespace, settings: Settings) -> int:
    role = Role(args.role)
    expires = None
    if args.expires_in_days is not None:
        expires = datetime.now(UTC) + timedelta(days=args.expires_in_days)
    token = new_token()
    who = f"cli:{getpass.getuser()}"
    token_id = _store_call(
        settings, lambda s: s.create_token(args.name, role, token_hash(token), expires, who)
    )
    print(token)
    print(
        f"token {token_id} for {args.name!r} ({role}); it is shown only this once", file=sys.stderr
    )
    return 0


def _token_list(args: argparse.Namespace, settings: Settings) -> int:
    tokens = _store_call(settings, lambda s: s.tokens())
    print(f"{'id':>4}  {'role':8}  {'state':8}  {'expires':25}  name")
    now = datetime.now(UTC)
    for t in tokens:
        state = (
            "revoked"
            if t.revoked_at
            else ("expired" if t.expires_at and t.expires_at <= now else "active")
        )
        expires = t.expires_at.isoformat(timespec="seconds") if t.expires_at else "never"
        print(f"{t.id:>4}  {t.role:8}  {state:8}  {expires:25}  {t.name}")
    return 0


def _token_revoke(args: argparse.Namespace, settings: Settings) -> int:
    who = f"cli:{getpass.getuser()}"
    _store_call(settings, lambda s: s.revoke_token(args.id, who))
    print(f"token {args.id} revoked")
    return 0


def _network_import(args: argparse.Namespace, settings: Settings) -> int:
    from routing import NetworkFileError, parse_flights, parse_lanes, parse_sites

    if not (args.sites or args.lanes or args.flights):
        raise ConfigError("give at least one of --sites, --lanes, --flights")
    who = f"cli:{getpass.getuser()}"

    def read(path: str) -> list[str]:
        try:
            with open(path, encoding="utf-8", newline="") as stream:
                return list(stream)
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc

    async def work(store: Store) -> list[tuple[str, ImportReport]]:
        reports = []
        known = {s.id: s for s in await store.sites()}
        if args.sites:
            sites = parse_sites(read(args.sites), source=args.sites)
            reports.append(("sites", await store.import_sites(sites, who)))
            known.update({s.id: s for s in sites})
        if args.lanes:
            lanes = parse_lanes(read(args.lanes), known.values(), source=args.lanes)
            reports.append(("lanes", await store.import_lanes(lanes, who)))
        if args.flights:
            flights = parse_flights(read(args.flights), known.values(), source=args.flights)
            reports.append(("flights", await store.import_flights(flights, who)))
        return reports

    try:
        reports = _store_call(settings, work)
    except NetworkFileError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        print("nothing from that file was applied", file=sys.stderr)
        return 1
    for what, report in reports:
        print(
            f"{what}: {len(report.added)} added, {len(report.updated)} updated, "
            f"{report.unchanged} unchanged"
        )
    return 0


def _instant_arg(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an RFC 3339 time: {text!r}") from exc
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"needs an offset (Z or +hh:mm): {text!r}")
    return value


def _route(args: argparse.Namespace, settings: Settings) -> int:
    from coldchain.planning import Planner
    from routing import (
        Objective,
        PlanRequest,
        PlanRequestError,
        RouteIndex,
        example_network,
        plan,
        plan_result_to_dict,
        plan_result_to_text,
    )

    try:
        request = PlanRequest(
            origin=args.origin,
            destination=args.destination,
            depart_at=args.depart,
            hold_hours=args.hold_hours,
            deliver_by=args.deliver_by,
            objective=Objective(args.objective),
            alternatives=args.alternatives,
            max_handoffs=args.max_handoffs,
        )
        if args.example:
            network = example_network(start=(args.depart - timedelta(days=1)).date(), days=8)
            result = plan(RouteIndex(network), request)
        else:
            result = _store_call(settings, lambda store: Planner(store).plan(request))
    except PlanRequestError as exc:
        raise ConfigError(str(exc)) from exc
    if args.json:
        print(json.dumps(plan_result_to_dict(result), indent=2))
    else:
        print(plan_result_to_text(result))
    return 0 if result.plans else 3


def _report(args: argparse.Namespace, settings: Settings) -> int:
    from coldchain import report

    who = f"cli:{getpass.getuser()}"
    inputs = _store_call(settings, lambda store: report.gather(store, args.shipment_id, who))
    rendered = report.render(inputs, args.format)
    target = args.output or (rendered.filename if args.format == "pdf" else "-")
    if target == "-":
        sys.stdout.buffer.write(rendered.body)
        sys.stdout.flush()
    else:
        with open(target, "wb") as stream:
            stream.write(rendered.body)
        print(f"wrote {target} ({len(rendered.body):,} bytes)", file=sys.stderr)
    return 0


def _lanes(args: argparse.Namespace, settings: Settings) -> int:
    import msgspec

    from coldchain import lanes

    since, until = lanes.period(args.since, args.until)
    rows = _store_call(settings, lambda store: store.delivered_shipments(since, until))
    page = lanes.summarise(rows, since, until)
    if args.json:
        print(json.dumps(msgspec.to_builtins(page), indent=2))
    else:
        print(lanes.to_text(page))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coldchain",
        description="Telemetry, excursion alarms and routing for cryogenic cell-therapy shipments.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, handler: Callable[[argparse.Namespace, Settings], int], help: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    command("serve", _serve, "run the service: MQTT ingest, HTTP API and dashboard")
    command("migrate", _migrate, "apply database migrations and exit")

    sim = command("simulate", _simulate, "publish a simulated fleet of dewars to the broker")
    sim.add_argument("--dewars", type=_positive_int, default=20, help="fleet size (default 20)")
    sim.add_argument(
        "--interval", type=float, default=60.0, help="device seconds between readings (default 60)"
    )
    sim.add_argument(
        "--speed", type=float, default=1.0, help="simulated seconds per real second (default 1)"
    )
    sim.add_argument(
        "--faults",
        default="",
        help="faults for every dewar, e.g. 'tip_over@2h,lid_open@30m+5m' "
        "(default: none; the demo uses a mix)",
    )
    sim.add_argument(
        "--duration",
        type=float,
        default=None,
        help="stop after this many real seconds (default: run until Ctrl-C)",
    )

    token = commands.add_parser(
        "token",
        help="make, list and revoke API tokens",
        description="API tokens: printed once, stored hashed.",
    )
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = token_commands.add_parser("create", help="make a token and print it once")
    create.set_defaults(handler=_token_create)
    create.add_argument("--role", required=True, choices=[r.value for r in Role])
    create.add_argument("--name", required=True, help="who or what will use it")
    create.add_argument("--expires-in-days", type=float, default=None)
    token_commands.add_parser("list", help="list tokens (never their secrets)").set_defaults(
        handler=_token_list
    )
    revoke = token_commands.add_parser("revoke", help="revoke a token by id")
    revoke.set_defaults(handler=_token_revoke)
    revoke.add_argument("id", type=int)

    network = commands.add_parser(
        "network", help="the route network", description="The route network: sites, lanes, flights."
    )
    network_commands = network.add_subparsers(
        dest="network_command", required=True, metavar="ACTION"
    )
    imp = network_commands.add_parser(
        "import",
        help="add or update sites, lanes and flights from CSV files",
        description="Add or update by id; never removes a site. A bad row is reported with "
        "its file and line, and nothing from that file is applied.",
    )
    imp.set_defaults(handler=_network_import)
    imp.add_argument("--sites", help="sites.csv")
    imp.add_argument("--lanes", help="lanes.csv")
    imp.add_argument("--flights", help="flights.csv")

    route = command(
        "route",
        _route,
        "plan routes from ORIGIN to DESTINATION (site ids) over "
        "the imported network, inside the hold time",
    )
    route.add_argument("origin")
    route.add_argument("destination")
    route.add_argument(
        "--depart", type=_instant_arg, required=True, help="pack-out time, RFC 3339 with offset"
    )
    route.add_argument(
        "--hold-hours",
        type=float,
        required=True,
        help="usable hold time of the charged dewar, hours",
    )
    route.add_argument("--deliver-by", type=_instant_arg, default=None)
    route.add_argument("--objective", choices=["fastest", "safest", "cheapest"], default="fastest")
    route.add_argument(
        "--alternatives",
        type=_positive_int,
        default=1,
        help="how many really different routes (default 1)",
    )
    route.add_argument("--max-handoffs", type=int, default=None)
    route.add_argument("--json", action="store_true", help="JSON instead of a table")
    route.add_argument(
        "--example",
        action="store_true",
        help="plan over the bundled example network (no database needed)",
    )

    rep = command(
        "report",
        _report,
        "write a shipment's excursion report: time in range, limits, MKT, alarms, custody",
    )
    rep.add_argument("shipment_id")
    rep.add_argument(
        "--format",
        choices=["json", "csv", "pdf"],
        default="json",
        help="json (default), pdf, or csv: every reading with the limits it passed",
    )
    rep.add_argument(
        "--output",
        "-o",
        default=None,
        help="file to write, - for standard output (default: standard output; for pdf, "
        "SHIPMENT-report.pdf)",
    )

    lane = command(
        "lanes",
        _lanes,
        "lane statistics: on-time rate, excursion rate, transit time and hold margin at "
        "delivery per origin and destination",
    )
    lane.add_argument(
        "--from",
        dest="since",
        type=_instant_arg,
        default=None,
        help="delivered at or after (default: 90 days before --to)",
    )
    lane.add_argument(
        "--to",
        dest="until",
        type=_instant_arg,
        default=None,
        help="delivered before (default: now)",
    )
    lane.add_argument("--json", action="store_true", help="JSON instead of a table")

    demo = command(
        "demo",
        _demo,
        "run everything on this machine: embedded PostgreSQL and "
        "MQTT broker (unless configured), the service and a simulated fleet",
    )
    demo.add_argument("--dewars", type=_positive_int, default=36, help="fleet size (default 36)")
    demo.add_argument(
        "--speed", type=float, default=60.0, help="simulated seconds per real second (default 60)"
    )
    demo.add_argument(
        "--state-dir",
        default=None,
        help="where embedded servers keep their data (default ~/.coldchain/demo)",
    )
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        _configure_logging(settings.log_level)
        handler: Callable[[argparse.Namespace, Settings], int] = args.handler
        code = handler(args, settings)
    except ColdchainError as exc:
        print(f"coldchain {args.command}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except (OSError, RuntimeError, TimeoutError) as exc:
        print(f"coldchain {args.command}: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
