"""Delivering alarm changes: the MQTT alert topic, signed webhooks and e-mail, from the outbox.

Every change of an alarm is written, in the transaction of the change, as one outbox row per
destination (`notifications`). The dispatcher wakes as soon as a change is written (or once a
second, for retries and for changes written by another instance) and claims the rows that are
due, most urgent first, into a local queue: up to `QUEUE_MAX` of them, at most
`QUEUED_PER_RECIPIENT` waiting for any one webhook or mailbox, so that one claim feeds many
deliveries. Each delivery is a task of its own: up to `MAX_CONCURRENT` in flight, at most
`PER_RECIPIENT` of them to any one webhook or mailbox, so a receiver that hangs until its
timeout holds up only its own deliveries. Deliveries that went through are recorded together, a
statement per turn of the recorder rather than a pool connection per delivery; until recorded
they stay claimed here. A claim lasts a minute: a row claimed by an instance that dies is sent
by another (or after the restart), at least once, never lost. A delivery that fails is retried
with exponential backoff up to `RETRY_CAP`, indefinitely for critical alarms and for a day
otherwise; every attempt, good or bad, is logged in `delivery_attempts`. A receiver that was
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
from coldchain.store import Notification, Store, urgency
from sensors import alert_topic

logger = logging.getLogger(__name__)

RETRY_FIRST: Final = timedelta(seconds=1)
RETRY_CAP: Final = timedelta(seconds=15)
GIVE_UP_AFTER: Final = timedelta(days=1)
WEBHOOK_TIMEOUT_S: Final = 5.0
MAX_CONCURRENT: Final = 32
PER_RECIPIENT: Final = 8  # in flight to one webhook or mailbox; the alert topic is not capped
QUEUE_MAX: Final = 256  # claimed rows waiting here for a free slot
QUEUED_PER_RECIPIENT: Final = 16  # of those, for one webhook or mailbox
FLUSH_TIMEOUT_S: Final = 5.0
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
        self._event = asyncio.Event()  # something to do: new rows, a free slot, a tick
        self._claim_wanted = True  # the outbox may hold rows due that are not claimed here
        self._more = False  # the last claim filled all the room it had
        self._capped: set[int] = set()  # recipients the last claim gave all it could
        self._session: aiohttp.ClientSession | None = None
        self._queue: list[Notification] = []  # claimed here, waiting for a free slot
        self._in_flight: dict[int, asyncio.Task[None]] = {}  # notification id -> its delivery
        self._busy: Counter[int] = Counter()  # recipient id -> its deliveries in flight
        self._sent: list[tuple[int, str | None, float, datetime]] = []  # not yet recorded
        self._unrecorded: set[int] = set()  # ids of `_sent`: still claimed, not to claim again
        self._sent_event = asyncio.Event()
        self._sent_total = registry.counter(
            "coldchain_notifications_sent_total", "Alarm notifications delivered"
        )
        self._failed = registry.counter(
            "coldchain_notification_failures_total", "Failed notification delivery attempts"
        )
        self._claim_seconds = registry.histogram(
            "coldchain_outbox_claim_seconds", "Time to claim due outbox rows", _DELAY
        )
        self._delay = registry.histogram(
            "coldchain_notification_delay_seconds",
            "From an alarm change being written to its delivery, when the first attempt succeeds",
            _DELAY,
        )

    def room(self) -> int:
        """How many more claimed rows the local queue takes (`take`)."""
        return max(0, QUEUE_MAX - len(self._queue))

    def take(self, claimed: list[Notification]) -> None:
        """Rows the alarm writer wrote claimed for this dispatcher, in the transaction of their
        alarm changes: started at once (the alert topic's published before this returns), with
        no claim to read them back first, nor a turn of the event loop to wait for."""
        self._enqueue(claimed)
        if self._session is not None:  # running
            self._start_queued()
        self._event.set()

    def wake(self) -> None:
        """Alarm changes were written: claim their outbox rows now."""
        self._claim_wanted = True
        self._event.set()

    async def run(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_S)
        )
        recorder = asyncio.create_task(self._record_sent(), name="delivery recorder")
        try:
            while True:
                try:
                    async with asyncio.timeout(1.0):
                        await self._event.wait()
                except TimeoutError:
                    self._claim_wanted = True  # retries come due; other instances write rows
                self._event.clear()
                self._start_queued()
                if self._claim_wanted:
                    self._claim_wanted = False
                    await self._claim()
                    self._start_queued()
        finally:
            recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await recorder
            await self._stop_deliveries()
            await self._record_the_rest()
            await self._session.close()

    async def _claim(self) -> None:
        """Claim due rows into the local queue: more than there are slots, so that one claim
        feeds many deliveries, but no more than `QUEUED_PER_RECIPIENT` waiting for any one
        webhook or mailbox, so a receiver that hangs cannot keep rows claimed for long."""
        room = QUEUE_MAX - len(self._queue)
        if room <= 0:
            return
        held = Counter(self._busy)
        held.update(n.recipient_id for n in self._queue if n.recipient_id is not None)
        claimed_here = [*self._in_flight, *(n.id for n in self._queue), *self._unrecorded]
        started = time.perf_counter()
        try:
            due = await self._store.due_notifications(
                datetime.now(UTC),
                room,
                in_flight=claimed_here,
                busy=dict(held),
                per_recipient=PER_RECIPIENT + QUEUED_PER_RECIPIENT,
            )
        except StoreUnavailable as exc:
            logger.warning("cannot read the notification outbox: %s", exc)
            await asyncio.sleep(1.0)
            return
        self._claim_seconds.observe(time.perf_counter() - started)
        self._more = len(due) == room
        # Recipients that got all the last claim allowed them may have more rows waiting.
        cap = PER_RECIPIENT + QUEUED_PER_RECIPIENT
        held.update(n.recipient_id for n in due if n.recipient_id is not None)
        self._capped = {r for r, count in held.items() if count >= cap}
        if due:
            self._enqueue(due)

    def _enqueue(self, claimed: list[Notification]) -> None:
        self._queue += claimed
        self._queue.sort(key=lambda n: (urgency(n.body), n.id))

    def _start_queued(self) -> None:
        """Start queued deliveries, most urgent first, as far as the slots allow."""
        waiting: list[Notification] = []
        for n in self._queue:
            if len(self._in_flight) >= MAX_CONCURRENT or (
                n.recipient is not None and self._busy[n.recipient.id] >= PER_RECIPIENT
            ):
                waiting.append(n)
            else:
                self._start(n)
        self._queue = waiting

    def _start(self, n: Notification) -> None:
        if n.channel is Channel.MQTT and self._publish_now(n):
            self._delivered(n)
            return
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
        self._delivered(n)

    def _delivered(self, n: Notification) -> None:
        """A delivery is done with, in a task or at once. Claim again if the outbox may hold
        more than is queued here: the last claim was full, or it gave this recipient all it
        could and its queue runs low. (Rows the alarm writer hands over need no claim; rows due
        later come with the tick.)"""
        if self._more or (
            n.recipient_id in self._capped
            and sum(1 for q in self._queue if q.recipient_id == n.recipient_id)
            <= QUEUED_PER_RECIPIENT // 2
        ):
            self._claim_wanted = True
        self._event.set()

    async def _stop_deliveries(self) -> None:
        """Cancel what is still in flight and wait for it. A cancelled delivery is not recorded
        as sent; its claim runs out and it is sent again (at least once, never lost)."""
        tasks = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _record_sent(self) -> None:
        """Record deliveries that went through, all that accumulated in one statement: a
        round trip (and a pool connection) per dispatcher turn, not one per delivery."""
        while True:
            await self._sent_event.wait()
            self._sent_event.clear()
            while self._sent:
                try:
                    await self._record()
                except StoreUnavailable as exc:
                    # Still claimed here, so not sent twice by this instance; once the claims
                    # run out they may be sent again, which receivers recognise.
                    logger.warning("%d deliveries not recorded yet: %s", len(self._sent), exc)
                    await asyncio.sleep(1.0)

    async def _record(self) -> None:
        """Record what has been sent so far, and stop holding it as claimed here."""
        batch = self._sent[:]
        await self._store.delivered(batch)
        del self._sent[: len(batch)]
        self._unrecorded.difference_update(sent[0] for sent in batch)

    async def _record_the_rest(self) -> None:
        if not self._sent:
            return
        try:
            async with asyncio.timeout(FLUSH_TIMEOUT_S):
                await self._record()
        except (StoreUnavailable, TimeoutError):
            # Sent but not recorded: they will be sent again once the database is back; the
            # receiver recognises the repeat by X-Coldchain-Delivery.
            logger.warning("%d notifications sent but not recorded as sent", len(self._sent))

    def _publish_now(self, n: Notification) -> bool:
        """Publish an alert-topic delivery without a task, if it can go at once: under load a
        task's first step waits a turn of the event loop (several ms), on every alarm."""
        started = time.perf_counter()
        topic = alert_topic(str(n.body["shipment_id"]))
        if not self._broker.publish_now(topic, msgspec.json.encode(n.body)):
            return False  # its task waits for the broker, or reports why it cannot
        self._succeeded(n, "published", started)
        return True

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
        self._succeeded(n, detail, started)

    def _succeeded(self, n: Notification, detail: str | None, started: float) -> None:
        elapsed = (time.perf_counter() - started) * 1000
        now = datetime.now(UTC)
        self._sent_total.inc()
        if n.attempts == 0:
            self._delay.observe((now - n.created_at).total_seconds())
        self._sent.append((n.id, detail, elapsed, now))
        self._unrecorded.add(n.id)
        self._sent_event.set()

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
