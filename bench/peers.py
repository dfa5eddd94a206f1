"""The relay beside Debezium, in the same run, on the same servers and the same events.

Debezium: its PostgreSQL connector (pgoutput, a replication slot and a publication) with the
Outbox Event Router, in Kafka Connect standalone (``bench/debezium.py``), reading Debezium's
conventional outbox table in a database of its own. The relay: ``outbox-relay run`` on the
relay's outbox (the migrations' schema) in another database. One PostgreSQL for both, with
``wal_level=logical`` (which Debezium needs; the relay does not, and writes a little more WAL
for it here than the other sections' servers do); one Apache Kafka broker (KRaft, one node).
The same events for both: payloads of 256 B, keys over 1,000 keys, topics of 3 partitions.

* drain: a backlog of ``--events`` events (100,000), written in transactions of 100 while
  nothing reads it (plain inserts in Debezium's table: a backlog must stay in the WAL; the
  slot exists before the first insert, so the connector, started without a snapshot, streams
  them all), then the relay or the Connect worker is started and a consumer records when each
  event arrives. events/s from the first arrival to the last (start-up left out: the JVM's
  start takes seconds); also from the process's start;
* latency: writers commit at 200 and 2,000 events/s for ``--latency-seconds`` each (as the
  latency section's: one event a transaction at 200/s, 20 at 2,000/s); Debezium's writers
  insert and delete each event in one transaction, its documented pattern; the consumer
  measures commit to arrival. One process (relay, Connect worker) serves both rates, warmed up
  by one event first. Debezium's ``poll.interval.ms`` is 5 ms (default 500) and its producer
  does not linger, as the relay's: both tuned for latency;
* CPU: utime + stime from /proc of the relay process and of the Connect JVM over each
  measurement (the drain's from the process's start: start-up included; the latency runs' from
  after the warm-up to the last arrival), per 1,000 events; PostgreSQL's the same, summed over
  all its processes (writers' backends included, so it is the database's whole cost of the
  events under each); peak RSS of the relay and of the JVM over all their runs;
* brokers: the relay's drain and its p99 at 200/s on Apache Kafka and on the suite's broker
  (Tansu, or the one named by OUTBOX_TEST_KAFKA_BOOTSTRAP), each against Kafka alone there:
  the raw producer (``limits.raw_producer``) and producer to consumer at 200/s
  (``latency.kafka_alone_once``).

Needs Java 17+ and Maven (for the jars, fetched once from Maven Central); without them the
section is skipped. Each figure is the median of ``--runs`` runs.

    .venv/bin/python bench/peers.py [--events 100000] [--latency-seconds 12] [--runs 3]
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import common
import debezium
import latency
import limits
import load
import psycopg

import outbox
from outbox import apache_kafka, migrator, testing
from outbox.settings import OutboxSettings

RATES = (200, 2_000)
SIZE = load.SIZE
#: Events a transaction while the drain's backlog is written: many small transactions, as an
#: application writes them (one huge one would be decoded by PostgreSQL in one piece).
BACKLOG_PER_COMMIT = 100
#: A JVM starting on two busy cores: time for the Connect worker's first event.
START_TIMEOUT = 180.0
SYSTEMS = ("relay", "debezium")
LATENCY_FIGURES = (
    *("p50_ms", "p99_ms", "p999_ms", "max_ms", "achieved_rate"),
    *("cpu_s_per_1000", "pg_cpu_s_per_1000"),
)


class Process(Protocol):
    @property
    def pid(self) -> int: ...

    def check(self) -> None: ...

    def stop(self, timeout: float = 30) -> None: ...


@dataclass
class Servers:
    pg: debezium.LogicalPostgres
    apache: common.Env  # the logical PostgreSQL and Apache Kafka
    embedded: common.Env  # the logical PostgreSQL and the suite's broker


# --- the two systems, behind one face ----------------------------------------------------------


@dataclass
class Peer:
    """What differs between the relay and Debezium: their table, writers and process."""

    name: str
    env: common.Env
    pg: debezium.LogicalPostgres

    def database(self) -> contextlib.AbstractContextManager[str]:
        if self.name == "relay":
            return self.env.database()
        return debezium.outbox_database(self.pg.url)

    def write_backlog(self, url: str, topic: str, events: int) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            for first in range(0, events, BACKLOG_PER_COMMIT):
                count = min(BACKLOG_PER_COMMIT, events - first)
                if self.name == "relay":
                    common.insert_rows(conn, topic, count, SIZE, first=first)
                else:
                    debezium.insert_rows(conn, topic, count, SIZE, first=first, delete=False)
            # Settled, as common.fill leaves the relay's table: the measured run neither
            # analyses nor writes out the backlog's pages.
            conn.execute("VACUUM ANALYZE")
            conn.execute("CHECKPOINT")

    def start(self, url: str) -> Process:
        if self.name == "relay":
            return common.Relay(self.env, url, "--poll-interval", "5")
        directory = self.env.logs / f"connect-{time.monotonic_ns()}"
        return debezium.ConnectStandalone(directory, self.env.bootstrap, url, self.pg.port)

    def warm_up(self, url: str, topic: str) -> None:
        if self.name == "relay":
            with psycopg.connect(url) as conn:
                outbox.add(conn, topic, load.WARMUP, key="warm-up")
                conn.commit()
        else:
            debezium.warm_up(url, topic, load.WARMUP)

    @property
    def writer(self) -> Callable[..., None]:
        return load._writer if self.name == "relay" else _debezium_writer


def _debezium_writer(
    database_url: str,
    topics: list[str],
    rotate_s: float,
    rate: float,
    seconds: float,
    per_commit: int,
    index: int,
    writers: int,
    start_at: float,
    out: Connection,
) -> None:
    """``load._writer`` for Debezium's table: the same events, each transaction inserting and
    deleting its events; sends back the commit times."""
    with psycopg.connect(database_url) as conn:

        def commit(first: int) -> float:
            topic = topics[load.topic_index(start_at, rotate_s, len(topics), time.time())]
            debezium.insert_rows(conn, topic, per_commit, SIZE, first=first, step=writers)
            conn.commit()
            return time.time()

        commits = load._paced(rate, seconds, per_commit, index, writers, start_at, commit)
    out.send_bytes(commits.tobytes())
    out.close()


# --- servers -----------------------------------------------------------------------------------


@contextlib.contextmanager
def servers(env: common.Env) -> Iterator[Servers]:
    """A PostgreSQL decoding its WAL with a template database of the relay's schema, and one
    Apache Kafka node; the suite's broker beside it."""
    debezium.jars()  # fetched (once) before anything is timed
    with (
        tempfile.TemporaryDirectory(prefix="outbox-peers-") as tmp,
        debezium.logical_postgres(Path(tmp)) as pg,
        apache_kafka.cluster(1, Path(tmp) / "kafka") as kafka,
    ):
        template = testing.unique_name("peers_tmpl")
        url = testing.create_database(pg.url, template)
        try:
            with psycopg.connect(url) as conn:
                migrator.apply(conn, OutboxSettings())
            yield Servers(
                pg,
                common.Env(pg.url, kafka.bootstrap, template, env.logs),
                common.Env(pg.url, env.bootstrap, template, env.logs),
            )
        finally:
            testing.drop_database(pg.url, template)


# --- drain -------------------------------------------------------------------------------------


def _wait_for(receiver: load.Receiver, count: int, process: Process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while receiver.count < count:
        process.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{receiver.count} of {count} events arrived in {timeout:.0f} s")
        time.sleep(0.02)


def drain_once(peer: Peer, events: int) -> dict[str, float]:
    """The backlog written first, then the process started; until every event arrived."""
    with peer.database() as url, peer.env.topic() as topic:
        peer.write_backlog(url, topic, events)
        with load.Receiver(peer.env.bootstrap, load.Plan(1, 1, [topic]), events) as receiver:
            pg_before = peer.pg.cpu_seconds()
            started = time.time()
            process = peer.start(url)
            try:
                with common.RssSampler([process.pid], interval=0.05) as rss:
                    _wait_for(receiver, events, process, START_TIMEOUT + events / 1000)
                done = time.time()
                cpu = debezium.cpu_seconds(process.pid)
                pg_cpu = peer.pg.cpu_seconds() - pg_before
            finally:
                process.stop()
        first, last = min(receiver.arrived), max(receiver.arrived)
    return {
        "events_per_s": events / (last - first) if last > first else float("nan"),
        "wall_events_per_s": events / (done - started),
        "first_event_after_s": first - started,
        "cpu_s_per_1000": 1000 * cpu / events,
        "pg_cpu_s_per_1000": 1000 * pg_cpu / events,
        "peak_rss_mb": rss.peak_mb,
        "duplicates": receiver.duplicates,
    }


# --- latency -----------------------------------------------------------------------------------


def _warm(peer: Peer, url: str, topic: str, receiver: load.Receiver, process: Process) -> None:
    peer.warm_up(url, topic)
    deadline = time.monotonic() + START_TIMEOUT
    while not receiver.warm.wait(0.1):
        process.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{peer.name}: the warm-up event did not arrive")


def steady_once(
    peer: Peer, url: str, process: Process, rate: float, seconds: float, topics: list[str]
) -> dict[str, Any]:
    """Writers at ``rate`` for ``seconds`` through a running process: latency and CPU."""
    plan = load.Plan(rate, seconds, topics)
    with load.Receiver(peer.env.bootstrap, plan, load.capacity(rate, seconds)) as receiver:
        _warm(peer, url, topics[0], receiver, process)
        cpu_before, pg_before = debezium.cpu_seconds(process.pid), peer.pg.cpu_seconds()
        run = load._run_writers(peer.writer, url, plan, receiver, process.check)
        receiver.wait_for(run.written, timeout=30)
        cpu = debezium.cpu_seconds(process.pid) - cpu_before
        pg_cpu = peer.pg.cpu_seconds() - pg_before
    samples, missing = run.latencies(receiver)
    result = load.summary(samples, missing, run, receiver)
    delivered = max(1, result["delivered"])
    result["cpu_s_per_1000"] = 1000 * cpu / delivered
    result["pg_cpu_s_per_1000"] = 1000 * pg_cpu / delivered
    return result


def latency_once(peer: Peer, rates: tuple[int, ...], seconds: float) -> dict[str, Any]:
    """One process, the rates one after the other, each on topics of its own."""
    needed = [load.Plan.topics_needed(rate, seconds) for rate in rates]
    with peer.database() as url, peer.env.topics(sum(needed)) as topics:
        process = peer.start(url)
        try:
            with common.RssSampler([process.pid], interval=0.1) as rss:
                out: dict[str, Any] = {}
                for n, rate in enumerate(rates):
                    mine = topics[sum(needed[:n]) : sum(needed[: n + 1])]
                    out[str(rate)] = steady_once(peer, url, process, rate, seconds, mine)
            process.check()
        finally:
            process.stop()
    out["peak_rss_mb"] = rss.peak_mb
    return out


# --- the section -------------------------------------------------------------------------------


def one_run(found: Servers, opts: common.Options, rates: tuple[int, ...], n: int) -> dict[str, Any]:
    """Drains, then steady loads, then Kafka alone. Figures compared with each other are taken
    next to each other (the relay on each broker back to back), and the relay and Debezium
    take turns at going first, run by run, so a slow spell of the machine is shared out."""
    peers = [Peer(name, found.apache, found.pg) for name in SYSTEMS]
    peers = peers if n % 2 == 0 else peers[::-1]
    on_embedded = Peer("relay", found.embedded, found.pg)
    run: dict[str, Any] = {name: {} for name in SYSTEMS}
    embedded: dict[str, Any] = {}
    for peer in peers:
        run[peer.name]["drain"] = drain_once(peer, opts.events)
        if peer.name == "relay":
            embedded["relay"] = drain_once(on_embedded, opts.events)["events_per_s"]
        rate = run[peer.name]["drain"]["events_per_s"]
        common.progress(f"peers: {peer.name} drained {rate:,.0f}/s")
    for peer in peers:
        run[peer.name]["latency"] = latency_once(peer, rates, opts.latency_seconds)
        if peer.name == "relay":
            steady = latency_once(on_embedded, (200,), opts.latency_seconds)
            embedded["relay_latency"] = steady["200"]
        p99 = ", ".join(f"{r}/s {run[peer.name]['latency'][str(r)]['p99_ms']:.1f}" for r in rates)
        common.progress(f"peers: {peer.name} p99 ms: {p99}")
    apache = {
        "relay": run["relay"]["drain"]["events_per_s"],
        "relay_latency": run["relay"]["latency"]["200"],
    }
    brokers = ((found.apache, apache), (found.embedded, embedded))
    for env, figures in brokers:
        figures["raw_producer"] = limits.raw_producer(env, opts.events, SIZE)
    for env, figures in brokers:
        figures["alone_latency"] = latency.kafka_alone_once(env, 200, opts.latency_seconds)
    run["brokers"] = {"apache": apache, "embedded": embedded}
    common.progress(f"peers: brokers {_brokers_line(run['brokers'])}")
    # Two cores: whatever else the machine ran meanwhile shows here, next to the figures.
    run["load_average_1min"] = os.getloadavg()[0]
    return run


def _brokers_line(brokers: dict[str, Any]) -> str:
    return "; ".join(
        f"{name}: relay {b['relay']:,.0f}/s, raw {b['raw_producer']:,.0f}/s, p99 at 200/s "
        f"{b['relay_latency']['p99_ms']:.1f} ms, alone {b['alone_latency']['p99_ms']:.1f} ms"
        for name, b in brokers.items()
    )


def measure(env: common.Env, opts: common.Options) -> dict[str, Any]:
    reason = apache_kafka.java_tools_missing()
    if reason:
        common.progress(f"peers: skipped, {reason}")
        return {"skipped": reason}
    rates = RATES
    with servers(env) as found:
        runs = []
        for n in range(opts.runs):
            runs.append(one_run(found, opts, rates, n))
            common.progress(f"peers run {n + 1}/{opts.runs} done")
    return summarise(runs, opts, rates)


def dig(value: Any, *path: str) -> Any:
    """``value[path[0]][path[1]]...``"""
    for part in path:
        value = value[part]
    return value


def _med(runs: list[dict[str, Any]], *path: str) -> float:
    return common.median(dig(r, *path) for r in runs)


def summarise(
    runs: list[dict[str, Any]], opts: common.Options, rates: tuple[int, ...]
) -> dict[str, Any]:
    systems: dict[str, Any] = {}
    for name in SYSTEMS:
        drains = [r[name]["drain"] for r in runs]
        lat = [r[name]["latency"] for r in runs]
        systems[name] = {
            "drain": {k: _med(drains, k) for k in drains[0]},
            "latency": {
                str(rate): {k: _med(lat, str(rate), k) for k in LATENCY_FIGURES}
                | {"missing": sum(x[str(rate)]["missing"] for x in lat)}
                for rate in rates
            },
            "peak_rss_mb": max(
                max(d["peak_rss_mb"] for d in drains), *(x["peak_rss_mb"] for x in lat)
            ),
        }
    brokers = {}
    for broker in ("apache", "embedded"):
        b = [r["brokers"][broker] for r in runs]
        relay, raw = _med(b, "relay"), _med(b, "raw_producer")
        brokers[broker] = {
            "relay_events_per_s": relay,
            "raw_producer_events_per_s": raw,
            "ratio_to_raw_producer": common.ratio(relay, raw),
            "relay_p50_ms": _med(b, "relay_latency", "p50_ms"),
            "relay_p99_ms": _med(b, "relay_latency", "p99_ms"),
            "alone_p50_ms": _med(b, "alone_latency", "p50_ms"),
            "alone_p99_ms": _med(b, "alone_latency", "p99_ms"),
        }
    return {
        "events": opts.events,
        "size": SIZE,
        "rates": list(rates),
        "latency_seconds": opts.latency_seconds,
        "debezium": {
            "version": debezium.DEBEZIUM_VERSION,
            "kafka_connect": apache_kafka.KAFKA_VERSION,
            "poll_interval_ms": debezium.POLL_INTERVAL_MS,
            "jvm_options": list(debezium.JVM_OPTIONS),
        },
        "systems": systems,
        "brokers": brokers,
        "load_average_1min": [r["load_average_1min"] for r in runs],
        "runs": runs,
    }


# --- table and targets -------------------------------------------------------------------------


def _pair(measure: str, unit: str, values: dict[str, float], digits: int = 0) -> list[common.Row]:
    """A row for each system; the relay's note says how it compares."""
    relay, other = values["relay"], values["debezium"]
    return [
        common.Row(
            "peers",
            f"relay: {measure}",
            common.num(relay, digits),
            unit,
            f"{common.ratio(relay, other):.2f} x Debezium's",
        ),
        common.Row("peers", f"Debezium: {measure}", common.num(other, digits), unit),
    ]


def rows(result: dict[str, Any]) -> list[common.Row]:
    if "skipped" in result:
        return [common.Row("peers", "skipped", "-", "", result["skipped"])]
    s = result["systems"]

    def each(*path: str) -> dict[str, float]:
        return {name: dig(s[name], *path) for name in SYSTEMS}

    n = f"{result['events']:,}"
    out = _pair(
        f"drain of {n} events, first to last arrival",
        "events/s",
        each("drain", "events_per_s"),
    )
    out += _pair(
        f"drain of {n} events, from the process's start",
        "events/s",
        each("drain", "wall_events_per_s"),
    )
    for rate in result["rates"]:
        for p in ("p50", "p99"):
            out += _pair(
                f"commit to delivery at {rate:,}/s, {p}",
                "ms",
                each("latency", str(rate), f"{p}_ms"),
                1,
            )
    places: list[tuple[str, tuple[str, ...]]] = [("drain (start-up included)", ("drain",))]
    places += [(f"at {rate:,}/s", ("latency", str(rate))) for rate in result["rates"]]
    for where, at in places:
        for who, kind in (("process", "cpu"), ("PostgreSQL", "pg_cpu")):
            values = each(*at, f"{kind}_s_per_1000")
            out += _pair(f"{who} CPU per 1,000 events, {where}", "CPU-s", values, 3)
    out += _pair("peak RSS, all runs", "MB", each("peak_rss_mb"))
    out += _broker_rows(result["brokers"])
    loads = ", ".join(f"{x:.1f}" for x in result.get("load_average_1min", []))
    out.append(
        common.Row("peers", "load average (1 min) after each run", loads or "-", "", "2 CPUs")
    )
    return out


def _broker_rows(brokers: dict[str, Any]) -> list[common.Row]:
    out = []
    for name, label in (("apache", "Apache Kafka"), ("embedded", "embedded broker")):
        b = brokers[name]
        out += [
            common.Row(
                "peers",
                f"relay drain on {label}",
                common.num(b["relay_events_per_s"]),
                "events/s",
                f"{b['ratio_to_raw_producer']:.2f} of the raw producer there "
                f"({b['raw_producer_events_per_s']:,.0f}/s)",
            ),
            common.Row(
                "peers",
                f"relay p99 at 200/s on {label}",
                common.num(b["relay_p99_ms"], 1),
                "ms",
                f"+{b['relay_p99_ms'] - b['alone_p99_ms']:.1f} ms over Kafka alone there "
                f"(p99 {b['alone_p99_ms']:.1f} ms; p50 {b['relay_p50_ms']:.1f} against "
                f"{b['alone_p50_ms']:.1f} ms)",
            ),
        ]
    return out


def _target(
    name: str, value: float, op: str, threshold: float, unit: str = "", digits: int | None = None
) -> common.Target:
    """A target whose threshold is this run's figure of the other side: without that figure
    (NaN), no verdict either."""
    known = math.isfinite(threshold)
    return common.Target(name, value if known else math.nan, op, threshold, unit, digits=digits)


def targets(result: dict[str, Any]) -> list[common.Target]:
    if "skipped" in result:
        return []
    relay, dbz = result["systems"]["relay"], result["systems"]["debezium"]
    apache, embedded = result["brokers"]["apache"], result["brokers"]["embedded"]
    cpu = {name: x["latency"]["2000"]["cpu_s_per_1000"] for name, x in result["systems"].items()}
    return [
        _target(
            "relay drain, >= 2 x Debezium's",
            relay["drain"]["events_per_s"],
            ">=",
            2 * dbz["drain"]["events_per_s"],
            "events/s",
        ),
        _target(
            "relay p99 at 200/s, <= Debezium's",
            relay["latency"]["200"]["p99_ms"],
            "<=",
            dbz["latency"]["200"]["p99_ms"],
            "ms",
            digits=1,
        ),
        _target(
            "relay CPU per 1,000 events at 2,000/s, <= 1/3 of the Connect JVM's",
            cpu["relay"],
            "<=",
            cpu["debezium"] / 3,
            "CPU-s",
            digits=3,
        ),
        _target(
            "relay drain / raw producer on Apache Kafka, >= on the embedded broker",
            apache["ratio_to_raw_producer"],
            ">=",
            embedded["ratio_to_raw_producer"],
        ),
        _target(
            "relay p99 over Kafka alone at 200/s on Apache Kafka, <= on the embedded broker",
            apache["relay_p99_ms"] - apache["alone_p99_ms"],
            "<=",
            embedded["relay_p99_ms"] - embedded["alone_p99_ms"],
            "ms",
            digits=1,
        ),
    ]


if __name__ == "__main__":
    common.standalone(__doc__, "peers", measure, rows, targets)
