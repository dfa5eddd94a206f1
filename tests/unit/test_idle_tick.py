"""How slowly an idle relay watches its outbox: the tick grows with the time since events."""

from __future__ import annotations

from outbox_relay.wakeup import IDLE_TICK_MS, MAX_TICK_MS, idle_tick_ms


def test_a_relay_that_just_had_events_ticks_at_its_fastest_longest_tick() -> None:
    assert [idle_tick_ms(s) for s in (0, 0.5, 3, MAX_TICK_MS)] == [MAX_TICK_MS] * 4


def test_the_tick_grows_a_millisecond_per_second_idle_up_to_its_cap() -> None:
    assert [idle_tick_ms(s) for s in (10, 42.9, 99)] == [10, 42, 99]
    assert idle_tick_ms(600) == idle_tick_ms(86400) == IDLE_TICK_MS == 100


def test_the_added_wait_stays_within_a_thousandth_of_the_quiet() -> None:
    for seconds in (7, 20, 50, 100):
        assert idle_tick_ms(seconds) <= seconds
