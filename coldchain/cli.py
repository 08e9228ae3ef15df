"""The `coldchain` command line (CONTRACT.md section 4). Exit 0 on success; on error a one-line
reason on stderr and a non-zero status."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence

from coldchain.errors import ColdchainError
from coldchain.settings import Settings

logger = logging.getLogger("coldchain")


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    # gmqtt logs every reconnect attempt at INFO with a traceback; ours say it once, clearly.
    logging.getLogger("gmqtt").setLevel(logging.WARNING if level != "DEBUG" else logging.DEBUG)
    # ...and warns of writes to a closed socket when a PUBACK is dropped on purpose at shutdown.
    logging.getLogger("gmqtt.mqtt.protocol").setLevel(logging.ERROR)


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
