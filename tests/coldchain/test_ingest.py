"""The ingest end to end: MQTT publish -> the running service -> rows in PostgreSQL, against a
real broker and a real database."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import asyncpg
import pytest

from coldchain.errors import Unstorable
from coldchain.ingest import Ingest
from coldchain.metrics import Registry
from coldchain.store import IncomingReading, Store
from sensors import Reading, encode_batch, encode_reading, status_topic, telemetry_topic
from tests.support import eventually, make_token, publish_all, running_service, service_settings

pytestmark = [pytest.mark.postgres, pytest.mark.mqtt]


async def count_rows(database_url: str, sql: str, *args: object) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        value: int = await conn.fetchval(sql, *args)
        return value
    finally:
        await conn.close()


async def metric(base: str, name: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"metric {name} not exposed")


def readings(
    n: int, *, start: datetime, step: timedelta = timedelta(minutes=1), first_seq: int = 0
) -> list[Reading]:
    return [
        Reading(
            seq=first_seq + i,
            ts=start + i * step,
            temp_c=-190.0 + (i % 7) / 10,
            ln2_level_pct=90 - i / 100,
        )
        for i in range(n)
    ]


async def test_readings_are_stored_once_even_when_delivered_twice(
    database_url: str, mqtt_url: str, unique: str
) -> None:
    dewar = f"DW-{unique}"
    now = datetime.now(UTC).replace(microsecond=0)
    batch = readings(200, start=now - timedelta(hours=4))
    settings = service_settings(database_url, mqtt_url, f"svc-{unique}")
    async with running_service(settings) as base:
        messages = [(telemetry_topic(dewar), encode_reading(r)) for r in batch]
        publish_all(mqtt_url, messages, client_id=f"pub-{unique}")
        # The same readings again, as a device that never saw its PUBACKs would resend them.
        publish_all(mqtt_url, messages[:50], client_id=f"pub-{unique}")
        # Other clients may share the broker, so the counters are lower bounds here.
        await eventually(
            lambda: metric(base, "coldchain_ingest_readings_duplicate_total"), lambda v: v >= 50
        )
        assert await metric(base, "coldchain_ingest_readings_stored_total") >= 200
    stored = await count_rows(
        database_url, "SELECT count(*) FROM readings WHERE dewar_id = $1", dewar
    )
    assert stored == 200
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow("SELECT * FROM readings WHERE dewar_id = $1 AND seq = 17", dewar)
    finally:
        await conn.close()
    assert row is not None
    assert row["ts"] == batch[17].ts and row["temp_c"] == pytest.approx(batch[17].temp_c)
    assert row["received_at"] > row["ts"]


async def test_bad_messages_are_dead_lettered_and_their_neighbours_stored(
    database_url: str, mqtt_url: str, unique: str
) -> None:
    dewar = f"DW-{unique}"
    now = datetime.now(UTC)
    good = readings(3, start=now - timedelta(minutes=5))
    mixed_batch = (
        b"["
        + encode_reading(good[1])
        + b',{"seq": 99, "temp_c": -190}, '
        + encode_reading(good[2])
        + b"]"
    )
    messages = [
        (telemetry_topic(dewar), encode_reading(good[0])),
        (telemetry_topic(dewar), b"this is not json"),
        (telemetry_topic(dewar), mixed_batch),
        (telemetry_topic("bad id!"), encode_reading(good[0])),
        (
            telemetry_topic(dewar),
            json.dumps({"seq": 5, "ts": now.isoformat(), "temp_c": -190, "lat": 50.9}).encode(),
        ),
        (status_topic(dewar), json.dumps({"state": "sleeping", "ts": now.isoformat()}).encode()),
    ]
    settings = service_settings(database_url, mqtt_url, f"svc-{unique}")
    async with running_service(settings) as base:
        publish_all(mqtt_url, messages, client_id=f"pub-{unique}")
        await eventually(
            lambda: metric(base, "coldchain_ingest_dead_letters_total"), lambda v: v >= 5
        )
        assert await metric(base, "coldchain_ingest_readings_stored_total") >= 3
        token = await make_token(database_url)
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session,
            session.get(f"{base}/api/v1/dead-letters") as response,
        ):
            assert response.status == 200
            body = await response.json()
    assert (
        await count_rows(database_url, "SELECT count(*) FROM readings WHERE dewar_id = $1", dewar)
        == 3
    )
    mine = [i for i in body["items"] if dewar in i["topic"] or "bad id!" in i["topic"]]
    assert len(mine) == 5
    items = {(i["topic"], i["item_index"]): i for i in mine}
    assert items[(telemetry_topic(dewar), None)]["payload"] in (
        "this is not json",
        messages[4][1].decode(),
    )
    reasons = sorted(i["reason"] for i in mine)
    assert any(r.startswith("not valid JSON") for r in reasons)
    assert any("reading 1: missing required field `ts`" in r for r in reasons)
    assert any(r.startswith("bad topic") for r in reasons)
    assert any("lat and lon come together" in r for r in reasons)
    assert any("bad status state 'sleeping'" in r for r in reasons)
    in_batch = items[(telemetry_topic(dewar), 1)]
    assert json.loads(in_batch["payload"]) == {"seq": 99, "temp_c": -190}


async def test_a_backlog_that_arrives_late_and_out_of_order_is_kept_with_device_times(
    database_url: str, mqtt_url: str, unique: str
) -> None:
    """Fault 4: a device offline for an hour sends its backlog late, in shuffled batches,
    after newer live readings; nothing is dropped as old."""
    dewar = f"DW-{unique}"
    now = datetime.now(UTC).replace(microsecond=0)
    offline_from = now - timedelta(hours=1, minutes=5)
    backlog = readings(3600, start=offline_from, step=timedelta(seconds=1), first_seq=100)
    live = readings(5, start=now - timedelta(minutes=1), first_seq=100 + len(backlog))
    before = readings(100, start=offline_from - timedelta(minutes=100))
    batches = [backlog[i : i + 1000] for i in range(0, len(backlog), 1000)]
    random.Random(7).shuffle(batches)
    messages = [(telemetry_topic(dewar), encode_reading(r)) for r in before + live]
    messages += [(telemetry_topic(dewar), encode_batch(list(reversed(b)))) for b in batches]
    settings = service_settings(database_url, mqtt_url, f"svc-{unique}")
    async with running_service(settings):
        publish_all(mqtt_url, messages, client_id=f"pub-{unique}")

        async def stored() -> int:
            return await count_rows(
                database_url, "SELECT count(*) FROM readings WHERE dewar_id = $1", dewar
            )

        await eventually(stored, lambda n: n >= 3705)
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT seq, ts FROM readings WHERE dewar_id = $1 ORDER BY ts", dewar
        )
        dead = await conn.fetchval("SELECT count(*) FROM dead_letters WHERE dewar_id = $1", dewar)
    finally:
        await conn.close()
    assert dead == 0
    assert [r["seq"] for r in rows] == list(range(3705))
    expected = {r.seq: r.ts for r in before + backlog + live}
    assert all(r["ts"] == expected[r["seq"]] for r in rows)


async def test_device_status_is_recorded(database_url: str, mqtt_url: str, unique: str) -> None:
    dewar = f"DW-{unique}"
    at = datetime.now(UTC).replace(microsecond=0)
    settings = service_settings(database_url, mqtt_url, f"svc-{unique}")
    async with running_service(settings):
        publish_all(
            mqtt_url,
            [
                (
                    status_topic(dewar),
                    json.dumps({"state": "offline", "ts": at.isoformat()}).encode(),
                )
            ],
            client_id=f"pub-{unique}",
        )

        async def status() -> str | None:
            conn = await asyncpg.connect(database_url)
            try:
                value: str | None = await conn.fetchval(
                    "SELECT status FROM dewars WHERE id = $1", dewar
                )
                return value
            finally:
                await conn.close()

        await eventually(status, lambda s: s == "offline")


async def test_readiness_says_not_ready_while_the_broker_is_unreachable(
    database_url: str, unique: str
) -> None:
    from coldchain.embedded import free_port

    nowhere = f"mqtt://127.0.0.1:{free_port()}"
    settings = service_settings(database_url, nowhere, f"svc-{unique}")
    from aiohttp import web

    from coldchain.app import create_app

    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    await web.TCPSite(runner, settings.http_host, settings.http_port).start()
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://{settings.http_host}:{settings.http_port}"
            async with session.get(f"{url}/healthz") as response:
                assert response.status == 200
            async with session.get(f"{url}/readyz") as response:
                assert response.status == 503
                body = await response.json()
    finally:
        await runner.cleanup()
    assert body["ready"] is False
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["mqtt"].startswith("unavailable")


async def dead_letters_of(base: str, database_url: str, dewar: str) -> list[dict[str, object]]:
    token = await make_token(database_url)
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as session,
        session.get(f"{base}/api/v1/dead-letters", params={"dewar_id": dewar}) as response,
    ):
        assert response.status == 200
        body = await response.json()
    items: list[dict[str, object]] = body["items"]
    return items


async def test_json_nested_too_deeply_is_dead_lettered_and_ingest_goes_on(
    database_url: str, mqtt_url: str, unique: str
) -> None:
    """Thousands of `[` used to raise RecursionError in the parser: the message was never
    acknowledged nor dead-lettered, and held an in-flight slot for good."""
    dewar = f"DW-{unique}"
    now = datetime.now(UTC).replace(microsecond=0)
    good = readings(4, start=now - timedelta(minutes=5))
    deep = b"[" * 4000 + b"]" * 4000
    deep_temp = b'{"seq": 90, "ts": "' + now.isoformat().encode() + b'", "temp_c": ' + deep + b"}"
    deep_extra = encode_reading(good[2])[:-1] + b', "probe": ' + deep + b"}"
    deep_status = (
        b'{"state": "online", "ts": "' + now.isoformat().encode() + b'", "x": ' + deep + b"}"
    )
    messages = [
        (telemetry_topic(dewar), encode_reading(good[0])),
        (telemetry_topic(dewar), deep_temp),
        (telemetry_topic(dewar), b"[" + encode_reading(good[1]) + b"," + deep_extra + b"]"),
        (status_topic(dewar), deep_status),
        (telemetry_topic(dewar), encode_batch(good[3:])),
    ]
    settings = service_settings(database_url, mqtt_url, f"svc-{unique}")
    async with running_service(settings) as base:
        publish_all(mqtt_url, messages, client_id=f"pub-{unique}")

        async def stored() -> int:
            return await count_rows(
                database_url, "SELECT count(*) FROM readings WHERE dewar_id = $1", dewar
            )

        await eventually(stored, lambda n: n >= 3)
        letters = await eventually(
            lambda: dead_letters_of(base, database_url, dewar), lambda d: len(d) >= 3
        )
    assert await stored() == 3
    by_topic = {(d["topic"], d["item_index"]): d for d in letters}
    assert len(letters) == 3 and all("JSON nested too deeply" in str(d["reason"]) for d in letters)
    assert by_topic[(telemetry_topic(dewar), None)]["payload"] == deep_temp.decode()
    assert by_topic[(telemetry_topic(dewar), 1)]["payload"] == deep_extra.decode()
    assert by_topic[(status_topic(dewar), None)]["payload"] == deep_status.decode()


async def test_a_reading_the_database_cannot_hold_spoils_only_itself_in_a_batch(
    database_url: str, mqtt_url: str, unique: str
) -> None:
    """A NUL in an unknown field (jsonb refuses it) or a year-1 `ts` (asyncpg cannot encode it)
    used to pass the schema and then fail the whole batch's write, dead-lettering its good
    readings with it."""
    dewar = f"DW-{unique}"
    now = datetime.now(UTC).replace(microsecond=0)
    good = readings(3, start=now - timedelta(minutes=5))
    nul = json.dumps({"seq": 50, "ts": now.isoformat(), "temp_c": -190, "note": "a\u0000b"})
    year_one = json.dumps({"seq": 51, "ts": "0001-01-01T00:00:00+01:00", "temp_c": -190})
    batch = b"[" + b",".join([encode_reading(good[0]), nul.encode(), year_one.encode()]) + b"]"
    fast_batch = b"[" + encode_reading(good[1]) + b"," + year_one.encode() + b"]"
    messages = [
        (telemetry_topic(dewar), batch),
        (telemetry_topic(dewar), fast_batch),
        (telemetry_topic(dewar), encode_reading(good[2])),
    ]
    settings = service_settings(database_url, mqtt_url, f"svc-{unique}")
    async with running_service(settings) as base:
        publish_all(mqtt_url, messages, client_id=f"pub-{unique}")

        async def stored() -> int:
            return await count_rows(
                database_url, "SELECT count(*) FROM readings WHERE dewar_id = $1", dewar
            )

        await eventually(stored, lambda n: n >= 3)
        letters = await eventually(
            lambda: dead_letters_of(base, database_url, dewar), lambda d: len(d) >= 3
        )
    assert await stored() == 3
    reasons = sorted((str(d["reason"]), d["item_index"]) for d in letters)
    assert reasons == [
        ("reading 1: field `note`: text may not contain NUL (\\u0000)", 1),
        (
            "reading 2: ts 0001-01-01T00:00:00+01:00 is before 2000-01-01T00:00:00Z: "
            "is the device clock set?",
            2,
        ),
        (
            "ts 0001-01-01T00:00:00+01:00 is before 2000-01-01T00:00:00Z: is the device clock set?",
            1,
        ),
    ]


async def readiness(base: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(f"{base}/readyz") as response:
        body: dict[str, Any] = await response.json()
        return response.status, body


async def test_a_database_that_refuses_writes_holds_every_reading_and_says_not_ready(
    database_url: str, mqtt_url: str, unique: str
) -> None:
    """PostgreSQL answering but refusing writes (read-only, as a standby after a failover; disk
    full and out of memory take the same path) used to be blamed on the messages: each became a
    dead letter, or, when even that write failed, was dropped unacknowledged, while /readyz
    did not say "not ready"."""
    dewar = f"DW-{unique}"
    now = datetime.now(UTC).replace(microsecond=0)
    batch = readings(300, start=now - timedelta(hours=1), step=timedelta(seconds=1))
    messages = [(telemetry_topic(dewar), encode_reading(r)) for r in batch[:200]]
    messages.append((telemetry_topic(dewar), encode_batch(batch[200:])))

    async def stored() -> int:
        return await count_rows(
            database_url, "SELECT count(*) FROM readings WHERE dewar_id = $1", dewar
        )

    async def dead() -> int:
        return await count_rows(database_url, "SELECT count(*) FROM dead_letters")

    # Opened before the switch, so this session stays read-write and can switch it back.
    admin = await asyncpg.connect(database_url)
    name = await admin.fetchval("SELECT current_database()")
    settings = service_settings(database_url, mqtt_url, f"svc-{unique}")
    try:
        async with running_service(settings) as base:
            publish_all(mqtt_url, messages[:100], client_id=f"pub-{unique}")
            await eventually(stored, lambda n: n >= 100)
            await admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            publish_all(mqtt_url, messages[100:], client_id=f"pub-{unique}")
            await eventually(lambda: readiness(base), lambda r: r[0] == 503)
            for _ in range(6):  # held, not blamed on the messages, for as long as it lasts
                status, body = await readiness(base)
                assert status == 503, body
                assert str(body["checks"]["database"]).startswith("unavailable: ")
                assert "PostgreSQL" in body["checks"]["database"]
                assert "read-only" in body["checks"]["database"]
                assert await dead() == 0
                await asyncio.sleep(0.5)
            assert await stored() == 100
            await admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
            await eventually(stored, lambda n: n >= len(batch))
            await eventually(lambda: readiness(base), lambda r: r[0] == 200)
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" RESET default_transaction_read_only')
        await admin.close()
    conn = await asyncpg.connect(database_url)
    try:
        seqs = [r["seq"] for r in await conn.fetch("SELECT seq FROM readings ORDER BY seq")]
    finally:
        await conn.close()
    assert seqs == list(range(len(batch)))
    assert await dead() == 0


async def test_a_reading_the_database_refuses_is_dead_lettered_alone(
    database_url: str, mqtt_url: str, unique: str
) -> None:
    """An error about the data itself (here a CHECK constraint the schema does not know) still
    dead-letters the message that carries it, and only that one."""
    dewar = f"DW-{unique}"
    now = datetime.now(UTC).replace(microsecond=0)
    good = readings(3, start=now - timedelta(minutes=5))
    refused = Reading(seq=7, ts=now - timedelta(minutes=1), temp_c=-123.25)
    settings = service_settings(database_url, mqtt_url, f"svc-{unique}")
    async with running_service(settings) as base:
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                "ALTER TABLE readings ADD CONSTRAINT no_test_value CHECK (temp_c <> -123.25)"
            )
        finally:
            await conn.close()
        messages = [(telemetry_topic(dewar), encode_reading(r)) for r in good[:2]]
        messages.append((telemetry_topic(dewar), encode_reading(refused)))
        messages.append((telemetry_topic(dewar), encode_reading(good[2])))
        publish_all(mqtt_url, messages, client_id=f"pub-{unique}")
        letters = await eventually(
            lambda: dead_letters_of(base, database_url, dewar), lambda d: len(d) >= 1
        )
        await eventually(
            lambda: count_rows(
                database_url, "SELECT count(*) FROM readings WHERE dewar_id = $1", dewar
            ),
            lambda n: n >= 3,
        )
        status, _ = await readiness(base)
    assert status == 200
    assert (
        await count_rows(database_url, "SELECT count(*) FROM readings WHERE dewar_id = $1", dewar)
        == 3
    )
    assert len(letters) == 1
    assert "CheckViolationError" in str(letters[0]["reason"])
    assert letters[0]["payload"] == encode_reading(refused).decode()


class _RecordingLink:
    """What the ingest tells the broker link, in order."""

    def __init__(self) -> None:
        self.told: list[object] = []

    def acknowledge(self, packet_ids: list[int]) -> None:
        self.told.append(("acknowledge", packet_ids))

    def pause_reading(self) -> None:
        self.told.append("pause")

    def resume_reading(self) -> None:
        self.told.append("resume")


async def test_reads_pause_at_the_outstanding_limit_and_resume_once_it_is_committed(
    store: Store, unique: str
) -> None:
    ingest = Ingest(store, Registry(), batch_size=1000, flush_interval_s=0.05, max_outstanding=4)
    link = _RecordingLink()
    ingest.attach(link)
    topic = telemetry_topic(f"DW-{unique}")
    now = datetime.now(UTC).replace(microsecond=0)
    payloads = [encode_reading(r) for r in readings(5, start=now - timedelta(hours=1))]
    for packet_id, payload in enumerate(payloads[:3], start=1):
        ingest.handle(topic, payload, packet_id)
    assert (ingest.outstanding, link.told) == (3, [])
    ingest.handle(topic, payloads[3], 4)
    assert (ingest.outstanding, link.told) == (4, ["pause"])
    writer = asyncio.create_task(ingest.run_writer())
    try:
        await eventually(lambda: asyncio.sleep(0, link.told), lambda told: "resume" in told)
        assert link.told == ["pause", ("acknowledge", [1, 2, 3, 4]), "resume"]
        assert ingest.outstanding == 0
        # Below the limit again: one more message is taken without pausing.
        ingest.handle(topic, payloads[4], 5)
        await eventually(lambda: asyncio.sleep(0, link.told), lambda told: len(told) == 4)
        assert link.told[3] == ("acknowledge", [5])
        assert ingest.outstanding == 0
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer


async def test_instances_sharing_a_group_store_every_reading_once_between_them(
    database_url: str, mqtt_url: str, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    group = f"g{unique}"
    first, second = (
        service_settings(database_url, mqtt_url, f"{name}-{unique}", mqtt_shared_group=group)
        for name in ("a", "b")
    )
    start = datetime.now(UTC) - timedelta(hours=3)
    dewars = [f"DW-{unique}-{i}" for i in range(4)]
    messages = [
        (telemetry_topic(d), encode_reading(r)) for d in dewars for r in readings(100, start=start)
    ]
    with caplog.at_level(logging.WARNING, logger="coldchain.app"):
        async with running_service(first) as a, running_service(second) as b:
            publish_all(mqtt_url, messages, client_id=f"pub-{unique}")

            async def stored() -> int:
                return await count_rows(
                    database_url, "SELECT count(*) FROM readings WHERE dewar_id = ANY($1)", dewars
                )

            await eventually(stored, lambda n: n == len(messages))
            received = [await metric(u, "coldchain_ingest_readings_received_total") for u in (a, b)]
            taken = [await metric(u, "coldchain_ingest_readings_stored_total") for u in (a, b)]
    # The broker dealt the stream between the two (neither got all of it, nor any twice), and
    # each reading was stored by the one that got it.
    assert all(n > 0 for n in received) and sum(received) == len(messages), received
    assert taken == received
    assert await stored() == len(messages)
    assert "this instance's rules see only the readings it takes" in caplog.text


async def test_times_are_stored_to_the_microsecond_whatever_the_offset(
    store: Store, database_url: str, unique: str
) -> None:
    """The COPY carries times as microseconds since the epoch; what is stored is the same
    instant as sent, and each read's readings share the time they were received."""
    ingest = Ingest(store, Registry(), batch_size=1000, flush_interval_s=0.01)
    ingest.attach(_RecordingLink())
    topic = telemetry_topic(f"DW-{unique}")
    sent = {
        1: "2026-12-03T11:59:59.123457+02:00",
        2: "2026-12-03T09:59:59.999999Z",
        3: "2001-02-03T04:05:06.000001-05:30",
        4: "2026-12-03T10:00:00Z",
    }
    payloads = [
        b'{"seq":%d,"ts":"%s","temp_c":-190.0}' % (s, ts.encode()) for s, ts in sent.items()
    ]
    before = datetime.now(UTC)
    ingest.handle_many([(topic, payload, n) for n, payload in enumerate(payloads[:3], 1)])
    await asyncio.sleep(0.002)
    ingest.handle(topic, payloads[3], 4)
    after = datetime.now(UTC)
    writer = asyncio.create_task(ingest.run_writer())
    try:
        await eventually(lambda: asyncio.sleep(0, ingest.outstanding), lambda n: n == 0)
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT seq, ts, received_at FROM readings WHERE dewar_id = $1 ORDER BY seq",
            f"DW-{unique}",
        )
    finally:
        await conn.close()
    assert [(r["seq"], r["ts"]) for r in rows] == [
        (s, datetime.fromisoformat(ts)) for s, ts in sent.items()
    ]
    received = [r["received_at"] for r in rows]
    assert received[0] == received[1] == received[2] < received[3]
    assert before <= received[0] and received[3] <= after


async def test_every_dewar_that_reported_has_its_row_also_after_a_batch_was_refused(
    store: Store, database_url: str, unique: str
) -> None:
    """A store inserts the rows only of dewars it has not seen stored, and learns a dewar only
    once its batch commits: a batch PostgreSQL refused leaves its dewars to the next one."""
    at = datetime.now(UTC)
    first, second = f"DW-{unique}-A", f"DW-{unique}-B"

    def reading(dewar: str, seq: int, extra: dict[str, Any] | None = None) -> IncomingReading:
        return IncomingReading(dewar, Reading(seq=seq, ts=at, temp_c=-190.0, extra=extra), at)

    await store.write_batch([reading(first, 1)], [])
    with pytest.raises(Unstorable):
        # jsonb cannot hold a NUL: the whole batch is rolled back, the second dewar's row too.
        await store.write_batch([reading(first, 2), reading(second, 1, {"note": "\x00"})], [])
    await store.write_batch([reading(first, 3), reading(second, 2)], [])
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT id FROM dewars WHERE id = ANY($1) ORDER BY id", [first, second]
        )
        stored = await conn.fetchval(
            "SELECT count(*) FROM readings WHERE dewar_id = ANY($1)", [first, second]
        )
    finally:
        await conn.close()
    assert [r["id"] for r in rows] == [first, second]
    assert stored == 3
