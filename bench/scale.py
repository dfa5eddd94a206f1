"""Does draining scale with relays, and does it stay as fast with a big backlog?

* relays: 1, 2 and 4 relays (``--exit-when-idle``, started together) on the same backlog of
  ``--events`` events of 256 bytes;
* backlog: one relay on 10,000 rows against 1,000,000 rows (``--backlog-big``): the speed must
  not fall with the size of the table. Beside each, PostgreSQL alone claiming and deleting the
  same backlog (as in ``limits``), which shows how much the database itself slows down when the
  table outgrows its buffers. A middle backlog (``--events``, 100,000) shows the shape between:
  10,000 rows are two batches of 5,000, so that figure shows the start of a drain more than its
  steady pace. A backlog smaller than ``--events`` drains in a fraction of a second, so it is
  drained up to five times per run (each time in a fresh database, PostgreSQL alone likewise) and
  its figure is the median of all of them.

Backlogs are filled by one ``INSERT ... SELECT generate_series`` and VACUUM ANALYZEd. Every
event id is then read back from the broker. Runs interleaved. How a drain is timed:

* relays: from the first message the relays produced (its producer timestamp on the broker)
  until the last row of every key is published (polled every 10 ms: a relay publishes a key's
  rows in order, so then all are), which leaves out start-up, shard assignment before the first
  claim and shut-down;
* backlog: by the relay itself (``relay.drained``, logged when ``--exit-when-idle`` ends it):
  from the start of its first claim to the commit of its last batch. The whole drain, the first
  claim included, and nothing polls the table meanwhile (on 10,000 rows the first claim is one
  of three, and a poll every 10 ms could add up to a tenth of the drain's time).

    .venv/bin/python bench/scale.py [--events 100000] [--backlog-big 1000000] [--runs 3]
"""

from __future__ import annotations

import time
from typing import Any

import common
import limits

SIZE = 256
#: The most drains of one small backlog in one run (see :func:`samples_per_run`).
MAX_SAMPLES_PER_RUN = 5


def drain_with(env: common.Env, events: int, relays: int) -> dict[str, float]:
    with env.database() as url, env.topic() as topic:
        common.fill(url, topic, events, SIZE)
        last_ids = common.last_row_of_each_key(url)
        expected = common.event_ids(url)
        start = time.time()
        procs = [common.Relay(env, url, "--exit-when-idle") for _ in range(relays)]
        try:
            with common.RssSampler([p.pid for p in procs]) as rss:
                done = common.wait_until_published(url, last_ids, procs)
                for p in procs:
                    p.wait()
            exited = time.time()
        finally:
            for p in procs:
                p.stop()
        back = common.read_back(env.bootstrap, topic, expected)
    drain_s = done - back.first_ts
    return {
        "events_per_s": events / drain_s,
        "drain_s": drain_s,
        "start_to_published_s": done - start,
        "start_to_all_exited_s": exited - start,
        "peak_rss_mb": rss.peak_mb,
        "delivered": back.delivered,
        "duplicates": back.duplicates,
    }


def drain_timed_by_relay(env: common.Env, events: int) -> dict[str, float]:
    with env.database() as url, env.topic() as topic:
        common.fill(url, topic, events, SIZE)
        expected = common.event_ids(url)
        relay = common.Relay(env, url, "--exit-when-idle", log_level="info")
        try:
            with common.RssSampler([relay.pid]) as rss:
                relay.wait()
        finally:
            relay.stop()
        [drained] = relay.log_events("relay.drained")
        if drained["published"] != events:
            raise RuntimeError(f"the relay published {drained['published']} of {events} rows")
        back = common.read_back(env.bootstrap, topic, expected)
    return {
        "events_per_s": events / drained["seconds"],
        "drain_s": drained["seconds"],
        "peak_rss_mb": rss.peak_mb,
        "delivered": back.delivered,
        "duplicates": back.duplicates,
    }


def samples_per_run(events: int, reference: int) -> int:
    """Drains of a backlog smaller than ``reference`` rows are repeated, up to
    :data:`MAX_SAMPLES_PER_RUN` times per run, so that a drain of a tenth of a second, where one
    scheduler hiccup moves the figure by a quarter, gets a median as steady as a long one."""
    return max(1, min(MAX_SAMPLES_PER_RUN, -(-reference // events)))


def _summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    return {
        "events_per_s": common.median(r["events_per_s"] for r in runs),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "delivered": min(r["delivered"] for r in runs),
        "duplicates": sum(r["duplicates"] for r in runs),
        "runs": runs,
    }


def measure_relays(env: common.Env, opts: common.Options) -> dict[str, Any]:
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in opts.relays}
    for run in range(opts.runs):
        for n in opts.relays:
            runs[n].append(drain_with(env, opts.events, n))
            common.progress(
                f"scale run {run + 1}/{opts.runs}, {n} relay(s): "
                f"{runs[n][-1]['events_per_s']:,.0f} events/s"
            )
    out = {str(n): _summary(r) for n, r in runs.items()}
    one = out[str(opts.relays[0])]["events_per_s"]
    for n, r in out.items():
        r["ratio_to_one"] = common.ratio(r["events_per_s"], one)
        r["start_to_all_exited_s"] = common.median(
            run["start_to_all_exited_s"] for run in runs[int(n)]
        )
    return {"events": opts.events, "size": SIZE, "relays": out}


def measure_backlog(env: common.Env, opts: common.Options) -> dict[str, Any]:
    """One relay on both backlogs, each next to PostgreSQL alone claiming and deleting the same
    backlog (``limits.pg_claim``): how much of any slowdown is the database's own."""
    small, big = opts.backlog_small, opts.backlog_big
    sizes = sorted({small, opts.events, big} if small < opts.events < big else {small, big})
    runs: dict[int, list[dict[str, float]]] = {events: [] for events in sizes}
    for run in range(opts.runs):
        for events in sizes:
            for _ in range(samples_per_run(events, opts.events)):
                result = drain_timed_by_relay(env, events)
                result["pg_claim_delete_events_per_s"] = limits.pg_claim(
                    env, events, SIZE, "delete"
                )
                runs[events].append(result)
                common.progress(
                    f"backlog run {run + 1}/{opts.runs}, {events:,} rows: "
                    f"{result['events_per_s']:,.0f} events/s, PostgreSQL alone "
                    f"{result['pg_claim_delete_events_per_s']:,.0f}"
                )
    out = {str(n): _summary(r) for n, r in runs.items()}
    for n, r in out.items():
        r["pg_claim_delete_events_per_s"] = common.median(
            run["pg_claim_delete_events_per_s"] for run in runs[int(n)]
        )
    base = out[str(small)]
    for r in out.values():
        r["ratio_to_small"] = common.ratio(r["events_per_s"], base["events_per_s"])
        r["pg_ratio_to_small"] = common.ratio(
            r["pg_claim_delete_events_per_s"], base["pg_claim_delete_events_per_s"]
        )
    return {
        "size": SIZE,
        "small": small,
        "big": big,
        "backlogs": out,
        "ratio_big_to_small": out[str(big)]["ratio_to_small"],
        "pg_ratio_big_to_small": out[str(big)]["pg_ratio_to_small"],
    }


def measure(env: common.Env, opts: common.Options) -> dict[str, Any]:
    return {"relays": measure_relays(env, opts), "backlog": measure_backlog(env, opts)}


def rows(result: dict[str, Any]) -> list[common.Row]:
    out = []
    if "relays" in result:
        rel = result["relays"]
        for n, r in rel["relays"].items():
            out.append(
                common.Row(
                    "scale",
                    f"{n} relay(s), {rel['events']:,} events, first message to published",
                    common.num(r["events_per_s"]),
                    "events/s",
                    f"{r['ratio_to_one']:.2f} of 1 relay; start to all exited "
                    f"{r['start_to_all_exited_s']:.2f} s; {r['delivered']:,} on the broker",
                )
            )
    if "backlog" in result:
        b = result["backlog"]
        backlogs = b["backlogs"].items()  # smallest first
        for n, r in backlogs:
            detail = (
                f"baseline; median of {len(r['runs'])} drains"
                if int(n) == b["small"]
                else f"{r['ratio_to_small']:.2f} of the small backlog; "
                f"{r['delivered']:,} on the broker"
            )
            out.append(
                common.Row(
                    "scale",
                    f"one relay, backlog of {int(n):,} rows, first claim to last commit",
                    common.num(r["events_per_s"]),
                    "events/s",
                    detail,
                )
            )
        for n, r in backlogs:
            detail = (
                "baseline"
                if int(n) == b["small"]
                else (
                    f"{r['pg_ratio_to_small']:.2f} of the small backlog "
                    f"(the relay: {r['ratio_to_small']:.2f})"
                )
            )
            out.append(
                common.Row(
                    "scale",
                    f"PostgreSQL claim + DELETE alone, backlog of {int(n):,} rows",
                    common.num(r["pg_claim_delete_events_per_s"]),
                    "events/s",
                    detail,
                )
            )
    return out


def targets(result: dict[str, Any]) -> list[common.Target]:
    if "backlog" not in result:
        return []
    b = result["backlog"]
    return [
        common.Target(
            f"drain of {b['big']:,} rows / of {b['small']:,} rows",
            b["ratio_big_to_small"],
            ">=",
            0.9,
        )
    ]


if __name__ == "__main__":
    common.standalone(__doc__, "scale", measure, rows, targets)
