"""The service's MQTT link: it publishes alerts even when every packet id the broker allows is
awaiting its PUBACK, as it is while the ingest holds reads back (PUBACKs are not read then), and
its own packet splitter hands on every publish exactly once, whatever the socket's reads cut."""

from __future__ import annotations

import asyncio
import threading

import paho.mqtt.client as paho
import pytest
from gmqtt.mqtt.package import Package
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from coldchain.broker import BrokerLink, Message, _split_packets
from coldchain.settings import MqttAddress


@pytest.mark.mqtt
async def test_a_publish_waits_for_a_free_packet_id_instead_of_failing(
    mqtt_url: str, unique: str
) -> None:
    address = MqttAddress.parse(mqtt_url)
    topic = f"coldchain/v1/alerts/SH-ID-{unique}"
    got: list[bytes] = []
    lock = threading.Lock()
    listener = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"ids-{unique}")

    def on_message(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        with lock:
            got.append(bytes(msg.payload))

    listener.on_message = on_message
    listener.connect(address.host, address.port)
    listener.subscribe(topic, qos=1)
    listener.loop_start()
    link = BrokerLink(
        address,
        client_id=f"link-{unique}",
        subscriptions=[],
        handler=lambda messages: None,
        receive_maximum=100,
        session_expiry_s=60,
    )
    try:
        await link.run()
        await asyncio.wait_for(link.wait_connected(), 10)
        await asyncio.sleep(0.5)  # the listener's subscription is in place
        # As if the broker allowed 3 in flight, and stop reading the socket as a full ingest
        # does: PUBACKs are not read, so no packet id comes free.
        link._client._connection._protocol.id_generator._max = 4
        transport = link._transport()
        assert transport is not None
        transport.pause_reading()
        await asyncio.sleep(0.2)
        sends = [asyncio.create_task(link.publish(topic, b"%d" % i)) for i in range(8)]
        await asyncio.sleep(0.5)
        assert sum(task.done() for task in sends) == 3  # the rest wait for a packet id
        assert not any(task.done() and task.exception() for task in sends)
        transport.resume_reading()
        await asyncio.wait_for(asyncio.gather(*sends), 10)
        for _ in range(100):
            with lock:
                if len(got) == 8:
                    break
            await asyncio.sleep(0.05)
        with lock:
            assert sorted(got) == [b"%d" % i for i in range(8)]
    finally:
        await link.close()
        listener.disconnect()
        listener.loop_stop()


def _publish_packet(topic: bytes, payload: bytes, mid: int, *, properties: bytes | None) -> bytes:
    """A QoS 1 PUBLISH; `properties` None for MQTT 3.1.1 (no property block)."""
    body = len(topic).to_bytes(2, "big") + topic + mid.to_bytes(2, "big")
    if properties is not None:
        body += bytes([len(properties)]) + properties
    body += payload
    length, size = b"", len(body)
    while True:
        byte, size = size % 128, size // 128
        length += bytes([byte | (0x80 if size else 0)])
        if not size:
            break
    return b"\x32" + length + body


class _Delivered(list[Message]):
    """A message handler that keeps what it is handed, and each read's share of it."""

    def __init__(self, log: list[object] | None = None) -> None:
        super().__init__()
        self.log = log if log is not None else []

    def __call__(self, messages: list[Message]) -> None:
        self.log.append([m[0] for m in messages])
        self.extend(messages)


class _Handler:
    def __init__(self) -> None:
        self.current_connection: object = None


class _Connection:
    """What `_split_packets` uses of a gmqtt connection: its handler and `put_package`."""

    def __init__(self) -> None:
        self._handler = _Handler()
        self._handler.current_connection = self
        self._last_data_in = 0.0
        self.packages: list[tuple[int, bytes]] = []

        self.log: list[object] = []

    def put_package(self, package: Package) -> None:
        self.packages.append((package.cmd, package.data))
        self.log.append(package.cmd)


@pytest.mark.parametrize("mqtt5", [True, False])
def test_the_packet_splitter_takes_publishes_itself_and_leaves_the_rest_to_gmqtt(
    mqtt5: bool,
) -> None:
    empty = b"" if mqtt5 else None
    big = bytes(range(256)) * 80  # a remaining length of three bytes
    stream = [
        _publish_packet(b"coldchain/v1/dewars/D1/telemetry", b'{"seq":1}', 7, properties=empty),
        _publish_packet(b"coldchain/v1/dewars/D1/telemetry", b'{"seq":2}', 8, properties=empty),
        b"\xd0\x00",  # PINGRESP
        _publish_packet(b"coldchain/v1/dewars/D2/telemetry", big, 65535, properties=empty),
        b"\x40\x02\x00\x05",  # PUBACK of one of our publishes
        _publish_packet(b"t/\xff", b"bad topic", 9, properties=empty),
        b"\x30\x05\x00\x01aok",  # QoS 0
    ]
    if mqtt5:  # a property (message expiry): gmqtt parses those
        stream.append(_publish_packet(b"t/p", b"props", 11, properties=b"\x02\x00\x00\x00\x3c"))
    data = b"".join(stream)
    connection = _Connection()
    whole = _Delivered(connection.log)
    assert _split_packets(connection, whole, data, mqtt5=mqtt5) == len(data)
    d1, d2 = "coldchain/v1/dewars/D1/telemetry", "coldchain/v1/dewars/D2/telemetry"
    assert whole == [(d1, b'{"seq":1}', 7), (d1, b'{"seq":2}', 8), (d2, big, 65535)]
    rest = [(0xD0, b""), (0x40, b"\x00\x05"), (0x32, stream[5][2:]), (0x30, b"\x00\x01aok")]
    if mqtt5:
        rest.append((0x32, stream[7][2:]))
    # In the order they came: the publishes of a run together, each run before what follows it.
    assert connection.log == [[d1, d1], 0xD0, [d2], 0x40, 0x32, 0x30] + [0x32] * mqtt5
    assert connection.packages == rest
    assert connection._last_data_in > 0

    # The same bytes in every split the socket may make: each packet exactly once, in order.
    for cut in range(1, len(data), 37):
        got = _Delivered()
        connection = _Connection()
        buf = data[:cut]
        used = _split_packets(connection, got, buf, mqtt5=mqtt5)
        buf = buf[used:] + data[cut:]
        assert _split_packets(connection, got, buf, mqtt5=mqtt5) == len(buf)
        assert got == whole and connection.packages == rest, cut


def test_the_packet_splitter_refuses_an_impossible_length_and_a_stale_connection() -> None:
    connection = _Connection()
    assert (
        _split_packets(connection, lambda *m: None, b"\x32\xff\xff\xff\xff\x01", mqtt5=True) == -1
    )
    packet = _publish_packet(b"a/b", b"x", 1, properties=b"")
    connection._handler.current_connection = object()  # a newer connection took over
    got = _Delivered()
    assert _split_packets(connection, got, packet, mqtt5=True) == len(packet)
    assert got == []  # gmqtt's put_package drops it, as it drops all a superseded one reads
    assert connection.packages == [(0x32, packet[2:])]


@pytest.mark.mqtt
async def test_the_link_hands_on_every_kind_of_publish_and_its_acknowledgements_hold(
    mqtt_url: str, unique: str
) -> None:
    """Through a real broker: plain QoS 1 publishes (the splitter's own path), ones with MQTT 5
    properties and QoS 0 (gmqtt's), a large one, a burst; once acknowledged, a new connection of
    the same session gets none of them again."""
    address = MqttAddress.parse(mqtt_url)
    prefix = f"coldchain/v1/dewars/BR-{unique}"
    got: list[Message] = []

    def link() -> BrokerLink:
        return BrokerLink(
            address,
            client_id=f"split-{unique}",
            subscriptions=[f"{prefix}/#"],
            handler=got.extend,
            receive_maximum=1000,
            session_expiry_s=60,
        )

    first = link()
    await first.run()
    await asyncio.wait_for(first.wait_connected(), 10)
    await asyncio.sleep(0.3)  # subscribed
    publisher = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"pub-{unique}", protocol=paho.MQTTv5
    )
    publisher.connect(address.host, address.port)
    publisher.loop_start()
    expiry = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    expiry.MessageExpiryInterval = 3600
    sent: list[tuple[str, bytes, int, Properties | None]]
    sent = [(f"{prefix}/a", b"%d" % i, 1, None) for i in range(300)]
    sent += [(f"{prefix}/big", b"x" * 70_000, 1, None), (f"{prefix}/zero", b"q0", 0, None)]
    sent += [(f"{prefix}/props", b"with expiry", 1, expiry)]
    try:
        for topic, payload, qos, props in sent:
            publisher.publish(topic, payload, qos=qos, properties=props).wait_for_publish(5)
        for _ in range(200):
            if len(got) == len(sent):
                break
            await asyncio.sleep(0.05)
        assert sorted((t, p) for t, p, _ in got) == sorted((t, p) for t, p, _, _ in sent)
        assert all((mid is None) == topic.endswith("/zero") for topic, _, mid in got)
        first.acknowledge([mid for _, _, mid in got if mid is not None])
        await asyncio.sleep(0.3)
    finally:
        await first.close()
    got.clear()
    second = link()
    try:
        await second.run()
        await asyncio.wait_for(second.wait_connected(), 10)
        await asyncio.sleep(1.0)
        assert got == []  # every acknowledgement reached the broker
    finally:
        await second.close()
        publisher.disconnect()
        publisher.loop_stop()
