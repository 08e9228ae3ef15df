-- A recipient in quiet hours hears each alarm once when they end, in its latest state. Until now
-- each change (and an unacknowledged major alarm repeats every 15 min) queued its own delivery
-- held until the end of quiet hours, so a night's worth of repeats arrived at once, even after
-- someone had acknowledged the alarm. Now a change of an alarm supersedes that alarm's
-- deliveries still held by quiet hours; the new change is delivered in their place.
-- `held_until`: when a delivery held by quiet hours may go (NULL: it was not held).
ALTER TABLE notifications DROP CONSTRAINT notifications_status_check;
ALTER TABLE notifications ADD CONSTRAINT notifications_status_check
    CHECK (status IN ('pending', 'sent', 'failed', 'superseded'));
ALTER TABLE notifications ADD COLUMN held_until timestamptz;

CREATE INDEX notifications_held ON notifications (alarm_id)
    WHERE status = 'pending' AND held_until IS NOT NULL;
