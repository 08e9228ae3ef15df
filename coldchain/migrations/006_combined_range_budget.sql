-- The built-in 2-8 °C and 15-25 °C profiles had two budgets of an hour each, one for the time
-- above the range and one for the time below it, so 45 min too warm plus 45 min too cold (90 min
-- out of range) never alarmed. What was asked is one cumulative time-out-of-range budget per
-- shipment: a limit can now be `outside` a range (`low` to `threshold`), and both sides count
-- together. A built-in profile whose two budgets are still exactly as shipped gets the one
-- combined budget in their place (where `temp_out_of_range_budget` was; everything else in the
-- profile stays as it is); budgets an admin edited are left alone. A fresh database gets the new
-- built-ins after migrating (`Store.migrate` inserts `profiles.BUILT_IN`). Each change is in
-- the audit log, before and after, as the service's own.
WITH band (name, low, high) AS (VALUES ('refrigerated', 2, 8), ('ambient', 15, 25)),
target AS (
    SELECT p.name, p.body AS before, b.low, b.high
    FROM profiles p
    JOIN band b USING (name)
    WHERE p.built_in
      AND p.body -> 'limits' @> jsonb_build_array(
          jsonb_build_object(
              'rule', 'temp_out_of_range_budget', 'metric', 'temp_c', 'direction', 'above',
              'threshold', b.high, 'severity', 'critical', 'delay_s', 0, 'budget_s', 3600,
              'hysteresis', 0.5,
              'message', format('over an hour above %s °C in this shipment', b.high)),
          jsonb_build_object(
              'rule', 'temp_below_range_budget', 'metric', 'temp_c', 'direction', 'below',
              'threshold', b.low, 'severity', 'critical', 'delay_s', 0, 'budget_s', 3600,
              'hysteresis', 0.5,
              'message', format('over an hour below %s °C in this shipment', b.low)))
),
updated AS (
    UPDATE profiles p
    SET body = jsonb_set(
            p.body,
            '{limits}',
            (SELECT jsonb_agg(
                        CASE WHEN e.lim ->> 'rule' = 'temp_out_of_range_budget'
                            THEN e.lim || jsonb_build_object(
                                'direction', 'outside', 'low', t.low,
                                'message', format('over an hour outside %s-%s °C in this shipment',
                                                  t.low, t.high))
                            ELSE e.lim END
                        ORDER BY e.i)
             FROM jsonb_array_elements(p.body -> 'limits') WITH ORDINALITY AS e (lim, i)
             WHERE e.lim ->> 'rule' <> 'temp_below_range_budget')),
        updated_at = now()
    FROM target t
    WHERE p.name = t.name
    RETURNING p.name, p.body
)
INSERT INTO audit_log (actor, action, entity, entity_id, detail)
SELECT 'coldchain', 'profile.updated', 'profile', u.name,
       jsonb_build_object(
           'before', t.before, 'after', u.body,
           'reason', 'migration 006: one budget for the time outside the range, both sides')
FROM updated u
JOIN target t USING (name);
