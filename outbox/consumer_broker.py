"""Whether a consume loop reaches Kafka: decided without I/O, for :mod:`outbox.consumer_core`.

The core sends a metadata request (:class:`~outbox.consumer_core.Probe`) when
:meth:`BrokerWatch.probe_due` says so and tells the watch what came back; the client's error
reports come in through :meth:`BrokerWatch.reported`. The clock is injected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog
from confluent_kafka import KafkaError

from outbox.consumer_metrics import BrokerGauge
from outbox.errors import BrokerUnreachableError

if TYPE_CHECKING:
    from outbox.consumer import ConsumerSettings

log = structlog.get_logger("outbox.consumer")

#: Longest wait of one metadata request asking whether a broker answers.
PROBE_TIMEOUT = 1.0
#: While every broker is down, how often the loop asks whether one is back.
PROBE_EVERY = 5.0


class BrokerWatch:
    """Whether the loop reaches Kafka, in ``gauge``.

    From its start, the loop asks for metadata every turn (one request of at most
    :data:`PROBE_TIMEOUT`) until a broker answers; if none did within
    ``settings.connect_timeout``, :class:`BrokerUnreachableError`, naming the last error the
    client reported. Later, when the client reports every broker down, the loop asks again every
    :data:`PROBE_EVERY` until one answers or messages arrive; it waits as long as that takes.
    """

    def __init__(
        self, settings: ConsumerSettings, gauge: BrokerGauge, clock: Callable[[], float]
    ) -> None:
        self.settings = settings
        self.gauge = gauge
        self._clock = clock
        self._deadline = self._next_probe = 0.0
        self._connecting = False
        self._reason = ""  # the client's last error report

    def start(self) -> None:
        self._connecting, self.gauge.up = True, False
        self._next_probe = self._clock()
        self._deadline = self._next_probe + self.settings.connect_timeout

    def stop(self) -> None:
        self.gauge.up = None

    def probe_due(self) -> float | None:
        """The timeout of the metadata request to send now, or None (none is due)."""
        if self.gauge.up is not False or self._clock() < self._next_probe:
            return None  # not started, or a broker answers
        if not self._connecting:
            return PROBE_TIMEOUT
        return max(0.01, min(PROBE_TIMEOUT, self._deadline - self._clock()))

    def answered(self) -> None:
        """A broker answered: the probe, or messages."""
        if self.gauge.up is False:
            log.info("consumer.broker_up", **self._names())
            self._connecting, self.gauge.up = False, True

    def unanswered(self, error: KafkaError) -> None:
        """The probe failed; at start, past the deadline, the loop fails."""
        now = self._clock()
        if self._connecting and now >= self._deadline:
            reason = self._reason or f"{error.name()}: {error.str()}"
            servers, timeout = self.settings.bootstrap_servers, self.settings.connect_timeout
            raise BrokerUnreachableError(servers, timeout, reason)
        self._next_probe = now if self._connecting else now + PROBE_EVERY

    def reported(self, error: KafkaError) -> None:
        """An error report of the consumer (its ``error_cb``)."""
        if error.code() != KafkaError._ALL_BROKERS_DOWN:
            self._reason = f"{error.name()}: {error.str()}"  # says why, which "all down" does not
        elif self.gauge.up:
            log.warning("consumer.broker_down", **self._names())
            self.gauge.up = False
            self._next_probe = self._clock() + PROBE_EVERY

    def _names(self) -> dict[str, str]:
        return {
            "consumer": self.settings.name,
            "bootstrap_servers": self.settings.bootstrap_servers,
        }
