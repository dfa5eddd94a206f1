"""Writers and one relay with ``--retention`` for ``--retention-seconds`` (300) at 5,000 and
20,000 events/s: does the purge keep the table bounded?

For each rate, one relay runs with ``--retention`` (60 s) under the steady load of ``load.py``
(a consumer timing each event). Every 10 s a sampler counts the published rows older than the
retention plus 10 s (the purge's backlog: at most one second's worth of events is the target)
and reads the outbox table's total size (``pg_total_relation_size``). Reported per rate: the
most such rows seen once the first retention period plus 10 s has passed, as rows and as
seconds of events; the table's size after the first retention period and at the end (the
target: at most twice the first); and commit-to-delivery latency, to see what the purge costs
the events.

    .venv/bin/python bench/retention.py [--retention-seconds 300] [--json out.json]
"""

from __future__ import annotations

import time
from typing import Any

import common
import load
import soak

SIZE_SQL = soak.SIZE_SQL
OVERDUE_SQL = (
    "SELECT count(*) FROM outbox_events WHERE published_at < now() - make_interval(secs => %s)"
)
#: Seconds past the retention after which a published row counts as overdue.
GRACE_S = 10.0
SAMPLE_EVERY_S = 10.0


class Sampler(soak.TableSampler):
    """Every ``interval`` seconds: (seconds since start, table bytes, overdue rows)."""

    def __init__(self, database_url: str, retention: float, interval: float) -> None:
        super().__init__(database_url, interval)
        self._retention = retention
        self._started = time.monotonic()

    def sample(self) -> tuple[float, int, int]:
        size = self._conn.execute(SIZE_SQL).fetchone()
        overdue = self._conn.execute(OVERDUE_SQL, (self._retention + GRACE_S,)).fetchone()
        return (
            time.monotonic() - self._started,
            int(size[0]) if size else -1,
            int(overdue[0]) if overdue else -1,
        )


def measure_rate(env: common.Env, opts: common.Options, rate: float) -> dict[str, Any]:
    seconds, retention = opts.retention_seconds, opts.retention
    interval = min(SAMPLE_EVERY_S, seconds / 10)
    common.progress(
        f"retention: {rate:,.0f} events/s for {seconds:.0f} s, --retention {retention:g}"
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
        latency = load.summary(samples, missing, run, receiver)
    taken = [*sampler.samples, at_end]
    settled = [s for s in taken if s[0] >= retention + GRACE_S + interval]
    first = min(taken, key=lambda s: abs(s[0] - retention))
    worst = max((s[2] for s in settled), default=None)
    achieved = latency["achieved_rate"] or rate
    return {
        "rate": rate,
        "seconds": seconds,
        "retention_s": retention,
        "latency": latency,
        "samples": [{"t_s": round(t, 1), "bytes": b, "overdue": o} for t, b, o in taken],
        "overdue_max_rows": worst,
        "overdue_max_seconds_of_events": None if worst is None else worst / achieved,
        "size_after_retention_bytes": first[1],
        "size_after_retention_t_s": round(first[0], 1),
        "size_at_end_bytes": at_end[1],
        "size_ratio": common.ratio(at_end[1], first[1]),
    }


def measure(env: common.Env, opts: common.Options) -> dict[str, Any]:
    return {
        "rates": {str(int(rate)): measure_rate(env, opts, rate) for rate in opts.retention_rates}
    }


def rows(result: dict[str, Any]) -> list[common.Row]:
    out = []
    mb = 1024 * 1024
    for r in result["rates"].values():
        lat = r["latency"]
        label = f"{r['rate']:,.0f}/s, --retention {r['retention_s']:g}"
        overdue = r["overdue_max_rows"]
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
                f"{label}: published rows older than retention + {GRACE_S:g} s, most seen",
                "n/a" if overdue is None else common.num(overdue),
                "rows",
                "" if overdue is None else f"{r['overdue_max_seconds_of_events']:.2f} s of events",
            ),
            common.Row(
                "retention",
                f"{label}: table size after {r['size_after_retention_t_s']:g} s / at the end",
                f"{r['size_after_retention_bytes'] / mb:,.1f} / {r['size_at_end_bytes'] / mb:,.1f}",
                "MB",
                f"{r['size_ratio']:.2f}x",
            ),
        ]
    return out


def targets(result: dict[str, Any]) -> list[common.Target]:
    out = []
    for r in result["rates"].values():
        label = f"retention {r['rate']:,.0f}/s"
        out += [
            common.Target(
                f"{label}: overdue published rows, seconds of events",
                r["overdue_max_seconds_of_events"],
                "<",
                1.0,
                "s",
            ),
            common.Target(
                f"{label}: table size at end / after retention", r["size_ratio"], "<=", 2.0
            ),
        ]
    return out


if __name__ == "__main__":
    common.standalone(__doc__, "retention", measure, rows, targets, single_run=True)
