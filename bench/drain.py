"""How fast does one relay drain a backlog, next to the limits measured in the same run, and
what does keeping published events (``--retention``) cost the drain?

For each payload size (256 B and 1 KiB), runs are interleaved (raw producer, PostgreSQL claim +
DELETE, claim + move, claim + UPDATE, then the relay draining the backlog twice: deleting on
publish, and with ``--drain-retention`` (3600 s), in turn first; again), so drift hits
baselines and relay alike, and the retention's cost is a ratio of two drains of the same run.

* drain: ``python -m outbox_relay run --exit-when-idle`` on a backlog of ``--events``
  events (keys over 1,000 keys): the process's wall time minus that of the same command on the
  then empty outbox (start-up and shut-down), so the figure times the work from the first claim
  to the last commit; beside it the relay's own ``relay.drained`` figure (first claim to last
  commit). The same command runs once on the empty outbox before the backlog is written, so
  what a relay does once rather than per drain is not in the timed run: with a retention, the
  partitions made ahead of need (its wall time is shown as the first start). Afterwards every
  event id is read back from the broker, and with a retention every row must be in a range
  partition of the table of published events (none left in the outbox, none in the default
  partition; before migration 0008: every row marked in place);
* memory: the relay process's peak RSS during the drain (VmRSS, sampled every 10 ms);
* the relay's warnings and errors during the drains are counted (its log at info level).

    .venv/bin/python bench/drain.py [--events 100000] [--runs 3] [--drain-retention 3600]
        [--json out.json]
"""

from __future__ import annotations

import time
from typing import Any

import common
import limits
import psycopg

from outbox import testing

#: Where the rows of a drain ended: still in the outbox (published in place or not), in the
#: table of published events, in its default partition (None: no such table).
WHERE_ROWS = {
    "outbox_unpublished": "SELECT count(*) FROM outbox_events WHERE published_at IS NULL",
    "outbox_published": "SELECT count(*) FROM outbox_events WHERE published_at IS NOT NULL",
}
WHERE_PUBLISHED = {
    "published_table": "SELECT count(*) FROM outbox_published",
    "published_default": "SELECT count(*) FROM outbox_published_default",
}


def where_rows(database_url: str) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    with psycopg.connect(database_url) as conn:
        queries = WHERE_ROWS | (WHERE_PUBLISHED if common.published_table(conn) else {})
        for name, sql in queries.items():
            row = conn.execute(sql).fetchone()
            out[name] = int(row[0]) if row else None
    for name in WHERE_PUBLISHED:
        out.setdefault(name, None)
    return out


def run_to_exit(env: common.Env, database_url: str, *extra: str) -> dict[str, Any]:
    """One relay with ``--exit-when-idle``, logging at info, until it exits: wall seconds,
    peak RSS, its own drain figure and its warnings and errors."""
    start = time.perf_counter()
    relay = common.Relay(env, database_url, "--exit-when-idle", *extra, log_level="info")
    try:
        with common.RssSampler([relay.pid]) as rss:
            relay.wait()
        wall = time.perf_counter() - start
    finally:
        relay.stop()
    drained = relay.log_events("relay.drained")
    complaints = [
        line
        for line in testing.log_events(relay.log_text())
        if line.get("level") in ("warning", "error", "critical")
    ]
    return {
        "wall_s": wall,
        "peak_rss_mb": rss.peak_mb,
        "relay_events_per_s": (drained[-1].get("events_per_s") if drained else None),
        "complaints": [f"{c.get('level')}: {c.get('event')}" for c in complaints],
    }


def drain_once(env: common.Env, events: int, size: int, retention: float = 0) -> dict[str, Any]:
    extra = ("--retention", f"{retention:g}") if retention else ()
    with env.database() as url, env.topic() as topic:
        # The same command once on the empty outbox first: what a relay does once, not per
        # drain, is done before the timed one (with a retention, the partitions made ahead
        # for the next four spans, which a running relay has made long before a backlog).
        first = run_to_exit(env, url, *extra)
        common.fill(url, topic, events, size)
        expected = common.event_ids(url)
        run = run_to_exit(env, url, *extra)
        back = common.read_back(env.bootstrap, topic, expected)  # every event arrived
        where = where_rows(url)
        idle = run_to_exit(env, url, *extra)  # nothing left: the fixed costs
    wall, overhead = run["wall_s"], idle["wall_s"]
    if retention and where["published_table"] is not None:
        misplaced = where["published_table"] != events or where["published_default"] != 0
    else:
        misplaced = where["outbox_published"] != (events if retention else 0)
    if where["outbox_unpublished"] or misplaced:
        raise RuntimeError(f"drain with --retention {retention:g}: rows left as {where}")
    relay_rate = run["relay_events_per_s"]
    return {
        # A backlog so small that start-up noise exceeds the work has no figure, not a negative one.
        "events_per_s": events / (wall - overhead) if wall > overhead else float("nan"),
        "wall_events_per_s": events / wall,
        "relay_events_per_s": float("nan") if relay_rate is None else float(relay_rate),
        "broker_span_events_per_s": events / back.span if back.span > 0 else float("nan"),
        "wall_s": wall,
        "overhead_s": overhead,
        "first_start_s": first["wall_s"],
        "peak_rss_mb": max(run["peak_rss_mb"], idle["peak_rss_mb"]),
        "delivered": back.delivered,
        "duplicates": back.duplicates,
        "rows": where,
        "complaints": first["complaints"] + run["complaints"] + idle["complaints"],
    }


def summarise_drains(runs: list[dict[str, Any]], base: dict[str, Any]) -> dict[str, Any]:
    rate = common.median(r["events_per_s"] for r in runs)
    return {
        "events_per_s": rate,
        "wall_events_per_s": common.median(r["wall_events_per_s"] for r in runs),
        "relay_events_per_s": common.median(r["relay_events_per_s"] for r in runs),
        "broker_span_events_per_s": common.median(r["broker_span_events_per_s"] for r in runs),
        "overhead_s": common.median(r["overhead_s"] for r in runs),
        "first_start_s": common.median(r["first_start_s"] for r in runs),
        "ratio_to_lower_limit": common.ratio(rate, base["lower_limit_events_per_s"]),
        "ratio_to_raw_producer": common.ratio(rate, base["raw_producer_events_per_s"]),
        "ratio_to_pg_claim_delete": common.ratio(rate, base["pg_claim_delete_events_per_s"]),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "delivered": min(r["delivered"] for r in runs),
        "duplicates": sum(r["duplicates"] for r in runs),
        "complaints": sorted({c for r in runs for c in r["complaints"]}),
        "runs": runs,
    }


def measure(env: common.Env, opts: common.Options) -> dict[str, Any]:
    """Limits and drains, interleaved: {"limits": ..., "drain": ...}."""
    retention = opts.drain_retention
    baseline: dict[int, list[dict[str, float]]] = {size: [] for size in opts.sizes}
    relay: dict[int, list[dict[str, Any]]] = {size: [] for size in opts.sizes}
    kept: dict[int, list[dict[str, Any]]] = {size: [] for size in opts.sizes}
    for run in range(opts.runs):
        for size in opts.sizes:
            baseline[size].append(limits.measure_once(env, opts.events, size))
            # in turn first, so that neither drain always follows the limits' databases
            order = [False, True] if run % 2 == 0 else [True, False]
            for keep in order if retention else [False]:
                if keep:
                    kept[size].append(drain_once(env, opts.events, size, retention))
                else:
                    relay[size].append(drain_once(env, opts.events, size))
            b, r = baseline[size][-1], relay[size][-1]
            k = f", --retention {kept[size][-1]['events_per_s']:,.0f}/s" if retention else ""
            common.progress(
                f"drain run {run + 1}/{opts.runs}, {size} B: relay {r['events_per_s']:,.0f}/s{k}, "
                f"raw {b['raw_producer']:,.0f}/s, claim+DELETE {b['pg_claim_delete']:,.0f}/s, "
                f"claim+move {b['pg_claim_move']:,.0f}/s, "
                f"claim+UPDATE {b['pg_claim_update']:,.0f}/s"
            )
    lim = limits.summarise(baseline, opts.events) | {"claim": limits.claim_retained(env, opts)}
    sizes = {}
    for size, runs in relay.items():
        base = lim["sizes"][str(size)]
        sizes[str(size)] = summarise_drains(runs, base)
        if retention:
            with_retention = summarise_drains(kept[size], base)
            # each run's ratio between its two drains, then the median
            with_retention["ratio_to_delete"] = common.median(
                common.ratio(k["events_per_s"], r["events_per_s"])
                for k, r in zip(kept[size], runs, strict=True)
            )
            with_retention["relay_ratio_to_delete"] = common.median(
                common.ratio(k["relay_events_per_s"], r["relay_events_per_s"])
                for k, r in zip(kept[size], runs, strict=True)
            )
            with_retention["ratio_to_pg_claim_move"] = common.ratio(
                with_retention["events_per_s"], base["pg_claim_move_events_per_s"]
            )
            sizes[str(size)]["retention"] = with_retention
    drain = {"events": opts.events, "retention_s": retention, "sizes": sizes}
    return {"limits": lim, "drain": drain}


def rows(result: dict[str, Any]) -> list[common.Row]:
    out = []
    for size, r in result["sizes"].items():
        label = limits.size_label(size)
        out += [
            common.Row(
                "drain",
                f"one relay, {label} (wall minus start-up/shut-down)",
                common.num(r["events_per_s"]),
                "events/s",
                f"{r['ratio_to_lower_limit']:.2f} of lower limit, "
                f"{r['ratio_to_raw_producer']:.2f} of raw, "
                f"{r['ratio_to_pg_claim_delete']:.2f} of claim+DELETE",
            ),
            common.Row(
                "drain",
                f"one relay, {label}, whole process wall time",
                common.num(r["wall_events_per_s"]),
                "events/s",
                f"start-up + shut-down {r['overhead_s']:.2f} s "
                f"(first start {r['first_start_s']:.2f} s); "
                f"relay.drained {common.num(r['relay_events_per_s'])}/s",
            ),
        ]
        k = r.get("retention")
        if k:
            out += [
                common.Row(
                    "drain",
                    f"one relay, {label}, --retention {result['retention_s']:g}",
                    common.num(k["events_per_s"]),
                    "events/s",
                    f"{k['ratio_to_delete']:.2f} of deleting on publish (same runs), "
                    f"{common.num(k['ratio_to_pg_claim_move'], 2)} of claim+move",
                ),
                common.Row(
                    "drain",
                    f"one relay, {label}, --retention {result['retention_s']:g}, whole process",
                    common.num(k["wall_events_per_s"]),
                    "events/s",
                    f"start-up + shut-down {k['overhead_s']:.2f} s "
                    f"(first start {k['first_start_s']:.2f} s)",
                ),
                common.Row(
                    "drain",
                    f"one relay, {label}, --retention {result['retention_s']:g}, relay.drained",
                    common.num(k["relay_events_per_s"]),
                    "events/s",
                    f"{k['relay_ratio_to_delete']:.2f} of deleting on publish "
                    f"({common.num(r['relay_events_per_s'])}/s)",
                ),
            ]
        complaints = sorted({*r["complaints"], *(k["complaints"] if k else [])})
        out.append(
            common.Row(
                "drain",
                f"every event on the broker, {label}",
                common.num(r["delivered"]) + (f" / {common.num(k['delivered'])}" if k else ""),
                "events",
                f"{r['duplicates'] + (k['duplicates'] if k else 0)} duplicates over all runs; "
                f"relay warnings: {', '.join(complaints) or 'none'}",
            )
        )
    return out


def targets(result: dict[str, Any]) -> list[common.Target]:
    out = []
    for size, r in result["sizes"].items():
        label = limits.size_label(size)
        out += [
            common.Target(f"drain {label} / lower limit", r["ratio_to_lower_limit"], ">=", 0.5),
            common.Target(
                f"drain {label} / lower limit (stretch)",
                r["ratio_to_lower_limit"],
                ">=",
                0.7,
                stretch=True,
            ),
        ]
        if r.get("retention"):
            out.append(
                common.Target(
                    f"drain {label} with --retention / deleting on publish",
                    r["retention"]["ratio_to_delete"],
                    ">=",
                    0.8,
                )
            )
    if "256" in result["sizes"]:
        out.append(
            common.Target(
                "drain 256 B", result["sizes"]["256"]["events_per_s"], ">=", 37_000, "events/s"
            )
        )
    return out


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_option_arguments(parser)
    args = parser.parse_args()
    opts = common.options_from(args)
    with common.servers() as env:
        result = measure(env, opts)
    found = targets(result["drain"])
    table = limits.rows(result["limits"]) + rows(result["drain"]) + common.target_rows(found)
    common.print_table(f"drain: median of {opts.runs} runs", table)
    if args.json_path:
        common.write_json(args.json_path, result | {"targets": [t.as_dict() for t in found]})


if __name__ == "__main__":
    main()
