"""Alarms as people handle them: the lifecycle, who hears about a change, and when to remind.

Lifecycle (CONTRACT.md section 2): an alarm is `open` when its episode is raised, becomes
`acknowledged` when a person takes it (who, when, a required comment), `cleared` when the
condition is gone, and `closed` when a person closes it (again with a comment). Acknowledging
and clearing happen in either order. An alarm that a late reading shows never happened is voided
(its subscribers hear `closed` with the reason). Until someone acknowledges it, an alarm is
repeated to its recipients and escalated to the next tier every `REMIND_AFTER[severity]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from enum import StrEnum
from typing import Any, Final
from zoneinfo import ZoneInfo

from coldchain.errors import Conflict
from coldchain.profiles import Severity


class AlarmState(StrEnum):
    OPEN = "open"
    ACKNOWLEDGED = "acknowledged"
    CLEARED = "cleared"
    CLOSED = "closed"
    VOID = "void"  # shown to subscribers as "closed": a late reading showed it did not happen

    @property
    def public(self) -> str:
        return "closed" if self is AlarmState.VOID else str(self)


class Channel(StrEnum):
    MQTT = "mqtt"
    WEBHOOK = "webhook"
    EMAIL = "email"


# Unacknowledged alarms are repeated, one tier further each time, this often.
REMIND_AFTER: Final[dict[Severity, timedelta | None]] = {
    Severity.CRITICAL: timedelta(minutes=5),
    Severity.MAJOR: timedelta(minutes=15),
    Severity.WARNING: timedelta(hours=1),
    Severity.INFO: None,
}


@dataclass(frozen=True, slots=True)
class Alarm:
    id: int
    shipment_id: str
    dewar_id: str
    rule: str
    episode_key: str
    severity: Severity
    state: AlarmState
    condition_active: bool
    started_at: datetime
    raised_at: datetime
    cleared_at: datetime | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None
    ack_comment: str | None
    closed_at: datetime | None
    closed_by: str | None
    close_comment: str | None
    value: float | None
    limit: float | None
    message: str
    escalation_level: int
    next_notify_at: datetime | None


@dataclass(frozen=True, slots=True)
class AlarmChange:
    id: int
    alarm_id: int
    state: AlarmState
    severity: Severity
    at: datetime
    actor: str | None
    comment: str | None
    escalation_level: int


@dataclass(frozen=True, slots=True)
class Recipient:
    id: int
    name: str
    channel: Channel
    address: str
    secret: str | None
    min_severity: Severity
    site_id: str | None
    shipment_id: str | None
    tier: int
    quiet_from: time | None
    quiet_until: time | None
    tz: str
    active: bool

    def wants(
        self, severity: Severity, shipment_id: str, sites: tuple[str, str], level: int
    ) -> bool:
        """Whether this recipient hears about an alarm of this severity, shipment and
        escalation level (tiers up to the level hear it; the first tier from the start)."""
        return (
            self.active
            and severity.rank >= self.min_severity.rank
            and (self.shipment_id is None or self.shipment_id == shipment_id)
            and (self.site_id is None or self.site_id in sites)
            and self.tier <= level
        )

    def quiet_until_instant(self, severity: Severity, now: datetime) -> datetime | None:
        """When a delivery held by quiet hours may go, or None to send now. Critical alarms
        are never held."""
        if severity is Severity.CRITICAL or self.quiet_from is None or self.quiet_until is None:
            return None
        zone = ZoneInfo(self.tz)
        local = now.astimezone(zone)
        start, end = self.quiet_from, self.quiet_until
        clock = local.timetz().replace(tzinfo=None)
        inside = start <= clock < end if start < end else (clock >= start or clock < end)
        if not inside:
            return None
        day = local.date() if (start < end or clock < end) else local.date() + timedelta(days=1)
        return datetime.combine(day, end, tzinfo=zone).astimezone(UTC)


def acknowledge_check(alarm: Alarm) -> None:
    if alarm.state in (AlarmState.CLOSED, AlarmState.VOID):
        raise Conflict(f"alarm {alarm.id} is {alarm.state.public}; nothing to acknowledge")
    if alarm.acknowledged_at is not None:
        raise Conflict(
            f"alarm {alarm.id} was already acknowledged by {alarm.acknowledged_by} "
            f"at {alarm.acknowledged_at.isoformat()}"
        )


def close_check(alarm: Alarm, cumulative: bool) -> None:
    if alarm.state in (AlarmState.CLOSED, AlarmState.VOID):
        raise Conflict(f"alarm {alarm.id} is already {alarm.state.public}")
    if alarm.condition_active and not cumulative:
        raise Conflict(
            f"alarm {alarm.id}: the condition is still active; acknowledge it now "
            "and close it once it has cleared"
        )


def alert_body(
    alarm: Alarm, *, change_id: int, actor: str | None = None, comment: str | None = None
) -> dict[str, Any]:
    """The alarm-change object of CONTRACT.md section 2 (plus a few fields for context)."""
    return {
        "alarm_id": alarm.id,
        "shipment_id": alarm.shipment_id,
        "dewar_id": alarm.dewar_id,
        "rule": alarm.rule,
        "severity": str(alarm.severity),
        "state": alarm.state.public,
        "started_at": alarm.started_at.isoformat(),
        "value": alarm.value,
        "limit": alarm.limit,
        "message": alarm.message,
        "condition_active": alarm.condition_active,
        "cleared_at": None if alarm.cleared_at is None else alarm.cleared_at.isoformat(),
        "acknowledged_by": alarm.acknowledged_by,
        "escalation_level": alarm.escalation_level,
        "change_id": change_id,
        "actor": actor,
        "comment": comment,
    }
