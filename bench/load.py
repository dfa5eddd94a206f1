"""A steady load through a running relay, timed event by event: writers commit events at a fixed
rate, a consumer records when each one arrives, and the latency of an event is its arrival
minus its transaction's commit (both ``time.time()`` on this machine).

Writers are processes of their own (so neither they nor the consumer wait on each other's
GIL). Writer ``w`` of ``n`` writes events ``i = w, w + n, w + 2n, ...`` (payload
``common.payload(i, 256)``, key ``key-(i % 1000)``), ``per_commit`` events a transaction
and records each commit's time: single events with ``outbox.add``, several with one
``INSERT ... SELECT`` generating the same rows in the server (``common.insert_rows``), so the
bench's own writers take as little of the two cores from the relay as possible (what
``outbox.add_many`` costs is the writer section's business). The consumer finds ``i`` in the
payload.

Topics rotate: Tansu keeps a partition as a list of record batches and a fetch gets slower the
more batches it holds, so a consumer at the end of a topic that a relay keeps up with (one small
record batch per partition per relay batch) sees the latency grow with the topic's length
rather than with anything the relay does. Measured with one topic at 2,000 events/s: p50 / p99
of 5 / 15 ms in the first 3 s, 13 / 38 ms after 9 s, 35 / 604 ms after 15 s (36,000 events); and
0.1 s to fetch the tail of 100,000 such messages, 13.6 s at 200,000, nothing within 30 s at
300,000 (other topics stay fast). Apache Kafka finds a fetch's offset through an index. So the
writers move to a new topic every ``TOPIC_SECONDS`` seconds (or every 50,000 events, if that
comes first), the consumer follows, and stops reading a topic ``KEEP_S`` seconds after the
writers left it (deleting it then crashed librdkafka now and then: the topics go at the end).
Which topic an event travels on changes nothing else.
"""

from __future__ import annotations

import array
import contextlib
import math
import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import common
import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition

import outbox
from outbox.envelope import EVENT_ID_HEADER
from outbox_relay.config import RelaySettings
from outbox_relay.kafka import producer_config

SIZE = 256
#: A writer commits at most this many events a second (measured: one Python process commits
#: about 500 transactions of 20 events a second here, with nothing else running).
EVENTS_PER_WRITER = 5_000
WARMUP = b"warm-up"
#: Tansu answers a fetch when its wait runs out rather than as soon as data arrives, so the
#: consumer's fetch.wait.max.ms is added to the latency it sees (up to that much). 1 ms keeps
#: Tansu answering empty fetches so often that at 10,000 events/s the writers fall behind on
#: two cores; 2 ms does not.
FETCH_WAIT_MS = 2
#: Events per topic, and seconds on a topic, before the writers move on to the next (see the
#: module's docstring).
EVENTS_PER_TOPIC = 50_000
TOPIC_SECONDS = 3.0
#: Seconds the consumer keeps reading a topic after the writers left it; an event arriving
#: later than that counts as missing.
KEEP_S = 30.0


def shape(rate: float) -> tuple[int, int]:
    """(writers, events per transaction) for ``rate`` events/s: single-event transactions up to
    200/s; above, 20 events a commit, and one writer per 5,000 events/s."""
    if rate <= 200:
        return 1, 1
    return max(1, math.ceil(rate / EVENTS_PER_WRITER)), 20


@dataclass
class Plan:
    """The topics of one load and when the writers use each."""

    rate: float
    seconds: float
    topics: list[str]
    start_at: float = 0.0  # wall time the writers start; set by :func:`write`

    @property
    def rotate_s(self) -> float:
        return rotation_s(self.rate)

    @staticmethod
    def topics_needed(rate: float, seconds: float) -> int:
        return max(1, math.ceil(seconds / rotation_s(rate)))


def rotation_s(rate: float) -> float:
    """Seconds the writers stay on one topic at ``rate`` events/s."""
    return min(TOPIC_SECONDS, EVENTS_PER_TOPIC / rate)


def topic_index(plan_start: float, rotate_s: float, count: int, now: float) -> int:
    return min(count - 1, max(0, int((now - plan_start) / rotate_s)))


class Receiver:
    """A consumer thread reading the plan's topics from the start as the writers use them:
    arrival time of each event ``i``."""

    def __init__(self, bootstrap: str, plan: Plan, capacity: int) -> None:
        self.arrived = array.array("d", bytes(8 * capacity))
        self.count = 0
        self.duplicates = 0
        self.errors: dict[str, int] = {}  # consumer errors, by message
        self.warm = threading.Event()
        self.plan = plan
        self.following = threading.Event()  # set once the plan has its start time
        self._stop = threading.Event()
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": plan.topics[0],
                "fetch.wait.max.ms": FETCH_WAIT_MS,
                "enable.auto.commit": False,
                **common.QUIET,
            }
        )
        self._assigned = [0]  # topic indexes
        self._consumer.assign(self._partitions(0))
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _partitions(self, index: int) -> list[TopicPartition]:
        return [TopicPartition(self.plan.topics[index], p, 0) for p in range(common.PARTITIONS)]

    def _follow(self, now: float) -> None:
        """Assign the next topic just before the writers move to it; unassign the ones they
        left more than KEEP_S ago."""
        plan = self.plan
        rotate = plan.rotate_s
        last = self._assigned[-1]
        if last + 1 < len(plan.topics) and now >= plan.start_at + (last + 1) * rotate - 1.0:
            self._consumer.incremental_assign(self._partitions(last + 1))
            self._assigned.append(last + 1)
        first = self._assigned[0]
        if first < len(plan.topics) - 1 and now >= plan.start_at + (first + 1) * rotate + KEEP_S:
            self._consumer.incremental_unassign(self._partitions(first))
            self._assigned.pop(0)

    def _run(self) -> None:
        arrived, consumer = self.arrived, self._consumer
        while not self._stop.is_set():
            if self.following.is_set():
                self._follow(time.time())
            first = consumer.poll(0.05)  # returns as soon as a message is there
            if first is None:
                continue
            now = time.time()
            # Whatever else is queued arrived before now: take it without waiting.
            for msg in (first, *consumer.consume(10_000, 0)):
                if msg.error() is not None:
                    error = str(msg.error())
                    self.errors[error] = self.errors.get(error, 0) + 1
                    continue
                value = msg.value()
                i = common.event_number(value)
                if i is None:
                    if value == WARMUP:
                        self.warm.set()
                elif arrived[i] == 0.0:
                    arrived[i] = now
                    self.count += 1
                else:
                    self.duplicates += 1
        consumer.close()

    def wait_for(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.count < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.count >= count

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def warm_up(
    database_url: str, topic: str, receiver: Receiver, relay: common.Relay, timeout: float = 30
) -> None:
    """One event through the relay: once it arrived, the relay owns its shards and its
    producer is connected."""
    with psycopg.connect(database_url) as conn:
        outbox.add(conn, topic, WARMUP, key="warm-up")
        conn.commit()
    deadline = time.monotonic() + timeout
    while not receiver.warm.wait(0.1):
        relay.check()
        if time.monotonic() > deadline:
            tail = "\n".join(relay.log_lines()[-20:])
            raise TimeoutError(f"the warm-up event did not arrive within {timeout} s:\n{tail}")


def _paced(
    rate: float,
    seconds: float,
    per_commit: int,
    index: int,
    writers: int,
    start_at: float,
    send: Callable[[int], float],
) -> array.array[float]:
    """Call ``send(first)`` for events ``first .. first + per_commit`` (this writer's share)
    ``rate / per_commit`` times a second for ``seconds`` from wall time ``start_at``; the wall
    times the calls return (when their events were committed or handed over)."""
    times = array.array("d")
    interval = per_commit / rate
    time.sleep(max(0.0, start_at - time.time()))
    next_at = time.monotonic()
    end = next_at + seconds
    k = 0
    while time.monotonic() < end:
        times.append(send(index + writers * k))
        k += per_commit
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
    return times


def _writer(
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
    """A writer process: ``rate`` events/s for ``seconds`` from wall time ``start_at``, on the
    topic of the moment; sends back its commit times."""
    with psycopg.connect(database_url) as conn:

        def commit(first: int) -> float:
            topic = topics[topic_index(start_at, rotate_s, len(topics), time.time())]
            if per_commit == 1:
                outbox.add(conn, topic, common.payload(first, SIZE), key=common.key(first))
            else:
                common.insert_rows(conn, topic, per_commit, SIZE, first=first, step=writers)
            conn.commit()
            return time.time()

        commits = _paced(rate, seconds, per_commit, index, writers, start_at, commit)
    out.send_bytes(commits.tobytes())
    out.close()


def _producer(
    bootstrap: str,
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
    """:func:`_writer` without the database: the same events straight to Kafka with the
    relay's producer settings (the baseline of the latency section), each group flushed before
    the next as the relay flushes each batch; sends back the time each group was handed to the
    producer."""
    settings = RelaySettings(database_url="postgresql://unused", kafka_bootstrap_servers=bootstrap)
    producer = Producer(producer_config(settings) | common.QUIET)

    def send(first: int) -> float:
        topic = topics[topic_index(start_at, rotate_s, len(topics), time.time())]
        for i in range(first, first + writers * per_commit, writers):
            producer.produce(
                topic,
                value=common.payload(i, SIZE),
                key=common.key(i),
                headers=[(EVENT_ID_HEADER, str(uuid.uuid4()).encode())],
            )
        handed_over = time.time()
        if producer.flush(60):
            raise RuntimeError("the producer could not deliver a group of events")
        return handed_over

    sent = _paced(rate, seconds, per_commit, index, writers, start_at, send)
    out.send_bytes(sent.tobytes())
    out.close()


@dataclass
class Load:
    rate: float  # asked for
    seconds: float
    writers: int
    per_commit: int
    started: float  # wall time the writers started
    commits: list[array.array[float]]  # per writer, per transaction
    topics: int = field(default=1)

    @property
    def written(self) -> int:
        return sum(len(c) for c in self.commits) * self.per_commit

    def latencies(self, receiver: Receiver) -> tuple[list[tuple[float, float]], int]:
        """([(commit time, latency in ms)] of every arrived event, number missing)."""
        out, missing = [], 0
        n, per = self.writers, self.per_commit
        arrived = receiver.arrived
        for w, commits in enumerate(self.commits):
            for t, committed in enumerate(commits):
                for j in range(per):
                    at = arrived[w + n * (t * per + j)]
                    if at:
                        out.append((committed, 1000 * (at - committed)))
                    else:
                        missing += 1
        return out, missing


def capacity(rate: float, seconds: float) -> int:
    writers, per_commit = shape(rate)
    return int(rate * seconds * 1.2) + 2 * writers * per_commit + 10


def write(database_url: str, plan: Plan, receiver: Receiver, relay: common.Relay) -> Load:
    """Run the writers to the end; their commit times. Stops them and raises as soon as the
    relay exits with an error."""
    return _run_writers(_writer, database_url, plan, receiver, relay.check)


def produce(bootstrap: str, plan: Plan, receiver: Receiver) -> Load:
    """The same load as :func:`write`, sent straight to Kafka; the send times."""
    return _run_writers(_producer, bootstrap, plan, receiver, lambda: None)


def _run_writers(
    target: Callable[..., None],
    address: str,
    plan: Plan,
    receiver: Receiver,
    check: Callable[[], None],
) -> Load:
    rate, seconds = plan.rate, plan.seconds
    writers, per_commit = shape(rate)
    plan.start_at = time.time() + 1.0  # every writer started and connected by then
    receiver.following.set()
    args = (address, plan.topics, plan.rotate_s, rate / writers, seconds, per_commit)
    commits = run_processes(target, args, writers, plan.start_at, check)
    return Load(rate, seconds, writers, per_commit, plan.start_at, commits, len(plan.topics))


def run_processes(
    target: Callable[..., None],
    args: tuple[object, ...],
    count: int,
    start_at: float,
    check: Callable[[], None],
) -> list[array.array[float]]:
    """Run ``count`` processes of ``target`` (each called with ``*args, index, count,
    start_at`` and the sending end of a pipe) to the end; the times each sent back, in index
    order. ``check`` is called while waiting (it raises to stop them all); a process that exits
    with an error raises too."""
    ctx = multiprocessing.get_context("spawn")
    procs, pipes = [], []
    for index in range(count):
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=target, args=(*args, index, count, start_at, send))
        proc.start()
        send.close()
        procs.append(proc)
        pipes.append(receive)
    commits = []
    try:
        for proc, pipe in zip(procs, pipes, strict=True):
            while not pipe.poll(0.5):
                check()
                if not proc.is_alive():
                    break
            try:
                data = pipe.recv_bytes()
            except EOFError:
                data = b""
            proc.join()
            if proc.exitcode != 0:
                raise RuntimeError(f"writer exited with code {proc.exitcode}")
            times = array.array("d")
            times.frombytes(data)
            commits.append(times)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join()
    return commits


def summary(
    samples: list[tuple[float, float]],
    missing: int,
    load: Load,
    receiver: Receiver,
) -> dict[str, Any]:
    ordered = sorted(latency for _, latency in samples)
    return {
        "rate": load.rate,
        "achieved_rate": load.written / load.seconds,
        "writers": load.writers,
        "events_per_commit": load.per_commit,
        "topics": load.topics,
        "written": load.written,
        "delivered": len(ordered),
        "missing": missing,
        "duplicates": receiver.duplicates,
        "consumer_errors": dict(receiver.errors),
        "p50_ms": common.percentile(ordered, 50),
        "p99_ms": common.percentile(ordered, 99),
        "p999_ms": common.percentile(ordered, 99.9),
        "max_ms": ordered[-1] if ordered else math.nan,
    }


@contextlib.contextmanager
def steady(
    env: common.Env, database_url: str, rate: float, seconds: float, *relay_args: str
) -> Iterator[tuple[common.Relay, Receiver, Plan]]:
    """The plan's topics, a running relay (warmed up) and a receiver following the plan."""
    with env.topics(Plan.topics_needed(rate, seconds)) as topics:
        plan = Plan(rate, seconds, topics)
        relay = common.Relay(env, database_url, *relay_args)
        try:
            with Receiver(env.bootstrap, plan, capacity(rate, seconds)) as receiver:
                warm_up(database_url, topics[0], receiver, relay)
                yield relay, receiver, plan
                relay.check()
        finally:
            relay.stop()
