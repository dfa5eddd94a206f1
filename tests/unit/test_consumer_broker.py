"""A consume loop and its broker, without servers: the client's repeated lines thinned
(outbox.client_logs), the core giving up on a broker that never answered within
``connect_timeout`` and following one that goes and comes back, and the
``outbox_consumer_broker_up`` gauge. The same with a real broker: tests/integration/
test_consumer_broker.py."""

from __future__ import annotations

import logging
from pathlib import Path

from confluent_kafka import KafkaError, KafkaException, Message
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from outbox.client_logs import LIBRDKAFKA_FORMAT, ClientLog, Repeats, kind_of
from outbox.consumer_broker import PROBE_EVERY, PROBE_TIMEOUT
from outbox.consumer_core import ConsumeCore, Probe
from outbox.consumer_metrics import BrokerGauge
from outbox.errors import BrokerUnreachableError
from tests.unit.test_consumer_core import FakeShell, by_payload, settings

REFUSED = "Connect to ipv4#127.0.0.1:9092 failed: Connection refused (after 0ms in state CONNECT)"


class Clock:
    """Time as the test sets it."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def error(code: int, text: str = "") -> KafkaError:
    return KafkaError(code, text)


# --- the client's lines ---------------------------------------------------------------------


def test_the_first_line_of_a_kind_passes_then_one_per_interval_with_the_count() -> None:
    clock = Clock()
    repeats = Repeats(interval=60, clock=clock)
    assert repeats.admit("refused after 0ms") == 0
    clock.now += 1
    assert repeats.admit("refused after 3ms") is None  # the same kind: numbers do not count
    assert repeats.admit("refused after 7ms") is None
    assert repeats.admit("another line") == 0
    clock.now += 60
    assert repeats.admit("refused after 1ms") == 2  # two held back since the last one


def test_what_was_held_back_is_summed_up_once_by_the_last_line_let_through() -> None:
    clock = Clock()
    repeats = Repeats(interval=60, clock=clock)
    repeats.admit("broker 1 down")
    repeats.admit("broker 2 down")
    repeats.admit("broker 3 down")
    repeats.admit("alone")
    assert repeats.held_back() == {"broker 1 down": 2}
    assert repeats.held_back() == {}


def test_kinds_ignore_numbers_and_are_bounded() -> None:
    assert kind_of("127.0.0.1:9092 after 12ms") == "#.#.#.#:# after #ms"
    assert len(kind_of("x" * 1000)) == 160


def test_a_librdkafka_line_is_logged_with_its_facility_client_and_level() -> None:
    """confluent-kafka calls ``logger.log(level, "%s [%s] %s", facility, client, text)``."""
    client_log = ClientLog(Repeats(clock=Clock()))
    with capture_logs() as logs:
        for _ in range(20):
            client_log.log(logging.ERROR, LIBRDKAFKA_FORMAT, "FAIL", "rdkafka#consumer-1", REFUSED)
        client_log.log(logging.INFO, "plain %s", "text")
        client_log.summary()
    assert logs == [
        {
            "event": "consumer.kafka_log",
            "log_level": "error",
            "facility": "FAIL",
            "client": "rdkafka#consumer-1",
            "message": REFUSED,
            "held_back": 0,
        },
        {
            "event": "consumer.kafka_log",
            "log_level": "info",
            "facility": "",
            "client": "",
            "message": "plain text",
            "held_back": 0,
        },
        {
            "event": "consumer.kafka_log_repeated",
            "log_level": "info",
            "line": f"FAIL {REFUSED}",
            "count": 19,
        },
    ]


def test_error_reports_are_thinned_too_and_fatal_ones_are_errors() -> None:
    client_log = ClientLog(Repeats(clock=Clock()))
    with capture_logs() as logs:
        for _ in range(5):
            client_log.error(error(KafkaError._TRANSPORT, REFUSED))
        client_log.error(KafkaError(KafkaError._FATAL, "fenced", fatal=True))
    assert [(e["log_level"], e["error"]) for e in logs] == [
        ("warning", f"_TRANSPORT: {REFUSED}"),
        ("error", "_FATAL: fenced"),
    ]


# --- the broker, as the core sees it --------------------------------------------------------


def started(connect_timeout: float = 3.0) -> tuple[FakeShell, Clock, CollectorRegistry]:
    clock, registry = Clock(), CollectorRegistry()
    core = ConsumeCore(settings(connect_timeout=connect_timeout), by_payload, registry, clock=clock)
    core.started()
    return FakeShell(core), clock, registry


def up(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("outbox_consumer_broker_up", {"consumer": "billing"})


def refuse(shell: FakeShell) -> None:
    """The probe finds no broker; the client reports why."""
    shell.core.kafka_error(error(KafkaError._TRANSPORT, REFUSED))
    shell.answers[Probe] = KafkaException(error(KafkaError._TRANSPORT, "Failed to get metadata"))


def turn_until_it_fails(
    shell: FakeShell, clock: Clock, seconds_a_turn: float
) -> BrokerUnreachableError:
    for _ in range(100):
        try:
            shell.turn()
        except BrokerUnreachableError as exc:
            return exc
        clock.now += seconds_a_turn
    raise AssertionError("the loop never gave up")


def test_a_broker_that_answers_at_once_is_asked_once() -> None:
    shell, _, registry = started()
    assert up(registry) == 0  # connecting
    shell.turn()
    shell.turn()
    assert shell.kinds() == ["Probe", "Consume", "Consume"]
    assert shell.commands[0] == Probe(PROBE_TIMEOUT)
    assert up(registry) == 1


def test_no_broker_within_connect_timeout_fails_the_loop_naming_the_address() -> None:
    """Each turn asks again (never past the deadline) until connect_timeout has passed; the
    error names the servers, the setting and the client's last real reason (not "all brokers
    are down", which says no why)."""
    shell, clock, registry = started(connect_timeout=3.0)
    refuse(shell)
    shell.core.kafka_error(error(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    failure = turn_until_it_fails(shell, clock, seconds_a_turn=1.5)
    probes = [c for c in shell.commands if isinstance(c, Probe)]
    assert probes == [Probe(1.0), Probe(1.0), Probe(0.01)]  # the last one at the deadline
    assert clock.now == 103.0
    assert up(registry) == 0
    message = str(failure)
    assert message.startswith("no Kafka broker answered at kafka:9092 within 3 s")
    assert "(ConsumerSettings.connect_timeout)" in message
    assert failure.reason == f"_TRANSPORT: {REFUSED}"


def test_a_broker_that_answers_before_the_deadline_keeps_the_loop() -> None:
    shell, clock, registry = started(connect_timeout=3.0)
    refuse(shell)
    shell.turn()
    clock.now += 2.9
    del shell.answers[Probe]
    with capture_logs() as logs:
        shell.turn()
    assert up(registry) == 1
    assert [e["event"] for e in logs] == ["consumer.broker_up"]
    clock.now += 1000  # long after the deadline: nothing is asked any more
    shell.turn()
    assert shell.kinds().count("Probe") == 2


def test_messages_say_the_broker_is_up() -> None:
    shell, _, registry = started()
    refuse(shell)
    shell.batches = [[Message(topic="orders", partition=0, offset=0, value=b"a")]]
    shell.turn()
    assert up(registry) == 1


def test_every_broker_down_later_drops_the_gauge_and_the_loop_waits() -> None:
    """Once up, "all brokers down" sets the gauge to 0; the loop asks again every
    PROBE_EVERY seconds, however long it takes (no deadline now), and says 1 when one answers."""
    shell, clock, registry = started(connect_timeout=3.0)
    shell.turn()
    with capture_logs() as logs:
        shell.core.kafka_error(error(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    assert up(registry) == 0
    assert [e["event"] for e in logs] == ["consumer.kafka_error", "consumer.broker_down"]
    refuse(shell)
    shell.commands.clear()
    shell.turn()  # too early to ask
    clock.now += PROBE_EVERY
    shell.turn()
    clock.now += 3600  # an hour down: no error
    shell.turn()
    assert shell.kinds() == ["Consume", "Probe", "Consume", "Probe", "Consume"]
    del shell.answers[Probe]
    clock.now += PROBE_EVERY
    shell.turn()
    assert up(registry) == 1


def test_the_gauge_has_no_sample_before_the_start_or_after_the_stop() -> None:
    registry = CollectorRegistry()
    core = ConsumeCore(settings(), by_payload, registry)
    assert up(registry) is None
    core.started()
    assert up(registry) == 0
    with capture_logs() as logs:
        core.stopped()
    assert up(registry) is None
    assert [e["event"] for e in logs] == ["consumer.stopped"]


def test_loops_sharing_a_registry_have_a_gauge_each() -> None:
    registry = CollectorRegistry()
    billing, shipping = BrokerGauge("billing", registry), BrokerGauge("shipping", registry)
    billing.up, shipping.up = True, False
    values = {
        name: registry.get_sample_value("outbox_consumer_broker_up", {"consumer": name})
        for name in ("billing", "shipping")
    }
    assert values == {"billing": 1, "shipping": 0}
    assert BrokerGauge("off", None).up is None  # metrics off: nothing declared


def test_the_docs_document_the_broker_gauge_and_the_setting() -> None:
    """docs/metrics.md names the gauge; docs/consuming.md the setting and the error."""
    docs = Path(__file__).parents[2] / "docs"
    assert "`outbox_consumer_broker_up`" in (docs / "metrics.md").read_text()
    consuming = (docs / "consuming.md").read_text()
    assert "connect_timeout" in consuming
    assert "BrokerUnreachableError" in consuming
