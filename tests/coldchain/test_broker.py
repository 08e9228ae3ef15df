"""The service's MQTT link publishes alerts even when every packet id the broker allows is
awaiting its PUBACK, as it is while the ingest holds reads back (PUBACKs are not read then)."""

from __future__ import annotations

import asyncio
import threading

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from coldchain.broker import BrokerLink
from coldchain.settings import MqttAddress

pytestmark = [pytest.mark.mqtt]


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
        handler=lambda topic, payload, mid: None,
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
