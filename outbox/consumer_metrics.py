"""What a consume loop did: counted in :class:`ConsumeStats` always, and as Prometheus metrics
when asked (off by default).

Two ways to turn the metrics on:

- ``ConsumerSettings(..., metrics_port=9465)``: while :meth:`run` runs, the loop serves
  ``/metrics`` on that port from a registry of its own (with the ``process_*`` metrics);
- ``ConsumeLoop(..., registry=prometheus_client.REGISTRY)``: the loop records into the
  application's registry, which the application already serves (several loops may share it:
  the ``consumer`` label tells them apart). With ``metrics_port`` as well, the loop serves it.

The metrics, each labelled with the consumer's name (its Kafka consumer group):

- ``outbox_consumer_messages_processed_total{topic}``: handled, and the transaction committed;
- ``outbox_consumer_duplicates_skipped_total{topic}``: recognised by the dedup table;
- ``outbox_consumer_handler_failures_total{topic}``: handler attempts that raised (one message
  at a time), of which ``outbox_consumer_handler_retries_total{topic}`` were tried again;
- ``outbox_consumer_batches_replayed_total``: batches whose transaction failed and that were
  replayed one message at a time;
- ``outbox_consumer_dead_lettered_total{topic}``: sent to the dead-letter topic;
- ``outbox_consumer_batch_duration_seconds``: one transaction (claim, handler, commit) of a
  batch or of one message;
- ``outbox_consumer_lag_messages{topic,partition}``: messages of each assigned partition not yet
  processed: the partition's high watermark, as the client saw it when it last handed out
  messages of that partition (a local read, no request), minus the next offset the loop has to
  finish (the offset it stored last, or the group's committed offset when it got the partition).
  While a handler is stuck, it keeps its last value (at least 1): alert on it together with
  ``messages_processed`` not moving;
- ``outbox_consumer_broker_up``: 1 while a broker answers the loop, 0 while it connects at start
  or after the client reported every broker down; no sample while the loop does not run.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import structlog
from confluent_kafka import Message, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from outbox.errors import ConfigurationError

log = structlog.get_logger("outbox.consumer")

PREFIX = "outbox_consumer_"
LAG = PREFIX + "lag_messages"
BROKER_UP = PREFIX + "broker_up"
BATCH_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


@dataclass
class ConsumeStats:
    processed: int = 0  # handler ran and its transaction committed
    duplicates: int = 0  # recognised by the dedup table and skipped
    failures: int = 0  # handler attempts that raised
    dead_lettered: int = 0


class _Families:
    """The consume loops' metric families on one registry (declared once per registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, help: str, *labels: str) -> Counter:
            return Counter(PREFIX + name, help, ("consumer", *labels), registry=registry)

        self.processed = counter(
            "messages_processed", "Messages handled, their transaction committed.", "topic"
        )
        self.duplicates = counter(
            "duplicates_skipped", "Messages the dedup table recognised and skipped.", "topic"
        )
        self.failures = counter(
            "handler_failures", "Handler attempts that raised (one message at a time).", "topic"
        )
        self.retries = counter(
            "handler_retries", "Failed handler attempts that were tried again.", "topic"
        )
        self.batches_replayed = counter(
            "batches_replayed", "Batches that failed and were replayed one message at a time."
        )
        self.dead_lettered = counter(
            "dead_lettered", "Messages sent to the dead-letter topic.", "topic"
        )
        self.batch_duration = Histogram(
            PREFIX + "batch_duration_seconds",
            "Seconds of one transaction (dedup claim, handler, commit) of a batch or a message.",
            ("consumer",),
            buckets=BATCH_DURATION_BUCKETS,
            registry=registry,
        )
        self.lag = LagCollector()
        registry.register(self.lag)
        self._registry = registry
        self._broker: BrokerCollector | None = None

    def broker(self) -> BrokerCollector:
        """``outbox_consumer_broker_up``, declared by the first loop that watches its broker."""
        with _families_lock:
            if self._broker is None:
                self._broker = BrokerCollector()
                self._registry.register(self._broker)
            return self._broker


_families: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = weakref.WeakKeyDictionary()
_families_lock = threading.Lock()


def families_on(registry: CollectorRegistry) -> _Families:
    """The metric families on ``registry``, declared on first use."""
    with _families_lock:
        if registry not in _families:
            _families[registry] = _Families(registry)
        return _families[registry]


class PartitionLag:
    """One loop's lag per assigned partition: the high watermark the client saw when it last
    handed out messages of the partition, minus the next offset the loop has to finish. Fed by
    the loop (assigned, revoked, seen, stored), read by the scrape's thread."""

    def __init__(self, consumer: str) -> None:
        self.consumer = consumer
        self._lock = threading.Lock()
        self._next: dict[tuple[str, int], int] = {}  # assigned -> next offset to finish, or -1
        self._high: dict[tuple[str, int], int] = {}

    def assigned(self, partitions: Iterable[TopicPartition]) -> None:
        """Partitions given to the loop, with the group's committed offsets (-1: unknown)."""
        with self._lock:
            for tp in partitions:
                self._next[(tp.topic, tp.partition)] = max(tp.offset, -1)

    def revoked(self, partitions: Iterable[TopicPartition]) -> None:
        with self._lock:
            for tp in partitions:
                self._next.pop((tp.topic, tp.partition), None)
                self._high.pop((tp.topic, tp.partition), None)

    def seen(self, topic: str, partition: int, high: int) -> None:
        """The partition's high watermark, as the client last saw it (negative: unknown)."""
        with self._lock:
            if (topic, partition) in self._next and high >= 0:
                self._high[(topic, partition)] = high

    def stored(self, offsets: Iterable[TopicPartition]) -> None:
        """The loop stored these offsets (one past the last message it finished)."""
        with self._lock:
            for tp in offsets:
                if (tp.topic, tp.partition) in self._next:
                    self._next[(tp.topic, tp.partition)] = tp.offset

    def lags(self) -> dict[tuple[str, int], int]:
        """(topic, partition) -> lag, for the assigned partitions whose both ends are known."""
        with self._lock:
            return {
                key: max(0, self._high[key] - position)
                for key, position in self._next.items()
                if position >= 0 and key in self._high
            }


def partitions_of(messages: Iterable[Message]) -> set[tuple[str, int]]:
    return {(message.topic() or "", message.partition() or 0) for message in messages}


class LagCollector(Collector):
    """``outbox_consumer_lag_messages`` of every loop recording into one registry."""

    def __init__(self) -> None:
        self.sources: weakref.WeakSet[PartitionLag] = weakref.WeakSet()

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for source in list(self.sources):
            for (topic, partition), lag in sorted(source.lags().items()):
                family.add_metric([source.consumer, topic, str(partition)], lag)
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            LAG,
            "Messages of an assigned partition not processed yet: the high watermark the client "
            "last saw minus the next offset the loop has to finish.",
            labels=("consumer", "topic", "partition"),
        )


class BrokerGauge:
    """One loop's ``outbox_consumer_broker_up``: ``up`` is True while a broker answers, False
    while the loop connects or every broker is down, None (no sample) while it does not run."""

    def __init__(self, consumer: str, registry: CollectorRegistry | None) -> None:
        self.consumer = consumer
        self.up: bool | None = None
        if registry is not None:
            families_on(registry).broker().sources.add(self)


class BrokerCollector(Collector):
    """``outbox_consumer_broker_up`` of every loop recording into one registry."""

    def __init__(self) -> None:
        self.sources: weakref.WeakSet[BrokerGauge] = weakref.WeakSet()

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for source in sorted(self.sources, key=lambda source: source.consumer):
            if source.up is not None:
                family.add_metric([source.consumer], 1 if source.up else 0)
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            BROKER_UP,
            "1 while a Kafka broker answers the loop; 0 while it connects or every broker is down.",
            labels=("consumer",),
        )


def by_topic(messages: Iterable[Message]) -> Tally[str]:
    return Tally(message.topic() or "" for message in messages)


class Progress:
    """What a loop did, in :class:`ConsumeStats` and, with a registry, in its metrics."""

    def __init__(
        self, consumer: str, topics: Sequence[str], registry: CollectorRegistry | None
    ) -> None:
        self.stats = ConsumeStats()
        self.consumer = consumer
        self.families = families_on(registry) if registry is not None else None
        self.lag = PartitionLag(consumer)
        if self.families is not None:
            self.families.lag.sources.add(self.lag)
            self.families.batch_duration.labels(consumer)
            self.families.batches_replayed.labels(consumer)
            for topic in topics:  # exported at 0 from the start, except for patterns
                if not topic.startswith("^"):
                    names = ("processed", "duplicates", "failures", "retries", "dead_lettered")
                    self._count(Tally({topic: 0}), *names)

    @property
    def enabled(self) -> bool:
        return self.families is not None

    def committed(
        self, fresh: Sequence[Message], skipped: Sequence[Message], seconds: float
    ) -> None:
        """A transaction committed: ``fresh`` were handled, ``skipped`` were duplicates."""
        self.stats.processed += len(fresh)
        self.stats.duplicates += len(skipped)
        if self.families is not None:
            self._count(by_topic(fresh), "processed")
            self._count(by_topic(skipped), "duplicates")
            self.families.batch_duration.labels(self.consumer).observe(seconds)

    def failed(self, message: Message, *, retrying: bool) -> None:
        """One handler attempt for ``message`` raised; ``retrying``: it will be tried again."""
        self.stats.failures += 1
        topics = by_topic([message])
        self._count(topics, "failures")
        if retrying:
            self._count(topics, "retries")

    def batch_replayed(self) -> None:
        if self.families is not None:
            self.families.batches_replayed.labels(self.consumer).inc()

    def dead_lettered(self, message: Message) -> None:
        self.stats.dead_lettered += 1
        self._count(by_topic([message]), "dead_lettered")

    def _count(self, topics: Tally[str], *names: str) -> None:
        if self.families is None:
            return
        for name in names:
            family: Counter = getattr(self.families, name)
            for topic, count in topics.items():
                family.labels(self.consumer, topic).inc(count)


def metrics_registry(
    port: int | None, registry: CollectorRegistry | None
) -> CollectorRegistry | None:
    """Where a loop records: the registry it was given, else one of its own when it serves
    metrics (with the process metrics), else nowhere (metrics off)."""
    if registry is not None or port is None:
        return registry
    own = CollectorRegistry()
    ProcessCollector(registry=own)
    return own


def serve(registry: CollectorRegistry, host: str, port: int) -> Callable[[], None]:
    """Serve ``registry`` on ``http://host:port/metrics`` in a daemon thread; returns the
    function that stops it."""
    try:
        server, thread = start_http_server(port, host, registry)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve consumer metrics on {host}:{port} (ConsumerSettings.metrics_port): "
            f"{exc.strerror or exc}"
        ) from exc
    log.info("consumer.metrics_serving", host=host, port=server.server_port)

    def close() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return close
