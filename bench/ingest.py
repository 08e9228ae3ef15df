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
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from coldchain.auth import Actor, Role
from coldchain.embedded import EmbeddedBroker, EmbeddedPostgres, free_port
from coldchain.shipments import EventType, Shipment, Status
from coldchain.store import Store
from routing import example_network
from sensors import Reading, encode_reading, telemetry_topic

WINDOW = 2000


def make_messages(count: int, dewars: int) -> list[tuple[str, bytes]]:
    """`count` readings spread over `dewars` dewars, each about 200 bytes of JSON."""
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


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _connect_packet(client_id: str) -> bytes:
    body = (
        struct.pack("!H", 4)
        + b"MQTT"
        + bytes([4, 0x02])
        + struct.pack("!H", 60)
        + struct.pack("!H", len(client_id))
        + client_id.encode()
    )
    return b"\x10" + _varint(len(body)) + body


def _publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    encoded = topic.encode()
    body = struct.pack("!H", len(encoded)) + encoded + struct.pack("!H", packet_id) + payload
    return b"\x32" + _varint(len(body)) + body


def blast(port: int, messages: list[tuple[str, bytes]], started: Queue[float]) -> None:
    """Publish every message at QoS 1, keeping up to WINDOW unacknowledged (child process)."""
    packets = [_publish_packet(t, p, i % 65535 + 1) for i, (t, p) in enumerate(messages)]
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(_connect_packet(f"bench-pub-{uuid.uuid4().hex[:8]}"))
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


def _stored(base: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:  # noqa: S310
        for line in response.read().decode().splitlines():
            if line.startswith("coldchain_ingest_readings_stored_total "):
                return float(line.split()[1])
    return 0.0


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def coldchain_rate(
    broker: EmbeddedBroker, database_url: str, messages: list[tuple[str, bytes]], log: Path
) -> tuple[float, float]:
    """`coldchain serve` receiving and committing: (readings per second, peak RSS in MiB)."""
    port = free_port()
    env = {
        **os.environ,
        "COLDCHAIN_DATABASE_URL": database_url,
        "COLDCHAIN_MQTT_URL": broker.url,
        "COLDCHAIN_HTTP_PORT": str(port),
        "COLDCHAIN_MQTT_CLIENT_ID": f"bench-{uuid.uuid4().hex[:8]}",
        "COLDCHAIN_LOG_LEVEL": "WARNING",
    }
    with log.open("wb") as out:
        service = subprocess.Popen(
            [sys.executable, "-m", "coldchain.cli", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:  # noqa: S310
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"service did not become ready; see {log}")
        time.sleep(0.2)
    try:
        publisher, t0 = publish(broker.port, messages)
        while _stored(base) < len(messages):
            time.sleep(0.02)
        t1 = time.time()
        publisher.join()
        return len(messages) / (t1 - t0), _peak_rss_mib(service.pid)
    finally:
        service.terminate()
        service.wait(30)


async def _create_shipments(database_url: str, dewars: int) -> None:
    """An active cryo-vapor shipment for every bench dewar, packed before its first reading, so
    the excursion rules evaluate every reading."""
    store = await Store.open(database_url)
    try:
        await store.migrate()
        await store.import_sites(list(example_network().sites.values()), "bench")
        actor = Actor(0, "bench", Role.ADMIN)
        now = datetime.now(UTC)
        for d in range(dewars):
            shipment = Shipment(
                id=f"BENCH-SH-{d:05d}",
                dewar_id=f"BENCH-{d:05d}",
                profile="cryo-vapor",
                origin="MFG-MPN",
                destination="TC-NKI",
                deliver_by=now + timedelta(days=5),
                planned_departure=None,
                chain_of_identity=None,
                status=Status.CREATED,
                created_at=now,
                created_by="bench",
                starts_at=now,
                ends_at=None,
            )
            await store.create_shipment(shipment, actor)
            await store.record_event(
                shipment.id, EventType.PACKED, now - timedelta(hours=7), None, None, actor
            )
    finally:
        await store.close()


async def _create_database(server_url: str) -> str:
    name = f"coldchain_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(server_url)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


async def _drop_database(server_url: str, url: str) -> None:
    conn = await asyncpg.connect(server_url)
    await conn.execute(f'DROP DATABASE IF EXISTS "{urlsplit(url).path[1:]}" WITH (FORCE)')
    await conn.close()


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

    work = Path(tempfile.mkdtemp(prefix="coldchain-bench-"))
    embedded_pg: EmbeddedPostgres | None = None
    server_url = os.environ.get("COLDCHAIN_DATABASE_URL")
    if not server_url:
        embedded_pg = EmbeddedPostgres(work / "pg")
        server_url = embedded_pg.start()
    broker = EmbeddedBroker(work / "broker", prefer="mosquitto")
    broker.start()
    messages = make_messages(args.messages, args.dewars)
    sizes = [len(p) for _, p in messages]
    print(
        f"{len(messages)} readings from {args.dewars} dewars, payload "
        f"{min(sizes)}-{max(sizes)} bytes (mean {sum(sizes) / len(sizes):.0f})"
    )
    try:
        reference = reference_rate(broker, messages)
        print(f"reference  mosquitto_sub -q 1, no processing: {reference:,.0f} msg/s")
        database_url = asyncio.run(_create_database(server_url))
        try:
            ours, peak = coldchain_rate(broker, database_url, messages, work / "service.log")
        finally:
            asyncio.run(_drop_database(server_url, database_url))
        print(
            f"coldchain  published -> committed in PostgreSQL: {ours:,.0f} readings/s, "
            f"service peak RSS {peak:.0f} MiB"
        )
        print(f"ratio      coldchain / reference = {ours / reference:.2f}  (target >= 0.8)")
        if not args.no_rules:
            database_url = asyncio.run(_create_database(server_url))
            try:
                asyncio.run(_create_shipments(database_url, args.dewars))
                ruled, peak = coldchain_rate(
                    broker, database_url, messages, work / "service-rules.log"
                )
            finally:
                asyncio.run(_drop_database(server_url, database_url))
            print(
                f"with rules every reading in an active shipment, rules evaluated: "
                f"{ruled:,.0f} readings/s, peak RSS {peak:.0f} MiB"
            )
            print(f"ratio      with rules / without = {ruled / ours:.2f}  (target >= 0.85)")
        print(
            f"reproduce: .venv/bin/python -m bench.ingest --messages {args.messages} "
            f"--dewars {args.dewars}  ({os.cpu_count()} cores, python "
            f"{sys.version.split()[0]})"
        )
    finally:
        broker.stop()
        if embedded_pg is not None:
            embedded_pg.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
