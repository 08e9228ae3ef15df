"""Telemetry queries and the excursion report on a shipment with a million readings.

What it does, in one run on this machine:
1. A fresh database; one cryo-vapor shipment whose dewar reported every second for 11.6 days
   (1,000,000 readings), beside 4,000,000 readings of 50 other dewars in the same table.
2. Times (median of --repeat runs) what the API does: the whole shipment in 5-minute
   min/max/mean buckets, computed in PostgreSQL (`GET .../telemetry?every=5m`); one hour of raw
   readings (`?from=&to=`); and the excursion report (`GET .../report`: readings out with COPY,
   figures with pandas) as JSON and as PDF.
3. Baseline, in the same run: the same buckets computed the straightforward way, by fetching the
   shipment's readings and grouping them in pandas. Prints the ratio.
4. Prints the query plan PostgreSQL chooses for the bucket query, with the parameters bound as
   the API binds them (the dewar-time index, not a scan of the table).

Run: .venv/bin/python -m bench.telemetry [--readings 1000000] [--repeat 5]
Database: COLDCHAIN_DATABASE_URL (a server where it may create a database), else embedded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pandas as pd

from bench.harness import create_database, drop_database
from coldchain import report
from coldchain.auth import Actor, Role
from coldchain.embedded import EmbeddedPostgres
from coldchain.shipments import EventType, Shipment, Status
from coldchain.store import Store
from routing import example_network

T = TypeVar("T")
OTHER_DEWARS = 50
OTHERS = 4  # the other dewars' readings, as a multiple of the shipment's
BUCKET = timedelta(minutes=5)


async def _fill(store: Store, dewar: str, count: int, start: datetime) -> None:
    """`count` readings of `dewar`, one a second from `start`, and as many of other dewars."""
    received = datetime.now(UTC)
    async with store._pool.acquire() as conn:
        for who, n in (
            (dewar, count),
            *((f"OTHER-{i:02d}", count // OTHER_DEWARS) for i in range(OTHER_DEWARS)),
        ):
            records = (
                (
                    who,
                    seq,
                    start + timedelta(seconds=seq),
                    received,
                    -190.0 + (seq % 600) / 100 + (40.0 if 500_000 <= seq < 500_300 else 0.0),
                    80.0 - seq / 20_000,
                    2.0,
                    0.1,
                    False,
                    90.0,
                )
                for seq in range(n)
            )
            await conn.copy_records_to_table(
                "readings",
                records=records,
                columns=[
                    "dewar_id",
                    "seq",
                    "ts",
                    "received_at",
                    "temp_c",
                    "ln2_level_pct",
                    "tilt_deg",
                    "shock_g",
                    "lid_open",
                    "battery_pct",
                ],
            )
        await conn.execute("ANALYZE readings")


async def _timed(repeat: int, work: Callable[[], Awaitable[T]]) -> tuple[float, T]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = await work()
        times.append(time.perf_counter() - started)
    assert result is not None
    return statistics.median(times) * 1000, result


async def _run(database_url: str, count: int, repeat: int) -> None:
    dewar = "BENCH-MILLION"
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=count + 3600)
    store = await Store.open(database_url)
    await store.migrate()
    await store.import_sites(list(example_network().sites.values()), "bench")
    actor = Actor(0, "bench", Role.ADMIN)
    created = start - timedelta(hours=1)
    await store.create_shipment(
        Shipment(
            f"SH-{dewar}",
            dewar,
            "cryo-vapor",
            "MFG-MPN",
            "TC-NKI",
            None,
            None,
            None,
            Status.CREATED,
            created,
            "bench",
            created,
            None,
        ),  # fmt: skip
        actor,
    )
    await store.record_event(
        f"SH-{dewar}", EventType.PACKED, start - timedelta(minutes=10), None, None, actor
    )
    try:
        began = time.perf_counter()
        await _fill(store, dewar, count, start)
        print(
            f"{count:,} readings of one shipment's dewar and {OTHERS * count:,} of {OTHER_DEWARS} "
            "others "
            f"loaded in {time.perf_counter() - began:.1f} s"
        )
        shipment = await store.shipment(f"SH-{dewar}")

        buckets_ms, buckets = await _timed(
            repeat, lambda: store.shipment_buckets(shipment, None, None, BUCKET, 10_000)
        )
        hour = start + timedelta(seconds=count // 2)
        raw_ms, raw = await _timed(
            repeat,
            lambda: store.shipment_readings(shipment, hour, hour + timedelta(hours=1), 10_001),
        )

        async def client_side() -> pd.DataFrame:
            async with store._pool.acquire() as conn:
                rows = await conn.fetch(
                    "SELECT ts, temp_c, ln2_level_pct FROM readings WHERE dewar_id = $1"
                    " AND ts >= $2 ORDER BY ts",
                    shipment.dewar_id,
                    shipment.starts_at,
                )
            frame = pd.DataFrame(rows, columns=["ts", "temp_c", "ln2"])
            grouped = frame.groupby(pd.Grouper(key="ts", freq="5min"))
            return grouped.agg(["min", "max", "mean"])

        baseline_ms, baseline = await _timed(max(1, repeat // 2), client_side)
        inputs_ms, inputs = await _timed(1, lambda: report.gather(store, shipment.id, "bench"))
        json_ms, rendered = await _timed(
            1, lambda: asyncio.to_thread(report.render, inputs, "json")
        )
        pdf_ms, pdf = await _timed(1, lambda: asyncio.to_thread(report.render, inputs, "pdf"))

        async with store._pool.acquire() as conn:
            plan = await conn.fetch(
                "EXPLAIN SELECT date_bin($4, ts, $2) AS start, count(*), min(temp_c),"
                " max(temp_c), avg(temp_c) FROM readings WHERE dewar_id = $1 AND ts >= $2"
                " AND ($3::timestamptz IS NULL OR ts < $3) GROUP BY 1 ORDER BY 1 LIMIT 10000",
                shipment.dewar_id,
                shipment.starts_at,
                None,
                BUCKET,
            )
            window_plan = await conn.fetch(
                "EXPLAIN SELECT * FROM readings WHERE dewar_id = $1 AND ts >= $2"
                " AND ($3::timestamptz IS NULL OR ts < $3) ORDER BY ts, seq LIMIT $4",
                shipment.dewar_id,
                hour,
                hour + timedelta(hours=1),
                10_001,
            )
    finally:
        await store.close()

    print(f"\n{'query':52} {'median ms':>10}")
    print(f"{'whole shipment in 5-min buckets (PostgreSQL)':52} {buckets_ms:10.1f}  "
          f"({len(buckets):,} buckets)")  # fmt: skip
    print(f"{'one hour of raw readings':52} {raw_ms:10.1f}  ({len(raw):,} readings)")
    print(f"{'baseline: fetch all, bucket in pandas':52} {baseline_ms:10.1f}  "
          f"({len(baseline):,} buckets)")  # fmt: skip
    print(f"{'report: readings out (COPY) and alarms, custody':52} {inputs_ms:10.1f}  "
          f"({len(inputs.readings_csv) / 1e6:.0f} MB of CSV)")  # fmt: skip
    print(f"{'report: figures and JSON':52} {json_ms:10.1f}  ({len(rendered.body):,} bytes)")
    print(f"{'report: figures and PDF':52} {pdf_ms:10.1f}  ({len(pdf.body):,} bytes)")
    print(f"\nbuckets in PostgreSQL vs baseline: {baseline_ms / buckets_ms:.1f}x faster")
    print("plan of the bucket query (the whole shipment: a fifth of this table, so PostgreSQL")
    print("may rightly scan it; in a fleet's table a shipment is a far smaller share):")
    for row in plan:
        print(f"  {row[0]}")
    print("plan of the one-hour window:")
    for row in window_plan:
        print(f"  {row[0]}")
    print(
        f"reproduce: .venv/bin/python -m bench.telemetry --readings {count} --repeat {repeat}"
        f"  ({os.cpu_count()} cores, python {sys.version.split()[0]})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--readings", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="coldchain-telemetry-"))
    embedded: EmbeddedPostgres | None = None
    server_url = os.environ.get("COLDCHAIN_DATABASE_URL")
    if not server_url:
        embedded = EmbeddedPostgres(work / "pg")
        server_url = embedded.start()
    database_url = asyncio.run(create_database(server_url))
    try:
        asyncio.run(_run(database_url, args.readings, args.repeat))
    finally:
        asyncio.run(drop_database(server_url, database_url))
        if embedded is not None:
            embedded.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
