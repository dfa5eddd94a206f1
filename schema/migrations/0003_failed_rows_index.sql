-- Serves the claim's "is an earlier row of this key waiting for a retry (or a blocking dead
-- letter)?": only rows that failed at least once and are unpublished, so it stays small and a
-- probe of it is cheap for every row the claim looks at.
CREATE INDEX {{p:events_failed_idx}}
    ON {{schema}}.{{p:events}} (key, id)
    WHERE published_at IS NULL AND next_attempt_at IS NOT NULL AND key IS NOT NULL;
