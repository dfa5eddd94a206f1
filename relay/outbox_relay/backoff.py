"""Retry timing and the circuit breaker: pure logic, with the clock and randomness injected."""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass

from outbox.backoff import full_jitter

__all__ = ["BreakerState", "CircuitBreaker", "full_jitter"]


class BreakerState(enum.Enum):
    CLOSED = "closed"  # normal: claim full batches
    OPEN = "open"  # the dependency is down: claim nothing until the cool-down ends
    HALF_OPEN = "half_open"  # probing: claim one small batch; success closes, failure reopens


@dataclass
class CircuitBreaker:
    """Stops claiming after ``threshold`` consecutive failed batches, then probes after a pause.

    ``record(ok)`` is called once per batch; ``allow()`` says whether to claim now and
    ``batch_limit()`` how many rows. The cool-down grows with full jitter on repeated failures.
    """

    threshold: int
    cooldown: float
    max_cooldown: float
    probe_size: int
    clock: Callable[[], float]
    rand: Callable[[], float] = random.random
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_times: int = 0
    reopen_at: float = 0.0

    def allow(self) -> bool:
        """Whether a batch may be claimed now (moves OPEN to HALF_OPEN once cooled down)."""
        if self.state is BreakerState.OPEN and self.clock() >= self.reopen_at:
            self.state = BreakerState.HALF_OPEN
        return self.state is not BreakerState.OPEN

    def batch_limit(self, batch_size: int) -> int:
        return (
            min(batch_size, self.probe_size) if self.state is BreakerState.HALF_OPEN else batch_size
        )

    def seconds_until_probe(self) -> float:
        return max(0.0, self.reopen_at - self.clock()) if self.state is BreakerState.OPEN else 0.0

    def record(self, ok: bool) -> None:
        """Record one batch's outcome: a batch is ok when the dependency answered."""
        if ok:
            self.failures = 0
            self.opened_times = 0
            self.state = BreakerState.CLOSED
            return
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
            self._open()

    def _open(self) -> None:
        wait = self.cooldown + full_jitter(
            self.opened_times, base=self.cooldown, cap=self.max_cooldown, rand=self.rand
        )
        self.opened_times += 1
        self.reopen_at = self.clock() + min(wait, self.max_cooldown)
        self.state = BreakerState.OPEN
