-- What each relay does with the rows it publishes: keeps them this long (`--retention`), or
-- deletes them (zero). `outbox-relay status` reads it, so it reports what the running relays
-- do rather than its own flag. NULL: a relay of an earlier version, which does not say.
ALTER TABLE {{schema}}.{{p:relays}} ADD COLUMN retention interval;
