"""The HTTP API against the real service and PostgreSQL: auth on every endpoint, shipments and
custody, telemetry windows, profiles, sites, the audit trail, and hostile input."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import aiohttp
import asyncpg
import pytest

from coldchain.api import permission_of
from coldchain.app import GC_THRESHOLDS, create_app, tune_gc
from coldchain.auth import ROLE_PERMISSIONS, Proxies, Role, new_token, token_hash
from coldchain.errors import ConfigError
from coldchain.excursions import Ln2Fit, RuleState, encode_state
from coldchain.openapi import OPERATIONS, document
from coldchain.profiles import Severity
from coldchain.settings import Settings
from coldchain.store import IncomingReading, Store, Transition
from routing import example_network
from sensors import Reading
from tests.support import running_service, service_settings

pytestmark = [pytest.mark.postgres, pytest.mark.mqtt]

ORIGIN, DESTINATION = "MFG-MPN", "TC-NKI"


@dataclass
class Api:
    base: str
    store: Store
    database_url: str
    tokens: dict[str, str]  # role (or "revoked", "expired") -> token
    session: aiohttp.ClientSession

    async def call(
        self,
        method: str,
        path: str,
        *,
        as_: str | None = "admin",
        body: object = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        sent = dict(headers or {})
        if as_ is not None:
            sent["Authorization"] = f"Bearer {self.tokens[as_]}"
        data: bytes | io.BytesIO | None = raw
        if raw is not None and len(raw) > 1024 * 1024:
            data = io.BytesIO(raw)  # large bodies are streamed, as aiohttp asks
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        async with self.session.request(
            method, self.base + path, data=data, headers=sent
        ) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text) if text else None
            except json.JSONDecodeError:
                return response.status, text


@pytest.fixture
async def api(database_url: str, mqtt_url: str, unique: str) -> AsyncIterator[Api]:
    store = await Store.open(database_url)
    await store.migrate()
    sites = example_network().sites
    await store.import_sites(list(sites.values()), "test")
    tokens = {}
    for role in Role:
        tokens[str(role)] = new_token()
        await store.create_token(f"{role}-user", role, token_hash(tokens[str(role)]), None, "test")
    tokens["revoked"] = new_token()
    revoked = await store.create_token(
        "gone", Role.ADMIN, token_hash(tokens["revoked"]), None, "test"
    )
    await store.revoke_token(revoked, "test")
    tokens["expired"] = new_token()
    await store.create_token(
        "old",
        Role.ADMIN,
        token_hash(tokens["expired"]),
        datetime.now(UTC) - timedelta(minutes=1),
        "test",
    )
    tokens["unknown"] = new_token()
    settings = service_settings(database_url, mqtt_url, f"svc-{unique}")
    async with running_service(settings) as base, aiohttp.ClientSession() as session:
        yield Api(base, store, database_url, tokens, session)
    await store.close()


def new_shipment(dewar: str = "DW-T1", **extra: Any) -> dict[str, object]:
    return {
        "dewar_id": dewar,
        "profile": "cryo-vapor",
        "origin": ORIGIN,
        "destination": DESTINATION,
        "deliver_by": (datetime.now(UTC) + timedelta(days=3)).isoformat(),
        **extra,
    }


# Auth -----------------------------------------------------------------------------------------


def _concrete(path: str) -> str:
    """The path with a value for each parameter (ids that do not exist)."""
    names = {"shipment_id": "SH-NONE", "name": "cryo-vapor"}
    return re.sub(r"\{(\w+)\}", lambda m: names.get(m[1], "999999"), path)


@pytest.mark.parametrize("op", OPERATIONS, ids=[f"{o.method} {o.path}" for o in OPERATIONS])
async def test_every_endpoint_checks_every_role_and_every_kind_of_bad_token(
    api: Api, op: Any
) -> None:
    path = _concrete(op.path)
    body: dict[str, object] | None = {} if op.body is not None else None
    for who in ("unknown", "revoked", "expired"):
        status, reply = await api.call(op.method, path, as_=who, body=body)
        assert status == 401, (who, reply)
        assert reply["error"]["code"] == "unauthorized"
    status, _ = await api.call(op.method, path, as_=None, body=body)
    assert status == 401
    status, _ = await api.call(
        op.method, path, as_=None, body=body, headers={"Authorization": "Basic YWxpY2U6c2VjcmV0"}
    )
    assert status == 401
    needed = permission_of(op.handler)
    for role in Role:
        status, reply = await api.call(op.method, path, as_=str(role), body=body)
        if needed in ROLE_PERMISSIONS[role]:
            assert status not in (401, 403), (role, reply)
        else:
            assert status == 403, (role, reply)
            assert needed in reply["error"]["message"]


async def test_every_route_of_the_application_is_documented(api: Api) -> None:
    app = create_app(service_settings(api.database_url, "mqtt://127.0.0.1:1", "x"))
    documented = {(o.method.upper(), o.path) for o in OPERATIONS}
    documented |= {("GET", p) for p in document()["paths"] if not p.startswith("/api/v1/")}
    documented.add(("GET", "/api/v1/openapi.json"))
    routes = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.method != "HEAD"
        and r.resource is not None
        # The dashboard's static files are not part of the API.
        and (
            r.resource.canonical.startswith("/api/")
            or r.resource.canonical in ("/healthz", "/readyz", "/metrics")
        )
    }
    assert routes == documented


async def test_metrics_sample_the_event_loop_lag_and_time_garbage_collections(
    api: Api,
) -> None:
    async def count(name: str) -> float:
        async with api.session.get(api.base + "/metrics") as response:
            text = await response.text()
        (line,) = (x for x in text.splitlines() if x.startswith(f"coldchain_{name}_count "))
        return float(line.split()[1])

    ticks, pauses = await count("event_loop_lag_seconds"), await count("gc_pause_seconds")
    gc.collect()
    await asyncio.sleep(0.3)  # six ticks of 50 ms
    assert await count("event_loop_lag_seconds") >= ticks + 3
    assert await count("gc_pause_seconds") >= pauses + 1


def test_a_serving_process_collects_garbage_far_less_often() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] >= 50 * before[0]
    finally:
        gc.set_threshold(*before)


async def test_repeated_failed_sign_ins_are_rate_limited(api: Api) -> None:
    statuses = [(await api.call("GET", "/api/v1/shipments", as_="unknown"))[0] for _ in range(25)]
    assert statuses[:20] == [401] * 20
    assert statuses[20:] == [429] * 5
    async with api.session.get(
        api.base + "/api/v1/shipments", headers={"Authorization": f"Bearer {api.tokens['admin']}"}
    ) as r:
        # The address is blocked for a while, also for a good token that has not signed in
        # before (see the NAT test below); it says when to retry.
        assert r.status == 429
        assert int(r.headers["Retry-After"]) > 0


async def test_a_blocked_address_still_lets_through_tokens_that_signed_in_before(
    api: Api,
) -> None:
    # Behind a NAT: an operator signed in, then another client at the same address fails 20
    # times. The operator goes on working; a token not seen working before waits out the block.
    assert (await api.call("GET", "/api/v1/shipments", as_="operator"))[0] == 200
    statuses = [(await api.call("GET", "/api/v1/shipments", as_="unknown"))[0] for _ in range(21)]
    assert statuses == [401] * 20 + [429]
    assert (await api.call("GET", "/api/v1/shipments", as_="operator"))[0] == 200
    assert (await api.call("GET", "/api/v1/shipments", as_="viewer"))[0] == 429
    assert (await api.call("GET", "/api/v1/shipments", as_=None))[0] == 429
    # Revoked while the block lasts: refused at once, and not let through again.
    operator = await api.store.actor_for(token_hash(api.tokens["operator"]))
    await api.store.revoke_token(operator.token_id, "test")
    assert (await api.call("GET", "/api/v1/shipments", as_="operator"))[0] == 401
    assert (await api.call("GET", "/api/v1/shipments", as_="operator"))[0] == 429


async def test_without_trusted_proxies_x_forwarded_for_is_ignored(api: Api) -> None:
    # A client that names a new address each time is still counted as the address it is.
    statuses = [
        (
            await api.call(
                "GET",
                "/api/v1/shipments",
                as_="unknown",
                headers={"X-Forwarded-For": f"203.0.113.{i}"},
            )
        )[0]
        for i in range(21)
    ]
    assert statuses == [401] * 20 + [429]


def test_trusted_proxies_come_from_the_environment_and_bad_ones_are_refused() -> None:
    env = {"COLDCHAIN_TRUSTED_PROXIES": " 10.0.0.1, 192.168.0.0/16,,::1 "}
    assert Settings.from_env(env).trusted_proxies == ("10.0.0.1/32", "192.168.0.0/16", "::1/128")
    assert Settings.from_env({}).trusted_proxies == ()
    with pytest.raises(ConfigError, match="COLDCHAIN_TRUSTED_PROXIES .*'10.0.0.300'"):
        Settings.from_env({"COLDCHAIN_TRUSTED_PROXIES": "10.0.0.1,10.0.0.300"})


def test_the_client_is_the_nearest_hop_that_is_not_a_trusted_proxy() -> None:
    proxies = Proxies(["10.0.0.0/8"])
    assert proxies.client("192.0.2.1", ["198.51.100.1"]) == "192.0.2.1"  # not via a proxy
    assert proxies.client("10.1.2.3", ["198.51.100.1"]) == "198.51.100.1"
    assert proxies.client("10.1.2.3", ["made-up, 198.51.100.1, 10.9.9.9"]) == "198.51.100.1"
    assert proxies.client("10.1.2.3", ["198.51.100.1", "10.0.0.6"]) == "198.51.100.1"
    assert proxies.client("10.1.2.3", ["10.0.0.5, 10.0.0.6"]) == "10.0.0.5"
    assert proxies.client("10.1.2.3", []) == "10.1.2.3"
    assert proxies.client("::ffff:10.1.2.3", ["198.51.100.1"]) == "198.51.100.1"
    assert proxies.client(None, ["198.51.100.1"]) == "unknown"
    assert Proxies().client("10.1.2.3", ["198.51.100.1"]) == "10.1.2.3"


async def test_behind_a_trusted_proxy_each_client_has_its_own_limit(
    api: Api, mqtt_url: str, unique: str
) -> None:
    settings = service_settings(
        api.database_url, mqtt_url, f"proxy-{unique}", trusted_proxies=("127.0.0.0/8",)
    )
    async with running_service(settings) as base:
        behind = Api(base, api.store, api.database_url, api.tokens, api.session)

        async def status(as_: str, forwarded_for: str) -> int:
            code, _ = await behind.call(
                "GET", "/api/v1/shipments", as_=as_, headers={"X-Forwarded-For": forwarded_for}
            )
            return code

        assert [await status("unknown", "203.0.113.7") for _ in range(21)] == [401] * 20 + [429]
        # Another client behind the same proxy signs in as usual...
        assert await status("admin", "198.51.100.9") == 200
        # ...and the blocked one cannot get out by writing another address in front of its own,
        # nor by passing through a second trusted proxy (with a token not seen working yet).
        assert await status("planner", "198.51.100.9, 203.0.113.7") == 429
        assert await status("planner", "203.0.113.7, 127.0.0.2") == 429
        assert await status("planner", "198.51.100.9") == 200


async def test_a_revoked_token_stops_working_at_once(api: Api) -> None:
    status, made = await api.call("POST", "/api/v1/tokens", body={"name": "temp", "role": "viewer"})
    assert status == 201
    api.tokens["temp"] = made["token"]
    assert (await api.call("GET", "/api/v1/sites", as_="temp"))[0] == 200
    assert (await api.call("DELETE", f"/api/v1/tokens/{made['id']}"))[0] == 204
    status, reply = await api.call("GET", "/api/v1/sites", as_="temp")
    assert status == 401 and reply["error"]["message"] == "token revoked"
    _, listed = await api.call("GET", "/api/v1/tokens")
    assert all("token" not in t and "hash" not in t for t in listed["items"])


# Shipments and custody ------------------------------------------------------------------------


async def test_shipment_lifecycle_follows_custody_events(api: Api) -> None:
    status, created = await api.call(
        "POST",
        "/api/v1/shipments",
        as_="planner",
        body=new_shipment(chain_of_identity="DIN:W1234 26 123456"),
    )
    assert status == 201
    sid = created["id"]
    assert created["status"] == "created" and created["created_by"].startswith("planner-user")
    steps = [
        ("packed", "packed"),
        ("picked_up", "in_transit"),
        ("handoff", "in_transit"),
        ("customs_hold", "customs_hold"),
        ("customs_released", "in_transit"),
        ("delivered", "delivered"),
    ]
    at = datetime.now(UTC) - timedelta(hours=len(steps))
    for i, (event, expected) in enumerate(steps):
        status, reply = await api.call(
            "POST",
            f"/api/v1/shipments/{sid}/events",
            as_="operator",
            body={
                "type": event,
                "at": (at + timedelta(hours=i)).isoformat(),
                "location": "Newark",
                "note": f"step {i}",
            },
        )
        assert status == 201, reply
        assert reply["shipment"]["status"] == expected
        assert reply["event"]["actor"].startswith("operator-user")
    status, detail = await api.call("GET", f"/api/v1/shipments/{sid}", as_="viewer")
    assert status == 200
    assert [e["type"] for e in detail["events"]] == [e for e, _ in steps]
    assert detail["shipment"]["chain_of_identity"] == "DIN:W1234 26 123456"
    assert detail["shipment"]["ends_at"] is not None
    # Delivered is final: the dewar is free for a new shipment, this one takes no more events.
    status, reply = await api.call(
        "POST", f"/api/v1/shipments/{sid}/events", as_="operator", body={"type": "handoff"}
    )
    assert status == 409 and "delivered" in reply["error"]["message"]
    assert (await api.call("POST", "/api/v1/shipments", body=new_shipment()))[0] == 201


@pytest.mark.parametrize(
    ("events", "refused", "reason"),
    [
        (["packed"], "delivered", "must be picked up"),
        ([], "picked_up", "must be packed first"),
        (["packed", "picked_up", "customs_hold"], "delivered", "released by customs"),
        (["packed", "picked_up"], "customs_released", "only a shipment held by customs"),
        (["packed", "picked_up", "delivered"], "cancelled", "cannot be cancelled"),
    ],
)
async def test_events_that_make_no_sense_are_refused_with_a_reason(
    api: Api, events: list[str], refused: str, reason: str
) -> None:
    _, created = await api.call("POST", "/api/v1/shipments", body=new_shipment())
    for event in events:
        assert (
            await api.call(
                "POST", f"/api/v1/shipments/{created['id']}/events", body={"type": event}
            )
        )[0] == 201
    status, reply = await api.call(
        "POST", f"/api/v1/shipments/{created['id']}/events", body={"type": refused}
    )
    assert status == 409
    assert reason in reply["error"]["message"]


async def test_events_are_recorded_in_time_order(api: Api) -> None:
    _, created = await api.call("POST", "/api/v1/shipments", body=new_shipment())
    now = datetime.now(UTC)
    path = f"/api/v1/shipments/{created['id']}/events"
    assert (await api.call("POST", path, body={"type": "packed", "at": now.isoformat()}))[0] == 201
    status, reply = await api.call(
        "POST", path, body={"type": "picked_up", "at": (now - timedelta(minutes=5)).isoformat()}
    )
    assert status == 409 and "recorded in order" in reply["error"]["message"]
    status, reply = await api.call(
        "POST", path, body={"type": "picked_up", "at": (now + timedelta(hours=1)).isoformat()}
    )
    assert status == 400 and "future" in reply["error"]["message"]


async def test_a_dewar_travels_in_one_active_shipment_at_a_time(api: Api) -> None:
    status, first = await api.call("POST", "/api/v1/shipments", body=new_shipment("DW-X"))
    assert status == 201
    status, reply = await api.call("POST", "/api/v1/shipments", body=new_shipment("DW-X"))
    assert status == 409 and first["id"] in reply["error"]["message"]
    await api.call("POST", f"/api/v1/shipments/{first['id']}/events", body={"type": "cancelled"})
    assert (await api.call("POST", "/api/v1/shipments", body=new_shipment("DW-X")))[0] == 201


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"origin": "NOWHERE"}, "unknown origin site 'NOWHERE'"),
        ({"destination": "NOWHERE"}, "unknown destination site 'NOWHERE'"),
        ({"profile": "no-such-profile"}, "unknown profile 'no-such-profile'"),
        ({"destination": ORIGIN}, "origin and destination must be different"),
        ({"dewar_id": "has space"}, "dewar_id"),
        ({"deliver_by": "2026-12-01T10:00:00"}, "deliver_by"),
        ({"colour": "blue"}, "unknown field `colour`"),
    ],
)
async def test_a_shipment_that_cannot_exist_is_refused(
    api: Api, changes: dict[str, Any], reason: str
) -> None:
    status, reply = await api.call("POST", "/api/v1/shipments", body=new_shipment(**changes))
    assert status == 400
    assert reason in reply["error"]["message"]


async def test_shipments_are_listed_newest_first_filtered_and_paged(api: Api) -> None:
    ids = []
    for i in range(5):
        _, created = await api.call("POST", "/api/v1/shipments", body=new_shipment(f"DW-L{i}"))
        ids.append(created["id"])
    await api.call("POST", f"/api/v1/shipments/{ids[1]}/events", body={"type": "packed"})
    _, page = await api.call("GET", "/api/v1/shipments?limit=2", as_="viewer")
    seen = [s["id"] for s in page["items"]]
    while page.get("next"):
        _, page = await api.call("GET", page["next"], as_="viewer")
        seen += [s["id"] for s in page["items"]]
    assert seen == list(reversed(ids))
    _, packed = await api.call("GET", "/api/v1/shipments?status=packed", as_="viewer")
    assert [s["id"] for s in packed["items"]] == [ids[1]]
    status, reply = await api.call("GET", "/api/v1/shipments?status=lost", as_="viewer")
    assert status == 400 and "status must be one of" in reply["error"]["message"]


# Telemetry ------------------------------------------------------------------------------------


async def test_readings_belong_to_the_shipment_active_at_their_device_time(api: Api) -> None:
    dewar = "DW-TEL"
    _, created = await api.call("POST", "/api/v1/shipments", body=new_shipment(dewar))
    sid = created["id"]
    packed_at = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    await api.call(
        "POST",
        f"/api/v1/shipments/{sid}/events",
        body={"type": "packed", "at": packed_at.isoformat()},
    )
    start = packed_at - timedelta(minutes=30)
    temps = [-190.0 + (i % 10) for i in range(150)]  # one a minute from 30 min before pack-out
    readings = [
        IncomingReading(
            dewar,
            Reading(seq=i, ts=start + timedelta(minutes=i), temp_c=t, ln2_level_pct=90 - i / 10),
            datetime.now(UTC),
        )
        for i, t in enumerate(temps)
    ]
    await api.store.write_batch(readings, [])
    status, raw = await api.call("GET", f"/api/v1/shipments/{sid}/telemetry", as_="viewer")
    assert status == 200
    assert [r["seq"] for r in raw["readings"]] == list(range(30, 150))  # none before pack-out
    frm = (packed_at + timedelta(minutes=10)).isoformat().replace("+00:00", "Z")
    to = (packed_at + timedelta(minutes=40)).isoformat().replace("+00:00", "Z")
    _, window = await api.call("GET", f"/api/v1/shipments/{sid}/telemetry?from={frm}&to={to}")
    assert [r["seq"] for r in window["readings"]] == list(range(40, 70))
    _, buckets = await api.call("GET", f"/api/v1/shipments/{sid}/telemetry?every=5m")
    got = buckets["buckets"]
    assert len(got) == 24
    for b, k in zip(got, range(30, 150, 5), strict=True):
        chunk = temps[k : k + 5]
        assert b["count"] == 5
        assert (b["temp_c_min"], b["temp_c_max"]) == (min(chunk), max(chunk))
        assert b["temp_c_mean"] == pytest.approx(sum(chunk) / 5)
    _, limited = await api.call("GET", f"/api/v1/shipments/{sid}/telemetry?limit=7")
    assert len(limited["readings"]) == 7 and limited["truncated"] is True
    # The last reading and when it was seen show on the shipment.
    _, detail = await api.call("GET", f"/api/v1/shipments/{sid}")
    assert detail["last_reading"]["seq"] == 149 and detail["last_seen_s"] >= 0
    for bad in (
        "every=0m",
        "every=5 minutes",
        "from=yesterday",
        "from=2026-01-01T00:00:00",
        f"from={to}&to={frm}",
    ):
        status, reply = await api.call("GET", f"/api/v1/shipments/{sid}/telemetry?{bad}")
        assert status == 400, bad


async def test_the_bucketed_query_uses_the_dewar_time_index(api: Api) -> None:
    conn = await asyncpg.connect(api.database_url)
    try:
        # Enough rows of other dewars that a sequential scan would be the wrong plan.
        await conn.execute(
            "INSERT INTO readings (dewar_id, seq, ts, received_at, temp_c)"
            " SELECT 'DW-' || (g % 500), g, now() - g * interval '1 second', now(), -190"
            " FROM generate_series(1, 200000) g"
        )
        await conn.execute("ANALYZE readings")
        plan = await conn.fetchval(
            "EXPLAIN (FORMAT JSON) SELECT date_bin('5 minutes', ts, now()), min(temp_c)"
            " FROM readings WHERE dewar_id = 'DW-7' AND ts >= now() - interval '1 day'"
            " AND ts < now() GROUP BY 1"
        )
    finally:
        await conn.close()
    text = json.dumps(json.loads(plan) if isinstance(plan, str) else plan)
    assert "readings_dewar_ts" in text and "Seq Scan" not in text


# Profiles, sites, audit -----------------------------------------------------------------------


async def test_built_in_profiles_exist_and_admins_add_their_own(api: Api) -> None:
    _, listed = await api.call("GET", "/api/v1/profiles", as_="viewer")
    names = {p["profile"]["name"]: p for p in listed["items"]}
    assert {"cryo-vapor", "refrigerated", "ambient"} <= set(names)
    cryo = names["cryo-vapor"]["profile"]
    glass = next(limit for limit in cryo["limits"] if limit["rule"] == "temp_glass_transition")
    assert (glass["threshold"], glass["severity"], glass["delay_s"]) == (-135.0, "critical", 60)
    custom = dict(cryo, name="cryo-150-strict", description="label says -160 °C")
    custom["limits"] = [
        dict(limit, threshold=-160.0) if limit["rule"] == "temp_high" else limit
        for limit in cryo["limits"]
    ]
    status, _ = await api.call(
        "PUT", "/api/v1/profiles/cryo-150-strict", as_="planner", body=custom
    )
    assert status == 403
    status, stored = await api.call("PUT", "/api/v1/profiles/cryo-150-strict", body=custom)
    assert status == 201 and stored["built_in"] is False
    status, _ = await api.call("PUT", "/api/v1/profiles/cryo-150-strict", body=custom)
    assert status == 200
    duplicate = dict(custom, limits=[cryo["limits"][0], cryo["limits"][0]])
    status, reply = await api.call("PUT", "/api/v1/profiles/cryo-150-strict", body=duplicate)
    assert status == 400 and "own rule name" in reply["error"]["message"]
    status, reply = await api.call("PUT", "/api/v1/profiles/other", body=custom)
    assert status == 400 and "differs from the path" in reply["error"]["message"]
    # A shipment can use it at once.
    status, _ = await api.call(
        "POST", "/api/v1/shipments", body=new_shipment(profile="cryo-150-strict")
    )
    assert status == 201


async def test_a_profile_with_nul_in_its_text_is_refused_with_a_400(api: Api) -> None:
    """jsonb cannot hold NUL (SQLSTATE 22P05): that is the caller's input, not a 500."""
    _, listed = await api.call("GET", "/api/v1/profiles", as_="viewer")
    cryo = next(p["profile"] for p in listed["items"] if p["profile"]["name"] == "cryo-vapor")
    in_description = dict(cryo, name="with-nul", description="a\u0000b")
    in_message = dict(cryo, name="with-nul")
    in_message["limits"] = [dict(cryo["limits"][0], message="warm\u0000")] + cryo["limits"][1:]
    for body in (in_description, in_message):
        status, reply = await api.call("PUT", "/api/v1/profiles/with-nul", body=body)
        assert status == 400, reply
        assert reply["error"]["code"] == "bad_request" and "NUL" in reply["error"]["message"]
    _, listed = await api.call("GET", "/api/v1/profiles", as_="viewer")
    assert "with-nul" not in {p["profile"]["name"] for p in listed["items"]}


async def test_a_limit_outside_a_range_is_accepted_and_one_without_a_range_refused(
    api: Api,
) -> None:
    _, listed = await api.call("GET", "/api/v1/profiles", as_="viewer")
    fridge = next(p["profile"] for p in listed["items"] if p["profile"]["name"] == "refrigerated")
    budget = next(lim for lim in fridge["limits"] if lim["rule"] == "temp_out_of_range_budget")
    assert (budget["direction"], budget["low"], budget["threshold"]) == ("outside", 2.0, 8.0)
    outside = {
        "rule": "temp_out_of_label",
        "metric": "temp_c",
        "direction": "outside",
        "low": 3.0,
        "threshold": 7.0,
        "severity": "major",
        "delay_s": 300,
        "hysteresis": 0.5,
    }
    custom = dict(fridge, name="fridge-3-7", limits=[*fridge["limits"], outside])
    status, stored = await api.call("PUT", "/api/v1/profiles/fridge-3-7", body=custom)
    assert status == 201, stored
    assert stored["profile"]["limits"][-1] == dict(outside, budget_s=None, message="")
    for low, reason in ((7.0, "low (7) must be below threshold (7)"), (None, "needs low")):
        bad = dict(custom, limits=[*fridge["limits"], dict(outside, low=low)])
        status, reply = await api.call("PUT", "/api/v1/profiles/fridge-3-7", body=bad)
        assert status == 400, reply
        assert reply["error"]["code"] == "bad_request"
        assert "rule temp_out_of_label" in reply["error"]["message"]
        assert reason in reply["error"]["message"]
    _, kept = await api.call("GET", "/api/v1/profiles", as_="viewer")
    assert (
        next(p["profile"] for p in kept["items"] if p["profile"]["name"] == "fridge-3-7")
        == stored["profile"]
    )


async def test_sites_are_listed_and_filtered(api: Api) -> None:
    _, all_sites = await api.call("GET", "/api/v1/sites", as_="viewer")
    _, centres = await api.call("GET", "/api/v1/sites?kind=treatment_center", as_="viewer")
    assert len(all_sites["items"]) > len(centres["items"]) > 0
    assert all(s["kind"] == "treatment_center" for s in centres["items"])
    nki = next(s for s in all_sites["items"] if s["id"] == DESTINATION)
    assert nki["tz"] == "Europe/Amsterdam" and nki["country"] == "NL"


async def test_the_audit_trail_attributes_every_action_and_cannot_be_changed(api: Api) -> None:
    _, created = await api.call("POST", "/api/v1/shipments", as_="planner", body=new_shipment())
    await api.call(
        "POST",
        f"/api/v1/shipments/{created['id']}/events",
        as_="operator",
        body={"type": "packed", "note": "sealed"},
    )
    assert (await api.call("GET", "/api/v1/audit", as_="operator"))[0] == 403
    _, trail = await api.call("GET", f"/api/v1/audit?entity=shipment&entity_id={created['id']}")
    actions = [(e["action"], e["actor"].split(" ")[0]) for e in reversed(trail["items"])]
    assert actions == [("shipment.created", "planner-user"), ("custody.packed", "operator-user")]
    assert trail["items"][0]["detail"]["note"] == "sealed"
    conn = await asyncpg.connect(api.database_url)
    try:
        for sql in (
            "UPDATE audit_log SET actor = 'nobody'",
            "DELETE FROM audit_log",
            "TRUNCATE audit_log",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(sql)
        assert await conn.fetchval("SELECT count(*) FROM audit_log WHERE actor = 'nobody'") == 0
    finally:
        await conn.close()


# Hostile input --------------------------------------------------------------------------------

HOSTILE_IDS = [
    "'; DROP TABLE shipments; --",
    "SH-1' OR '1'='1",
    "\u202eSH-1",
    "SH\u00001",
    "🧊",
    "a" * 65,
    "../../etc/passwd",
    "SH%00",
    "<script>alert(1)</script>",
]


@pytest.mark.parametrize("bad", HOSTILE_IDS)
async def test_hostile_ids_get_a_4xx_and_are_stored_nowhere(api: Api, bad: str) -> None:
    status, reply = await api.call(
        "POST", "/api/v1/shipments", body=new_shipment(id=bad, dewar_id=bad)
    )
    assert status == 400, reply

    status, reply = await api.call("GET", f"/api/v1/shipments/{quote(bad, safe='')}")
    assert status in (400, 404)
    assert isinstance(reply, dict) and set(reply) == {"error"}
    status, reply = await api.call("GET", f"/api/v1/dead-letters?dewar_id={quote(bad)}")
    assert status in (200, 400)
    conn = await asyncpg.connect(api.database_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM shipments") == 0
        assert await conn.fetchval("SELECT to_regclass('shipments') IS NOT NULL")
    finally:
        await conn.close()


async def test_bodies_that_are_too_big_too_deep_or_not_json_are_refused(api: Api) -> None:
    status, reply = await api.call(
        "POST",
        "/api/v1/shipments",
        raw=b'{"note": "' + b"x" * (2 * 1024 * 1024) + b'"}',
        headers={"Content-Type": "application/json"},
    )
    assert status == 413 and reply["error"]["code"] == "payload_too_large"
    deep = b"[" * 100_000 + b"]" * 100_000
    status, reply = await api.call(
        "POST", "/api/v1/shipments", raw=deep, headers={"Content-Type": "application/json"}
    )
    assert status == 400
    status, reply = await api.call(
        "POST",
        "/api/v1/shipments",
        raw=b"dewar_id=DW-1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 415 and reply["error"]["code"] == "unsupported_media_type"
    status, reply = await api.call(
        "POST",
        "/api/v1/shipments",
        raw=b'{"dewar_id": ',
        headers={"Content-Type": "application/json"},
    )
    assert status == 400 and "not valid JSON" in reply["error"]["message"]
    status, reply = await api.call(
        "POST", "/api/v1/shipments", body=new_shipment(chain_of_identity="x\u0000y")
    )
    assert status == 400
    status, reply = await api.call("GET", "/api/v1/audit?entity=ship%00ment")
    assert status == 400 and "NUL" in reply["error"]["message"]


async def test_errors_never_carry_a_stack_trace_or_internals(api: Api) -> None:
    probes = [
        ("GET", "/api/v1/shipments?limit=abc"),
        ("GET", "/api/v1/audit?entity=a%00b"),
        ("GET", "/api/v1/nope"),
        ("PATCH", "/api/v1/shipments"),
        ("GET", "/api/v1/shipments?cursor=%%%"),
    ]
    for method, path in probes:
        status, reply = await api.call(method, path)
        assert 400 <= status < 500, (method, path)
        text = json.dumps(reply)
        for leak in ("Traceback", "asyncpg", "SELECT", 'File "', "coldchain/"):
            assert leak not in text, (path, text)


# Routes ---------------------------------------------------------------------------------------


async def test_planners_get_routes_or_the_reason_there_is_none(api: Api) -> None:
    network = example_network()
    await api.store.import_lanes(list(network.lanes), "test")
    await api.store.import_flights(list(network.flights), "test")
    depart = "2026-10-20T13:00:00Z"  # in the bundled week of flights
    body = {
        "origin": ORIGIN,
        "destination": DESTINATION,
        "depart_at": depart,
        "hold_hours": 96,
        "alternatives": 3,
    }
    status, result = await api.call("POST", "/api/v1/routes/plan", as_="planner", body=body)
    assert status == 200, result
    assert result["feasible"] is True and 1 <= len(result["routes"]) <= 3
    best = result["routes"][0]
    assert best["legs"][0]["from"] == ORIGIN and best["legs"][-1]["to"] == DESTINATION
    assert any(leg["mode"] == "flight" for leg in best["legs"])
    arrivals = [r["arrival"] for r in result["routes"]]
    assert arrivals == sorted(arrivals)
    assert best["hold_margin_hours"] > 0
    status, result = await api.call(
        "POST",
        "/api/v1/routes/plan",
        as_="planner",
        body=body | {"hold_hours": 8, "alternatives": 1},
    )
    assert status == 200 and result["feasible"] is False
    assert result["infeasible"]["constraint"] == "hold"
    assert "more hold time" in result["infeasible"]["message"]
    status, reply = await api.call(
        "POST", "/api/v1/routes/plan", as_="planner", body=body | {"origin": "NOWHERE"}
    )
    assert status == 400 and "NOWHERE" in reply["error"]["message"]
    assert (await api.call("POST", "/api/v1/routes/plan", as_="operator", body=body))[0] == 403


async def _routable_shipment(api: Api, **extra: Any) -> str:
    """A shipment without a deadline, packing out in the bundled week of flights."""
    network = example_network()
    await api.store.import_lanes(list(network.lanes), "test")
    await api.store.import_flights(list(network.flights), "test")
    body = new_shipment(planned_departure="2026-10-20T13:00:00Z", **extra)
    del body["deliver_by"]
    status, created = await api.call("POST", "/api/v1/shipments", as_="planner", body=body)
    assert status == 201, created
    return str(created["id"])


def _instant_of(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def test_a_shipment_gets_a_route_and_a_re_plan_from_where_it_is_becomes_current(
    api: Api,
) -> None:
    sid = await _routable_shipment(api)
    _, detail = await api.call("GET", f"/api/v1/shipments/{sid}", as_="viewer")
    assert detail["route"] is None and detail["eta"] is None
    status, first = await api.call(
        "POST", f"/api/v1/shipments/{sid}/route", as_="planner", body={"hold_hours": 96}
    )
    assert status == 201, first
    assert first["legs"][0]["from"] == ORIGIN and first["legs"][-1]["to"] == DESTINATION
    assert first["from_site"] == ORIGIN and first["depart_at"] == "2026-10-20T13:00:00Z"
    assert _instant_of(first["eta"]) == _instant_of(first["arrival"])
    assert first["planned_by"].startswith("planner-user")
    _, detail = await api.call("GET", f"/api/v1/shipments/{sid}", as_="viewer")
    assert detail["route"]["id"] == first["id"] and detail["route"]["legs"] == first["legs"]
    assert _instant_of(detail["eta"]) == _instant_of(first["eta"])
    assert detail["shipment"]["id"] == sid and detail["hold"] is None  # the rest as before

    # Its flight is cancelled while the dewar waits at the airport: re-plan from there.
    flight = next(leg for leg in first["legs"] if leg["mode"] == "flight")
    airport = flight["from"]
    cancelled = {k: flight[k] for k in ("carrier", "flight", "departs_at")}
    status, second = await api.call(
        "POST",
        f"/api/v1/shipments/{sid}/route",
        as_="planner",
        body={
            "hold_hours": 90,
            "from_site": airport,
            "depart_at": first["legs"][0]["ready_at"],
            "exclude_flights": [cancelled],
        },
    )
    assert status == 201, second
    assert second["from_site"] == airport and second["legs"][0]["from"] == airport
    assert second["legs"][-1]["to"] == DESTINATION
    assert all(
        {k: leg[k] for k in ("carrier", "flight", "departs_at")} != cancelled
        for leg in second["legs"]
    )
    assert second["legs"] != first["legs"]
    assert _instant_of(second["eta"]) > _instant_of(first["eta"])
    assert second["request"]["exclude_flights"] == [cancelled]
    _, detail = await api.call("GET", f"/api/v1/shipments/{sid}")
    assert detail["route"]["id"] == second["id"]
    assert _instant_of(detail["eta"]) == _instant_of(second["eta"])
    status, history = await api.call("GET", f"/api/v1/shipments/{sid}/route", as_="viewer")
    assert status == 200
    assert [r["id"] for r in history["items"]] == [second["id"], first["id"]]
    _, audit = await api.call("GET", f"/api/v1/audit?entity=shipment&entity_id={sid}")
    planned = [a for a in audit["items"] if a["action"] == "route.planned"]
    assert [a["detail"]["route_id"] for a in planned] == [second["id"], first["id"]]
    assert planned[0]["detail"]["from_site"] == airport
    assert planned[0]["actor"].startswith("planner-user")


async def test_a_route_that_cannot_be_planned_is_refused_with_the_reason_and_not_stored(
    api: Api,
) -> None:
    sid = await _routable_shipment(api)
    path = f"/api/v1/shipments/{sid}/route"
    status, reply = await api.call("POST", path, as_="planner", body={"hold_hours": 8})
    assert status == 409, reply
    assert reply["error"]["code"] == "no_feasible_route"
    assert "more hold time" in reply["error"]["message"]
    assert (await api.call("GET", path))[1]["items"] == []
    _, detail = await api.call("GET", f"/api/v1/shipments/{sid}")
    assert detail["route"] is None and detail["eta"] is None
    status, reply = await api.call(
        "POST", path, as_="planner", body={"hold_hours": 96, "from_site": "NOWHERE"}
    )
    assert status == 400 and "NOWHERE" in reply["error"]["message"]
    for role in ("viewer", "operator"):
        status, reply = await api.call("POST", path, as_=role, body={"hold_hours": 96})
        assert status == 403 and "routes" in reply["error"]["message"]
    assert (await api.call("GET", path))[1]["items"] == []
    # Once cancelled (or delivered) the route is history: no new plans.
    cancel = {"type": "cancelled"}
    assert (await api.call("POST", f"/api/v1/shipments/{sid}/events", body=cancel))[0] == 201
    status, reply = await api.call("POST", path, as_="planner", body={"hold_hours": 96})
    assert status == 409 and reply["error"]["code"] == "conflict"
    assert "cancelled" in reply["error"]["message"]


async def test_two_shipments_of_a_dewar_never_claim_the_same_readings(api: Api) -> None:
    """Readings belong to the shipment active at their device time; a pack-out dated before the
    dewar's previous shipment ended used to give that time's readings to both."""
    dewar = "DW-TWICE"
    now = datetime.now(UTC).replace(microsecond=0)
    _, first = await api.call("POST", "/api/v1/shipments", body=new_shipment(dewar))
    path = f"/api/v1/shipments/{first['id']}/events"
    for kind, hours_ago in (("packed", 6), ("picked_up", 5), ("delivered", 2)):
        at = (now - timedelta(hours=hours_ago)).isoformat()
        assert (await api.call("POST", path, body={"type": kind, "at": at}))[0] == 201
    _, second = await api.call("POST", "/api/v1/shipments", body=new_shipment(dewar))
    path = f"/api/v1/shipments/{second['id']}/events"
    early = (now - timedelta(hours=3)).isoformat()
    status, reply = await api.call("POST", path, body={"type": "packed", "at": early})
    assert status == 409, reply
    message = reply["error"]["message"]
    assert first["id"] in message and "ended at" in message and "pack-out" in message
    _, detail = await api.call("GET", f"/api/v1/shipments/{second['id']}")
    assert detail["shipment"]["status"] == "created" and detail["events"] == []
    # From the moment the first ended, the dewar is the second's.
    ended = (now - timedelta(hours=2)).isoformat()
    status, reply = await api.call("POST", path, body={"type": "packed", "at": ended})
    assert status == 201, reply
    readings = [
        IncomingReading(
            dewar,
            Reading(seq=i, ts=now - timedelta(hours=4) + timedelta(minutes=30 * i), temp_c=-190),
            datetime.now(UTC),
        )
        for i in range(8)  # every 30 min from 4 h ago
    ]
    await api.store.write_batch(readings, [])
    _, old = await api.call("GET", f"/api/v1/shipments/{first['id']}/telemetry")
    _, new = await api.call("GET", f"/api/v1/shipments/{second['id']}/telemetry")
    assert [r["seq"] for r in old["readings"]] == [0, 1, 2, 3]
    assert [r["seq"] for r in new["readings"]] == [4, 5, 6, 7]


async def test_a_shipment_cannot_start_before_the_dewar_s_previous_one_ended(api: Api) -> None:
    """A delivery may be recorded up to 5 minutes ahead; a new shipment created meanwhile would
    start (own readings from creation) inside the previous one."""
    _, first = await api.call("POST", "/api/v1/shipments", body=new_shipment("DW-SOON"))
    path = f"/api/v1/shipments/{first['id']}/events"
    soon = (datetime.now(UTC) + timedelta(minutes=3)).isoformat()
    for kind in ("packed", "picked_up"):
        assert (await api.call("POST", path, body={"type": kind}))[0] == 201
    assert (await api.call("POST", path, body={"type": "delivered", "at": soon}))[0] == 201
    status, reply = await api.call("POST", "/api/v1/shipments", body=new_shipment("DW-SOON"))
    assert status == 409, reply
    assert first["id"] in reply["error"]["message"]
    assert "the shipment's start" in reply["error"]["message"]


# Lane statistics ----------------------------------------------------------------------------


async def _delivered(
    api: Api,
    dewar: str,
    destination: str,
    packed: datetime,
    delivered: datetime,
    deliver_by: datetime | None,
) -> str:
    body = new_shipment(dewar, destination=destination)
    body["deliver_by"] = None if deliver_by is None else deliver_by.isoformat()
    status, created = await api.call("POST", "/api/v1/shipments", body=body)
    assert status == 201, created
    path = f"/api/v1/shipments/{created['id']}/events"
    for kind, at in (("packed", packed), ("picked_up", packed), ("delivered", delivered)):
        status, out = await api.call("POST", path, body={"type": kind, "at": at.isoformat()})
        assert status == 201, out
    return str(created["id"])


async def _alarm(api: Api, shipment_id: str, rule: str, severity: Severity, kind: str) -> None:
    shipment = await api.store.shipment(shipment_id)
    at = shipment.starts_at + timedelta(hours=1)
    key = f"{rule}@{at.isoformat()}"
    transition = Transition(key, rule, severity, kind, at, at, 1.0, 0.0, rule)
    await api.store.apply_transitions(shipment, [transition])


def _state_with_depletion(depletion: datetime) -> bytes:
    state = RuleState()
    micros = round(depletion.timestamp() * 1_000_000)
    state.current.ln2_fit = Ln2Fit(micros - 3_600_000_000, 40.0, 1.0, micros, None, None, False)
    return encode_state(state)


async def test_lane_statistics_count_on_time_excursions_transit_and_hold_margin(
    api: Api,
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    delivered = now - timedelta(hours=1)
    packed = delivered - timedelta(hours=20)  # events may go back a day before creation
    on_time = await _delivered(
        api, "DW-L1", DESTINATION, packed, delivered, delivered + timedelta(hours=1)
    )
    late = await _delivered(
        api, "DW-L2", DESTINATION, packed, delivered, delivered - timedelta(hours=1)
    )
    undated = await _delivered(
        api, "DW-L3", DESTINATION, packed - timedelta(hours=2), delivered, None
    )
    other = await _delivered(api, "DW-L4", "TC-MSK", packed, delivered, None)
    _, cancelled = await api.call("POST", "/api/v1/shipments", body=new_shipment("DW-L5"))
    await api.call(
        "POST", f"/api/v1/shipments/{cancelled['id']}/events", body={"type": "cancelled"}
    )
    # An excursion: a major alarm on a limit. Not one: a major alarm of the engine's own (signal
    # lost), a warning on a limit, a critical alarm that late readings withdrew.
    await _alarm(api, on_time, "temp_high", Severity.MAJOR, "raised")
    await _alarm(api, late, "signal_lost", Severity.MAJOR, "raised")
    await _alarm(api, late, "shock", Severity.WARNING, "raised")
    await _alarm(api, undated, "temp_glass_transition", Severity.CRITICAL, "raised")
    await _alarm(api, undated, "temp_glass_transition", Severity.CRITICAL, "retracted")
    await _alarm(api, other, "ln2_low", Severity.CRITICAL, "raised")
    await api.store.save_rule_states(
        [
            (on_time, _state_with_depletion(delivered + timedelta(hours=30)), now),
            (late, _state_with_depletion(delivered + timedelta(hours=10)), now),
        ]
    )

    status, page = await api.call("GET", "/api/v1/lanes/stats", as_="viewer")
    assert status == 200, page
    assert page["delivered"] == 4
    lanes = {(lane["origin"], lane["destination"]): lane for lane in page["lanes"]}
    assert list(lanes) == [(ORIGIN, DESTINATION), (ORIGIN, "TC-MSK")]  # busiest first
    assert lanes[ORIGIN, DESTINATION] == {
        "origin": ORIGIN,
        "destination": DESTINATION,
        "delivered": 3,
        "with_deadline": 2,
        "on_time": 1,
        "on_time_rate": 0.5,
        "with_excursion": 1,
        "excursion_rate": pytest.approx(1 / 3),
        "transit_hours_median": 20.0,
        "transit_hours_max": 22.0,
        "with_forecast": 2,
        "hold_margin_hours_min": pytest.approx(10.0),
        "hold_margin_hours_median": pytest.approx(20.0),
    }
    assert lanes[ORIGIN, "TC-MSK"]["with_excursion"] == 1
    assert lanes[ORIGIN, "TC-MSK"]["on_time_rate"] is None
    assert lanes[ORIGIN, "TC-MSK"]["hold_margin_hours_min"] is None

    # The period is by delivery time, `to` exclusive.
    later = (delivered + timedelta(seconds=1)).isoformat()
    status, page = await api.call("GET", f"/api/v1/lanes/stats?from={quote(later)}")
    assert (status, page["delivered"], page["lanes"]) == (200, 0, [])
    status, page = await api.call("GET", f"/api/v1/lanes/stats?to={quote(delivered.isoformat())}")
    assert (status, page["delivered"]) == (200, 0)
    status, page = await api.call(
        "GET", f"/api/v1/lanes/stats?from={quote(now.isoformat())}&to={quote(later)}"
    )
    assert status == 400 and "`to` must be after `from`" in page["error"]["message"]
