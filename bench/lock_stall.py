"""What a lock on one old published row costs the events committed while it is held.

One relay runs with ``--retention 3``, so its purge deletes rows 3 s after they are published. A
writer commits 10 events/s, one per transaction, each timed from its commit to its arrival at a
consumer. First 10 s with no lock (the baseline), then 20 s while another session holds
``SELECT ... FOR SHARE`` on a row published in the last second (the purge reaches it 3 s on), as
an operator's open transaction, an audit job or a foreign key to outbox rows does. Reported
per phase: p50 and p99 commit-to-arrival, and the relay's ``database.unavailable`` lines.

    .venv/bin/python bench/lock_stall.py [--json out.json]
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import common
import idle
import psycopg

#: Events per second the writer commits, and the seconds of each phase.
RATE = 10.0
BASELINE_S, LOCKED_S = 10.0, 20.0


def write_for(url: str, topic: str, seconds: float) -> list[tuple[str, float]]:
    """Events at ``RATE`` for ``seconds``: (event id, commit time) of each."""
    written = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        written.append(idle.add_one(url, topic))
        time.sleep(1 / RATE)
    return written


@contextlib.contextmanager
def lock_held(url: str) -> Iterator[None]:
    """``FOR SHARE`` on the oldest published row, held for the block."""
    with psycopg.connect(url) as holder:
        # Published in the last second, so the purge's cursor has not passed it: the purge
        # reaches it within the retention plus a pass.
        holder.execute(
            "SELECT id FROM outbox_events WHERE published_at > now() - interval '1 second'"
            " ORDER BY id LIMIT 1 FOR SHARE"
        )
        yield
        holder.rollback()


def latencies(arrivals: idle.Arrivals, written: list[tuple[str, float]]) -> list[float]:
    return sorted(1000 * (arrivals.wait_for(eid, timeout=120) - at) for eid, at in written)


def measure(env: common.Env, opts: common.Options) -> dict[str, Any]:
    del opts
    with env.database() as url, env.topic() as topic:
        relay = common.Relay(env, url, "--retention", "3", log_level="info")
        arrivals = idle.Arrivals(env.bootstrap, [topic])
        try:
            arrivals.wait_for(idle.add_one(url, topic)[0], timeout=60)  # the relay is up
            common.progress("lock stall: baseline")
            baseline = write_for(url, topic, BASELINE_S)
            common.progress("lock stall: a FOR SHARE lock on a row the purge is about to reach")
            with lock_held(url):
                locked = write_for(url, topic, LOCKED_S)
            result = {
                "baseline_ms": latencies(arrivals, baseline),
                "locked_ms": latencies(arrivals, locked),
            }
        finally:
            arrivals.close()
            relay.proc.terminate()
            relay.proc.wait(30)
        result["outages"] = len(relay.log_events("database.unavailable"))
    return result


def rows(result: dict[str, Any]) -> list[common.Row]:
    out = []
    for phase, label in (("baseline_ms", "no lock"), ("locked_ms", "lock held 20 s")):
        for p in (50, 99):
            value = common.percentile(result[phase], p)
            base = common.percentile(result["baseline_ms"], p)
            note = "baseline" if phase == "baseline_ms" else f"{value / base:,.1f}x no lock"
            out.append(common.Row("lock stall", f"{label}: p{p}", common.num(value, 1), "ms", note))
    out.append(
        common.Row("lock stall", "database.unavailable lines", str(result["outages"]), "", "")
    )
    return out


def main() -> None:
    common.standalone(__doc__, "lock stall", measure, rows, single_run=True)


if __name__ == "__main__":
    main()
