"""How slowly an idle relay watches its outbox: the tick grows with the time since events."""

from __future__ import annotations

from outbox_relay.wakeup import MAX_TICK_MS, idle_tick_ms


def test_a_relay_that_just_had_events_ticks_at_its_fastest_longest_tick() -> None:
    assert [idle_tick_ms(s, 100) for s in (0, 0.5, 3, MAX_TICK_MS)] == [MAX_TICK_MS] * 4


def test_the_tick_grows_a_millisecond_per_second_idle_up_to_idle_tick() -> None:
    assert [idle_tick_ms(s, 100) for s in (10, 42.9, 99)] == [10, 42, 99]
    assert idle_tick_ms(600, 100) == idle_tick_ms(86400, 100) == 100


def test_the_default_of_one_outbox_keeps_the_tick_at_6_ms() -> None:
    assert {idle_tick_ms(s, MAX_TICK_MS) for s in (0, 10, 600, 86400)} == {MAX_TICK_MS}


def test_the_added_wait_stays_within_a_thousandth_of_the_quiet() -> None:
    for seconds in (7, 20, 50, 100):
        assert idle_tick_ms(seconds, 1000) <= seconds
