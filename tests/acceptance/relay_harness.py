"""Helpers for the relay's acceptance tests: the relay as a subprocess, a reader of everything
on a topic, and a TCP proxy that can cut the relay off from the broker."""

from __future__ import annotations

import contextlib
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

import outbox
from outbox import testing

RELAY = [sys.executable, "-m", "outbox_relay"]


def create_topic(bootstrap: str, partitions: int = 3) -> str:
    """A new topic with a unique name."""
    name = testing.unique_name("relay").replace("_", "-")
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])[
        name
    ].result(timeout=30)
    return name


def write_events(database_url: str, topic: str, count: int, keys: int) -> list[str]:
    """``count`` events over ``keys`` keys (key-{i % keys}), in id order; returns event ids."""
    events = [
        outbox.Event(topic, {"n": i}, key=f"key-{i % keys}", headers={"n": str(i)})
        for i in range(count)
    ]
    with psycopg.connect(database_url) as conn:
        ids = outbox.add_many(conn, events)
    return [str(i) for i in ids]


def relay_args(database_url: str, bootstrap: str, *extra: str) -> list[str]:
    """Command line of a relay with short timeouts suited to tests."""
    return [
        *RELAY,
        "--log-format",
        "json",
        "run",
        "--database-url",
        database_url,
        "--kafka-bootstrap-servers",
        bootstrap,
        "--poll-interval",
        "0.2",
        "--rebalance-interval",
        "0.5",
        "--backoff-base",
        "0.05",
        "--backoff-cap",
        "0.5",
        "--delivery-timeout",
        "5",
        "--breaker-cooldown",
        "0.5",
        *extra,
    ]


def start_relay(
    database_url: str, bootstrap: str, *extra: str, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start a relay; its output goes to ``log`` (or is discarded)."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    try:
        return subprocess.Popen(
            relay_args(database_url, bootstrap, *extra), stdout=out, stderr=subprocess.STDOUT
        )
    finally:
        if log:  # the child has its own copy; an open one here is a ResourceWarning (an error)
            out.close()  # type: ignore[union-attr]


def run_relay(
    database_url: str, bootstrap: str, *extra: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a relay to completion (use --exit-when-idle) and capture its output."""
    return subprocess.run(
        relay_args(database_url, bootstrap, *extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    """Send ``sig`` and wait for the process; kill it if it overstays."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def unpublished(database_url: str) -> int:
    """Rows neither published nor dead-lettered."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM outbox_events"
            " WHERE published_at IS NULL AND dead_lettered_at IS NULL"
        ).fetchone()
    assert row is not None
    return int(row[0])


def wait_until(predicate: object, timeout: float, interval: float = 0.1) -> None:
    """Poll ``predicate()`` until true; AssertionError after ``timeout`` seconds."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


@dataclass(frozen=True)
class Received:
    event_id: str
    key: bytes | None
    partition: int
    offset: int
    headers: dict[str, bytes]


def read_topic(
    bootstrap: str, topic: str, *, expect_ids: set[str], timeout: float = 60
) -> list[Received]:
    """Every message on ``topic`` from the beginning, until all ``expect_ids`` were seen (or
    the timeout) plus a short quiet period to catch trailing duplicates; in offset order per
    partition. Partitions are assigned, not subscribed (no group join)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": topic, "enable.auto.commit": False}
    )
    metadata = consumer.list_topics(topic, timeout=30)
    partitions = sorted(metadata.topics[topic].partitions)
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    received: list[Received] = []
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    quiet_until: float | None = None
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None or msg.error() is not None:
                if quiet_until is not None and time.monotonic() > quiet_until:
                    break
                continue
            headers = dict(msg.headers() or [])
            event_id = headers[outbox.EVENT_ID_HEADER].decode()
            received.append(Received(event_id, msg.key(), msg.partition(), msg.offset(), headers))
            seen.add(event_id)
            if quiet_until is None and expect_ids <= seen:
                quiet_until = time.monotonic() + 1.0
    finally:
        consumer.close()
    return received


def per_key_order_violations(received: Sequence[Received], written_ids: Sequence[str]) -> list[str]:
    """Keys whose first occurrences on Kafka are not in insertion order (empty when fine)."""
    position = {event_id: i for i, event_id in enumerate(written_ids)}
    first_seen: dict[bytes | None, list[int]] = {}
    done: set[str] = set()
    for msg in sorted(received, key=lambda r: (r.partition, r.offset)):
        if msg.event_id in done:
            continue
        done.add(msg.event_id)
        first_seen.setdefault(msg.key, []).append(position[msg.event_id])
    return [repr(k) for k, order in first_seen.items() if order != sorted(order)]


def last_copy_order_violations(
    received: Sequence[Received], written_ids: Sequence[str]
) -> list[str]:
    """Keys whose events' last copies on Kafka are not in insertion order (empty when fine).

    What a compacted topic keeps, and what a consumer that applies every copy ends with: an
    earlier event's copy landing after a later event's last one sets the key back."""
    position = {event_id: i for i, event_id in enumerate(written_ids)}
    last: dict[str, tuple[bytes | None, int]] = {}
    for n, msg in enumerate(sorted(received, key=lambda r: (r.partition, r.offset))):
        last[msg.event_id] = (msg.key, n)
    by_key: dict[bytes | None, list[tuple[int, int]]] = {}
    for event_id, (key, n) in last.items():
        by_key.setdefault(key, []).append((n, position[event_id]))
    return [
        repr(key)
        for key, copies in by_key.items()
        if [p for _, p in sorted(copies)] != sorted(p for _, p in copies)
    ]


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``cut()`` drops every connection and refuses new
    ones until ``restore()``: a broker outage without losing the broker's in-memory data."""

    def __init__(self, target_host: str, target_port: int, port: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.port = port or testing.free_port()
        self._listener: socket.socket | None = None
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._running = True
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._open_listener()
        self._thread.start()

    def _open_listener(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener

    def cut(self) -> None:
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            for a, b in self._pairs:
                for s in (a, b):
                    with contextlib.suppress(OSError):
                        s.close()
            self._pairs.clear()

    def restore(self) -> None:
        with self._lock:
            if self._listener is None:
                self._open_listener()

    def close(self) -> None:
        self._running = False
        self.cut()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        while self._running:
            with self._lock:
                listener = self._listener
                pairs = list(self._pairs)
            sel = selectors.DefaultSelector()
            # Any socket may be closed by cut() between the lock above and here: skip it (the
            # next round sees the new state) instead of letting the proxy thread die.
            if listener is not None:
                with contextlib.suppress(ValueError, KeyError, OSError):
                    sel.register(listener, selectors.EVENT_READ, None)
            for a, b in pairs:
                with contextlib.suppress(ValueError, KeyError, OSError):
                    sel.register(a, selectors.EVENT_READ, b)
                    sel.register(b, selectors.EVENT_READ, a)
            try:
                events = sel.select(timeout=0.05)
            except (OSError, ValueError):
                events = []
            for key, _ in events:
                self._handle(key.fileobj, key.data)  # type: ignore[arg-type]
            sel.close()

    def _handle(self, sock: socket.socket, peer: socket.socket | None) -> None:
        if peer is None:  # the listener: a new client
            try:
                client, _ = sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:  # nothing listens behind the proxy (a broker killed): refuse
                client.close()
                return
            client.setblocking(False)
            upstream.setblocking(False)
            with self._lock:
                self._pairs.append((client, upstream))
            return
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            with contextlib.suppress(OSError):
                peer.setblocking(True)
                peer.sendall(data)
                peer.setblocking(False)
            return
        with self._lock:
            self._pairs = [p for p in self._pairs if sock not in p]
        for s in (sock, peer):
            with contextlib.suppress(OSError):
                s.close()


@contextlib.contextmanager
def broker_behind_proxy(tmp_path: Path) -> Iterator[tuple[str, TcpProxy]]:
    """A broker of its own (the suite's kind) that advertises a proxy's address; yields
    (bootstrap, proxy).

    Clients reach the broker only through the proxy, so cutting the proxy is a broker outage
    that keeps the broker's topics (Tansu's are in memory: a restart would forget them).
    """
    broker_port, proxy_port = testing.free_port(), testing.free_port()
    with testing.broker(broker_port, proxy_port, log_path=tmp_path / "proxied-broker.log"):
        proxy = TcpProxy("127.0.0.1", broker_port, port=proxy_port)
        try:
            yield f"127.0.0.1:{proxy_port}", proxy
        finally:
            proxy.close()
