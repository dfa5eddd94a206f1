"""What the relay says about Kafka's availability: the circuit breaker's changes, as one log
line per outage and the breaker gauge."""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from outbox_relay.backoff import BreakerState, CircuitBreaker
from outbox_relay.ports import Metrics, Outcome

log = structlog.get_logger("relay.loop")


class BreakerReport:
    def __init__(self, breaker: CircuitBreaker, metrics: Metrics) -> None:
        self.breaker = breaker
        self.metrics = metrics
        self._reported: BreakerState | None = None

    def record(self, *, ok: bool, failures: Sequence[Outcome]) -> None:
        """A batch's verdict for the breaker; logs the change it makes, if any."""
        before = self.breaker.state
        self.breaker.record(ok)
        after = self.breaker.state
        if after is before:
            return
        self.gauge()
        error = failures[0].error if failures else ""
        probe_in_s = round(self.breaker.seconds_until_probe(), 1)
        if after is BreakerState.OPEN and before is BreakerState.CLOSED:
            log.error("kafka.unavailable", breaker=after.value, error=error, probe_in_s=probe_in_s)
        elif after is BreakerState.OPEN:  # a failed probe: the outage was reported once already
            log.info("kafka.still_unavailable", error=error, probe_in_s=probe_in_s)
        elif after is BreakerState.CLOSED:
            log.info("kafka.available", breaker=after.value)

    def gauge(self) -> None:
        """The breaker's state on its gauge, when it changed."""
        state = self.breaker.state
        if state is not self._reported:
            self.metrics.set_breaker(state)
            self._reported = state
