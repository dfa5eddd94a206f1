"""Commit-to-delivery latency at steady rates: 200, 2,000 and 10,000 events/s.

One relay runs (``--poll-interval 5``, so wake-ups come from its wait inside PostgreSQL, not
the poll), warmed up by one event;
writers commit events at the rate for ``--latency-seconds`` (200/s: one event a transaction;
faster: 20 a transaction, one writer process per 5,000 events/s, the commit time recorded per
transaction) and a consumer (``fetch.wait.max.ms=1``) records each event's arrival. p50 and p99
of arrival minus commit; each the median of ``--runs`` runs, the rates interleaved.

Baseline, same run, at the rates written one event a commit (200/s): Kafka alone. The same
events at the same rate, each handed straight to a producer with the relay's settings and
flushed (no database, no relay), read by the same consumer: arrival minus hand-over. What the
relay adds above it is the commit, the wake-up, the claim and the relay's own work. At the
faster rates there is no like-for-like baseline: the relay sends whatever committed since its
last batch as one batch, while a producer sending the writers' groups of 20 as they come makes
many more, smaller record batches, and Tansu's fetches slow down with the number of batches a
partition holds (measured on 50,000-event topics, before they rotated every 3 s: Kafka alone
then had p99 of 0.2 s at 2,000/s and 7 s at 10,000/s, far behind the relay), which would
measure Tansu's quirk rather than a floor.

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


def kafka_alone_once(env: common.Env, rate: float, seconds: float) -> dict[str, Any]:
    with env.topics(load.Plan.topics_needed(rate, seconds)) as topics:
        plan = load.Plan(rate, seconds, topics)
        with load.Receiver(env.bootstrap, plan, load.capacity(rate, seconds)) as receiver:
            run = load.produce(env.bootstrap, plan, receiver)
            receiver.wait_for(run.written, timeout=30)
        samples, missing = run.latencies(receiver)
        return load.summary(samples, missing, run, receiver)


def _median_of(results: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "p50_ms": common.median(r["p50_ms"] for r in results),
        "p99_ms": common.median(r["p99_ms"] for r in results),
        "achieved_rate": common.median(r["achieved_rate"] for r in results),
        "delivered": sum(r["delivered"] for r in results),
        "missing": sum(r["missing"] for r in results),
        "runs": results,
    }


def measure(env: common.Env, opts: common.Options) -> dict[str, Any]:
    runs: dict[int, list[dict[str, Any]]] = {rate: [] for rate in opts.rates}
    alone: dict[int, list[dict[str, Any]]] = {rate: [] for rate in opts.rates}
    for run in range(opts.runs):
        for rate in opts.rates:
            r = latency_once(env, rate, opts.latency_seconds)
            runs[rate].append(r)
            line = (
                f"latency run {run + 1}/{opts.runs}, {rate:,}/s: p50 {r['p50_ms']:.1f} ms, "
                f"p99 {r['p99_ms']:.1f} ms, {r['delivered']:,} events, {r['missing']} missing"
            )
            if load.shape(rate)[1] == 1:
                k = kafka_alone_once(env, rate, opts.latency_seconds)
                alone[rate].append(k)
                line += f"; Kafka alone p50 {k['p50_ms']:.1f} ms, p99 {k['p99_ms']:.1f} ms"
            common.progress(line)
    rates = {}
    for rate, results in runs.items():
        rates[str(rate)] = {
            **_median_of(results),
            "relay_peak_rss_mb": max(r["relay_peak_rss_mb"] for r in results),
        }
        if alone[rate]:
            rates[str(rate)]["kafka_alone"] = _median_of(alone[rate])
    return {"seconds": opts.latency_seconds, "rates": rates}


def rows(result: dict[str, Any]) -> list[common.Row]:
    out = []
    for rate, r in result["rates"].items():
        r0, alone = r["runs"][0], r.get("kafka_alone")
        note = (
            f"{r0['events_per_commit']} a commit, {r0['writers']} writer(s), achieved "
            f"{r['achieved_rate']:,.0f}/s, {r['delivered']:,} events, {r['missing']} missing"
        )
        label = f"{int(rate):,}/s"
        for p in ("p50", "p99"):
            if alone is not None:
                out.append(
                    common.Row(
                        "latency",
                        f"Kafka alone, producer to consumer at {label}, {p}",
                        common.num(alone[f"{p}_ms"], 1),
                        "ms",
                        "baseline" + (f", {alone['missing']} missing" if p == "p50" else ""),
                    )
                )
            extra = f"+{r[f'{p}_ms'] - alone[f'{p}_ms']:.1f} ms over Kafka alone" if alone else ""
            out.append(
                common.Row(
                    "latency",
                    f"commit to delivery at {label}, {p}",
                    common.num(r[f"{p}_ms"], 1),
                    "ms",
                    ", ".join(x for x in (note if p == "p50" else "", extra) if x),
                )
            )
    return out


def targets(result: dict[str, Any]) -> list[common.Target]:
    rates = result["rates"]
    out = []
    for rate, limit in (("200", 10), ("2000", 20)):
        value = rates[rate]["p99_ms"] if rate in rates else None
        out.append(common.Target(f"latency p99 at {int(rate):,}/s", value, "<", limit, "ms"))
    return out


if __name__ == "__main__":
    common.standalone(__doc__, "latency", measure, rows, targets)
