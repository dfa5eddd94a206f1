-- The write path is the INSERT and nothing else: no trigger runs in the application's
-- transactions. The NOTIFY trigger serialized the commits of every writer (PostgreSQL holds a
-- database-wide lock from a notifying transaction's pre-commit through its WAL flush), and the
-- statement trigger that took a transaction id before the row ids cost 10-20% more. Relays
-- now wait for events by watching the id sequence (wait_for_events, below), and the scan floor
-- finds the transactions that may still hold row ids without help from the writers
-- (relay/floor.py).
DROP TRIGGER {{p:events_notify}} ON {{schema}}.{{p:events}};
DROP FUNCTION {{schema}}.{{p:notify_events}}();
DROP TRIGGER {{p:events_take_xid}} ON {{schema}}.{{p:events}};
DROP FUNCTION {{schema}}.{{p:take_xid}}();

-- The scan floor's bound is now last_id(). id_bound() stays for relays of earlier versions
-- still running during an upgrade: their floor rested on the trigger dropped above, so it
-- returns 0, which to them means "no floor" (claims from the start: slower, never wrong).
CREATE OR REPLACE FUNCTION {{schema}}.{{p:id_bound}}() RETURNS bigint
    LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $$ SELECT 0::bigint $$;

-- The last row id handed out, read with the rights of the outbox's owner (a relay's role needs
-- no privilege on the sequence); 0, meaning "no floor", when the sequence hands out ids from
-- per-session caches: those can come out below its last value.
CREATE FUNCTION {{schema}}.{{p:last_id}}() RETURNS bigint
    LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $$
SELECT CASE WHEN s.seqcache = 1 THEN coalesce(pg_sequence_last_value(s.seqrelid), 0) ELSE 0 END
FROM pg_sequence AS s
WHERE s.seqrelid = pg_get_serial_sequence('{{schema}}.{{p:events}}', 'id')::regclass;
$$;

-- What an idle relay runs: returns as soon as an event it has not seen may be claimable, or
-- after timeout_ms. One call covers a short stretch (the relay calls again), so it never holds a
-- snapshot for long. Checked every tick (1 ms for the first fast_ms, as after a batch when the
-- next event may be close; then doubling up to max_tick_ms), writing nothing:
-- * new rows: the id sequence moved past `bound` and a row above it has become visible;
-- * late rows: once any transaction has ended since the last tick, whether the 64 highest
--   unpublished rows from `lowest` to `bound` include one that `seen` (those rows' ids at the
--   relay's last look) did not: row ids are taken before commit, so rows can become visible
--   below the bound. Only the 64 highest are read, so many waiting rows (behind a dead letter,
--   say) cost no more; a late row deeper than that, and below all of `seen`, waits for the
--   relay's poll interval.
-- new_bound and new_seen are a fresh look (the bound read first) for the claim that follows.
-- new_bound is NULL when the sequence hands out ids from per-session caches: ids then do not
-- grow with time, and the relay polls instead.
-- Runs with the outbox owner's rights, so the relay's role needs no privilege on the sequence.
CREATE FUNCTION {{schema}}.{{p:wait_for_events}}(
    bound bigint, seen bigint[], lowest bigint, timeout_ms integer, fast_ms integer,
    max_tick_ms integer, OUT woken boolean, OUT new_bound bigint, OUT new_seen bigint[])
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    seq constant regclass := pg_get_serial_sequence('{{schema}}.{{p:events}}', 'id')::regclass;
    cached constant boolean := (SELECT s.seqcache <> 1 FROM pg_sequence AS s
                                WHERE s.seqrelid = seq);
    started constant timestamptz := clock_timestamp();
    deadline constant timestamptz := started + make_interval(secs => timeout_ms / 1e3);
    fast_until constant timestamptz := started + make_interval(secs => fast_ms / 1e3);
    seen_all constant boolean := cardinality(seen) < 64;  -- every waiting row, not the top 64
    seen_lowest constant bigint := (SELECT min(s) FROM unnest(seen) AS s);
    tick integer := 1;
    now_snapshot text;
    last_snapshot text;
BEGIN
    woken := false;
    LOOP
        -- One statement a tick for both: the snapshot tells whether any transaction ended.
        SELECT coalesce(NOT cached AND pg_sequence_last_value(seq) > bound AND EXISTS (
                   SELECT 1 FROM {{schema}}.{{p:events}} AS e
                   WHERE e.published_at IS NULL AND e.dead_lettered_at IS NULL
                     AND e.id > bound), false),
               pg_current_snapshot()::text
          INTO woken, now_snapshot;
        EXIT WHEN woken;
        IF now_snapshot IS DISTINCT FROM last_snapshot AND EXISTS (
               SELECT 1 FROM (SELECT e.id FROM {{schema}}.{{p:events}} AS e
                              WHERE e.published_at IS NULL AND e.dead_lettered_at IS NULL
                                AND e.id >= lowest AND e.id <= bound
                              ORDER BY e.id DESC LIMIT 64) AS r
               WHERE r.id <> ALL (seen) AND (seen_all OR r.id > seen_lowest)) THEN
            woken := true;
            EXIT;
        END IF;
        last_snapshot := now_snapshot;
        EXIT WHEN clock_timestamp() >= deadline;
        PERFORM pg_sleep(least(tick, greatest(timeout_ms, 1)) / 1e3);
        IF clock_timestamp() >= fast_until THEN
            tick := least(tick * 2, greatest(max_tick_ms, 1));
        END IF;
    END LOOP;
    new_bound := CASE WHEN NOT cached THEN coalesce(pg_sequence_last_value(seq), 0) END;
    new_seen := ARRAY(SELECT e.id FROM {{schema}}.{{p:events}} AS e
                      WHERE e.published_at IS NULL AND e.dead_lettered_at IS NULL
                        AND e.id >= lowest AND e.id <= new_bound
                      ORDER BY e.id DESC LIMIT 64);
END;
$$;
