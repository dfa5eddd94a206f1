"""outbox_relay.metrics without servers: the breaker mapping, counting outcomes, the series
of each outbox (label ``outbox``) and forgetting them, the health logic over several outboxes,
and the HTTP endpoints on a local port."""

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
    "outbox_relay_scheduled_events",
    "outbox_relay_next_due_timestamp_seconds",
    "outbox_relay_shards_owned",
    "outbox_relay_circuit_breaker_state",
    "outbox_relay_purged_rows",
    "outbox_relay_purged_partitions",
    "outbox_relay_purge_overdue_seconds",
    "outbox_relay_outbox_up",
    "outbox_relay_outbox_listed",
    "outbox_relay_outboxes_served",
}

#: The families that carry no ``outbox`` label: the relay process's own.
RELAY_LEVEL = {"outbox_relay_outboxes_served"}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def row(row_id: int, topic: str) -> ClaimedRow:
    return ClaimedRow(row_id, f"e{row_id}", topic, None, b"", (), (), 0)


def samples(metrics: RelayMetrics) -> Samples:
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


def of(values: Samples, outbox: str) -> Samples:
    """The samples labelled ``outbox``, without that label."""
    return {
        (name, tuple(kv for kv in labels if kv[0] != "outbox")): value
        for (name, labels), value in values.items()
        if ("outbox", outbox) in labels
    }


def test_every_documented_metric_is_exposed_on_a_registry_of_its_own() -> None:
    first, second = RelayMetrics(), RelayMetrics()  # no clash: separate registries
    orders = first.for_outbox("orders")
    rows = [row(1, "a"), row(2, "b")]
    orders.observe_batch(rows, [Outcome(1, Result.DELIVERED), Outcome(2, Result.PERMANENT)], 0.2)
    orders.dead_lettered(1)
    orders.set_backlog(7, 12.5)
    orders.set_scheduled(4, 1_900_000_000.5)
    orders.set_shards_owned(256)
    orders.set_breaker(BreakerState.OPEN)
    orders.partitions_dropped(2, overdue=30.0)
    orders.purged(3)
    orders.outbox_up(True)

    body, content_type = first.exposition("")
    assert content_type.startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert names >= DOCUMENTED

    values = of(samples(first), "orders")
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
    assert values[("outbox_relay_purged_partitions_total", ())] == 2
    assert values[("outbox_relay_purge_overdue_seconds", ())] == 30
    assert values[("outbox_relay_purged_rows_total", ())] == 3
    assert values[("outbox_relay_outbox_up", ())] == 1
    assert samples(first)[("outbox_relay_outboxes_served", ())] == 1

    second.for_outbox("billing")
    billing = of(samples(second), "billing")
    assert billing[("outbox_relay_backlog_events", ())] == 0
    assert billing[("outbox_relay_outbox_up", ())] == 0, "down until the loop says it is up"
    reasons = {"retry", "permanent", "broker", "not_sent"}  # at 0 before any failure
    failures = "outbox_relay_delivery_failures_total"
    assert {billing[(failures, (("reason", r),))] for r in reasons} == {0}


def test_every_series_of_an_outbox_carries_its_name() -> None:
    """Two outboxes on one relay: each one's figures under its own label, none unlabelled but
    the relay's own (outboxes served, process_*)."""
    metrics = RelayMetrics()
    orders, billing = metrics.for_outbox("orders"), metrics.for_outbox("billing")
    orders.set_backlog(5, 1.0)
    billing.set_backlog(9, 2.0)
    orders.observe_batch([row(1, "a")], [Outcome(1, Result.DELIVERED)], 0.1)
    values = samples(metrics)
    assert of(values, "orders")[("outbox_relay_backlog_events", ())] == 5
    assert of(values, "billing")[("outbox_relay_backlog_events", ())] == 9
    assert ("outbox_relay_events_published_total", (("topic", "a"),)) in of(values, "orders")
    assert ("outbox_relay_events_published_total", (("topic", "a"),)) not in of(values, "billing")
    unlabelled = {
        name
        for (name, labels), _ in values.items()
        if name.startswith("outbox_relay_") and "outbox" not in dict(labels)
    }
    assert unlabelled == RELAY_LEVEL
    assert values[("outbox_relay_outboxes_served", ())] == 2


def test_for_outbox_twice_reports_to_the_same_series() -> None:
    metrics = RelayMetrics()
    first, again = metrics.for_outbox("orders"), metrics.for_outbox("orders")
    first.dead_lettered(1)
    again.dead_lettered(2)
    assert of(samples(metrics), "orders")[("outbox_relay_events_dead_lettered_total", ())] == 3
    assert samples(metrics)[("outbox_relay_outboxes_served", ())] == 1


def test_outbox_up_says_whether_the_outbox_is_served() -> None:
    metrics = RelayMetrics()
    orders = metrics.for_outbox("orders")
    up = ("outbox_relay_outbox_up", ())
    assert of(samples(metrics), "orders")[up] == 0
    orders.outbox_up(True)
    assert of(samples(metrics), "orders")[up] == 1
    orders.outbox_up(False)
    assert of(samples(metrics), "orders")[up] == 0


def test_the_listed_outboxes_follow_the_list_not_what_the_relay_serves() -> None:
    metrics = RelayMetrics()
    metrics.set_listed(["orders", "billing"])
    metrics.for_outbox("orders")
    metrics.forget_outbox("orders")  # given to another relay: still in the list
    listed = "outbox_relay_outbox_listed"
    found = {labels for (name, labels) in samples(metrics) if name == listed}
    assert found == {(("outbox", "orders"),), (("outbox", "billing"),)}
    metrics.set_listed(["billing"])  # orders removed from the list
    found = {labels for (name, labels) in samples(metrics) if name == listed}
    assert found == {(("outbox", "billing"),)}


def test_the_next_due_time_is_absent_while_nothing_is_scheduled() -> None:
    """The schedule's gauges: the count is always there; the next due time only while an event
    is scheduled (no made-up value), and a forgotten outbox does not get it back."""
    metrics = RelayMetrics()
    orders = metrics.for_outbox("orders")
    next_due = ("outbox_relay_next_due_timestamp_seconds", ())
    orders.set_scheduled(0, None)
    values = of(samples(metrics), "orders")
    assert values[("outbox_relay_scheduled_events", ())] == 0
    assert next_due not in values
    orders.set_scheduled(2, 1_900_000_000.0)
    assert of(samples(metrics), "orders")[next_due] == 1_900_000_000.0
    orders.set_scheduled(0, None)
    assert next_due not in of(samples(metrics), "orders")
    orders.set_scheduled(1, 1_900_000_001.0)
    metrics.forget_outbox("orders")
    orders.set_scheduled(1, 1_900_000_002.0)
    assert of(samples(metrics), "orders") == {}


def test_forget_outbox_removes_its_series_and_leaves_the_others() -> None:
    metrics = RelayMetrics()
    orders, billing = metrics.for_outbox("orders"), metrics.for_outbox("billing")
    for outbox in (orders, billing):
        outbox.observe_batch([row(1, "a"), row(2, "b")], [Outcome(1, Result.DELIVERED)], 0.1)
        outbox.set_backlog(3, 1.0)
        outbox.outbox_up(True)
    kept = of(samples(metrics), "billing")

    metrics.forget_outbox("orders")
    values = samples(metrics)
    assert of(values, "orders") == {}
    assert of(values, "billing") == kept
    assert values[("outbox_relay_outboxes_served", ())] == 1

    orders.observe_batch([row(3, "c")], [Outcome(3, Result.DELIVERED)], 0.1)
    orders.set_backlog(4, 1.0)
    assert of(samples(metrics), "orders") == {}, "a loop still finishing brings nothing back"

    metrics.forget_outbox("orders")  # twice, or a name never served: nothing to do
    metrics.forget_outbox("never")
    metrics.set_outboxes_served(1)

    again = metrics.for_outbox("orders")
    assert again is not orders
    assert of(samples(metrics), "orders")[("outbox_relay_backlog_events", ())] == 0, "afresh"


def test_forgotten_outbox_no_longer_counts_for_readiness() -> None:
    metrics = RelayMetrics()
    metrics.for_outbox("orders")
    assert metrics.health.ready()[0] is False
    metrics.forget_outbox("orders")
    assert metrics.health.ready() == (False, "outbox: none served yet")
    metrics.isolated = True
    assert metrics.health.ready() == (True, "ok")


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


def test_liveness_is_the_newest_beat_of_any_outbox_or_the_relay() -> None:
    """One outbox's loop beating keeps the process live; so does the fleet's own loop; a
    forgotten outbox's beats no longer count."""
    clock = FakeClock()
    health = Health(stale_after=30.0, clock=clock)
    orders, billing = health.outbox("orders"), health.outbox("billing")
    clock.now += 20
    orders.beat()
    clock.now += 20
    assert health.live() == (True, "ok"), "orders beat 20 s ago"
    clock.now += 20
    assert not health.live()[0]
    billing.beat()
    assert health.live()[0]
    clock.now += 31
    health.beat()
    assert health.live()[0], "the fleet's loop beats"
    clock.now += 31
    health.forget("billing")
    billing.beat()
    assert not health.live()[0]


def test_readiness_needs_schema_database_and_broker() -> None:
    clock = FakeClock()
    broker_down: list[str] = []
    calls: list[float] = []

    def probe(timeout: float) -> None:
        calls.append(timeout)
        if broker_down:
            raise RuntimeError(broker_down[0])

    health = Health(stale_after=30.0, probe_broker=probe, clock=clock)
    outbox = health.outbox("orders")
    ok, reason = health.ready()
    assert not ok
    assert reason == "schema: not checked yet\ndatabase: unreachable (reconnecting)"

    outbox.schema_current = outbox.database_ok = True
    clock.now += 10
    assert health.ready() == (True, "ok")

    broker_down.append("cannot reach Kafka at k:9092")
    assert health.ready() == (True, "ok"), "the broker's answer is cached for a moment"
    clock.now += BROKER_CHECK_CACHE_S
    ok, reason = health.ready()
    assert not ok
    assert reason == "kafka: cannot reach Kafka at k:9092"

    outbox.database_ok = False
    clock.now += BROKER_CHECK_CACHE_S
    broker_down.clear()
    ok, reason = health.ready()
    assert (ok, reason) == (False, "database: unreachable (reconnecting)")
    assert len(calls) == 4
    assert all(0 < t <= 2 for t in calls)


def test_isolated_readiness_follows_the_broker_and_lists_the_outboxes() -> None:
    """Several outboxes: one tenant's dead database leaves the relay ready (a rolling deploy
    goes on), and /readyz still says which outbox fails; the broker alone makes it unready."""
    clock = FakeClock()
    broker_down: list[str] = []

    def probe(timeout: float) -> None:
        if broker_down:
            raise RuntimeError(broker_down[0])

    health = Health(stale_after=30.0, probe_broker=probe, clock=clock)
    health.isolated = True
    orders, billing = health.outbox("orders"), health.outbox("billing")
    orders.schema_current = orders.database_ok = True
    billing.schema_current = True
    assert health.ready() == (True, "ok\noutbox billing: database unreachable (reconnecting)")

    billing.database_ok = True
    assert health.ready() == (True, "ok")

    orders.database_ok = False
    broker_down.append("cannot reach Kafka at k:9092")
    clock.now += BROKER_CHECK_CACHE_S
    assert health.ready() == (
        False,
        "kafka: cannot reach Kafka at k:9092\noutbox orders: database unreachable (reconnecting)",
    )


def test_several_outboxes_not_isolated_name_the_failing_one() -> None:
    health = Health(stale_after=30.0)
    for name in ("orders", "billing"):
        outbox = health.outbox(name)
        outbox.schema_current = outbox.database_ok = True
    health.outbox("billing").schema_current = False
    assert health.ready() == (False, "outbox billing: schema not checked yet")


def test_isolated_is_a_relay_metrics_flag() -> None:
    assert RelayMetrics().isolated is False
    metrics = RelayMetrics(isolated=True)
    assert metrics.isolated is True
    assert metrics.health.isolated is True
    metrics.isolated = False
    assert metrics.health.isolated is False


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
    orders = metrics.for_outbox("orders")
    orders.set_backlog(3, 1.0)
    status, body = get(f"{base}/metrics")
    assert status == 200
    assert 'outbox_relay_backlog_events{outbox="orders"} 3.0' in body
    assert get(f"{base}/healthz") == (200, "ok\n")
    status, body = get(f"{base}/readyz")
    assert status == 503
    assert "schema: not checked yet" in body
    orders.schema_checked()
    orders.database_ok(True)
    assert get(f"{base}/readyz") == (200, "ok\n")
    metrics.isolated = True
    metrics.for_outbox("billing").schema_checked()
    status, body = get(f"{base}/readyz")
    assert (status, body) == (200, "ok\noutbox billing: database unreachable (reconnecting)\n")
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
        "outbox_relay_purged_partitions",
    }
    for name in DOCUMENTED:
        exposed = f"{name}_total" if name in counters else name
        assert f"`{exposed}`" in section, name
    assert "`outbox`" in section
    for path in ("/metrics", "/healthz", "/readyz"):
        assert path in section
