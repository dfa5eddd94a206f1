"""Prometheus metrics and health probes of one relay, served over HTTP by a daemon thread.

Enabled by ``outbox-relay run --metrics-port N``; without it nothing here is created and the
relay loop takes its plain path. Every metric lives on a registry of the relay's own (not
prometheus-client's global default), so several relays can live in one process (tests).

The loop thread only updates in-memory values (counters, gauges, a heartbeat timestamp, a
"last database operation succeeded" flag): it never waits for the HTTP thread. The HTTP thread
answers ``/readyz``'s broker question itself, with a short, cached metadata request.

Paths:

- ``/metrics``: the Prometheus text format (OpenMetrics when the scraper asks for it).
- ``/healthz``: 200 while the loop records a heartbeat at least every ``stale_after`` seconds,
  503 otherwise (the loop is stuck; restarting the process is the cure).
- ``/readyz``: 200 when the schema was found current at start, the last database operation
  succeeded, and the broker answered a metadata request; else 503 with the reasons, one a line.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder

from outbox.errors import ConfigurationError, one_line
from outbox_relay.backoff import BreakerState
from outbox_relay.config import RelaySettings
from outbox_relay.ports import ClaimedRow, Outcome, Result

log = structlog.get_logger("relay.metrics")

PREFIX = "outbox_relay_"

#: The circuit breaker gauge's values: higher is worse, so ``> 0`` means "not closed".
BREAKER_STATE_VALUES: Mapping[BreakerState, int] = MappingProxyType(
    {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
)

#: How long a broker answer to ``/readyz`` is reused, and how long one question may take.
BROKER_CHECK_CACHE_S = 1.5
BROKER_CHECK_TIMEOUT_S = 1.0

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


class Health:
    """What ``/healthz`` and ``/readyz`` answer: set by the loop, read by the HTTP thread."""

    def __init__(
        self,
        *,
        stale_after: float,
        probe_broker: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stale_after = stale_after
        self._probe_broker = probe_broker
        self._clock = clock
        self._last_beat = clock()
        #: Whether the loop's last database operation succeeded (False until connected).
        self.database_ok = False
        #: Whether the schema was found current at start.
        self.schema_current = False
        self._broker_lock = threading.Lock()
        self._broker_checked_at: float | None = None
        self._broker_error: str | None = None

    def beat(self) -> None:
        """The loop is alive (called once per step)."""
        self._last_beat = self._clock()

    def live(self) -> tuple[bool, str]:
        silent = self._clock() - self._last_beat
        if silent > self.stale_after:
            return False, f"relay loop silent for {silent:.0f} s (limit {self.stale_after:g} s)"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        reasons = []
        if not self.schema_current:
            reasons.append("schema: not checked yet")
        if not self.database_ok:
            reasons.append("database: unreachable (reconnecting)")
        broker_error = self._broker()
        if broker_error is not None:
            reasons.append(f"kafka: {broker_error}")
        return (not reasons, "\n".join(reasons) or "ok")

    def _broker(self) -> str | None:
        """None when the broker answered lately, else why not (asked at most every 1.5 s)."""
        if self._probe_broker is None:
            return None
        with self._broker_lock:
            now = self._clock()
            fresh = self._broker_checked_at is not None and (
                now - self._broker_checked_at < BROKER_CHECK_CACHE_S
            )
            if not fresh:
                try:
                    self._probe_broker(BROKER_CHECK_TIMEOUT_S)
                    self._broker_error = None
                except Exception as exc:  # any failure means "not ready", with its reason
                    self._broker_error = one_line(exc)
                self._broker_checked_at = self._clock()
            return self._broker_error


class _Declare:
    """Declares the relay's metrics on one registry, each name with the relay's prefix."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def counter(self, name: str, help: str, *labels: str) -> Counter:
        return Counter(PREFIX + name, help, labels, registry=self.registry)

    def gauge(self, name: str, help: str) -> Gauge:
        return Gauge(PREFIX + name, help, registry=self.registry)

    def histogram(self, name: str, help: str, buckets: Sequence[float]) -> Histogram:
        return Histogram(PREFIX + name, help, buckets=buckets, registry=self.registry)


class RelayMetrics:
    """Every metric of one relay, on a registry of its own, plus its health state."""

    def __init__(
        self, *, health: Health | None = None, registry: CollectorRegistry | None = None
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.health = health if health is not None else Health(stale_after=30.0)
        new = _Declare(self.registry)
        self.events_published = new.counter(
            "events_published",
            "Events delivered to Kafka (acknowledged) and marked published, by topic.",
            "topic",
        )
        self.delivery_failures = new.counter(
            "delivery_failures",
            "Events of a batch not delivered, by reason: retry (the row failed), permanent "
            "(dead-lettered at once), broker (Kafka failed), not_sent (held back or no report).",
            "reason",
        )
        for result in Result:  # every reason exported from the start, at 0
            if result is not Result.DELIVERED:
                self.delivery_failures.labels(reason=result.value)
        self.events_dead_lettered = new.counter(
            "events_dead_lettered", "Events dead-lettered (kept with dead_lettered_at set)."
        )
        self.purged_rows = new.counter(
            "purged_rows",
            "Published rows past --retention deleted one by one by this relay's purge (rows"
            " marked in place by an earlier version, or caught by the default partition).",
        )
        self.purged_partitions = new.counter(
            "purged_partitions",
            "Partitions of published events past --retention dropped whole by this relay.",
        )
        self.purge_overdue = new.gauge(
            "purge_overdue_seconds",
            "Seconds the oldest published event kept is past --retention plus its partition's"
            " span (0 when none is; set by the relay that purges, the owner of shard 0).",
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
        )
        self.oldest_unpublished_age = new.gauge(
            "oldest_unpublished_age_seconds",
            "Age of the oldest unpublished, not dead-lettered event (0 when none).",
        )
        self.shards_owned = new.gauge("shards_owned", "Shards this relay owns (of 256).")
        self.circuit_breaker_state = new.gauge(
            "circuit_breaker_state",
            "Kafka circuit breaker: 0 closed, 1 half-open (probing), 2 open (not claiming).",
        )
        ProcessCollector(registry=self.registry)  # process_* (memory, CPU, fds) on Linux

    # Updated by the loop thread (``outbox_relay.ports.Metrics``).

    wants_backlog = True

    def beat(self) -> None:
        self.health.beat()

    def database_ok(self, ok: bool) -> None:
        self.health.database_ok = ok

    def schema_checked(self) -> None:
        self.health.schema_current = True

    def dead_lettered(self, count: int) -> None:
        self.events_dead_lettered.inc(count)

    def purged(self, count: int) -> None:
        self.purged_rows.inc(count)

    def partitions_dropped(self, count: int, *, overdue: float) -> None:
        self.purged_partitions.inc(count)
        self.purge_overdue.set(overdue)

    def set_shards_owned(self, count: int) -> None:
        self.shards_owned.set(count)

    def observe_batch(
        self, rows: Sequence[ClaimedRow], outcomes: Sequence[Outcome], seconds: float
    ) -> None:
        self.batch_size.observe(len(rows))
        self.batch_duration.observe(seconds)
        for topic, count in delivered_topics(rows, outcomes).items():
            self.events_published.labels(topic=topic).inc(count)
        for reason, count in failure_reasons(outcomes).items():
            self.delivery_failures.labels(reason=reason).inc(count)

    def set_backlog(self, events: int, oldest_age: float) -> None:
        self.backlog.set(events)
        self.oldest_unpublished_age.set(max(0.0, oldest_age))

    def set_breaker(self, state: BreakerState) -> None:
        self.circuit_breaker_state.set(breaker_state_value(state))

    # Read by the HTTP thread.

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The registry's metrics in the format the scraper accepts; (body, content type)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


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
