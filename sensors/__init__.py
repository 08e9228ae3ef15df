"""The device side of coldchain: the telemetry schema and topics, the dewar simulator, and the
store-and-forward publisher. A device runs this package without the service installed."""

from sensors.fleet import (
    LANES,
    Fleet,
    FleetRunner,
    FleetStats,
    Lane,
    default_fault_mix,
    run_fleet,
)
from sensors.publisher import PublisherStats, StoreAndForwardPublisher
from sensors.schema import (
    MAX_BATCH,
    MAX_CLOCK_SKEW,
    MAX_DEPTH,
    MAX_PAYLOAD_BYTES,
    MIN_TS,
    Parsed,
    Reading,
    Rejection,
    encode_batch,
    encode_reading,
    parse_message,
)
from sensors.simulator import DewarSimulator, Fault, FaultKind, Route, parse_faults
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
    "LANES",
    "MAX_BATCH",
    "MAX_CLOCK_SKEW",
    "MAX_DEPTH",
    "MAX_PAYLOAD_BYTES",
    "MIN_TS",
    "STATUS_FILTER",
    "TELEMETRY_FILTER",
    "DewarSimulator",
    "Fault",
    "FaultKind",
    "Fleet",
    "FleetRunner",
    "FleetStats",
    "Lane",
    "Parsed",
    "PublisherStats",
    "Reading",
    "Rejection",
    "Route",
    "StoreAndForwardPublisher",
    "alert_topic",
    "default_fault_mix",
    "dewar_id_of",
    "encode_batch",
    "encode_reading",
    "parse_faults",
    "parse_message",
    "run_fleet",
    "shared",
    "status_topic",
    "telemetry_topic",
]
