"""What an idle relay costs, and how soon it publishes a lone event after an idle minute.

Five relays run at once with their default settings, each on a database and a topic of its
own (so the minutes of idling overlap: 20 lone events take four rounds of five, not twenty
minutes; with ten at once, their idle ticks alone took enough of the two cores to add a few
milliseconds to the slowest lone events). Each publishes one warm-up event, then idles for
``--idle-seconds``; meanwhile this measures, per relay:

* the CPU of the relay process (all its threads, from /proc/PID/stat) and of its three
  PostgreSQL backends (the same, when the server runs on this machine), as % of one core;
* the transactions its database saw (``pg_stat_database``): what the relay sends while idle.

Then one event per relay, a second apart, committed by ``outbox.add``: commit to arrival at a
consumer (``fetch.wait.max.ms=2``, as in the latency section), p50 and p99 over all of them.
Baseline, same rounds: Kafka alone after the same idle time. One producer per relay, with the
relay's producer settings, sends one message at the start and one after the idle time, next to
its relay's lone event; hand-over to arrival at the same consumer.

    .venv/bin/python bench/idle.py [--idle-seconds 60] [--idle-events 20] [--json out.json]
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import common
import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition

import outbox
from outbox.envelope import EVENT_ID_HEADER
from outbox_relay.config import RelaySettings
from outbox_relay.kafka import producer_config

#: Relays idling at once.
RELAYS = 5
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a process and all its threads; None if it is not readable here."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


class Arrivals:
    """A consumer thread on some topics: when each event id arrived (time.time())."""

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        self.at: dict[str, float] = {}
        self._stop = threading.Event()
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": topics[0],
                "fetch.wait.max.ms": 2,
                "enable.auto.commit": False,
                **common.QUIET,
            }
        )
        self._consumer.assign(
            [TopicPartition(t, p, 0) for t in topics for p in range(common.PARTITIONS)]
        )
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            msg = self._consumer.poll(0.05)
            if msg is None or msg.error() is not None:
                continue
            arrived = time.time()
            event_id = dict(msg.headers() or []).get(EVENT_ID_HEADER)
            if event_id is not None:
                self.at.setdefault(event_id.decode(), arrived)

    def wait_for(self, event_id: str, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while event_id not in self.at:
            if time.monotonic() > deadline:
                raise TimeoutError(f"event {event_id} did not arrive within {timeout} s")
            time.sleep(0.001)
        return self.at[event_id]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._consumer.close()


def add_one(url: str, topic: str) -> tuple[str, float]:
    """One event in a transaction of its own: (its id, its commit's time)."""
    with psycopg.connect(url) as conn:
        event_id = outbox.add(conn, topic, {"lone": True}, key="idle")
        conn.commit()
        return str(event_id), time.time()


class AloneProducer:
    """Kafka alone: a producer with the relay's settings that sends one message at a time."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        settings = RelaySettings(database_url="unused", kafka_bootstrap_servers=bootstrap)
        self._producer = Producer({**producer_config(settings), **common.QUIET})
        self._topic = topic

    def send(self) -> tuple[str, float]:
        """(its event id, when it was handed over)."""
        event_id = f"alone-{time.monotonic_ns()}"
        handed_over = time.time()
        self._producer.produce(
            self._topic, b"{}", key=b"alone", headers=[(EVENT_ID_HEADER, event_id.encode())]
        )
        self._producer.poll(0)
        return event_id, handed_over

    def close(self) -> None:
        self._producer.flush(10)


def backends(server: str, database: str) -> list[int]:
    with psycopg.connect(server) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s"
            " AND application_name LIKE 'outbox-relay %%'",
            (database,),
        ).fetchall()
    return [int(r[0]) for r in rows]


def transactions(server: str, database: str) -> int:
    with psycopg.connect(server) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
            (database,),
        ).fetchone()
    return int(row[0]) if row else 0


def one_round(env: common.Env, relays: int, idle_seconds: float) -> list[dict[str, Any]]:
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(env.database()) for _ in range(relays)]
        names = [psycopg.conninfo.conninfo_to_dict(u)["dbname"] for u in urls]
        topics = stack.enter_context(env.topics(relays))
        arrivals = Arrivals(env.bootstrap, topics)
        stack.callback(arrivals.close)
        procs = [common.Relay(env, url) for url in urls]
        for proc in procs:
            stack.callback(proc.stop)
        alone = [AloneProducer(env.bootstrap, topic) for topic in topics]
        for producer in alone:
            stack.callback(producer.close)
        for url, topic, producer in zip(urls, topics, alone, strict=True):  # warm-up
            arrivals.wait_for(add_one(url, topic)[0], timeout=60)
            arrivals.wait_for(producer.send()[0], timeout=60)
        time.sleep(1.0)
        pids = [
            [proc.pid, *backends(env.server, name)] for proc, name in zip(procs, names, strict=True)
        ]
        before = [[cpu_seconds(p) for p in group] for group in pids]
        xacts = [transactions(env.server, name) for name in names]
        started = time.monotonic()
        time.sleep(idle_seconds)
        elapsed = time.monotonic() - started
        after = [[cpu_seconds(p) for p in group] for group in pids]
        xacts_after = [transactions(env.server, name) for name in names]
        results = []
        for i, (url, topic) in enumerate(zip(urls, topics, strict=True)):
            procs[i].check()
            event_id, committed = add_one(url, topic)
            latency_ms = (arrivals.wait_for(event_id) - committed) * 1000
            time.sleep(0.5)
            alone_id, handed_over = alone[i].send()
            alone_ms = (arrivals.wait_for(alone_id) - handed_over) * 1000
            used = [
                (a - b) if a is not None and b is not None else None
                for a, b in zip(after[i], before[i], strict=True)
            ]
            server = [u for u in used[1:] if u is not None]
            results.append(
                {
                    "relay_cpu_pct": 100 * (used[0] or 0.0) / elapsed,
                    "backends_cpu_pct": 100 * sum(server) / elapsed if server else None,
                    "backends": len(pids[i]) - 1,
                    "transactions_per_s": (xacts_after[i] - xacts[i]) / elapsed,
                    "idle_s": round(time.monotonic() - started, 1),
                    "lone_event_ms": latency_ms,
                    "kafka_alone_ms": alone_ms,
                }
            )
            time.sleep(1.0)  # one relay at a time: each event has the machine to itself
        return results


def measure(env: common.Env, opts: common.Options) -> dict[str, Any]:
    relays = max(1, min(RELAYS, opts.idle_events))
    rounds = math.ceil(opts.idle_events / relays)
    samples: list[dict[str, Any]] = []
    for n in range(rounds):
        samples += one_round(env, relays, opts.idle_seconds)
        common.progress(
            f"idle round {n + 1}/{rounds}: lone events "
            + ", ".join(f"{s['lone_event_ms']:.1f}" for s in samples[-relays:])
            + " ms; Kafka alone "
            + ", ".join(f"{s['kafka_alone_ms']:.1f}" for s in samples[-relays:])
            + " ms"
        )
    ordered = sorted(s["lone_event_ms"] for s in samples)
    alone = sorted(s["kafka_alone_ms"] for s in samples)
    server = [s["backends_cpu_pct"] for s in samples if s["backends_cpu_pct"] is not None]
    return {
        "idle_seconds": opts.idle_seconds,
        "relays_at_once": relays,
        "lone_event_p50_ms": common.percentile(ordered, 50),
        "lone_event_p99_ms": common.percentile(ordered, 99),
        "kafka_alone_p50_ms": common.percentile(alone, 50),
        "kafka_alone_p99_ms": common.percentile(alone, 99),
        "relay_cpu_pct": common.median(s["relay_cpu_pct"] for s in samples),
        "relay_cpu_pct_max": max(s["relay_cpu_pct"] for s in samples),
        "backends_cpu_pct": common.median(server) if server else None,
        "transactions_per_s": common.median(s["transactions_per_s"] for s in samples),
        "samples": samples,
    }


def rows(result: dict[str, Any]) -> list[common.Row]:
    n, idle = len(result["samples"]), result["idle_seconds"]
    out = [
        common.Row(
            "idle",
            f"Kafka alone, one message after {idle:.0f} s idle, p50 / p99",
            f"{result['kafka_alone_p50_ms']:.1f} / {result['kafka_alone_p99_ms']:.1f}",
            "ms",
            "baseline: a producer with the relay's settings",
        ),
        common.Row(
            "idle",
            f"lone event after {idle:.0f} s idle, commit to delivery, p50",
            common.num(result["lone_event_p50_ms"], 1),
            "ms",
            f"{n} events, {result['relays_at_once']} relays idling at once",
        ),
        common.Row(
            "idle",
            f"lone event after {idle:.0f} s idle, commit to delivery, p99",
            common.num(result["lone_event_p99_ms"], 1),
            "ms",
        ),
        common.Row(
            "idle",
            "idle relay process CPU, median (max)",
            f"{result['relay_cpu_pct']:.2f} ({result['relay_cpu_pct_max']:.2f})",
            "% of a core",
            f"over {idle:.0f} s",
        ),
        common.Row(
            "idle",
            "its 3 PostgreSQL backends' CPU, median",
            common.num(result["backends_cpu_pct"], 2)
            if result["backends_cpu_pct"] is not None
            else "n/a",
            "% of a core",
            "the wait's ticks inside PostgreSQL",
        ),
        common.Row(
            "idle",
            "transactions an idle relay sends",
            common.num(result["transactions_per_s"], 1),
            "/s",
            "pg_stat_database",
        ),
    ]
    return out


def targets(result: dict[str, Any]) -> list[common.Target]:
    return [
        common.Target(
            "lone event after an idle minute, p99", result["lone_event_p99_ms"], "<", 15, "ms"
        ),
        common.Target(
            "idle relay CPU (the process), median", result["relay_cpu_pct"], "<", 1, "% of a core"
        ),
    ]


if __name__ == "__main__":
    common.standalone(__doc__, "idle", measure, rows, targets)
