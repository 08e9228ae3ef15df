-- Shipments and everything people do with them: sites of the route network, product profiles,
-- custody events, API tokens and the append-only audit trail (21 CFR 11.10(e)).

CREATE TABLE sites (
    id               text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9._-]{1,64}$'),
    name             text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    kind             text NOT NULL CHECK (kind IN ('manufacturing', 'treatment_center', 'airport', 'depot')),
    lat              double precision NOT NULL CHECK (lat BETWEEN -90 AND 90),
    lon              double precision NOT NULL CHECK (lon BETWEEN -180 AND 180),
    tz               text NOT NULL,
    iata             text CHECK (iata ~ '^[A-Z0-9]{3}$'),
    country          text NOT NULL,
    ln2_recharge     boolean NOT NULL DEFAULT false,
    customs_minutes  integer NOT NULL DEFAULT 0 CHECK (customs_minutes >= 0),
    connect_minutes  integer NOT NULL DEFAULT 0 CHECK (connect_minutes >= 0),
    recovery_minutes integer NOT NULL DEFAULT 0 CHECK (recovery_minutes >= 0),
    opens            time,
    closes           time,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((opens IS NULL) = (closes IS NULL))
);

CREATE TABLE lanes (
    origin      text NOT NULL REFERENCES sites (id),
    destination text NOT NULL REFERENCES sites (id),
    mode        text NOT NULL CHECK (mode IN ('road', 'courier')),
    minutes     integer NOT NULL CHECK (minutes > 0),
    cost        double precision NOT NULL CHECK (cost >= 0),
    risk        double precision NOT NULL CHECK (risk BETWEEN 0 AND 1),
    PRIMARY KEY (origin, destination, mode)
);

CREATE TABLE flights (
    carrier     text NOT NULL,
    flight      text NOT NULL,
    departs_at  timestamptz NOT NULL,
    origin      text NOT NULL REFERENCES sites (id),
    destination text NOT NULL REFERENCES sites (id),
    arrives_at  timestamptz NOT NULL CHECK (arrives_at > departs_at),
    cost        double precision NOT NULL CHECK (cost >= 0),
    risk        double precision NOT NULL CHECK (risk BETWEEN 0 AND 1),
    PRIMARY KEY (carrier, flight, departs_at)
);

CREATE INDEX flights_departs_at ON flights (departs_at);

-- The network changes rarely; its version tells the planner when to rebuild its index.
CREATE SEQUENCE network_version;

CREATE TABLE profiles (
    name       text PRIMARY KEY,
    body       jsonb NOT NULL,
    built_in   boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE shipments (
    id                text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9._-]{1,64}$'),
    dewar_id          text NOT NULL CHECK (dewar_id ~ '^[A-Za-z0-9._-]{1,64}$'),
    profile           text NOT NULL REFERENCES profiles (name),
    origin            text NOT NULL REFERENCES sites (id),
    destination       text NOT NULL REFERENCES sites (id),
    deliver_by        timestamptz,
    planned_departure timestamptz,
    chain_of_identity text CHECK (length(chain_of_identity) <= 256),
    status            text NOT NULL DEFAULT 'created'
        CHECK (status IN ('created', 'packed', 'in_transit', 'customs_hold', 'delivered', 'cancelled')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    created_by        text NOT NULL,
    -- The shipment owns its dewar's readings from `starts_at` (pack-out, or creation until the
    -- dewar is packed) until `ends_at` (delivery or cancellation), in device time.
    starts_at         timestamptz NOT NULL,
    ends_at           timestamptz,
    CHECK (origin <> destination)
);

-- A dewar travels in one shipment at a time.
CREATE UNIQUE INDEX shipments_one_active_per_dewar ON shipments (dewar_id)
    WHERE status NOT IN ('delivered', 'cancelled');
CREATE INDEX shipments_dewar_window ON shipments (dewar_id, starts_at);
CREATE INDEX shipments_created ON shipments (created_at DESC, id DESC);

CREATE TABLE custody_events (
    id          bigserial PRIMARY KEY,
    shipment_id text NOT NULL REFERENCES shipments (id),
    type        text NOT NULL CHECK (type IN ('packed', 'picked_up', 'handoff', 'customs_hold',
                                              'customs_released', 'delivered', 'cancelled')),
    at          timestamptz NOT NULL,
    location    text CHECK (length(location) <= 200),
    note        text CHECK (length(note) <= 2000),
    actor       text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX custody_events_shipment ON custody_events (shipment_id, at, id);

CREATE TABLE api_tokens (
    id         bigserial PRIMARY KEY,
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    role       text NOT NULL CHECK (role IN ('viewer', 'operator', 'planner', 'admin')),
    hash       bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,
    revoked_at timestamptz
);

CREATE TABLE audit_log (
    id        bigserial PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    actor     text NOT NULL,
    action    text NOT NULL,
    entity    text NOT NULL,
    entity_id text NOT NULL,
    detail    jsonb
);

CREATE INDEX audit_log_entity ON audit_log (entity, entity_id, id);

-- Append-only, enforced where no application bug can get around it.
CREATE FUNCTION audit_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_log_no_update_or_delete BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_is_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_is_append_only();
