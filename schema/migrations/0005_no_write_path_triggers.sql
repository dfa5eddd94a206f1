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
-- snapshot for long. Checked every tick (first_tick_ms, doubling up to max_tick_ms), writing
-- nothing:
-- * new rows: the id sequence moved past `bound` and a row above it has become visible;
-- * late rows: once any transaction has ended since the last tick, whether one of the 64
--   highest unpublished rows from `lowest` to `bound` was written by a transaction that `seen`
--   (the snapshot of the relay's last look) does not show as committed: row ids are taken
--   before commit, so such rows can appear below the bound. xmin is compared as the 32-bit id
--   it is (modulo 2^32). The 64 bound the cost when many rows wait (behind a dead letter, say);
--   a late row deeper than that waits for the relay's poll interval.
-- new_bound and new_seen are a fresh look (the bound read first) for the claim that follows.
-- new_bound is NULL when the sequence hands out ids from per-session caches: ids then do not
-- grow with time, and the relay polls instead.
-- Runs with the outbox owner's rights, so the relay's role needs no privilege on the sequence.
CREATE FUNCTION {{schema}}.{{p:wait_for_events}}(
    bound bigint, seen pg_snapshot, lowest bigint,
    timeout_ms integer, first_tick_ms integer, max_tick_ms integer,
    OUT woken boolean, OUT new_bound bigint, OUT new_seen pg_snapshot)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    seq constant regclass := pg_get_serial_sequence('{{schema}}.{{p:events}}', 'id')::regclass;
    cached constant boolean := (SELECT s.seqcache <> 1 FROM pg_sequence AS s
                                WHERE s.seqrelid = seq);
    deadline constant timestamptz := clock_timestamp() + make_interval(secs => timeout_ms / 1e3);
    seen_xmax constant bigint := pg_snapshot_xmax(seen)::text::bigint % 4294967296;
    seen_running constant bigint[] := ARRAY(SELECT x::text::bigint % 4294967296
                                            FROM pg_snapshot_xip(seen) AS x);
    tick integer := greatest(first_tick_ms, 1);
    now_snapshot text;
    last_snapshot text;
BEGIN
    woken := false;
    LOOP
        IF NOT cached AND coalesce(pg_sequence_last_value(seq), 0) > bound AND EXISTS (
               SELECT 1 FROM {{schema}}.{{p:events}} AS e
               WHERE e.published_at IS NULL AND e.dead_lettered_at IS NULL AND e.id > bound) THEN
            woken := true;
            EXIT;
        END IF;
        now_snapshot := pg_current_snapshot()::text;
        IF now_snapshot IS DISTINCT FROM last_snapshot AND EXISTS (
               SELECT 1 FROM (SELECT e.xmin::text::bigint AS x FROM {{schema}}.{{p:events}} AS e
                              WHERE e.published_at IS NULL AND e.dead_lettered_at IS NULL
                                AND e.id >= lowest AND e.id <= bound
                              ORDER BY e.id DESC LIMIT 64) AS r
               WHERE r.x > 2  -- not frozen
                 AND ((r.x - seen_xmax + 4294967296) % 4294967296 < 2147483648
                      OR r.x = ANY (seen_running))) THEN
            woken := true;
            EXIT;
        END IF;
        last_snapshot := now_snapshot;
        EXIT WHEN clock_timestamp() >= deadline;
        PERFORM pg_sleep(least(tick, greatest(timeout_ms, 1)) / 1e3);
        tick := least(tick * 2, greatest(max_tick_ms, 1));
    END LOOP;
    new_bound := CASE WHEN NOT cached THEN coalesce(pg_sequence_last_value(seq), 0) END;
    new_seen := pg_current_snapshot();
END;
$$;
