-- Every INSERT into the outbox takes its transaction id before it takes any row id, so that a
-- transaction which got its id after a moment can only hold row ids handed out after that
-- moment. The relay relies on it to start its claims past the index entries of rows already
-- published (the scan floor, relay/floor.py); without this order a row id taken just before
-- the transaction id could commit below the floor and be sent late, after later rows of its
-- key. One call per statement, not per row; rows never wait for it.
CREATE FUNCTION {{schema}}.{{p:take_xid}}() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_current_xact_id();
    RETURN NULL;
END;
$$;

CREATE TRIGGER {{p:events_take_xid}}
    BEFORE INSERT ON {{schema}}.{{p:events}}
    FOR EACH STATEMENT EXECUTE FUNCTION {{schema}}.{{p:take_xid}}();

-- The other half of the floor: the last row id handed out, read with the rights of the outbox's
-- owner (a relay's role needs no privilege on the sequence). 0, meaning "no floor", when the
-- sequence hands out ids from per-session caches: those can come out below its last value.
CREATE FUNCTION {{schema}}.{{p:id_bound}}() RETURNS bigint
    LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $$
SELECT CASE WHEN s.seqcache = 1 THEN coalesce(pg_sequence_last_value(s.seqrelid), 0) ELSE 0 END
FROM pg_sequence AS s
WHERE s.seqrelid = pg_get_serial_sequence('{{schema}}.{{p:events}}', 'id')::regclass;
$$;
