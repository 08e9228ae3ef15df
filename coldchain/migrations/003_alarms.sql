-- Alarms, the rule engine's state, who hears about what, and every delivery attempt.

-- One row per excursion episode of one rule of one shipment. `episode_key` comes from the rule
-- engine and is the same however often the episode is re-derived (redelivery, replay, restart),
-- so an episode is one alarm. `started_at` and `cleared_at` are device times.
CREATE TABLE alarms (
    id               bigserial PRIMARY KEY,
    shipment_id      text NOT NULL REFERENCES shipments (id),
    dewar_id         text NOT NULL,
    rule             text NOT NULL,
    episode_key      text NOT NULL,
    severity         text NOT NULL CHECK (severity IN ('info', 'warning', 'major', 'critical')),
    state            text NOT NULL CHECK (state IN ('open', 'acknowledged', 'cleared', 'closed', 'void')),
    condition_active boolean NOT NULL DEFAULT true,
    started_at       timestamptz NOT NULL,
    raised_at        timestamptz NOT NULL DEFAULT now(),
    cleared_at       timestamptz,
    acknowledged_at  timestamptz,
    acknowledged_by  text,
    ack_comment      text,
    closed_at        timestamptz,
    closed_by        text,
    close_comment    text,
    value            double precision,
    limit_value      double precision,
    message          text NOT NULL,
    escalation_level integer NOT NULL DEFAULT 0,
    next_notify_at   timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (shipment_id, episode_key)
);

CREATE INDEX alarms_by_state ON alarms (state, severity, raised_at DESC);
CREATE INDEX alarms_by_shipment ON alarms (shipment_id, raised_at DESC);
CREATE INDEX alarms_to_remind ON alarms (next_notify_at) WHERE next_notify_at IS NOT NULL;

-- Every change of every alarm, in order: the alarm log of the shipment report.
CREATE TABLE alarm_changes (
    id        bigserial PRIMARY KEY,
    alarm_id  bigint NOT NULL REFERENCES alarms (id),
    state     text NOT NULL,
    severity  text NOT NULL,
    at        timestamptz NOT NULL DEFAULT now(),
    actor     text,
    comment   text,
    escalation_level integer NOT NULL DEFAULT 0
);

CREATE INDEX alarm_changes_alarm ON alarm_changes (alarm_id, id);

-- The rule engine's state per shipment, saved periodically; with the stored readings it is
-- enough to carry on exactly where evaluation stopped after a restart.
CREATE TABLE rule_state (
    shipment_id text PRIMARY KEY REFERENCES shipments (id),
    state       jsonb NOT NULL,
    fed_through timestamptz NOT NULL,   -- received_at of the newest reading fed
    saved_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE recipients (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    channel      text NOT NULL CHECK (channel IN ('email', 'webhook')),
    address      text NOT NULL CHECK (length(address) BETWEEN 3 AND 2000),
    secret       text,
    min_severity text NOT NULL DEFAULT 'warning'
        CHECK (min_severity IN ('info', 'warning', 'major', 'critical')),
    site_id      text REFERENCES sites (id),
    shipment_id  text REFERENCES shipments (id),
    tier         integer NOT NULL DEFAULT 0 CHECK (tier BETWEEN 0 AND 9),
    quiet_from   time,
    quiet_until  time,
    tz           text NOT NULL DEFAULT 'UTC',
    active       boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- The outbox: one row per alarm change per destination, written in the transaction of the
-- change, so nothing is lost across a restart and nothing is sent twice for the same change.
CREATE TABLE notifications (
    id              bigserial PRIMARY KEY,
    change_id       bigint NOT NULL REFERENCES alarm_changes (id),
    alarm_id        bigint NOT NULL REFERENCES alarms (id),
    channel         text NOT NULL CHECK (channel IN ('mqtt', 'webhook', 'email')),
    recipient_id    bigint REFERENCES recipients (id),
    body            jsonb NOT NULL,
    status          text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,
    UNIQUE NULLS NOT DISTINCT (change_id, channel, recipient_id)
);

CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE status = 'pending';

CREATE TABLE delivery_attempts (
    id              bigserial PRIMARY KEY,
    notification_id bigint NOT NULL REFERENCES notifications (id),
    at              timestamptz NOT NULL DEFAULT now(),
    ok              boolean NOT NULL,
    detail          text,
    duration_ms     double precision
);

CREATE INDEX delivery_attempts_notification ON delivery_attempts (notification_id, id);
