"""The device side of coldchain: the telemetry schema and topics, the dewar simulator, and the
store-and-forward publisher. A device runs this package without the service installed."""

from sensors.schema import (
    MAX_BATCH,
    MAX_CLOCK_SKEW,
    MAX_PAYLOAD_BYTES,
    Parsed,
    Reading,
    Rejection,
    encode_batch,
    encode_reading,
    parse_message,
)
from sensors.topics import (
    STATUS_FILTER,
    TELEMETRY_FILTER,
    alert_topic,
    dewar_id_of,
    shared,
    status_topic,
    telemetry_topic,
)

__all__ = [
    "MAX_BATCH",
    "MAX_CLOCK_SKEW",
    "MAX_PAYLOAD_BYTES",
    "STATUS_FILTER",
    "TELEMETRY_FILTER",
    "Parsed",
    "Reading",
    "Rejection",
    "alert_topic",
    "dewar_id_of",
    "encode_batch",
    "encode_reading",
    "parse_message",
    "shared",
    "status_topic",
    "telemetry_topic",
]
