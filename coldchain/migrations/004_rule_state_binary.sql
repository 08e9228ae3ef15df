-- Rule state is saved as msgpack, not JSON: it is only ever read back by the service, and for a
-- large fleet encoding it to JSON (and PostgreSQL parsing it as jsonb) cost more than the rules.
-- The rows can be dropped: on start the service re-derives any state it lacks from the stored
-- readings, and re-derived alarms have the same episode keys.
DROP TABLE rule_state;

CREATE TABLE rule_state (
    shipment_id text PRIMARY KEY REFERENCES shipments (id),
    state       bytea NOT NULL,
    fed_through timestamptz NOT NULL,
    saved_at    timestamptz NOT NULL DEFAULT now()
);
