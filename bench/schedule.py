"""Does a long schedule of events delivered later slow the relay down?

Events scheduled for later (``deliver_at``, ``delay``) wait in a table of their own until they
fall due; the claims and the waits read the outbox table only, and the release reads the due
index from its start. This bench checks it with and without ``FUTURE`` events scheduled over the
next 10 minutes (none falling due during the runs: the first is due in 10 minutes), each run
on a fresh database, the two cases interleaved (in turn first):

* drain: one relay (``--exit-when-idle``) draining ``--events``/5 due events (20,000; quick
  1,000) from the outbox: events/s of the process's wall time minus that of the same command
  with nothing due (start-up and shut-down), beside its ``relay.drained`` figure (first claim
  to last commit); every event read back from the broker;
* release drain: as many due events waiting in the schedule instead (due a second ago), which
  the relay releases into the outbox and publishes: events/s the same way (the releases come
  before the first claim, so only the wall-time figure counts them);
* claim: the relay's claim statement (``OutboxSource.claim``, 500 rows) in milliseconds, the
  median of 20 claims of the drain's backlog;
* release: ``OutboxSource.release_due(1000)`` on 1,000 due rows, in milliseconds (median of
  20, the rows put back between them), beside none and ``FUTURE`` future rows;
* on time: a relay idle for a few seconds (its waits under way) while ``ON_TIME`` events are
  scheduled to fall due 1 to 3 s later, one by one: from each one's due time to its
  publication, by the database's clock (``--retention`` keeps ``published_at``; a released
  event's ``created_at`` is its due time), p50 and max over the runs; the wake-up this bench
  watches, since an idle relay's wait is what ends at a due time.

    .venv/bin/python bench/schedule.py [--events 100000] [--runs 3] [--quick] [--json out.json]
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

import common
import drain
import psycopg

import outbox
from outbox.settings import SHARD_COUNT
from outbox_relay.claims import OutboxSource
from outbox_relay.config import RelaySettings
from outbox_relay.ports import Ownership

#: Events scheduled over the next 10 minutes beside the runs "with a schedule".
FUTURE = 100_000
#: Rows one release moves in the release timing.
RELEASE_ROWS = 1_000
CLAIM_ROWS = 500
REPEATS = 20
#: An advisory lock standing for a relay's membership in the claim timing (as limits.py does).
MEMBER = (4242, 1)
#: Events scheduled, one statement each, while a relay is idle, in the on-time measure.
ON_TIME = 20

_SCHEDULE = """
INSERT INTO outbox_scheduled (event_id, topic, key, payload, due_at)
SELECT gen_random_uuid(), %(topic)s, convert_to('key-' || (g %% 1000), 'UTF8'),
       convert_to(rpad('{"order_id": ' || g || '}', 256), 'UTF8'),
       now() + %(first)s * interval '1 s' + g * %(spacing)s * interval '1 s'
FROM generate_series(0, %(count)s - 1) AS g
"""


def schedule(url: str, topic: str, count: int, *, first: float, spacing: float) -> None:
    """``count`` scheduled events, the first due ``first`` seconds from now, then every
    ``spacing`` seconds; then VACUUM ANALYZE, as a settled table would be."""
    if count == 0:
        return
    with psycopg.connect(url, autocommit=True) as conn:
        params = {"topic": topic, "count": count, "first": first, "spacing": spacing}
        conn.execute(_SCHEDULE, params)
        conn.execute("VACUUM ANALYZE outbox_scheduled")


def future(url: str, topic: str, count: int) -> None:
    """``count`` events falling due over the 10 minutes after the next 10 minutes."""
    schedule(url, topic, count, first=600.0, spacing=600.0 / max(count, 1))


def checkpoint(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def scheduled_left(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM outbox_scheduled").fetchone()
    return int(row[0]) if row else -1


@contextlib.contextmanager
def source(url: str) -> Iterator[OutboxSource]:
    work = OutboxSource(RelaySettings(database_url=url, kafka_bootstrap_servers="unused:9092"))
    work.connect()
    try:
        yield work
    finally:
        work.close()


def time_claims(url: str) -> float:
    """Median milliseconds of the relay's claim statement (``CLAIM_ROWS`` rows)."""
    ownership = Ownership(frozenset(range(SHARD_COUNT)), *MEMBER)
    times = []
    with source(url) as work, psycopg.connect(url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, %s)", MEMBER)
        for repeat in range(REPEATS + 1):
            start = time.perf_counter()
            rows = work.claim(CLAIM_ROWS, ownership=ownership)
            elapsed = time.perf_counter() - start
            work.release()
            if len(rows) != CLAIM_ROWS:
                raise RuntimeError(f"claim: {len(rows)} of {CLAIM_ROWS} rows")
            if repeat:  # the first warms the caches
                times.append(1000 * elapsed)
    return common.median(times)


def time_releases(url: str, topic: str) -> float:
    """Median milliseconds of one release of ``RELEASE_ROWS`` due rows, put back between."""
    times = []
    with source(url) as work:
        for repeat in range(REPEATS + 1):
            schedule(url, topic, RELEASE_ROWS, first=-1.0, spacing=0.0)
            start = time.perf_counter()
            done = work.release_due(RELEASE_ROWS)
            elapsed = time.perf_counter() - start
            if done.released != RELEASE_ROWS:
                raise RuntimeError(f"release: {done.released} of {RELEASE_ROWS} rows")
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("DELETE FROM outbox_events")
            if repeat:
                times.append(1000 * elapsed)
    return common.median(times)


def due_ids(url: str) -> set[str]:
    """The event ids of the scheduled events already due."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT event_id::text FROM outbox_scheduled WHERE due_at <= now()"
        ).fetchall()
    return {r[0] for r in rows}


def drain_case(env: common.Env, events: int, scheduled: int, *, released: bool) -> dict[str, Any]:
    """One drain of ``events`` due events (in the outbox, or ``released`` from the schedule)
    beside ``scheduled`` future ones, on a fresh database; with events in the outbox, the
    claim's and the release's timings too."""
    claim_ms = release_ms = float("nan")
    with env.database() as url, env.topic() as topic:
        drain.run_to_exit(env, url)  # once on the empty outbox: the first start's work
        future(url, topic, scheduled)
        if released:
            schedule(url, topic, events, first=-1.0, spacing=0.0)
            expected = due_ids(url)
        else:
            common.fill(url, topic, events, 256)
            expected = common.event_ids(url)
            claim_ms = time_claims(url)
        checkpoint(url)  # the writes above flushed now, not during the drain
        run = drain.run_to_exit(env, url)
        back = common.read_back(env.bootstrap, topic, expected)
        idle = drain.run_to_exit(env, url)  # nothing due: start-up and shut-down alone
        left = scheduled_left(url)
        if left != scheduled:
            raise RuntimeError(f"{left} scheduled events left, {scheduled} expected")
        if not released:
            release_ms = time_releases(url, topic)
    rate, wall, overhead = run["relay_events_per_s"], run["wall_s"], idle["wall_s"]
    return {
        # the release is before the first claim: only the process's time counts it
        "events_per_s": events / (wall - overhead) if wall > overhead else float("nan"),
        "relay_events_per_s": float("nan") if rate is None else float(rate),
        "wall_s": wall,
        "overhead_s": overhead,
        "claim_ms": claim_ms,
        "release_ms": release_ms,
        "delivered": back.delivered,
        "duplicates": back.duplicates,
        "complaints": run["complaints"],
    }


def on_time(env: common.Env, scheduled: int) -> list[float]:
    """Seconds from falling due to being published of ``ON_TIME`` events scheduled while a
    relay is idle, beside ``scheduled`` future ones (the database's clock)."""
    with env.database() as url, env.topic() as topic:
        future(url, topic, scheduled)
        relay = common.Relay(env, url, "--retention", "3600")
        try:
            time.sleep(3.0)  # started, then idle: waiting for events
            with psycopg.connect(url, autocommit=True) as conn:
                for n in range(ON_TIME):
                    due = 1.0 + 2.0 * n / ON_TIME
                    with conn.transaction():  # one event a transaction, as a service writes
                        delay = dt.timedelta(seconds=due)
                        outbox.add(conn, topic, {"n": n}, key=f"k{n}", delay=delay)
            deadline = time.monotonic() + 30
            while True:
                with psycopg.connect(url) as conn:
                    rows = conn.execute(
                        "SELECT extract(epoch FROM published_at - created_at)::float8"
                        " FROM outbox_published"
                    ).fetchall()
                if len(rows) >= ON_TIME:
                    break
                relay.check()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{len(rows)} of {ON_TIME} due events published in 30 s")
                time.sleep(0.2)
        finally:
            relay.stop()
        relay.check()
    return [float(r[0]) for r in rows]


def measure(env: common.Env, opts: common.Options) -> dict[str, Any]:
    events = 1_000 if opts.quick else max(opts.events // 5, 1_000)
    cases = {"empty": 0, "future": FUTURE}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        kind: {case: [] for case in cases} for kind in ("outbox", "released")
    }
    for run in range(opts.runs):
        order = list(cases.items()) if run % 2 == 0 else list(reversed(cases.items()))
        for case, scheduled in order:
            for kind in runs:
                result = drain_case(env, events, scheduled, released=kind == "released")
                runs[kind][case].append(result)
                common.progress(
                    f"schedule run {run + 1}/{opts.runs}, {kind}, {scheduled:,} future:"
                    f" {result['events_per_s']:,.0f}/s"
                )
    late: dict[str, list[float]] = {case: [] for case in cases}
    for _run in range(opts.runs):
        for case, scheduled in cases.items():
            late[case] += on_time(env, scheduled)
    out: dict[str, Any] = {"events": events, "future": FUTURE, "cases": {}}
    out["on_time"] = {
        case: {
            "p50_ms": 1000 * common.median(found),
            "max_ms": 1000 * max(found),
            "min_ms": 1000 * min(found),
            "events": len(found),
        }
        for case, found in late.items()
    }
    for kind, by_case in runs.items():
        for case, results in by_case.items():
            out["cases"][f"{kind}/{case}"] = {
                name: common.median(r[name] for r in results)
                for name in (
                    "events_per_s",
                    "relay_events_per_s",
                    "wall_s",
                    "overhead_s",
                    "claim_ms",
                    "release_ms",
                )
            } | {
                "delivered": min(r["delivered"] for r in results),
                "duplicates": sum(r["duplicates"] for r in results),
                "complaints": sorted({c for r in results for c in r["complaints"]}),
                "runs": results,
            }
    for kind in runs:
        out[f"{kind}_ratio"] = common.ratio(
            out["cases"][f"{kind}/future"]["events_per_s"],
            out["cases"][f"{kind}/empty"]["events_per_s"],
        )
    # The claims alone (first claim to last commit): what a long schedule could slow.
    out["drained_ratio"] = common.ratio(
        out["cases"]["outbox/future"]["relay_events_per_s"],
        out["cases"]["outbox/empty"]["relay_events_per_s"],
    )
    out["claim_ratio"] = common.ratio(
        out["cases"]["outbox/future"]["claim_ms"], out["cases"]["outbox/empty"]["claim_ms"]
    )
    out["release_ratio"] = common.ratio(
        out["cases"]["outbox/future"]["release_ms"], out["cases"]["outbox/empty"]["release_ms"]
    )
    return out


def rows(result: dict[str, Any]) -> list[common.Row]:
    events, many = result["events"], f"{result['future']:,}"
    c = result["cases"]
    out = []
    for kind, what in (("outbox", "due events in the outbox"), ("released", "due events released")):
        for case, beside in (("empty", "no schedule"), ("future", f"{many} future")):
            r = c[f"{kind}/{case}"]
            note = (
                f"{result[f'{kind}_ratio']:.2f} of no schedule (same runs); "
                if case == "future"
                else ""
            ) + (
                f"relay.drained {common.num(r['relay_events_per_s'])}/s; "
                f"{r['delivered']:,} delivered, {r['duplicates']} duplicates; "
                f"relay warnings: {', '.join(r['complaints']) or 'none'}"
            )
            out.append(
                common.Row(
                    "schedule",
                    f"drain of {events:,} {what}, {beside} (wall minus start-up)",
                    common.num(r["events_per_s"]),
                    "events/s",
                    note,
                )
            )
    for case, beside in (("empty", "no schedule"), ("future", f"{many} future")):
        r = c[f"outbox/{case}"]
        ratio = f"{result['claim_ratio']:.2f} of no schedule" if case == "future" else ""
        out.append(
            common.Row(
                "schedule",
                f"claim of {CLAIM_ROWS} rows, {beside}",
                common.num(r["claim_ms"], 2),
                "ms",
                ratio,
            )
        )
    for case, beside in (("empty", "no other row"), ("future", f"{many} future")):
        r = c[f"outbox/{case}"]
        ratio = f"{result['release_ratio']:.2f} of no other row" if case == "future" else ""
        out.append(
            common.Row(
                "schedule",
                f"release of {RELEASE_ROWS:,} due rows, {beside}",
                common.num(r["release_ms"], 2),
                "ms",
                ratio,
            )
        )
    for case, beside in (("empty", "no other row"), ("future", f"{many} future")):
        r = result["on_time"][case]
        out.append(
            common.Row(
                "schedule",
                f"due to published, idle relay, {beside}: p50 / max",
                f"{common.num(r['p50_ms'], 1)} / {common.num(r['max_ms'], 1)}",
                "ms",
                f"{r['events']} events; earliest {r['min_ms']:.1f} ms (never before due)",
            )
        )
    return out


def targets(result: dict[str, Any]) -> list[common.Target]:
    on_time = result["on_time"]
    return [
        common.Target(
            "drain (relay.drained) beside 100,000 future / none", result["drained_ratio"], ">=", 0.8
        ),
        common.Target(
            "due to published beside 100,000 future, max",
            on_time["future"]["max_ms"],
            "<",
            1000.0,
            "ms",
        ),
        common.Target(
            "never published before due: earliest",
            min(c["min_ms"] for c in on_time.values()),
            ">=",
            0.0,
            "ms",
        ),
        common.Target("release beside 100,000 future / none", result["release_ratio"], "<=", 2.0),
    ]


if __name__ == "__main__":
    common.standalone(__doc__, "schedule", measure, rows, targets)
