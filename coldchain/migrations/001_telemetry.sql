-- The ingest spine: dewars, every reading they send, and every message we could not accept.

-- A dewar is registered the first time it sends anything. The row is not updated per reading
-- (that would rewrite a hot row thousands of times a second); "last seen" comes from the
-- (dewar_id, ts) index of readings.
CREATE TABLE dewars (
    id            text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9._-]{1,64}$'),
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    status        text CHECK (status IN ('online', 'offline')),
    status_at     timestamptz
);

-- Telemetry is never edited in place: (dewar_id, seq) identifies a reading and a repeat is
-- dropped on insert. `ts` is the device's measurement time; `received_at` the service's.
-- The ingest registers the dewar in the same transaction, so there is no foreign key: its
-- per-row check would sit on the hottest path to guard a relation the ingest already keeps.
CREATE TABLE readings (
    dewar_id      text NOT NULL,
    seq           bigint NOT NULL CHECK (seq >= 0),
    ts            timestamptz NOT NULL,
    received_at   timestamptz NOT NULL,
    temp_c        double precision NOT NULL,
    ln2_level_pct real,
    tilt_deg      real,
    shock_g       real,
    lid_open      boolean,
    battery_pct   real,
    lat           double precision,
    lon           double precision,
    extra         jsonb,
    PRIMARY KEY (dewar_id, seq)
);

CREATE INDEX readings_dewar_ts ON readings (dewar_id, ts);

CREATE TABLE dead_letters (
    id          bigserial PRIMARY KEY,
    received_at timestamptz NOT NULL DEFAULT now(),
    topic       text NOT NULL,
    dewar_id    text,
    item_index  integer,
    reason      text NOT NULL,
    payload     bytea NOT NULL
);

CREATE INDEX dead_letters_received_at ON dead_letters (received_at DESC);
CREATE INDEX dead_letters_dewar ON dead_letters (dewar_id, received_at DESC);
