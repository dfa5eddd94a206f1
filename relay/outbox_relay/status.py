"""``outbox-relay status``: is the outbox flowing, what is stuck and why, who owns what.

Queries only; each figure is one read of the outbox table or of PostgreSQL's lock table, so
the command is safe to run from cron or a Kubernetes probe.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from outbox.settings import OutboxSettings
from outbox_relay import pg
from outbox_relay.exit_codes import ExitCode
from outbox_relay.shards import lock_class

_BACKLOG_BY_TOPIC = """
SELECT topic, count(*), extract(epoch FROM now() - min(created_at))
FROM {events} WHERE published_at IS NULL AND dead_lettered_at IS NULL
GROUP BY topic ORDER BY topic
"""
_BACKLOG_BY_SHARD = """
SELECT shard, count(*) FROM {events}
WHERE published_at IS NULL AND dead_lettered_at IS NULL GROUP BY shard ORDER BY shard
"""
_COUNTS = """
SELECT
  count(*) FILTER (WHERE published_at IS NULL AND dead_lettered_at IS NULL),
  extract(epoch FROM now() - min(created_at)
          FILTER (WHERE published_at IS NULL AND dead_lettered_at IS NULL)),
  count(*) FILTER (WHERE published_at IS NULL AND dead_lettered_at IS NULL AND attempts > 0),
  count(*) FILTER (WHERE dead_lettered_at IS NOT NULL AND published_at IS NULL),
  count(*) FILTER (WHERE published_at > now() - interval '1 minute')
    + (SELECT count(*) FROM {published} WHERE published_at > now() - interval '1 minute')
FROM {events}
"""
# The published events kept (--retention), from the catalog: no row is read.
_KEPT = """
SELECT count(*), extract(epoch FROM now() - min(starts)) FROM {partitions}() WHERE starts < now()
"""
# A key is blocked when an earlier unpublished row of it is failing (waiting for a retry) or,
# when dead letters block their key, dead-lettered.
_BLOCKED = """
SELECT count(DISTINCT e.key), extract(epoch FROM now() - min(e.created_at))
FROM {events} AS e
WHERE e.published_at IS NULL AND e.dead_lettered_at IS NULL AND e.key IS NOT NULL
  AND EXISTS (
    SELECT 1 FROM {events} AS b
    WHERE b.key = e.key AND b.id < e.id AND b.published_at IS NULL
      AND ((b.attempts > 0 AND b.dead_lettered_at IS NULL)
           OR (%(dead_letters_block)s AND b.dead_lettered_at IS NOT NULL)))
"""
# The events scheduled for later delivery (migration 0009), which the backlog does not count.
_SCHEDULED = """
SELECT s.waiting, s.next_due, extract(epoch FROM s.next_due - now())
FROM {scheduled_summary}() AS s
"""
# The live relays (membership locks), with what each does with published rows (the registry).
_RELAYS = """
SELECT a.application_name, a.pid, a.client_addr::text,
       extract(epoch FROM now() - a.backend_start), extract(epoch FROM now() - a.state_change),
       (SELECT count(*) FROM pg_locks AS s
        WHERE s.locktype = 'advisory' AND s.classid = %(shards)s AND s.objsubid = 2
          AND s.granted AND s.pid = m.pid),
       extract(epoch FROM r.retention)
FROM pg_locks AS m JOIN pg_stat_activity AS a ON a.pid = m.pid
LEFT JOIN {relays} AS r ON r.member = m.objid::bigint
WHERE m.locktype = 'advisory' AND m.classid = %(members)s AND m.objsubid = 2 AND m.granted
  AND m.database = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY a.application_name
"""


@dataclass(frozen=True, slots=True)
class Relay:
    name: str
    pid: int
    client: str | None
    up_seconds: float
    last_seen_seconds: float
    shards: int
    #: How long it keeps published rows (0: deletes them; None: a relay that does not say).
    retention_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class Status:
    backlog: int
    oldest_unpublished_seconds: float | None
    waiting_for_retry: int
    dead_lettered: int
    blocked_keys: int
    oldest_blocked_seconds: float | None
    published_last_minute: int | None
    #: Partitions of published events that have begun, and how long ago the oldest one began
    #: (the oldest row kept is at most that old).
    kept_partitions: int = 0
    kept_since_seconds: float | None = None
    #: Events scheduled for later delivery, not yet fallen due and moved into the outbox.
    scheduled: int = 0
    #: When the next of them falls due (ISO 8601), and in how many seconds (below 0: overdue,
    #: which a running relay does not let last more than a second or so).
    next_due_at: str | None = None
    next_due_in_seconds: float | None = None
    backlog_by_topic: list[tuple[str, int, float]] = field(default_factory=list)
    backlog_by_shard: dict[int, int] = field(default_factory=dict)
    relays: list[Relay] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["backlog_by_topic"] = [
            {"topic": t, "backlog": n, "oldest_seconds": age} for t, n, age in self.backlog_by_topic
        ]
        return data


def lagging(status: Status, max_lag: float | None) -> str | None:
    """Why ``--max-lag`` fails, or None when the oldest unpublished event is young enough."""
    lag = status.oldest_unpublished_seconds
    if max_lag is None or lag is None or lag <= max_lag:
        return None
    return f"the oldest unpublished event is {lag:.0f} s old (--max-lag {max_lag:g})"


@dataclass(frozen=True, slots=True)
class Report:
    """One outbox of a list: its status, or why it could not be read; and the exit code."""

    outbox: str
    #: Where it is, for people: the database (no password) and the events table.
    where: str = ""
    status: Status | None = None
    #: Why there is no status (the database unreachable, the schema missing...).
    error: str | None = None
    code: ExitCode = ExitCode.OK
    #: What is wrong besides: the lag over ``--max-lag``.
    problem: str | None = None

    def as_json(self) -> dict[str, Any]:
        found = {} if self.status is None else self.status.as_json()
        return {"outbox": self.outbox, **found} | ({"error": self.error} if self.error else {})


# From the worst: what could not be read at all, then what is read and lagging.
_WORST_FIRST = (
    ExitCode.FAILURE,
    ExitCode.USAGE,
    ExitCode.DATABASE_UNAVAILABLE,
    ExitCode.SCHEMA_NOT_CURRENT,
    ExitCode.LAGGING,
)


def worst(reports: list[Report]) -> ExitCode:
    """The exit code of a status of several outboxes: the worst of theirs."""
    codes = {report.code for report in reports}
    return next((code for code in _WORST_FIRST if code in codes), ExitCode.OK)


def render_all(reports: list[Report]) -> str:
    """One block per outbox, headed by its name; an outbox not read says why in one line."""
    blocks = []
    for report in reports:
        lines = [
            f"== {report.outbox}: {report.where} ==" if report.where else f"== {report.outbox} =="
        ]
        lines.append(
            f"{report.outbox}: {report.error}" if report.status is None else render(report.status)
        )
        if report.problem:
            lines.append(f"{report.outbox}: {report.problem}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _seconds(value: Any) -> float | None:
    return None if value is None else round(float(value), 3)


def read(
    conn: psycopg.Connection[Any],
    settings: OutboxSettings,
    *,
    dead_letters_block: bool,
    retention_kept: bool,
) -> Status:
    """Every figure of the status, read in one snapshot (one REPEATABLE READ transaction).

    Whether published rows are kept is what the running relays say they do; ``retention_kept``
    (the command's own ``--retention``) only when no running relay says."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        backlog, oldest, retrying, dead, last_minute = conn.execute(
            settings.sql(_COUNTS, events="events", published="published")
        ).fetchone() or (0, None, 0, 0, 0)
        kept, kept_since = conn.execute(
            settings.sql(_KEPT, partitions="published_partitions")
        ).fetchone() or (0, None)
        blocked, oldest_blocked = conn.execute(
            settings.sql(_BLOCKED, events="events"), {"dead_letters_block": dead_letters_block}
        ).fetchone() or (0, None)
        scheduled, next_due, next_due_in = conn.execute(
            settings.sql(_SCHEDULED, scheduled_summary="scheduled_summary")
        ).fetchone() or (0, None, None)
        by_topic = conn.execute(settings.sql(_BACKLOG_BY_TOPIC, events="events")).fetchall()
        by_shard = conn.execute(settings.sql(_BACKLOG_BY_SHARD, events="events")).fetchall()
        relays = [
            Relay(
                relay_name(name),
                int(pid),
                client,
                _seconds(up) or 0.0,
                _seconds(seen) or 0.0,
                int(shards),
                _seconds(retention),
            )
            for name, pid, client, up, seen, shards, retention in conn.execute(
                settings.sql(_RELAYS, relays="relays"),
                {
                    "shards": lock_class(settings, "shards"),
                    "members": lock_class(settings, "members"),
                },
            )
        ]
    said = [r.retention_seconds for r in relays if r.retention_seconds is not None]
    if said:
        retention_kept = any(seconds > 0 for seconds in said)
    return Status(
        backlog=int(backlog),
        oldest_unpublished_seconds=_seconds(oldest),
        waiting_for_retry=int(retrying),
        dead_lettered=int(dead),
        blocked_keys=int(blocked),
        oldest_blocked_seconds=_seconds(oldest_blocked),
        published_last_minute=int(last_minute) if retention_kept else None,
        kept_partitions=int(kept),
        kept_since_seconds=_seconds(kept_since),
        scheduled=int(scheduled),
        next_due_at=None if next_due is None else next_due.isoformat(),
        next_due_in_seconds=_seconds(next_due_in),
        backlog_by_topic=[(t, int(n), _seconds(age) or 0.0) for t, n, age in by_topic],
        backlog_by_shard={int(s): int(n) for s, n in by_shard},
        relays=relays,
    )


def relay_name(application_name: str) -> str:
    """The relay id in the name of a relay's ownership session, or the name as it is."""
    return pg.relay_id_of(application_name, pg.OWNER_ROLE) or application_name


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return str(dt.timedelta(seconds=round(seconds)))


def _keeps(retention_seconds: float | None) -> str:
    """What a relay does with published rows: keeps them this long, or deletes them."""
    if retention_seconds is None:
        return "?"
    return _age(retention_seconds) if retention_seconds > 0 else "no"


def _next_due(status: Status) -> str:
    """When the next scheduled event falls due, after the count."""
    seconds = status.next_due_in_seconds
    if seconds is None:
        return ""
    if seconds < 0:
        return f" (the next was due {_age(-seconds)} ago at {status.next_due_at})"
    return f" (the next due in {_age(seconds)}, at {status.next_due_at})"


def render(status: Status) -> str:
    """The human-readable table."""
    published = (
        "n/a (the relays delete rows on publish; run them with --retention to keep them)"
        if status.published_last_minute is None
        else str(status.published_last_minute)
    )
    lines = [
        f"backlog (unpublished)          {status.backlog}",
        f"oldest unpublished             {_age(status.oldest_unpublished_seconds)}",
        f"waiting for a retry            {status.waiting_for_retry}",
        f"dead-lettered                  {status.dead_lettered}",
        f"keys blocked behind a failure  {status.blocked_keys}"
        + (f" (oldest {_age(status.oldest_blocked_seconds)})" if status.blocked_keys else ""),
        f"published in the last minute   {published}",
    ]
    if status.kept_partitions:
        lines.append(
            f"published events kept          in {status.kept_partitions} partitions, the oldest"
            f" from {_age(status.kept_since_seconds)} ago"
        )
    lines.append(f"scheduled for later            {status.scheduled}{_next_due(status)}")
    lines += [
        "",
        f"{'topic':40} {'backlog':>9} {'oldest':>10}",
    ]
    lines += [f"{t:40} {n:>9} {_age(age):>10}" for t, n, age in status.backlog_by_topic] or [
        "(none)"
    ]
    if status.backlog_by_shard:
        busiest = sorted(status.backlog_by_shard.items(), key=lambda item: -item[1])[:8]
        lines += [
            "",
            f"backlog in {len(status.backlog_by_shard)} of 256 shards; busiest (shard:rows) "
            + ", ".join(f"{s}:{n}" for s, n in busiest),
        ]
    lines += [
        "",
        f"{'relay':36} {'pid':>7} {'shards':>6} {'up':>10} {'last seen':>10} {'keeps rows':>10}",
    ]
    lines += [
        f"{r.name:36} {r.pid:>7} {r.shards:>6} {_age(r.up_seconds):>10} "
        f"{_age(r.last_seen_seconds) + ' ago':>10} {_keeps(r.retention_seconds):>10}"
        for r in status.relays
    ] or ["(no relay running)"]
    return "\n".join(lines)
