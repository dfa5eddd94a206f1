"""Retry delays (full jitter) and the circuit breaker, with an injected clock and randomness."""

from __future__ import annotations

import itertools
import random

import pytest

from outbox_relay.backoff import BreakerState, CircuitBreaker, full_jitter


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _breaker(
    clock: FakeClock, *, rand: float = 1.0, threshold: int = 3, probe_size: int = 10
) -> CircuitBreaker:
    return CircuitBreaker(
        threshold=threshold,
        cooldown=5.0,
        max_cooldown=60.0,
        probe_size=probe_size,
        clock=clock,
        rand=lambda: rand,
    )


def _open(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.threshold):
        assert breaker.allow()
        breaker.record(False)
    assert breaker.state is BreakerState.OPEN


# full_jitter


@pytest.mark.parametrize("attempt", range(12))
def test_full_jitter_stays_within_its_window(attempt: int) -> None:
    """0 <= delay <= min(cap, base * 2**attempt), over many random draws."""
    rng = random.Random(attempt)
    bound = min(30.0, 0.25 * 2**attempt)
    for _ in range(500):
        delay = full_jitter(attempt, base=0.25, cap=30.0, rand=rng.random)
        assert 0.0 <= delay <= bound


@pytest.mark.parametrize(("attempt", "expected"), [(0, 0.5), (1, 1.0), (3, 4.0), (5, 10.0)])
def test_full_jitter_with_rand_one_gives_the_window_exactly(attempt: int, expected: float) -> None:
    """rand() == 1.0 yields the upper bound: base * 2**attempt, capped."""
    assert full_jitter(attempt, base=0.5, cap=10.0, rand=lambda: 1.0) == expected


def test_full_jitter_scales_the_window_by_rand() -> None:
    """The delay is rand() times the window: the injected randomness is really used."""
    assert full_jitter(2, base=1.0, cap=100.0, rand=lambda: 0.0) == 0.0
    assert full_jitter(2, base=1.0, cap=100.0, rand=lambda: 0.25) == 1.0


@pytest.mark.parametrize("attempt", [63, 64, 1000, 10**6, 10**18])
def test_full_jitter_does_not_overflow_for_huge_attempts(attempt: int) -> None:
    """Absurd attempt counts give the cap, not an OverflowError or inf."""
    assert full_jitter(attempt, base=1.0, cap=300.0, rand=lambda: 1.0) == 300.0
    assert full_jitter(attempt, base=1e300, cap=300.0, rand=lambda: 1.0) == 300.0


def test_full_jitter_treats_a_negative_attempt_as_the_first() -> None:
    """A negative attempt number behaves like attempt 0."""
    assert full_jitter(-5, base=2.0, cap=10.0, rand=lambda: 1.0) == 2.0


# CircuitBreaker


def test_breaker_stays_closed_below_the_threshold() -> None:
    """threshold - 1 failed batches in a row leave it closed, with full batches."""
    breaker = _breaker(FakeClock(), threshold=3)
    for _ in range(2):
        breaker.record(False)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow()
    assert breaker.batch_limit(1000) == 1000


def test_a_success_resets_the_failure_count() -> None:
    """Failures must be consecutive to open it."""
    breaker = _breaker(FakeClock(), threshold=3)
    for ok in (False, False, True, False, False):
        breaker.record(ok)
    assert breaker.state is BreakerState.CLOSED


def test_breaker_opens_at_the_threshold_and_denies_while_open() -> None:
    """The threshold-th consecutive failure opens it; nothing is claimed until the cool-down."""
    clock = FakeClock()
    breaker = _breaker(clock, rand=1.0)
    _open(breaker)
    # cool-down = cooldown + jitter(0, base=cooldown) = 5 + 5 with rand() == 1.0
    assert breaker.seconds_until_probe() == pytest.approx(10.0)
    for _ in range(9):
        clock.advance(1.0)
        assert not breaker.allow()
        assert breaker.state is BreakerState.OPEN
    assert breaker.seconds_until_probe() == pytest.approx(1.0)


def test_breaker_half_opens_after_the_cooldown_with_a_small_batch() -> None:
    """Once cooled down it allows one probe batch of at most probe_size rows."""
    clock = FakeClock()
    breaker = _breaker(clock, rand=0.0, probe_size=7)
    _open(breaker)
    assert breaker.seconds_until_probe() == pytest.approx(5.0)
    clock.advance(5.0)
    assert breaker.allow()
    assert breaker.state is BreakerState.HALF_OPEN
    assert breaker.seconds_until_probe() == 0.0
    assert breaker.batch_limit(1000) == 7
    assert breaker.batch_limit(3) == 3


def test_a_successful_probe_closes_the_breaker() -> None:
    """A good probe batch restores full batches and forgets the previous openings."""
    clock = FakeClock()
    breaker = _breaker(clock, rand=1.0)
    _open(breaker)
    clock.advance(60.0)
    assert breaker.allow()
    breaker.record(True)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.batch_limit(1000) == 1000
    # the next outage starts again from the first cool-down
    _open(breaker)
    assert breaker.seconds_until_probe() == pytest.approx(10.0)


def test_a_failed_probe_reopens_with_a_longer_bounded_cooldown() -> None:
    """Each failed probe reopens at once, the cool-down growing up to max_cooldown."""
    clock = FakeClock()
    breaker = _breaker(clock, rand=1.0)
    _open(breaker)
    cooldowns = [breaker.seconds_until_probe()]
    for _ in range(8):
        clock.advance(cooldowns[-1])
        assert breaker.allow()
        assert breaker.state is BreakerState.HALF_OPEN
        breaker.record(False)  # a single failure is enough in half-open
        assert breaker.state is BreakerState.OPEN
        assert not breaker.allow()
        cooldowns.append(breaker.seconds_until_probe())
    # 5 + min(60, 5 * 2**n): 10, 15, 25, 45, then capped at 60
    assert cooldowns[:4] == pytest.approx([10.0, 15.0, 25.0, 45.0])
    assert cooldowns[4:] == pytest.approx([60.0] * 5)
    assert all(later >= earlier for earlier, later in itertools.pairwise(cooldowns))


def test_breaker_cooldown_never_exceeds_max_cooldown_whatever_the_jitter() -> None:
    """Even the largest jitter keeps every cool-down within max_cooldown."""
    clock = FakeClock()
    breaker = CircuitBreaker(
        threshold=1,
        cooldown=20.0,
        max_cooldown=30.0,
        probe_size=1,
        clock=clock,
        rand=lambda: 1.0,
    )
    breaker.record(False)
    for _ in range(5):
        assert 0 < breaker.seconds_until_probe() <= 30.0
        clock.advance(breaker.seconds_until_probe())
        assert breaker.allow()
        breaker.record(False)
