"""The scan floor's rule, on samples written out by hand (outbox_relay/floor.py)."""

from __future__ import annotations

from outbox_relay.floor import FloorSample, ScanFloor


def sample(*, bound: int, xid: int, oldest_running: int, lowest: int | None) -> FloorSample:
    return FloorSample(bound=bound, xid=xid, oldest_running=oldest_running, lowest=lowest)


def test_one_sample_alone_gives_no_floor() -> None:
    floor = ScanFloor()
    assert floor.update(sample(bound=500, xid=10, oldest_running=11, lowest=400), now=0.0) == 0


def test_the_floor_is_the_lower_of_the_oldest_waiting_row_and_the_previous_bound() -> None:
    floor = ScanFloor()
    floor.update(sample(bound=500, xid=10, oldest_running=9, lowest=100), now=0.0)
    assert floor.update(sample(bound=900, xid=20, oldest_running=11, lowest=450), now=1.0) == 450
    assert floor.update(sample(bound=950, xid=30, oldest_running=21, lowest=920), now=2.0) == 900


def test_with_nothing_waiting_the_floor_is_the_previous_bound() -> None:
    floor = ScanFloor()
    floor.update(sample(bound=500, xid=10, oldest_running=10, lowest=None), now=0.0)
    assert floor.update(sample(bound=500, xid=20, oldest_running=20, lowest=None), now=1.0) == 500


def test_a_transaction_as_old_as_the_previous_sample_drops_the_floor() -> None:
    """It may hold row ids below anything seen so far, so the claim starts at the beginning."""
    floor = ScanFloor()
    floor.update(sample(bound=500, xid=10, oldest_running=9, lowest=None), now=0.0)
    floor.update(sample(bound=600, xid=20, oldest_running=11, lowest=550), now=1.0)
    assert floor.value == 500
    assert floor.update(sample(bound=700, xid=30, oldest_running=20, lowest=650), now=2.0) == 0
    assert floor.update(sample(bound=800, xid=40, oldest_running=31, lowest=650), now=3.0) == 650


def test_samples_are_due_once_an_interval() -> None:
    floor = ScanFloor(interval=1.0)
    assert floor.next_sample <= 0.0
    floor.update(sample(bound=1, xid=1, oldest_running=1, lowest=None), now=5.0)
    assert floor.next_sample > 5.9
    assert floor.next_sample <= 6.0


def test_a_reset_floor_waits_for_two_new_samples() -> None:
    floor = ScanFloor()
    floor.update(sample(bound=500, xid=10, oldest_running=9, lowest=None), now=0.0)
    floor.update(sample(bound=500, xid=20, oldest_running=11, lowest=None), now=1.0)
    floor.reset()
    assert (floor.value, floor.next_sample <= 1.0) == (0, True)
    assert floor.update(sample(bound=600, xid=30, oldest_running=21, lowest=None), now=2.0) == 0


def test_a_disabled_floor_is_never_sampled_again() -> None:
    floor = ScanFloor()
    floor.disable()
    assert floor.value == 0
    assert floor.next_sample > 1e12


def test_a_statement_without_a_transaction_id_running_across_two_samples_drops_the_floor() -> None:
    """It may hold row ids up to the previous bound that no snapshot shows (an INSERT or COPY
    takes them before its transaction id), so the claim starts at the beginning."""
    floor = ScanFloor()
    floor.update(FloorSample(500, 10, 9, None, suspects=("3/7",)), now=0.0)
    assert floor.suspects == ("3/7",)
    held = FloorSample(600, 20, 11, 550, suspects=("3/7",), suspects_before_running=True)
    assert floor.update(held, now=1.0) == 0
    done = FloorSample(700, 30, 21, 650, suspects=(), suspects_before_running=False)
    assert floor.update(done, now=2.0) == 600
    assert floor.suspects == ()


def test_a_sequence_that_went_back_turns_the_floor_off_for_good() -> None:
    floor = ScanFloor()
    floor.update(sample(bound=500, xid=10, oldest_running=9, lowest=None), now=0.0)
    assert floor.update(sample(bound=500, xid=20, oldest_running=11, lowest=None), now=1.0) == 500
    assert floor.update(sample(bound=3, xid=30, oldest_running=21, lowest=2), now=2.0) == 0
    assert "went back from 500 to 3" in floor.broken
    assert floor.next_sample > 1e9


def test_a_new_row_below_the_floor_turns_it_off_for_good() -> None:
    """Rows put back by an operator are expected there; a row never tried is not."""
    floor = ScanFloor()
    floor.update(sample(bound=500, xid=10, oldest_running=9, lowest=None), now=0.0)
    floor.update(sample(bound=600, xid=20, oldest_running=11, lowest=None), now=1.0)
    put_back = FloorSample(bound=600, xid=30, oldest_running=21, lowest=7, lowest_new=None)
    assert floor.update(put_back, now=2.0) == 7
    assert not floor.broken
    floor.update(sample(bound=600, xid=40, oldest_running=31, lowest=None), now=3.0)
    assert floor.value == 600
    written_below = FloorSample(bound=600, xid=50, oldest_running=41, lowest=42, lowest_new=42)
    assert floor.update(written_below, now=4.0) == 0
    assert "row 42 was written below the floor 600" in floor.broken
