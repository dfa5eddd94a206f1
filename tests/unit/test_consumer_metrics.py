"""outbox.consumer_metrics without servers: the lag from watermarks and stored offsets,
counting into a registry (or only into the stats when metrics are off), several loops on one
registry, and the /metrics endpoint on a local port."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest
from confluent_kafka import Message, TopicPartition
from prometheus_client import CollectorRegistry

from outbox import testing
from outbox.consumer_metrics import PartitionLag, Progress, metrics_registry, serve
from outbox.errors import ConfigurationError


def message(topic: str = "orders", offset: int = 0) -> Message:
    return Message(topic=topic, partition=0, offset=offset, value=b"x")


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {"consumer": "billing", **labels})


def tp(partition: int, offset: int = -1001) -> TopicPartition:
    return TopicPartition("orders", partition, offset)


def test_the_lag_runs_from_the_committed_offset_then_from_each_store() -> None:
    lag = PartitionLag("billing")
    lag.assigned([tp(0, 4), tp(1), tp(2, 8)])  # 1: nothing committed yet
    assert lag.lags() == {}  # no watermark seen yet
    for partition, high in ((0, 10), (1, 5), (2, 8)):
        lag.seen("orders", partition, high)
    assert lag.lags() == {("orders", 0): 6, ("orders", 2): 0}
    lag.stored([tp(0, 7), tp(1, 2), tp(3, 9)])  # 3: not assigned here
    assert lag.lags() == {("orders", 0): 3, ("orders", 1): 3, ("orders", 2): 0}
    lag.seen("orders", 0, 50)  # more messages came
    assert lag.lags()[("orders", 0)] == 43


def test_revoked_partitions_and_unknown_watermarks_are_left_out() -> None:
    lag = PartitionLag("billing")
    lag.assigned([tp(0, 4), tp(1, 0)])
    lag.seen("orders", 0, 10)
    lag.seen("orders", 1, -1001)  # the client does not know yet
    lag.seen("orders", 7, 10)  # not assigned
    assert lag.lags() == {("orders", 0): 6}
    lag.revoked([tp(0)])
    assert lag.lags() == {}
    lag.assigned([tp(0, 4)])  # back again: its old watermark was forgotten
    assert lag.lags() == {}


def test_the_lag_gauge_shows_every_loop_of_the_registry() -> None:
    registry = CollectorRegistry()
    billing, shipping = (Progress(name, ["orders"], registry) for name in ("billing", "shipping"))
    for progress, committed in ((billing, 3), (shipping, 9)):
        progress.lag.assigned([tp(0, committed)])
        progress.lag.seen("orders", 0, 10)
    lag = "outbox_consumer_lag_messages"
    labels = {"topic": "orders", "partition": "0"}
    assert registry.get_sample_value(lag, {"consumer": "billing", **labels}) == 7
    assert registry.get_sample_value(lag, {"consumer": "shipping", **labels}) == 1
    shipping.lag.revoked([tp(0)])
    assert registry.get_sample_value(lag, {"consumer": "shipping", **labels}) is None


def test_counts_go_to_the_stats_and_the_registry_by_topic() -> None:
    registry = CollectorRegistry()
    progress = Progress("billing", ["orders", "^refunds.*"], registry)
    assert value(registry, "outbox_consumer_messages_processed_total", topic="orders") == 0
    assert value(registry, "outbox_consumer_dead_lettered_total", topic="orders") == 0
    assert value(registry, "outbox_consumer_messages_processed_total", topic="^refunds.*") is None

    progress.committed([message(), message(offset=1)], [message("refunds.eu")], 0.02)
    progress.failed(message(), retrying=True)
    progress.failed(message(), retrying=False)
    progress.dead_lettered(message())
    progress.batch_replayed()

    assert vars(progress.stats) == {
        "processed": 2,
        "duplicates": 1,
        "failures": 2,
        "dead_lettered": 1,
    }
    assert value(registry, "outbox_consumer_messages_processed_total", topic="orders") == 2
    assert value(registry, "outbox_consumer_duplicates_skipped_total", topic="refunds.eu") == 1
    assert value(registry, "outbox_consumer_handler_failures_total", topic="orders") == 2
    assert value(registry, "outbox_consumer_handler_retries_total", topic="orders") == 1
    assert value(registry, "outbox_consumer_dead_lettered_total", topic="orders") == 1
    assert value(registry, "outbox_consumer_batches_replayed_total") == 1
    assert value(registry, "outbox_consumer_batch_duration_seconds_count") == 1
    assert value(registry, "outbox_consumer_batch_duration_seconds_sum") == pytest.approx(0.02)


def test_without_metrics_only_the_stats_count() -> None:
    assert metrics_registry(None, None) is None
    progress = Progress("billing", ["orders"], None)
    progress.committed([message()], [], 0.01)
    progress.failed(message(), retrying=True)
    assert not progress.enabled
    assert (progress.stats.processed, progress.stats.failures) == (1, 1)


def test_loops_sharing_a_registry_are_told_apart_by_their_name() -> None:
    registry = CollectorRegistry()
    billing = Progress("billing", ["orders"], registry)
    shipping = Progress("shipping", ["orders"], registry)
    billing.committed([message()], [], 0.01)
    shipping.committed([message(), message()], [], 0.01)
    processed = "outbox_consumer_messages_processed_total"
    assert registry.get_sample_value(processed, {"consumer": "billing", "topic": "orders"}) == 1
    assert registry.get_sample_value(processed, {"consumer": "shipping", "topic": "orders"}) == 2


def test_a_port_of_its_own_gets_a_registry_with_the_process_metrics() -> None:
    registry = metrics_registry(9465, None)
    assert registry is not None
    assert registry.get_sample_value("process_resident_memory_bytes") is not None
    given = CollectorRegistry()
    assert metrics_registry(9465, given) is given


def test_the_metrics_are_served_and_a_taken_port_is_named() -> None:
    registry = CollectorRegistry()
    Progress("billing", ["orders"], registry).committed([message()], [], 0.01)
    port = testing.free_port()
    close = serve(registry, "127.0.0.1", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
        assert (
            'outbox_consumer_messages_processed_total{consumer="billing",topic="orders"} 1.0'
            in body
        )
        with pytest.raises(ConfigurationError, match=f"127.0.0.1:{port}.*metrics_port"):
            serve(registry, "127.0.0.1", port)
    finally:
        close()
    with socket.socket() as sock:  # closed: nothing listens there any more
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the TIME_WAIT
        sock.bind(("127.0.0.1", port))


def test_the_docs_document_every_consumer_metric() -> None:
    """docs/metrics.md names each consumer metric as it is exposed (read from a registry)."""
    docs = (Path(__file__).parents[2] / "docs" / "metrics.md").read_text()
    registry = CollectorRegistry()
    Progress("billing", ["orders"], registry)
    families = list(registry.collect())
    assert len(families) == 8
    for family in families:
        exposed = f"{family.name}_total" if family.type == "counter" else family.name
        assert f"`{exposed}`" in docs, exposed
