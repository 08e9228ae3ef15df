-- The route planned for each shipment, with its history: every plan or re-plan (a cancelled
-- flight, a customs hold, a tipped dewar) adds a row and the newest row is the current route.
-- `plan` is one route as `POST /api/v1/routes/plan` answers it (legs, arrival, hold margin,
-- handoffs, cost, risk); `request` is what was asked (from where, when, hold, objective,
-- excluded flights); `eta` is the plan's delivery instant, kept as a column because the rules
-- read it for every active shipment.
CREATE TABLE shipment_routes (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    shipment_id text NOT NULL REFERENCES shipments (id),
    from_site   text NOT NULL REFERENCES sites (id),
    eta         timestamptz NOT NULL,
    plan        jsonb NOT NULL,
    request     jsonb NOT NULL,
    planned_at  timestamptz NOT NULL DEFAULT now(),
    planned_by  text NOT NULL
);

CREATE INDEX shipment_routes_newest ON shipment_routes (shipment_id, id DESC);
