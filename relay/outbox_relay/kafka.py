"""Publishing claimed rows with confluent-kafka, and classifying what went wrong.

The producer always runs with ``enable.idempotence=true`` and ``acks=all`` (a broker retry can
neither duplicate nor reorder a partition's messages, and an acknowledged message survives a
leader failure) and the ``murmur2_random`` partitioner, so a key lands on the partition a Java
producer would choose. ``message.timeout.ms`` bounds every message's delivery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, cast

import structlog
from confluent_kafka import KafkaError, KafkaException, Message, Producer

from outbox.envelope import EVENT_ID_HEADER
from outbox.errors import ConfigurationError, OutboxError
from outbox_relay.config import GUARANTEED_KAFKA_SETTINGS, RelaySettings
from outbox_relay.logs import LIBRDKAFKA_LOGGER
from outbox_relay.ports import ClaimedRow, Outcome, Result
from outbox_relay.records import Headers, Shape, shaper_of

log = structlog.get_logger("relay.kafka")

# The broker or the network failed, not the row: counting an attempt against the row would
# dead-letter healthy events during an outage.
_BROKER_ERRORS = frozenset(
    {
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._TIMED_OUT,
        KafkaError._QUEUE_FULL,
        KafkaError._RESOLVE,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.BROKER_NOT_AVAILABLE,
        KafkaError.NETWORK_EXCEPTION,
        KafkaError._PURGE_QUEUE,
        KafkaError._PURGE_INFLIGHT,
        KafkaError._FATAL,
        KafkaError._DESTROY,
        KafkaError._AUTHENTICATION,
        KafkaError._SSL,
        KafkaError.SASL_AUTHENTICATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    }
)
# The idempotent producer's own session broke (after an outage, say: librdkafka bumps its epoch
# and some brokers then fence it). Not the row's fault, and this producer will keep failing every
# message: the row counts no attempt, and the producer is replaced before the next batch.
_PRODUCER_STATE_ERRORS = frozenset(
    {
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
        KafkaError.INVALID_PRODUCER_ID_MAPPING,
    }
)
# Retrying the same bytes to the same topic can never succeed.
_PERMANENT_ERRORS = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.INVALID_RECORD,
        KafkaError._INVALID_ARG,
        KafkaError._BAD_MSG,
    }
)


#: Produce calls between two polls of the delivery reports while a batch is handed over: often
#: enough to keep the queue short, rare enough not to cost a C call per message.
_POLL_EVERY = 100

#: ``Outcome``'s fields as one tuple, without the named tuple's ``__new__`` written in Python: a
#: third of the cost, for one outcome per row at the full rate.
_new_outcome = cast("Callable[[type[Outcome], tuple[int, Result, str]], Outcome]", tuple.__new__)


class Report(NamedTuple):
    """A failed delivery as librdkafka reports it: the message's topic, key and payload."""

    topic: str | None
    key: str | bytes | None
    value: str | bytes | None
    error: KafkaError


class BrokerUnavailableError(OutboxError):
    """Kafka could not be reached when the relay started."""


def classify(error: KafkaError) -> Result:
    """What a failed delivery means for its row."""
    if error.code() in _BROKER_ERRORS or error.code() in _PRODUCER_STATE_ERRORS or error.fatal():
        return Result.BROKER
    if error.code() in _PERMANENT_ERRORS:
        return Result.PERMANENT
    return Result.RETRY


def describe(error: KafkaError) -> str:
    return f"{error.name()}: {error.str()}"


def failures_by_row(
    rows: Sequence[ClaimedRow], reports: Sequence[Report], shape: Shape | None = None
) -> tuple[dict[int, Outcome], bool]:
    """The failure reports of a batch as outcomes by row id (pure), and whether some report
    matched no row (then no row can be taken as delivered).

    A report is matched by topic, key and value (the payload, or what ``shape`` made of the
    row: shapes are pure, so the record is made again alike). Rows alike in all three (rare:
    the same event written twice) all take the failure: one of them may in fact have been
    delivered, and is sent again (a duplicate, never a loss; the same bytes to the same
    partition fail alike). A report that matches no row is a late one of an earlier batch that
    ran out of time (one more batch is sent again), or is not understood: either way nothing is
    assumed.
    """
    if not reports:
        return {}, False
    by_content: dict[tuple[object, object, object], list[int]] = {}
    for row in rows:
        value = row.payload if shape is None else shape(row)[0]
        by_content.setdefault((row.topic, row.key, value), []).append(row.id)
    failed: dict[int, Outcome] = {}
    unmatched = False
    for report in reports:
        row_ids = by_content.get((report.topic, report.key, report.value))
        if not row_ids:
            unmatched = True
            continue
        outcome_of = classify(report.error), describe(report.error)
        for row_id in row_ids:
            failed[row_id] = Outcome(row_id, *outcome_of)
    return failed, unmatched


#: Why a row is not produced: an earlier row of its key was refused by the producer.
_AFTER_REFUSED = "an earlier row of its key failed"
#: Why a row acknowledged after an earlier row of its key failed is not counted as delivered.
AFTER_UNDELIVERED = "an earlier row of its key was not delivered: sent again after it"


def hold_back_after_failures(
    rows: Sequence[ClaimedRow], outcomes: Sequence[Outcome]
) -> list[Outcome]:
    """The batch's outcomes (one per row, in the rows' order) with every row that follows an
    undelivered row of its key taken back from delivered to NOT_SENT (pure).

    With the idempotent producer a partition's later messages can still be written after an
    earlier one failed: librdkafka times out the oldest queued messages, bumps the producer
    epoch and sends the rest (INTRODUCTION.md, "Message timeout considerations"), and a
    permanent error on one request likewise leaves a gap (the gap-less guarantee is off). Sent
    again on its own, the failed row would land after its successor. So the successor stays
    unpublished too, counts no attempt, and goes again behind it: a duplicate (same
    ``event_id``) if Kafka had written it, never a key out of order. A row that failed on its
    own keeps its own outcome; rows without a key are independent.
    """
    failed_keys: set[bytes] = set()
    kept: list[Outcome] = []
    for row, outcome in zip(rows, outcomes, strict=True):
        key = row.key
        if key is not None:
            if outcome.result is not Result.DELIVERED:
                failed_keys.add(key)
            elif key in failed_keys:
                outcome = Outcome(row.id, Result.NOT_SENT, AFTER_UNDELIVERED)
        kept.append(outcome)
    return kept


def producer_config(settings: RelaySettings) -> dict[str, Any]:
    """librdkafka settings: the user's pass-through settings, then the ones we guarantee."""
    timeout_ms = round(settings.delivery_timeout * 1000)
    return {
        "client.id": f"outbox-relay-{settings.relay_id}",
        # A batch is produced in one go and then flushed: waiting for more messages would only
        # delay the flush.
        "linger.ms": 0,
        # Only failures are reported to Python; the empty queue after a flush says the rest.
        "delivery.report.only.error": True,
        # Kafka brokers accept 1 MiB (+ overhead) by default; librdkafka's own default is lower.
        "message.max.bytes": 1_100_000,
        # Well below message.timeout.ms: a message to a topic that does not exist must fail as
        # UNKNOWN_TOPIC_OR_PART (the row's fault: retried, then dead-lettered), not time out
        # (a broker failure: never counted against the row, and the whole batch waits for it).
        "topic.metadata.propagation.max.ms": min(timeout_ms // 2, 30_000),
        "socket.connection.setup.timeout.ms": round(settings.connect_timeout * 1000),
        **settings.kafka_config,
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "partitioner": settings.kafka_config.get("partitioner", "murmur2_random"),
        "message.timeout.ms": timeout_ms,
        **GUARANTEED_KAFKA_SETTINGS,
    }


#: The throwaway producer's logger: its lines wait for a poll() that never comes.
_UNHEARD = logging.getLogger("outbox_relay.kafka.config_check")


def check_kafka_config(settings: RelaySettings) -> None:
    """ConfigurationError, before anything connects, if librdkafka refuses the producer's
    settings: one line naming the --kafka-config property (a misspelt name, a bad value)."""
    config = producer_config(settings)
    del config["bootstrap.servers"]  # a producer without brokers connects to nothing
    why = _refusal(config)
    if why is None:
        return
    # librdkafka may name an alias by its canonical name (linger.ms: queue.buffering.max.ms);
    # the property given that is refused alone, for the same reason, is the one to name.
    named = next((k for k, v in settings.kafka_config.items() if _refusal({k: v}) == why), None)
    # The value is left out: it may be a password.
    what = f"--kafka-config {named} is" if named else "the --kafka-config settings are"
    raise ConfigurationError(f"{what} refused by the Kafka client: {' '.join(why.split())}")


def _refusal(config: Mapping[str, Any]) -> str | None:
    """Why librdkafka refuses to make a producer of ``config`` (None: it does not)."""
    try:
        Producer({**config, "logger": _UNHEARD})
    except KafkaException as exc:
        return str(exc.args[0].str())
    except (TypeError, ValueError, AttributeError) as exc:
        # confluent-kafka's own properties (callbacks, default.topic.config).
        return f"it takes a Python object there, not text ({exc})"
    return None


class KafkaPublisher:
    """Sends a batch and waits, within bounds, until Kafka has answered for every message."""

    def __init__(self, settings: RelaySettings) -> None:
        self._settings = settings
        self._last_global_error: int | None = None
        #: Why the producer must be replaced before the next batch ("" while it is healthy).
        self._replace_reason = ""
        #: The failure reports of the batch being published.
        self._reports: list[Report] = []
        #: Whether messages were produced that Kafka has not answered for yet.
        self._outstanding = False
        #: What a row becomes on Kafka in ``--record-format`` (None: native, built inline).
        self._shape = shaper_of(settings)
        self._produce_all = self._produce_native if self._shape is None else self._produce_shaped
        self._producer = self._new_producer()

    def _new_producer(self) -> Producer:
        config = producer_config(self._settings)
        config["error_cb"] = self._on_error
        config["on_delivery"] = self._on_report
        config["logger"] = logging.getLogger(LIBRDKAFKA_LOGGER)
        return Producer(config)

    def check_reachable(self, timeout: float) -> None:
        """Fail fast with a clear message when no broker answers at start."""
        try:
            self._producer.list_topics(timeout=timeout)
        except KafkaException as exc:
            raise BrokerUnavailableError(
                f"cannot reach Kafka at {self._settings.kafka_bootstrap_servers} within "
                f"{timeout:g} s: {describe(exc.args[0])}"
            ) from exc

    def publish(
        self, rows: Sequence[ClaimedRow], *, should_abort: Callable[[], bool]
    ) -> list[Outcome]:
        """Produce every row, then flush until Kafka has answered for each or time runs out.

        Only failures are reported (one callback for the whole producer, which is cheaper than
        one per message); once the queue is empty, every row without a failure report was
        acknowledged. If time runs out first, or a report matches no row, no row counts as
        delivered but the failed ones: the batch is sent again (duplicates, never a loss). A
        row after an undelivered row of its key is never delivered before it (NOT_SENT). Why:
        the design page, "Marking comes after the ack".
        """
        if self._replace_reason:
            self._replace_producer()
        self._reports = []  # filled by the failure reports
        deadline = time.monotonic() + self._settings.delivery_timeout + 5.0
        self._outstanding = True
        refused = self._produce_all(rows, deadline)
        waiting = self._producer.flush(0)
        while waiting and time.monotonic() < deadline and not should_abort():
            waiting = self._producer.flush(0.1)
        self._outstanding = waiting > 0
        return self._outcomes(rows, refused, unanswered=waiting > 0)

    def settle(self, timeout: float) -> bool:
        """Drop the messages not sent yet (librdkafka never sends a purged one), then wait up to
        ``timeout`` seconds for the requests in flight. Called before the relay lets go of its
        shards when its batch was not recorded: another relay may then publish the same rows,
        and a copy of ours landing after its copies would put the key out of order."""
        if not self._outstanding:  # every message was answered (len() counts callbacks too)
            return True
        self._producer.purge(in_queue=True, in_flight=False, blocking=True)
        left = self._producer.flush(timeout)
        self._reports = []  # the purge's reports belong to no batch
        self._outstanding = left > 0
        return left == 0

    def _produce_native(self, rows: Sequence[ClaimedRow], deadline: float) -> dict[int, Outcome]:
        """Hand every row to the producer, in order; the outcomes of those it refused, and of
        the later rows of their keys (not produced). Native records: the payload, the row's
        headers and ``event_id``, built here (the full-rate path: no call per row)."""
        refused: dict[int, Outcome] = {}
        refused_keys: set[bytes] = set()
        produce, poll = self._producer.produce, self._producer.poll
        for n, row in enumerate(rows, 1):
            if row.key is not None and row.key in refused_keys:
                refused[row.id] = Outcome(row.id, Result.NOT_SENT, _AFTER_REFUSED)
                continue
            event_id = (EVENT_ID_HEADER, row.event_id.encode())
            headers: Headers = [*row.headers, event_id] if row.header_names else [event_id]
            try:
                produce(row.topic, row.payload, row.key, headers=headers)
            except (BufferError, KafkaException):
                self._refused(row, row.payload, headers, deadline, refused, refused_keys)
            if n % _POLL_EVERY == 0:
                poll(0)  # serve error reports and global callbacks as they come
        return refused

    def _produce_shaped(self, rows: Sequence[ClaimedRow], deadline: float) -> dict[int, Outcome]:
        """As :meth:`_produce_native`, each row shaped by ``--record-format``."""
        refused: dict[int, Outcome] = {}
        refused_keys: set[bytes] = set()
        produce, poll, shape = self._producer.produce, self._producer.poll, self._shape
        assert shape is not None
        for n, row in enumerate(rows, 1):
            if row.key is not None and row.key in refused_keys:
                refused[row.id] = Outcome(row.id, Result.NOT_SENT, _AFTER_REFUSED)
                continue
            value, headers = shape(row)
            try:
                produce(row.topic, value, row.key, headers=headers)
            except (BufferError, KafkaException):
                self._refused(row, value, headers, deadline, refused, refused_keys)
            if n % _POLL_EVERY == 0:
                poll(0)
        return refused

    def _refused(
        self,
        row: ClaimedRow,
        value: bytes,
        headers: Headers,
        deadline: float,
        refused: dict[int, Outcome],
        refused_keys: set[bytes],
    ) -> None:
        """A row the producer did not take at once: try again slowly; if it still fails, its
        outcome, and its key's later rows held back."""
        failure = self._produce_slowly(row, value, headers, deadline)
        if failure is not None:
            refused[row.id] = failure
            if row.key is not None:
                refused_keys.add(row.key)

    def _outcomes(
        self, rows: Sequence[ClaimedRow], refused: dict[int, Outcome], *, unanswered: bool
    ) -> list[Outcome]:
        """One outcome per row, from the refusals, the failure reports and whether Kafka
        answered for the whole batch in time."""
        failed, unmatched = failures_by_row(rows, self._reports, self._shape)
        why_not_delivered = (
            "no delivery report in time"
            if unanswered
            else "a failure report matched no row of the batch"
            if unmatched
            else ""
        )
        if not (refused or failed or why_not_delivered):  # the common case: no lookups
            delivered = Result.DELIVERED
            return [_new_outcome(Outcome, (row.id, delivered, "")) for row in rows]
        outcomes = [
            refused.get(row.id)
            or failed.get(row.id)
            or (
                Outcome(row.id, Result.NOT_SENT, why_not_delivered)
                if why_not_delivered
                else Outcome(row.id, Result.DELIVERED)
            )
            for row in rows
        ]
        return hold_back_after_failures(rows, outcomes)

    def _produce_slowly(
        self, row: ClaimedRow, value: bytes, headers: Headers, deadline: float
    ) -> Outcome | None:
        """Produce one row whose first attempt failed: wait while the local queue is full,
        classify any other refusal. None once it is enqueued."""
        while True:
            try:
                self._producer.produce(row.topic, value=value, key=row.key, headers=headers)
                return None
            except BufferError:  # the local queue is full: serve reports, then try again
                if time.monotonic() > deadline:
                    return Outcome(row.id, Result.BROKER, "local producer queue stayed full")
                self._producer.poll(0.05)
            except KafkaException as exc:
                error: KafkaError = exc.args[0]
                return Outcome(row.id, classify(error), describe(error))

    def _on_report(self, error: KafkaError | None, msg: Message) -> None:
        """A delivery report: with ``delivery.report.only.error`` only failures come."""
        if error is None:
            return  # a success, reported because delivery.report.only.error was overridden
        self._reports.append(Report(msg.topic(), msg.key(), msg.value(), error))
        if error.code() in _PRODUCER_STATE_ERRORS and not self._replace_reason:
            self._replace_reason = describe(error)

    def _on_error(self, error: KafkaError) -> None:
        if error.fatal():
            self._replace_reason = f"fatal error: {describe(error)}"
            log.error("kafka.fatal_error", error=describe(error))
        elif error.code() != self._last_global_error:
            log.warning("kafka.error", error=describe(error))
        self._last_global_error = error.code()

    def _replace_producer(self) -> None:
        log.warning("kafka.producer_replaced", reason=self._replace_reason)
        self._producer.purge()
        self._producer.flush(0)
        self._producer = self._new_producer()
        self._replace_reason = ""
