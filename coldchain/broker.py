"""The service's MQTT connection, on gmqtt: an asyncio-native client on the hot path.

Why gmqtt and not paho here: paho's receive path costs about 100 µs of CPU per QoS 1 message on
this class of machine, which caps one process near 9,000 readings/s; gmqtt parses in the event
loop at a fraction of that. Devices keep paho (see `sensors.publisher`).

Acknowledgement after commit: the client is made with `optimistic_acknowledgement=False`, so
gmqtt sends the PUBACK of a QoS 1 message only when our `on_message` coroutine returns. The
ingest returns only once the reading (or its dead letter) is committed in PostgreSQL.

Flow control: the session asks for MQTT 5 "Receive Maximum", so the broker never has more than
that many unacknowledged messages out to us: this bounds the service's memory however far the
database falls behind. The session is persistent (clean start off, a long expiry), so the broker
queues what arrives while the service is down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import gmqtt

from coldchain.settings import MqttAddress

logger = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], Awaitable[None]]


class Unacknowledged(Exception):
    """Raised by a handler to leave a message unacknowledged, so the broker delivers it again
    on the next session (the service is stopping before the message was committed)."""


_PUBACK_SUCCESS = 0
_PUBACK_UNSPECIFIED_ERROR = 0x80


class BrokerLink:
    """One persistent MQTT session: subscribes on every connect, reconnects with capped backoff,
    and hands each message to `handler`, acknowledging it when the handler returns."""

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
        self._client.on_message = self._on_message
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
        self._closing = True
        if self._client.is_connected:
            await self._client.disconnect()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self._client.publish(topic, payload, qos=qos, retain=retain)

    def _on_connect(self, client: Any, flags: int, result: int, properties: Any) -> None:
        logger.info("connected to MQTT broker %s (session present: %s)", self._address.url, flags)
        client.reconnect_delay = 1
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        self._connected.set()

    def _on_disconnect(self, client: Any, packet: Any, exc: BaseException | None = None) -> None:
        if self._connected.is_set() and not self._closing:
            logger.warning("lost the MQTT broker %s; reconnecting", self._address.url)
        self._connected.clear()
        client.reconnect_delay = min(max(client.reconnect_delay, 0.5) * 2, self._backoff_cap_s)

    async def _on_message(
        self, client: Any, topic: str, payload: bytes, qos: int, properties: Any
    ) -> int:
        try:
            await self._handler(topic, payload)
        except Unacknowledged:
            if self._client.is_connected:
                raise
            # Disconnected: whatever gmqtt does with the reason code below cannot reach the
            # broker, and returning quietly keeps a clean shutdown free of error logs.
            return _PUBACK_UNSPECIFIED_ERROR
        except asyncio.CancelledError:
            raise
        except Exception:
            # The handler dead-letters bad input itself; reaching this means it could not even
            # do that. The message is left unacknowledged, so the broker delivers it again on
            # the next session rather than it being lost.
            logger.exception("message on %s could not be handled; left unacknowledged", topic)
            raise
        return _PUBACK_SUCCESS
