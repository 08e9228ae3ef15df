"""Delivering alarm changes: the MQTT alert topic, signed webhooks and e-mail, from the outbox.

Every change of an alarm is written, in the transaction of the change, as one outbox row per
destination (`notifications`). The dispatcher wakes as soon as a change is written (or once a
second, for changes written by another instance), claims the rows that are due, and delivers
each as a task of its own: up to `MAX_CONCURRENT` in flight, at most `PER_RECIPIENT` of them to
any one webhook or mailbox, so a receiver that hangs until its timeout holds up only its own
deliveries; the loop goes on claiming newly due rows while slow ones run. A delivery that fails
is retried with exponential backoff up to `RETRY_CAP`, indefinitely for critical alarms and for a
day otherwise; every attempt, good or bad, is logged in `delivery_attempts`. A receiver that was
down gets everything once it is back.

Webhooks get the alert object as JSON with `X-Coldchain-Signature: sha256=<hex HMAC-SHA256 of
the body with the recipient's secret>` and `X-Coldchain-Delivery: <outbox id>` (the same on every
retry, so a receiver can drop a repeat).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import smtplib
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Final
from urllib.parse import unquote, urlsplit

import aiohttp
import msgspec

from coldchain.alarms import Channel
from coldchain.broker import BrokerLink
from coldchain.errors import StoreUnavailable
from coldchain.metrics import Registry
from coldchain.store import Notification, Store
from sensors import alert_topic

logger = logging.getLogger(__name__)

RETRY_FIRST: Final = timedelta(seconds=1)
RETRY_CAP: Final = timedelta(seconds=15)
GIVE_UP_AFTER: Final = timedelta(days=1)
WEBHOOK_TIMEOUT_S: Final = 5.0
MAX_CONCURRENT: Final = 32
PER_RECIPIENT: Final = 4  # in flight to one webhook or mailbox; the alert topic is not capped
_DELAY: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class DeliveryError(Exception):
    """A delivery did not go through; `final` when retrying cannot help."""

    def __init__(self, message: str, *, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


class Dispatcher:
    """Sends what the outbox holds, as soon as it is written."""

    def __init__(
        self, store: Store, broker: BrokerLink, registry: Registry, *, smtp_url: str | None
    ) -> None:
        self._store = store
        self._broker = broker
        self._smtp_url = smtp_url
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._in_flight: dict[int, asyncio.Task[None]] = {}  # notification id -> its delivery
        self._busy: Counter[int] = Counter()  # recipient id -> its deliveries in flight
        self._sent = registry.counter(
            "coldchain_notifications_sent_total", "Alarm notifications delivered"
        )
        self._failed = registry.counter(
            "coldchain_notification_failures_total", "Failed notification delivery attempts"
        )
        self._delay = registry.histogram(
            "coldchain_notification_delay_seconds",
            "From an alarm change being written to its delivery, when the first attempt succeeds",
            _DELAY,
        )

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_S)
        )
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                self._wake.clear()
                free = MAX_CONCURRENT - len(self._in_flight)
                if free <= 0:
                    continue  # a delivery that ends wakes the loop
                try:
                    due = await self._store.due_notifications(
                        datetime.now(UTC),
                        free,
                        in_flight=list(self._in_flight),
                        busy=dict(self._busy),
                        per_recipient=PER_RECIPIENT,
                    )
                except StoreUnavailable as exc:
                    logger.warning("cannot read the notification outbox: %s", exc)
                    await asyncio.sleep(1.0)
                    continue
                for n in due:
                    self._start(n)
                if len(due) == free:
                    self._wake.set()  # there may be more due
        finally:
            await self._stop_deliveries()
            await self._session.close()

    def _start(self, n: Notification) -> None:
        task = asyncio.create_task(self._deliver(n), name=f"notification-{n.id}")
        self._in_flight[n.id] = task
        if n.recipient is not None:
            self._busy[n.recipient.id] += 1
        task.add_done_callback(functools.partial(self._finished, n))

    def _finished(self, n: Notification, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(n.id, None)
        if n.recipient is not None:
            self._busy[n.recipient.id] -= 1
            if self._busy[n.recipient.id] <= 0:
                del self._busy[n.recipient.id]
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Not recorded either way: its claim runs out and it is tried again.
            logger.error("delivering notification %d crashed", n.id, exc_info=exc)
        self._wake.set()  # a slot is free, and a recipient may no longer be busy

    async def _stop_deliveries(self) -> None:
        """Cancel what is still in flight and wait for it. A cancelled delivery is not recorded
        as sent; its claim runs out and it is sent again (at least once, never lost)."""
        tasks = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _deliver(self, n: Notification) -> None:
        started = time.perf_counter()
        try:
            detail = await self._send(n)
        except DeliveryError as exc:
            await self._failure(n, str(exc), started, final=exc.final)
            return
        except (aiohttp.ClientError, OSError, TimeoutError, smtplib.SMTPException) as exc:
            await self._failure(n, f"{type(exc).__name__}: {exc}", started, final=False)
            return
        elapsed = (time.perf_counter() - started) * 1000
        self._sent.inc()
        if n.attempts == 0:
            self._delay.observe((datetime.now(UTC) - n.created_at).total_seconds())
        try:
            await self._store.delivered(n.id, detail, elapsed)
        except StoreUnavailable:
            # Sent but not recorded: it will be sent again once the database is back; the
            # receiver recognises the repeat by X-Coldchain-Delivery.
            logger.warning("notification %d sent but not recorded as sent", n.id)

    async def _failure(self, n: Notification, error: str, started: float, *, final: bool) -> None:
        elapsed = (time.perf_counter() - started) * 1000
        self._failed.inc()
        now = datetime.now(UTC)
        critical = n.body.get("severity") == "critical"
        retry_at: datetime | None = now + min(RETRY_FIRST * 2 ** min(n.attempts, 10), RETRY_CAP)
        if final or (not critical and now - n.created_at > GIVE_UP_AFTER):
            retry_at = None
        who = n.recipient.name if n.recipient else "alert topic"
        logger.warning(
            "notification %d (%s to %s) failed: %s%s",
            n.id,
            n.channel,
            who,
            error,
            "" if retry_at else "; giving up",
        )
        with contextlib.suppress(StoreUnavailable):
            await self._store.delivery_failed(n.id, error, elapsed, retry_at)

    async def _send(self, n: Notification) -> str:
        body = msgspec.json.encode(n.body)
        if n.channel is Channel.MQTT:
            if not self._broker.connected:
                raise DeliveryError("MQTT broker not connected")
            try:
                await self._broker.publish(alert_topic(str(n.body["shipment_id"])), body, qos=1)
            except ConnectionError as exc:
                raise DeliveryError(str(exc)) from exc
            return "published"
        recipient = n.recipient
        if recipient is None:
            raise DeliveryError("recipient no longer exists", final=True)
        if n.channel is Channel.WEBHOOK:
            return await self._webhook(n, recipient.address, recipient.secret, body)
        return await self._email(n, recipient.address)

    async def _webhook(self, n: Notification, url: str, secret: str | None, body: bytes) -> str:
        assert self._session is not None  # noqa: S101 - set by run()
        headers = {
            "Content-Type": "application/json",
            "X-Coldchain-Delivery": str(n.id),
            "X-Coldchain-Attempt": str(n.attempts + 1),
            "User-Agent": "coldchain-webhook/1",
        }
        if secret:
            headers["X-Coldchain-Signature"] = signature(secret, body)
        async with self._session.post(url, data=body, headers=headers) as response:
            if 200 <= response.status < 300:
                return f"HTTP {response.status}"
            text = (await response.text())[:200]
            raise DeliveryError(f"HTTP {response.status}: {text}")

    async def _email(self, n: Notification, address: str) -> str:
        if not self._smtp_url:
            raise DeliveryError("no mail server configured (COLDCHAIN_SMTP_URL)", final=True)
        b = n.body
        message = EmailMessage()
        message["From"] = "coldchain <alerts@coldchain.invalid>"
        message["To"] = address
        message["Subject"] = (
            f"[{str(b['severity']).upper()}] {b['state']}: {b['rule']} on "
            f"shipment {b['shipment_id']}"
        )
        message["X-Coldchain-Delivery"] = str(n.id)
        message.set_content(
            f"{b['message']}\n\nShipment: {b['shipment_id']}\nDewar: {b['dewar_id']}\n"
            f"Rule: {b['rule']} ({b['severity']})\nState: {b['state']}\n"
            f"Started (device time): {b['started_at']}\nValue: {b['value']}  "
            f"Limit: {b['limit']}\nAlarm: {b['alarm_id']}\n"
            + (f"Comment by {b['actor']}: {b['comment']}\n" if b.get("comment") else "")
        )
        await asyncio.to_thread(_smtp_send, self._smtp_url, message)
        return "accepted by the mail server"


def _smtp_send(url: str, message: EmailMessage) -> None:
    parts = urlsplit(url)
    secure = parts.scheme == "smtps"
    port = parts.port or (465 if secure else 25)
    host = parts.hostname or "127.0.0.1"
    client: smtplib.SMTP = (
        smtplib.SMTP_SSL(host, port, timeout=10) if secure else smtplib.SMTP(host, port, timeout=10)
    )
    with client:
        if parts.username:
            client.login(unquote(parts.username), unquote(parts.password or ""))
        client.send_message(message)
