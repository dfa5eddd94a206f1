"""Prometheus metrics and health probes of one relay process, served over HTTP by a daemon
thread.

Enabled by ``outbox-relay run --metrics-port N``; without it nothing here is created and the
relay loop takes its plain path. Every metric lives on a registry of the relay's own (not
prometheus-client's global default), so several relays can live in one process (tests). A relay
serves one outbox or several, each with its own loop: every series of an outbox carries the
label ``outbox`` (its name), through the ``OutboxMetrics`` that ``RelayMetrics.for_outbox``
gives its loop.

The loop threads only update in-memory values (counters, gauges, a heartbeat timestamp, a
"last database operation succeeded" flag): they never wait for the HTTP thread. The HTTP thread
answers ``/readyz``'s broker question itself, with a short, cached metadata request.

Paths:

- ``/metrics``: the Prometheus text format (OpenMetrics when the scraper asks for it).
- ``/healthz``: 200 while some loop records a heartbeat at least every ``stale_after`` seconds,
  503 otherwise (the relay is stuck; restarting the process is the cure).
- ``/readyz``: 200 when the broker answered a metadata request and, unless the relay serves
  several outboxes (``isolated``), when its outbox's schema was found current at start and its
  last database operation succeeded; else 503 with the reasons, one a line (``.health``).
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter as Tally
from collections.abc import Iterable, Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder

from outbox.errors import ConfigurationError
from outbox_relay.backoff import BreakerState
from outbox_relay.config import RelaySettings
from outbox_relay.health import (
    BROKER_CHECK_CACHE_S,
    BROKER_CHECK_TIMEOUT_S,
    Health,
    OutboxHealth,
)
from outbox_relay.ports import ClaimedRow, Outcome, Result

__all__ = [
    "BROKER_CHECK_CACHE_S",
    "BROKER_CHECK_TIMEOUT_S",
    "Health",
    "MetricsServer",
    "OutboxHealth",
    "OutboxMetrics",
    "RelayMetrics",
]

log = structlog.get_logger("relay.metrics")

PREFIX = "outbox_relay_"
#: The label naming the outbox a series is about.
OUTBOX = "outbox"
#: Every reason of ``delivery_failures``, exported at 0 from the start.
REASONS = tuple(r.value for r in Result if r is not Result.DELIVERED)

#: The circuit breaker gauge's values: higher is worse, so ``> 0`` means "not closed".
BREAKER_STATE_VALUES: Mapping[BreakerState, int] = MappingProxyType(
    {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
)

BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
BATCH_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def breaker_state_value(state: BreakerState) -> int:
    """The circuit breaker gauge's value for ``state``: 0 closed, 1 half-open, 2 open."""
    return BREAKER_STATE_VALUES[state]


def heartbeat_timeout(settings: RelaySettings) -> float:
    """Seconds without a loop heartbeat after which ``/healthz`` says the relay is stuck.

    One step of a healthy loop is bounded by a claim (statement timeout), a publish (delivery
    timeout plus the publisher's 5 s margin) and a wait (a poll interval); never less than 30 s.
    """
    step = settings.statement_timeout + settings.delivery_timeout + 5.0
    return max(30.0, 3 * settings.poll_interval + step)


def failure_reasons(outcomes: Iterable[Outcome]) -> Tally[str]:
    """Undelivered outcomes counted by reason (the ``Result`` value: retry, permanent, ...)."""
    return Tally(o.result.value for o in outcomes if o.result is not Result.DELIVERED)


def delivered_topics(rows: Sequence[ClaimedRow], outcomes: Iterable[Outcome]) -> Tally[str]:
    """Delivered rows counted by topic."""
    topic_of = {row.id: row.topic for row in rows}
    return Tally(topic_of[o.row_id] for o in outcomes if o.result is Result.DELIVERED)


class _Declare:
    """Declares the relay's metrics on one registry, each name with the relay's prefix."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def counter(self, name: str, help: str, *labels: str) -> Counter:
        return Counter(PREFIX + name, help, labels, registry=self.registry)

    def gauge(self, name: str, help: str, *labels: str) -> Gauge:
        return Gauge(PREFIX + name, help, labels, registry=self.registry)

    def histogram(self, name: str, help: str, buckets: Sequence[float]) -> Histogram:
        return Histogram(PREFIX + name, help, [OUTBOX], buckets=buckets, registry=self.registry)


class RelayMetrics:
    """Every metric of one relay process, on a registry of its own, plus its health state.

    The series of each outbox it serves carry the label ``outbox``; ``for_outbox(name)`` is
    what that outbox's loop reports to, ``forget_outbox(name)`` takes its series away.
    """

    def __init__(
        self,
        *,
        health: Health | None = None,
        registry: CollectorRegistry | None = None,
        isolated: bool = False,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.health = health if health is not None else Health(stale_after=30.0)
        self.isolated = isolated
        self._outboxes: dict[str, OutboxMetrics] = {}
        self._outboxes_lock = threading.Lock()
        #: The outboxes of the relay's list, as ``outbox_listed`` has them.
        self._listed: set[str] = set()
        new = _Declare(self.registry)
        self.outboxes_served = new.gauge(
            "outboxes_served", "Outboxes this relay serves (each with its own loop)."
        )
        self.listed = new.gauge(
            "outbox_listed",
            "1 for each outbox of this relay's list (--outboxes, or its --database-url), served"
            " by this relay or another: what OutboxUnserved compares with outbox_up.",
            OUTBOX,
        )
        self.up = new.gauge(
            "outbox_up",
            "1 while this relay serves the outbox and its database and schema are fine, 0 while"
            " the outbox fails (database down or dropped, schema missing) and is retried.",
            OUTBOX,
        )
        self.events_published = new.counter(
            "events_published",
            "Events delivered to Kafka (acknowledged) and marked published, by topic.",
            OUTBOX,
            "topic",
        )
        self.delivery_failures = new.counter(
            "delivery_failures",
            "Events of a batch not delivered, by reason: retry (the row failed), permanent "
            "(dead-lettered at once), broker (Kafka failed), not_sent (held back or no report).",
            OUTBOX,
            "reason",
        )
        self.events_dead_lettered = new.counter(
            "events_dead_lettered", "Events dead-lettered (kept with dead_lettered_at set).", OUTBOX
        )
        self.purged_rows = new.counter(
            "purged_rows",
            "Published rows past --retention deleted one by one by this relay's purge (rows"
            " marked in place by an earlier version, or caught by the default partition).",
            OUTBOX,
        )
        self.purged_partitions = new.counter(
            "purged_partitions",
            "Partitions of published events past --retention dropped whole by this relay.",
            OUTBOX,
        )
        self.purge_overdue = new.gauge(
            "purge_overdue_seconds",
            "Seconds the oldest published event kept is past --retention plus its partition's"
            " span (0 when none is; set by the relay that purges, the owner of shard 0).",
            OUTBOX,
        )
        self.batch_size = new.histogram("batch_size", "Rows per claimed batch.", BATCH_SIZE_BUCKETS)
        self.batch_duration = new.histogram(
            "batch_duration_seconds",
            "Seconds from claiming a batch to committing its outcomes.",
            BATCH_DURATION_BUCKETS,
        )
        self.backlog = new.gauge(
            "backlog_events",
            "Unpublished, not dead-lettered events in the whole outbox (all shards).",
            OUTBOX,
        )
        self.oldest_unpublished_age = new.gauge(
            "oldest_unpublished_age_seconds",
            "Age of the oldest unpublished, not dead-lettered event (0 when none).",
            OUTBOX,
        )
        self.scheduled = new.gauge(
            "scheduled_events",
            "Events scheduled for later delivery (deliver_at, delay) that have not fallen due"
            " and been moved into the outbox yet; not part of backlog_events.",
            OUTBOX,
        )
        self.next_due = new.gauge(
            "next_due_timestamp_seconds",
            "Unix time at which the next scheduled event falls due; absent while none is"
            " scheduled.",
            OUTBOX,
        )
        self.shards_owned = new.gauge("shards_owned", "Shards this relay owns (of 256).", OUTBOX)
        self.circuit_breaker_state = new.gauge(
            "circuit_breaker_state",
            "Kafka circuit breaker: 0 closed, 1 half-open (probing), 2 open (not claiming).",
            OUTBOX,
        )
        ProcessCollector(registry=self.registry)  # process_* (memory, CPU, fds) on Linux

    @property
    def isolated(self) -> bool:
        """Whether the relay serves several outboxes: then their failures leave it ready."""
        return self.health.isolated

    @isolated.setter
    def isolated(self, isolated: bool) -> None:
        self.health.isolated = isolated

    def outbox_families(self) -> tuple[Counter | Gauge | Histogram, ...]:
        """The metrics labelled with the outbox alone."""
        return (
            self.up,
            self.events_dead_lettered,
            self.purged_rows,
            self.purged_partitions,
            self.purge_overdue,
            self.batch_size,
            self.batch_duration,
            self.backlog,
            self.oldest_unpublished_age,
            self.scheduled,
            self.next_due,
            self.shards_owned,
            self.circuit_breaker_state,
        )

    # Called by the fleet: which outboxes the relay serves.

    def for_outbox(self, name: str) -> OutboxMetrics:
        """What the loop of the outbox ``name`` reports to (the same series for the same name)."""
        with self._outboxes_lock:
            if name not in self._outboxes:
                self._outboxes[name] = OutboxMetrics(self, name)
                self.outboxes_served.set(len(self._outboxes))
            return self._outboxes[name]

    def forget_outbox(self, name: str) -> None:
        """The relay stopped serving ``name``: its series and its health leave this relay."""
        with self._outboxes_lock:  # a for_outbox(name) meanwhile gets series of its own
            outbox = self._outboxes.pop(name, None)
            self.outboxes_served.set(len(self._outboxes))
            if outbox is not None:
                outbox.detach()
            self.health.forget(name)

    def set_listed(self, names: Iterable[str]) -> None:
        """The outboxes of the relay's list now (those gone from it leave the gauge)."""
        wanted = set(names)
        with self._outboxes_lock:
            for name in self._listed - wanted:
                self.listed.remove(name)
            for name in wanted:
                self.listed.labels(outbox=name).set(1)
            self._listed = wanted

    def set_outboxes_served(self, count: int) -> None:
        """Say how many outboxes the relay serves (``for_outbox`` and ``forget_outbox`` keep
        the gauge at the number of outboxes they track already)."""
        self.outboxes_served.set(count)

    def beat(self) -> None:
        """The relay's own loop (the fleet's supervisor) is alive."""
        self.health.beat()

    # Read by the HTTP thread.

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The registry's metrics in the format the scraper accepts; (body, content type)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class OutboxMetrics:
    """The series of one outbox (label ``outbox=<name>``), and its part of the health state:
    the ``outbox_relay.ports.Metrics`` its loop reports to."""

    wants_backlog = True

    def __init__(self, relay: RelayMetrics, name: str) -> None:
        self.name = name
        self.health = relay.health.outbox(name)
        self._relay = relay
        self._topics: set[str] = set()
        self._lock = threading.Lock()
        self._detached = False
        self._up = relay.up.labels(name)
        self._up.set(0)
        self._dead_lettered = relay.events_dead_lettered.labels(name)
        self._purged_rows = relay.purged_rows.labels(name)
        self._purged_partitions = relay.purged_partitions.labels(name)
        self._purge_overdue = relay.purge_overdue.labels(name)
        self._batch_size = relay.batch_size.labels(name)
        self._batch_duration = relay.batch_duration.labels(name)
        self._backlog = relay.backlog.labels(name)
        self._oldest_age = relay.oldest_unpublished_age.labels(name)
        self._scheduled = relay.scheduled.labels(name)
        self._shards_owned = relay.shards_owned.labels(name)
        self._breaker = relay.circuit_breaker_state.labels(name)
        self._failures = {
            reason: relay.delivery_failures.labels(name, reason) for reason in REASONS
        }

    def beat(self) -> None:
        self.health.beat()

    def database_ok(self, ok: bool) -> None:
        self.health.database_ok = ok

    def schema_checked(self) -> None:
        self.health.schema_current = True

    def outbox_up(self, up: bool) -> None:
        self._up.set(1 if up else 0)

    def dead_lettered(self, count: int) -> None:
        self._dead_lettered.inc(count)

    def purged(self, count: int) -> None:
        self._purged_rows.inc(count)

    def partitions_dropped(self, count: int, *, overdue: float) -> None:
        self._purged_partitions.inc(count)
        self._purge_overdue.set(overdue)

    def set_shards_owned(self, count: int) -> None:
        self._shards_owned.set(count)

    def observe_batch(
        self, rows: Sequence[ClaimedRow], outcomes: Sequence[Outcome], seconds: float
    ) -> None:
        self._batch_size.observe(len(rows))
        self._batch_duration.observe(seconds)
        for topic, count in delivered_topics(rows, outcomes).items():
            published = self._published(topic)
            if published is not None:
                published.inc(count)
        for reason, count in failure_reasons(outcomes).items():
            self._failures[reason].inc(count)

    def set_backlog(self, events: int, oldest_age: float) -> None:
        self._backlog.set(events)
        self._oldest_age.set(max(0.0, oldest_age))

    def set_scheduled(self, events: int, next_due: float | None) -> None:
        self._scheduled.set(events)
        with self._lock:  # a series removed by ``detach`` stays removed
            if self._detached:
                return
            if next_due is None:  # no value rather than a made-up one: the series goes
                with contextlib.suppress(KeyError):
                    self._relay.next_due.remove(self.name)
            else:
                self._relay.next_due.labels(self.name).set(next_due)

    def set_breaker(self, state: BreakerState) -> None:
        self._breaker.set(breaker_state_value(state))

    def _published(self, topic: str) -> Counter | None:
        """The topic's counter; None once the outbox is forgotten, so that a loop still
        finishing its batch does not bring the outbox's series back."""
        with self._lock:
            if self._detached:
                return None
            self._topics.add(topic)
            return self._relay.events_published.labels(self.name, topic)

    def detach(self) -> None:
        """Remove every series of this outbox from the relay's registry."""
        with self._lock:
            self._detached = True
            topics = sorted(self._topics)
        relay = self._relay
        removals: list[tuple[Counter | Gauge | Histogram, tuple[str, ...]]] = [
            *((family, (self.name,)) for family in relay.outbox_families()),
            *((relay.events_published, (self.name, topic)) for topic in topics),
            *((relay.delivery_failures, (self.name, reason)) for reason in REASONS),
        ]
        for family, labels in removals:
            with contextlib.suppress(KeyError):  # older prometheus-client raises when absent
                family.remove(*labels)


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a ThreadingHTTPServer in a daemon thread."""

    def __init__(self, metrics: RelayMetrics, host: str, port: int) -> None:
        handler = type("Handler", (_Handler,), {"metrics": metrics})
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot serve metrics on {host}:{port} (--metrics-host/--metrics-port): "
                f"{exc.strerror or exc}"
            ) from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="outbox-relay-metrics", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        self._thread.start()
        host, port = self.address
        log.info("metrics.serving", host=host, port=port)

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    metrics: RelayMetrics
    server_version = "outbox-relay"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body, content_type = self.metrics.exposition(self.headers.get("Accept", ""))
            self._send(HTTPStatus.OK, body, content_type)
        elif path == "/healthz":
            self._answer(*self.metrics.health.live())
        elif path == "/readyz":
            self._answer(*self.metrics.health.ready())
        else:
            self._answer(
                False, "not found: try /metrics, /healthz or /readyz", HTTPStatus.NOT_FOUND
            )

    def _answer(
        self, ok: bool, text: str, failure: HTTPStatus = HTTPStatus.SERVICE_UNAVAILABLE
    ) -> None:
        status = HTTPStatus.OK if ok else failure
        self._send(status, f"{text}\n".encode(), "text/plain; charset=utf-8")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the scraper left
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes and probes are not logged (one line every few seconds otherwise)."""
