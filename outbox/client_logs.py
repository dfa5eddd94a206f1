"""The Kafka client's log lines and error reports, thinned for the consume loops.

A client that cannot reach its broker reports every reconnection attempt: librdkafka printed
487 lines in 25 s for a loop pointed at a closed port. The relay thins its own with a logging
filter (``outbox_relay.logs.Repeats``) because it configures logging; a library cannot, so each
loop gives its clients (the consumer and the dead-letter producer) a :class:`ClientLog` as
``logger`` and ``error_cb``: each kind of line once, then at most one a minute carrying the
count held back, and a summary of what was held back when the loop stops. Pure but for the
log calls: the clock is injected, and nothing here imports the Kafka client.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

import structlog

log = structlog.get_logger("outbox.consumer")

#: librdkafka's log lines, as confluent-kafka hands them to ``logger.log``.
LIBRDKAFKA_FORMAT = "%s [%s] %s"


class KafkaErrorLike(Protocol):
    """What is read of a ``confluent_kafka.KafkaError``."""

    def name(self) -> str: ...
    def str(self) -> str: ...
    def fatal(self) -> bool: ...


def kind_of(line: str) -> str:
    """Lines of one kind differ only by their numbers (ports, addresses, milliseconds)."""
    return re.sub(r"\d+", "#", line)[:160]


class Repeats:
    """Which lines to let through: the first of a kind, then one per ``interval`` s."""

    def __init__(self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()
        self._example: dict[str, str] = {}  # the last line let through, by kind

    def admit(self, line: str) -> int | None:
        """None when ``line`` is held back; else how many of its kind were held back since the
        last one let through."""
        kind, now = kind_of(line), self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._held[kind] += 1
            return None
        if len(self._last) >= 1000:  # kinds are few; never let the table grow unbounded
            self._last.clear()
            self._example.clear()
        self._last[kind], self._example[kind] = now, line
        return self._held.pop(kind, 0)

    def held_back(self) -> dict[str, int]:
        """How many lines were held back since the last line of their kind let through, by that
        line; forgotten once read."""
        held = {self._example.get(kind, kind): count for kind, count in self._held.items()}
        self._held.clear()
        return held


class ClientLog:
    """A loop's Kafka clients' ``logger`` (:meth:`log`) and ``error_cb`` (:meth:`error`).

    Events: ``consumer.kafka_log`` (a librdkafka line: ``facility``, ``client``, ``message``),
    ``consumer.kafka_error`` (an error report: ``error``), both with ``held_back``, the lines of
    their kind held back since the last one; ``consumer.kafka_log_repeated`` (``line``,
    ``count``) when the loop stops. Thread-safe: the dead-letter producer may log from a worker
    thread."""

    def __init__(self, repeats: Repeats | None = None) -> None:
        self._repeats = repeats or Repeats()
        self._lock = threading.Lock()

    def log(self, level: int, fmt: str, *args: object) -> None:
        """A librdkafka line, called as ``logging.Logger.log`` is: the level, then
        ``"%s [%s] %s"`` with the facility, the client's name and the text."""
        facility, client, text = ("", "", fmt % args if args else fmt)
        if fmt == LIBRDKAFKA_FORMAT and len(args) == 3:
            facility, client, text = (str(arg) for arg in args)
        held = self._admit(f"{facility} {text}")
        if held is not None:
            log.log(
                level,
                "consumer.kafka_log",
                facility=facility,
                client=client,
                message=text,
                held_back=held,
            )

    def error(self, error: KafkaErrorLike) -> None:
        """An error report of a client (its ``error_cb``, or an error in place of a message)."""
        text = f"{error.name()}: {error.str()}"
        held = self._admit(text)
        if held is not None:
            report = log.error if error.fatal() else log.warning
            report("consumer.kafka_error", error=text, held_back=held)

    def summary(self) -> None:
        """Log what was held back since each kind's last line (when the loop stops)."""
        with self._lock:
            held = self._repeats.held_back()
        for line, count in sorted(held.items()):
            log.info("consumer.kafka_log_repeated", line=line, count=count)

    def _admit(self, line: str) -> int | None:
        with self._lock:
            return self._repeats.admit(line)
