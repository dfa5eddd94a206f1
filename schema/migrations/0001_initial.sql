-- The outbox table: one row per event, written in the application's own transaction.
CREATE TABLE {{schema}}.{{p:events}} (
    id              bigint GENERATED ALWAYS AS IDENTITY,
    event_id        uuid NOT NULL,
    topic           text NOT NULL,
    key             bytea,
    payload         bytea NOT NULL,
    header_names    text[] NOT NULL DEFAULT '{}',
    header_values   bytea[] NOT NULL DEFAULT '{}',
    -- Rows with one key always share a shard, so a relay owning the shard sees all of them in
    -- order; rows without a key are spread over the shards by id. 256 = outbox.SHARD_COUNT.
    shard           smallint NOT NULL GENERATED ALWAYS AS (
                        CASE WHEN key IS NULL THEN (id % 256)::smallint
                             ELSE get_byte(sha256(key), 0)::smallint END
                    ) STORED,
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    next_attempt_at timestamptz,
    published_at    timestamptz,
    -- Set when the relay gives up on the row: kept, visible, never silently dropped.
    dead_lettered_at timestamptz,
    CONSTRAINT {{p:events_pkey}} PRIMARY KEY (id),
    CONSTRAINT {{p:events_event_id_key}} UNIQUE (event_id),
    CONSTRAINT {{p:events_topic_check}}
        CHECK (topic ~ '^[a-zA-Z0-9._-]{1,249}$' AND topic NOT IN ('.', '..')),
    CONSTRAINT {{p:events_headers_check}}
        CHECK (cardinality(header_names) = cardinality(header_values)),
    CONSTRAINT {{p:events_attempts_check}} CHECK (attempts >= 0)
);

-- Serves the relay's claim, "unpublished rows of these shards, oldest first": scanned in id
-- order with the shard filtered from the index; published and dead-lettered rows drop out.
CREATE INDEX {{p:events_unpublished_idx}}
    ON {{schema}}.{{p:events}} (id) INCLUDE (shard)
    WHERE published_at IS NULL AND dead_lettered_at IS NULL;

-- Serves the per-key order check: "is an earlier row of this key still unpublished?"
CREATE INDEX {{p:events_key_idx}}
    ON {{schema}}.{{p:events}} (key, id)
    WHERE published_at IS NULL AND key IS NOT NULL;

-- Wakes idle relays when events commit: one notification per INSERT statement (PostgreSQL
-- folds identical notifications of one transaction into one), none per row.
CREATE FUNCTION {{schema}}.{{p:notify_events}}() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify({{channel}}, '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER {{p:events_notify}}
    AFTER INSERT ON {{schema}}.{{p:events}}
    FOR EACH STATEMENT EXECUTE FUNCTION {{schema}}.{{p:notify_events}}();

-- Consumers record each message id here in the same transaction as their side effects.
CREATE TABLE {{schema}}.{{p:dedup}} (
    consumer        text NOT NULL,
    message_id      text NOT NULL,
    processed_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT {{p:dedup_pkey}} PRIMARY KEY (consumer, message_id)
);

-- Serves the retention purge: "records older than the period", oldest first.
CREATE INDEX {{p:dedup_processed_at_idx}} ON {{schema}}.{{p:dedup}} (processed_at);
