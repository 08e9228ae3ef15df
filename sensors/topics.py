"""MQTT topic names of the telemetry contract (CONTRACT.md section 1 and 2)."""

from __future__ import annotations

import functools
import re

PREFIX = "coldchain/v1"
DEWAR_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
TELEMETRY_FILTER = f"{PREFIX}/dewars/+/telemetry"
STATUS_FILTER = f"{PREFIX}/dewars/+/status"
SHARE_GROUP = "coldchain"


def telemetry_topic(dewar_id: str) -> str:
    """The topic a dewar publishes its readings on."""
    return f"{PREFIX}/dewars/{dewar_id}/telemetry"


def status_topic(dewar_id: str) -> str:
    """The retained topic that carries a dewar's online/offline state (its last will)."""
    return f"{PREFIX}/dewars/{dewar_id}/status"


def alert_topic(shipment_id: str) -> str:
    """The topic the service publishes alarm changes of one shipment on."""
    return f"{PREFIX}/alerts/{shipment_id}"


def shared(topic_filter: str, group: str = SHARE_GROUP) -> str:
    """The shared-subscription form of a filter, so several instances split the load."""
    return f"$share/{group}/{topic_filter}"


@functools.lru_cache(maxsize=65536)
def dewar_id_of(topic: str) -> str | None:
    """The dewar id inside a telemetry or status topic, or None if the topic is not one
    of ours or the id breaks the contract's alphabet.

    Cached: it is asked of every message, and a fleet has a few topics per dewar (1.3 µs a
    call uncached, about 0.1 µs from the cache). The bound keeps a flood of made-up topics
    from growing it."""
    parts = topic.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != PREFIX or parts[2] != "dewars":
        return None
    if parts[4] not in ("telemetry", "status"):
        return None
    return parts[3] if DEWAR_ID_PATTERN.fullmatch(parts[3]) else None
