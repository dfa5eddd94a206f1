"""Claiming outbox rows, and recording what became of them: the relay's PostgreSQL side.

One batch is one transaction on the work connection: ``claim`` locks due rows of the shards this
relay owns (``FOR UPDATE SKIP LOCKED``, oldest first) and ``finish`` records every outcome and
commits. The row locks are held while the batch is published, so no other relay can send the
same rows meanwhile; if this relay dies, PostgreSQL aborts the transaction and the rows are
simply unpublished again.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import psycopg
from psycopg import sql as pg_sql
from psycopg.rows import RowMaker

from outbox.settings import SHARD_COUNT, OutboxSettings
from outbox_relay.config import RelaySettings
from outbox_relay.floor import FloorSample
from outbox_relay.pg import relay_connect
from outbox_relay.ports import ClaimedRow, Outcome, Ownership, Result
from outbox_relay.retention import Expiry, PurgeStep
from outbox_relay.shards import lock_class

# The claim: rows of the shards this relay holds (none once its ownership session is gone), and
# only a row with no earlier unpublished row of its key outside this batch or the one in flight,
# so each key's rows reach Kafka in id order. Why: the design page, "Shards".
_CLAIM = """
WITH owned AS (
    -- One flag per shard, element shard + 1, so the planner walks the claim index in id order and
    -- stops (a lookup per row, where "shard = ANY (owned shards)" would compare each row with
    -- every owned shard). No flags at all when the ownership session is gone: nothing qualifies.
    -- The try-lock, when it succeeds, is held until this transaction ends, and nobody waits on it.
    SELECT CASE WHEN pg_try_advisory_xact_lock_shared(%(member_class)s, %(member_id)s)
                THEN '{{}}'::bool[] ELSE %(owned)s::bool[] END AS mine
), any_failed AS (  -- usually not: then the probe below is skipped for every row
    SELECT EXISTS (SELECT 1 FROM {events}
                   WHERE published_at IS NULL AND next_attempt_at IS NOT NULL
                     AND key IS NOT NULL) AS failed
), in_flight AS (  -- the batch this relay is publishing right now, claimed before this one
    SELECT unnest(%(in_flight)s::bigint[]) AS id
), batch AS (
    SELECT e.id, e.event_id, e.topic, e.key, e.payload, e.header_names, e.header_values,
           e.attempts
    FROM {events} AS e
    WHERE e.published_at IS NULL AND e.dead_lettered_at IS NULL
      AND e.id >= %(floor)s  -- past the entries of rows published already (outbox_relay/floor.py)
      AND (e.next_attempt_at IS NULL OR e.next_attempt_at <= now())
      AND (SELECT mine FROM owned)[e.shard + 1]
      -- Locked by our other connection, so never ours to take: passed over with a hash probe
      -- instead of the failing lock attempt SKIP LOCKED would make for each of them.
      AND e.id NOT IN (SELECT id FROM in_flight)
      -- Rows stuck behind a failed row of their key (waiting for its retry, or a dead letter
      -- that blocks) are passed over here, before the limit: however many pile up, they cannot
      -- fill the batch and starve the other keys. A probe of the small index of failed rows.
      AND (e.key IS NULL OR NOT (SELECT failed FROM any_failed) OR NOT EXISTS (
            SELECT 1 FROM {events} AS w
            WHERE w.key = e.key AND w.id < e.id
              AND w.published_at IS NULL AND w.next_attempt_at IS NOT NULL
              AND ((w.dead_lettered_at IS NULL AND w.next_attempt_at > now())
                   OR (%(dead_letters_block)s AND w.dead_lettered_at IS NOT NULL))))
    ORDER BY e.id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), totals AS (  -- one pass over the batch for the three figures the checks below need
    SELECT sum(octet_length(payload)) AS bytes, max(id) AS last_id, count(*) AS size FROM batch
), cut AS (
    -- The byte budget: the oldest rows that fit it, at least one; the first row past it, if
    -- any. Usually the whole batch fits, and its rows are not summed one by one.
    SELECT CASE WHEN (SELECT bytes FROM totals) < %(max_bytes)s THEN NULL
           ELSE (SELECT min(id) FROM (
                     SELECT id, sum(octet_length(payload)) OVER (ORDER BY id)
                                - octet_length(payload) AS before
                     FROM batch) AS sized
                 WHERE before >= %(max_bytes)s) END AS id
), gapless AS (
    -- Whether the batch holds every unpublished row of our shards up to its last one (but those
    -- in flight): then no row of it can have an earlier row of its key outside, and the
    -- per-row check below is skipped. Any row passed over (locked elsewhere, waiting for a
    -- retry, gone by the time it was locked) makes the counts differ. Same snapshot throughout.
    -- Rows below the floor are not counted: the only ones there are rows an operator put back
    -- (replay, dead-letters retry) since the floor's last sample, and those carry a
    -- next_attempt_at, so they are in the small index of failed rows: one probe of it sees them.
    SELECT (SELECT count(*) FROM {events} AS g
            WHERE g.published_at IS NULL AND g.dead_lettered_at IS NULL
              AND (SELECT mine FROM owned)[g.shard + 1]
              AND g.id >= %(floor)s AND g.id <= (SELECT last_id FROM totals)
              AND g.id NOT IN (SELECT id FROM in_flight))
           = (SELECT size FROM totals)
           AND NOT ((SELECT failed FROM any_failed) AND EXISTS (
                SELECT 1 FROM {events} AS p
                WHERE p.id < %(floor)s AND p.key IS NOT NULL
                  AND p.published_at IS NULL AND p.next_attempt_at IS NOT NULL
                  AND p.dead_lettered_at IS NULL)) AS yes
)
SELECT s.id, s.event_id::text, s.topic, s.key, s.payload, s.header_names, s.header_values,
       s.attempts  -- ClaimedRow's fields, in order
FROM batch AS s
WHERE (s.id < (SELECT id FROM cut) OR (SELECT id FROM cut) IS NULL)
  AND (s.key IS NULL
       -- dead letters that block their key are not in the counted index: always check then
       OR (NOT %(dead_letters_block)s AND (SELECT yes FROM gapless))
       OR NOT EXISTS (
            SELECT 1 FROM {events} AS b
            WHERE b.key = s.key AND b.id < s.id AND b.published_at IS NULL
              AND (%(dead_letters_block)s OR b.dead_lettered_at IS NULL)
              AND b.id NOT IN (SELECT id FROM batch UNION ALL SELECT id FROM in_flight)))
"""  # in the batch's order, which is id order; ``claim`` makes sure of it without a sort here
# The scan floor's sample (outbox_relay/floor.py), in its own transaction and in this order: the
# sequence; then the transactions in this database that run a statement without a transaction id
# (one may hold row ids it has not inserted yet), and whether any the previous sample found still
# runs; then, in a later statement, a transaction id and the snapshot's view. pg_locks and the
# two pg_stat_activity columns read here are visible to every role.
_SEQUENCE_BOUND = "SELECT {last_id}()"  # migration 0005
# Each function is read once (MATERIALIZED): joined directly, PostgreSQL read every lock of the
# server again for each session of the database, 44 ms a sample with 50 sessions and 12,800
# locks (50 outboxes on one server) against 6 ms now.
_FLOOR_SUSPECTS = """
WITH l AS MATERIALIZED (
    SELECT pid, virtualxid FROM pg_locks
    WHERE locktype = 'virtualxid' AND granted AND pid <> pg_backend_pid()
), a AS MATERIALIZED (
    SELECT pid, backend_xid, backend_xmin FROM pg_stat_get_activity(NULL)
    WHERE datid = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND usesysid IS NOT NULL  -- client sessions: autovacuum and the like write no outbox rows
)
SELECT coalesce(array_agg(l.virtualxid)
                  FILTER (WHERE a.backend_xid IS NULL AND a.backend_xmin IS NOT NULL), '{}'),
       coalesce(bool_or(l.virtualxid = ANY (%s::text[])), false)
FROM l, a
WHERE a.pid = l.pid
"""
_FLOOR_VIEW = """
SELECT pg_current_xact_id()::text::bigint,
       pg_snapshot_xmin(pg_current_snapshot())::text::bigint,
       (SELECT min(id) FROM {events} WHERE published_at IS NULL AND dead_lettered_at IS NULL),
       (SELECT id FROM {events}
        WHERE published_at IS NULL AND dead_lettered_at IS NULL AND next_attempt_at IS NULL
        ORDER BY id LIMIT 1)
"""
# The ids arrive as one array literal (see ``id_array``).
_DELETE_PUBLISHED = "DELETE FROM {events} WHERE id = ANY(%s::bigint[])"
# With --retention, the rows move to the table of published events (migration 0008) in the same
# statement: a delete and an append, where an UPDATE of published_at would write a new version of
# the row into the heap and every index. statement_timestamp(), not now(): the batch's
# transaction began when it was claimed, before the publish, however long that took.
_MOVE_PUBLISHED = """
WITH moved AS (
    DELETE FROM {events} WHERE id = ANY(%s::bigint[])
    RETURNING id, event_id, topic, key, payload, header_names, header_values, created_at, attempts
)
INSERT INTO {published} (id, event_id, topic, key, payload, header_names, header_values,
                         created_at, attempts, published_at)
SELECT id, event_id, topic, key, payload, header_names, header_values, created_at, attempts,
       statement_timestamp()
FROM moved
"""
# The partitions of published events: made ahead of need, dropped whole past the retention.
_PREPARE_PARTITIONS = (
    "SELECT {prepare}(make_interval(secs => %(span)s), make_interval(secs => %(ahead)s))"
)
_EXPIRE_PARTITIONS = "SELECT partitions, deleted, overdue FROM {expire}(make_interval(secs => %s))"
# A dead letter keeps no backoff: one cleared by hand (not through `dead-letters retry`) is due
# at once, with the later rows of its key.
_RECORD_FAILURES = """
UPDATE {events} AS e
SET attempts = e.attempts + 1,
    last_error = f.error,
    next_attempt_at = clock_timestamp()
                      + CASE WHEN f.dead THEN interval '0' ELSE make_interval(secs => f.delay) END,
    dead_lettered_at = CASE WHEN f.dead THEN clock_timestamp() END
FROM unnest(%s::bigint[], %s::text[], %s::float8[], %s::bool[]) AS f(id, error, delay, dead)
WHERE e.id = f.id
"""
# One step of the purge of rows marked published in place by versions before migration 0008
# (.retention): the next rows from the cursor, in id order; of those,
# delete the ones published before the cutoff; report the lowest one published after it. The
# DELETE's own condition tests published_at, so READ COMMITTED re-checks it on a row updated
# after the statement's snapshot (a replay) before deleting it; a condition only in a subquery
# would not be re-checked.
_PURGE_CHUNK = """
WITH chunk AS (
    SELECT id, published_at FROM {events} WHERE id >= %(from_id)s ORDER BY id LIMIT %(rows)s
), edge AS (
    SELECT count(*) AS rows, max(id) AS last_id FROM chunk
), gone AS (
    DELETE FROM {events}
    WHERE {expired}
    RETURNING 1
)
SELECT (SELECT rows FROM edge), (SELECT last_id FROM edge), (SELECT count(*) FROM gone),
       (SELECT min(id) FROM chunk
        WHERE published_at >= now() - make_interval(secs => %(retention)s))
"""
_EXPIRED = """id >= %(from_id)s AND id <= (SELECT last_id FROM edge)
      AND published_at < now() - make_interval(secs => %(retention)s)"""
# The purge never waits for a row lock (an operator's open transaction, an audit job reading FOR
# SHARE, an insert into a table whose foreign key references outbox rows): the step above runs
# with a lock_timeout of 1 ms, and when it meets a lock, the step runs again locking the rows it
# deletes with SKIP LOCKED (about half as fast, so only then): a row someone holds is left for a
# later pass. The condition on published_at is on the locking SELECT too, and READ COMMITTED
# re-checks it there on the newest version of the row, so a row put back meanwhile is neither
# locked nor deleted.
_PURGE_NO_WAIT = "SET LOCAL lock_timeout = '1ms'"
_EXPIRED_UNLOCKED = """id IN (
        SELECT id FROM {events}
        WHERE id >= %(from_id)s AND id <= (SELECT last_id FROM edge)
          AND published_at < now() - make_interval(secs => %(retention)s)
        FOR UPDATE SKIP LOCKED)
      AND published_at < now() - make_interval(secs => %(retention)s)"""
_DELIVERABLE = """
SELECT EXISTS (
    SELECT 1 FROM {events} AS e
    WHERE e.published_at IS NULL AND e.dead_lettered_at IS NULL
      AND NOT (%(dead_letters_block)s AND e.key IS NOT NULL AND EXISTS (
            SELECT 1 FROM {events} AS d
            WHERE d.key = e.key AND d.id < e.id
              AND d.published_at IS NULL AND d.dead_lettered_at IS NOT NULL)))
"""

# What publishing needs of the relay's role, checked at start: locking rows to claim them takes
# UPDATE, and a published row is deleted, or with --retention moved (DELETE, then INSERT into
# the table of published events). Without them a relay would send each batch and fail to record
# it, sending it again and again.
_PRIVILEGES = """
SELECT p.table_name, p.privilege
FROM (VALUES (%(events)s, 'SELECT'), (%(events)s, 'UPDATE'), (%(events)s, 'DELETE'),
             (%(published)s, CASE WHEN %(retention)s THEN 'INSERT' END)) AS p(table_name, privilege)
WHERE p.privilege IS NOT NULL AND NOT has_table_privilege(p.table_name, p.privilege)
"""

# For the backlog gauges (only with --metrics-port, every few seconds): one pass over the
# partial index of unpublished rows.
_BACKLOG = """
SELECT count(*), coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8
FROM {events} WHERE published_at IS NULL AND dead_lettered_at IS NULL
"""

# Delayed events (migration 0009): the release moves due rows into the outbox. One relay at a
# time: a release that finds another under way (its try-lock taken) moves nothing, so that two
# releases never interleave their inserts and the events of one key keep their due order
# across batches. LATERAL: the lock is tried before the function runs. The time until the next
# due event is measured on the database's clock, like the due times.
_RELEASE_DUE = """
SELECT t.mine, r.released, extract(epoch FROM r.next_due - clock_timestamp())::float8
FROM (SELECT pg_try_advisory_xact_lock(%(turn)s, 0) AS mine) AS t,
     LATERAL {release_due}(CASE WHEN t.mine THEN %(batch)s ELSE 0 END) AS r
"""
# For the schedule's gauges, at the backlog's pace: rows waiting, the next due time (unix).
_SCHEDULED_SUMMARY = """
SELECT s.waiting, extract(epoch FROM s.next_due)::float8 FROM {scheduled_summary}() AS s
"""


_by_id = operator.itemgetter(0)


def _claimed_row(_cursor: psycopg.Cursor[Any]) -> RowMaker[ClaimedRow]:
    """Claimed rows as they come, columns in ``ClaimedRow``'s field order: the record is built
    in C, without a Python call per row."""
    return cast("RowMaker[ClaimedRow]", functools.partial(tuple.__new__, ClaimedRow))


def _sql(template: str, settings: OutboxSettings) -> str:
    """``template`` with ``{events}`` naming the outbox table; literal braces are doubled."""
    return settings.sql(template, events="events")


def _purge_sql(expired: str, settings: OutboxSettings) -> str:
    """The purge's step deleting the rows ``expired`` names (a condition on ``{events}``)."""
    condition = pg_sql.SQL(settings.sql(expired, events="events"))
    return settings.sql(_PURGE_CHUNK, events="events", expired=condition)


@dataclass(frozen=True, slots=True)
class Release:
    """What one release of due events did: rows moved into the outbox, and seconds until the
    next scheduled row falls due by the database's clock (None: none is scheduled, or another
    relay was releasing; at most 0: one is due already)."""

    released: int
    next_due_in: float | None
    #: Whether it was this relay's turn (False: another relay was releasing, nothing moved).
    mine: bool = True


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed row as it will be recorded: error text, retry delay, dead-lettered or not."""

    row_id: int
    error: str
    delay: float
    dead: bool


def id_array(ids: Sequence[int]) -> str:
    """A bigint[] literal: psycopg adapts a list of ints element by element in Python, which
    costs a relay at full speed more than the statement that uses it."""
    return "{" + ",".join(map(str, ids)) + "}"


@functools.lru_cache(maxsize=4)
def shard_flags(shards: frozenset[int]) -> str:
    """A bool[] literal with one flag per shard, element shard + 1 (PostgreSQL counts from 1):
    built once per ownership change, not per claim."""
    return "{" + ",".join("t" if shard in shards else "f" for shard in range(SHARD_COUNT)) + "}"


def plan_failures(
    rows: Sequence[ClaimedRow],
    outcomes: Sequence[Outcome],
    *,
    max_attempts: int,
    delay_for: Callable[[int], float],
) -> list[Failure]:
    """Which rows count a failed attempt, when each is retried, and which are dead-lettered."""
    by_id = {row.id: row for row in rows}
    failures = []
    for outcome in outcomes:
        if outcome.result not in (Result.RETRY, Result.PERMANENT):
            continue
        attempts = by_id[outcome.row_id].attempts + 1
        dead = outcome.result is Result.PERMANENT or attempts >= max_attempts
        failures.append(Failure(outcome.row_id, outcome.error, delay_for(attempts - 1), dead))
    return failures


class OutboxSource:
    """The work connection: claims batches and records their outcomes."""

    def __init__(self, settings: RelaySettings) -> None:
        self._settings = settings
        events = settings.outbox
        self._claim_sql = _sql(_CLAIM, events)
        self._published_sql = (
            _sql(_DELETE_PUBLISHED, events)
            if settings.retention == 0
            else events.sql(_MOVE_PUBLISHED, events="events", published="published")
        )
        self._prepare_sql = events.sql(_PREPARE_PARTITIONS, prepare="published_prepare")
        self._expire_sql = events.sql(_EXPIRE_PARTITIONS, expire="published_expire")
        self._failures_sql = _sql(_RECORD_FAILURES, events)
        self._purge_sql = _purge_sql(_EXPIRED, events)
        self._purge_skipping_sql = _purge_sql(_EXPIRED_UNLOCKED, events)
        self._deliverable_sql = _sql(_DELIVERABLE, events)
        self._backlog_sql = _sql(_BACKLOG, events)
        self._floor_view_sql = _sql(_FLOOR_VIEW, events)
        self._bound_sql = events.sql(_SEQUENCE_BOUND, last_id="last_id")
        self._release_sql = events.sql(_RELEASE_DUE, release_due="release_due")
        self._release_class = lock_class(events, "release")
        self._scheduled_sql = events.sql(_SCHEDULED_SUMMARY, scheduled_summary="scheduled_summary")
        self._conn: psycopg.Connection[Any] | None = None

    @property
    def connection(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            raise RuntimeError("OutboxSource is not connected")
        return self._conn

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    def connect(self) -> psycopg.Connection[Any]:
        self._conn = relay_connect(self._settings, role="work", autocommit=False)
        return self._conn

    def claim(
        self, limit: int, *, ownership: Ownership, in_flight: Sequence[int] = (), floor: int = 0
    ) -> list[ClaimedRow]:
        """Lock and return up to ``limit`` due rows of the owned shards; the transaction stays
        open. Nothing once the ownership session is gone.

        ``in_flight``: ids of the batch being published on another connection meanwhile; its
        rows do not hold back later rows of their keys. ``floor``: an id no claimable row is
        below (``ScanFloor.value``); 0 looks at every row.
        """
        params = {
            "floor": floor,
            "in_flight": id_array(in_flight),
            "owned": shard_flags(ownership.shards),
            "member_class": ownership.member_class,
            "member_id": ownership.member_id,
            "limit": limit,
            "dead_letters_block": self._settings.dead_letter_blocks_key,
            "max_bytes": self._settings.batch_max_bytes,
        }
        # Binary results: payloads arrive as they are stored, not hex-encoded and decoded.
        cursor = self.connection.cursor(row_factory=_claimed_row, binary=True)
        rows = cursor.execute(self._claim_sql, params).fetchall()
        rows.sort(key=_by_id)  # sent in id order: a pass over rows that are in order already
        return rows

    def finish(self, delivered: Sequence[int], failures: Sequence[Failure]) -> None:
        """Mark exactly the delivered rows published, record the failures, and commit."""
        conn = self.connection
        if delivered:
            conn.execute(self._published_sql, (id_array(delivered),))
        if failures:
            conn.execute(
                self._failures_sql,
                (
                    [f.row_id for f in failures],
                    [f.error for f in failures],
                    [f.delay for f in failures],
                    [f.dead for f in failures],
                ),
            )
        conn.commit()

    def sample_floor(self, suspects_before: Sequence[str] = ()) -> FloorSample:
        """One sample for the scan floor (see ``outbox_relay.floor``), in a transaction of its own;
        ``suspects_before``: the previous sample's ``suspects``."""
        conn = self.connection
        try:
            bound = conn.execute(self._bound_sql).fetchone()
            suspects = conn.execute(_FLOOR_SUSPECTS, (list(suspects_before),)).fetchone()
            view = conn.execute(self._floor_view_sql).fetchone()
        finally:
            conn.rollback()  # nothing was written: the transaction id alone is what counts
        if bound is None or suspects is None or view is None:  # pragma: no cover - always a row
            raise RuntimeError("the scan floor's sample returned no row")
        return FloorSample(
            bound=int(bound[0] or 0),
            xid=int(view[0]),
            oldest_running=int(view[1]),
            lowest=view[2],
            suspects=tuple(suspects[0]),
            suspects_before_running=bool(suspects[1]),
            lowest_new=view[3],
        )

    def missing_privileges(self) -> list[str]:
        """What the relay's role may not do that publishing needs, as ``PRIVILEGE on table``."""
        events = self._settings.outbox
        rows = self.connection.execute(
            _PRIVILEGES,
            {
                "events": events.events_table,
                "published": events.qualified("published"),
                "retention": self._settings.retention > 0,
            },
        ).fetchall()
        self.connection.rollback()
        return [f"{privilege} on {table}" for table, privilege in rows]

    def release(self) -> None:
        """End the claim transaction without changes (nothing was claimed, or we give up)."""
        if self._conn is not None and not self._conn.closed:
            self._conn.rollback()

    def deliverable(self) -> bool:
        """Whether any row is still waiting to be published (in any shard)."""
        row = self.connection.execute(
            self._deliverable_sql, {"dead_letters_block": self._settings.dead_letter_blocks_key}
        ).fetchone()
        self.connection.rollback()
        return bool(row and row[0])

    def backlog(self) -> tuple[int, float]:
        """Unpublished, not dead-lettered rows (all shards) and the oldest one's age in seconds."""
        row = self.connection.execute(self._backlog_sql).fetchone()
        self.connection.rollback()
        return (int(row[0]), float(row[1])) if row else (0, 0.0)

    def release_due(self, batch: int) -> Release:
        """Move up to ``batch`` due scheduled events into the outbox and commit; nothing when
        another relay is releasing right now."""
        conn = self.connection
        params = {"turn": self._release_class, "batch": batch}
        row = conn.execute(self._release_sql, params).fetchone()
        conn.commit()
        if row is None:  # pragma: no cover - always a row
            raise RuntimeError("release_due returned no row")
        mine, released, next_due_in = row
        return Release(int(released), next_due_in if mine else None, mine=bool(mine))

    def scheduled(self) -> tuple[int, float | None]:
        """Scheduled events waiting, and the next one's due time in unix seconds (None: none)."""
        row = self.connection.execute(self._scheduled_sql).fetchone()
        self.connection.rollback()
        return (int(row[0]), row[1]) if row else (0, None)

    def purge_chunk(self, from_id: int, rows: int, retention: float) -> PurgeStep:
        """One step of the purge (``outbox_relay.retention``), in a transaction of its own."""
        params = {"from_id": from_id, "rows": rows, "retention": retention}
        conn = self.connection
        try:
            conn.execute(_PURGE_NO_WAIT)
            row = conn.execute(self._purge_sql, params).fetchone()
        except psycopg.errors.LockNotAvailable:
            conn.rollback()
            row = conn.execute(self._purge_skipping_sql, params).fetchone()
        conn.commit()
        if row is None:  # pragma: no cover - always a row
            raise RuntimeError("the purge returned no row")
        return PurgeStep(int(row[0]), row[1], int(row[2]), row[3])

    def prepare_partitions(self, span: float, ahead: float) -> int:
        """Make the partitions of published events up to ``ahead`` seconds from now, each
        ``span`` seconds long, and commit; how many were made (0 while another relay does it)."""
        conn = self.connection
        row = conn.execute(self._prepare_sql, {"span": span, "ahead": ahead}).fetchone()
        conn.commit()
        return int(row[0]) if row else 0

    def expire_partitions(self, retention: float) -> Expiry:
        """Drop the partitions of published events past ``retention`` seconds, delete the
        expired rows of the default partition, and commit."""
        conn = self.connection
        row = conn.execute(self._expire_sql, (retention,)).fetchone()
        conn.commit()
        if row is None:  # pragma: no cover - always a row
            raise RuntimeError("the partitions' expiry returned no row")
        return Expiry(int(row[0]), int(row[1]), float(row[2]))

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
