"""The telemetry schema of CONTRACT.md section 1: bytes in, typed readings or precise rejections.

Validation happens here, once, at the edge. The common message (one reading, or a batch in which
every reading is good, with no unknown fields) is decoded and validated by msgspec in a single
pass, well under a microsecond per reading. Only when that fails does the parser take the slower
path that judges each reading of a batch on its own and keeps unknown fields, so one bad reading
never costs its neighbours and the reason names the reading and the field.

Unknown fields may nest arrays and objects at most `MAX_DEPTH` levels deep. A message nested far
deeper than that (thousands of `[`) is beyond msgspec's recursion limit; it is refused as "JSON
nested too deeply" like any other bad input, and in a batch only the reading that holds it is.

Two more bounds keep every accepted reading storable, so that it never takes its batch with it
when PostgreSQL refuses it: `ts` is not before `MIN_TS` (2000-01-01T00:00:00Z; earlier is a clock
that was never set, and a year-1 time with a positive offset is not even a valid UTC instant),
and no text in an unknown field, key or value, holds NUL (U+0000), which jsonb cannot store.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final

import msgspec
from msgspec import Meta

from sensors.topics import dewar_id_of

MAX_PAYLOAD_BYTES: Final = 256 * 1024
MAX_BATCH: Final = 1000
MAX_CLOCK_SKEW: Final = timedelta(minutes=5)
MIN_TS: Final = datetime(2000, 1, 1, tzinfo=UTC)
MAX_DEPTH: Final = 32
"""Levels of arrays and objects an unknown field may nest; the reading itself is not counted."""

_INT64_MAX: Final = 2**63 - 1

Seq = Annotated[int, Meta(ge=0, le=_INT64_MAX)]
Timestamp = Annotated[datetime, Meta(tz=True)]
Celsius = Annotated[float, Meta(gt=-273.15, lt=100)]
Percent = Annotated[float, Meta(ge=0, le=100)]
Degrees = Annotated[float, Meta(ge=0, le=180)]
Gs = Annotated[float, Meta(ge=0, le=1_000_000)]
Latitude = Annotated[float, Meta(ge=-90, le=90)]
Longitude = Annotated[float, Meta(ge=-180, le=180)]


def epoch_micros(ts: datetime) -> int:
    """Microseconds since the Unix epoch of an aware time (the rules' clock, and how the ingest
    hands times to PostgreSQL). Exact for any time a reading may carry: a float timestamp near
    2e9 s is within 0.25 µs, and rounding recovers the microsecond."""
    return round(ts.timestamp() * 1_000_000)


class Reading(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """One measurement of one dewar, at the device's own time."""

    seq: Seq
    ts: Timestamp
    temp_c: Celsius
    ln2_level_pct: Percent | None = None
    tilt_deg: Degrees | None = None
    shock_g: Gs | None = None
    lid_open: bool | None = None
    battery_pct: Percent | None = None
    lat: Latitude | None = None
    lon: Longitude | None = None
    # Fields the contract does not name are kept with the reading, never rejected.
    extra: dict[str, Any] | None = msgspec.field(default=None, name="__extra__")


KNOWN_FIELDS: Final = frozenset(f for f in Reading.__struct_fields__ if f != "extra")

_fast_decoder: Final = msgspec.json.Decoder(Reading | list[Reading])
_batch_decoder: Final = msgspec.json.Decoder(list[msgspec.Raw])
_object_decoder: Final = msgspec.json.Decoder(dict[str, msgspec.Raw])
_reading_decoder: Final = msgspec.json.Decoder(Reading)
_encoder: Final = msgspec.json.Encoder()

NUL_TEXT: Final = "text may not contain NUL (\\u0000)"
TOO_DEEP: Final = f"JSON nested too deeply (arrays and objects at most {MAX_DEPTH} levels deep)"
# What a JSON array's items are split on when the decoder cannot descend into one of them:
# strings (skipped whole, escapes included), brackets, braces and commas.
_STRUCTURE: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]', re.DOTALL)


class Rejection(msgspec.Struct, frozen=True, gc=False):
    """Why a message, or one reading inside a batch, cannot be accepted.

    `index` is the reading's position in a batch, or None when the whole message is rejected.
    `raw` holds the bytes judged: the reading's own bytes for one reading of a batch.
    """

    reason: str
    raw: bytes
    index: int | None = None


class Parsed(msgspec.Struct, frozen=True, gc=False):
    """What one MQTT message yields: the dewar it came from, good readings and rejections.

    Structs rather than frozen dataclasses, as one is made per message on the ingest's hot
    path: a frozen dataclass sets each field through `object.__setattr__` (1.6 µs here, against
    about 0.1 µs for a Struct). Neither can hold a reference cycle, so the collector skips them."""

    dewar_id: str | None
    readings: list[Reading]
    rejections: list[Rejection]


def parse_message(topic: str, payload: bytes, now: datetime) -> Parsed:
    """Judge one telemetry message. Never raises for anything a device can send."""
    dewar_id = dewar_id_of(topic)
    if dewar_id is None:
        return _reject_all(
            None,
            payload,
            f"bad topic {topic[:200]!r}: expected "
            "coldchain/v1/dewars/{dewar_id}/telemetry with a dewar id of 1-64 "
            "characters from A-Z a-z 0-9 . _ -",
        )
    if len(payload) > MAX_PAYLOAD_BYTES:
        return _reject_all(
            dewar_id,
            payload,
            f"payload is {len(payload)} bytes, over the {MAX_PAYLOAD_BYTES} limit",
        )
    try:
        decoded = _fast_decoder.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return _parse_slowly(dewar_id, payload, now)
    items = decoded if isinstance(decoded, list) else [decoded]
    if len(items) > MAX_BATCH:
        return _reject_all(
            dewar_id, payload, f"batch of {len(items)} readings, over the {MAX_BATCH} limit"
        )
    if not items:
        return _reject_all(dewar_id, payload, "empty batch: an array needs at least one reading")
    readings: list[Reading] = []
    rejections: list[Rejection] = []
    batch = isinstance(decoded, list)
    for index, reading in enumerate(items):
        problem = _check_semantics(reading, now)
        if problem is None:
            readings.append(reading)
        else:
            raw = encode_reading(reading) if batch else payload
            rejections.append(Rejection(problem, raw, index if batch else None))
    return Parsed(dewar_id, readings, rejections)


def _parse_slowly(dewar_id: str, payload: bytes, now: datetime) -> Parsed:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _reject_all(dewar_id, payload, f"payload is not UTF-8 (byte {exc.start})")
    if text.lstrip().startswith("["):
        try:
            raw_items = [bytes(raw) for raw in _batch_decoder.decode(text)]
        except msgspec.DecodeError as exc:
            return _reject_all(dewar_id, payload, _describe_json_error(exc, text))
        except RecursionError:
            # Some item is too deep for the decoder: find the items without it, so that only
            # that one is refused.
            split = _split_array(payload)
            if split is None:
                return _reject_all(dewar_id, payload, TOO_DEEP)
            raw_items = split
        if len(raw_items) > MAX_BATCH:
            return _reject_all(
                dewar_id, payload, f"batch of {len(raw_items)} readings, over the {MAX_BATCH} limit"
            )
        if not raw_items:
            return _reject_all(
                dewar_id, payload, "empty batch: an array needs at least one reading"
            )
        readings: list[Reading] = []
        rejections: list[Rejection] = []
        for index, item in enumerate(raw_items):
            result = _parse_one(item, now)
            if isinstance(result, Reading):
                readings.append(result)
            else:
                rejections.append(Rejection(f"reading {index}: {result}", item, index))
        return Parsed(dewar_id, readings, rejections)
    result = _parse_one(payload, now)
    if isinstance(result, Reading):
        return Parsed(dewar_id, [result], [])
    return _reject_all(dewar_id, payload, result)


def _parse_one(item: bytes, now: datetime) -> Reading | str:
    """One reading's bytes to a Reading, or the reason it is refused."""
    try:
        fields = _object_decoder.decode(item)
    except msgspec.ValidationError:
        return "a reading must be a JSON object"
    except msgspec.DecodeError as exc:
        return _describe_json_error(exc, item.decode("utf-8", "replace"))
    except RecursionError:
        return TOO_DEEP
    known = b",".join(
        _encoder.encode(k) + b":" + bytes(v) for k, v in fields.items() if k in KNOWN_FIELDS
    )
    try:
        reading = _reading_decoder.decode(b"{" + known + b"}")
        extra = {k: msgspec.json.decode(v) for k, v in fields.items() if k not in KNOWN_FIELDS}
    except msgspec.ValidationError as exc:
        return _describe_validation_error(exc)
    except RecursionError:
        return TOO_DEEP
    for name, value in extra.items():
        if "\x00" in name:
            return f"a field name: {NUL_TEXT}"
        problem = _unstorable(value)
        if problem is not None:
            return f"field `{name[:100]}`: {problem}"
    if extra:
        reading = msgspec.structs.replace(reading, extra=extra)
    return _check_semantics(reading, now) or reading


def _unstorable(value: object) -> str | None:
    """Why an unknown field's value cannot be stored with the reading (too deep, or text with
    NUL), or None. Walked without recursion, since it may be nested up to the decoder's limit."""
    pending: list[tuple[object, int]] = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return NUL_TEXT
        elif isinstance(item, dict | list) and depth > MAX_DEPTH:
            return TOO_DEEP
        if isinstance(item, dict):
            if any("\x00" in k for k in item):
                return NUL_TEXT
            pending.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            pending.extend((v, depth + 1) for v in item)
    return None


def _split_array(payload: bytes) -> list[bytes] | None:
    """The items of the JSON array `payload`, found by a scan that keeps a depth count instead
    of recursing; None if `payload` is not one array. Each item is still decoded on its own."""
    items: list[bytes] = []
    depth = 0
    start = 0
    for token in _STRUCTURE.finditer(payload):
        mark = token.group()
        if mark in (b"[", b"{"):
            depth += 1
            if depth == 1:
                start = token.end()
        elif mark in (b"]", b"}"):
            depth -= 1
            if depth == 0:
                items.append(payload[start : token.start()].strip())
                return items if not payload[token.end() :].strip() else None
        elif mark == b"," and depth == 1:
            items.append(payload[start : token.start()].strip())
            start = token.end()
    return None


def _check_semantics(reading: Reading, now: datetime) -> str | None:
    """Rules a type cannot say: position comes in pairs, the clock is neither from the future
    nor unset."""
    if (reading.lat is None) != (reading.lon is None):
        return "lat and lon come together: give both or neither"
    if reading.ts < MIN_TS:
        return (
            f"ts {reading.ts.isoformat()} is before 2000-01-01T00:00:00Z: is the device clock set?"
        )
    if reading.ts - now > MAX_CLOCK_SKEW:
        ahead = (reading.ts - now).total_seconds()
        return (
            f"ts {reading.ts.isoformat()} is {ahead:.0f} s ahead of the service clock "
            f"(at most {MAX_CLOCK_SKEW.total_seconds():.0f} s allowed)"
        )
    return None


def _describe_validation_error(exc: msgspec.ValidationError) -> str:
    message = str(exc)
    if message.startswith("Object missing required field"):
        return message.replace("Object missing", "missing")
    if "`datetime` with a timezone" in message:
        return "ts must be an RFC 3339 time with an offset (Z or +hh:mm) - at `$.ts`"
    if "Invalid RFC3339" in message:
        return "ts is not an RFC 3339 time - at `$.ts`"
    if message.startswith("Number out of range"):
        return message + " (NaN and infinities are refused)"
    return message


def _describe_json_error(exc: msgspec.DecodeError, text: str) -> str:
    message = str(exc)
    lowered = text.lower()
    if "nan" in lowered or "infinity" in lowered:
        return f"not valid JSON ({message}); NaN and Infinity are not numbers in JSON"
    return f"not valid JSON ({message})"


def _reject_all(dewar_id: str | None, payload: bytes, reason: str) -> Parsed:
    return Parsed(dewar_id, [], [Rejection(reason, payload, None)])


def encode_reading(reading: Reading) -> bytes:
    """A reading as the device sends it (unknown fields flattened back in)."""
    if reading.extra is None:
        return _encoder.encode(reading)
    fields = msgspec.to_builtins(reading)
    fields.pop("__extra__", None)
    return _encoder.encode({**reading.extra, **fields})


def encode_batch(readings: list[Reading]) -> bytes:
    """A backlog batch: a JSON array of readings, at most MAX_BATCH long."""
    if len(readings) > MAX_BATCH:
        raise ValueError(f"a batch holds at most {MAX_BATCH} readings, got {len(readings)}")
    if all(r.extra is None for r in readings):
        return _encoder.encode(readings)
    return b"[" + b",".join(encode_reading(r) for r in readings) + b"]"
