"""Store and forward: a device-side MQTT publisher that loses nothing it was not told to drop.

One :class:`StoreAndForwardPublisher` holds one MQTT connection (paho-mqtt, MQTT 3.1.1, a stable
client id, ``clean_session=False``) and publishes for any number of dewars, as a gateway does.
Each reading goes to ``coldchain/v1/dewars/{id}/telemetry`` with QoS 1.

Where a reading lives, and why none is lost:

1. :meth:`~StoreAndForwardPublisher.submit` appends it to its dewar's **backlog**, a bounded
   deque. The bound (``backlog_limit``, default :data:`DEFAULT_BACKLOG_LIMIT` = 20 160 readings,
   two weeks of one-minute readings, the longest a dry shipper holds; about 7 MB per dewar) keeps
   memory bounded through a long outage. When it overflows the **oldest** reading is dropped,
   as a logger's ring buffer does, counted in ``dropped`` and logged (once per dewar, then every
   1000 drops). That is the only way a reading is ever dropped.
2. A sender thread takes readings from the backlogs of dewars whose link is up, while the broker
   connection is up: one reading alone goes out as a JSON object, a backlog of several as
   arrays of up to 1000 (:func:`~sensors.schema.encode_batch`), oldest first, with the device's
   original ``ts`` and ``seq``.
3. From the moment ``client.publish`` returns, the message is in **paho's own outgoing queue**,
   and paho keeps a QoS 1 message there until the broker's PUBACK arrives: if the connection
   drops, paho marks it DUP and sends it again after reconnecting. So an unconfirmed reading is
   never dropped: it sits either in our backlog or in paho's queue. That queue is in memory, so
   it is bounded too: at most ``max_inflight`` messages and ``max_inflight_bytes`` of payload
   are handed to paho and not yet acknowledged; paho's own in-flight limit is raised to the same
   ``max_inflight`` (default 1000; paho's default of 20 would cap throughput).
4. :meth:`~StoreAndForwardPublisher.flush` and :meth:`~StoreAndForwardPublisher.close` wait until
   everything that can be sent is acknowledged; closing while QoS 1 messages are in flight is how
   other tools lose them. Readings held back by a dewar's own link loss cannot be sent and stay
   counted in ``buffered``; ``close`` logs what is left unsent, since the backlog is not persisted
   across process restarts.

Link loss is per dewar (``submit(..., link_up=False)``, as the simulator reports it) or
global (the broker is unreachable). paho reconnects on its own with capped exponential backoff
(``reconnect_delay_set``).

Status: each dewar's retained ``coldchain/v1/dewars/{id}/status`` says ``online`` when its link
comes up and ``offline`` when it goes down or the publisher closes. One connection has one last
will, so a will is set only for a single-dewar publisher (``will_dewar_id``); in a gateway of
simulated dewars the publisher itself publishes ``offline`` when a dewar's link drops, the
message a real device's broker would publish as its will.

Threads: paho's network thread only runs the callbacks, which update counters under ``_lock``;
the sender thread is the only one calling ``client.publish``, never while holding ``_lock``
(paho calls ``on_publish`` holding its own message mutex, so the reverse order would deadlock).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from sensors.schema import MAX_BATCH, Reading, encode_batch, encode_reading
from sensors.topics import DEWAR_ID_PATTERN, status_topic, telemetry_topic

logger = logging.getLogger(__name__)

DEFAULT_BACKLOG_LIMIT: Final = 14 * 24 * 60
DEFAULT_MAX_INFLIGHT: Final = 1000
DEFAULT_MAX_INFLIGHT_BYTES: Final = 16 * 1024 * 1024
DROP_LOG_EVERY: Final = 1000
QOS: Final = 1


class _Status(msgspec.Struct, frozen=True):
    state: str
    ts: datetime


@dataclass(frozen=True, slots=True)
class PublisherStats:
    """Counts of readings (not messages) since the publisher started.

    ``published``: handed to the broker connection; ``acknowledged``: confirmed by PUBACK;
    ``buffered``: waiting in backlogs now; ``dropped``: lost to a full backlog;
    ``in_flight``: published, not yet acknowledged.
    """

    published: int
    acknowledged: int
    buffered: int
    dropped: int
    in_flight: int
    connected: bool


@dataclass(slots=True)
class _Dewar:
    backlog: deque[Reading]
    link_up: bool = True
    dropped: int = 0
    status: _Status | None = None  # the status still to publish, if any


@dataclass(slots=True)
class _InFlight:
    readings: int
    size: int
    dewar_id: str | None = None  # set for readings, None for a status message
    first_seq: int = 0
    last_seq: int = 0
    acked: bool = field(default=False)


class StoreAndForwardPublisher:
    """Publishes readings of one or many dewars over one MQTT connection, store and forward.

    Use as a context manager, or call :meth:`start` and :meth:`close`.
    """

    def __init__(
        self,
        host: str,
        port: int = 1883,
        *,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        backlog_limit: int = DEFAULT_BACKLOG_LIMIT,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        max_inflight_bytes: int = DEFAULT_MAX_INFLIGHT_BYTES,
        keepalive: int = 30,
        reconnect_min_delay: int = 1,
        reconnect_max_delay: int = 30,
        will_dewar_id: str | None = None,
    ) -> None:
        if backlog_limit < 1:
            raise ValueError(f"backlog_limit must be at least 1, got {backlog_limit}")
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, got {max_inflight}")
        if will_dewar_id is not None and not DEWAR_ID_PATTERN.fullmatch(will_dewar_id):
            raise ValueError(f"bad dewar id {will_dewar_id!r}")
        self.host = host
        self.port = port
        self.client_id = client_id or f"coldchain-gateway-{socket.gethostname()}"[:64]
        self.backlog_limit = backlog_limit
        self.max_inflight = max_inflight
        self.max_inflight_bytes = max_inflight_bytes

        self._lock = threading.Condition()
        self._dewars: dict[str, _Dewar] = {}
        self._inflight: dict[int, _InFlight] = {}
        self._early_acks: set[int] = set()
        self._inflight_bytes = 0
        self._sending = 0  # taken off a backlog, not yet recorded as in flight
        self._connected = False
        self._stopping = False
        self._started = False
        self._published = 0
        self._acknowledged = 0
        self._dropped = 0
        self._sender: threading.Thread | None = None

        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        client.max_inflight_messages_set(max_inflight)
        client.reconnect_delay_set(reconnect_min_delay, reconnect_max_delay)
        if username is not None:
            client.username_pw_set(username, password)
        if will_dewar_id is not None:
            will = msgspec.json.encode(_Status("offline", datetime.now(UTC)))
            client.will_set(status_topic(will_dewar_id), will, qos=QOS, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._client = client
        self._keepalive = keepalive

    # Life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting (in the background; an unreachable broker is retried) and sending."""
        if self._started:
            raise RuntimeError("publisher already started")
        self._started = True
        self._client.connect_async(self.host, self.port, keepalive=self._keepalive)
        self._client.loop_start()
        self._sender = threading.Thread(
            target=self._run_sender, name=f"mqtt-sender-{self.client_id}", daemon=True
        )
        self._sender.start()
        logger.info("publisher %s connecting to %s:%d", self.client_id, self.host, self.port)

    def flush(self, timeout: float) -> bool:
        """Wait until every reading that can be sent is acknowledged by the broker.

        Readings of dewars whose link is down are not waited for. True when done, False when
        ``timeout`` seconds ran out first.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._drained():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.5))
            return True

    def close(self, timeout: float = 10.0) -> bool:
        """Flush, publish every dewar ``offline``, disconnect and stop. True if nothing that
        could be sent was left unacknowledged."""
        if not self._started:
            return True
        done = self.flush(timeout)
        now = datetime.now(UTC)
        with self._lock:
            for dewar in self._dewars.values():
                dewar.status = _Status("offline", now)
            self._lock.notify_all()
        done = self.flush(min(timeout, 5.0)) and done
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._sender is not None:
            self._sender.join(timeout=5.0)
        self._client.disconnect()
        self._client.loop_stop()
        stats = self.stats
        if not done or stats.buffered:
            logger.warning(
                "publisher %s closed with %d readings unacknowledged and %d unsent",
                self.client_id,
                stats.in_flight,
                stats.buffered,
            )
        else:
            logger.info(
                "publisher %s closed: %d readings published, all acknowledged",
                self.client_id,
                stats.acknowledged,
            )
        self._started = False
        return done

    def __enter__(self) -> StoreAndForwardPublisher:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # What callers use ------------------------------------------------------------------------

    def submit(self, dewar_id: str, reading: Reading, *, link_up: bool = True) -> None:
        """Queue one reading of ``dewar_id``; ``link_up`` says whether that device can reach
        the network right now (False: it is kept in the backlog until a later call says True)."""
        with self._lock:
            dewar = self._dewars.get(dewar_id)
            if dewar is None:
                if not DEWAR_ID_PATTERN.fullmatch(dewar_id):
                    raise ValueError(f"bad dewar id {dewar_id!r}")
                dewar = _Dewar(deque(), link_up=link_up)
                dewar.status = _Status("online" if link_up else "offline", reading.ts)
                self._dewars[dewar_id] = dewar
            elif dewar.link_up != link_up:
                dewar.link_up = link_up
                dewar.status = _Status("online" if link_up else "offline", reading.ts)
                logger.info(
                    "%s: link %s at %s (%d readings in backlog)",
                    dewar_id,
                    "restored" if link_up else "lost",
                    reading.ts.isoformat(),
                    len(dewar.backlog),
                )
            if len(dewar.backlog) >= self.backlog_limit:
                dewar.backlog.popleft()
                dewar.dropped += 1
                self._dropped += 1
                if dewar.dropped == 1 or dewar.dropped % DROP_LOG_EVERY == 0:
                    logger.warning(
                        "%s: backlog full at %d readings, dropping the oldest (%d dropped so far)",
                        dewar_id,
                        self.backlog_limit,
                        dewar.dropped,
                    )
            dewar.backlog.append(reading)
            self._lock.notify_all()

    @property
    def stats(self) -> PublisherStats:
        with self._lock:
            return PublisherStats(
                published=self._published,
                acknowledged=self._acknowledged,
                buffered=sum(len(d.backlog) for d in self._dewars.values()),
                dropped=self._dropped,
                in_flight=self._published - self._acknowledged,
                connected=self._connected,
            )

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._connected

    # paho callbacks (paho's network thread) ---------------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        if reason_code.is_failure:
            logger.warning(
                "broker %s:%d refused the connection: %s", self.host, self.port, reason_code
            )
            return
        logger.info(
            "connected to %s:%d as %s (session present: %s)",
            self.host,
            self.port,
            self.client_id,
            flags.session_present,
        )
        with self._lock:
            self._connected = True
            self._lock.notify_all()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        with self._lock:
            was_connected, self._connected = self._connected, False
            in_flight = len(self._inflight)
            self._lock.notify_all()
        if was_connected and not self._stopping:
            logger.warning(
                "lost the broker %s:%d (%s); %d messages in flight are kept for resending",
                self.host,
                self.port,
                reason_code,
                in_flight,
            )

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Any,
    ) -> None:
        with self._lock:
            entry = self._inflight.get(mid)
            if entry is None:  # acknowledged before the sender recorded the message
                self._early_acks.add(mid)
            else:
                self._acknowledge(mid, entry)
            self._lock.notify_all()

    def _acknowledge(self, mid: int, entry: _InFlight) -> None:
        del self._inflight[mid]
        self._inflight_bytes -= entry.size
        self._acknowledged += entry.readings

    # Sender thread ---------------------------------------------------------------------------

    def _drained(self) -> bool:
        if self._inflight or self._sending:
            return False
        return not any(
            d.status is not None or (d.link_up and d.backlog) for d in self._dewars.values()
        )

    def _room(self) -> bool:
        return (
            len(self._inflight) < self.max_inflight
            and self._inflight_bytes < self.max_inflight_bytes
        )

    def _next_message(self) -> tuple[str, bytes, bool, _InFlight] | None:
        """Take the next message to send off the backlogs (under the lock), or None."""
        if not self._connected or not self._room():
            return None
        for dewar_id, dewar in self._dewars.items():
            if dewar.status is not None:
                status, dewar.status = dewar.status, None
                payload = msgspec.json.encode(status)
                return status_topic(dewar_id), payload, True, _InFlight(0, len(payload))
        for dewar_id, dewar in self._dewars.items():
            if dewar.link_up and dewar.backlog:
                count = min(MAX_BATCH, len(dewar.backlog))
                chunk = [dewar.backlog.popleft() for _ in range(count)]
                payload = encode_reading(chunk[0]) if count == 1 else encode_batch(chunk)
                entry = _InFlight(count, len(payload), dewar_id, chunk[0].seq, chunk[-1].seq)
                # Move this dewar to the end, so a long backlog does not starve the others.
                self._dewars[dewar_id] = self._dewars.pop(dewar_id)
                return telemetry_topic(dewar_id), payload, False, entry
        return None

    def _run_sender(self) -> None:
        try:
            while True:
                with self._lock:
                    message = self._next_message()
                    while message is None:
                        if self._stopping:
                            return
                        self._lock.wait(0.5)
                        message = self._next_message()
                    self._inflight_bytes += message[3].size
                    self._sending += 1
                topic, payload, retain, entry = message
                info = self._client.publish(topic, payload, qos=QOS, retain=retain)
                if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                    # Not queued by paho (should not happen below paho's limits): keep it.
                    logger.error("paho refused a message on %s: %s", topic, info.rc)
                    self._requeue(entry, payload)
                    continue
                with self._lock:
                    self._sending -= 1
                    self._inflight[info.mid] = entry
                    self._published += entry.readings
                    if info.mid in self._early_acks:
                        self._early_acks.discard(info.mid)
                        self._acknowledge(info.mid, entry)
                    self._lock.notify_all()
                if entry.readings > 1:
                    logger.debug(
                        "%s: sent backlog batch of %d readings (seq %d-%d)",
                        entry.dewar_id,
                        entry.readings,
                        entry.first_seq,
                        entry.last_seq,
                    )
        except Exception:
            logger.exception("publisher %s: sender thread crashed", self.client_id)
            raise

    def _requeue(self, entry: _InFlight, payload: bytes) -> None:
        decoded = msgspec.json.decode(payload, type=Reading | list[Reading])
        readings = decoded if isinstance(decoded, list) else [decoded]
        with self._lock:
            self._sending -= 1
            self._inflight_bytes -= entry.size
            if entry.dewar_id is not None:
                self._dewars[entry.dewar_id].backlog.extendleft(reversed(readings))
            self._lock.notify_all()
        time.sleep(0.1)
