"""A fleet of simulated dewars on real lanes, publishing through one store-and-forward gateway.

:class:`Fleet` builds N :class:`~sensors.simulator.DewarSimulator`\\ s named ``DW-0001``,
``DW-0002``, ... Each travels one of :data:`LANES`, real lanes of cell-therapy logistics:
from a US manufacturing site (Morris Plains, NJ) through Newark airport to a US cancer centre,
or from a European one (Hoofddorp, NL) through Schiphol to a European cancer centre, at the
speed that makes the door-to-door time of the lane. Dewars measure at the same interval but
not in lockstep (each starts at a random point within the first interval), and every random
draw of a dewar comes from a generator seeded by ``(seed, dewar id)``, so a run replays exactly.

:class:`FleetRunner` drives a fleet in simulated time, ``speed`` times faster than the wall clock,
publishing through one :class:`~sensors.publisher.StoreAndForwardPublisher`. All times given to
it (``interval_s``, ``duration_s``, fault offsets) are **device** seconds. The service refuses a
reading whose ``ts`` is more than five minutes ahead of its clock, so the simulated clock must
never pass the wall clock: unless a start is given, a run at ``speed`` > 1 starts in the past,
early enough that it catches up with the wall clock exactly when ``duration_s`` of device time is
done (or, with no duration, after :data:`DEFAULT_HISTORY_S` of device time); from then on it runs
at real time. So ``--speed 60 --duration 86400`` replays the last day of a fleet in 24 minutes.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from sensors.publisher import PublisherStats, StoreAndForwardPublisher
from sensors.schema import Reading
from sensors.simulator import DewarSimulator, Fault, FaultKind, Route

logger = logging.getLogger(__name__)

DEFAULT_HISTORY_S: Final = 24 * 3600.0
MAX_WAIT_S: Final = 0.5


@dataclass(frozen=True, slots=True)
class Lane:
    """A planned transport lane: named waypoints (lat, lon) and the door-to-door time."""

    name: str
    waypoints: tuple[tuple[float, float], ...]
    transit_hours: float

    def route(self) -> Route:
        probe = Route(self.waypoints, 1.0)
        return Route(self.waypoints, max(probe.length_km, 1.0) / self.transit_hours)


_MORRIS_PLAINS: Final = (40.8393, -74.4818)  # cell therapy manufacturing, New Jersey
_EWR: Final = (40.6895, -74.1745)  # Newark Liberty International
_HOOFDDORP: Final = (52.3030, 4.6890)  # cell therapy manufacturing, Netherlands
_AMS: Final = (52.3105, 4.7683)  # Amsterdam Schiphol

LANES: Final[tuple[Lane, ...]] = (
    Lane(
        "Morris Plains NJ -> MD Anderson, Houston TX",
        (_MORRIS_PLAINS, _EWR, (29.9902, -95.3368), (29.7073, -95.3977)),
        20.0,
    ),
    Lane(
        "Morris Plains NJ -> Memorial Sloan Kettering, New York NY",
        (_MORRIS_PLAINS, (40.7644, -73.9558)),
        4.0,
    ),
    Lane(
        "Morris Plains NJ -> City of Hope, Duarte CA",
        (_MORRIS_PLAINS, _EWR, (33.9416, -118.4085), (34.1296, -117.9706)),
        26.0,
    ),
    Lane(
        "Morris Plains NJ -> Dana-Farber, Boston MA",
        (_MORRIS_PLAINS, (42.3375, -71.1080)),
        8.0,
    ),
    Lane(
        "Morris Plains NJ -> Fred Hutch, Seattle WA",
        (_MORRIS_PLAINS, _EWR, (47.4502, -122.3088), (47.6275, -122.3310)),
        28.0,
    ),
    Lane(
        "Hoofddorp NL -> Charite, Berlin DE",
        (_HOOFDDORP, _AMS, (52.3667, 13.5033), (52.5263, 13.3766)),
        14.0,
    ),
    Lane(
        "Hoofddorp NL -> Gustave Roussy, Villejuif FR",
        (_HOOFDDORP, _AMS, (49.0097, 2.5479), (48.7944, 2.3509)),
        12.0,
    ),
    Lane(
        "Hoofddorp NL -> Karolinska, Stockholm SE",
        (_HOOFDDORP, _AMS, (59.6498, 17.9238), (59.3505, 18.0317)),
        16.0,
    ),
    Lane(
        "Hoofddorp NL -> Hospital Clinic, Barcelona ES",
        (_HOOFDDORP, _AMS, (41.2974, 2.0833), (41.3894, 2.1527)),
        15.0,
    ),
    Lane(
        "Hoofddorp NL -> Heidelberg University Hospital, DE",
        (_HOOFDDORP, (49.4183, 8.6698)),
        10.0,
    ),
)


def dewar_id(index: int, prefix: str = "DW") -> str:
    """The id of the fleet's ``index``-th dewar, from 0: ``DW-0001``, ``DW-0002``, ..."""
    return f"{prefix}-{index + 1:04d}"


def default_fault_mix(dewars: int, *, id_prefix: str = "DW") -> list[Fault]:
    """A demo's worth of trouble: two dewars tipped (one righted after six hours), an open lid,
    a link loss, an LN2 exhaustion and a stuck temperature sensor, spread over the first
    dewars after ``DW-0001`` (which stays clean when there are seven or more)."""
    if dewars < 1:
        return []
    h = timedelta(hours=1)
    mix = [
        (FaultKind.TIP_OVER, h, None, None),
        (FaultKind.LID_OPEN, 0.75 * h, timedelta(minutes=10), None),
        (FaultKind.LINK_LOSS, 1.5 * h, h, None),
        (FaultKind.LN2_EXHAUSTION, 0.5 * h, 3 * h, None),
        (FaultKind.TIP_OVER, 3 * h, 6 * h, 180.0),
        (FaultKind.STUCK_SENSOR, 2 * h, None, None),
    ]
    return [
        Fault(kind, at, duration, value, dewar_id((k + 1) % dewars, id_prefix))
        for k, (kind, at, duration, value) in enumerate(mix)
    ]


class Fleet:
    """N simulated dewars on :data:`LANES`, with faults, in one simulated clock."""

    def __init__(
        self,
        dewars: int,
        *,
        start: datetime,
        interval_s: float = 60.0,
        faults: Sequence[Fault] = (),
        seed: int = 0,
        hold_days: float = 10.0,
        id_prefix: str = "DW",
    ) -> None:
        if not 1 <= dewars <= 9999:
            raise ValueError(f"a fleet has 1-9999 dewars, got {dewars}")
        ids = [dewar_id(i, id_prefix) for i in range(dewars)]
        known = set(ids)
        for fault in faults:
            if fault.dewar_id is not None and fault.dewar_id not in known:
                raise ValueError(
                    f"fault {fault} is for {fault.dewar_id}, but the fleet has {ids[0]}..{ids[-1]}"
                )
        self.simulators: list[DewarSimulator] = []
        for index, did in enumerate(ids):
            rng = random.Random(f"{seed}:{did}")  # noqa: S311 - simulation, not security
            offset = timedelta(seconds=rng.uniform(0.0, interval_s))
            self.simulators.append(
                DewarSimulator(
                    did,
                    start + offset,
                    # Numbered from the device clock, so a fleet replayed over the same hours
                    # repeats the same (dewar, seq) keys and a later run continues them.
                    first_seq=int((start + offset).timestamp() // interval_s),
                    interval_s=interval_s,
                    rng=rng,
                    hold_days=hold_days,
                    ln2_start_pct=rng.uniform(95.0, 100.0),
                    route=LANES[index % len(LANES)].route(),
                    faults=[f for f in faults if f.dewar_id in (None, did)],
                )
            )
        self._queue = [(s.next_ts, i) for i, s in enumerate(self.simulators)]
        heapq.heapify(self._queue)

    @property
    def next_ts(self) -> datetime:
        """Device time of the fleet's next reading."""
        return self._queue[0][0]

    def readings_until(self, when: datetime) -> Iterator[tuple[DewarSimulator, Reading]]:
        """Every reading of every dewar up to device time ``when``, in time order."""
        while self._queue[0][0] <= when:
            _, index = self._queue[0]
            simulator = self.simulators[index]
            reading = simulator.step()
            heapq.heapreplace(self._queue, (simulator.next_ts, index))
            yield simulator, reading


@dataclass(frozen=True, slots=True)
class FleetStats:
    """What a fleet run did: readings taken, and the publisher's counts of readings."""

    dewars: int
    readings: int
    published: int
    acknowledged: int
    buffered: int
    dropped: int
    sim_time: datetime | None
    wall_s: float


class FleetRunner:
    """Runs a :class:`Fleet` against a broker: :meth:`run` blocks; :meth:`start` and
    :meth:`stop` run it in a background thread and end it cleanly (the publisher flushes)."""

    def __init__(
        self,
        host: str,
        port: int = 1883,
        *,
        dewars: int,
        interval_s: float = 60.0,
        speed: float = 1.0,
        faults: Sequence[Fault] = (),
        duration_s: float | None = None,
        seed: int = 0,
        start: datetime | None = None,
        id_prefix: str = "DW",
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        close_timeout_s: float = 30.0,
    ) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be positive, got {speed}")
        if duration_s is not None and not duration_s > 0:
            raise ValueError(f"duration must be positive, got {duration_s} s")
        if start is not None and (start.tzinfo is None or start.utcoffset() is None):
            raise ValueError("start must be a timezone-aware datetime")
        self.host, self.port = host, port
        self.dewars = dewars
        self.interval_s = interval_s
        self.speed = speed
        self.faults = tuple(faults)
        self.duration_s = duration_s
        self.seed = seed
        self.start_at = start
        self.close_timeout_s = close_timeout_s
        self.publisher = StoreAndForwardPublisher(
            host,
            port,
            client_id=client_id,
            username=username,
            password=password,
        )
        # Build the fleet now, so bad arguments fail in the caller's thread.
        self._fleet_start = start or self._default_start(datetime.now(UTC))
        self.fleet = Fleet(
            dewars,
            start=self._fleet_start,
            interval_s=interval_s,
            faults=self.faults,
            seed=seed,
            id_prefix=id_prefix,
        )
        self._readings = 0
        self._sim_time: datetime | None = None
        self._wall_s = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._result: FleetStats | None = None

    def _default_start(self, now: datetime) -> datetime:
        history = self.duration_s if self.duration_s is not None else DEFAULT_HISTORY_S
        lead = max(0.0, history * (1.0 - 1.0 / self.speed))
        return now - timedelta(seconds=lead)

    @property
    def stats(self) -> FleetStats:
        """Counts so far (safe to read while the fleet runs)."""
        return self._make_stats(self.publisher.stats)

    def _make_stats(self, pub: PublisherStats) -> FleetStats:
        return FleetStats(
            dewars=self.dewars,
            readings=self._readings,
            published=pub.published,
            acknowledged=pub.acknowledged,
            buffered=pub.buffered,
            dropped=pub.dropped,
            sim_time=self._sim_time,
            wall_s=self._wall_s,
        )

    def run(self, stop: threading.Event | None = None) -> FleetStats:
        """Publish the fleet until ``duration_s`` of device time is done or ``stop`` is set,
        then flush the publisher and return the counts."""
        stop = stop or self._stop
        start = self._fleet_start
        end = start + timedelta(seconds=self.duration_s) if self.duration_s is not None else None
        logger.info(
            "simulating %d dewars every %g s at %gx from %s%s, faults: %s",
            self.dewars,
            self.interval_s,
            self.speed,
            start.isoformat(),
            f" to {end.isoformat()}" if end else "",
            ", ".join(str(f) for f in self.faults) or "none",
        )
        wall0 = time.monotonic()
        now0 = datetime.now(UTC)
        self.publisher.start()
        try:
            while not stop.is_set():
                wall = time.monotonic() - wall0
                self._wall_s = wall
                sim_now = min(
                    start + timedelta(seconds=wall * self.speed), now0 + timedelta(seconds=wall)
                )
                if end is not None:
                    sim_now = min(sim_now, end)
                for simulator, reading in self.fleet.readings_until(sim_now):
                    self.publisher.submit(simulator.dewar_id, reading, link_up=simulator.link_up)
                    self._readings += 1
                self._sim_time = sim_now
                if end is not None and sim_now >= end:
                    break
                due = self.fleet.next_ts
                wall_due = max(
                    (due - start).total_seconds() / self.speed, (due - now0).total_seconds()
                )
                stop.wait(min(max(wall_due - wall, 0.001), MAX_WAIT_S))
        finally:
            self.publisher.close(self.close_timeout_s)
            self._wall_s = time.monotonic() - wall0
        stats = self.stats
        logger.info(
            "fleet done: %d readings, %d acknowledged, %d unsent, %d dropped",
            stats.readings,
            stats.acknowledged,
            stats.buffered,
            stats.dropped,
        )
        return stats

    def start(self) -> None:
        """Run the fleet in a background thread; end it with :meth:`stop`."""
        if self._thread is not None:
            raise RuntimeError("fleet already started")
        self._thread = threading.Thread(target=self._run_in_thread, name="fleet", daemon=True)
        self._thread.start()

    def _run_in_thread(self) -> None:
        try:
            self._result = self.run(self._stop)
        except Exception as exc:
            logger.exception("simulated fleet crashed")
            self._error = exc

    def stop(self, timeout: float = 60.0) -> FleetStats:
        """Stop the background run, wait for the publisher to flush, and return the counts.

        Raises what the run raised, or TimeoutError if it did not end within ``timeout``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the fleet did not stop within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result or self.stats

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def run_fleet(
    host: str,
    port: int = 1883,
    *,
    dewars: int,
    interval_s: float = 60.0,
    speed: float = 1.0,
    faults: Sequence[Fault] = (),
    duration_s: float | None = None,
    stop: threading.Event | None = None,
    seed: int = 0,
    id_prefix: str = "DW",
    client_id: str | None = None,
    username: str | None = None,
    password: str | None = None,
) -> FleetStats:
    """Publish a simulated fleet to the broker at ``host:port`` until ``duration_s`` device
    seconds are done or ``stop`` is set (blocking): what ``coldchain simulate`` runs."""
    runner = FleetRunner(
        host,
        port,
        dewars=dewars,
        interval_s=interval_s,
        speed=speed,
        faults=faults,
        duration_s=duration_s,
        seed=seed,
        id_prefix=id_prefix,
        client_id=client_id,
        username=username,
        password=password,
    )
    return runner.run(stop)
