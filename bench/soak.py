"""Writers and one relay together for ``--soak-seconds`` (300) at 5,000 events/s: does it stay
fast and small?

One relay with default settings (published rows deleted at once) and one writer process
(20 events a commit, a new topic every 10 s: see ``load.py``) for the whole soak, a consumer
timing each event. Reported: commit-to-delivery p50/p99 per 30-second window (by commit
time), the outbox table's total size (``pg_total_relation_size``: heap, indexes, TOAST)
sampled every 10 s, its size after the first minute and when the writers stop (the target: at
most twice the first), the backlog when the writers stop, and the relay's peak RSS. Soaks
shorter than two minutes use a quarter of the soak as window and its half as "first minute".

    .venv/bin/python bench/soak.py [--soak-seconds 300] [--json out.json]
"""

from __future__ import annotations

import threading
import time
from typing import Any, Generic, Self, TypeVar

import common
import load
import psycopg

SIZE_SQL = "SELECT pg_total_relation_size('outbox_events')"
BACKLOG_SQL = (
    "SELECT count(*) FROM outbox_events WHERE published_at IS NULL AND dead_lettered_at IS NULL"
)
#: What one sample of a ``Sampler`` is.
S = TypeVar("S")


class Sampler(Generic[S]):
    """Every ``interval`` seconds, in a thread, one ``sample()`` on a connection of its own,
    appended to ``samples``; subclasses say what a sample is."""

    def __init__(self, database_url: str, interval: float) -> None:
        self.samples: list[S] = []
        self._conn = psycopg.connect(database_url, autocommit=True)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> S:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self.sample())
            self._stop.wait(self._interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._conn.close()


class TableSampler(Sampler[tuple[float, int, int]]):
    """Every ``interval`` seconds: (wall time, table size in bytes, backlog)."""

    def sample(self) -> tuple[float, int, int]:
        size = self._conn.execute(SIZE_SQL).fetchone()
        backlog = self._conn.execute(BACKLOG_SQL).fetchone()
        return time.time(), int(size[0]) if size else -1, int(backlog[0]) if backlog else -1


def measure(env: common.Env, opts: common.Options) -> dict[str, Any]:
    seconds, rate = opts.soak_seconds, opts.soak_rate
    window = 30.0 if seconds >= 120 else seconds / 4
    first_minute = 60.0 if seconds >= 120 else seconds / 2
    common.progress(f"soak: {rate:,.0f} events/s for {seconds:.0f} s")
    with env.database() as url:
        with load.steady(env, url, rate, seconds) as (relay, receiver, plan):
            with (
                common.RssSampler([relay.pid], interval=0.1) as rss,
                TableSampler(url, min(10.0, seconds / 10)) as table,
            ):
                run = load.write(url, plan, receiver, relay)
                _, size_at_end, backlog_at_end = table.sample()
            arrived_all = receiver.wait_for(run.written, timeout=60)
            backlog_after = _backlog(url)
            samples, missing = run.latencies(receiver)
            relay_log = relay.log_lines()
        overall = load.summary(samples, missing, run, receiver)
    windows = []
    for start in range(int(seconds // window + (seconds % window > 0.5))):
        lo, hi = run.started + start * window, run.started + (start + 1) * window
        part = sorted(lat for committed, lat in samples if lo <= committed < hi)
        windows.append(
            {
                "from_s": start * window,
                "to_s": min(seconds, (start + 1) * window),
                "events": len(part),
                "p50_ms": common.percentile(part, 50),
                "p99_ms": common.percentile(part, 99),
            }
        )
    sizes = [(round(t - run.started, 1), size, backlog) for t, size, backlog in table.samples]
    # the sample taken closest to the end of the first minute
    after_first = min(sizes, key=lambda sample: abs(sample[0] - first_minute))[1]
    return {
        "seconds": seconds,
        "rate": rate,
        "window_s": window,
        "first_minute_s": first_minute,
        "latency": overall,
        "windows": windows,
        "table_samples": [{"t_s": t, "bytes": s, "backlog": b} for t, s, b in sizes],
        "size_after_first_minute_bytes": after_first,
        "size_at_end_bytes": size_at_end,
        "size_ratio_end_to_first_minute": common.ratio(size_at_end, after_first),
        "backlog_at_end": backlog_at_end,
        "backlog_after_drain": backlog_after,
        "all_arrived": arrived_all,
        "relay_peak_rss_mb": rss.peak_mb,
        "relay_log_lines": len(relay_log),
    }


def _backlog(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(BACKLOG_SQL).fetchone()
        return int(row[0]) if row else -1


def rows(result: dict[str, Any]) -> list[common.Row]:
    lat = result["latency"]
    out = [
        common.Row(
            "soak",
            f"{result['rate']:,.0f} events/s for {result['seconds']:.0f} s, "
            "commit to delivery p50 / p99",
            f"{lat['p50_ms']:.1f} / {lat['p99_ms']:.1f}",
            "ms",
            f"achieved {lat['achieved_rate']:,.0f}/s, {lat['written']:,} events, "
            f"{lat['missing']} missing, {lat['duplicates']} duplicates",
        ),
    ]
    for w in result["windows"]:
        out.append(
            common.Row(
                "soak",
                f"  window {w['from_s']:g}-{w['to_s']:g} s, p50 / p99",
                f"{w['p50_ms']:.1f} / {w['p99_ms']:.1f}",
                "ms",
                f"{w['events']:,} events",
            )
        )
    mb = 1024 * 1024
    out += [
        common.Row(
            "soak",
            f"outbox table size after {result['first_minute_s']:g} s",
            common.num(result["size_after_first_minute_bytes"] / mb, 1),
            "MB",
        ),
        common.Row(
            "soak",
            "outbox table size at the end",
            common.num(result["size_at_end_bytes"] / mb, 1),
            "MB",
            f"{result['size_ratio_end_to_first_minute']:.2f} of the first minute",
        ),
        common.Row(
            "soak",
            "backlog when the writers stopped",
            common.num(result["backlog_at_end"]),
            "rows",
            f"{result['backlog_after_drain']} left after the consumer had all",
        ),
    ]
    return out


def targets(result: dict[str, Any]) -> list[common.Target]:
    return [
        common.Target(
            "soak table size at end / after first minute",
            result["size_ratio_end_to_first_minute"],
            "<=",
            2.0,
        )
    ]


if __name__ == "__main__":
    common.standalone(__doc__, "soak", measure, rows, targets, single_run=True)
