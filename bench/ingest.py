"""Ingest throughput: MQTT publish -> committed in PostgreSQL, against a reference subscriber.

What it does, in one run on this machine:
1. Starts a private Mosquitto (the compose file's settings: persistent sessions, deep queues).
2. Pre-encodes N readings of about 200 bytes from D dewars and publishes them at QoS 1 as fast as
   the broker takes them, from a separate process that writes pre-built MQTT packets on a raw
   socket with a window of unacknowledged messages (so the publisher is not the bottleneck).
3. Reference: the C client `mosquitto_sub -q 1` receives the same stream with no processing;
   its rate is published-to-received.
4. coldchain: `coldchain serve` (a separate process, as deployed) receives the same stream and
   commits it; the rate is published-to-committed (the service's stored counter reaches N), and
   the service's peak resident memory is read from /proc.
5. Prints both rates and their ratio, and how to reproduce.

Run: .venv/bin/python -m bench.ingest [--messages 200000] [--dewars 1000]
Database: COLDCHAIN_DATABASE_URL (a server where it may create a database), else an embedded one.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from pathlib import Path
from typing import NamedTuple

from bench.harness import (
    BenchServers,
    connect_packet,
    cpu_seconds,
    create_database,
    create_shipments,
    drop_database,
    metric,
    publish_packet,
    start_service,
    status_mib,
    stop_service,
)
from coldchain.embedded import EmbeddedBroker
from sensors import Reading, encode_reading, telemetry_topic

WINDOW = 2000


def make_messages(count: int, dewars: int) -> list[tuple[str, bytes]]:
    """`count` readings spread over `dewars` dewars, each about 200 bytes of JSON."""
    if count > dewars * 360:
        # A minute apart over the last six hours: more would be from the future, and the
        # service dead-letters those (a clock over 5 minutes ahead).
        raise SystemExit(f"at most 360 readings per dewar: raise --dewars to {-(-count // 360)}")
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=6)
    out = []
    for i in range(count):
        seq = i // dewars
        reading = Reading(
            seq=seq,
            ts=start + timedelta(seconds=seq * 60 + i % dewars / 100),
            temp_c=-190.0 + (i % 97) / 100,
            ln2_level_pct=81.25 - seq / 1000,
            tilt_deg=2.5,
            shock_g=0.31,
            lid_open=False,
            battery_pct=97.5,
            lat=40.839312 + seq / 1e5,
            lon=-74.481823 + seq / 1e5,
        )
        out.append((telemetry_topic(f"BENCH-{i % dewars:05d}"), encode_reading(reading)))
    return out


def blast(port: int, messages: list[tuple[str, bytes]], started: Queue[float]) -> None:
    """Publish every message at QoS 1, keeping up to WINDOW unacknowledged (child process)."""
    packets = [publish_packet(t, p, i % 65535 + 1) for i, (t, p) in enumerate(messages)]
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect_packet(f"bench-pub-{uuid.uuid4().hex[:8]}"))
    connack = sock.recv(4)
    assert connack[:1] == b"\x20" and connack[3] == 0, connack
    started.put(time.time())
    sent = acked = 0
    pending = b""
    total = len(packets)
    while acked < total:
        room = min(WINDOW - (sent - acked), total - sent)
        if room >= 100 or (room > 0 and sent + room == total):
            sock.sendall(b"".join(packets[sent : sent + room]))
            sent += room
            continue
        pending += sock.recv(65536)
        whole = len(pending) // 4  # the broker sends us only PUBACKs, 4 bytes each
        acked += whole
        pending = pending[whole * 4 :]
    sock.sendall(b"\xe0\x00")
    sock.close()


def publish(port: int, messages: list[tuple[str, bytes]]) -> tuple[BaseProcess, float]:
    """Start the publisher process; return it and the wall time its first message went out."""
    ctx = multiprocessing.get_context("fork")
    started: Queue[float] = ctx.Queue()
    process = ctx.Process(target=blast, args=(port, messages, started))
    process.start()
    first: float = started.get(timeout=60)
    return process, first


def reference_rate(broker: EmbeddedBroker, messages: list[tuple[str, bytes]]) -> float:
    """mosquitto_sub at QoS 1, doing nothing with what it receives: messages per second."""
    mosquitto_sub = shutil.which("mosquitto_sub")
    if mosquitto_sub is None:
        raise SystemExit("mosquitto_sub is not installed (apt-get install mosquitto-clients)")
    sub = subprocess.Popen(
        [
            mosquitto_sub,
            "-h",
            "127.0.0.1",
            "-p",
            str(broker.port),
            "-q",
            "1",
            "-c",
            "-i",
            f"ref-{uuid.uuid4().hex[:8]}",
            "-t",
            "coldchain/v1/dewars/+/telemetry",
            "-C",
            str(len(messages)),
            "-F",
            "%m",
        ],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # let it subscribe
    publisher, t0 = publish(broker.port, messages)
    sub.wait(timeout=600)
    t1 = time.time()
    publisher.join()
    return len(messages) / (t1 - t0)


def _machine_busy_s() -> float:
    """CPU seconds all cores have spent busy (neither idle nor waiting for I/O)."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


class ServiceRun(NamedTuple):
    rate: float  # readings per second, published to committed
    peak_mib: float  # the service's peak resident memory
    cpu_us: float  # the service's CPU per reading, in µs
    busy_cores: float  # the whole machine's busy cores meanwhile (broker, database, publisher...)

    def describe(self) -> str:
        return (
            f"{self.rate:,.0f} readings/s, service peak RSS {self.peak_mib:.0f} MiB, "
            f"service CPU {self.cpu_us:.1f} µs a reading, machine {self.busy_cores:.2f} of "
            f"{os.cpu_count()} cores busy"
        )


def coldchain_rate(
    broker: EmbeddedBroker, database_url: str, messages: list[tuple[str, bytes]], log: Path
) -> ServiceRun:
    """`coldchain serve` receiving and committing the messages, and what it cost."""
    service, base = start_service(log, database_url=database_url, mqtt_url=broker.url)
    try:
        cpu0, busy0 = cpu_seconds(service.pid), _machine_busy_s()
        publisher, t0 = publish(broker.port, messages)
        while metric(base, "coldchain_ingest_readings_stored_total") < len(messages):
            time.sleep(0.02)
        t1 = time.time()
        cpu1, busy1 = cpu_seconds(service.pid), _machine_busy_s()
        publisher.join()
        return ServiceRun(
            len(messages) / (t1 - t0),
            status_mib(service.pid, "VmHWM"),
            (cpu1 - cpu0) / len(messages) * 1e6,
            (busy1 - busy0) / (t1 - t0),
        )
    finally:
        stop_service(service, log)


async def _shipments(database_url: str, dewars: int) -> None:
    """Every bench dewar in an active shipment, packed before its first reading."""
    ids = [f"BENCH-{d:05d}" for d in range(dewars)]
    store = await create_shipments(database_url, ids, packed_ago=timedelta(hours=7))
    await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--dewars", type=int, default=1000)
    parser.add_argument(
        "--no-rules",
        action="store_true",
        help="skip the second run, with every dewar in an active shipment",
    )
    args = parser.parse_args()

    servers = BenchServers("coldchain-bench-")
    work, server_url, broker = servers.work, servers.server_url, servers.broker
    messages = make_messages(args.messages, args.dewars)
    sizes = [len(p) for _, p in messages]
    print(
        f"{len(messages)} readings from {args.dewars} dewars, payload "
        f"{min(sizes)}-{max(sizes)} bytes (mean {sum(sizes) / len(sizes):.0f})"
    )
    try:
        reference = reference_rate(broker, messages)
        print(f"reference  mosquitto_sub -q 1, no processing: {reference:,.0f} msg/s")
        database_url = asyncio.run(create_database(server_url))
        try:
            ours = coldchain_rate(broker, database_url, messages, work / "service.log")
        finally:
            asyncio.run(drop_database(server_url, database_url))
        print(f"coldchain  published -> committed in PostgreSQL: {ours.describe()}")
        print(f"ratio      coldchain / reference = {ours.rate / reference:.2f}  (target >= 0.8)")
        if not args.no_rules:
            database_url = asyncio.run(create_database(server_url))
            try:
                asyncio.run(_shipments(database_url, args.dewars))
                ruled = coldchain_rate(broker, database_url, messages, work / "service-rules.log")
            finally:
                asyncio.run(drop_database(server_url, database_url))
            print(
                "with rules every reading in an active shipment, rules evaluated: "
                f"{ruled.describe()}"
            )
            print(
                f"ratio      with rules / without = {ruled.rate / ours.rate:.2f}  (target >= 0.85)"
            )
        print(
            f"reproduce: .venv/bin/python -m bench.ingest --messages {args.messages} "
            f"--dewars {args.dewars}  ({os.cpu_count()} cores, python "
            f"{sys.version.split()[0]})"
        )
    finally:
        servers.close()


if __name__ == "__main__":
    main()
