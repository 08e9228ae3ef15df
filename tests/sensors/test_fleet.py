"""A simulated fleet: lanes, faults, pacing, and a clean run against a real broker."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from sensors.fleet import LANES, Fleet, FleetRunner, default_fault_mix, run_fleet
from sensors.schema import parse_message
from sensors.simulator import FaultKind, great_circle_km, parse_faults

START = datetime(2025, 3, 1, 8, 0, tzinfo=UTC)


def test_default_fault_mix_gives_a_demo_every_kind_of_trouble() -> None:
    faults = default_fault_mix(30)
    kinds = [f.kind for f in faults]
    assert set(kinds) == set(FaultKind)
    assert kinds.count(FaultKind.TIP_OVER) == 2
    targets = [f.dewar_id for f in faults]
    assert len(set(targets)) == len(targets)  # one fault per dewar
    assert "DW-0001" not in targets
    Fleet(30, start=START, faults=faults)  # every target exists
    assert {f.dewar_id for f in default_fault_mix(1)} == {"DW-0001"}
    assert default_fault_mix(0) == []


def test_fleet_dewars_travel_real_lanes_in_time_order() -> None:
    fleet = Fleet(12, start=START, interval_s=60)
    seen = list(fleet.readings_until(START + timedelta(hours=1)))
    times = [r.ts for _, r in seen]
    assert times == sorted(times)
    by_dewar: dict[str, list[int]] = defaultdict(list)
    for sim, reading in seen:
        by_dewar[sim.dewar_id].append(reading.seq)
    assert sorted(by_dewar) == [f"DW-{i:04d}" for i in range(1, 13)]
    # Sequence numbers count on from the device clock, without gaps.
    for sim in fleet.simulators:
        seqs = by_dewar[sim.dewar_id]
        assert seqs[0] == int(sim.start.timestamp() // 60)
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and len(seqs) >= 60
    firsts = {sim.dewar_id: r for sim, r in seen if r.seq == sim.first_seq}
    for index, (did, reading) in enumerate(sorted(firsts.items())):
        origin = LANES[index % len(LANES)].waypoints[0]
        assert reading.lat is not None and reading.lon is not None
        assert great_circle_km(origin, (reading.lat, reading.lon)) < 1.0, did


def test_lanes_take_their_planned_time() -> None:
    for lane in LANES:
        route = lane.route()
        end = route.position(lane.transit_hours * 3600)
        before = route.position(lane.transit_hours * 3600 * 0.9)
        assert end == pytest.approx(lane.waypoints[-1])
        assert great_circle_km(before, end) > 0.5, lane.name


def test_untargeted_faults_hit_every_dewar_and_targeted_only_theirs() -> None:
    fleet = Fleet(3, start=START, faults=parse_faults("lid_open@1h,DW-0002:tip_over@0s"))
    assert [len(s.faults) for s in fleet.simulators] == [1, 2, 1]
    with pytest.raises(ValueError, match="DW-0009"):
        Fleet(3, start=START, faults=parse_faults("DW-0009:tip_over@1h"))


def test_same_seed_same_fleet() -> None:
    a = [r for _, r in Fleet(4, start=START, seed=9).readings_until(START + timedelta(hours=1))]
    b = [r for _, r in Fleet(4, start=START, seed=9).readings_until(START + timedelta(hours=1))]
    assert a == b


def test_bad_runner_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="speed"):
        FleetRunner("127.0.0.1", dewars=1, speed=0)
    with pytest.raises(ValueError, match="1-9999 dewars"):
        FleetRunner("127.0.0.1", dewars=0)


class Subscriber:
    def __init__(self, url: str, topic: str) -> None:
        parts = urlsplit(url)
        self.messages: list[tuple[str, bytes, datetime]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
        self.client.on_message = self.on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        assert subscribed.wait(5)

    def on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), datetime.now(UTC)))

    def close(self, clear_retained: list[str]) -> None:
        for topic in clear_retained:
            self.client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def prefix() -> str:
    return f"F{uuid.uuid4().hex[:6]}"


@pytest.fixture
def subscriber(mqtt_url: str, prefix: str) -> Iterator[Subscriber]:
    sub = Subscriber(mqtt_url, "coldchain/v1/dewars/+/#")
    yield sub
    status = [f"coldchain/v1/dewars/{prefix}-{i:04d}/status" for i in range(1, 10)]
    sub.close(status)


@pytest.mark.mqtt
def test_fleet_run_publishes_valid_readings_never_ahead_of_the_clock(
    mqtt_url: str, prefix: str, subscriber: Subscriber
) -> None:
    parts = urlsplit(mqtt_url)
    runner = FleetRunner(
        parts.hostname or "127.0.0.1",
        parts.port or 1883,
        dewars=3,
        interval_s=60,
        speed=3600,
        duration_s=2 * 3600,
        faults=default_fault_mix(3, id_prefix=prefix),
        id_prefix=prefix,
        client_id=f"fleet-{prefix}",
    )
    stats = runner.run()
    assert stats.readings == 3 * 120  # two hours, a minute apart
    # DW-0001 lost its link at 1.5 h for an hour: its last half hour is still on board.
    assert stats.buffered == 30
    assert stats.acknowledged == stats.readings - 30
    time.sleep(0.3)
    with subscriber.lock:
        mine = [m for m in subscriber.messages if f"/{prefix}-" in m[0]]
    seqs: dict[str, set[int]] = defaultdict(set)
    for topic, payload, received in mine:
        if topic.endswith("/status"):
            continue
        parsed = parse_message(topic, payload, received)
        assert parsed.rejections == []  # valid, and no ts ahead of the clock
        assert parsed.dewar_id is not None
        seqs[parsed.dewar_id].update(r.seq for r in parsed.readings)
    expected = {f"{prefix}-0001": 90, f"{prefix}-0002": 120, f"{prefix}-0003": 120}
    assert {d: len(s) for d, s in seqs.items()} == expected
    states = [json.loads(p)["state"] for t, p, _ in mine if t.endswith("/status")]
    assert "offline" in states and "online" in states


@pytest.mark.mqtt
def test_background_fleet_stops_cleanly_with_everything_acknowledged(
    mqtt_url: str, prefix: str, subscriber: Subscriber
) -> None:
    parts = urlsplit(mqtt_url)
    runner = FleetRunner(
        parts.hostname or "127.0.0.1",
        parts.port or 1883,
        dewars=5,
        interval_s=60,
        speed=600,
        id_prefix=prefix,
        client_id=f"fleet-{prefix}",
    )
    runner.start()
    time.sleep(1.5)
    assert runner.running
    began = time.monotonic()
    stats = runner.stop(timeout=20)
    assert time.monotonic() - began < 10
    assert not runner.running
    assert stats.readings >= 5 * 10  # ten minutes of device time a second
    assert stats.acknowledged == stats.readings


@pytest.mark.mqtt
def test_run_fleet_returns_when_stop_is_set(
    mqtt_url: str, prefix: str, subscriber: Subscriber
) -> None:
    parts = urlsplit(mqtt_url)
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    stats = run_fleet(
        parts.hostname or "127.0.0.1",
        parts.port or 1883,
        dewars=2,
        interval_s=30,
        speed=60,
        stop=stop,
        id_prefix=prefix,
        client_id=f"fleet-{prefix}",
    )
    assert stats.dewars == 2
    assert stats.readings >= 2
    assert stats.acknowledged == stats.readings


def test_a_fleet_replayed_over_the_same_hours_repeats_its_keys_and_continues_them() -> None:
    first = Fleet(3, start=START, interval_s=60, seed=1)
    later = Fleet(3, start=START + timedelta(minutes=30), interval_s=60, seed=1)
    keys_first = {
        (s.dewar_id, r.seq): r.ts for s, r in first.readings_until(START + timedelta(hours=1))
    }
    keys_later = {
        (s.dewar_id, r.seq): r.ts for s, r in later.readings_until(START + timedelta(hours=2))
    }
    overlap = keys_first.keys() & keys_later.keys()
    assert overlap, "the replayed half hour should reuse the same keys"
    # A reused key means the same minute of the same dewar, never a different reading time.
    assert all(abs((keys_first[k] - keys_later[k]).total_seconds()) < 60 for k in overlap)
    assert max(s for _, s in keys_later) > max(s for _, s in keys_first)
