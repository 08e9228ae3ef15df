"""Alarms end to end, against the real service, PostgreSQL, an MQTT broker, a webhook receiver
and an SMTP server that the tests run: the right alarm, to every channel, once, with a lifecycle
people can follow; backlogs, restarts, escalation and a receiver that was down."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from datetime import time as dt_time
from email import message_from_bytes
from email.message import Message
from typing import Any

import aiohttp
import asyncpg
import paho.mqtt.client as paho
import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from paho.mqtt.enums import CallbackAPIVersion

from coldchain.alarms import AlarmState, Channel, Recipient
from coldchain.auth import Actor, Role
from coldchain.broker import BrokerLink
from coldchain.embedded import free_port
from coldchain.metrics import Registry
from coldchain.notify import Dispatcher
from coldchain.profiles import Severity
from coldchain.settings import MqttAddress, Settings
from coldchain.shipments import Shipment, Status
from coldchain.store import Notification, Store, Transition
from routing import example_network
from sensors import Reading, alert_topic, encode_batch, encode_reading, telemetry_topic
from tests.support import eventually, make_token, publish_all, running_service, service_settings

pytestmark = [pytest.mark.postgres, pytest.mark.mqtt]

SECRET = "a-webhook-secret-of-some-length"  # noqa: S105 - a test fixture's shared secret


# Things that receive alerts --------------------------------------------------------------------


@dataclass
class Receiver:
    """A webhook endpoint; `down` makes it answer 503."""

    url: str = ""
    down: bool = False
    received: list[dict[str, Any]] = field(default_factory=list)
    refused: int = 0
    bad_signatures: int = 0
    deliveries: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.down:
            self.refused += 1
            return web.Response(status=503, text="down for maintenance")
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        if request.headers.get("X-Coldchain-Signature") != expected:
            self.bad_signatures += 1
            return web.Response(status=401)
        self.deliveries.append(request.headers["X-Coldchain-Delivery"])
        self.received.append(json.loads(body))
        return web.Response(status=204)


@dataclass
class HangingReceiver:
    """A webhook endpoint that accepts the connection and then answers nothing until released:
    longer than the service's webhook timeout."""

    url: str = ""
    deliveries: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.deliveries.append(request.headers["X-Coldchain-Delivery"])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.release.wait(), 60)
        return web.Response(status=204)


class Mailbox:
    """An SMTP server (aiosmtpd) that keeps what it is sent."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port)

    async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"


class AlertListener:
    """Collects what the service publishes on coldchain/v1/alerts/#."""

    def __init__(self, mqtt_url: str, client_id: str) -> None:
        self.alerts: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        address = MqttAddress.parse(mqtt_url)
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_message = self._message
        self.client.connect(address.host, address.port)
        self.client.subscribe("coldchain/v1/alerts/#", qos=1)
        self.client.loop_start()

    def _message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.alerts.append(json.loads(msg.payload))

    def of(self, shipment_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [a for a in self.alerts if a["shipment_id"] == shipment_id]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Env:
    base: str
    store: Store
    database_url: str
    mqtt_url: str
    receiver: Receiver
    mailbox: Mailbox
    alerts: AlertListener
    tokens: dict[str, str]
    session: aiohttp.ClientSession
    unique: str

    async def call(
        self, method: str, path: str, body: object = None, as_: str = "admin"
    ) -> tuple[int, Any]:
        async with self.session.request(
            method,
            self.base + path,
            json=body,
            headers={"Authorization": f"Bearer {self.tokens[as_]}"},
        ) as response:
            text = await response.text()
            return response.status, json.loads(text) if text else None

    async def shipment(
        self, dewar: str, profile: str = "cryo-vapor", packed_ago: timedelta = timedelta(minutes=12)
    ) -> str:
        status, created = await self.call(
            "POST",
            "/api/v1/shipments",
            {
                "dewar_id": dewar,
                "profile": profile,
                "origin": "MFG-MPN",
                "destination": "TC-NKI",
                "deliver_by": (datetime.now(UTC) + timedelta(days=4)).isoformat(),
            },
        )
        assert status == 201, created
        at = datetime.now(UTC) - packed_ago
        for i, event in enumerate(("packed", "picked_up")):
            status, reply = await self.call(
                "POST",
                f"/api/v1/shipments/{created['id']}/events",
                {"type": event, "at": (at + timedelta(minutes=i)).isoformat()},
            )
            assert status == 201, reply
        return str(created["id"])

    def publish(self, dewar: str, readings: list[Reading], *, batch: bool = False) -> None:
        topic = telemetry_topic(dewar)
        messages = (
            [(topic, encode_batch(readings))]
            if batch
            else [(topic, encode_reading(r)) for r in readings]
        )
        publish_all(self.mqtt_url, messages, client_id=f"dev-{self.unique}")

    async def alarms(self, shipment_id: str) -> list[dict[str, Any]]:
        status, page = await self.call("GET", f"/api/v1/alarms?shipment_id={shipment_id}")
        assert status == 200
        items: list[dict[str, Any]] = page["items"]
        return items


def readings(
    start: datetime, temps: list[float], *, step_s: float = 30, first_seq: int = 0
) -> list[Reading]:
    return [
        Reading(
            seq=first_seq + i,
            ts=start + timedelta(seconds=i * step_s),
            temp_c=t,
            ln2_level_pct=80.0,
            tilt_deg=2.0,
        )
        for i, t in enumerate(temps)
    ]


@pytest.fixture
def receiver() -> Receiver:
    return Receiver()


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox()
    box.controller.start()
    yield box
    box.controller.stop()


async def _start_receiver(receiver: Receiver | HangingReceiver) -> web.AppRunner:
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    receiver.url = f"http://127.0.0.1:{port}/hook"
    return runner


async def _prepare(database_url: str, receiver: Receiver, mailbox: Mailbox) -> Store:
    store = await Store.open(database_url)
    await store.migrate()
    await store.import_sites(list(example_network().sites.values()), "test")
    return store


def env_settings(
    database_url: str, mqtt_url: str, unique: str, mailbox: Mailbox, **changes: Any
) -> Settings:
    return service_settings(
        database_url,
        mqtt_url,
        f"svc-{unique}",
        smtp_url=f"smtp://127.0.0.1:{mailbox.port}",
        **changes,
    )


@pytest.fixture
async def env(
    database_url: str, mqtt_url: str, unique: str, receiver: Receiver, mailbox: Mailbox
) -> AsyncIterator[Env]:
    runner = await _start_receiver(receiver)
    store = await _prepare(database_url, receiver, mailbox)
    tokens = {str(r): await make_token(database_url, r) for r in Role}
    alerts = AlertListener(mqtt_url, f"alerts-{unique}")
    settings = env_settings(
        database_url, mqtt_url, unique, mailbox, remind_scale=0.004, rules_beat_s=0.5
    )
    try:
        async with running_service(settings) as base, aiohttp.ClientSession() as session:
            e = Env(
                base,
                store,
                database_url,
                mqtt_url,
                receiver,
                mailbox,
                alerts,
                tokens,
                session,
                unique,
            )
            for body in (
                {
                    "name": "cold-room webhook",
                    "channel": "webhook",
                    "address": receiver.url,
                    "secret": SECRET,
                    "min_severity": "warning",
                },
                {
                    "name": "duty logistics",
                    "channel": "email",
                    "address": "duty@example.org",
                    "min_severity": "major",
                },
            ):
                assert (await e.call("POST", "/api/v1/recipients", body))[0] == 201
            yield e
    finally:
        alerts.close()
        await store.close()
        await runner.cleanup()


# The tests --------------------------------------------------------------------------------------


async def test_a_breach_raises_one_alarm_on_every_channel(env: Env) -> None:
    dewar = f"DW-A{env.unique}"
    sid = await env.shipment(dewar)
    now = datetime.now(UTC).replace(microsecond=0)
    start = now - timedelta(minutes=3)
    # Warming over two minutes, above the glass transition (-135 °C) from the fifth reading:
    # critical once that has lasted its 60 s delay.
    warming = [-190.0, -175.0, -160.0, -145.0, -130.0, -120.0, -118.0]
    env.publish(dewar, readings(start, warming))

    alarms = await eventually(
        lambda: env.alarms(sid), lambda a: any(x["rule"] == "temp_glass_transition" for x in a)
    )
    glass = next(a for a in alarms if a["rule"] == "temp_glass_transition")
    assert glass["severity"] == "critical" and glass["state"] == "open"
    assert datetime.fromisoformat(glass["started_at"]) == start + timedelta(seconds=120)
    assert glass["limit"] == -135.0 and glass["value"] >= -118.0
    # The 5-minute "above -150 °C" delay has not passed: no major alarm yet.
    assert not any(a["rule"] == "temp_high" for a in alarms)

    def opened(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # The raising itself (reminders, every 1.2 s in this test, come as further levels).
        return [
            a
            for a in items
            if a.get("alarm_id") == glass["id"]
            and a["state"] == "open"
            and a["escalation_level"] == 0
        ]

    await eventually(lambda: _now(env.alerts.of(sid)), lambda a: len(opened(a)) == 1)
    await eventually(lambda: _now(env.receiver.received), lambda r: len(opened(r)) == 1)
    await eventually(lambda: _now(env.mailbox.messages), lambda m: len(m) >= 1)
    mail = env.mailbox.messages[0]
    assert "[CRITICAL]" in mail["Subject"] and sid in mail["Subject"]
    assert mail["To"] == "duty@example.org"
    alert = opened(env.alerts.of(sid))[0]
    assert {
        "alarm_id",
        "shipment_id",
        "dewar_id",
        "rule",
        "severity",
        "state",
        "started_at",
        "value",
        "limit",
        "message",
    } <= set(alert)
    assert alert["dewar_id"] == dewar and "glass transition" in alert["message"]
    assert env.receiver.bad_signatures == 0
    # Redelivering the same readings changes nothing: still one alarm, one alert per channel.
    env.publish(dewar, readings(start, warming))
    await asyncio.sleep(1.5)
    assert len([a for a in await env.alarms(sid) if a["rule"] == "temp_glass_transition"]) == 1
    assert len(opened(env.alerts.of(sid))) == 1 and len(opened(env.receiver.received)) == 1
    assert len(env.receiver.deliveries) == len(set(env.receiver.deliveries))


async def _now(value: Any) -> Any:
    return list(value)


async def test_acknowledge_clear_and_close_are_attributed_and_audited(env: Env) -> None:
    dewar = f"DW-L{env.unique}"
    sid = await env.shipment(dewar)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    env.publish(dewar, readings(start, [-190.0, -170.0, -150.0, -130.0, -120.0, -119.0, -119.0]))
    alarms = await eventually(lambda: env.alarms(sid), lambda a: len(a) >= 1)
    alarm_id = next(a["id"] for a in alarms if a["rule"] == "temp_glass_transition")
    path = f"/api/v1/alarms/{alarm_id}"

    assert (await env.call("POST", f"{path}/ack", {"comment": "on it"}, as_="viewer"))[0] == 403
    status, reply = await env.call("POST", f"{path}/ack", {"comment": ""}, as_="operator")
    assert status == 400
    status, acked = await env.call(
        "POST", f"{path}/ack", {"comment": "courier called, dewar checked"}, as_="operator"
    )
    assert status == 200 and acked["state"] == "acknowledged"
    assert acked["acknowledged_by"].startswith("test operator")
    status, reply = await env.call("POST", f"{path}/ack", {"comment": "again"}, as_="operator")
    assert status == 409 and "already acknowledged" in reply["error"]["message"]
    status, reply = await env.call("POST", f"{path}/close", {"comment": "done"}, as_="operator")
    assert status == 409 and "still active" in reply["error"]["message"]

    # Back below the limit by more than the deadband: the condition clears.
    env.publish(
        dewar, readings(start + timedelta(minutes=4), [-150.0, -185.0, -189.0], first_seq=10)
    )
    await eventually(
        lambda: env.call("GET", path), lambda r: r[1]["alarm"]["condition_active"] is False
    )
    status, closed = await env.call(
        "POST", f"{path}/close", {"comment": "payload checked, within spec"}, as_="operator"
    )
    assert status == 200 and closed["state"] == "closed"
    _, detail = await env.call("GET", path)
    states = [(c["state"], (c["actor"] or "rules").split(" (")[0]) for c in detail["changes"]]
    assert states == [
        ("open", "rules"),
        ("acknowledged", "test operator"),
        ("cleared", "rules"),
        ("closed", "test operator"),
    ]
    _, audit = await env.call("GET", f"/api/v1/audit?entity=alarm&entity_id={alarm_id}")
    # Every change, the rules' as well as people's, in the append-only audit log.
    assert [(e["action"], e["actor"].split(" (")[0]) for e in reversed(audit["items"])] == [
        ("alarm.raised", "rules"),
        ("alarm.acknowledged", "test operator"),
        ("alarm.cleared", "rules"),
        ("alarm.closed", "test operator"),
    ]
    states_heard = await eventually(
        lambda: _now([a["state"] for a in env.alerts.of(sid) if a["alarm_id"] == alarm_id]),
        lambda s: "closed" in s,
    )
    assert states_heard == ["open", "acknowledged", "cleared", "closed"]


async def test_an_excursion_inside_a_late_backlog_is_raised_and_cleared_with_true_times(
    env: Env,
) -> None:
    dewar = f"DW-B{env.unique}"
    sid = await env.shipment(dewar, packed_ago=timedelta(hours=3))
    now = datetime.now(UTC).replace(microsecond=0)
    # Live readings first (all cold; the last one with a knock, so that its shock alarm tells
    # us the rules have evaluated them), then a two-hour-old backlog that hides a warm spell.
    live = readings(now - timedelta(minutes=5), [-190.0] * 6, step_s=60, first_seq=1000)
    live[-1] = Reading(seq=live[-1].seq, ts=live[-1].ts, temp_c=-190.0, shock_g=25.0)
    env.publish(dewar, live)
    await eventually(lambda: env.alarms(sid), lambda a: any(x["rule"] == "shock" for x in a))
    backlog_start = now - timedelta(hours=2)
    temps = [-190.0] * 10 + [-125.0] * 5 + [-190.0] * 10
    env.publish(dewar, readings(backlog_start, temps, first_seq=100), batch=True)
    alarms = await eventually(
        lambda: env.alarms(sid),
        lambda a: any(x["rule"] == "temp_glass_transition" and x["cleared_at"] for x in a),
    )
    glass = next(a for a in alarms if a["rule"] == "temp_glass_transition")
    assert datetime.fromisoformat(glass["started_at"]) == backlog_start + timedelta(seconds=300)
    assert datetime.fromisoformat(glass["cleared_at"]) == backlog_start + timedelta(seconds=450)
    assert glass["state"] == "cleared"


async def test_a_restart_in_the_middle_of_a_delay_does_not_reset_it(
    database_url: str, mqtt_url: str, unique: str, receiver: Receiver, mailbox: Mailbox
) -> None:
    runner = await _start_receiver(receiver)
    store = await _prepare(database_url, receiver, mailbox)
    admin = await make_token(database_url, Role.ADMIN)
    dewar = f"DW-R{unique}"
    settings = env_settings(database_url, mqtt_url, unique, mailbox)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=20)
    try:
        async with (
            running_service(settings) as base,
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"}) as session,
        ):
            env = Env(
                base,
                store,
                database_url,
                mqtt_url,
                receiver,
                mailbox,
                AlertListener(mqtt_url, f"a1-{unique}"),
                {"admin": admin},
                session,
                unique,
            )
            sid = await env.shipment(dewar, packed_ago=timedelta(minutes=30))
            # 3 minutes above -150 °C: the 5-minute delay of `temp_high` is running.
            env.publish(dewar, readings(start, [-190.0] + [-145.0] * 7))
            await eventually(
                lambda: env.call("GET", f"/api/v1/shipments/{sid}"),
                lambda r: (r[1]["last_reading"] or {}).get("seq") == 7,
            )
            await asyncio.sleep(0.5)
            assert not [a for a in await env.alarms(sid) if a["rule"] == "temp_high"]
            env.alerts.close()
        async with (
            running_service(settings) as base,
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin}"}) as session,
        ):
            env = Env(
                base,
                store,
                database_url,
                mqtt_url,
                receiver,
                mailbox,
                AlertListener(mqtt_url, f"a2-{unique}"),
                {"admin": admin},
                session,
                unique,
            )
            # Three more minutes: six in all, so the delay has passed only if it was kept.
            env.publish(dewar, readings(start + timedelta(seconds=240), [-145.0] * 6, first_seq=8))
            alarms = await eventually(
                lambda: env.alarms(sid), lambda a: any(x["rule"] == "temp_high" for x in a)
            )
            env.alerts.close()
    finally:
        await store.close()
        await runner.cleanup()
    high = next(a for a in alarms if a["rule"] == "temp_high")
    assert datetime.fromisoformat(high["started_at"]) == start + timedelta(seconds=30)
    assert high["severity"] == "major"


async def test_an_unacknowledged_alarm_repeats_and_escalates_to_the_next_tier(env: Env) -> None:
    second = Receiver()
    runner = await _start_receiver(second)
    try:
        status, _ = await env.call(
            "POST",
            "/api/v1/recipients",
            {
                "name": "night manager",
                "channel": "webhook",
                "address": second.url,
                "secret": SECRET,
                "min_severity": "critical",
                "tier": 1,
            },
        )
        assert status == 201
        dewar = f"DW-E{env.unique}"
        sid = await env.shipment(dewar)
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
        env.publish(
            dewar, readings(start, [-190.0, -170.0, -150.0, -130.0, -120.0, -119.0, -119.0])
        )
        # Reminders every 5 min x 0.004 = 1.2 s here: tier 1 hears it on the first reminder.
        heard = await eventually(lambda: _now(second.received), lambda r: len(r) >= 1, within=30)
        assert heard[0]["shipment_id"] == sid and heard[0]["escalation_level"] >= 1
        first_tier = [a for a in env.receiver.received if a["shipment_id"] == sid]
        assert len(first_tier) >= 2  # raised, then repeated
        alarm_id = heard[0]["alarm_id"]
        _, audit = await env.call("GET", f"/api/v1/audit?entity=alarm&entity_id={alarm_id}")
        assert ("alarm.escalated", "coldchain") in {
            (e["action"], e["actor"]) for e in audit["items"]
        }
        await env.call(
            "POST", f"/api/v1/alarms/{alarm_id}/ack", {"comment": "taking it"}, as_="operator"
        )
        await asyncio.sleep(1.0)
        count = len(second.received)
        await asyncio.sleep(3.0)
        assert len(second.received) == count + 0  # acknowledged: no more reminders
        assert second.received[-1]["state"] == "acknowledged"
    finally:
        await runner.cleanup()


async def test_quiet_hours_hold_warnings_but_never_a_critical_alarm(env: Env) -> None:
    quiet = Receiver()
    runner = await _start_receiver(quiet)
    try:
        local_now = datetime.now(UTC)
        status, _ = await env.call(
            "POST",
            "/api/v1/recipients",
            {
                "name": "sleeping engineer",
                "channel": "webhook",
                "address": quiet.url,
                "secret": SECRET,
                "min_severity": "info",
                "tz": "UTC",
                "quiet_from": (local_now - timedelta(hours=1)).strftime("%H:%M:00"),
                "quiet_until": (local_now + timedelta(hours=2)).strftime("%H:%M:00"),
            },
        )
        assert status == 201
        dewar = f"DW-Q{env.unique}"
        sid = await env.shipment(dewar)
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
        shock = [Reading(seq=1, ts=start, temp_c=-190.0, shock_g=25.0)]  # a warning
        env.publish(dewar, shock)
        await eventually(lambda: env.alarms(sid), lambda a: any(x["rule"] == "shock" for x in a))
        env.publish(
            dewar, readings(start + timedelta(seconds=10), [-120.0, -119.0, -119.0], first_seq=2)
        )
        await eventually(
            lambda: _now(quiet.received), lambda r: any(a["severity"] == "critical" for a in r)
        )
        await asyncio.sleep(1.0)
        assert not any(a["rule"] == "shock" for a in quiet.received)
        shock_id = next(a["id"] for a in await env.alarms(sid) if a["rule"] == "shock")
        _, detail = await env.call("GET", f"/api/v1/alarms/{shock_id}")
        held = [d for d in detail["deliveries"] if d["recipient"] == "sleeping engineer"]
        assert [d["state"] for d in held] == ["held"]
    finally:
        await runner.cleanup()


async def test_quiet_hours_end_with_each_alarm_once_in_its_latest_state(env: Env) -> None:
    # Major alarms repeat every 15 min x 0.004 = 3.6 s here: a "night" of 30 s holds several
    # reminders. When it ends the sleeper hears the alarm once, as it stands, and of an alarm
    # someone acknowledged meanwhile only the acknowledgement.
    quiet = Receiver()
    runner = await _start_receiver(quiet)
    try:
        now = datetime.now(UTC)
        morning = (now + timedelta(seconds=30)).replace(microsecond=0)
        status, sleeper = await env.call(
            "POST",
            "/api/v1/recipients",
            {
                "name": "sleeping duty manager",
                "channel": "webhook",
                "address": quiet.url,
                "secret": SECRET,
                "min_severity": "warning",
                "tz": "UTC",
                "quiet_from": (now - timedelta(hours=1)).strftime("%H:%M:%S"),
                "quiet_until": morning.strftime("%H:%M:%S"),
            },
        )
        assert status == 201, sleeper
        dewar = f"DW-N{env.unique}"
        sid = await env.shipment(dewar)
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
        env.publish(dewar, [Reading(seq=0, ts=start, temp_c=-190.0, shock_g=25.0)])  # a warning
        # Warmer than -150 °C for 6 min of device time: temp_high (major), still open.
        env.publish(dewar, readings(start + timedelta(seconds=30), [-148.0] * 13, first_seq=1))
        alarms = await eventually(
            lambda: env.alarms(sid), lambda a: {"shock", "temp_high"} <= {x["rule"] for x in a}
        )
        by_rule = {a["rule"]: a["id"] for a in alarms}
        status, _ = await env.call(
            "POST",
            f"/api/v1/alarms/{by_rule['shock']}/ack",
            {"comment": "seen to by the day shift"},
            as_="operator",
        )
        assert status == 200
        # Awake, the cold room heard every repeat; the sleeper nothing yet.
        await eventually(
            lambda: _now(
                [a for a in env.receiver.received if a["alarm_id"] == by_rule["temp_high"]]
            ),
            lambda r: len(r) >= 4,
            within=max(1.0, (morning - datetime.now(UTC)).total_seconds() - 1),
        )
        assert quiet.received == []
        await asyncio.sleep(max(0.0, (morning - datetime.now(UTC)).total_seconds()) + 3.0)

        shock = [a for a in quiet.received if a["alarm_id"] == by_rule["shock"]]
        assert [(a["state"], a["comment"]) for a in shock] == [
            ("acknowledged", "seen to by the day shift")
        ]
        warm = [a for a in quiet.received if a["alarm_id"] == by_rule["temp_high"]]
        levels = [a["escalation_level"] for a in warm]
        assert warm and warm[0]["state"] == "open"
        # One delivery of the state at morning (a later reminder, once awake, is a new one).
        assert levels[0] >= 4 and levels == sorted(set(levels)), levels
        _, detail = await env.call("GET", f"/api/v1/alarms/{by_rule['temp_high']}")
        mine = [d["state"] for d in detail["deliveries"] if d["recipient"] == sleeper["name"]]
        assert mine.count("superseded") == levels[0]  # the raise and every reminder but the last
        assert "held" not in mine
    finally:
        await runner.cleanup()


@pytest.mark.fault
async def test_a_webhook_receiver_down_for_two_minutes_gets_every_alarm_when_back(
    env: Env,
) -> None:
    env.receiver.down = True
    dewar = f"DW-D{env.unique}"
    sid = await env.shipment(dewar)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    env.publish(
        dewar,
        readings(
            start, [-190.0, -170.0, -150.0, -130.0, -120.0, -119.0, -119.0, -150.0, -180.0, -190.0]
        ),
    )
    alarms = await eventually(lambda: env.alarms(sid), lambda a: len(a) >= 1)
    await asyncio.sleep(120)
    assert env.receiver.refused >= 5  # retried all along
    env.receiver.down = False
    expected = {
        (a["id"], s)
        for a in await env.alarms(sid)
        for s in ("open", "cleared")
        if a["rule"] == "temp_glass_transition"
    }
    got = await eventually(
        lambda: _now(
            {(a["alarm_id"], a["state"]) for a in env.receiver.received if a["shipment_id"] == sid}
        ),
        lambda g: expected <= set(g),
        within=60,
    )
    assert expected <= set(got) and alarms
    # Every notification of the alarm (its reminders too) is delivered in the end, after
    # attempts that the delivery log shows.
    path = f"/api/v1/alarms/{next(iter(expected))[0]}"

    async def webhook_deliveries() -> list[dict[str, Any]]:
        _, detail = await env.call("GET", path)
        return [d for d in detail["deliveries"] if d["channel"] == "webhook"]

    hook = await eventually(
        webhook_deliveries, lambda h: bool(h) and all(d["state"] == "sent" for d in h), within=60
    )
    assert max(d["attempts"] for d in hook) >= 5


async def test_a_delivery_given_up_shows_as_failed_with_its_reason(
    database_url: str, mqtt_url: str, unique: str, receiver: Receiver, mailbox: Mailbox
) -> None:
    store = await _prepare(database_url, receiver, mailbox)
    admin = await make_token(database_url, Role.ADMIN)
    alerts = AlertListener(mqtt_url, f"alerts-{unique}")
    settings = service_settings(database_url, mqtt_url, f"svc-{unique}")  # no mail server
    try:
        async with (
            running_service(settings) as base,
            aiohttp.ClientSession() as session,
        ):
            env = Env(
                base,
                store,
                database_url,
                mqtt_url,
                receiver,
                mailbox,
                alerts,
                {"admin": admin},
                session,
                unique,
            )
            duty = {
                "name": "duty logistics",
                "channel": "email",
                "address": "duty@example.org",
                "min_severity": "warning",
            }
            assert (await env.call("POST", "/api/v1/recipients", duty))[0] == 201
            dewar = f"DW-F{unique}"
            sid = await env.shipment(dewar)
            at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=2)
            env.publish(dewar, [Reading(seq=1, ts=at, temp_c=-190.0, shock_g=25.0)])
            alarms = await eventually(lambda: env.alarms(sid), bool)

            async def deliveries() -> list[dict[str, Any]]:
                _, detail = await env.call("GET", f"/api/v1/alarms/{alarms[0]['id']}")
                items: list[dict[str, Any]] = detail["deliveries"]
                return items

            log = await eventually(
                deliveries,
                lambda d: (
                    {x["channel"]: x["state"] for x in d} == {"mqtt": "sent", "email": "failed"}
                ),
            )
            email = next(d for d in log if d["channel"] == "email")
            assert email["attempts"] == 1 and "no mail server" in email["last_detail"]
            await asyncio.sleep(1.5)  # given up: not tried again, and still failed
            assert [d for d in await deliveries() if d["channel"] == "email"] == [email]
    finally:
        alerts.close()
        await store.close()


async def test_a_webhook_recipient_without_a_secret_is_refused(env: Env) -> None:
    hook = {"name": "unsigned", "channel": "webhook", "address": env.receiver.url}
    status, reply = await env.call("POST", "/api/v1/recipients", hook)
    assert status == 400 and "needs a secret" in reply["error"]["message"]
    status, reply = await env.call("POST", "/api/v1/recipients", {**hook, "secret": "short"})
    assert status == 400 and "secret" in reply["error"]["message"]
    _, listed = await env.call("GET", "/api/v1/recipients")
    assert "unsigned" not in [r["name"] for r in listed["items"]]
    assert all(r["has_secret"] for r in listed["items"] if r["channel"] == "webhook")


async def test_a_webhook_that_hangs_does_not_hold_up_the_other_channels(env: Env) -> None:
    stuck = HangingReceiver()
    runner = await _start_receiver(stuck)
    try:
        status, _ = await env.call(
            "POST",
            "/api/v1/recipients",
            {
                "name": "stuck receiver",
                "channel": "webhook",
                "address": stuck.url,
                "secret": SECRET,
                "min_severity": "info",
            },
        )
        assert status == 201
        first, second = f"DW-H{env.unique}", f"DW-I{env.unique}"
        sid1, sid2 = await env.shipment(first), await env.shipment(second)
        at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=2)
        env.publish(first, [Reading(seq=1, ts=at, temp_c=-190.0, shock_g=25.0)])
        # The stuck receiver has the first alarm and holds the delivery open (5 s timeout).
        await eventually(lambda: _now(stuck.deliveries), bool)
        hung_at = time.monotonic()

        env.publish(second, [Reading(seq=1, ts=at, temp_c=-190.0, shock_g=25.0)])
        await eventually(lambda: _now(env.alerts.of(sid2)), bool, within=10)
        await eventually(
            lambda: _now([a for a in env.receiver.received if a["shipment_id"] == sid2]),
            bool,
            within=10,
        )
        # Well before the stuck delivery's timeout (5 s), not after it.
        assert time.monotonic() - hung_at < 2.0

        # The stuck delivery times out, is logged, and is tried again.
        first_alarm = (await env.alarms(sid1))[0]

        async def stuck_deliveries() -> list[dict[str, Any]]:
            _, detail = await env.call("GET", f"/api/v1/alarms/{first_alarm['id']}")
            return [d for d in detail["deliveries"] if d["recipient"] == "stuck receiver"]

        logged = await eventually(
            stuck_deliveries, lambda d: bool(d) and d[0]["attempts"] >= 1, within=15
        )
        assert "Timeout" in (logged[0]["last_detail"] or "")
        await eventually(lambda: _now(stuck.deliveries), lambda d: len(d) > len(set(d)), within=15)
    finally:
        stuck.release.set()
        await runner.cleanup()


@pytest.fixture
async def outbox(database_url: str) -> AsyncIterator[tuple[Store, Shipment]]:
    """A migrated store with the example sites and one created cryo-vapor shipment."""
    store = await Store.open(database_url)
    try:
        await store.migrate()
        await store.import_sites(list(example_network().sites.values()), "test")
        now = datetime.now(UTC)
        shipment = await store.create_shipment(
            Shipment(
                "SH-OUTBOX",
                "DW-OUTBOX",
                "cryo-vapor",
                "MFG-MPN",
                "TC-NKI",
                now + timedelta(days=4),
                None,
                None,
                Status.CREATED,
                now,
                "test",
                now,
                None,
            ),  # fmt: skip
            Actor(0, "test", Role.ADMIN),
        )
        yield store, shipment
    finally:
        await store.close()


async def _unreachable_hook(
    store: Store, name: str, quiet: tuple[dt_time, dt_time] | None = None
) -> Recipient:
    """A webhook recipient of every severity whose deliveries are only claimed, never sent."""
    return await store.add_recipient(
        Recipient(
            id=0,
            name=name,
            channel=Channel.WEBHOOK,
            address=f"http://127.0.0.1:9/{name}",
            secret=SECRET,
            min_severity=Severity.INFO,
            site_id=None,
            shipment_id=None,
            tier=0,
            quiet_from=None if quiet is None else quiet[0],
            quiet_until=None if quiet is None else quiet[1],
            tz="UTC",
            active=True,
        ),
        "test",
    )


async def test_the_outbox_claims_no_more_than_four_at_a_time_for_one_recipient(
    outbox: tuple[Store, Shipment],
) -> None:
    store, shipment = outbox
    now = datetime.now(UTC)
    hooks = [await _unreachable_hook(store, name) for name in ("slow", "healthy")]
    slow, healthy = (h.id for h in hooks)
    await store.apply_transitions(
        shipment,
        [
            Transition(f"shock:{i}", "shock", Severity.WARNING, "raised", now, now, 25, 10, "")
            for i in range(6)
        ],
    )

    def count(claimed: list[Any]) -> dict[int | None, int]:
        counts: dict[int | None, int] = {}
        for n in claimed:
            key = n.recipient.id if n.recipient else None
            counts[key] = counts.get(key, 0) + 1
        return counts

    # The slow receiver has four deliveries in flight already: none more for it.
    due = datetime.now(UTC)
    first = await store.due_notifications(due, 100, busy={slow: 4}, per_recipient=4)
    assert count(first) == {None: 6, healthy: 4}
    second = await store.due_notifications(due, 100, per_recipient=4)
    assert count(second) == {slow: 4, healthy: 2}
    assert not {n.id for n in first} & {n.id for n in second}


async def test_a_critical_alarm_is_sent_before_a_flood_of_lesser_ones(
    outbox: tuple[Store, Shipment],
) -> None:
    store, shipment = outbox
    now = datetime.now(UTC)
    # A fleet's worth of "signal lost" (major) first, then one critical alarm.
    await store.apply_transitions(
        shipment,
        [
            Transition(f"lost:{i}", "signal_lost", Severity.MAJOR, "raised",
                       now, now, 900, 900, "")
            for i in range(40)
        ],
    )  # fmt: skip
    await store.apply_transitions(
        shipment,
        [Transition("glass:1", "temp_glass_transition", Severity.CRITICAL, "raised",
                    now, now, -120, -135, "")],
    )  # fmt: skip
    claimed = await store.due_notifications(datetime.now(UTC), 5)
    assert len(claimed) == 5
    assert claimed[0].body["rule"] == "temp_glass_transition"
    assert [n.body["severity"] for n in claimed[1:]] == ["major"] * 4


async def test_the_alarm_writer_claims_what_its_dispatcher_has_room_for(
    outbox: tuple[Store, Shipment],
) -> None:
    """The rows the alarm writer claims in its own transaction go straight to its dispatcher:
    no other claim may take them (they would be sent twice), and the rows beyond the room it
    was given stay due for the usual claim (or they would wait out a minute's claim)."""
    store, shipment = outbox
    now = datetime.now(UTC)
    quiet = ((now - timedelta(hours=1)).time(), (now + timedelta(hours=1)).time())
    await _unreachable_hook(store, "awake")
    await _unreachable_hook(store, "asleep", quiet)
    claimed: list[Notification] = []
    await store.apply_transitions_of(
        [
            (
                shipment,
                [
                    Transition(f"shock:{i}", "shock", Severity.WARNING, "raised",
                               now, now, 25, 10, "")
                    for i in range(3)
                ],
            )
        ],
        claim=4,
        claimed=claimed,
    )  # fmt: skip
    # Three changes, each for the alert topic, the awake hook and (held) the asleep one.
    assert len(claimed) == 4
    assert all(n.recipient is None or n.recipient.name == "awake" for n in claimed)
    assert all(n.body["rule"] == "shock" and n.attempts == 0 for n in claimed)
    rest = await store.due_notifications(datetime.now(UTC), 100)
    assert len(rest) == 2 and not {n.id for n in rest} & {n.id for n in claimed}
    assert all(n.recipient is None or n.recipient.name == "awake" for n in rest)
    # What was claimed is what the outbox holds for those ids, bodies included.
    for n in claimed:
        ((recorded, _),) = [(r, a) for r, a in await store.delivery_log(n.alarm_id) if r.id == n.id]
        assert (recorded.channel, recorded.body) == (n.channel, n.body)
    # Nothing is claimed without the list to hand it over in.
    await store.apply_transitions_of(
        [(shipment, [Transition("lid:1", "lid_open", Severity.MAJOR, "raised",
                                now, now, 1, 0, "")])],
        claim=4,
    )  # fmt: skip
    assert len(await store.due_notifications(datetime.now(UTC), 100)) == 2


async def test_a_send_recorded_twice_is_one_attempt_and_a_resend_is_another(
    outbox: tuple[Store, Shipment],
) -> None:
    """At shutdown the recorder's statement can be cancelled after the server committed it,
    and the same batch is then written again: that must not count a second delivery."""
    store, shipment = outbox
    now = datetime.now(UTC)
    await store.apply_transitions(
        shipment,
        [Transition("lid:1", "lid_open", Severity.MAJOR, "raised", now, now, 1, 0, "")],
    )
    (n,) = await store.due_notifications(datetime.now(UTC), 5)
    sent_at = datetime.now(UTC)
    await store.delivered([(n.id, "published", 3.0, sent_at)])
    await store.delivered([(n.id, "published", 3.0, sent_at)])
    ((recorded, attempts),) = await store.delivery_log(n.alarm_id)
    assert (recorded.status, recorded.attempts) == ("sent", 1)
    assert [(a.ok, a.at) for a in attempts] == [(True, sent_at)]
    # A real second send (another instance after the claim ran out) is its own attempt.
    again = sent_at + timedelta(seconds=40)
    await store.delivered([(n.id, "published", 2.0, again)])
    ((recorded, attempts),) = await store.delivery_log(n.alarm_id)
    assert recorded.attempts == 2
    assert [a.at for a in attempts] == [sent_at, again]


async def test_a_batch_of_transitions_does_what_one_at_a_time_does(
    outbox: tuple[Store, Shipment], database_url: str
) -> None:
    """The alarm writer applies a committed batch's transitions together, set-based: the alarms,
    their changes, the outbox (quiet hours included) and the audit log come out as they do with
    one transaction per transition."""
    store, batched = outbox
    now = datetime.now(UTC)
    one_by_one = await store.create_shipment(
        replace(batched, id="SH-ONE-BY-ONE", dewar_id="DW-ONE-BY-ONE"), Actor(0, "test", Role.ADMIN)
    )
    await _unreachable_hook(store, "awake")
    quiet = ((now - timedelta(hours=1)).time(), (now + timedelta(hours=1)).time())
    await _unreachable_hook(store, "asleep", quiet)

    def t(
        key: str, kind: str, minute: int, value: float, severity: Severity = Severity.MAJOR
    ) -> Transition:
        at = now + timedelta(minutes=minute)
        return Transition(
            key, key.split(":")[0], severity, kind, now, at, value, -150, f"{kind} {value}"
        )

    trace = [
        t("temp:1", "raised", 0, -140),
        t("ghost:1", "cleared", 0, 1),  # an episode nobody raised: ignored
        t("temp:1", "raised", 1, -138),  # known: the latest value, quietly
        t("shock:1", "raised", 1, 25, Severity.WARNING),
        t("temp:1", "cleared", 2, -160),
        t("temp:1", "cleared", 2, -160),  # a repeat changes nothing
        t("temp:1", "reopened", 3, -139),
        t("shock:1", "retracted", 3, 25, Severity.WARNING),
        t("shock:1", "raised", 4, 30, Severity.WARNING),  # void, raised again
        t("glass:1", "raised", 4, -130, Severity.CRITICAL),
        t("glass:1", "cleared", 5, -170, Severity.CRITICAL),
        t("temp:1", "cleared", 5, -165),
    ]
    together = await store.apply_transitions(batched, trace)
    alone = []
    for transition in trace:
        alone += await store.apply_transitions(one_by_one, [transition])
    assert len(together) == len(alone) == 9

    def alarm_view(a: Any) -> tuple[Any, ...]:
        return (a.episode_key, a.state, a.condition_active, a.value, a.message, a.cleared_at)

    assert [alarm_view(a) for a in together] == [alarm_view(a) for a in alone]
    conn = await asyncpg.connect(database_url)
    try:
        views: list[list[list[tuple[Any, ...]]]] = []
        for shipment in (batched, one_by_one):
            alarms = await conn.fetch(
                "SELECT episode_key, state, condition_active, value, message, cleared_at,"
                " next_notify_at IS NULL AS quiet FROM alarms WHERE shipment_id = $1"
                " ORDER BY episode_key",
                shipment.id,
            )
            changes = await conn.fetch(
                "SELECT a.episode_key, c.state FROM alarm_changes c JOIN alarms a"
                " ON a.id = c.alarm_id WHERE a.shipment_id = $1 ORDER BY c.id",
                shipment.id,
            )
            outbox_rows = await conn.fetch(
                "SELECT a.episode_key, n.channel, r.name, n.status, n.body->>'state' AS state"
                " FROM notifications n JOIN alarms a ON a.id = n.alarm_id"
                " LEFT JOIN recipients r ON r.id = n.recipient_id WHERE a.shipment_id = $1"
                " ORDER BY n.change_id, n.channel, r.name",
                shipment.id,
            )
            audit = await conn.fetch(
                "SELECT l.action, a.episode_key, l.detail->>'state' AS state FROM audit_log l"
                " JOIN alarms a ON a.id::text = l.entity_id WHERE l.entity = 'alarm'"
                " AND a.shipment_id = $1 ORDER BY l.id",
                shipment.id,
            )
            views.append(
                [[tuple(r) for r in rows] for rows in (alarms, changes, outbox_rows, audit)]
            )
    finally:
        await conn.close()
    assert views[0] == views[1]
    _, changes_seen, outbox_seen, audit_seen = views[0]
    assert [state for key, state in changes_seen if key == "temp:1"] == [
        "open", "cleared", "open", "cleared",
    ]  # fmt: skip
    assert [row[0] for row in audit_seen].count("alarm.voided") == 1
    # Quiet hours: of each alarm's held deliveries only the latest is still pending; the
    # critical one was never held.
    held = [(key, status) for key, _, name, status, _ in outbox_seen if name == "asleep"]
    assert [s for k, s in held if k == "temp:1"] == ["superseded"] * 3 + ["pending"]
    assert [s for k, s in held if k == "glass:1"] == ["pending", "pending"]


# The alarm writer reads without a lock and writes in one guarded statement -------------------


def _interrupted(
    store: Store, monkeypatch: pytest.MonkeyPatch, meanwhile: Callable[[], Awaitable[object]]
) -> None:
    """Make `meanwhile` happen between the alarm writer's first look at the episodes (a read,
    or what it knows from its own writes) and its write."""
    episodes = store._episodes
    done: list[object] = []

    async def look_then(conn: Any, items: Any, *, known: bool) -> Any:
        found = await episodes(conn, items, known=known)
        if not done:
            done.append(await meanwhile())
        return found

    monkeypatch.setattr(store, "_episodes", look_then)


def _counting_reads(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times the alarm writer reads the episodes before writing."""
    read = store._read_episodes
    reads: list[int] = []

    async def counted(conn: Any, items: Any) -> Any:
        reads.append(len(items))
        return await read(conn, items)

    monkeypatch.setattr(store, "_read_episodes", counted)
    return reads


def _temp(kind: str, minute: int, value: float, now: datetime) -> Transition:
    at = now + timedelta(minutes=minute)
    return Transition(
        "temp:1", "temp_high", Severity.MAJOR, kind, now, at, value, -150, f"{kind} {value}"
    )


async def test_an_acknowledgement_while_the_writer_works_is_kept_and_the_clear_written_after_it(
    outbox: tuple[Store, Shipment], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A person acknowledges between the writer's read and its write. Written from what it had
    read, the clear would put back the reminder the acknowledgement stopped, and tell everyone
    an alarm nobody had taken; the guard refuses it, and it is worked out again."""
    store, shipment = outbox
    now = datetime.now(UTC)
    (raised,) = await store.apply_transitions(shipment, [_temp("raised", 0, -140, now)])
    assert raised.next_notify_at is not None
    operator = Actor(7, "night shift", Role.OPERATOR)
    _interrupted(store, monkeypatch, lambda: store.acknowledge_alarm(raised.id, "on it", operator))
    (cleared,) = await store.apply_transitions(shipment, [_temp("cleared", 2, -160, now)])
    assert store.alarm_write_retries == 1
    alarm, changes = await store.alarm(raised.id)
    assert alarm == cleared
    assert (alarm.state, alarm.condition_active) == (AlarmState.CLEARED, False)
    assert (alarm.acknowledged_by, alarm.next_notify_at) == (operator.label, None)
    assert [c.state for c in changes] == [
        AlarmState.OPEN,
        AlarmState.ACKNOWLEDGED,
        AlarmState.CLEARED,
    ]
    (_, _, clear_log) = [n for n, _ in await store.delivery_log(raised.id) if n.recipient is None]
    assert clear_log.body["acknowledged_by"] == operator.label


async def test_a_recipient_added_while_the_writer_works_hears_the_alarm(
    outbox: tuple[Store, Shipment], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, shipment = outbox
    now = datetime.now(UTC)
    await _unreachable_hook(store, "early")
    _interrupted(store, monkeypatch, lambda: _unreachable_hook(store, "late"))
    (raised,) = await store.apply_transitions(shipment, [_temp("raised", 0, -140, now)])
    assert store.alarm_write_retries == 1
    heard = [
        n.recipient.name if n.recipient else None for n, _ in await store.delivery_log(raised.id)
    ]
    assert sorted(heard, key=str) == sorted([None, "early", "late"], key=str)


async def test_an_episode_another_writer_raised_meanwhile_is_one_alarm_raised_once(
    outbox: tuple[Store, Shipment], monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    """Two instances judge the same reading (a redelivery after a restart, or a shared
    subscription handing it over): one alarm, one raise, one delivery per recipient."""
    store, shipment = outbox
    now = datetime.now(UTC)
    other = await Store.open(database_url)
    try:
        _interrupted(
            store,
            monkeypatch,
            lambda: other.apply_transitions(shipment, [_temp("raised", 0, -140, now)]),
        )
        assert await store.apply_transitions(shipment, [_temp("raised", 0, -139, now)]) == []
    finally:
        await other.close()
    assert store.alarm_write_retries == 1
    (alarm,) = await store.open_alarms(shipment.id)
    _, changes = await store.alarm(alarm.id)
    assert [c.state for c in changes] == [AlarmState.OPEN]
    assert alarm.value == -139  # the later raise's value, quietly
    assert len(await store.delivery_log(alarm.id)) == 1


async def test_a_writer_changes_the_alarms_it_wrote_without_reading_them_first(
    outbox: tuple[Store, Shipment], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The usual course of an episode, raised then cleared by the same writer, is read once:
    after that the writer knows the alarm, its row version, the recipients and spare ids, and
    the clear is one guarded statement. What it writes is what a read would have given."""
    store, shipment = outbox
    await _unreachable_hook(store, "ops")
    reads = _counting_reads(store, monkeypatch)
    now = datetime.now(UTC)
    (raised,) = await store.apply_transitions(shipment, [_temp("raised", 0, -140, now)])
    (cleared,) = await store.apply_transitions(shipment, [_temp("cleared", 2, -160, now)])
    (again,) = await store.apply_transitions(shipment, [_temp("reopened", 3, -141, now)])
    other = replace(_temp("raised", 4, -120, now), episode_key="glass:1", rule="temp_glass")
    (second,) = await store.apply_transitions(shipment, [other])
    assert reads == [1]  # the first write only
    assert store.alarm_write_retries == 0
    alarm, changes = await store.alarm(raised.id)
    assert alarm == again
    assert (cleared.state, again.state) == (AlarmState.CLEARED, AlarmState.OPEN)
    assert [c.state for c in changes] == [AlarmState.OPEN, AlarmState.CLEARED, AlarmState.OPEN]
    (stored_second, _) = await store.alarm(second.id)
    assert stored_second == second
    heard = [
        (n.recipient.name if n.recipient else None) for n, _ in await store.delivery_log(alarm.id)
    ]
    assert sorted(heard, key=str) == sorted([None, None, None, "ops", "ops", "ops"], key=str)
    change_ids = [n.body["change_id"] for n, _ in await store.delivery_log(alarm.id)]
    assert len(set(change_ids)) == 3


async def test_an_alarm_changed_since_the_writer_wrote_it_is_read_again_before_the_next_write(
    outbox: tuple[Store, Shipment], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A person acknowledges the alarm through the API (not through the writer): what the
    writer knew of it is out of date, its guarded write is refused, and the clear is worked out
    again from a read, keeping the acknowledgement, with a change id above the ack's."""
    store, shipment = outbox
    reads = _counting_reads(store, monkeypatch)
    now = datetime.now(UTC)
    (raised,) = await store.apply_transitions(shipment, [_temp("raised", 0, -140, now)])
    operator = Actor(7, "night shift", Role.OPERATOR)
    await store.acknowledge_alarm(raised.id, "on it", operator)
    (cleared,) = await store.apply_transitions(shipment, [_temp("cleared", 2, -160, now)])
    assert (reads, store.alarm_write_retries) == ([1, 1], 1)
    alarm, changes = await store.alarm(raised.id)
    assert alarm == cleared
    assert (alarm.state, alarm.acknowledged_by) == (AlarmState.CLEARED, operator.label)
    assert [c.state for c in changes] == [
        AlarmState.OPEN,
        AlarmState.ACKNOWLEDGED,
        AlarmState.CLEARED,
    ]
    assert [c.id for c in changes] == sorted(c.id for c in changes)


async def test_a_new_writer_raising_an_episode_that_has_an_alarm_keeps_the_one_alarm(
    outbox: tuple[Store, Shipment], monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    """After a restart the writer knows no alarm, so it takes a raise for a new episode; when
    the episode has its alarm already (the readings came again), the guard refuses the insert
    and the raise is worked out again from a read: one alarm, raised once."""
    store, shipment = outbox
    now = datetime.now(UTC)
    (raised,) = await store.apply_transitions(shipment, [_temp("raised", 0, -140, now)])
    restarted = await Store.open(database_url)
    try:
        # It knows the recipients (and has ids) from writing another episode first.
        other = replace(_temp("raised", 1, -120, now), episode_key="glass:1", rule="temp_glass")
        await restarted.apply_transitions(shipment, [other])
        reads = _counting_reads(restarted, monkeypatch)
        assert await restarted.apply_transitions(shipment, [_temp("raised", 0, -139, now)]) == []
        assert (reads, restarted.alarm_write_retries) == ([1], 1)
    finally:
        await restarted.close()
    alarm, changes = await store.alarm(raised.id)
    assert [c.state for c in changes] == [AlarmState.OPEN]
    assert alarm.value == -139  # the later raise's value, quietly
    assert len(await store.open_alarms(shipment.id)) == 2


async def test_an_alert_handed_to_the_dispatcher_is_published_before_the_hand_over_returns(
    outbox: tuple[Store, Shipment], mqtt_url: str
) -> None:
    """The alert topic's delivery goes out within the alarm writer's own turn of the event
    loop, not a task's later one; when the broker can take no more QoS 1 publishes in flight,
    it waits in a task instead and goes once it can."""
    store, shipment = outbox
    address = MqttAddress.parse(mqtt_url)
    got: list[dict[str, Any]] = []
    lock = threading.Lock()
    listener = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"alerts-{shipment.id}")

    def on_message(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        with lock:
            got.append(json.loads(msg.payload))

    listener.on_message = on_message
    listener.connect(address.host, address.port)
    listener.subscribe(alert_topic(shipment.id), qos=1)
    listener.loop_start()
    link = BrokerLink(
        address,
        client_id=f"dispatch-{shipment.id}-{time.time_ns()}",
        subscriptions=[],
        handler=lambda messages: None,
        receive_maximum=100,
        session_expiry_s=60,
    )
    dispatcher = Dispatcher(store, link, Registry(), smtp_url=None)
    running = asyncio.create_task(dispatcher.run())
    now = datetime.now(UTC)

    async def raised(key: str) -> Notification:
        claimed: list[Notification] = []
        await store.apply_transitions_of(
            [
                (
                    shipment,
                    [Transition(key, "shock", Severity.WARNING, "raised", now, now, 25, 10, "")],
                )
            ],
            claim=10,
            claimed=claimed,
        )
        (n,) = claimed
        assert n.channel is Channel.MQTT
        return n

    async def heard() -> list[str]:
        with lock:
            return [str(body["change_id"]) for body in got]

    try:
        await link.run()
        await asyncio.wait_for(link.wait_connected(), 10)
        await asyncio.sleep(0.5)  # the listener's subscription is in place
        first = await raised("shock:1")
        dispatcher.take([first])
        assert [sent[0] for sent in dispatcher._sent] == [first.id]  # no await in between
        assert first.id not in dispatcher._in_flight
        await eventually(heard, lambda ids: ids == [str(first.body["change_id"])])
        # As if the broker allowed 3 in flight, and stop reading its PUBACKs: none comes free.
        link._client._connection._protocol.id_generator._max = 4
        transport = link._transport()
        assert transport is not None
        transport.pause_reading()
        await asyncio.sleep(0.2)
        while link.publish_now("coldchain/v1/test/filler", b"x"):
            pass
        second = await raised("shock:2")
        dispatcher.take([second])
        assert second.id in dispatcher._in_flight and len(dispatcher._sent) <= 1
        transport.resume_reading()
        await eventually(heard, lambda ids: str(second.body["change_id"]) in ids)

        async def status() -> str:
            ((n, _),) = await store.delivery_log(second.alarm_id)
            return n.status

        await eventually(status, lambda s: s == "sent")
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await link.close()
        listener.disconnect()
        listener.loop_stop()
