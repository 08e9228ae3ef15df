-- The rules' alarm writer applies a batch of transitions in one statement, without holding a
-- transaction open across round trips: it reads the episodes' alarms (and the recipients)
-- without locking them, works out the changes, and writes them all in one statement that first
-- checks nothing it read has changed since. When something has (a person acknowledged an alarm
-- in between, a recipient was edited, another writer raised the same episode), this function
-- fails the statement, so that none of it is written, and the writer reads and works it out
-- again. SQLSTATE 40001 (serialization_failure): the statement is safe to retry as a whole.
CREATE FUNCTION coldchain_unchanged(ok boolean) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF ok IS NOT TRUE THEN
        RAISE EXCEPTION 'alarms or recipients changed since they were read'
            USING ERRCODE = 'serialization_failure';
    END IF;
    RETURN true;
END
$$;

-- The active recipients, as the alarm writer checks they are unchanged: a recipient added,
-- edited or deactivated gives another value (every update gives a row a new xmin).
CREATE FUNCTION coldchain_recipients_version() RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce(string_agg(id::text || ':' || xmin::text, ',' ORDER BY id), '')
    FROM recipients WHERE active
$$;
