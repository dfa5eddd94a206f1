"""Dead letters and replays, for operators: list, retry, discard, and republish a range.

Every retry and discard is recorded in the dead-letter log (who, when, why, and the event as it
was) in the same transaction as the change itself.
"""

from __future__ import annotations

import datetime as dt
import getpass
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql as pg_sql

from outbox.settings import OutboxSettings

#: What a row put back in the queue (retried, replayed) gets as ``next_attempt_at``: due at
#: once, and marked. Such a row is usually below the relays' scan floor (``.floor``) until
#: their next sample; a non-NULL ``next_attempt_at`` puts it in the small index of failed rows,
#: where the claim looks for rows below the floor that later rows of their key must wait for.
PUT_BACK = "now()"


def default_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters (or, for replay, which published rows) an action applies to."""

    ids: Sequence[int] = ()
    topic: str | None = None
    key: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    from_id: int | None = None
    to_id: int | None = None

    def where(self, time_column: str, id_column: str = "id") -> tuple[str, dict[str, Any]]:
        """SQL conditions (joined with AND) on the rows aliased ``e``, and their parameters;
        never interpolates values."""
        parts: list[str] = []
        params: dict[str, Any] = {}
        if self.ids:
            parts.append(f"e.{id_column} = ANY(%(ids)s)")
            params["ids"] = list(self.ids)
        if self.topic is not None:
            parts.append("e.topic = %(topic)s")
            params["topic"] = self.topic
        if self.key is not None:
            parts.append("e.key = %(key)s")
            params["key"] = self.key.encode()
        if self.since is not None:
            parts.append(f"e.{time_column} >= %(since)s")
            params["since"] = self.since
        if self.until is not None:
            parts.append(f"e.{time_column} < %(until)s")
            params["until"] = self.until
        if self.from_id is not None:
            parts.append(f"e.{id_column} >= %(from_id)s")
            params["from_id"] = self.from_id
        if self.to_id is not None:
            parts.append(f"e.{id_column} <= %(to_id)s")
            params["to_id"] = self.to_id
        return " AND ".join(parts) or "TRUE", params


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    event_id: str
    topic: str
    key: str | None
    attempts: int
    last_error: str | None
    created_at: dt.datetime
    dead_lettered_at: dt.datetime


def _key(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", errors="replace")


def list_dead_letters(
    conn: psycopg.Connection[Any], settings: OutboxSettings, selection: Selection, limit: int
) -> list[DeadLetter]:
    where, params = selection.where("dead_lettered_at")
    rows = conn.execute(
        settings.sql(
            "SELECT e.id, e.event_id::text, e.topic, e.key, e.attempts, e.last_error,"
            " e.created_at, e.dead_lettered_at FROM {events} AS e"
            " WHERE e.dead_lettered_at IS NOT NULL AND e.published_at IS NULL AND {where}"
            " ORDER BY e.id LIMIT %(limit)s",
            events="events",
            where=pg_sql.SQL(where),
        ),
        {**params, "limit": limit},
    ).fetchall()
    conn.rollback()
    return [DeadLetter(r[0], r[1], r[2], _key(r[3]), r[4], r[5], r[6], r[7]) for r in rows]


def history(
    conn: psycopg.Connection[Any],
    settings: OutboxSettings,
    limit: int,
    selection: Selection = Selection(),
) -> list[dict[str, Any]]:
    """The log of retries and discards, newest first: of the rows ``selection`` names (its
    times are when the action was logged)."""
    where, params = selection.where("at", id_column="row_id")
    rows = conn.execute(
        settings.sql(
            "SELECT at, action, actor, reason, row_id, event_id::text, topic, key, attempts,"
            " last_error FROM {log} AS e WHERE {where} ORDER BY id DESC LIMIT %(limit)s",
            log="dead_letter_log",
            where=pg_sql.SQL(where),
        ),
        {**params, "limit": limit},
    ).fetchall()
    conn.rollback()
    names = (
        "at",
        "action",
        "actor",
        "reason",
        "row_id",
        "event_id",
        "topic",
        "key",
        "attempts",
        "last_error",
    )
    return [dict(zip(names, (*r[:7], _key(r[7]), *r[8:]), strict=True)) for r in rows]


_ACT = """
WITH target AS (
    SELECT e.id, e.event_id, e.topic, e.key, e.attempts, e.last_error
    FROM {events} AS e
    WHERE e.dead_lettered_at IS NOT NULL AND e.published_at IS NULL AND {where}
    FOR UPDATE
), changed AS (
    {change} RETURNING e.id
)
INSERT INTO {log} (row_id, event_id, topic, key, attempts, last_error, action, reason, actor)
SELECT t.id, t.event_id, t.topic, t.key, t.attempts, t.last_error,
       %(action)s, %(reason)s, %(actor)s
FROM target AS t JOIN changed AS c ON c.id = t.id
RETURNING row_id
"""


def _act(
    conn: psycopg.Connection[Any],
    settings: OutboxSettings,
    selection: Selection,
    *,
    action: str,
    change: str,
    reason: str | None,
    actor: str,
) -> list[int]:
    """Apply ``change`` to the selected dead letters and log each one, in one transaction."""
    where, params = selection.where("dead_lettered_at")
    sql = settings.sql(
        _ACT,
        events="events",
        log="dead_letter_log",
        where=pg_sql.SQL(where),
        change=pg_sql.SQL(change),
    )
    with conn.transaction():
        rows = conn.execute(
            sql, {**params, "action": action, "reason": reason, "actor": actor}
        ).fetchall()
    return sorted(int(r[0]) for r in rows)


def retry(
    conn: psycopg.Connection[Any],
    settings: OutboxSettings,
    selection: Selection,
    *,
    actor: str,
    reason: str | None = None,
) -> list[int]:
    """Put dead letters back in the queue with their attempts reset; they keep their event_id.
    Due at once: ``next_attempt_at`` is set (see ``PUT_BACK``)."""
    change = settings.sql(
        "UPDATE {events} AS e SET dead_lettered_at = NULL, attempts = 0,"
        " next_attempt_at = {put_back} FROM target WHERE e.id = target.id",
        events="events",
        put_back=pg_sql.SQL(PUT_BACK),
    )
    return _act(
        conn, settings, selection, action="retry", change=change, reason=reason, actor=actor
    )


def discard(
    conn: psycopg.Connection[Any],
    settings: OutboxSettings,
    ids: Sequence[int],
    *,
    reason: str,
    actor: str,
) -> list[int]:
    """Delete dead letters for good (they stay described in the log); a reason is required."""
    if not reason.strip():
        raise ValueError("discarding an event needs a reason")
    change = settings.sql(
        "DELETE FROM {events} AS e USING target WHERE e.id = target.id", events="events"
    )
    return _act(
        conn,
        settings,
        Selection(ids=ids),
        action="discard",
        change=change,
        reason=reason,
        actor=actor,
    )


# Replay: rows kept in the table of published events (migration 0008) move back to the outbox
# with their ids, in one statement. The partition holding them cannot be dropped meanwhile (its
# drop waits for this transaction, or gives up), so each row is either put back or was purged.
_REPLAY_KEPT = """
WITH back AS (
    DELETE FROM {published} AS e WHERE {where}
    RETURNING e.id, e.event_id, e.topic, e.key, e.payload, e.header_names, e.header_values,
              e.created_at
)
INSERT INTO {events} (id, event_id, topic, key, payload, header_names, header_values, created_at,
                      next_attempt_at)
OVERRIDING SYSTEM VALUE
SELECT id, event_id, topic, key, payload, header_names, header_values, created_at, {put_back}
FROM back
RETURNING id
"""
# Rows that versions before migration 0008 marked published in place.
_REPLAY_IN_PLACE = """
UPDATE {events} AS e SET published_at = NULL, attempts = 0, next_attempt_at = {put_back},
                         last_error = NULL
WHERE e.published_at IS NOT NULL AND {where}
RETURNING e.id
"""


def replay(
    conn: psycopg.Connection[Any], settings: OutboxSettings, selection: Selection
) -> list[int]:
    """Put retained published rows back in the outbox, so the relay sends them again with
    their original ids and event_id (consumers' dedup recognises the ones they processed)."""
    where, params = selection.where("created_at")
    parts = {"put_back": pg_sql.SQL(PUT_BACK), "where": pg_sql.SQL(where)}
    with conn.transaction():
        ids = [
            int(r[0])
            for statement in (
                settings.sql(_REPLAY_KEPT, events="events", published="published", **parts),
                settings.sql(_REPLAY_IN_PLACE, events="events", **parts),
            )
            for r in conn.execute(statement, params).fetchall()
        ]
    return sorted(ids)


_DELETED = "the relays delete rows once they are published"
_PENDING = " (to be sent, retrying or dead-lettered; see status and dead-letters list)"


@dataclass(frozen=True, slots=True)
class NothingReplayed:
    """What the outbox can tell about a range in which ``replay`` found no published row."""

    #: Rows of the range not published yet (to be sent, retrying, dead-lettered).
    unpublished: int
    #: Each registered relay's --retention in seconds (0: deletes on publish; None: a relay of
    #: an earlier version, which does not say).
    retentions: tuple[float | None, ...]
    #: The last row id handed out (None: not known, when the id sequence caches ids).
    last_id: int | None
    now: dt.datetime

    def explain(self, selection: Selection) -> str:
        """One line: retention is named only where it may be why the range is empty."""
        where = (
            f"of topic {selection.topic!r} in that range" if selection.topic else "in that range"
        )
        if self.unpublished:
            events = "1 event is" if self.unpublished == 1 else f"{self.unpublished} events are"
            return f"nothing to replay: {events} not published yet {where}{_PENDING}"
        return f"no events {where}{self._why_none_left(selection)}"

    def _why_none_left(self, selection: Selection) -> str:
        if self._after_every_row(selection):
            return ""
        if not self.retentions or None in self.retentions:
            return f" are left: {_DELETED} unless they run with --retention (OUTBOX_RETENTION)"
        kept = min(r for r in self.retentions if r is not None)
        if kept == 0:
            return f" are left: {_DELETED} (run them with --retention to keep rows for replay)"
        # A row created within the retention was published within it too: it would be kept.
        if selection.since is not None and selection.since >= self.now - dt.timedelta(seconds=kept):
            return ""
        return f" are left: the relays keep published rows {_span(kept)} (--retention), then purge"

    def _after_every_row(self, selection: Selection) -> bool:
        """Whether the range starts after every row ever written: in the future, or past the
        last id handed out."""
        if selection.since is not None and selection.since > self.now:
            return True
        starts = [*selection.ids, *([] if selection.from_id is None else [selection.from_id])]
        return bool(starts) and self.last_id is not None and min(starts) > self.last_id


def _span(seconds: float) -> str:
    """7d, 12h, 15m or 90s."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def nothing_replayed(
    conn: psycopg.Connection[Any], settings: OutboxSettings, selection: Selection
) -> NothingReplayed:
    """What the outbox says about a range ``replay`` found no published row in."""
    where, params = selection.where("created_at")
    facts = settings.sql(
        "SELECT (SELECT count(*) FROM {events} AS e WHERE e.published_at IS NULL AND {where}),"
        " nullif({last_id}(), 0), now()",
        events="events",
        last_id="last_id",
        where=pg_sql.SQL(where),
    )
    retentions = settings.sql("SELECT extract(epoch FROM retention) FROM {relays}", relays="relays")
    with conn.transaction():
        row = conn.execute(facts, params).fetchone()
        said = conn.execute(retentions).fetchall()
    assert row is not None
    unpublished, last_id, now = row
    return NothingReplayed(
        int(unpublished), tuple(None if r is None else float(r) for (r,) in said), last_id, now
    )
