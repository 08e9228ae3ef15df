"""`coldchain demo` and `coldchain simulate`: the whole system on one machine.

The demo uses the configured PostgreSQL and broker when COLDCHAIN_DATABASE_URL /
COLDCHAIN_MQTT_URL are set, and otherwise starts embedded ones (see `coldchain.embedded`). It
runs the service and a simulated fleet with a mix of faults, prints where to look, and stops
everything on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from aiohttp import web

from coldchain import keys
from coldchain.app import create_app, tune_gc
from coldchain.auth import Actor, Role, new_token, token_hash
from coldchain.embedded import EmbeddedBroker, EmbeddedPostgres
from coldchain.errors import ConfigError
from coldchain.settings import Settings
from coldchain.shipments import EventType, Shipment, Status
from coldchain.store import Store
from routing import example_network
from sensors import LANES, FleetRunner, FleetStats, default_fault_mix, parse_faults
from sensors.fleet import dewar_id

logger = logging.getLogger(__name__)

DEMO_FLEET_CLIENT_ID = "coldchain-demo-fleet"
DEMO_HISTORY = timedelta(hours=20)

# Where each of the fleet's lanes (sensors.fleet.LANES, in order) starts and ends in the
# bundled example network, so the demo's shipments and the planner share the same sites.
LANE_SITES: Final = (
    ("MFG-MPN", "TC-MDA"),
    ("MFG-MPN", "TC-MSK"),
    ("MFG-MPN", "TC-COH"),
    ("MFG-MPN", "TC-DFCI"),
    ("MFG-MPN", "TC-FHCC"),
    ("MFG-HFD", "TC-CHA"),
    ("MFG-HFD", "TC-IGR"),
    ("MFG-HFD", "TC-KS"),
    ("MFG-HFD", "TC-HCB"),
    ("MFG-HFD", "TC-UKHD"),
)
_DEMO_ACTOR: Final = Actor(0, "coldchain demo", Role.ADMIN)


async def seed(store: Store, *, dewars: int, fleet_start: datetime) -> dict[str, str]:
    """Make the demo usable at once: the example route network, a token per role, and an
    active shipment for every simulated dewar, packed and picked up when the fleet started.
    Returns the tokens by role."""
    network = example_network()
    await store.import_sites(list(network.sites.values()), _DEMO_ACTOR.name)
    await store.import_lanes(list(network.lanes), _DEMO_ACTOR.name)
    await store.import_flights(list(network.flights), _DEMO_ACTOR.name)
    tokens = {}
    for role in Role:
        token = new_token()
        await store.create_token(
            f"demo {role}",
            role,
            token_hash(token),
            datetime.now(UTC) + timedelta(days=7),
            _DEMO_ACTOR.name,
        )
        tokens[str(role)] = token
    earlier = await store.shipments(limit=500)
    active = {s.dewar_id: s for s in earlier if s.status.active}
    # A dewar's readings belong to one shipment at a time: a new one packs out no earlier than
    # the dewar's last shipment ended (one cancelled in the UI since, say).
    ended: dict[str, datetime] = {}
    for s in earlier:
        if s.ends_at is not None:
            ended[s.dewar_id] = max(s.ends_at, ended.get(s.dewar_id, s.ends_at))
    fleet_dewars = {dewar_id(index) for index in range(dewars)}
    for s in earlier:
        if s.status.active and s.id.startswith("DEMO-") and s.dewar_id not in fleet_dewars:
            # An earlier demo's shipment of a dewar this fleet does not run (a bigger fleet, or
            # the off-by-one of earlier versions): it would only ever raise "signal lost".
            await store.record_event(
                s.id, EventType.CANCELLED, datetime.now(UTC), None, "no such dewar in the fleet",
                _DEMO_ACTOR,
            )  # fmt: skip
    for index in range(dewars):
        dewar = dewar_id(index)
        lane = LANES[index % len(LANES)]
        origin, destination = LANE_SITES[index % len(LANE_SITES)]
        current = active.get(dewar)
        if current is not None and current.starts_at <= fleet_start:
            continue  # still travelling from an earlier run of the demo
        if current is not None:
            cancelled, _ = await store.record_event(
                current.id,
                EventType.CANCELLED,
                datetime.now(UTC),
                None,
                "demo restarted",
                _DEMO_ACTOR,
            )
            if cancelled.ends_at is not None:
                ended[dewar] = cancelled.ends_at
        now = datetime.now(UTC)
        shipment = Shipment(
            id=f"DEMO-{dewar}-{fleet_start:%m%d%H%M}",
            dewar_id=dewar,
            profile="cryo-vapor",
            origin=origin,
            destination=destination,
            deliver_by=fleet_start + timedelta(hours=lane.transit_hours + 24),
            planned_departure=fleet_start,
            chain_of_identity=f"DEMO-COI-{index + 1:04d}",
            status=Status.CREATED,
            created_at=now,
            created_by=_DEMO_ACTOR.label,
            starts_at=now,
            ends_at=None,
        )
        created = await store.create_shipment(shipment, _DEMO_ACTOR)
        packed_at = max(fleet_start, ended.get(dewar, fleet_start))
        await store.record_event(
            created.id,
            EventType.PACKED,
            packed_at,
            origin,
            "charged dry shipper, payload loaded",
            _DEMO_ACTOR,
        )
        await store.record_event(
            created.id,
            EventType.PICKED_UP,
            min(packed_at + timedelta(minutes=30), datetime.now(UTC)),
            origin,
            None,
            _DEMO_ACTOR,
        )
    return tokens


def _fleet(
    settings: Settings,
    *,
    dewars: int,
    interval_s: float,
    speed: float,
    faults_spec: str | None,
    duration_s: float | None,
    client_id: str,
    start: datetime | None = None,
) -> FleetRunner:
    if speed <= 0 or interval_s <= 0:
        raise ConfigError("--speed and --interval must be positive")
    try:
        faults = default_fault_mix(dewars) if faults_spec is None else parse_faults(faults_spec)
    except ValueError as exc:
        raise ConfigError(f"--faults: {exc}") from exc
    address = settings.mqtt
    return FleetRunner(
        address.host,
        address.port,
        dewars=dewars,
        interval_s=interval_s,
        speed=speed,
        faults=faults,
        duration_s=duration_s,
        client_id=client_id,
        username=address.username,
        password=address.password,
        start=start,
    )


def _describe(stats: FleetStats) -> str:
    return (
        f"{stats.dewars} dewars: {stats.readings} readings taken, {stats.acknowledged} "
        f"acknowledged by the broker, {stats.buffered} buffered, {stats.dropped} dropped"
    )


def simulate(
    settings: Settings,
    *,
    dewars: int,
    interval_s: float,
    speed: float,
    faults: str,
    duration_s: float | None,
) -> int:
    """Publish a simulated fleet to the configured broker until the duration ends or Ctrl-C."""
    runner = _fleet(
        settings,
        dewars=dewars,
        interval_s=interval_s,
        speed=speed,
        faults_spec=faults,
        duration_s=duration_s,
        client_id=f"coldchain-simulator-{os.getpid()}",
    )
    print(
        f"publishing {dewars} simulated dewars to {settings.mqtt.url} at {speed:g}x "
        f"(Ctrl-C to stop)",
        flush=True,
    )
    runner.start()
    try:
        while runner.running:
            threading.Event().wait(0.5)
    except KeyboardInterrupt:
        pass
    stats = runner.stop()
    print(_describe(stats))
    return 0 if stats.dropped == 0 else 1


def demo(settings: Settings, *, dewars: int, speed: float, state_dir: str | None) -> int:
    """Run embedded servers (unless configured), the service and a fleet until Ctrl-C."""
    root = Path(state_dir or Path.home() / ".coldchain" / "demo").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    postgres: EmbeddedPostgres | None = None
    broker: EmbeddedBroker | None = None
    lines = []
    try:
        if "COLDCHAIN_DATABASE_URL" not in os.environ:
            postgres = EmbeddedPostgres(root / "postgres")
            settings = replace(settings, database_url=postgres.start())
            lines.append(
                f"  PostgreSQL   {settings.database_url}  (embedded; data in {postgres.data_dir})"
            )
        else:
            lines.append("  PostgreSQL   from COLDCHAIN_DATABASE_URL")
        if "COLDCHAIN_MQTT_URL" not in os.environ:
            broker = EmbeddedBroker(root / "broker")
            settings = replace(settings, mqtt_url=broker.start())
            lines.append(f"  MQTT broker  {settings.mqtt_url}  (embedded {broker.kind})")
        else:
            lines.append(f"  MQTT broker  {settings.mqtt.url}  (from COLDCHAIN_MQTT_URL)")
        fleet_start = datetime.now(UTC) - DEMO_HISTORY
        runner = _fleet(
            settings,
            start=fleet_start,
            dewars=dewars,
            interval_s=60.0,
            speed=speed,
            faults_spec=None,
            duration_s=None,
            client_id=DEMO_FLEET_CLIENT_ID,
        )
        base = f"http://{settings.http_host}:{settings.http_port}"
        lines += [
            f"  Service      {base}",
            f"               {base}/readyz    ready when PostgreSQL and MQTT are reachable",
            f"               {base}/metrics   ingest counters (Prometheus text)",
            f"               {base}/api/v1/shipments   (Authorization: Bearer <a token below>)",
            f"               {base}/api/v1/dead-letters   rejected messages and why",
            f"  Fleet        {dewars} simulated dewars at {speed:g}x real time, with tipped "
            "dewars, an open lid, a link loss, an LN2 exhaustion and a stuck sensor",
            "Press Ctrl-C to stop everything.",
        ]
        tune_gc()
        app = create_app(settings)

        async def fleet(app: web.Application) -> AsyncIterator[None]:
            await app[keys.BROKER].wait_connected()  # migrations are applied by then
            tokens = await seed(app[keys.STORE], dewars=dewars, fleet_start=fleet_start)
            runner.start()
            token_lines = [f"  Token {role:9}{token}" for role, token in tokens.items()]
            print(
                "coldchain demo is running\n" + "\n".join(lines[:-1] + token_lines + lines[-1:]),
                flush=True,
            )
            yield
            stats = await asyncio.to_thread(runner.stop, 15)
            logger.info("fleet stopped: %s", _describe(stats))

        app.cleanup_ctx.append(fleet)
        web.run_app(
            app,
            host=settings.http_host,
            port=settings.http_port,
            print=None,
            access_log=None,
            shutdown_timeout=10,
        )
    finally:
        if broker is not None:
            broker.stop()
        if postgres is not None:
            postgres.stop()
    print("coldchain demo stopped")
    return 0
