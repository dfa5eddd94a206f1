"""Many outboxes, one relay fleet: 50 outboxes, each a database of its own on one PostgreSQL,
served by two relays (``run --outboxes FILE --fleet-database-url``, a separate fleet database).

In one run, with the relays' default settings throughout:

* baseline: one outbox, one relay (``--database-url``), writers at 1,000 events/s for 30 s;
* the fleet idles for 10 minutes after one event per outbox (every outbox served, its producer
  connected). Meanwhile: the CPU (utime + stime from /proc) of the PostgreSQL backends of every
  session named ``outbox-relay ...``, of the relay processes and of the whole server, over the
  first 10 s (fast wake-up ticks) and the last 60 s (the slowest ticks); the relays'
  connections per database at the end. Then one lone event into each of 30 outboxes chosen at
  random, a second apart (each outbox idle for the whole period until its event): commit to
  arrival at a consumer, as the idle section measures it;
* the fleet under the baseline's load spread over the 50 outboxes, then one outbox's database
  dropped (``DROP DATABASE ... WITH (FORCE)``) and the same load over the other 49: p99 of the
  other 49 before and after, side by side.

Writers are processes of their own committing one event a transaction (``outbox.add``), event
``i`` into outbox ``i mod n``: each outbox gets its share of the rate as single events, as a
service writing 20 events/s does. Arrivals are timed by ``load.Receiver`` on topics that rotate
every 3 s (Tansu, see ``load.py``); before each load, every outbox publishes one event to each
of those topics, so no relay's producer looks a topic up while timed (as in production, where
an outbox's topics are known to its producer). The same for the baseline.

The embedded server takes 100 connections, too few for 50 outboxes (two or three each, and
the writers'): with fewer than it needs, an embedded PostgreSQL of this section's own is
started with ``max_connections`` raised, otherwise as the suite's. ``--quick``: 5 outboxes,
100 events/s, loads of 5 s, 20 s of idle.

    .venv/bin/python bench/fleet.py [--quick] [--json out.json]
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import common
import debezium
import idle
import load
import psycopg
import soak

import outbox
from outbox import migrator, testing
from outbox.settings import OutboxSettings

RELAYS = 2
#: One writer process per this many commits a second.
COMMITS_PER_WRITER = 500
#: Connections each relay may hold beyond two per idle outbox (its fleet session, a spare).
EXTRA_PER_RELAY = 3
#: The after-the-drop p99 of the other outboxes may be this many times the before's: noise.
NOISE_RATIO = 1.5
RELAY_SESSIONS = "SELECT pid, datname, application_name FROM pg_stat_activity"
RELAY_SESSIONS += " WHERE application_name LIKE 'outbox-relay%%' AND datname = ANY(%s)"


@dataclass(frozen=True)
class Sizes:
    outboxes: int = 50
    rate: float = 1_000.0
    load_seconds: float = 30.0
    idle_seconds: float = 600.0
    first_window: float = 10.0  # CPU at the start of the idle time
    last_window: float = 60.0  # and at its end
    lone_events: int = 30
    #: A second rate, which this 2-core machine sustains beside the writers: the same loads
    #: there show the fleet's own latency and the drop's effect outside saturation.
    low_rate: float = 250.0

    @staticmethod
    def of(opts: common.Options) -> Sizes:
        if opts.quick:
            return Sizes(5, 100.0, 5.0, 20.0, 5.0, 5.0, 5, 50.0)
        return Sizes()

    @property
    def connections_needed(self) -> int:
        """The fleet's sessions under load (three an outbox), the writers' and some spare."""
        return 4 * self.outboxes + EXTRA_PER_RELAY * RELAYS + 40


# --- servers, outboxes, relays -----------------------------------------------------------------


def max_connections(server: str) -> int:
    with psycopg.connect(server) as conn:
        row = conn.execute("SHOW max_connections").fetchone()
        return int(row[0]) if row else 0


@contextlib.contextmanager
def roomy(env: common.Env, need: int) -> Iterator[common.Env]:
    """``env`` if its PostgreSQL takes ``need`` connections; else an embedded server of our own
    taking them (restarted once with ``max_connections`` raised), with a template of the
    schema, and ``env``'s broker."""
    have = max_connections(env.server)
    if have >= need:
        yield env
        return
    if testing.DATABASE_URL_ENV in os.environ:
        raise RuntimeError(f"the fleet needs max_connections >= {need}; the server has {have}")
    common.progress(f"fleet: a PostgreSQL of its own with max_connections = {need} (not {have})")
    with tempfile.TemporaryDirectory(prefix="outbox-fleet-") as tmp:
        data = Path(tmp) / "pgdata"
        with testing.embedded_postgres(data) as url, psycopg.connect(url, autocommit=True) as c:
            c.execute(f"ALTER SYSTEM SET max_connections = {int(need)}")
        with testing.embedded_postgres(data) as url:
            template = testing.unique_name("fleet_tmpl")
            with psycopg.connect(testing.create_database(url, template)) as conn:
                migrator.apply(conn, OutboxSettings())
            yield common.Env(url, env.bootstrap, template, env.logs)


def list_file(path: Path, names: Sequence[str], urls: Sequence[str]) -> Path:
    entries = [
        f'[[outbox]]\nname = "{name}"\ndatabase_url = "{url}"\n'
        for name, url in zip(names, urls, strict=True)
    ]
    path.write_text("\n".join(entries))
    return path


class FleetRelay(common.Relay):
    """A relay of the fleet: ``run --outboxes FILE`` instead of ``--database-url``."""

    def __init__(self, env: common.Env, outboxes: Path, fleet_url: str, relay_id: str) -> None:
        self.command = [sys.executable, "-m", "outbox_relay", "--log-format", "json"]
        self.command += ["--log-level", "warning", "run", "--outboxes", str(outboxes)]
        self.command += ["--fleet-database-url", fleet_url, "--relay-id", relay_id]
        self.command += ["--kafka-bootstrap-servers", env.bootstrap]
        self.log_path = env.logs / f"fleet-{relay_id}-{time.monotonic_ns()}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)


def sessions(server: str, databases: Sequence[str]) -> list[tuple[int, str, str]]:
    """(backend pid, database, application name) of every relay session in ``databases`` (not
    those of other relays on a shared server)."""
    with psycopg.connect(server) as conn:
        found = conn.execute(RELAY_SESSIONS, (list(databases),)).fetchall()
        return [(int(p), str(d), str(a)) for p, d, a in found]


def owners(server: str, databases: Sequence[str]) -> dict[str, frozenset[str]]:
    """Per database, the relays holding an owner session there."""
    found: dict[str, set[str]] = {}
    for _, database, name in sessions(server, databases):
        if name.startswith("outbox-relay owner "):
            found.setdefault(database, set()).add(name.split()[-1])
    return {d: frozenset(r) for d, r in found.items()}


def settle(server: str, databases: Sequence[str], relays: Sequence[common.Relay]) -> None:
    """Until every outbox has one owning relay, the same for 3 s (the fleet has split them)."""
    deadline, stable_since, last = time.monotonic() + 120, time.monotonic(), None
    while time.monotonic() < deadline:
        for relay in relays:
            relay.check()
        now = owners(server, databases)
        if now != last:
            stable_since, last = time.monotonic(), now
        elif all(len(now.get(d, ())) == 1 for d in databases) and (
            time.monotonic() - stable_since >= 3
        ):
            return
        time.sleep(0.5)
    raise TimeoutError(f"the fleet did not settle on one relay per outbox: {last}")


class ConnectionSampler(soak.Sampler[int]):
    """The relays' sessions in ``databases``, every ``interval`` seconds."""

    def __init__(self, server: str, databases: Sequence[str], interval: float) -> None:
        self.databases = list(databases)
        super().__init__(server, interval)

    def sample(self) -> int:
        return len(self._conn.execute(RELAY_SESSIONS, (self.databases,)).fetchall())


def connections(server: str, databases: Sequence[str], fleet_db: str) -> dict[str, Any]:
    per: dict[str, int] = {}
    for _, database, _ in sessions(server, [*databases, fleet_db]):
        per[database] = per.get(database, 0) + 1
    outboxes = [per.get(d, 0) for d in databases]
    return {
        "total": sum(per.values()),
        "max_per_outbox": max(outboxes),
        "min_per_outbox": min(outboxes),
        "fleet_database": per.get(fleet_db, 0),
        "per_database": per,
    }


# --- writers and latencies ---------------------------------------------------------------------


def _writer(
    urls: tuple[str, ...],
    topics: list[str],
    rotate_s: float,
    rate: float,
    seconds: float,
    index: int,
    writers: int,
    start_at: float,
    out: Connection,
) -> None:
    """A writer process: events ``index + writers * k``, each committed alone into outbox
    ``i mod len(urls)`` on the topic of the moment; sends back the commit times."""
    n = len(urls)
    conns = {d: psycopg.connect(urls[d]) for d in {(index + writers * k) % n for k in range(n)}}
    try:

        def commit(i: int) -> float:
            conn = conns[i % n]
            topic = topics[load.topic_index(start_at, rotate_s, len(topics), time.time())]
            outbox.add(conn, topic, common.payload(i, load.SIZE), key=common.key(i))
            conn.commit()
            return time.time()

        commits = load._paced(rate, seconds, 1, index, writers, start_at, commit)
    finally:
        for conn in conns.values():
            conn.close()
    out.send_bytes(commits.tobytes())
    out.close()


def write(
    urls: Sequence[str],
    plan: load.Plan,
    receiver: load.Receiver,
    relays: Sequence[common.Relay],
) -> load.Load:
    """Run the writers to the end (``load.run_processes``), each event committed alone."""
    writers = max(1, math.ceil(plan.rate / COMMITS_PER_WRITER))
    plan.start_at = time.time() + 2.0  # every writer started and connected by then
    receiver.following.set()
    args = (tuple(urls), plan.topics, plan.rotate_s, plan.rate / writers, plan.seconds)

    def check() -> None:
        for relay in relays:
            relay.check()

    commits = load.run_processes(_writer, args, writers, plan.start_at, check)
    return load.Load(plan.rate, plan.seconds, writers, 1, plan.start_at, commits, len(plan.topics))


def per_event(run: load.Load, receiver: load.Receiver) -> tuple[list[tuple[int, float]], list[int]]:
    """([(event i, latency in ms)] of every arrived event, [event i] of those missing)."""
    out: list[tuple[int, float]] = []
    missing: list[int] = []
    for w, commits in enumerate(run.commits):
        for t, committed in enumerate(commits):
            i = w + run.writers * t
            if receiver.arrived[i]:
                out.append((i, 1000 * (receiver.arrived[i] - committed)))
            else:
                missing.append(i)
    return out, missing


def stats(latencies: Sequence[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "events": len(ordered),
        "p50_ms": common.percentile(ordered, 50),
        "p99_ms": common.percentile(ordered, 99),
        "p999_ms": common.percentile(ordered, 99.9),
        "max_ms": ordered[-1] if ordered else math.nan,
    }


def warm_topics(urls: Sequence[str], topics: list[str], relays: Sequence[common.Relay]) -> None:
    """One event per outbox per topic, then wait until every outbox is empty again."""
    for url in urls:
        with psycopg.connect(url) as conn:
            for topic in topics:
                outbox.add(conn, topic, load.WARMUP, key="warm-up")
    deadline = time.monotonic() + 120
    for url in urls:
        with psycopg.connect(url, autocommit=True) as conn:
            while (row := conn.execute("SELECT count(*) FROM outbox_events").fetchone()) and row[0]:
                for relay in relays:
                    relay.check()
                if time.monotonic() > deadline:
                    raise TimeoutError("the warm-up events were not published within 120 s")
                time.sleep(0.05)


def steady(
    env: common.Env,
    urls: Sequence[str],
    relays: Sequence[common.Relay],
    sizes: Sizes,
    watched: Sequence[str],
) -> dict[str, Any]:
    """The load over ``urls``: per event latency, missing events, most relay sessions seen in
    the ``watched`` databases."""
    rate, seconds = sizes.rate, sizes.load_seconds
    with env.topics(load.Plan.topics_needed(rate, seconds)) as topics:
        plan = load.Plan(rate, seconds, topics)
        warm_topics(urls, topics, relays)
        with (
            load.Receiver(env.bootstrap, plan, load.capacity(rate, seconds)) as receiver,
            ConnectionSampler(env.server, watched, 1.0) as sampler,
        ):
            meter = CpuMeter(env.server, watched, relays)
            run = write(urls, plan, receiver, relays)
            cpu = meter.result()
            receiver.wait_for(run.written, timeout=load.KEEP_S)
        events, missing = per_event(run, receiver)
    names = [str(psycopg.conninfo.conninfo_to_dict(u)["dbname"]) for u in urls]
    missing_in: dict[str, int] = {}
    for i in missing:
        missing_in[names[i % len(urls)]] = missing_in.get(names[i % len(urls)], 0) + 1
    return {
        **stats([ms for _, ms in events]),
        "achieved_rate": run.written / seconds,
        "written": run.written,
        "missing": len(missing),
        "missing_in": missing_in,
        "rows_left": rows_left(urls),
        "duplicates": receiver.duplicates,
        "connections_max": max(sampler.samples, default=0),
        "cpu": cpu,
        "load_average": os.getloadavg()[0],
        "events": events,  # dropped before the JSON
    }


def rows_left(urls: Sequence[str]) -> int:
    """Rows still in the outboxes (published rows are deleted): events not yet published."""
    left = 0
    for url in urls:
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT count(*) FROM outbox_events").fetchone()
            left += int(row[0]) if row else 0
    return left


# --- idle ----------------------------------------------------------------------------------------


def postmaster(pid: int) -> int | None:
    with contextlib.suppress(OSError, IndexError, ValueError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return None


def transactions(server: str, databases: Sequence[str]) -> int:
    with psycopg.connect(server) as conn:
        row = conn.execute(
            "SELECT sum(xact_commit + xact_rollback) FROM pg_stat_database WHERE datname = ANY(%s)",
            (list(databases),),
        ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


class CpuMeter:
    """CPU from its creation to :meth:`result`, as % of one core: the backends of the relays'
    sessions in ``databases`` (all, and by role: owner, work, fleet), the relay processes, the
    whole server (all its processes, exited ones included); transactions a second there."""

    def __init__(
        self, server: str, databases: Sequence[str], relays: Sequence[common.Relay]
    ) -> None:
        self.server, self.databases, self.relays = server, list(databases), list(relays)
        self.roles = {pid: [*name.split(), "?"][1] for pid, _, name in sessions(server, databases)}
        self.master = postmaster(next(iter(self.roles))) if self.roles else None
        self.before = self.sample()
        self.xacts = transactions(server, self.databases)
        self.started = time.monotonic()

    def sample(self) -> dict[str, float]:
        """CPU seconds so far, by what: ``backend <pid>``, ``relays``, ``postgres``."""
        used = {f"backend {pid}": idle.cpu_seconds(pid) for pid in self.roles}
        used["relays"] = sum(idle.cpu_seconds(r.pid) or 0.0 for r in self.relays)
        if self.master:
            used["postgres"] = debezium.cpu_seconds(self.master, with_reaped=True)
        return {what: seconds for what, seconds in used.items() if seconds is not None}

    def result(self) -> dict[str, Any]:
        after, elapsed = self.sample(), time.monotonic() - self.started
        xacts = transactions(self.server, self.databases) - self.xacts

        def pct(what: str) -> float:
            if what not in after or what not in self.before:
                return math.nan if what == "postgres" else 0.0
            return 100 * (after[what] - self.before[what]) / elapsed

        by_role: dict[str, float] = {}
        for pid, role in self.roles.items():
            by_role[role] = by_role.get(role, 0.0) + pct(f"backend {pid}")
        return {
            "seconds": round(elapsed, 1),
            "backends": len(self.roles),
            "backends_cpu_pct": sum(by_role.values()),
            "backends_cpu_pct_by_role": by_role,
            "sessions_by_role": {r: list(self.roles.values()).count(r) for r in by_role},
            "relays_cpu_pct": pct("relays"),
            "postgres_cpu_pct": pct("postgres"),
            "transactions_per_s": xacts / elapsed,
        }


def cpu_window(
    server: str, databases: Sequence[str], relays: Sequence[common.Relay], seconds: float
) -> dict[str, Any]:
    meter = CpuMeter(server, databases, relays)
    time.sleep(seconds)
    return {**meter.result(), "load_average": os.getloadavg()[0]}


def idle_time(
    env: common.Env,
    urls: Sequence[str],
    databases: Sequence[str],
    fleet_db: str,
    relays: Sequence[common.Relay],
    arrivals: idle.Arrivals,
    topic: str,
    sizes: Sizes,
) -> dict[str, Any]:
    """One event per outbox, the idle time (CPU at its start and end, connections), then the
    lone events."""
    for event_id in [idle.add_one(url, topic)[0] for url in urls]:
        arrivals.wait_for(event_id, timeout=120)
    started = time.monotonic()
    common.progress(f"fleet: idle for {sizes.idle_seconds:.0f} s")
    watched = [*databases, fleet_db]
    first = cpu_window(env.server, watched, relays, sizes.first_window)
    time.sleep(max(0.0, started + sizes.idle_seconds - sizes.last_window - time.monotonic()))
    last = cpu_window(env.server, watched, relays, sizes.last_window)
    conns = connections(env.server, databases, fleet_db)
    lone = []
    for d in random.Random(31).sample(range(len(urls)), min(sizes.lone_events, len(urls))):
        for relay in relays:
            relay.check()
        event_id, committed = idle.add_one(urls[d], topic)
        lone.append((arrivals.wait_for(event_id) - committed) * 1000)
        time.sleep(1.0)
    common.progress(f"fleet: lone events (ms) {', '.join(f'{ms:.0f}' for ms in lone)}")
    return {
        "idle_seconds": sizes.idle_seconds,
        "first": first,
        "last": last,
        "connections": conns,
        "lone": {**stats(lone), "samples": lone},
    }


# --- the runs ----------------------------------------------------------------------------------


def baseline(env: common.Env, sizes: Sizes) -> dict[str, Any]:
    with env.database() as url:
        relay = common.Relay(env, url)
        try:
            name = str(psycopg.conninfo.conninfo_to_dict(url)["dbname"])
            result = steady(env, [url], [relay], sizes, [name])
            relay.check()
        finally:
            relay.stop()
    return result


def fleet(env: common.Env, sizes: Sizes) -> dict[str, Any]:
    n = sizes.outboxes
    names = [f"t{k + 1:02d}" for k in range(n)]
    victim = n // 2
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(env.database()) for _ in names]
        databases = [str(psycopg.conninfo.conninfo_to_dict(u)["dbname"]) for u in urls]
        fleet_db = testing.unique_name("fleet")
        fleet_url = testing.create_database(env.server, fleet_db)
        stack.callback(testing.drop_database, env.server, fleet_db)
        path = list_file(env.logs / f"{fleet_db}.toml", names, urls)
        topic = stack.enter_context(env.topic())
        arrivals = idle.Arrivals(env.bootstrap, [topic])
        stack.callback(arrivals.close)
        relays = [FleetRelay(env, path, fleet_url, f"fleet-{r + 1}") for r in range(RELAYS)]
        for relay in relays:
            stack.callback(relay.stop)
        settle(env.server, databases, relays)
        split = {
            r: sum(r in o for o in owners(env.server, databases).values())
            for r in ("fleet-1", "fleet-2")
        }
        common.progress(f"fleet: {n} outboxes served, {split} outboxes per relay")
        quiet = idle_time(env, urls, databases, fleet_db, relays, arrivals, topic, sizes)
        low = replace(sizes, rate=sizes.low_rate)
        watched = [*databases, fleet_db]
        before = steady(env, urls, relays, sizes, watched)
        before_low = steady(env, urls, relays, low, watched)
        common.progress(
            f"fleet: {n} outboxes, p99 {before['p99_ms']:.1f} / {before_low['p99_ms']:.1f} ms"
        )
        testing.drop_database(env.server, databases[victim])
        time.sleep(3.0)
        others = urls[:victim] + urls[victim + 1 :]
        after = steady(env, others, relays, sizes, watched)
        after_low = steady(env, others, relays, low, watched)
        common.progress(
            f"fleet: after the drop, p99 {after['p99_ms']:.1f} / {after_low['p99_ms']:.1f} ms"
        )
        for relay in relays:
            relay.check()
        logs = {r.command[r.command.index("--relay-id") + 1]: r for r in relays}
        return {
            "outboxes": n,
            "relays": RELAYS,
            "outboxes_per_relay": split,
            "idle": quiet,
            "all": before,
            "dropped": names[victim],
            "others_before": others_of(before, n, victim),
            "others_after": after,
            "all_low": before_low,
            "others_before_low": others_of(before_low, n, victim),
            "others_after_low": after_low,
            "relay_log_lines": {rid: log_counts(r) for rid, r in logs.items()},
        }


def log_counts(relay: common.Relay) -> dict[str, int]:
    """A relay's log lines (warnings and worse), counted by event."""
    counts: dict[str, int] = {}
    for line in testing.log_events(relay.log_text()):
        event = f"{line.get('level', '?')} {line.get('event', '?')}"
        counts[event] = counts.get(event, 0) + 1
    return counts


def others_of(run: dict[str, Any], n: int, victim: int) -> dict[str, Any]:
    """The run's figures without the victim's events, and of its two halves (the noise)."""
    events = [(i, ms) for i, ms in run["events"] if i % n != victim]
    half = len(events) // 2
    halves = [stats([ms for _, ms in part])["p99_ms"] for part in (events[:half], events[half:])]
    return {**stats([ms for _, ms in events]), "p99_halves_ms": halves}


def measure(env: common.Env, opts: common.Options) -> dict[str, Any]:
    sizes = Sizes.of(opts)
    with roomy(env, sizes.connections_needed) as here:
        common.progress(f"fleet: baseline, one outbox at {sizes.rate:,.0f}/s")
        single = baseline(here, sizes)
        single_low = baseline(here, replace(sizes, rate=sizes.low_rate))
        common.progress(f"fleet: baseline p50 {single['p50_ms']:.1f} p99 {single['p99_ms']:.1f}")
        result = {
            "sizes": asdict(sizes),
            "single": single,
            "single_low": single_low,
            **fleet(here, sizes),
        }
    for run in ("single", "single_low", "all", "all_low", "others_after", "others_after_low"):
        result[run].pop("events", None)
    return result


# --- the table -----------------------------------------------------------------------------------


def _pair(a: float, b: float, digits: int = 1) -> str:
    return f"{common.num(a, digits)} / {common.num(b, digits)}"


def _achieved(run: dict[str, Any]) -> str:
    text = f"{run['written']:,} events ({run['achieved_rate']:,.0f}/s), {run['missing']} missing"
    if run["missing"]:
        text += f" (in {run['missing_in']}; {run['rows_left']} rows left unpublished)"
    return text


def _verdict(target: common.Target) -> str:
    met = {True: "met", False: "NOT met", None: "not measured"}[target.met]
    digits = 2 if target.threshold < 10 else 0
    return f"target {target.op} {common.num(target.threshold, digits)}: {met}"


def rows(result: dict[str, Any]) -> list[common.Row]:
    n, single, every, quiet = result["outboxes"], result["single"], result["all"], result["idle"]
    before, after = result["others_before"], result["others_after"]
    first, last, conns, lone = quiet["first"], quiet["last"], quiet["connections"], quiet["lone"]
    rate, dropped = f"{result['sizes']['rate']:,.0f}/s", result["dropped"]
    low_rate = f"{result['sizes']['low_rate']:,.0f}/s"
    single_low, every_low = result["single_low"], result["all_low"]
    before_low, after_low = result["others_before_low"], result["others_after_low"]
    goal = {t.name: _verdict(t) for t in targets(result)}
    logged = "; ".join(
        f"{rid}: {lines or 'none'}" for rid, lines in result["relay_log_lines"].items()
    )

    def row(measure: str, value: str, unit: str, note: str = "") -> common.Row:
        return common.Row("fleet", measure, value, unit, note)

    return [
        row(
            f"one outbox, one relay, at {rate}: p50 / p99",
            _pair(single["p50_ms"], single["p99_ms"]),
            "ms",
            f"baseline; {_achieved(single)}",
        ),
        row(
            f"{n} outboxes, {result['relays']} relays, at {rate}: p50 / p99",
            _pair(every["p50_ms"], every["p99_ms"]),
            "ms",
            f"{goal['fleet p99']}; {_achieved(every)}",
        ),
        row(
            f"one outbox, one relay, at {low_rate}: p50 / p99",
            _pair(single_low["p50_ms"], single_low["p99_ms"]),
            "ms",
            f"baseline; {_achieved(single_low)}",
        ),
        row(
            f"{n} outboxes, {result['relays']} relays, at {low_rate}: p50 / p99",
            _pair(every_low["p50_ms"], every_low["p99_ms"]),
            "ms",
            f"{goal['fleet p99 at the lower rate']}; {_achieved(every_low)}",
        ),
        row(
            "CPU while writing: relay processes / all of PostgreSQL, one outbox",
            _pair(single["cpu"]["relays_cpu_pct"], single["cpu"]["postgres_cpu_pct"], 0),
            "% of a core",
            "PostgreSQL: the writers' backends included",
        ),
        row(
            f"CPU while writing: relay processes / all of PostgreSQL, {n} outboxes",
            _pair(every["cpu"]["relays_cpu_pct"], every["cpu"]["postgres_cpu_pct"], 0),
            "% of a core",
            f"load average {every['load_average']:.1f} at the end (2 cores)",
        ),
        row(
            f"the other {n - 1}, p50 before / after dropping {dropped}",
            _pair(before["p50_ms"], after["p50_ms"]),
            "ms",
            f"after: {_achieved(after)}",
        ),
        row(
            f"the other {n - 1}, p99 before / after dropping {dropped}",
            _pair(before["p99_ms"], after["p99_ms"]),
            "ms",
            f"{goal['fleet p99 after a drop / before']}; "
            f"p99 of before's halves {_pair(*before['p99_halves_ms'])}",
        ),
        row(
            f"the other {n - 1} at {low_rate}, p99 before / after dropping {dropped}",
            _pair(before_low["p99_ms"], after_low["p99_ms"]),
            "ms",
            f"{goal['fleet p99 after a drop / before, at the lower rate']}; "
            f"p99 of before's halves {_pair(*before_low['p99_halves_ms'])}; "
            f"after: {_achieved(after_low)}",
        ),
        row(
            f"lone event after {quiet['idle_seconds']:.0f} s idle: p50 / p99 / max",
            f"{_pair(lone['p50_ms'], lone['p99_ms'])} / {common.num(lone['max_ms'], 1)}",
            "ms",
            f"{goal['fleet lone event p99']}; {lone['events']} outboxes, one event each",
        ),
        row(
            f"PostgreSQL CPU of the relays' sessions, first {first['seconds']:.0f} s / "
            f"last {last['seconds']:.0f} s idle",
            _pair(first["backends_cpu_pct"], last["backends_cpu_pct"], 2),
            "% of a core",
            f"{goal['fleet idle PostgreSQL CPU']}; {last['backends']} sessions",
        ),
        row(
            "  of which, last idle window, by session role",
            ", ".join(f"{r} {v:.1f}" for r, v in last["backends_cpu_pct_by_role"].items()),
            "% of a core",
            ", ".join(f"{c} {r}" for r, c in last["sessions_by_role"].items()) + " sessions",
        ),
        row(
            "the relay processes' CPU, first / last idle",
            _pair(first["relays_cpu_pct"], last["relays_cpu_pct"], 2),
            "% of a core",
            f"{result['relays']} processes, all their threads",
        ),
        row(
            "the whole PostgreSQL server's CPU, first / last idle",
            _pair(first["postgres_cpu_pct"], last["postgres_cpu_pct"], 2),
            "% of a core",
            "all its processes: autovacuum, checkpointer, ...",
        ),
        row(
            "transactions in the outbox databases, first / last idle",
            _pair(first["transactions_per_s"], last["transactions_per_s"]),
            "/s",
        ),
        row(
            "relay connections while idle: total / most in one outbox's database",
            f"{conns['total']} / {conns['max_per_outbox']}",
            "",
            f"{goal['fleet idle connections']}, {goal['fleet idle connections per outbox']}; "
            f"{conns['fleet_database']} in the fleet database; "
            f"under load at most {every['connections_max']} in all",
        ),
        row(
            "outboxes per relay",
            " / ".join(str(v) for v in result["outboxes_per_relay"].values()),
            "",
            f"relays' warnings and errors, by event: {logged}",
        ),
    ]


def targets(result: dict[str, Any]) -> list[common.Target]:
    n, quiet, relays = result["outboxes"], result["idle"], result["relays"]
    before, after = result["others_before"]["p99_ms"], result["others_after"]["p99_ms"]
    conns = quiet["connections"]
    return [
        common.Target("fleet p99", result["all"]["p99_ms"], "<", 50, "ms"),
        common.Target(
            "fleet p99 after a drop / before", common.ratio(after, before), "<", NOISE_RATIO, "x"
        ),
        common.Target("fleet p99 at the lower rate", result["all_low"]["p99_ms"], "<", 50, "ms"),
        common.Target(
            "fleet p99 after a drop / before, at the lower rate",
            common.ratio(
                result["others_after_low"]["p99_ms"], result["others_before_low"]["p99_ms"]
            ),
            "<",
            NOISE_RATIO,
            "x",
        ),
        common.Target("fleet lone event p99", quiet["lone"]["p99_ms"], "<", 250, "ms"),
        common.Target(
            "fleet idle PostgreSQL CPU", quiet["last"]["backends_cpu_pct"], "<=", 5, "% of a core"
        ),
        common.Target(
            "fleet idle connections", conns["total"], "<=", 2 * n + EXTRA_PER_RELAY * relays
        ),
        common.Target("fleet idle connections per outbox", conns["max_per_outbox"], "<=", 2),
    ]


if __name__ == "__main__":
    common.standalone(__doc__, "fleet", measure, rows, targets, single_run=True)
