"""The service's MQTT connection, on gmqtt: an asyncio-native client on the hot path.

Why gmqtt and not paho here: paho's receive path costs about 100 µs of CPU per QoS 1 message on
this class of machine, which caps one process near 9,000 readings/s; gmqtt parses in the event
loop at a fraction of that. Devices keep paho (see `sensors.publisher`).

Acknowledgement after commit: gmqtt would send each PUBACK when a per-message coroutine returns;
a task per message and a socket write per PUBACK cost more than the rest of the ingest together.
So the link takes QoS 1 publishes itself (it replaces the handler's QoS 1 hook on this client
instance) and hands `(topic, payload, packet_id)` to a plain function. The ingest calls
`acknowledge` with the packet ids of a batch once it is committed, and the PUBACKs of the batch
leave in one write, in the order the publishes came. A packet id stays allocated in the session
until it is acknowledged, so an acknowledgement that reaches a later connection of the same
session still names the same message (which the broker has sent again, and which is stored once).

Flow control: the session asks for MQTT 5 "Receive Maximum", so the broker should never have more
than that many unacknowledged messages out to us. Mosquitto 2.0 (Debian 12's) was measured to keep
to it only until acknowledgements start flowing (a client acknowledging in batches then had 6,500
outstanding with a maximum of 10), so the service does not rely on it: `pause_reading` stops
reading the socket while too much is outstanding, and TCP pushes back on the broker, which keeps
the rest queued in the session. (gmqtt reads through an asyncio StreamReader, which resumes the
transport whenever its buffer drains, so the pause gates gmqtt's own reads instead: the reader's
buffer then fills, it pauses the transport itself, and TCP pushes back.) The session is persistent
(clean start off, a long expiry), so the broker also queues what arrives while the service is
down.

Splitting packets: gmqtt's own packet path costs a fifth of the service's CPU at full rate, so
the link splits what the socket gives into packets itself (`_split_packets`) and hands a QoS 1
publish without properties straight on; everything else goes through gmqtt as before.

gmqtt internals used (pinned to 0.8 in pyproject): `Client._package_handler`'s
`_handle_qos_1_publish_packet(mid, payload, topic, properties)` hook, and the connection's
protocol (its `read` coroutine, `_read_packet`, `proto_ver`), its `put_package`, `_handler`
(`current_connection`), `_last_data_in` and transport. The broker and ingest tests fail if any
of them moves.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import gmqtt
from gmqtt.mqtt.package import Package

from coldchain.settings import MqttAddress

logger = logging.getLogger(__name__)

Message = tuple[str, bytes, int | None]  # topic, payload, packet id (None for QoS 0)
# Takes messages in the order they came, as many as one read of the socket held; must not block
# and must not raise for any input.
MessageHandler = Callable[[list[Message]], None]

_PUBACK = struct.Struct("!BBH")  # fixed header 0x40, remaining length 2, packet id
PUBLISH_WAIT_S = 10.0


class BrokerLink:
    """One persistent MQTT session: subscribes on every connect, reconnects with capped backoff,
    hands each message to `handler`, and acknowledges what the caller says is committed."""

    def __init__(
        self,
        address: MqttAddress,
        *,
        client_id: str,
        subscriptions: Sequence[str],
        handler: MessageHandler,
        receive_maximum: int,
        session_expiry_s: int,
        backoff_cap_s: float = 5.0,
    ) -> None:
        self._address = address
        self._subscriptions = list(subscriptions)
        self._handler = handler
        self._backoff_cap_s = backoff_cap_s
        self._connected = asyncio.Event()
        self._closing = False
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._client: Any = gmqtt.Client(
            client_id,
            clean_session=False,
            optimistic_acknowledgement=False,
            session_expiry_interval=session_expiry_s,
            receive_maximum=receive_maximum,
        )
        if address.username:
            self._client.set_auth_credentials(address.username, address.password)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_qos0_message
        self._client._package_handler._handle_qos_1_publish_packet = self._on_qos1_publish
        self._client.set_config({"reconnect_retries": -1, "reconnect_delay": 1})

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def run(self) -> None:
        """Connect, retrying with capped exponential backoff until it works; gmqtt then keeps
        the session up by itself (its reconnect delay follows the same backoff)."""
        delay = 0.25
        while True:
            try:
                await self._client.connect(self._address.host, self._address.port, keepalive=30)
            except (TimeoutError, OSError, gmqtt.MQTTConnectError) as exc:
                logger.warning(
                    "MQTT broker %s unreachable (%s); retrying in %.1f s",
                    self._address.url,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff_cap_s)
                continue
            return

    async def close(self) -> None:
        """Disconnect; nothing can be acknowledged after this returns."""
        self._closing = True
        if self._client.is_connected:
            await self._client.disconnect()

    def acknowledge(self, packet_ids: list[int]) -> None:
        """Send the PUBACKs of committed messages, in one write. While disconnected they are
        dropped: the broker sends those messages again and they are stored once."""
        transport = self._transport()
        if not packet_ids or transport is None or transport.is_closing():
            return
        transport.write(b"".join(_PUBACK.pack(0x40, 2, mid) for mid in packet_ids))

    def pause_reading(self) -> None:
        """Stop taking messages from the broker until `resume_reading` (back-pressure)."""
        self._flowing.clear()

    def resume_reading(self) -> None:
        self._flowing.set()

    def publish_now(self, topic: str, payload: bytes, *, qos: int = 1) -> bool:
        """Publish if it can go at once (connected, and a packet id free at QoS 1); False if
        not, and then nothing was sent. Publishing is a write to the socket."""
        if not self.connected:
            return False
        try:
            self._client.publish(topic, payload, qos=qos)
        except OverflowError:
            return False
        return True

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish; at QoS 1, wait while every packet id the broker allows in flight (its
        Receive Maximum: 20 in Mosquitto's default configuration) awaits its PUBACK, rather
        than fail: gmqtt raises OverflowError then, and a burst of alerts would have crashed
        their deliveries until their claims ran out. ConnectionError if it stays full."""
        deadline = asyncio.get_running_loop().time() + PUBLISH_WAIT_S
        while True:
            try:
                self._client.publish(topic, payload, qos=qos, retain=retain)
            except OverflowError:
                if asyncio.get_running_loop().time() > deadline:
                    raise ConnectionError(
                        "the broker acknowledged none of our QoS 1 publishes for "
                        f"{PUBLISH_WAIT_S:g} s"
                    ) from None
                await asyncio.sleep(0.002)
            else:
                return

    def _transport(self) -> asyncio.Transport | None:
        connection = getattr(self._client, "_connection", None)
        transport: asyncio.Transport | None = getattr(connection, "_transport", None)
        return transport

    def _take_over_reads(self) -> None:
        """Hook this connection's read loop: wait while the ingest is full, and split what
        is read into packets with `_split_packets`."""
        connection = getattr(self._client, "_connection", None)
        protocol = getattr(connection, "_protocol", None)
        if protocol is None or getattr(protocol, "_coldchain_hooked", False):
            return
        read = protocol.read
        flowing = self._flowing

        async def gated_read(n: int = -1) -> bytes:
            await flowing.wait()
            data: bytes = await read(n)
            return data

        protocol.read = gated_read
        mqtt5 = protocol.proto_ver >= gmqtt.constants.MQTTv50
        protocol._read_packet = functools.partial(
            _split_packets, connection, self._deliver, mqtt5=mqtt5
        )
        protocol._coldchain_hooked = True

    def _on_qos1_publish(self, mid: int, payload: bytes, topic: str, properties: Any) -> None:
        self._deliver([(topic, payload, mid)])

    def _on_qos0_message(
        self, client: Any, topic: str, payload: bytes, qos: int, properties: Any
    ) -> None:
        # Only QoS 0 comes here: subscriptions are QoS 1, so the broker downgrades QoS 2.
        self._deliver([(topic, payload, None)])

    def _deliver(self, messages: list[Message]) -> None:
        try:
            self._handler(messages)
        except Exception:
            # The handler dead-letters bad input itself; reaching this is a bug. What it did not
            # take is left unacknowledged, so the broker delivers it again on the next session.
            logger.exception(
                "%d message(s) from %s on could not be handled; left unacknowledged",
                len(messages),
                messages[0][0],
            )

    def _on_connect(self, client: Any, flags: int, result: int, properties: Any) -> None:
        logger.info("connected to MQTT broker %s (session present: %s)", self._address.url, flags)
        client.reconnect_delay = 1
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        self._take_over_reads()  # each connection is new; a paused ingest stays paused across them
        self._connected.set()

    def _on_disconnect(self, client: Any, packet: Any, exc: BaseException | None = None) -> None:
        if self._connected.is_set() and not self._closing:
            logger.warning("lost the MQTT broker %s; reconnecting", self._address.url)
        self._connected.clear()
        client.reconnect_delay = min(max(client.reconnect_delay, 0.5) * 2, self._backoff_cap_s)


def _split_packets(connection: Any, deliver: MessageHandler, data: bytes, *, mqtt5: bool) -> int:
    """Split what the read loop has buffered into MQTT packets; returns the bytes used, or -1
    for a length no packet can have (gmqtt then drops the connection).

    It stands in for gmqtt's own `MQTTProtocol._read_packet`, which builds a `Package` for each
    packet and passes it through the connection and the handler's dispatch, property parsing
    and topic-alias bookkeeping: a fifth of the service's CPU at full rate, with the rules on.
    A QoS 1 PUBLISH with no properties (what devices send, and what Mosquitto passes on) goes
    to `deliver` directly, in one list with the others of its run in the same read; every
    other packet, including a PUBLISH with properties or one that does not parse, goes to gmqtt
    as before, after the run before it. Like gmqtt, a connection that has been replaced by a
    newer one delivers nothing more."""
    put_package = connection.put_package
    handler = connection._handler
    connection._last_data_in = time.monotonic()  # keep-alive: the broker is talking
    size = len(data)
    start = 0
    taken: list[Message] = []
    while size - start >= 2:
        # Fixed header: the packet type byte, then the remaining length (1-4 bytes, 7 bits each).
        at = start + 1
        length = 0
        shift = 0
        while at < size:
            byte = data[at]
            at += 1
            length |= (byte & 0x7F) << shift
            if byte < 0x80 or shift == 21:
                break
            shift += 7
        else:
            break  # the rest of the header is still to come
        if byte >= 0x80:
            start = -1
            break
        end = at + length
        if end > size:
            break  # the rest of the packet is still to come
        command = data[start]
        if command & 0xF6 == 0x32 and length >= 4 and handler.current_connection is connection:
            # PUBLISH at QoS 1 (dup and retain either way): topic, packet id, then properties.
            topic_end = at + 2 + (data[at] << 8 | data[at + 1])
            body = topic_end + 3 if mqtt5 else topic_end + 2
            if body <= end and (not mqtt5 or data[topic_end + 2] == 0):
                try:
                    topic = data[at + 2 : topic_end].decode()
                except UnicodeDecodeError:
                    pass  # gmqtt logs it
                else:
                    taken.append(
                        (topic, data[body:end], data[topic_end] << 8 | data[topic_end + 1])
                    )
                    start = end
                    continue
        if taken:  # what came before this packet is handled before it
            deliver(taken)
            taken = []
        put_package(Package(command, data[at:end]))
        start = end
    if taken:
        deliver(taken)
    return start
