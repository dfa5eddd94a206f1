-- Published events kept for `--retention`. A relay with a retention moves each published row
-- here in its batch's own transaction (one DELETE ... RETURNING feeding one INSERT), instead of
-- marking it in place: the outbox table keeps only rows waiting to be sent, and the marking
-- costs a delete and an append, not an UPDATE of every index. Partitioned by the time of
-- publication; a partition past the retention is dropped whole, so the purge deletes no row and
-- leaves nothing for vacuum. A row is kept at least the retention and at most the retention
-- plus one partition's span. Rows marked in place by earlier versions stay in the outbox table
-- until they expire (the relay purges them there as before).
CREATE TABLE {{schema}}.{{p:published}} (
    id              bigint NOT NULL,
    event_id        uuid NOT NULL,
    topic           text NOT NULL,
    key             bytea,
    payload         bytea NOT NULL,
    header_names    text[] NOT NULL,
    header_values   bytea[] NOT NULL,
    created_at      timestamptz NOT NULL,
    attempts        integer NOT NULL,
    published_at    timestamptz NOT NULL
) PARTITION BY RANGE (published_at);

-- Serves `replay`, `status` and the tests' reads by time or id range: a summary per block
-- range, a few bytes per 128 pages, so the append pays almost nothing for it.
CREATE INDEX {{p:published_brin}}
    ON {{schema}}.{{p:published}} USING brin (published_at, created_at, id);

-- Rows with no partition for their time land here rather than fail the batch (the relays make
-- partitions ahead of need, so this stays empty unless none ran for a while); the purge deletes
-- its expired rows one by one.
CREATE TABLE {{schema}}.{{p:published_default}}
    PARTITION OF {{schema}}.{{p:published}} DEFAULT;

-- The range partitions, with their bounds read back from the catalog.
CREATE FUNCTION {{schema}}.{{p:published_partitions}}(
    OUT partition regclass, OUT starts timestamptz, OUT ends timestamptz)
    RETURNS SETOF record
    LANGUAGE sql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' SET datestyle = 'ISO, YMD' AS $$
SELECT c.oid::regclass,
       (regexp_match(b.expr, 'FROM \(''([^'']+)''\)'))[1]::timestamptz,
       (regexp_match(b.expr, 'TO \(''([^'']+)''\)'))[1]::timestamptz
FROM pg_inherits AS i, pg_class AS c,
     LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS expr) AS b
WHERE i.inhparent = '{{schema}}.{{p:published}}'::regclass AND c.oid = i.inhrelid
  AND b.expr <> 'DEFAULT'
ORDER BY 2;
$$;

-- Makes the partitions from the end of the last one (at the latest one span before now) until
-- `ahead` from now, each `span` long and aligned on multiples of it, named after the epoch
-- second it starts at. Each is created apart and attached, which takes SHARE UPDATE EXCLUSIVE
-- on the parent (relays moving rows in go on meanwhile) and ACCESS EXCLUSIVE on the default
-- partition, which it scans. One caller at a time (the others return 0 at once); a lock not
-- granted within lock_timeout leaves the rest for the next call. Returns how many it made. Runs with the outbox owner's rights: the relay's role needs no DDL rights.
CREATE FUNCTION {{schema}}.{{p:published_prepare}}(span interval, ahead interval)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' SET datestyle = 'ISO, YMD'
    SET lock_timeout = '20ms' AS $$
DECLARE
    parent constant regclass := '{{schema}}.{{p:published}}'::regclass;
    step constant bigint := greatest(ceil(extract(epoch FROM span)), 1)::bigint;
    horizon constant timestamptz := clock_timestamp() + ahead;
    namespace constant name := (SELECT n.nspname FROM pg_class AS c, pg_namespace AS n
                                WHERE c.oid = parent AND n.oid = c.relnamespace);
    base constant name := (SELECT c.relname FROM pg_class AS c WHERE c.oid = parent);
    starts timestamptz;
    made integer := 0;
    partition_name text;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('outbox-relay published partitions'),
                                     hashtext(parent::text)) THEN
        RETURN 0;
    END IF;
    starts := greatest(
        (SELECT max(p.ends) FROM {{schema}}.{{p:published_partitions}}() AS p),
        to_timestamp((floor(extract(epoch FROM clock_timestamp()) / step) - 1) * step),
        -- past any row the default partition caught, which a new partition may not cover
        (SELECT to_timestamp((floor(extract(epoch FROM max(d.published_at)) / step) + 1) * step)
         FROM {{schema}}.{{p:published_default}} AS d));
    WHILE starts < horizon LOOP
        partition_name := base || '_' || extract(epoch FROM starts)::bigint;
        BEGIN
            EXECUTE format('CREATE TABLE %I.%I (LIKE %s)', namespace, partition_name, parent);
            EXECUTE format('ALTER TABLE %s ATTACH PARTITION %I.%I FOR VALUES FROM (%L) TO (%L)',
                           parent, namespace, partition_name, starts,
                           starts + make_interval(secs => step));
        -- A lock not granted in time (a session holding the default partition, which the
        -- attach scans), or a row that reached the default partition for this range meanwhile:
        -- the next call starts again, past that row.
        EXCEPTION WHEN lock_not_available OR check_violation THEN
            EXIT;
        END;
        made := made + 1;
        starts := starts + make_interval(secs => step);
    END LOOP;
    RETURN made;
END;
$$;

-- The purge: drops every partition that ends before `retention` ago, oldest first, and deletes
-- the default partition's expired rows. Dropping a partition takes ACCESS EXCLUSIVE on the
-- parent for a moment; it is waited for at most lock_timeout (a relay moving rows in, a long
-- replay reading) and otherwise left for the next call. A `replay` moving rows out of a
-- partition holds it until it commits, so the row is either moved back first or dropped with
-- its partition, never both. Returns the partitions dropped, the rows deleted, and how many
-- seconds the oldest event left is past the retention and its partition's span (0: none is).
CREATE FUNCTION {{schema}}.{{p:published_expire}}(
    retention interval, OUT partitions integer, OUT deleted bigint, OUT overdue float8)
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp SET timezone = 'UTC' SET datestyle = 'ISO, YMD'
    SET lock_timeout = '20ms' AS $$
DECLARE
    cutoff constant timestamptz := clock_timestamp() - retention;
    expired record;
BEGIN
    partitions := 0;
    deleted := 0;
    FOR expired IN SELECT p.partition FROM {{schema}}.{{p:published_partitions}}() AS p
                   WHERE p.ends <= cutoff ORDER BY p.ends LOOP
        BEGIN
            EXECUTE format('DROP TABLE %s', expired.partition);
        EXCEPTION WHEN lock_not_available THEN
            EXIT;
        END;
        partitions := partitions + 1;
    END LOOP;
    BEGIN
        DELETE FROM {{schema}}.{{p:published_default}} AS d WHERE d.published_at < cutoff;
        GET DIAGNOSTICS deleted = ROW_COUNT;
    EXCEPTION WHEN lock_not_available THEN
        NULL;
    END;
    overdue := greatest(0, extract(epoch FROM cutoff - least(
        (SELECT min(p.ends) FROM {{schema}}.{{p:published_partitions}}() AS p),
        (SELECT min(d.published_at) FROM {{schema}}.{{p:published_default}} AS d))));
END;
$$;
