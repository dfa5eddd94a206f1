-- The write path is the INSERT and nothing else: no trigger runs in the application's
-- transactions. The NOTIFY trigger serialized the commits of every writer (PostgreSQL holds a
-- database-wide lock from a notifying transaction's pre-commit through its WAL flush), and the
-- statement trigger that took a transaction id before the row ids cost 10-20% more. Relays
-- now wait for events by watching the id sequence (wait_for_events, below), and the scan floor
-- finds the transactions that may still hold row ids without help from the writers.
DROP TRIGGER {{p:events_notify}} ON {{schema}}.{{p:events}};
DROP FUNCTION {{schema}}.{{p:notify_events}}();
DROP TRIGGER {{p:events_take_xid}} ON {{schema}}.{{p:events}};
DROP FUNCTION {{schema}}.{{p:take_xid}}();

-- What an idle relay runs: returns as soon as an event it has not seen may be claimable, or
-- after timeout_ms. One call covers a short stretch (the relay calls again), so it never holds a
-- snapshot for long. Checked every tick (first_tick_ms, doubling up to max_tick_ms), all
-- without writing anything:
-- * new rows: the id sequence moved past `bound` and a row above it has become visible;
-- * late rows: a transaction in `running` (those running when the relay last looked, so
--   possibly holding row ids up to `bound`) has committed unpublished rows.
-- Returns what to pass next time: after a claim, new_bound and new_running (read in that order,
-- before the claim); otherwise `bound` and still_running. new_bound is NULL when the sequence
-- hands out ids from per-session caches: ids then do not grow with time, and the relay polls.
-- Runs with the outbox owner's rights, so the relay's role needs no privilege on the sequence.
CREATE FUNCTION {{schema}}.{{p:wait_for_events}}(
    bound bigint, running xid8[], lowest bigint,
    timeout_ms integer, first_tick_ms integer, max_tick_ms integer,
    OUT woken boolean, OUT still_running xid8[], OUT new_bound bigint, OUT new_running xid8[])
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    seq constant regclass := pg_get_serial_sequence('{{schema}}.{{p:events}}', 'id')::regclass;
    cached constant boolean := (SELECT s.seqcache <> 1 FROM pg_sequence AS s
                                WHERE s.seqrelid = seq);
    deadline constant timestamptz := clock_timestamp() + make_interval(secs => timeout_ms / 1e3);
    tick integer := greatest(first_tick_ms, 1);
    committed xid[];
BEGIN
    woken := false;
    still_running := coalesce(running, '{}');
    LOOP
        IF NOT cached AND coalesce(pg_sequence_last_value(seq), 0) > bound AND EXISTS (
               SELECT 1 FROM {{schema}}.{{p:events}} AS e
               WHERE e.published_at IS NULL AND e.dead_lettered_at IS NULL AND e.id > bound) THEN
            woken := true;
            EXIT;
        END IF;
        IF cardinality(still_running) > 0 THEN
            SELECT coalesce(array_agg(xid(x)) FILTER (WHERE pg_visible_in_snapshot(x, s)), '{}'),
                   coalesce(array_agg(x) FILTER (
                       WHERE x = ANY (ARRAY(SELECT pg_snapshot_xip(s)))), '{}')
              INTO committed, still_running
              FROM unnest(still_running) AS x, pg_current_snapshot() AS s;
            IF cardinality(committed) > 0 AND EXISTS (
                   SELECT 1 FROM {{schema}}.{{p:events}} AS e
                   WHERE e.published_at IS NULL AND e.dead_lettered_at IS NULL
                     AND e.id >= lowest AND e.id <= bound AND e.xmin = ANY (committed)) THEN
                woken := true;
                EXIT;
            END IF;
        END IF;
        EXIT WHEN clock_timestamp() >= deadline;
        PERFORM pg_sleep(least(tick, greatest(timeout_ms, 1)) / 1e3);
        tick := least(tick * 2, greatest(max_tick_ms, 1));
    END LOOP;
    new_bound := CASE WHEN NOT cached THEN coalesce(pg_sequence_last_value(seq), 0) END;
    new_running := ARRAY(SELECT pg_snapshot_xip(pg_current_snapshot()));
END;
$$;
