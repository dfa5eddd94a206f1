"""What the scan floor's sample costs with many sessions: it reads PostgreSQL's lock table once.

Joined directly with the sessions, PostgreSQL read every lock of the server again for each
session of the database (44 ms a sample with 50 sessions and 12,800 advisory locks, as 50
outboxes on one server hold). The statement reads it once whatever the number of sessions.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from outbox_relay.claims import _FLOOR_SUSPECTS

SESSIONS = 6

#: The statement as it was (before it read each function once), for the check's own check.
JOINED = """
SELECT coalesce(array_agg(l.virtualxid), '{}')
FROM pg_locks AS l
JOIN pg_stat_get_activity(NULL) AS a ON a.pid = l.pid
WHERE l.locktype = 'virtualxid' AND l.granted AND l.pid <> pg_backend_pid()
  AND a.datid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND a.usesysid IS NOT NULL
"""


@pytest.fixture
def busy(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection to a database with several other sessions, each holding a lock."""
    with contextlib.ExitStack() as stack:
        for n in range(SESSIONS):
            other = stack.enter_context(psycopg.connect(database_url, autocommit=True))
            other.execute("SELECT pg_advisory_lock(4242, %s)", (n,))
        yield stack.enter_context(psycopg.connect(database_url, autocommit=True))


def lock_table_reads(conn: psycopg.Connection[Any], statement: str) -> int:
    """How many times one run of ``statement`` read ``pg_lock_status`` (EXPLAIN ANALYZE)."""
    row = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {statement}").fetchone()
    assert row is not None
    plan = row[0] if isinstance(row[0], list) else json.loads(row[0])

    def reads(node: dict[str, Any]) -> int:
        own = int(node["Actual Loops"]) if node.get("Function Name") == "pg_lock_status" else 0
        return own + sum(reads(child) for child in node.get("Plans", []))

    return reads(plan[0]["Plan"])


def test_the_floor_sample_reads_the_lock_table_once_whatever_the_sessions(
    busy: psycopg.Connection[Any],
) -> None:
    assert lock_table_reads(busy, _FLOOR_SUSPECTS.replace("%s", "'{}'")) == 1


def test_the_check_sees_a_statement_that_reads_it_per_session(
    busy: psycopg.Connection[Any],
) -> None:
    """The count is not vacuous: the statement as it was read it once per session."""
    assert lock_table_reads(busy, JOINED) >= SESSIONS
