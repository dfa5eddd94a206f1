"""How fast does one relay drain a backlog, next to the limits measured in the same run?

For each payload size (256 B and 1 KiB), runs are interleaved (raw producer, PostgreSQL claim +
DELETE, claim + UPDATE, relay drain; again), so drift hits baseline and relay alike.

* drain: ``python -m outbox_relay run --exit-when-idle`` on a backlog of ``--events``
  events (keys over 1,000 keys): the process's wall time minus that of the same command on the
  then empty outbox (start-up and shut-down), so the figure times the work from the first claim
  to the last commit. Afterwards every event id is read back from the broker;
* memory: the relay process's peak RSS during the drain (VmRSS, sampled every 10 ms).

    .venv/bin/python bench/drain.py [--events 100000] [--runs 3] [--json out.json]
"""

from __future__ import annotations

from typing import Any

import common
import limits


def drain_once(env: common.Env, events: int, size: int) -> dict[str, float]:
    with env.database() as url, env.topic() as topic:
        common.fill(url, topic, events, size)
        expected = common.event_ids(url)
        wall, peak_rss_mb = common.run_relays_to_exit(env, url, 1)
        back = common.read_back(env.bootstrap, topic, expected)  # every event arrived
        overhead, _ = common.run_relays_to_exit(env, url, 1)  # nothing left: the fixed costs
    return {
        # A backlog so small that start-up noise exceeds the work has no figure, not a negative one.
        "events_per_s": events / (wall - overhead) if wall > overhead else float("nan"),
        "wall_events_per_s": events / wall,
        "broker_span_events_per_s": events / back.span if back.span > 0 else float("nan"),
        "wall_s": wall,
        "overhead_s": overhead,
        "peak_rss_mb": peak_rss_mb,
        "delivered": back.delivered,
        "duplicates": back.duplicates,
    }


def measure(env: common.Env, opts: common.Options) -> dict[str, Any]:
    """Limits and drains, interleaved: {"limits": ..., "drain": ...}."""
    baseline: dict[int, list[dict[str, float]]] = {size: [] for size in opts.sizes}
    relay: dict[int, list[dict[str, float]]] = {size: [] for size in opts.sizes}
    for run in range(opts.runs):
        for size in opts.sizes:
            baseline[size].append(limits.measure_once(env, opts.events, size))
            relay[size].append(drain_once(env, opts.events, size))
            b, r = baseline[size][-1], relay[size][-1]
            common.progress(
                f"drain run {run + 1}/{opts.runs}, {size} B: relay {r['events_per_s']:,.0f}/s, "
                f"raw {b['raw_producer']:,.0f}/s, claim+DELETE {b['pg_claim_delete']:,.0f}/s, "
                f"claim+UPDATE {b['pg_claim_update']:,.0f}/s"
            )
    lim = limits.summarise(baseline, opts.events)
    sizes = {}
    for size, runs in relay.items():
        base = lim["sizes"][str(size)]
        rate = common.median(r["events_per_s"] for r in runs)
        sizes[str(size)] = {
            "events_per_s": rate,
            "wall_events_per_s": common.median(r["wall_events_per_s"] for r in runs),
            "broker_span_events_per_s": common.median(r["broker_span_events_per_s"] for r in runs),
            "overhead_s": common.median(r["overhead_s"] for r in runs),
            "ratio_to_lower_limit": common.ratio(rate, base["lower_limit_events_per_s"]),
            "ratio_to_raw_producer": common.ratio(rate, base["raw_producer_events_per_s"]),
            "ratio_to_pg_claim_delete": common.ratio(rate, base["pg_claim_delete_events_per_s"]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "delivered": min(r["delivered"] for r in runs),
            "duplicates": sum(r["duplicates"] for r in runs),
            "runs": runs,
        }
    return {"limits": lim, "drain": {"events": opts.events, "sizes": sizes}}


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
                f"start-up + shut-down {r['overhead_s']:.2f} s",
            ),
            common.Row(
                "drain",
                f"every event on the broker, {label}",
                common.num(r["delivered"]),
                "events",
                f"{r['duplicates']} duplicates over all runs",
            ),
        ]
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
