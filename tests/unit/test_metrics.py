"""outbox_relay.metrics without servers: the breaker mapping, counting outcomes, the health
logic, and the HTTP endpoints on a local port."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from outbox import testing
from outbox.errors import ConfigurationError
from outbox_relay.backoff import BreakerState
from outbox_relay.config import RelaySettings
from outbox_relay.metrics import (
    BREAKER_STATE_VALUES,
    BROKER_CHECK_CACHE_S,
    Health,
    MetricsServer,
    RelayMetrics,
    breaker_state_value,
    delivered_topics,
    failure_reasons,
    heartbeat_timeout,
)
from outbox_relay.ports import ClaimedRow, Outcome, Result

#: Every metric family docs/metrics.md documents (counters without their _total suffix).
DOCUMENTED = {
    "outbox_relay_events_published",
    "outbox_relay_delivery_failures",
    "outbox_relay_events_dead_lettered",
    "outbox_relay_batch_size",
    "outbox_relay_batch_duration_seconds",
    "outbox_relay_backlog_events",
    "outbox_relay_oldest_unpublished_age_seconds",
    "outbox_relay_shards_owned",
    "outbox_relay_circuit_breaker_state",
    "outbox_relay_purged_rows",
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def row(row_id: int, topic: str) -> ClaimedRow:
    return ClaimedRow(row_id, f"e{row_id}", topic, None, b"", (), (), 0)


def samples(metrics: RelayMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    body, _ = metrics.exposition("")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_breaker_states_map_to_0_1_2_worse_is_higher() -> None:
    assert breaker_state_value(BreakerState.CLOSED) == 0
    assert breaker_state_value(BreakerState.HALF_OPEN) == 1
    assert breaker_state_value(BreakerState.OPEN) == 2
    assert set(BREAKER_STATE_VALUES) == set(BreakerState)


def test_heartbeat_timeout_is_at_least_30_s_and_covers_one_step() -> None:
    default = RelaySettings("postgresql://x@h/db", "k:9092")
    assert heartbeat_timeout(default) >= 30.0
    slow = RelaySettings("postgresql://x@h/db", "k:9092", delivery_timeout=120, poll_interval=5)
    assert heartbeat_timeout(slow) >= 120 + 5 + 3 * 5
    quick = RelaySettings(
        "postgresql://x@h/db", "k:9092", delivery_timeout=1, statement_timeout=1, poll_interval=0.1
    )
    assert heartbeat_timeout(quick) == 30.0


def test_outcomes_are_counted_by_topic_and_by_reason() -> None:
    rows = [row(1, "a"), row(2, "a"), row(3, "b"), row(4, "b"), row(5, "c")]
    outcomes = [
        Outcome(1, Result.DELIVERED),
        Outcome(2, Result.DELIVERED),
        Outcome(3, Result.DELIVERED),
        Outcome(4, Result.RETRY, "UNKNOWN_TOPIC_OR_PART"),
        Outcome(5, Result.BROKER, "_TRANSPORT"),
    ]
    assert delivered_topics(rows, outcomes) == {"a": 2, "b": 1}
    assert failure_reasons(outcomes) == {"retry": 1, "broker": 1}


def test_every_documented_metric_is_exposed_on_a_registry_of_its_own() -> None:
    first, second = RelayMetrics(), RelayMetrics()  # no clash: separate registries
    rows = [row(1, "a"), row(2, "b")]
    first.observe_batch(rows, [Outcome(1, Result.DELIVERED), Outcome(2, Result.PERMANENT)], 0.2)
    first.events_dead_lettered.inc()
    first.set_backlog(7, 12.5)
    first.shards_owned.set(256)
    first.set_breaker(BreakerState.OPEN)

    body, content_type = first.exposition("")
    assert content_type.startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert names >= DOCUMENTED

    values = samples(first)
    assert values[("outbox_relay_events_published_total", (("topic", "a"),))] == 1
    assert values[("outbox_relay_delivery_failures_total", (("reason", "permanent"),))] == 1
    assert values[("outbox_relay_events_dead_lettered_total", ())] == 1
    assert values[("outbox_relay_batch_size_count", ())] == 1
    assert values[("outbox_relay_batch_size_sum", ())] == 2
    assert values[("outbox_relay_batch_duration_seconds_sum", ())] == pytest.approx(0.2)
    assert values[("outbox_relay_backlog_events", ())] == 7
    assert values[("outbox_relay_oldest_unpublished_age_seconds", ())] == 12.5
    assert values[("outbox_relay_shards_owned", ())] == 256
    assert values[("outbox_relay_circuit_breaker_state", ())] == 2
    assert samples(second)[("outbox_relay_backlog_events", ())] == 0
    reasons = {"retry", "permanent", "broker", "not_sent"}  # at 0 before any failure
    failures = "outbox_relay_delivery_failures_total"
    assert {samples(second)[(failures, (("reason", r),))] for r in reasons} == {0}


def test_openmetrics_is_served_when_asked_for() -> None:
    body, content_type = RelayMetrics().exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_liveness_fails_after_the_heartbeat_goes_stale() -> None:
    clock = FakeClock()
    health = Health(stale_after=30.0, clock=clock)
    assert health.live() == (True, "ok")
    clock.now += 29
    assert health.live()[0]
    clock.now += 2
    ok, reason = health.live()
    assert not ok
    assert "silent for 31 s" in reason
    health.beat()
    assert health.live()[0]


def test_readiness_needs_schema_database_and_broker() -> None:
    clock = FakeClock()
    broker_down: list[str] = []
    calls: list[float] = []

    def probe(timeout: float) -> None:
        calls.append(timeout)
        if broker_down:
            raise RuntimeError(broker_down[0])

    health = Health(stale_after=30.0, probe_broker=probe, clock=clock)
    ok, reason = health.ready()
    assert not ok
    assert "schema" in reason
    assert "database" in reason

    health.schema_current = health.database_ok = True
    clock.now += 10
    assert health.ready() == (True, "ok")

    broker_down.append("cannot reach Kafka at k:9092")
    assert health.ready() == (True, "ok"), "the broker's answer is cached for a moment"
    clock.now += BROKER_CHECK_CACHE_S
    ok, reason = health.ready()
    assert not ok
    assert reason == "kafka: cannot reach Kafka at k:9092"

    health.database_ok = False
    clock.now += BROKER_CHECK_CACHE_S
    broker_down.clear()
    ok, reason = health.ready()
    assert (ok, reason) == (False, "database: unreachable (reconnecting)")
    assert len(calls) == 4
    assert all(0 < t <= 2 for t in calls)


@pytest.fixture
def server() -> Iterator[tuple[RelayMetrics, str]]:
    metrics = RelayMetrics(health=Health(stale_after=30.0))
    srv = MetricsServer(metrics, "127.0.0.1", testing.free_port())
    srv.start()
    host, port = srv.address
    try:
        yield metrics, f"http://{host}:{port}"
    finally:
        srv.close()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - http to localhost
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_http_endpoints(server: tuple[RelayMetrics, str]) -> None:
    metrics, base = server
    metrics.set_backlog(3, 1.0)
    status, body = get(f"{base}/metrics")
    assert status == 200
    assert "outbox_relay_backlog_events 3.0" in body
    assert get(f"{base}/healthz") == (200, "ok\n")
    status, body = get(f"{base}/readyz")
    assert status == 503
    assert "schema: not checked yet" in body
    metrics.health.schema_current = metrics.health.database_ok = True
    assert get(f"{base}/readyz") == (200, "ok\n")
    assert get(f"{base}/nothing")[0] == 404


def test_port_in_use_is_a_configuration_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigurationError, match=f"127.0.0.1:{port}"):
            MetricsServer(RelayMetrics(), "127.0.0.1", port)


def test_the_docs_document_every_metric() -> None:
    """docs/metrics.md names each metric as it is exposed, and the probes."""
    section = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    counters = {
        "outbox_relay_events_published",
        "outbox_relay_delivery_failures",
        "outbox_relay_events_dead_lettered",
        "outbox_relay_purged_rows",
    }
    for name in DOCUMENTED:
        exposed = f"{name}_total" if name in counters else name
        assert f"`{exposed}`" in section, name
    for path in ("/metrics", "/healthz", "/readyz"):
        assert path in section
