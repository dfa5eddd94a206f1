-- What operators did to dead-lettered events (`outbox-relay dead-letters retry|discard`): who,
-- when, why, and the event as it was. Kept for the record; nothing reads it but people.
CREATE TABLE {{schema}}.{{p:dead_letter_log}} (
    id          bigint GENERATED ALWAYS AS IDENTITY,
    row_id      bigint NOT NULL,
    event_id    uuid NOT NULL,
    topic       text NOT NULL,
    key         bytea,
    attempts    integer NOT NULL,
    last_error  text,
    action      text NOT NULL,
    reason      text,
    actor       text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT {{p:dl_log_pkey}} PRIMARY KEY (id),
    CONSTRAINT {{p:dl_log_action_check}} CHECK (action IN ('retry', 'discard')),
    CONSTRAINT {{p:dl_log_reason_check}} CHECK (action <> 'discard' OR coalesce(reason, '') <> '')
);
