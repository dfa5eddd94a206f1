-- The relays of this outbox, running or gone without leaving cleanly. A relay whose database
-- sessions died may still be alive, with a batch in its Kafka producer's queue: librdkafka can
-- deliver it until the relay's delivery timeout runs out. A relay that takes over shards after
-- such a departure does not claim them before `gone_at + linger`, so a late copy of an earlier
-- event can never land after a later event of its key (the relay's handover module). A relay
-- that stops cleanly empties its producer and deletes its row; rows of relays gone for a while
-- are deleted by the others.
CREATE TABLE {{schema}}.{{p:relays}} (
    member     bigint NOT NULL,
    relay_id   text NOT NULL,
    -- One per process: a relay that reconnects (its producer emptied first) keeps it.
    process    text NOT NULL,
    joined_at  timestamptz NOT NULL DEFAULT now(),
    -- How long after the relay's sessions end its messages may still reach Kafka.
    linger     interval NOT NULL,
    -- When another relay first saw its membership lock gone.
    gone_at    timestamptz,
    CONSTRAINT {{p:relays_pkey}} PRIMARY KEY (member)
);
