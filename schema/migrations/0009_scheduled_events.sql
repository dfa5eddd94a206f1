-- Events to deliver later (`outbox.add(..., deliver_at=...)` or `delay=...`), written in the
-- application's transaction like any event but kept out of the outbox table until they fall
-- due: the claims, the waits and the backlog never see them, so a long schedule slows none of
-- them and holds back no key. When a row falls due a relay moves it into the outbox table
-- (release_due, below); from then on it is an event like the others, ordered after every event
-- of its key already there. `outbox.cancel` deletes a row that has not fallen due yet.
CREATE TABLE {{schema}}.{{p:scheduled}} (
    -- Ties between rows due at the same instant go in the order they were scheduled.
    id              bigint GENERATED ALWAYS AS IDENTITY,
    event_id        uuid NOT NULL,
    topic           text NOT NULL,
    key             bytea,
    payload         bytea NOT NULL,
    header_names    text[] NOT NULL DEFAULT '{}',
    header_values   bytea[] NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    due_at          timestamptz NOT NULL,
    CONSTRAINT {{p:scheduled_pkey}} PRIMARY KEY (id),
    CONSTRAINT {{p:scheduled_event_id_key}} UNIQUE (event_id),
    CONSTRAINT {{p:scheduled_topic_check}}
        CHECK (topic ~ '^[a-zA-Z0-9._-]{1,249}$' AND topic NOT IN ('.', '..')),
    CONSTRAINT {{p:scheduled_header_check}}
        CHECK (cardinality(header_names) = cardinality(header_values))
);

-- Serves the release ("rows due by now, soonest first") and the next due time (its first
-- entry): neither reads a row that is not due.
CREATE INDEX {{p:scheduled_due_idx}} ON {{schema}}.{{p:scheduled}} (due_at, id);

-- Moves up to `batch` rows that are due into the outbox table, soonest first (ties in the order
-- they were scheduled), in one statement: a row is either still scheduled or in the outbox,
-- never both nor neither. Rows another transaction holds (a concurrent release, a `cancel` not
-- committed yet) are skipped, not waited for. A released event keeps its event id; its
-- created_at becomes its due time, so the outbox's lag and latency count from when it fell due.
-- Returns how many it moved and when the next scheduled row falls due (NULL: none is left).
-- Runs with the outbox owner's rights: the relay's role needs no privilege on this table.
CREATE FUNCTION {{schema}}.{{p:release_due}}(
    batch integer, OUT released integer, OUT next_due timestamptz)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    -- A value, not clock_timestamp() in the condition: a volatile call can only filter the
    -- index scan, which then reads every future row whenever fewer than `batch` rows are due;
    -- a value bounds it, and the scan stops at the first row not due.
    until constant timestamptz := clock_timestamp();
BEGIN
    WITH due AS (
        DELETE FROM {{schema}}.{{p:scheduled}} AS s
        WHERE s.id IN (SELECT d.id FROM {{schema}}.{{p:scheduled}} AS d
                       WHERE d.due_at <= until
                       ORDER BY d.due_at, d.id
                       LIMIT batch
                       FOR UPDATE SKIP LOCKED)
        RETURNING s.id, s.event_id, s.topic, s.key, s.payload, s.header_names, s.header_values,
                  s.due_at
    ), moved AS (
        INSERT INTO {{schema}}.{{p:events}}
            (event_id, topic, key, payload, header_names, header_values, created_at)
        SELECT due.event_id, due.topic, due.key, due.payload, due.header_names,
               due.header_values, due.due_at
        FROM due
        ORDER BY due.due_at, due.id
        RETURNING 1
    )
    SELECT count(*)::integer INTO released FROM moved;
    next_due := (SELECT s.due_at FROM {{schema}}.{{p:scheduled}} AS s
                 ORDER BY s.due_at, s.id LIMIT 1);
END;
$$;

-- The next due time alone (NULL: nothing is scheduled), which an idle relay reads after each
-- call of wait_for_events, in the same statement. VOLATILE, so that it reads the schedule as it
-- is when the wait ends, rows committed during the wait included, not as it was when the
-- statement began.
CREATE FUNCTION {{schema}}.{{p:next_due}}() RETURNS timestamptz
    LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
SELECT s.due_at FROM {{schema}}.{{p:scheduled}} AS s ORDER BY s.due_at, s.id LIMIT 1;
$$;

-- The schedule in figures, for the relay's gauges and `status`: rows waiting and the next due
-- time. Counting reads every entry of the due index; the relay asks at the backlog's pace.
CREATE FUNCTION {{schema}}.{{p:scheduled_summary}}(OUT waiting bigint, OUT next_due timestamptz)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
SELECT count(*), min(s.due_at) FROM {{schema}}.{{p:scheduled}} AS s;
$$;
