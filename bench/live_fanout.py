"""Live stream fan-out at peak ingest: 100 WebSocket clients on `GET /api/v1/live` while readings
arrive as fast as the broker takes them, and what a client that stops reading costs.

What it does, in one run on this machine:
1. Starts a private Mosquitto and, for each of three runs, a fresh database and `coldchain serve`
   as a separate process (bench.harness.start_service) with a viewer token.
2. Publishes N readings from D dewars at QoS 1 as fast as the broker takes them, with
   bench.ingest's pre-built packets and raw-socket publisher process, and times publish ->
   committed (the service's stored counter reaches N), as bench/ingest.py does:
   - baseline: no client attached;
   - one reading client (the baseline for delivery lag);
   - fan-out: `--clients` reading clients plus `--stalled` clients that never read.
3. The reading clients run in a separate process (`--client-processes`), all in one event loop
   (aiohttp); each counts the readings it receives and stamps each frame on arrival. One of them
   also decodes every frame, which gives the readings of each event (every client gets the same
   events in the same order, so frame k of any client is event k).
4. Delivery lag is the service's own arrival stamp of a reading (`readings.received_at`, set
   when the MQTT message reached the service) to the moment a client's event loop had the frame
   holding it: parse, batching, commit, fan-out and the socket, on one clock. Publish time is not
   used: at peak rate the broker queues what the service cannot yet take, so publish -> receipt
   measures the backlog and grows with the run's length, whatever the fan-out does.
5. The stalled clients do the WebSocket handshake on a raw socket and never read again (the
   kernel's default buffers, as a frozen browser tab has). The service's
   `coldchain_live_dropped_clients_total` and `coldchain_live_clients` are polled every 50 ms to
   time each drop; after the stream, the clients the service still holds are the stalled ones
   it has not dropped, and each stalled socket's unread bytes (FIONREAD) show what the kernel
   buffered instead. aiohttp's heartbeat (30 s ping, 15 s for the pong) also closes a client
   that never reads, so a run longer than about 45 s sees those closures too.
6. Prints the rates and their ratio, readings per client, lag p50/p99 against the one-client run,
   the service's peak RSS (VmHWM) with and without clients and per client, the drops, the CPU of
   the service and of the clients, and how to reproduce. Nothing is asserted.

Run: .venv/bin/python -m bench.live_fanout [--clients 100] [--stalled 10] [--readings N]
     [--dewars 1000] [--client-processes 1] [--stalled-rcvbuf 0]
Database: COLDCHAIN_DATABASE_URL (a server where it may create a database), else an embedded one.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import base64
import fcntl
import math
import multiprocessing
import os
import resource
import socket
import statistics
import sys
import termios
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from multiprocessing.context import ForkContext
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import aiohttp
import asyncpg
import msgspec
import numpy as np

from bench.harness import (
    BenchServers,
    cpu_seconds,
    create_database,
    drop_database,
    start_service,
    status_mib,
    stop_service,
)
from bench.ingest import make_messages, publish
from coldchain.auth import Role, new_token, token_hash
from coldchain.embedded import EmbeddedBroker
from coldchain.store import Store

POLL_S = 0.05
MAX_PER_DEWAR = 360
LAG_SAMPLES = 4_000_000  # lag percentiles from at most this many (client, reading) pairs


class _Key(msgspec.Struct):
    dewar_id: str
    seq: int


class _Event(msgspec.Struct):
    type: str
    data: list[_Key]


@dataclass
class _Received:
    """What one reading client got: an arrival time and a reading count per readings frame,
    for the decoding client the (dewar, seq) of every reading, and why it stopped."""

    times: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    keys: list[list[tuple[str, int]]] | None = None
    ended: str = ""

    @property
    def readings(self) -> int:
        return sum(self.counts)


@dataclass
class _Sample:
    at: float
    stored: float
    dropped: float
    clients: float


@dataclass
class _Run:
    clients: int
    stalled: int
    rate: float = 0.0
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    idle_rss_mib: float = 0.0
    service_cores: float = 0.0
    client_cpu_s: float = 0.0
    received: list[_Received] = field(default_factory=list)
    lags_ms: list[float] = field(default_factory=list)
    t0: float = 0.0  # when publishing began (Unix time)
    drops: list[tuple[float, float]] = field(default_factory=list)  # (s after t0, stored then)
    disconnects: list[float] = field(default_factory=list)  # s after t0, for any reason
    stalled_held: int = 0
    stalled_bytes: list[int] = field(default_factory=list)
    events: int = 0


# --- the reading clients (child processes) -------------------------------------------------


async def _read(
    ws: aiohttp.ClientWebSocketResponse, decode: bool, expected: int, stop: EventType
) -> _Received:
    got = _Received(keys=[] if decode else None)
    decoder = msgspec.json.Decoder(_Event)
    total = idle = 0
    while total < expected:
        try:
            message = await ws.receive(timeout=1.0)
        except TimeoutError:
            if stop.is_set():
                idle += 1
                if idle >= 5:
                    got.ended = "nothing more arrived"
                    break
            continue
        now = time.time()
        if message.type != aiohttp.WSMsgType.TEXT:
            got.ended = f"closed by the service ({message.type.name})"
            break
        data: str = message.data
        if not data.startswith('{"type":"readings"'):
            continue
        count = data.count('"dewar_id"')
        got.times.append(now)
        got.counts.append(count)
        total += count
        if got.keys is not None:
            got.keys.append([(k.dewar_id, k.seq) for k in decoder.decode(data).data])
    return got


async def _readers_main(
    url: str, count: int, decode_first: bool, expected: int, ready: Queue[int], stop: EventType
) -> list[_Received]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        sockets = [await session.ws_connect(url, max_msg_size=0) for _ in range(count)]
        for ws in sockets:
            hello = await ws.receive(timeout=10)
            assert hello.type == aiohttp.WSMsgType.TEXT and '"hello"' in hello.data, hello
        ready.put(count)
        results = await asyncio.gather(
            *(_read(ws, decode_first and i == 0, expected, stop) for i, ws in enumerate(sockets))
        )
        for ws in sockets:
            await ws.close()
        return list(results)


def _readers(
    url: str,
    count: int,
    decode_first: bool,
    expected: int,
    ready: Queue[int],
    stop: EventType,
    out: Queue[tuple[float, list[_Received]]],
) -> None:
    """Child process: `count` clients in one event loop; sends back (CPU seconds, results)."""
    results = asyncio.run(_readers_main(url, count, decode_first, expected, ready, stop))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out.put((usage.ru_utime + usage.ru_stime, results))


# --- the stalled clients (raw sockets in this process) --------------------------------------


def _stalled_client(port: int, path: str, rcvbuf: int) -> socket.socket:
    """A WebSocket handshake on a raw socket; the caller then never reads it. `rcvbuf` fixes
    its receive buffer (0: the kernel's, which grows to net.ipv4.tcp_rmem's maximum)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)  # byte by byte: leave every frame after the headers unread
        if not chunk:
            raise SystemExit("the service closed a stalled client during its handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise SystemExit(f"handshake refused: {head.splitlines()[0]!r}")
    return sock


def _unread_bytes(sock: socket.socket) -> int:
    """What the kernel holds for a socket nobody reads (FIONREAD), without reading it."""
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return buf[0]


# --- the service's side ---------------------------------------------------------------------


def _metrics(base: str) -> _Sample:
    wanted = {
        "coldchain_ingest_readings_stored_total": 0.0,
        "coldchain_live_dropped_clients_total": 0.0,
        "coldchain_live_clients": 0.0,
    }
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:  # noqa: S310
        for line in response.read().decode().splitlines():
            name, _, value = line.partition(" ")
            if name in wanted:
                wanted[name] = float(value)
    return _Sample(
        time.time(),
        wanted["coldchain_ingest_readings_stored_total"],
        wanted["coldchain_live_dropped_clients_total"],
        wanted["coldchain_live_clients"],
    )


async def _token(database_url: str) -> str:
    store = await Store.open(database_url, max_size=1)
    try:
        await store.migrate()
        token = new_token()
        await store.create_token(
            "bench live fan-out", Role.VIEWER, token_hash(token), None, "bench"
        )
        return token
    finally:
        await store.close()


async def _arrivals(database_url: str) -> dict[tuple[str, int], float]:
    """Each stored reading's arrival at the service (received_at), as a Unix time."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT dewar_id, seq, received_at FROM readings")
    finally:
        await conn.close()
    return {(r["dewar_id"], r["seq"]): r["received_at"].timestamp() for r in rows}


class _Poller(threading.Thread):
    """The service's stored, dropped and connected counts every POLL_S, until stopped."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.samples: list[_Sample] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.samples.append(_metrics(self.base))
            self.halt.wait(POLL_S)

    def latest(self) -> _Sample:
        return self.samples[-1] if self.samples else _Sample(0.0, 0.0, 0.0, 0.0)


# --- one run --------------------------------------------------------------------------------


def _start_readers(
    ctx: ForkContext, url: str, clients: int, processes: int, expected: int
) -> tuple[list[BaseProcess], Queue[tuple[float, list[_Received]]], EventType]:
    ready: Queue[int] = ctx.Queue()
    out: Queue[tuple[float, list[_Received]]] = ctx.Queue()
    stop = ctx.Event()
    shares = [
        clients // processes + (1 if p < clients % processes else 0) for p in range(processes)
    ]
    children: list[BaseProcess] = []
    for p, share in enumerate(s for s in shares if s):
        child = ctx.Process(
            target=_readers, args=(url, share, p == 0, expected, ready, stop, out), daemon=True
        )
        child.start()
        children.append(child)
    connected = 0
    while connected < clients:
        connected += ready.get(timeout=120)
    return children, out, stop


def _lags_ms(received: list[_Received], arrivals: dict[tuple[str, int], float]) -> list[float]:
    """Arrival at the service -> frame received, in ms, for a sample of (client, reading)."""
    keys = next((r.keys for r in received if r.keys is not None), None)
    if keys is None:
        return []
    pairs = sum(r.readings for r in received)
    stride = max(1, math.ceil(pairs / LAG_SAMPLES))
    chunks = []
    for k, event in enumerate(keys):
        arrived = np.array([arrivals.get(key, math.nan) for key in event[::stride]])
        times = np.array([r.times[k] for r in received if k < len(r.times)])
        chunks.append((times[:, None] - arrived[None, :]).ravel())
    lags = np.concatenate(chunks) * 1000
    return [float(x) for x in lags[~np.isnan(lags)]]


def _one_run(
    broker: EmbeddedBroker,
    server_url: str,
    messages: list[tuple[str, bytes]],
    run: _Run,
    processes: int,
    rcvbuf: int,
    log: Path,
) -> None:
    database_url = asyncio.run(create_database(server_url))
    try:
        token = asyncio.run(_token(database_url))
        service, base = start_service(log, database_url=database_url, mqtt_url=broker.url)
        stalled: list[socket.socket] = []
        children: list[BaseProcess] = []
        try:
            path = f"/api/v1/live?token={token}"
            port = int(base.rsplit(":", 1)[1])
            ctx = multiprocessing.get_context("fork")
            if run.clients:
                children, out, stop = _start_readers(
                    ctx, f"ws://127.0.0.1:{port}{path}", run.clients, processes, len(messages)
                )
            stalled = [_stalled_client(port, path, rcvbuf) for _ in range(run.stalled)]
            deadline = time.monotonic() + 30
            while _metrics(base).clients < run.clients + run.stalled:
                if time.monotonic() > deadline:
                    raise SystemExit("the service did not see every client connect")
                time.sleep(0.1)
            run.idle_rss_mib = status_mib(service.pid, "VmRSS")
            poller = _Poller(base)
            poller.start()
            cpu0 = cpu_seconds(service.pid)
            publisher, t0 = publish(broker.port, messages)
            run.t0 = t0
            while poller.latest().stored < len(messages):
                time.sleep(0.01)
            t1 = poller.latest().at
            run.service_cores = (cpu_seconds(service.pid) - cpu0) / (time.time() - t0)
            run.seconds = t1 - t0
            run.rate = len(messages) / run.seconds
            publisher.join()
            readers_done = math.inf
            if run.clients:
                stop.set()
                for _ in children:
                    cpu, got = out.get(timeout=600)
                    run.client_cpu_s += cpu
                    run.received.extend(got)
                for child in children:
                    child.join(30)
                readers_done = max(r.times[-1] for r in run.received if r.times)
            time.sleep(0.5)  # a last drop counted after the final event
            poller.halt.set()
            poller.join()
            run.peak_rss_mib = status_mib(service.pid, "VmHWM")
            seen = 0.0
            connected = float(run.clients + run.stalled)
            for sample in poller.samples:
                while sample.dropped > seen:
                    seen += 1
                    run.drops.append((sample.at - t0, sample.stored))
                while sample.clients < connected and sample.at < readers_done:
                    connected -= 1
                    run.disconnects.append(sample.at - t0)
            # The reading clients have closed: whoever the service still holds is stalled.
            run.stalled_held = int(poller.latest().clients)
            run.stalled_bytes = [_unread_bytes(sock) for sock in stalled]
        finally:
            for sock in stalled:
                sock.close()
            for child in children:
                if child.is_alive():
                    child.kill()
            stop_service(service, log)
        if run.received:
            decoded = next(r for r in run.received if r.keys is not None)
            run.events = len(decoded.times)
            run.lags_ms = _lags_ms(run.received, asyncio.run(_arrivals(database_url)))
    finally:
        asyncio.run(drop_database(server_url, database_url))


# --- the report -----------------------------------------------------------------------------


def _p(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    return float(np.percentile(np.asarray(values), q))


def _events_by(run: _Run, after_t0: float) -> int:
    """Readings events the decoding client had received `after_t0` seconds into publishing."""
    decoded = next((r for r in run.received if r.keys is not None), None)
    if decoded is None:
        return 0
    return sum(1 for t in decoded.times if t - run.t0 <= after_t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--stalled", type=int, default=10)
    parser.add_argument("--readings", type=int, default=700_000)
    parser.add_argument("--dewars", type=int, default=2000)
    parser.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="processes the reading clients are spread over (one event loop each)",
    )
    parser.add_argument(
        "--stalled-rcvbuf",
        type=int,
        default=0,
        help="fix each stalled client's SO_RCVBUF to this many bytes (0: the kernel's default)",
    )
    args = parser.parse_args()
    if args.readings / args.dewars > MAX_PER_DEWAR:
        # make_messages spaces a dewar's readings a minute apart from six hours ago; later ones
        # would be from the future, and the service dead-letters those.
        raise SystemExit(f"at most {MAX_PER_DEWAR} readings per dewar: raise --dewars")

    servers = BenchServers("coldchain-bench-")
    work, server_url, broker = servers.work, servers.server_url, servers.broker
    messages = make_messages(args.readings, args.dewars)
    sizes = [len(p) for _, p in messages]
    print(
        f"{len(messages)} readings from {args.dewars} dewars, payload "
        f"{min(sizes)}-{max(sizes)} bytes (mean {sum(sizes) / len(sizes):.0f}); "
        f"{args.clients} reading clients in {args.client_processes} process(es), "
        f"{args.stalled} stalled"
    )
    runs = [_Run(0, 0), _Run(1, 0), _Run(args.clients, args.stalled)]
    try:
        for name, run in zip(("baseline", "one", "fanout"), runs, strict=True):
            _one_run(
                broker,
                server_url,
                messages,
                run,
                args.client_processes,
                args.stalled_rcvbuf,
                work / f"{name}.log",
            )
    finally:
        servers.close()

    base, one, fan = runs
    attached = fan.clients + fan.stalled
    for label, run in (("baseline", base), ("1 client", one), ("fan-out ", fan)):
        who = f"{run.clients} reading + {run.stalled} stalled" if run.clients else "no client"
        print(
            f"{label} {who}: {run.rate:,.0f} readings/s published -> committed "
            f"({run.seconds:.1f} s), service {run.service_cores:.2f} cores, "
            f"RSS {run.idle_rss_mib:.0f} MiB before publishing, peak {run.peak_rss_mib:.0f} MiB"
            + (f", clients' CPU {run.client_cpu_s:.1f} s" if run.clients else "")
        )
    print(f"ratio    fan-out / baseline readings/s = {fan.rate / base.rate:.2f}")
    counts = [r.readings for r in fan.received]
    cut = [r.ended for r in fan.received if r.ended.startswith("closed")]
    print(
        f"received each reading client: min {min(counts, default=0):,} / median "
        f"{statistics.median(counts) if counts else 0:,.0f} of {len(messages):,} readings "
        f"in {fan.events} events; {len(cut)} of {fan.clients} cut off by the service"
        + (f" ({cut[0]})" if cut else "")
    )
    print(
        f"lag      arrival at the service -> frame received: fan-out p50 "
        f"{_p(fan.lags_ms, 50):.0f} ms, p99 {_p(fan.lags_ms, 99):.0f} ms; 1 client p50 "
        f"{_p(one.lags_ms, 50):.0f} ms, p99 {_p(one.lags_ms, 99):.0f} ms; ratio p50 "
        f"{_p(fan.lags_ms, 50) / _p(one.lags_ms, 50):.2f}, "
        f"p99 {_p(fan.lags_ms, 99) / _p(one.lags_ms, 99):.2f}"
    )
    grown = fan.peak_rss_mib - base.peak_rss_mib
    print(
        f"memory   peak RSS {fan.peak_rss_mib:.0f} MiB with {attached} clients vs "
        f"{base.peak_rss_mib:.0f} MiB with none: +{grown:.0f} MiB, "
        f"{grown * 1024 / max(attached, 1):.0f} KiB per client"
    )
    if fan.stalled:
        when = (
            f", first {fan.drops[0][0]:.1f} s after publishing began (after "
            f"{_events_by(fan, fan.drops[0][0])} events, {fan.drops[0][1]:,.0f} readings "
            f"committed), last at {fan.drops[-1][0]:.1f} s"
            if fan.drops
            else ""
        )
        gone = (
            f"first at {fan.disconnects[0]:.1f} s, last at {fan.disconnects[-1]:.1f} s"
            if fan.disconnects
            else "none"
        )
        print(
            f"stalled  disconnected while the stream ran (any reason): {len(fan.disconnects)}, "
            f"{gone}; {len(fan.drops)} dropped for falling behind (service counter){when}"
        )
        print(
            f"stalled  still held by the service after the stream: {fan.stalled_held} of "
            f"{fan.stalled}; unread in each one's kernel buffer: median "
            f"{statistics.median(fan.stalled_bytes) / 2**20:.1f} MiB"
        )
    print(
        f"reproduce: .venv/bin/python -m bench.live_fanout --clients {args.clients} "
        f"--stalled {args.stalled} --readings {args.readings} --dewars {args.dewars} "
        f"--client-processes {args.client_processes} --stalled-rcvbuf {args.stalled_rcvbuf}  "
        f"({os.cpu_count()} cores, python "
        f"{sys.version.split()[0]})"
    )


if __name__ == "__main__":
    main()
