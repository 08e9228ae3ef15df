"""The excursion rule engine: readings in device-time order in, alarm transitions out.

The model (DOMAIN.md, "What counts as an excursion"):

- Each dewar (shipment) has one `RuleState`. `feed` evaluates readings against a `Profile` in
  device-time order, `(ts, seq)`, and returns `AlarmTransition`s. An **episode** is one continuous
  excursion of one rule; it is raised once and cleared once, and its `episode_key` is
  `f"{rule}@{started_at UTC ISO}"`, where `started_at` is the device time the breach began (not
  when a delay elapsed). Re-deriving the same history (after a restart, a redelivery or a replay)
  gives the same keys, so alarms can be upserted by key.
- **Limits** (`profiles.Limit`): above a threshold, below it, or outside a range (below `low` or
  above `threshold`: one condition, whichever side). With `delay_s`, a breach must hold on every
  reading from the first breached one until `delay_s` has passed (a reading back inside the
  threshold resets it); an open episode clears only on a reading back inside by the `hysteresis`
  deadband (on both sides of a range), so a value hovering at the limit gives one episode. A
  metric missing from a reading gives that limit no data: nothing changes for it. With `budget_s`,
  the limit counts time out of range over the whole shipment: each breached reading counts the
  time until the next reading of that metric (at most the signal-lost gap), as a logger counting
  out-of-range samples does (for a range, time too warm and time too cold count together). It
  raises once, when the total passes the budget, with `started_at` the first breach of the
  shipment, and never clears: the spent budget is a fact about the product that a person must
  disposition (acknowledge, close). The deadband does not apply to budgets.
- **sensor_jump**: temperature changed by more than `profile.max_jump_c` between consecutive
  readings at most three expected intervals apart; clears on the next reading that does not jump.
- **sensor_stuck**: `profile.stuck_readings` consecutive identical `temp_c` values (exactly);
  clears when the value changes.
- **rate_of_change**: temperature rose faster than `profile.rate_limit_c_per_min` over two
  consecutive intervals (so one noisy sample cannot raise it); `started_at` is the start of the
  first fast interval; clears once an interval rises at most half as fast.
- **hold_at_risk**: the LN2 depletion forecast (`coldchain.forecast`, robust Theil-Sen fit of the
  recent level, refitted on the current orientation once a tipped shipper has a few points) falls
  before `deliver_by + profile.hold_margin_h`, even at the slow end of its 95 % bound (so noise
  cannot raise it); `started_at` is the reading at which it first did. It clears when the central
  forecast is back later than that by `HOLD_CLEAR_DEADBAND_H` or the level no longer falls. A
  jump up of `RECHARGE_JUMP_PCT` is an LN2 recharge: the trend restarts from it. Inactive without
  `deliver_by` or with `profile.forecast_hold` false. (The watch passes as `deliver_by` the later
  of the shipment's deadline and its route's ETA: `coldchain.watch.cold_until`.)
- **signal_lost** is judged on arrival, not device time: see `silence`.

Late readings. The state keeps a watermark (the last evaluated `(ts, seq)`), compact
**checkpoints** (snapshots of the rule state, one per `CHECKPOINT_EVERY_S` of device time, thinned
to at most `MAX_CHECKPOINTS` spread over the shipment), and a **journal** of the transitions it
emitted (the last `MAX_JOURNAL`). A reading at or before the watermark makes `feed` evaluate
nothing and answer a `Replay`: re-feed the stored readings from `Replay.from_ts` with `replay`,
which restarts from the checkpoint, re-evaluates in device-time order and returns only what
changed against the journal, including episodes that the late readings made vanish (`retracted`)
or that no longer end (`reopened`). So a backlog gives exactly the alarms that in-order delivery
would have given, with their true start times.

How to apply transitions (upsert by `episode_key`):
- `raised`: insert the alarm open; if the key exists, update value/limit/message/severity only
  (never reopen, never re-notify unless you choose to).
- `cleared`: set it cleared at `at` (update the time if it was cleared already).
- `retracted`: a late reading rewrote history and this episode never happened: void the alarm.
- `reopened`: the episode no longer ends where it was said to: make it open again.

Everything here is pure: no I/O, no clock; the state is mutated in place by `feed` and `replay`
and is a msgspec Struct that round-trips exactly through JSON (`encode_state`, `decode_state`).
Times inside the state are integer microseconds since the epoch, so nothing is rounded.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from operator import itemgetter
from typing import Final

import msgspec

from coldchain.forecast import TIPPED_DEG, fit
from coldchain.profiles import Direction, Limit, Metric, Profile, Severity
from sensors.schema import Reading, epoch_micros

__all__ = [
    "AlarmTransition",
    "Kind",
    "Outcome",
    "Replay",
    "RuleState",
    "decode_state",
    "encode_state",
    "episode_key",
    "feed",
    "replay",
    "silence",
]

SIGNAL_LOST: Final = "signal_lost"
SENSOR_JUMP: Final = "sensor_jump"
SENSOR_STUCK: Final = "sensor_stuck"
RATE_OF_CHANGE: Final = "rate_of_change"
HOLD_AT_RISK: Final = "hold_at_risk"

CHECKPOINT_EVERY_S: Final = 1800
MAX_CHECKPOINTS: Final = 16
MAX_JOURNAL: Final = 256
JUMP_WINDOW_INTERVALS: Final = 3.0
RECHARGE_JUMP_PCT: Final = 10.0
HOLD_CLEAR_DEADBAND_H: Final = 1.0
LN2_STEP_S: Final = 1800
"""The forecast keeps one LN2 point per this much device time while upright..."""
LN2_STEP_TIPPED_S: Final = 300
"""...and per this much while tipped, so a tip-over's faster loss is fitted sooner."""
LN2_WINDOW_S: Final = 12 * 3600
LN2_MAX_POINTS: Final = 24
NOT_FALLING_HOURS: Final = 10_000.0
"""`value` of a hold alarm when the level is not falling (JSON has no infinity)."""

_US: Final = 1_000_000
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_UNITS: Final = {
    Metric.TEMP_C: " °C",
    Metric.LN2_LEVEL_PCT: " %",
    Metric.TILT_DEG: "°",
    Metric.SHOCK_G: " g",
    Metric.LID_OPEN: "",
    Metric.BATTERY_PCT: " %",
}


class Kind(StrEnum):
    RAISED = "raised"
    CLEARED = "cleared"
    RETRACTED = "retracted"
    REOPENED = "reopened"


class AlarmTransition(msgspec.Struct, frozen=True, kw_only=True):
    """One change of one episode. Times are aware UTC device times (see `silence` for the one
    rule judged on arrival time). `value` is the worst value of the episode up to `at` (for
    budgets too; hold_at_risk: hours of LN2 left; rate_of_change: °C/min; sensor_jump: the jump
    in °C; sensor_stuck: the stuck value), `limit` the threshold it is judged against."""

    episode_key: str
    rule: str
    severity: Severity
    kind: Kind
    started_at: datetime
    at: datetime
    value: float
    limit: float
    message: str


class Track(msgspec.Struct, array_like=True):
    """One rule's progress: `since` is where the current breach (or episode) began, in µs."""

    open: bool = False
    since: int | None = None
    peak: float = 0.0
    spent: int = 0  # budgets: µs out of range so far
    last: int | None = None  # budgets: time of the previous reading if it was breached


class Ln2Fit(msgspec.Struct, array_like=True):
    as_of: int
    level: float
    loss_pct_per_h: float
    depletion: int | None
    earliest: int | None
    latest: int | None
    tipped: bool


class Snapshot(msgspec.Struct, kw_only=True):
    """Everything the rules remember at one watermark; checkpoints are copies of it."""

    wm_ts: int | None = None
    wm_seq: int = -1
    serial: int = 0  # transitions emitted so far (numbers journal entries)
    tracks: dict[str, Track] = msgspec.field(default_factory=dict)
    temp_ts: int | None = None
    temp: float = 0.0
    rate_prev: float | None = None  # °C/min over the previous interval
    rate_from: int | None = None  # start of the previous interval
    stuck_value: float | None = None
    stuck_count: int = 0
    stuck_since: int = 0
    tipped: bool = False
    ln2: list[tuple[int, float, bool]] = msgspec.field(default_factory=list)
    ln2_fit: Ln2Fit | None = None


class JournalEntry(msgspec.Struct, array_like=True):
    serial: int
    transition: AlarmTransition


class RuleState(msgspec.Struct, kw_only=True):
    """A dewar's rule state. Persist it with `encode_state`; it survives restarts exactly."""

    version: int = 1
    current: Snapshot = msgspec.field(default_factory=Snapshot)
    checkpoints: list[Snapshot] = msgspec.field(default_factory=list)
    journal: list[JournalEntry] = msgspec.field(default_factory=list)

    @property
    def watermark(self) -> tuple[datetime, int] | None:
        """The `(ts, seq)` of the last evaluated reading, or None before the first."""
        if self.current.wm_ts is None:
            return None
        return _at(self.current.wm_ts), self.current.wm_seq


class Replay(msgspec.Struct, frozen=True, kw_only=True):
    """Late readings arrived: call `replay` with every stored reading of this dewar whose ts is
    at or after `from_ts` (None: the whole shipment), in any order."""

    from_ts: datetime | None
    earliest_ts: datetime
    earliest_seq: int


class Outcome(msgspec.Struct, frozen=True, kw_only=True):
    transitions: list[AlarmTransition]
    replay: Replay | None = None


_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(RuleState)
_snap_encoder: Final = msgspec.msgpack.Encoder()
_snap_decoder: Final = msgspec.msgpack.Decoder(Snapshot)


def encode_state(state: RuleState) -> bytes:
    return _encoder.encode(state)


def decode_state(data: bytes) -> RuleState:
    return _decoder.decode(data)


def episode_key(rule: str, started_at: datetime) -> str:
    return f"{rule}@{started_at.astimezone(UTC).isoformat()}"


def feed(
    profile: Profile,
    state: RuleState,
    readings: Iterable[Reading],
    *,
    deliver_by: datetime | None = None,
) -> Outcome:
    """Evaluate newly received readings of one dewar (any order within the batch).

    If every reading is after the watermark they are evaluated and the transitions returned. A
    reading equal to the watermark (a redelivery of the last one) is skipped. If any is before it,
    nothing is evaluated and the outcome carries a `Replay`: call `replay` as it says (the batch
    must be stored first, because the replay reads it back from the store).
    """
    if isinstance(readings, list) and len(readings) == 1:
        # The usual take under load: one reading of each dewar, nothing to sort.
        only = readings[0]
        batch = [(epoch_micros(only.ts), only.seq, only)]
    else:
        batch = sorted(((epoch_micros(r.ts), r.seq, r) for r in readings), key=_by_time)
    cur = state.current
    if cur.wm_ts is not None:
        wm = (cur.wm_ts, cur.wm_seq)
        batch = [k for k in batch if (k[0], k[1]) != wm]
        if batch and (batch[0][0], batch[0][1]) < wm:
            return Outcome(
                transitions=[], replay=_replay_request(state, (batch[0][0], batch[0][1]))
            )
    run = _Run(profile, state, deliver_by)
    for t, _, reading in batch:
        run.step(reading, t)
    return Outcome(transitions=run.out)


def replay(
    profile: Profile,
    state: RuleState,
    request: Replay,
    readings: Iterable[Reading],
    *,
    deliver_by: datetime | None = None,
) -> list[AlarmTransition]:
    """Re-evaluate from the checkpoint before `request.earliest_*` over `readings` (every stored
    reading from `request.from_ts` on; ones at or before the checkpoint are skipped) and return
    what changed against what was emitted before: new or updated `raised`/`cleared`, plus
    `retracted` and `reopened`. Replaying the same readings twice returns nothing the second time.
    """
    earliest = (epoch_micros(request.earliest_ts), request.earliest_seq)
    index = _checkpoint_before(state, earliest)
    base = _copy(state.checkpoints[index]) if index >= 0 else Snapshot()
    old = [e.transition for e in state.journal if e.serial >= base.serial]
    state.journal = [e for e in state.journal if e.serial < base.serial]
    state.checkpoints = state.checkpoints[: index + 1]
    state.current = base
    start = (base.wm_ts, base.wm_seq) if base.wm_ts is not None else None
    run = _Run(profile, state, deliver_by)
    last: tuple[int, int] | None = None
    for t, seq, reading in sorted(((epoch_micros(r.ts), r.seq, r) for r in readings), key=_by_time):
        key = (t, seq)
        if (start is not None and key <= start) or key == last:
            continue
        last = key
        run.step(reading, t)
    return _diff(old, run.out)


def silence(
    profile: Profile,
    last_received_at: datetime,
    now: datetime,
    open_since: datetime | None,
) -> AlarmTransition | None:
    """The signal-lost rule, judged on arrival (service clock), not on device time.

    `last_received_at`: when the service last *received* a reading of the dewar; `now`: the
    service clock; `open_since`: `started_at` of the open signal_lost alarm, or None. Call it
    periodically (say every minute) and after each received message. It raises when the silence
    exceeds `profile.signal_lost_after_s` (started_at = `last_received_at`, so a re-check after a
    restart gives the same key) and clears when a reading was received after the episode began
    (at = `last_received_at`). Otherwise None.
    """
    after = profile.signal_lost_after_s
    if open_since is None:
        silent = (now - last_received_at).total_seconds()
        if silent <= after:
            return None
        return AlarmTransition(
            episode_key=episode_key(SIGNAL_LOST, last_received_at),
            rule=SIGNAL_LOST,
            severity=profile.signal_lost_severity,
            kind=Kind.RAISED,
            started_at=last_received_at.astimezone(UTC),
            at=now.astimezone(UTC),
            value=silent,
            limit=after,
            message=f"no reading received for {_duration(silent)} "
            f"(expected every {_duration(profile.expected_interval_s)}; "
            f"last at {_clock(last_received_at)})",
        )
    if last_received_at <= open_since:
        return None
    gap = (last_received_at - open_since).total_seconds()
    return AlarmTransition(
        episode_key=episode_key(SIGNAL_LOST, open_since),
        rule=SIGNAL_LOST,
        severity=profile.signal_lost_severity,
        kind=Kind.CLEARED,
        started_at=open_since.astimezone(UTC),
        at=last_received_at.astimezone(UTC),
        value=gap,
        limit=after,
        message=f"readings resumed at {_clock(last_received_at)} after {_duration(gap)} silent",
    )


class _Plan:
    """A profile laid out for the per-reading loop: each limit as a flat tuple, the other
    rules' settings in microseconds. Built once per profile object (`_plan`)."""

    __slots__ = (
        "budget_of",
        "cap",
        "jump_window",
        "limits",
        "margin",
        "profile",
        "quiet",
        "rate_limit",
    )

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.limits = tuple(
            (
                limit.rule,
                str(limit.metric),
                *limit.bounds,
                limit.direction is Direction.ABOVE,
                limit.direction is Direction.BELOW,
                limit.budget_s is not None,
                limit,
            )
            for limit in profile.limits
        )
        # Per metric with limits, the range inside every one of them: a reading inside all of
        # these changes nothing while no limit is breached, counting or open (`_Run.step`).
        inside: dict[str, tuple[float, float]] = {}
        for _, metric, low, high, *_ in self.limits:
            was_low, was_high = inside.get(metric, (-math.inf, math.inf))
            inside[metric] = (max(was_low, low), min(was_high, high))
        self.quiet = tuple((metric, low, high) for metric, (low, high) in inside.items())
        self.budget_of = {limit.rule: limit.budget_s is not None for limit in profile.limits}
        self.cap = int(profile.signal_lost_after_s * _US)
        self.jump_window = int(profile.expected_interval_s * JUMP_WINDOW_INTERVALS * _US)
        rate = profile.rate_limit_c_per_min
        self.rate_limit = math.inf if rate is None else rate
        self.margin = int(profile.hold_margin_h * 3600 * _US)


_plans: dict[int, _Plan] = {}
_deadlines: dict[datetime, int] = {}


def _deadline_micros(deliver_by: datetime) -> int:
    """`epoch_micros` of a shipment's deadline, remembered: the same few thousand deadlines
    come with every reading, and hashing one costs a tenth of converting it."""
    micros = _deadlines.get(deliver_by)
    if micros is None:
        if len(_deadlines) >= 4096:
            _deadlines.clear()
        micros = _deadlines[deliver_by] = epoch_micros(deliver_by)
    return micros


def _plan(profile: Profile) -> _Plan:
    # By identity: hashing a profile (every limit, every field) would cost more than the
    # evaluation it saves. Profiles are replaced, not mutated (frozen), so a stale id is
    # recognised by `plan.profile is not profile`.
    plan = _plans.get(id(profile))
    if plan is None or plan.profile is not profile:
        if len(_plans) > 64:
            _plans.clear()
        plan = _plans[id(profile)] = _Plan(profile)
    return plan


class _Run:
    """One pass of evaluation over readings in device-time order; collects transitions."""

    __slots__ = (
        "active",
        "cap",
        "deliver",
        "jump_window",
        "out",
        "plan",
        "profile",
        "rate_limit",
        "state",
    )

    def __init__(self, profile: Profile, state: RuleState, deliver_by: datetime | None) -> None:
        plan = _plan(profile)
        self.plan = plan
        self.profile = profile
        self.state = state
        self.out: list[AlarmTransition] = []
        self.deliver = None if deliver_by is None else _deadline_micros(deliver_by)
        self.cap = plan.cap
        self.jump_window = plan.jump_window
        self.rate_limit = plan.rate_limit
        self.active = self._any_active()

    def step(self, r: Reading, t: int) -> None:
        """Evaluate one reading; `t` is its device time in µs since the epoch."""
        cur = self.state.current
        cur.wm_ts = t
        cur.wm_seq = r.seq
        if self.active:
            self._limits(cur, r, t)
        else:
            # Most readings: inside every limit, none of which is breached, counting or open.
            # The limits would leave the state as it is; look no further than the values.
            for metric, low, high in self.plan.quiet:
                raw = getattr(r, metric)
                if raw is not None and not low <= raw <= high:
                    self._limits(cur, r, t)
                    break
        self._temperature(cur, t, r.temp_c)
        if self.profile.forecast_hold:
            self._hold(cur, t, r)
        checkpoints = self.state.checkpoints
        if not checkpoints or t - (checkpoints[-1].wm_ts or 0) >= CHECKPOINT_EVERY_S * _US:
            self._checkpoint()

    def _any_active(self) -> bool:
        """Whether a limit is breached (waiting out its delay), counting its budget, or open."""
        # Over the tracks the state has (a calm dewar has one or two), not over every limit.
        budget_of = self.plan.budget_of
        for rule, track in self.state.current.tracks.items():
            budget = budget_of.get(rule)
            if budget is not None and (
                track.last is not None if budget else track.open or track.since is not None
            ):
                return True
        return False

    # Limits -------------------------------------------------------------------------------

    def _limits(self, cur: Snapshot, r: Reading, t: int) -> None:
        tracks = cur.tracks
        for rule, metric, low, high, above, below, budget, limit in self.plan.limits:
            raw = getattr(r, metric)
            if raw is None:
                continue
            # The quiet case, exactly as the full rule would leave it: inside the threshold (or
            # the range) and nothing open (a delayed limit forgets a breach in progress; a budget
            # that was not counting stays as it is). One comparison for a one-sided limit.
            inside = raw <= high if above else raw >= low if below else low <= raw <= high
            track = tracks.get(rule)
            if track is None:
                if inside:
                    continue  # never breached: nothing to remember yet
                track = tracks[rule] = Track()
            if budget:
                if inside and track.last is None:
                    continue
                self._budget(limit, track, t, float(raw))
            elif inside and not track.open:
                track.since = None
            else:
                self._delayed(limit, track, t, float(raw))
        self.active = self._any_active()

    def _delayed(self, limit: Limit, track: Track, t: int, v: float) -> None:
        if track.open:
            if limit.worse(v, track.peak):
                track.peak = v
            if limit.recovered(v):
                since = track.since or t
                self._emit(
                    limit.rule,
                    limit.severity,
                    Kind.CLEARED,
                    since,
                    t,
                    track.peak,
                    limit.bound(track.peak),
                    f"{limit.message or limit.rule}: back in range after "
                    f"{_duration((t - since) / _US)} ({_worst(limit, track.peak)})",
                )
                track.open = False
                track.since = None
            return
        if not limit.breached(v):
            track.since = None
            return
        if track.since is None:
            track.since = t
            track.peak = v
        elif limit.worse(v, track.peak):
            track.peak = v
        if t - track.since >= limit.delay_s * _US:
            track.open = True
            lasted = f" for {_duration((t - track.since) / _US)}" if limit.delay_s > 0 else ""
            self._emit(
                limit.rule,
                limit.severity,
                Kind.RAISED,
                track.since,
                t,
                track.peak,
                limit.bound(track.peak),
                f"{limit.message or limit.rule}{lasted} ({_worst(limit, track.peak)})",
            )

    def _budget(self, limit: Limit, track: Track, t: int, v: float) -> None:
        if track.last is not None:
            track.spent += min(t - track.last, self.cap)
        if limit.breached(v):
            track.last = t
            if track.since is None:
                track.since = t
                track.peak = v
            elif limit.worse(v, track.peak):
                track.peak = v
        else:
            track.last = None
        budget = limit.budget_s or 0.0
        if not track.open and track.since is not None and track.spent > budget * _US:
            track.open = True
            self._emit(
                limit.rule,
                limit.severity,
                Kind.RAISED,
                track.since,
                t,
                track.peak,
                limit.bound(track.peak),
                f"{limit.message or limit.rule}: {_duration(track.spent / _US)} out of range "
                f"since {_clock(_at(track.since))}, budget {_duration(budget)} "
                f"({_worst(limit, track.peak)})",
            )

    # Temperature sanity and rate ------------------------------------------------------------

    def _temperature(self, cur: Snapshot, t: int, v: float) -> None:
        profile = self.profile
        severity = profile.sensor_fault_severity
        prev_t = cur.temp_ts
        rate: float | None = None
        if prev_t is not None:
            dt = t - prev_t
            dv = v - cur.temp
            jumped = dt <= self.jump_window and abs(dv) > profile.max_jump_c
            jump = cur.tracks.get(SENSOR_JUMP)
            if jumped:
                if jump is None:
                    jump = self._track(SENSOR_JUMP)
                if not jump.open:
                    jump.open, jump.since, jump.peak = True, t, abs(dv)
                    self._emit(
                        SENSOR_JUMP,
                        severity,
                        Kind.RAISED,
                        t,
                        t,
                        abs(dv),
                        profile.max_jump_c,
                        f"sensor fault: temperature jumped {dv:+.1f} °C in "
                        f"{_duration(dt / _US)} (from {cur.temp:.1f} to {v:.1f} °C)",
                    )
                elif abs(dv) > jump.peak:
                    jump.peak = abs(dv)
            elif jump is not None and jump.open:
                jump.open = False
                self._emit(
                    SENSOR_JUMP,
                    severity,
                    Kind.CLEARED,
                    jump.since or t,
                    t,
                    jump.peak,
                    profile.max_jump_c,
                    f"sensor fault cleared: temperature plausible again ({v:.1f} °C)",
                )
            if 0 < dt <= self.jump_window:
                rate = dv * 60 * _US / dt
            self._rate(cur, t, v, rate)
        cur.rate_prev = rate
        cur.rate_from = prev_t
        cur.temp_ts = t
        cur.temp = v
        self._stuck(cur, t, v)

    def _rate(self, cur: Snapshot, t: int, v: float, rate: float | None) -> None:
        limit = self.rate_limit
        if limit == math.inf:
            return
        track = cur.tracks.get(RATE_OF_CHANGE)
        if track is not None and track.open:
            if rate is not None and rate > track.peak:
                track.peak = rate
            if rate is not None and rate <= limit / 2:
                since = track.since or t
                self._emit(
                    RATE_OF_CHANGE,
                    self.profile.rate_severity,
                    Kind.CLEARED,
                    since,
                    t,
                    track.peak,
                    limit,
                    f"temperature no longer rising fast ({rate:+.2f} °C/min; "
                    f"fastest {track.peak:.2f} °C/min)",
                )
                track.open = False
            return
        prev = cur.rate_prev
        if rate is None or prev is None or rate <= limit or prev <= limit:
            return
        track = self._track(RATE_OF_CHANGE)
        since = cur.rate_from if cur.rate_from is not None else t
        track.open, track.since, track.peak = True, since, max(rate, prev)
        self._emit(
            RATE_OF_CHANGE,
            self.profile.rate_severity,
            Kind.RAISED,
            since,
            t,
            min(rate, prev),
            limit,
            f"temperature rising {min(rate, prev):.2f} °C/min or faster over two readings "
            f"(limit {limit:g} °C/min), now {v:.1f} °C",
        )

    def _stuck(self, cur: Snapshot, t: int, v: float) -> None:
        needed = self.profile.stuck_readings
        if v == cur.stuck_value:
            cur.stuck_count += 1
            if cur.stuck_count == needed:
                track = self._track(SENSOR_STUCK)
                track.open, track.since, track.peak = True, cur.stuck_since, v
                self._emit(
                    SENSOR_STUCK,
                    self.profile.sensor_fault_severity,
                    Kind.RAISED,
                    cur.stuck_since,
                    t,
                    v,
                    float(needed),
                    f"sensor fault: temperature stuck at exactly {v:g} °C for {needed} readings",
                )
            return
        if cur.stuck_count >= needed:
            track = self._track(SENSOR_STUCK)
            track.open = False
            self._emit(
                SENSOR_STUCK,
                self.profile.sensor_fault_severity,
                Kind.CLEARED,
                cur.stuck_since,
                t,
                track.peak,
                float(needed),
                f"sensor fault cleared: temperature moving again after {cur.stuck_count} "
                f"identical readings ({v:g} °C)",
            )
        cur.stuck_value = v
        cur.stuck_count = 1
        cur.stuck_since = t

    # Hold time at risk -----------------------------------------------------------------------

    def _hold(self, cur: Snapshot, t: int, r: Reading) -> None:
        if r.tilt_deg is not None:
            cur.tipped = r.tilt_deg > TIPPED_DEG
        level = r.ln2_level_pct
        if level is not None:
            points = cur.ln2
            if points and level > points[-1][1] + RECHARGE_JUMP_PCT:
                points.clear()
                cur.ln2_fit = None
            step = (LN2_STEP_TIPPED_S if cur.tipped else LN2_STEP_S) * _US
            if not points or points[-1][2] != cur.tipped or t - points[-1][0] >= step:
                points.append((t, level, cur.tipped))
                while len(points) > LN2_MAX_POINTS or t - points[0][0] > LN2_WINDOW_S * _US:
                    del points[0]
                cur.ln2_fit = _fit(points)
        deliver = self.deliver
        result = cur.ln2_fit
        if deliver is None or result is None:
            return
        need = deliver + self.plan.margin
        depletion = result.depletion
        track = cur.tracks.get(HOLD_AT_RISK)
        if track is None or not track.open:
            # Raise only when even the latest plausible depletion (slowest loss within the 95 %
            # bound) comes too soon: a few noisy points cannot raise it.
            if depletion is None or result.latest is None or result.latest >= need:
                return
            need_h = (need - t) / (3600 * _US)
            left_h = (depletion - t) / (3600 * _US)
            track = self._track(HOLD_AT_RISK)
            track.open, track.since, track.peak = True, t, left_h
            shortfall = (need - depletion) / (3600 * _US)
            earliest = (
                "" if result.earliest is None else f"; earliest {_clock(_at(result.earliest))}"
            )
            self._emit(
                HOLD_AT_RISK,
                self.profile.hold_severity,
                Kind.RAISED,
                t,
                t,
                left_h,
                need_h,
                f"LN2 forecast to run out at {_clock(_at(depletion))}, {shortfall:.0f} h before "
                f"delivery ({_clock(_at(deliver))}) + {self.profile.hold_margin_h:g} h margin "
                f"(level {result.level:.0f} %, losing {result.loss_pct_per_h:.2f} %/h"
                f"{', tipped' if result.tipped else ''}{earliest})",
            )
            return
        left_h = NOT_FALLING_HOURS if depletion is None else (depletion - t) / (3600 * _US)
        need_h = (need - t) / (3600 * _US)
        track.peak = min(track.peak, left_h)
        if depletion is not None and depletion < need + HOLD_CLEAR_DEADBAND_H * 3600 * _US:
            return
        track.open = False
        outlook = "level not falling" if depletion is None else f"runs out {_clock(_at(depletion))}"
        self._emit(
            HOLD_AT_RISK,
            self.profile.hold_severity,
            Kind.CLEARED,
            track.since or t,
            t,
            track.peak,
            need_h,
            f"LN2 hold time sufficient again: {outlook}, delivery ({_clock(_at(deliver))}) + "
            f"{self.profile.hold_margin_h:g} h margin",
        )

    # Bookkeeping ------------------------------------------------------------------------------

    def _track(self, rule: str) -> Track:
        tracks = self.state.current.tracks
        track = tracks.get(rule)
        if track is None:
            track = tracks[rule] = Track()
        return track

    def _emit(
        self,
        rule: str,
        severity: Severity,
        kind: Kind,
        since: int,
        at: int,
        value: float,
        limit: float,
        message: str,
    ) -> None:
        started = _at(since)
        transition = AlarmTransition(
            episode_key=episode_key(rule, started),
            rule=rule,
            severity=severity,
            kind=kind,
            started_at=started,
            at=_at(at),
            value=value,
            limit=limit,
            message=message,
        )
        self.out.append(transition)
        state = self.state
        state.journal.append(JournalEntry(state.current.serial, transition))
        state.current.serial += 1
        if len(state.journal) > MAX_JOURNAL:
            del state.journal[: len(state.journal) - MAX_JOURNAL]

    def _checkpoint(self) -> None:
        checkpoints = self.state.checkpoints
        checkpoints.append(_copy(self.state.current))
        if len(checkpoints) > MAX_CHECKPOINTS:
            # Drop the inner checkpoint whose removal leaves the shortest gap: the survivors
            # spread roughly geometrically back to the start of the shipment.
            gaps = [
                (checkpoints[i + 1].wm_ts or 0) - (checkpoints[i - 1].wm_ts or 0)
                for i in range(1, len(checkpoints) - 1)
            ]
            del checkpoints[1 + gaps.index(min(gaps))]


def _fit(points: Sequence[tuple[int, float, bool]]) -> Ln2Fit | None:
    result = fit([(t / _US, level, tipped) for t, level, tipped in points])
    if result is None:
        return None
    return Ln2Fit(
        as_of=round(result.as_of_s * _US),
        level=result.level_pct,
        loss_pct_per_h=result.loss_pct_per_h,
        depletion=None if result.depletion_s is None else round(result.depletion_s * _US),
        earliest=None if result.earliest_s is None else round(result.earliest_s * _US),
        latest=None if result.latest_s is None else round(result.latest_s * _US),
        tipped=result.tipped,
    )


def _replay_request(state: RuleState, earliest: tuple[int, int]) -> Replay:
    index = _checkpoint_before(state, earliest)
    from_ts = None if index < 0 else state.checkpoints[index].wm_ts
    return Replay(
        from_ts=None if from_ts is None else _at(from_ts),
        earliest_ts=_at(earliest[0]),
        earliest_seq=earliest[1],
    )


def _checkpoint_before(state: RuleState, key: tuple[int, int]) -> int:
    """Index of the latest checkpoint strictly before `key`, or -1 (start of the shipment)."""
    for index in range(len(state.checkpoints) - 1, -1, -1):
        snap = state.checkpoints[index]
        if snap.wm_ts is not None and (snap.wm_ts, snap.wm_seq) < key:
            return index
    return -1


def _diff(old: list[AlarmTransition], new: list[AlarmTransition]) -> list[AlarmTransition]:
    """What a replay changed: the re-derived transitions not already emitted, then episodes the
    late readings removed (`retracted`) or un-ended (`reopened`)."""
    seen = {(t.episode_key, t.kind, t.at, t.value) for t in old}
    changes = [t for t in new if (t.episode_key, t.kind, t.at, t.value) not in seen]
    raised = {t.episode_key for t in new if t.kind is Kind.RAISED}
    cleared = {t.episode_key for t in new if t.kind is Kind.CLEARED}
    retracted: set[str] = set()
    for t in old:
        if t.kind is Kind.RAISED and t.episode_key not in raised:
            retracted.add(t.episode_key)
            changes.append(msgspec.structs.replace(t, kind=Kind.RETRACTED))
    for t in old:
        key = t.episode_key
        if t.kind is Kind.CLEARED and key not in cleared and key not in retracted:
            cleared.add(key)  # one reopen per key
            changes.append(msgspec.structs.replace(t, kind=Kind.REOPENED))
    return changes


def _copy(snapshot: Snapshot) -> Snapshot:
    return _snap_decoder.decode(_snap_encoder.encode(snapshot))


_by_time: Final = itemgetter(0, 1)
"""Sort key of `(micros, seq, reading)`: device time, then sequence (never the reading)."""


def _at(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def _clock(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _worst(limit: Limit, peak: float) -> str:
    if limit.metric is Metric.LID_OPEN:
        return "lid open"
    if limit.direction is Direction.OUTSIDE:
        # The value furthest out of the range, on whichever side: the episode's max or its min.
        word = "max" if peak > limit.threshold else "min"
    else:
        word = "max" if limit.direction is Direction.ABOVE else "min"
    return f"{word} {peak:.1f}{_UNITS[limit.metric]}"
