"""Commit-to-delivery latency at steady rates: 200, 2,000 and 10,000 events/s.

One relay runs (``--poll-interval 5``, so wake-ups come from NOTIFY), warmed up by one event;
writers commit events at the rate for ``--latency-seconds`` (200/s: one event a transaction;
faster: 20 a transaction, one writer process per 5,000 events/s, the commit time recorded per
transaction) and a consumer (``fetch.wait.max.ms=1``) records each event's arrival. p50 and p99
of arrival minus commit; each the median of ``--runs`` runs, the rates interleaved.

    .venv/bin/python bench/latency.py [--latency-seconds 12] [--runs 3] [--json out.json]
"""

from __future__ import annotations

from typing import Any

import common
import load


def latency_once(env: common.Env, rate: float, seconds: float) -> dict[str, Any]:
    with (
        env.database() as url,
        load.steady(env, url, rate, seconds, "--poll-interval", "5") as (relay, receiver, plan),
    ):
        with common.RssSampler([relay.pid], interval=0.1) as rss:
            run = load.write(url, plan, receiver, relay)
            receiver.wait_for(run.written, timeout=30)
        samples, missing = run.latencies(receiver)
        result = load.summary(samples, missing, run, receiver)
        result["relay_peak_rss_mb"] = rss.peak_mb
        return result


def measure(env: common.Env, opts: common.Options) -> dict[str, Any]:
    runs: dict[int, list[dict[str, Any]]] = {rate: [] for rate in opts.rates}
    for run in range(opts.runs):
        for rate in opts.rates:
            r = latency_once(env, rate, opts.latency_seconds)
            runs[rate].append(r)
            common.progress(
                f"latency run {run + 1}/{opts.runs}, {rate:,}/s: p50 {r['p50_ms']:.1f} ms, "
                f"p99 {r['p99_ms']:.1f} ms, {r['delivered']:,} events, {r['missing']} missing"
            )
    rates = {}
    for rate, results in runs.items():
        rates[str(rate)] = {
            "p50_ms": common.median(r["p50_ms"] for r in results),
            "p99_ms": common.median(r["p99_ms"] for r in results),
            "achieved_rate": common.median(r["achieved_rate"] for r in results),
            "delivered": sum(r["delivered"] for r in results),
            "missing": sum(r["missing"] for r in results),
            "relay_peak_rss_mb": max(r["relay_peak_rss_mb"] for r in results),
            "runs": results,
        }
    return {"seconds": opts.latency_seconds, "rates": rates}


def rows(result: dict[str, Any]) -> list[common.Row]:
    out = []
    for rate, r in result["rates"].items():
        r0 = r["runs"][0]
        note = (
            f"{r0['events_per_commit']} a commit, {r0['writers']} writer(s), achieved "
            f"{r['achieved_rate']:,.0f}/s, {r['delivered']:,} events, {r['missing']} missing"
        )
        out += [
            common.Row(
                "latency",
                f"commit to delivery at {int(rate):,}/s, p50",
                common.num(r["p50_ms"], 1),
                "ms",
                note,
            ),
            common.Row(
                "latency",
                f"commit to delivery at {int(rate):,}/s, p99",
                common.num(r["p99_ms"], 1),
                "ms",
            ),
        ]
    return out


def targets(result: dict[str, Any]) -> list[common.Target]:
    rates = result["rates"]
    out = []
    for rate, limit in (("200", 10), ("2000", 50)):
        value = rates[rate]["p99_ms"] if rate in rates else None
        out.append(common.Target(f"latency p99 at {int(rate):,}/s", value, "<", limit, "ms"))
    return out


if __name__ == "__main__":
    common.standalone(__doc__, "latency", measure, rows, targets)
