"""Writers and one relay with ``--retention`` for ``--retention-seconds`` (300) at 5,000, 10,000
and 20,000 events/s: does the purge keep the tables bounded, and what does it cost the events?

For each rate, one relay runs with ``--retention`` (60 s) under the steady load of ``load.py``
(a consumer timing each event). Since migration 0008 such a relay moves each published row to
the table of published events, partitioned by publication time in spans of
``partition_span(retention)`` (8 s for 60 s), and drops a partition once it is wholly past the
retention: a row is kept at most the retention plus one span. Every 5 s a sampler reads

* the size: ``pg_total_relation_size`` of the outbox table plus that of every partition of the
  table of published events (heap, indexes, TOAST);
* the overdue rows: published rows older than the retention plus one span, in the table of
  published events and marked in place in the outbox table (as relays before 0008 did, and as
  the only kind there is on such a schema), and the oldest published row's age;
* the partitions, and the rows in the default partition (rows that found no partition).

Time counts from the writers' start. Reported per rate: the size at the first sample once the
writers ran one retention (the table then holds one retention's events and nothing has expired
yet) and the most seen at any later sample (the target: at most 1.3 times); the most overdue
rows seen, as rows and as seconds of events (the target: less than one span); commit-to-delivery
p50 / p99 (the target: p99 under 1 s at every rate the machine writes without a retention); the
rows left in the default partition and the relay's warnings and errors.

Beside each rate, in the same run and first, the same load for ``--retention-baseline-seconds``
(60) with published rows deleted at once: what the machine writes and delivers at that rate
without a retention.

    .venv/bin/python bench/retention.py [--retention-seconds 300] [--retention 60]
        [--retention-rates 5000,10000,20000] [--retention-baseline-seconds 60] [--json out.json]
"""

from __future__ import annotations

import time
from typing import Any

import common
import load
import soak

from outbox import testing

SIZE_SQL = """
SELECT pg_total_relation_size('outbox_events'),
       coalesce((SELECT sum(pg_total_relation_size(relid))
                 FROM pg_partition_tree(to_regclass('outbox_published'))), 0)
"""
#: Published rows marked in place (one pass over the outbox table): how many are older than
#: %(late)s seconds, and the oldest one's publication.
IN_PLACE_SQL = """
SELECT count(*) FILTER (WHERE published_at < now() - make_interval(secs => %(late)s)),
       extract(epoch FROM now() - min(published_at))::float8
FROM outbox_events WHERE published_at IS NOT NULL
"""
#: The same in the table of published events; the partitions are pruned to those holding rows
#: past the cutoffs (none or one or two while the purge keeps up).
PUBLISHED_SQL = """
SELECT (SELECT count(*) FROM outbox_published
        WHERE published_at < now() - make_interval(secs => %(late)s)),
       (SELECT extract(epoch FROM now() - min(published_at))::float8 FROM outbox_published
        WHERE published_at < now() - make_interval(secs => %(retention)s)),
       (SELECT count(*) FROM outbox_published_partitions()),
       (SELECT count(*) FROM outbox_published_default)
"""
SAMPLE_EVERY_S = 5.0
#: The p99 target applies where the baseline wrote at least this share of the rate asked for.
WRITABLE = 0.95


class Sampler(soak.Sampler[dict[str, Any]]):
    """Every ``interval`` seconds, in a thread: one sample (a dict, ``at`` its wall time)."""

    def __init__(self, database_url: str, retention: float, interval: float) -> None:
        super().__init__(database_url, interval)
        self._published = common.published_table(self._conn)
        self._params = {
            "retention": retention,
            "late": retention + common.partition_span(retention),
        }

    def sample(self) -> dict[str, Any]:
        at = time.time()
        conn = self._conn
        sizes = conn.execute(SIZE_SQL).fetchone()
        in_place = conn.execute(IN_PLACE_SQL, self._params).fetchone()
        if sizes is None or in_place is None:  # pragma: no cover - aggregates return a row
            raise RuntimeError("the sampler's statements returned no row")
        out = {
            "at": at,
            "outbox_bytes": int(sizes[0]),
            "published_bytes": int(sizes[1]),
            "bytes": int(sizes[0]) + int(sizes[1]),
            "overdue_in_place": int(in_place[0]),
            "oldest_s": in_place[1],
            "overdue_published": 0,
            "partitions": None,
            "default_rows": None,
        }
        if self._published:
            row = conn.execute(PUBLISHED_SQL, self._params).fetchone()
            if row is None:  # pragma: no cover - always a row
                raise RuntimeError("the sampler's statement returned no row")
            out["overdue_published"] = int(row[0])
            if row[1] is not None:
                out["oldest_s"] = max(out["oldest_s"] or 0.0, row[1])
            out["partitions"], out["default_rows"] = int(row[2]), int(row[3])
        out["overdue"] = out["overdue_in_place"] + out["overdue_published"]
        return out


def complaints(relay: common.Relay) -> list[str]:
    """The relay's warnings and errors (it logs at warning), by event, with their counts."""
    counts: dict[str, int] = {}
    for line in testing.log_events(relay.log_text()):
        name = f"{line.get('level')}: {line.get('event')}"
        counts[name] = counts.get(name, 0) + 1
    return [f"{name} x{n}" for name, n in sorted(counts.items())]


def baseline(env: common.Env, rate: float, seconds: float) -> dict[str, Any]:
    """The same load without a retention (published rows deleted at once)."""
    common.progress(f"retention baseline: {rate:,.0f} events/s for {seconds:.0f} s, no retention")
    with env.database() as url:
        with load.steady(env, url, rate, seconds) as (relay, receiver, plan):
            run = load.write(url, plan, receiver, relay)
            receiver.wait_for(run.written, timeout=60)
            samples, missing = run.latencies(receiver)
        return load.summary(samples, missing, run, receiver)


def measure_rate(env: common.Env, opts: common.Options, rate: float) -> dict[str, Any]:
    seconds, retention = opts.retention_seconds, opts.retention
    span = common.partition_span(retention)
    interval = min(SAMPLE_EVERY_S, seconds / 10)
    base = None
    if opts.retention_baseline_seconds > 0:
        base = baseline(env, rate, min(seconds, opts.retention_baseline_seconds))
    common.progress(
        f"retention: {rate:,.0f} events/s for {seconds:.0f} s, --retention {retention:g}"
        f" (partitions of {span} s)"
    )
    with env.database() as url:
        with load.steady(env, url, rate, seconds, "--retention", f"{retention:g}") as (
            relay,
            receiver,
            plan,
        ):
            with Sampler(url, retention, interval) as sampler:
                run = load.write(url, plan, receiver, relay)
                at_end = sampler.sample()
            receiver.wait_for(run.written, timeout=60)
            samples, missing = run.latencies(receiver)
            relay_complaints = complaints(relay)
        latency = load.summary(samples, missing, run, receiver)
    taken = [*sampler.samples, at_end]
    for s in taken:
        s["t_s"] = round(s.pop("at") - run.started, 1)
    # The first sample once the writers ran one retention, and every one after it.
    after = [s for s in taken if s["t_s"] >= retention]
    first = after[0] if after else None
    later = after[1:]
    biggest = max(later, key=lambda s: s["bytes"]) if later else None
    achieved = latency["achieved_rate"] or rate
    overdue = max(s["overdue"] for s in taken)
    oldest = [s["oldest_s"] for s in taken if s["oldest_s"] is not None]
    writable = base is None or base["achieved_rate"] >= WRITABLE * rate
    return {
        "rate": rate,
        "seconds": seconds,
        "retention_s": retention,
        "span_s": span,
        "latency": latency,
        "baseline": base,
        "writable_without_retention": writable,
        "samples": taken,
        "overdue_max_rows": overdue,
        "overdue_max_seconds_of_events": overdue / achieved,
        "span_of_events_rows": span * achieved,
        "oldest_max_s": max(oldest, default=None),
        "size_after_retention_bytes": first["bytes"] if first else None,
        "size_after_retention_t_s": first["t_s"] if first else None,
        "size_max_later_bytes": biggest["bytes"] if biggest else None,
        "size_max_later_t_s": biggest["t_s"] if biggest else None,
        "size_at_end_bytes": at_end["bytes"],
        "size_ratio": (
            common.ratio(biggest["bytes"], first["bytes"]) if first and biggest else float("nan")
        ),
        "default_partition_rows_max": max(
            (s["default_rows"] for s in taken if s["default_rows"] is not None), default=None
        ),
        "partitions_at_end": at_end["partitions"],
        "relay_complaints": relay_complaints,
    }


def measure(env: common.Env, opts: common.Options) -> dict[str, Any]:
    return {
        "rates": {str(int(rate)): measure_rate(env, opts, rate) for rate in opts.retention_rates}
    }


def rows(result: dict[str, Any]) -> list[common.Row]:
    out = []
    mb = 1024 * 1024
    for r in result["rates"].values():
        lat, base = r["latency"], r["baseline"]
        label = f"{r['rate']:,.0f}/s, --retention {r['retention_s']:g}"
        first, biggest = r["size_after_retention_bytes"], r["size_max_later_bytes"]
        if base:
            out.append(
                common.Row(
                    "retention",
                    f"{r['rate']:,.0f}/s, no retention (same run): p50 / p99",
                    f"{base['p50_ms']:.1f} / {base['p99_ms']:.1f}",
                    "ms",
                    f"achieved {base['achieved_rate']:,.0f}/s, {base['written']:,} events, "
                    f"{base['missing']} missing",
                )
            )
        default_rows = r["default_partition_rows_max"]
        out += [
            common.Row(
                "retention",
                f"{label}: commit to delivery p50 / p99",
                f"{lat['p50_ms']:.1f} / {lat['p99_ms']:.1f}",
                "ms",
                f"achieved {lat['achieved_rate']:,.0f}/s, {lat['written']:,} events, "
                f"{lat['missing']} missing",
            ),
            common.Row(
                "retention",
                f"{label}: published rows older than retention + {r['span_s']} s, most seen",
                common.num(r["overdue_max_rows"]),
                "rows",
                f"{r['overdue_max_seconds_of_events']:.2f} s of events (a span: {r['span_s']} s, "
                f"{common.num(r['span_of_events_rows'])} rows); oldest row at most "
                f"{common.num(r['oldest_max_s'], 1)} s old",
            ),
            common.Row(
                "retention",
                f"{label}: size after {r['size_after_retention_t_s']} s / most later",
                "n/a"
                if first is None or biggest is None
                else f"{first / mb:,.1f} / {biggest / mb:,.1f}",
                "MB",
                f"{r['size_ratio']:.2f}x (most at {r['size_max_later_t_s']} s; "
                f"{r['size_at_end_bytes'] / mb:,.1f} MB at the end)",
            ),
            common.Row(
                "retention",
                f"{label}: rows in the default partition, most seen",
                "n/a" if default_rows is None else common.num(default_rows),
                "rows",
                (
                    "no table of published events"
                    if r["partitions_at_end"] is None
                    else f"{r['partitions_at_end']} partitions at the end"
                )
                + f"; relay warnings: {', '.join(r['relay_complaints']) or 'none'}",
            ),
        ]
    return out


def targets(result: dict[str, Any]) -> list[common.Target]:
    out = []
    for r in result["rates"].values():
        label = f"retention {r['rate']:,.0f}/s"
        out += [
            common.Target(
                f"{label}: overdue published rows, seconds of events (one span)",
                r["overdue_max_seconds_of_events"],
                "<",
                float(r["span_s"]),
                "s",
            ),
            common.Target(
                f"{label}: size, most after the first retention / at it",
                r["size_ratio"],
                "<=",
                1.3,
            ),
            common.Target(
                f"{label}: p99 (written without retention at this rate)"
                if r["writable_without_retention"]
                else f"{label}: p99 (not judged: not written at this rate without retention)",
                r["latency"]["p99_ms"] if r["writable_without_retention"] else None,
                "<",
                1000.0,
                "ms",
            ),
        ]
    return out


if __name__ == "__main__":
    common.standalone(__doc__, "retention", measure, rows, targets, single_run=True)
