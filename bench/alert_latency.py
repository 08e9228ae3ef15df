"""Alert latency: from the MQTT publish of a breaching reading to the alarm on the alert topic and
at a webhook receiver, p50/p99 over many alarms, idle and under background ingest load.

What it does, in one run on this machine:
1. A private Mosquitto, a fresh database, `coldchain serve` as a separate process, a webhook
   receiver and an MQTT subscriber on `coldchain/v1/alerts/#` in this process.
2. 50 dewars in active cryo-vapor shipments, each of which (and each load dewar) first sends
   one calm reading, as dewars in transit do. Each alarm is a knock (shock 25 g, a warning with
   no delay) on one of them, followed by a calm reading that clears it; every knock is a new
   episode, so a new alarm. The publish time of each knock is recorded, and the arrival of its
   "open" alert on each channel.
3. The same again while a second publisher sends readings of 1,000 other dewars, also in active
   shipments (so the rules evaluate them), at `--load` readings/s: by default half the sustained
   ingest rate, measured first in the same run the way bench/ingest.py measures it, so the load
   fits the machine the benchmark runs on.

Run: .venv/bin/python -m bench.alert_latency [--alarms 1000] [--load READINGS_PER_S]
Database: COLDCHAIN_DATABASE_URL (a server where it may create a database), else embedded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import threading
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from multiprocessing.synchronize import Event as EventType

import asyncpg
import paho.mqtt.client as paho
from aiohttp import web
from paho.mqtt.enums import CallbackAPIVersion

from bench.harness import (
    BenchServers,
    connect_packet,
    create_database,
    create_shipments,
    drop_database,
    publish_packet,
    start_service,
    stop_service,
)
from bench.ingest import coldchain_rate, make_messages
from coldchain.alarms import Channel, Recipient
from coldchain.embedded import AUTOSAVE_S, free_port
from coldchain.profiles import Severity
from sensors import Reading, encode_reading, telemetry_topic

ALARM_DEWARS = 50
LOAD_DEWARS = 1000
# Where the time goes inside the service, from its /metrics: each stage's mean over a phase.
STAGES = (
    ("ingest lag", "coldchain_ingest_lag_seconds"),
    ("rules batch", "coldchain_rules_batch_seconds"),
    ("alarm write", "coldchain_alarm_write_seconds"),
    ("outbox claim", "coldchain_outbox_claim_seconds"),
    ("outbox to sent", "coldchain_notification_delay_seconds"),
    ("event loop lag", "coldchain_event_loop_lag_seconds"),
    ("gc pause", "coldchain_gc_pause_seconds"),
)


_Stage = tuple[float, float, dict[float, float]]  # sum, count, cumulative count by bucket bound


def _stage_totals(base: str) -> list[_Stage]:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:  # noqa: S310
        lines = response.read().decode().splitlines()
    values: dict[str, float] = {}
    for line in lines:
        if not line.startswith("#") and " " in line:
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    totals = []
    for _, name in STAGES:
        prefix = f'{name}_bucket{{le="'
        buckets = {
            float(key[len(prefix) : -2]): value
            for key, value in values.items()
            if key.startswith(prefix)
        }
        totals.append((values.get(f"{name}_sum", 0.0), values.get(f"{name}_count", 0.0), buckets))
    return totals


def _p99_bound(before: dict[float, float], after: dict[float, float], n: float) -> float:
    """The smallest bucket bound that 99 % of the phase's observations fell within."""
    for bound in sorted(after):
        if after[bound] - before.get(bound, 0.0) >= 0.99 * n:
            return bound
    return float("inf")


def _report_stages(before: list[_Stage], after: list[_Stage]) -> None:
    parts = []
    means: dict[str, float] = {}
    for (label, _), (s0, n0, b0), (s1, n1, b1) in zip(STAGES, before, after, strict=True):
        n = n1 - n0
        mean = means[label] = (s1 - s0) / n * 1000 if n else 0.0
        p99 = _p99_bound(b0, b1, n) * 1000 if n else 0.0
        parts.append(f"{label} {mean:.1f} ms, p99 <= {p99:g} ms (n={n:.0f})")
    print("         inside the service, mean and p99 bucket: " + ", ".join(parts))
    # Each of the alarm writer's round trips waits a turn of the event loop, so its time in
    # loop lags changes with the code, while the lag itself changes with the hour.
    if means["event loop lag"] > 0:
        print(
            f"         alarm write / event loop lag = "
            f"{means['alarm write'] / means['event loop lag']:.1f}"
        )


class Arrivals:
    """Arrival times of "open" alerts, by (dewar, episode start)."""

    def __init__(self) -> None:
        self.times: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()

    def record(self, body: dict[str, object]) -> None:
        if (
            body.get("state") == "open"
            and body.get("rule") == "shock"
            and (body.get("escalation_level") == 0)
        ):
            key = (str(body["dewar_id"]), str(body["started_at"]))
            with self.lock:
                self.times.setdefault(key, time.time())


def _dewars() -> list[str]:
    """The dewars that raise the alarms, then those that carry the load."""
    return [f"ALERT-{d:03d}" for d in range(ALARM_DEWARS)] + [
        f"LOAD-{d:04d}" for d in range(LOAD_DEWARS)
    ]


async def _setup(database_url: str, hook_url: str) -> None:
    store = await create_shipments(database_url, _dewars(), packed_ago=timedelta(hours=20))
    try:
        await store.add_recipient(
            Recipient(
                id=0,
                name="bench receiver",
                channel=Channel.WEBHOOK,
                address=hook_url,
                secret="bench-webhook-secret",  # noqa: S106 - signed like any webhook
                min_severity=Severity.WARNING,
                site_id=None,
                shipment_id=None,
                tier=0,
                quiet_from=None,
                quiet_until=None,
                tz="UTC",
                active=True,
            ),
            "bench",
        )
    finally:
        await store.close()


def _webhook_server(arrivals: Arrivals, port: int, ready: threading.Event) -> None:
    async def hook(request: web.Request) -> web.Response:
        arrivals.record(json.loads(await request.read()))
        return web.Response(status=204)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def _paced_load(port: int, rate: float, stop: EventType) -> None:
    """Publish readings of the load dewars at `rate` per second until `stop` (child process)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(connect_packet(f"bench-load-{uuid.uuid4().hex[:8]}"))
    sock.recv(4)
    sock.setblocking(False)
    start = datetime.now(UTC) - timedelta(hours=10)
    seq = 0
    sent = 0
    began = time.monotonic()
    while not stop.is_set():
        due = int((time.monotonic() - began) * rate)
        chunk: list[bytes] = []
        while sent < due and len(chunk) < 500:
            d = sent % LOAD_DEWARS
            if d == 0:
                seq += 1
            r = Reading(
                seq=seq,
                ts=start + timedelta(seconds=seq),
                # Moving a little, as a real probe's does: a value repeated exactly a dozen
                # times is a stuck sensor, and the load would raise a thousand alarms of that
                # (nor so fast that it is a temperature rising more than 2 °C/min).
                temp_c=-190.0 + d % 7 / 10 + seq % 2 / 100,
                ln2_level_pct=80.0,
                tilt_deg=2.0,
                shock_g=0.2,
            )
            chunk.append(
                publish_packet(
                    telemetry_topic(f"LOAD-{d:04d}"), encode_reading(r), sent % 65535 + 1
                )
            )
            sent += 1
        if chunk:
            data = b"".join(chunk)
            while data:
                try:
                    data = data[sock.send(data) :]
                except BlockingIOError:
                    time.sleep(0.001)
        try:
            while sock.recv(65536):
                pass
        except BlockingIOError:
            pass
        time.sleep(0.005)
    sock.close()


def _warm_up(port: int) -> None:
    """A first calm reading of every dewar, before anything the benchmark times."""
    at = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=11)
    publisher = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-warm-up")
    publisher.max_inflight_messages_set(1000)
    publisher.connect("127.0.0.1", port)
    publisher.loop_start()
    calm = Reading(seq=0, ts=at, temp_c=-190.0, ln2_level_pct=80.0, tilt_deg=2.0, shock_g=0.1)
    infos = [publisher.publish(telemetry_topic(d), encode_reading(calm), qos=1) for d in _dewars()]
    for info in infos:
        info.wait_for_publish(30)
    publisher.disconnect()
    publisher.loop_stop()


_Sent = dict[tuple[str, str], float]  # publish time of each knock, by (dewar, episode start)


def _measure(
    alarms: int, broker_port: int, arrivals: tuple[Arrivals, Arrivals], seq_base: int
) -> tuple[list[float], list[float], _Sent]:
    publisher = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-knock-{seq_base}")
    publisher.connect("127.0.0.1", broker_port)
    publisher.loop_start()
    sent: _Sent = {}
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    for k in range(alarms):
        dewar = f"ALERT-{k % ALARM_DEWARS:03d}"
        step = 2 * (k // ALARM_DEWARS)
        seq = seq_base + step
        # Device times stay in the past: each phase has its own half hour.
        ts = base + timedelta(seconds=step, minutes=30 if seq_base > ALARM_DEWARS else 0)
        temp = -190.0 + step % 4 / 200  # never stuck, and slow (see _paced_load)
        knock = Reading(seq=seq, ts=ts, temp_c=temp, ln2_level_pct=80.0, shock_g=25.0)
        calm = Reading(
            seq=seq + 1,
            ts=ts + timedelta(milliseconds=500),
            temp_c=temp,
            ln2_level_pct=80.0,
            shock_g=0.1,
        )
        sent[(dewar, ts.isoformat())] = time.time()
        publisher.publish(telemetry_topic(dewar), encode_reading(knock), qos=1)
        publisher.publish(telemetry_topic(dewar), encode_reading(calm), qos=1)
        time.sleep(0.02)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(
        len(a.times.keys() & sent.keys()) == len(sent) for a in arrivals
    ):
        time.sleep(0.2)
    publisher.disconnect()
    publisher.loop_stop()
    out = []
    for a in arrivals:
        with a.lock:
            out.append([(a.times[k] - t) * 1000 for k, t in sent.items() if k in a.times])
    missing = [len(sent) - len(x) for x in out]
    if any(missing):
        print(f"  (alerts not received within 60 s: topic {missing[0]}, webhook {missing[1]})")
    return out[0], out[1], sent


async def _received(database_url: str, sent: _Sent) -> dict[tuple[str, str], float]:
    """When the service received each knock (its `received_at`, stamped on the socket read),
    as a Unix time: splits each alert's latency at the service's door."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT dewar_id, ts, received_at FROM readings "
            "WHERE dewar_id LIKE 'ALERT-%' AND shock_g > 20"
        )
    finally:
        await conn.close()
    got = {(r["dewar_id"], r["ts"].astimezone(UTC).isoformat()): r["received_at"] for r in rows}
    return {k: got[k].timestamp() for k in sent if k in got}


def _report_split(database_url: str, sent: _Sent, arrivals: Arrivals) -> None:
    """Each knock's latency in two: publish to the service's read of it (the broker, the
    sockets, and the wait for the ingest's window), and that read to the alert's arrival."""
    received = asyncio.run(_received(database_url, sent))
    keys = [k for k in sent if k in received and k in arrivals.times]
    door = [(received[k] - sent[k]) * 1000 for k in keys]
    inside = [(arrivals.times[k] - received[k]) * 1000 for k in keys]
    print(
        f"         alert topic in two (n={len(keys)}): publish to service read p50 "
        f"{_pct(door, 0.5):.1f} ms p99 {_pct(door, 0.99):.1f} ms; read to alert p50 "
        f"{_pct(inside, 0.5):.1f} ms p99 {_pct(inside, 0.99):.1f} ms"
    )


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _report(label: str, topic: list[float], hook: list[float]) -> None:
    for name, values in (("alert topic", topic), ("webhook", hook)):
        p99 = _pct(values, 0.99)
        print(
            f"{label:8} {name:12} n={len(values):5}  p50 {_pct(values, 0.5):7.1f} ms  "
            f"p99 {p99:7.1f} ms  mean {statistics.fmean(values) if values else 0:6.1f} ms  "
            f"p99/target(100 ms) = {p99 / 100:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alarms", type=int, default=1000)
    parser.add_argument(
        "--load",
        type=float,
        default=0.0,
        help="background readings/s; default: half the sustained ingest rate, measured first "
        "in this run as bench/ingest.py does",
    )
    parser.add_argument(
        "--broker-autosave",
        type=int,
        default=AUTOSAVE_S,
        help="seconds between Mosquitto's saves of its sessions to disk; default the compose "
        "file's. Each save stops the broker while it writes, a few hundred ms under this load",
    )
    args = parser.parse_args()

    servers = BenchServers("coldchain-alerts-", autosave_s=args.broker_autosave)
    work, server_url, broker = servers.work, servers.server_url, servers.broker
    if args.load <= 0:
        scratch = asyncio.run(create_database(server_url))
        try:
            sustained = coldchain_rate(
                broker, scratch, make_messages(100_000, 1000), work / "sustained.log"
            ).rate
        finally:
            asyncio.run(drop_database(server_url, scratch))
        args.load = sustained / 2
        print(
            f"sustained ingest rate on this machine now: {sustained:,.0f} readings/s "
            f"(bench/ingest.py's measure, 100,000 readings); the load is half of it"
        )
    database_url = asyncio.run(create_database(server_url))
    topic_arrivals, hook_arrivals = Arrivals(), Arrivals()
    hook_port = free_port()
    ready = threading.Event()
    threading.Thread(
        target=_webhook_server, args=(hook_arrivals, hook_port, ready), daemon=True
    ).start()
    ready.wait(10)
    service: subprocess.Popen[bytes] | None = None
    base = ""
    listener = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-alerts")
    listener.on_message = lambda c, u, m: topic_arrivals.record(json.loads(m.payload))
    try:
        asyncio.run(_setup(database_url, f"http://127.0.0.1:{hook_port}/hook"))
        listener.connect("127.0.0.1", broker.port)
        listener.subscribe("coldchain/v1/alerts/#", qos=1)
        listener.loop_start()
        service, base = start_service(
            work / "service.log",
            database_url=database_url,
            mqtt_url=broker.url,
            remind_scale="1000",
        )
        # One reading from every dewar first, as a fleet in transit sends: otherwise each of
        # the 1,050 shipments, packed hours ago and silent since, raises "signal lost" at the
        # rules' first beat, and the knocks' alerts queue behind a thousand others.
        _warm_up(broker.port)
        time.sleep(3)  # let the rules load the shipments and take the first readings
        print(
            f"{args.alarms} alarms (a knock on one of {ALARM_DEWARS} dewars every 20 ms), "
            f"{LOAD_DEWARS} more dewars in shipments for the load"
        )
        stages = _stage_totals(base)
        *idle, sent = _measure(args.alarms, broker.port, (topic_arrivals, hook_arrivals), 10)
        _report("idle", *idle)
        after_idle = _stage_totals(base)
        _report_stages(stages, after_idle)
        _report_split(database_url, sent, topic_arrivals)
        stages = after_idle
        stop = multiprocessing.get_context("fork").Event()
        load = multiprocessing.get_context("fork").Process(
            target=_paced_load, args=(broker.port, args.load, stop)
        )
        load.start()
        time.sleep(3)
        *loaded, sent = _measure(args.alarms, broker.port, (topic_arrivals, hook_arrivals), 100_000)
        stop.set()
        load.join(30)
        _report(f"{args.load / 1000:.0f}k/s", *loaded)
        _report_stages(stages, _stage_totals(base))
        _report_split(database_url, sent, topic_arrivals)
        print(
            f"reproduce: .venv/bin/python -m bench.alert_latency --alarms {args.alarms} "
            f"--load {args.load:.0f} --broker-autosave {args.broker_autosave}  "
            f"({os.cpu_count()} cores)"
        )
    finally:
        listener.loop_stop()
        if service is not None:
            stop_service(service, work / "service.log")
        asyncio.run(drop_database(server_url, database_url))
        servers.close()


if __name__ == "__main__":
    main()
