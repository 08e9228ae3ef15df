"""The telemetry schema: every bad input of CONTRACT.md section 1 is refused with a reason that
names the problem, and good readings beside a bad one are kept."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from sensors import MAX_BATCH, MAX_DEPTH, MAX_PAYLOAD_BYTES, Reading, encode_batch, parse_message

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
TOPIC = "coldchain/v1/dewars/DW-0001/telemetry"


def reading(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {"seq": 7, "ts": "2026-11-25T11:59:00Z", "temp_c": -190.2}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def raw(value: object) -> bytes:
    return json.dumps(value).encode()


def test_a_full_reading_is_typed() -> None:
    payload = raw(
        reading(
            ln2_level_pct=81.5,
            tilt_deg=3,
            shock_g=0.4,
            lid_open=False,
            battery_pct=97,
            lat=40.85,
            lon=-74.48,
        )
    )
    parsed = parse_message(TOPIC, payload, NOW)
    assert parsed.rejections == []
    assert parsed.dewar_id == "DW-0001"
    (r,) = parsed.readings
    assert (r.seq, r.temp_c, r.ln2_level_pct, r.lid_open, r.lat, r.lon) == (
        7,
        -190.2,
        81.5,
        False,
        40.85,
        -74.48,
    )
    assert r.ts == datetime(2026, 11, 25, 11, 59, tzinfo=UTC)


def test_offsets_are_honoured_and_the_time_kept_as_an_instant() -> None:
    parsed = parse_message(TOPIC, raw(reading(ts="2026-11-25T13:59:00+02:00")), NOW)
    assert parsed.readings[0].ts == datetime(2026, 11, 25, 11, 59, tzinfo=UTC)


def test_unknown_fields_are_kept_with_the_reading() -> None:
    parsed = parse_message(TOPIC, raw(reading(firmware="2.1.0", probe={"id": 3})), NOW)
    assert parsed.rejections == []
    assert parsed.readings[0].extra == {"firmware": "2.1.0", "probe": {"id": 3}}


BAD_READINGS: list[tuple[str, bytes, str]] = [
    ("not json", b"temp=-190", "not valid JSON"),
    ("not utf-8", b"\xff\xfe{}", "not UTF-8"),
    ("a string, not an object", b'"hello"', "must be a JSON object"),
    ("seq missing", raw(reading(seq=None)), "missing required field `seq`"),
    ("ts missing", raw(reading(ts=None)), "missing required field `ts`"),
    ("temp_c missing", raw(reading(temp_c=None)), "missing required field `temp_c`"),
    ("seq negative", raw(reading(seq=-1)), "`$.seq`"),
    ("seq a float", raw(reading(seq=1.5)), "`$.seq`"),
    ("seq a string", raw(reading(seq="7")), "`$.seq`"),
    ("temp_c a string", raw(reading(temp_c="-190")), "`$.temp_c`"),
    ("temp_c a boolean", raw(reading(temp_c=True)), "`$.temp_c`"),
    ("temp_c NaN", b'{"seq":1,"ts":"2026-11-25T11:59:00Z","temp_c":NaN}', "NaN"),
    ("temp_c infinite", b'{"seq":1,"ts":"2026-11-25T11:59:00Z","temp_c":1e999}', "`$.temp_c`"),
    ("temp_c below absolute zero", raw(reading(temp_c=-273.15)), "`$.temp_c`"),
    ("temp_c boiling", raw(reading(temp_c=100)), "`$.temp_c`"),
    ("ln2 over 100 %", raw(reading(ln2_level_pct=100.1)), "`$.ln2_level_pct`"),
    ("ln2 negative", raw(reading(ln2_level_pct=-1)), "`$.ln2_level_pct`"),
    ("tilt over 180", raw(reading(tilt_deg=181)), "`$.tilt_deg`"),
    ("shock negative", raw(reading(shock_g=-0.1)), "`$.shock_g`"),
    ("lid_open not a boolean", raw(reading(lid_open="yes")), "`$.lid_open`"),
    ("battery over 100", raw(reading(battery_pct=101)), "`$.battery_pct`"),
    ("latitude out of range", raw(reading(lat=91, lon=0)), "`$.lat`"),
    ("lat without lon", raw(reading(lat=40.0)), "lat and lon come together"),
    ("lon without lat", raw(reading(lon=4.0)), "lat and lon come together"),
    ("ts without offset", raw(reading(ts="2026-11-25T11:59:00")), "offset"),
    ("ts not a time", raw(reading(ts="yesterday")), "RFC 3339"),
    ("ts a date only", raw(reading(ts="2026-11-25")), "RFC 3339"),
    (
        "ts six minutes ahead",
        raw(reading(ts=(NOW + timedelta(minutes=6)).isoformat())),
        "ahead of the service clock",
    ),
    ("empty batch", b"[]", "empty batch"),
]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [(p, r) for _, p, r in BAD_READINGS],
    ids=[name for name, _, _ in BAD_READINGS],
)
def test_bad_input_is_rejected_with_a_reason(payload: bytes, reason: str) -> None:
    parsed = parse_message(TOPIC, payload, NOW)
    assert parsed.readings == []
    (rejection,) = parsed.rejections
    assert reason in rejection.reason
    assert rejection.raw == payload


def test_a_clock_just_under_five_minutes_ahead_is_accepted() -> None:
    ts = (NOW + timedelta(minutes=4, seconds=59)).isoformat()
    assert len(parse_message(TOPIC, raw(reading(ts=ts)), NOW).readings) == 1


@pytest.mark.parametrize(
    "topic",
    [
        "coldchain/v1/dewars/has space/telemetry",
        "coldchain/v1/dewars/" + "x" * 65 + "/telemetry",
        "coldchain/v1/dewars/ü-1/telemetry",
        "coldchain/v2/dewars/DW-1/telemetry",
        "coldchain/v1/dewars//telemetry",
    ],
)
def test_a_bad_dewar_id_or_topic_is_rejected(topic: str) -> None:
    parsed = parse_message(topic, raw(reading()), NOW)
    assert parsed.dewar_id is None and parsed.readings == []
    assert "bad topic" in parsed.rejections[0].reason


def test_an_oversized_payload_is_rejected_before_parsing() -> None:
    payload = b"[" + b" " * MAX_PAYLOAD_BYTES + b"]"
    parsed = parse_message(TOPIC, payload, NOW)
    assert parsed.readings == []
    assert "over the 262144 limit" in parsed.rejections[0].reason


def test_a_batch_over_the_limit_is_rejected() -> None:
    items = [reading(seq=i) for i in range(MAX_BATCH + 1)]
    parsed = parse_message(TOPIC, raw(items), NOW)
    assert parsed.readings == [] and "over the 1000 limit" in parsed.rejections[0].reason


def test_in_a_batch_each_reading_is_judged_on_its_own() -> None:
    items = [
        reading(seq=1),
        reading(seq=2, temp_c="warm"),
        42,
        reading(seq=4, lat=1.0),
        reading(seq=5, note="kept"),
    ]
    parsed = parse_message(TOPIC, raw(items), NOW)
    assert [r.seq for r in parsed.readings] == [1, 5]
    assert parsed.readings[1].extra == {"note": "kept"}
    assert [(j.index, j.reason.split(":")[0]) for j in parsed.rejections] == [
        (1, "reading 1"),
        (2, "reading 2"),
        (3, "reading 3"),
    ]
    assert json.loads(parsed.rejections[0].raw)["temp_c"] == "warm"


def test_a_batch_round_trips_through_the_encoder() -> None:
    readings = [
        Reading(
            seq=i, ts=NOW - timedelta(minutes=10 - i), temp_c=-190.0 + i / 10, ln2_level_pct=80.0
        )
        for i in range(10)
    ]
    parsed = parse_message(TOPIC, encode_batch(readings), NOW)
    assert parsed.readings == readings and parsed.rejections == []


DEEP = b"[" * 4000 + b"]" * 4000
GOOD_HEAD = b'{"seq":1,"ts":"2026-11-25T11:59:00Z","temp_c":'


@pytest.mark.parametrize(
    "payload",
    [
        GOOD_HEAD + DEEP + b"}",
        GOOD_HEAD + b'-190,"probe":' + DEEP + b"}",
        b"[" * 4000,
        b'[{"seq":1,"ts":"2026-11-25T11:59:00Z","temp_c":-190,"x":' + b"[" * 4000,
    ],
    ids=["in temp_c", "in an unknown field", "an unclosed array", "an unclosed batch"],
)
def test_json_nested_too_deeply_is_rejected_not_raised(payload: bytes) -> None:
    parsed = parse_message(TOPIC, payload, NOW)
    assert parsed.readings == []
    (rejection,) = parsed.rejections
    assert "JSON nested too deeply" in rejection.reason
    assert rejection.raw == payload


def test_a_reading_nested_too_deeply_spoils_only_itself_in_a_batch() -> None:
    deep = GOOD_HEAD + b'-190,"seq":2,"probe":' + DEEP + b"}"
    payload = b"[" + raw(reading(seq=1)) + b", " + deep + b"," + raw(reading(seq=3)) + b"]"
    parsed = parse_message(TOPIC, payload, NOW)
    assert [r.seq for r in parsed.readings] == [1, 3]
    (rejection,) = parsed.rejections
    assert rejection.index == 1
    assert rejection.reason.startswith("reading 1: JSON nested too deeply")
    assert rejection.raw == deep


def test_unknown_fields_may_nest_up_to_the_limit_and_no_deeper() -> None:
    def nested(levels: int) -> object:
        value: object = 1
        for _ in range(levels):
            value = [value]
        return value

    ok = parse_message(TOPIC, raw(reading(probe=nested(MAX_DEPTH))), NOW)
    assert ok.rejections == [] and ok.readings[0].extra == {"probe": nested(MAX_DEPTH)}
    too_deep = parse_message(TOPIC, raw(reading(probe=nested(MAX_DEPTH + 1))), NOW)
    assert too_deep.readings == []
    assert too_deep.rejections[0].reason.startswith("field `probe`: JSON nested too deeply")


@pytest.mark.parametrize(
    "extra",
    [
        {"note": "a\u0000b"},
        {"probe": {"id": 3, "labels": ["ok", "\u0000"]}},
        {"probe": {"bad\u0000key": 1}},
        {"bad\u0000name": 1},
    ],
    ids=["a string", "a string in a list", "a key inside", "a field name"],
)
def test_text_with_nul_is_refused_since_postgresql_cannot_store_it(
    extra: dict[str, object],
) -> None:
    parsed = parse_message(TOPIC, raw(reading(**extra)), NOW)
    assert parsed.readings == []
    (rejection,) = parsed.rejections
    assert "may not contain NUL (\\u0000)" in rejection.reason
    assert "\x00" not in rejection.reason


@pytest.mark.parametrize(
    "ts", ["0001-01-01T00:00:00+01:00", "1999-12-31T23:59:59Z", "2000-01-01T00:30:00+01:00"]
)
def test_a_ts_before_2000_is_refused(ts: str) -> None:
    for payload in (raw(reading(ts=ts)), raw(reading(ts=ts, note="slow path"))):
        parsed = parse_message(TOPIC, payload, NOW)
        assert parsed.readings == []
        assert "is before 2000-01-01T00:00:00Z" in parsed.rejections[0].reason


def test_a_ts_at_2000_is_accepted() -> None:
    assert len(parse_message(TOPIC, raw(reading(ts="2000-01-01T00:00:00Z")), NOW).readings) == 1


def test_unstorable_readings_spoil_only_themselves_in_a_batch() -> None:
    items = [
        reading(seq=1),
        reading(seq=2, note="\u0000"),
        reading(seq=3, ts="0001-01-01T00:00:00+01:00"),
        reading(seq=4),
    ]
    parsed = parse_message(TOPIC, raw(items), NOW)
    assert [r.seq for r in parsed.readings] == [1, 4]
    assert [j.index for j in parsed.rejections] == [1, 2]
    assert (
        parsed.rejections[0].reason == "reading 1: field `note`: text may not contain NUL (\\u0000)"
    )
    assert parsed.rejections[1].reason.startswith(
        "reading 2: ts 0001-01-01T00:00:00+01:00 is before"
    )
