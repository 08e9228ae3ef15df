"""What the benchmarks share: a scratch database, the service as a separate process, shipments
for simulated dewars, and MQTT packets built by hand for publishers that must not be the
bottleneck.

Set COLDCHAIN_BENCH_PROFILE=DIR to sample each service run with py-spy (`pip install py-spy`):
collapsed stacks land in DIR, one file per run."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from coldchain.auth import Actor, Role
from coldchain.embedded import AUTOSAVE_S, EmbeddedBroker, EmbeddedPostgres, free_port
from coldchain.shipments import EventType, Shipment, Status
from coldchain.store import Store
from routing import example_network


class BenchServers:
    """A scratch folder, a PostgreSQL server to make databases on (COLDCHAIN_DATABASE_URL, else
    an embedded one) and a private Mosquitto with the compose file's settings (but for
    `autosave_s`, to measure without the broker's periodic saves); `close` stops what was
    started and removes the folder."""

    def __init__(self, prefix: str, *, autosave_s: int = AUTOSAVE_S) -> None:
        self.work = Path(tempfile.mkdtemp(prefix=prefix))
        self._embedded: EmbeddedPostgres | None = None
        try:
            url = os.environ.get("COLDCHAIN_DATABASE_URL")
            if not url:
                self._embedded = EmbeddedPostgres(self.work / "pg")
                url = self._embedded.start()
            self.server_url = url
            self.broker = EmbeddedBroker(
                self.work / "broker", prefer="mosquitto", autosave_s=autosave_s
            )
            self.broker.start()
        except BaseException:
            self._cleanup()
            raise

    def close(self) -> None:
        self.broker.stop()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._embedded is not None:
            self._embedded.destroy()
        shutil.rmtree(self.work, ignore_errors=True)


async def create_database(server_url: str) -> str:
    name = f"coldchain_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(server_url)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))


async def drop_database(server_url: str, url: str) -> None:
    conn = await asyncpg.connect(server_url)
    await conn.execute(f'DROP DATABASE IF EXISTS "{urlsplit(url).path[1:]}" WITH (FORCE)')
    await conn.close()


async def create_shipments(
    database_url: str, dewar_ids: Sequence[str], *, packed_ago: timedelta
) -> Store:
    """An active cryo-vapor shipment for each dewar, packed `packed_ago`; returns the (open,
    migrated) store for more set-up; the caller closes it."""
    store = await Store.open(database_url)
    await store.migrate()
    await store.import_sites(list(example_network().sites.values()), "bench")
    actor = Actor(0, "bench", Role.ADMIN)
    now = datetime.now(UTC)
    for dewar in dewar_ids:
        shipment = Shipment(
            id=f"SH-{dewar}",
            dewar_id=dewar,
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
        await store.record_event(shipment.id, EventType.PACKED, now - packed_ago, None, None, actor)
    return store


def start_service(log: Path, **settings: str) -> tuple[subprocess.Popen[bytes], str]:
    """`coldchain serve` with COLDCHAIN_<NAME> settings, once /readyz says ready; returns the
    process and its base URL."""
    port = free_port()
    env = {
        **os.environ,
        "COLDCHAIN_HTTP_PORT": str(port),
        "COLDCHAIN_LOG_LEVEL": "WARNING",
        "COLDCHAIN_MQTT_CLIENT_ID": f"bench-{uuid.uuid4().hex[:8]}",
    }
    env.update({f"COLDCHAIN_{name.upper()}": value for name, value in settings.items()})
    with log.open("wb") as out:
        service = subprocess.Popen(
            [sys.executable, "-m", "coldchain.cli", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    profile_dir = os.environ.get("COLDCHAIN_BENCH_PROFILE")
    if profile_dir:
        # py-spy samples the service until it exits: collapsed stacks, a file per service run.
        subprocess.Popen(
            [
                str(Path(sys.executable).with_name("py-spy")),
                "record",
                "--pid",
                str(service.pid),
                "--format",
                "raw",
                "--rate",
                "250",
                "--output",
                str(Path(profile_dir) / f"{log.stem}-{service.pid}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{base}/readyz", timeout=2) as response:  # noqa: S310
                if response.status == 200:
                    return service, base
        except OSError:
            pass
        if time.monotonic() > deadline:
            service.terminate()
            raise SystemExit(f"service did not become ready; see {log}")
        time.sleep(0.2)


def stop_service(service: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM, as an operator stops it; says so, with the end of its log, if it takes over
    30 s (then kills it), so a slow shutdown is seen rather than hidden by the bench's end."""
    started = time.monotonic()
    service.terminate()
    try:
        service.wait(30)
    except subprocess.TimeoutExpired:
        service.kill()
        service.wait(10)
        tail = log.read_text(errors="replace").splitlines()[-20:]
        print("the service did not stop within 30 s of SIGTERM; the end of its log:")
        print("\n".join(f"  {line}" for line in tail))
        return
    if time.monotonic() - started > 5:
        print(f"(the service took {time.monotonic() - started:.1f} s to stop)")


def metric(base: str, name: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:  # noqa: S310
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def status_mib(pid: int, field_name: str) -> float:
    """A memory figure of a process from /proc/<pid>/status (VmRSS now, VmHWM its peak), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user and system) a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str) -> bytes:
    """An MQTT 3.1.1 CONNECT with a clean session and a 60 s keepalive."""
    body = (
        struct.pack("!H", 4)
        + b"MQTT"
        + bytes([4, 0x02])
        + struct.pack("!H", 60)
        + struct.pack("!H", len(client_id))
        + client_id.encode()
    )
    return b"\x10" + _varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, packet_id: int) -> bytes:
    """An MQTT PUBLISH at QoS 1."""
    encoded = topic.encode()
    body = struct.pack("!H", len(encoded)) + encoded + struct.pack("!H", packet_id) + payload
    return b"\x32" + _varint(len(body)) + body
