"""Retrying a dead letter: `outbox-relay dead-letters retry` makes it due at once.

A row the relay dead-letters after many attempts keeps the backoff of its last one in
``next_attempt_at`` (up to ``--backoff-cap``). Clearing ``dead_lettered_at`` by hand, as the
guarantees page used to advise, leaves that backoff: the row, and with ``--on-dead-letter
block`` the later rows of its key, waited for it (250 s in the issue). The command resets it.
"""

from __future__ import annotations

import subprocess
import sys
import time

import psycopg

from tests.acceptance.relay_harness import (
    create_topic,
    read_topic,
    start_relay,
    stop,
    unpublished,
    wait_until,
    write_events,
)

#: The backoff the dead letter was left with, and how soon its retry must go out: far apart.
BACKOFF_LEFT = "250 seconds"
PROMPTLY = 15.0
RETRY = [sys.executable, "-m", "outbox_relay", "dead-letters", "retry"]


def dead_letter_with_backoff(database_url: str, row_id: int) -> None:
    """As the relay leaves a row that failed its last attempt: dead, its next attempt far off."""
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "UPDATE outbox_events SET attempts = 10, last_error = 'UNKNOWN_TOPIC_OR_PART',"
            " dead_lettered_at = now(), next_attempt_at = now() + %s::interval WHERE id = %s",
            (BACKOFF_LEFT, row_id),
        )


def rows(database_url: str) -> list[tuple[int, bool]]:
    """(id, published) of every row, in id order: a relay with --retention moves the rows it
    publishes to the table of published events."""
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT id, false FROM outbox_events UNION ALL SELECT id, true FROM outbox_published"
            " ORDER BY id"
        ).fetchall()


def test_a_retried_dead_letter_and_the_rows_it_blocked_go_out_at_once(
    database_url: str, kafka_bootstrap: str
) -> None:
    """A dead letter with 250 s of backoff left blocks the two later rows of its key
    (``--on-dead-letter block``); ``dead-letters retry`` makes it due at once: the running relay
    publishes the three within seconds, in order."""
    topic = create_topic(kafka_bootstrap)
    event_ids = write_events(database_url, topic, 3, keys=1)
    first = rows(database_url)[0][0]
    dead_letter_with_backoff(database_url, first)
    # Published rows are kept (--retention), so that the retried row can be looked at after.
    relay = start_relay(
        database_url, kafka_bootstrap, "--on-dead-letter", "block", "--retention", "3600"
    )
    try:
        time.sleep(2)  # the relay has started and holds the key back
        assert unpublished(database_url) == 2
        started = time.monotonic()
        retried = subprocess.run(
            [*RETRY, "--database-url", database_url, "--id", str(first), "--reason", "topic made"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert retried.returncode == 0, retried.stderr
        wait_until(lambda: all(published for _, published in rows(database_url)), PROMPTLY)
        print(f"published {time.monotonic() - started:.2f} s after the command started")
    finally:
        stop(relay)
    assert rows(database_url)[0] == (first, True)  # due at once, not in 250 s
    received = read_topic(kafka_bootstrap, topic, expect_ids=set(event_ids))
    assert [m.event_id for m in received] == event_ids
