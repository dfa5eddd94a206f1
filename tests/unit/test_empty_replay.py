"""What `replay` says when it found nothing to replay: what the outbox can tell, no more."""

from __future__ import annotations

import datetime as dt

import pytest

from outbox_relay.dead_letters import NothingReplayed, Selection

NOW = dt.datetime(2026, 1, 10, 12, 0, tzinfo=dt.UTC)
HOUR = 3600.0


def explained(
    selection: Selection,
    retentions: tuple[float | None, ...],
    *,
    unpublished: int = 0,
    last_id: int | None = 100,
) -> str:
    """The message, with the relays' --retention (seconds, None: a relay that does not say)."""
    found = NothingReplayed(unpublished, retentions, last_id, NOW)
    return found.explain(selection)


def test_rows_not_published_yet_are_said_to_be_so() -> None:
    """The range holds rows, none published: they are what the operator must hear about."""
    text = explained(Selection(from_id=5, to_id=6), (0.0,), unpublished=2)
    assert text.startswith("nothing to replay: 2 events are not published yet in that range")
    assert "--retention" not in text


@pytest.mark.parametrize(
    "selection",
    [
        pytest.param(Selection(since=NOW - dt.timedelta(minutes=10)), id="within-the-retention"),
        pytest.param(
            Selection(from_id=3, since=NOW - dt.timedelta(minutes=59)), id="ids-and-times"
        ),
    ],
)
def test_relays_keeping_rows_and_a_range_they_would_keep_mean_no_events(
    selection: Selection,
) -> None:
    """Relays keep published rows an hour: rows of the range, had there been any, would be
    there. Retention is not the reason, and is not mentioned."""
    assert explained(selection, (HOUR, 2 * HOUR)) == "no events in that range"


def test_the_topic_is_named() -> None:
    selection = Selection(topic="orders", since=NOW - dt.timedelta(minutes=10))
    assert explained(selection, (HOUR,)) == "no events of topic 'orders' in that range"


@pytest.mark.parametrize(
    "selection",
    [
        pytest.param(Selection(from_id=3, to_id=9), id="ids-handed-out-before"),
        pytest.param(Selection(since=NOW - dt.timedelta(days=2)), id="older-than-the-retention"),
    ],
)
def test_relays_keeping_rows_for_a_while_may_have_purged_older_ones(selection: Selection) -> None:
    """The shortest retention of the relays is the one that purges, and it is named."""
    text = explained(selection, (2 * HOUR, HOUR))
    assert text == (
        "no events in that range are left: the relays keep published rows 1h "
        "(--retention), then purge"
    )


def test_relays_deleting_on_publish_are_named_as_the_reason() -> None:
    """One relay that deletes rows on publish is enough for rows of any range to be gone."""
    text = explained(Selection(from_id=50), (HOUR, 0.0))
    assert text.startswith("no events in that range are left: the relays delete rows once")
    assert "--retention" in text


@pytest.mark.parametrize("retentions", [(), (HOUR, None)])
def test_relays_that_do_not_say_leave_retention_as_a_possible_reason(
    retentions: tuple[float | None, ...],
) -> None:
    """No registered relay, or one of an earlier version: whether rows are deleted on publish
    is not known, so the message says under which condition they are."""
    text = explained(Selection(since=NOW - dt.timedelta(minutes=10)), retentions)
    assert text == (
        "no events in that range are left: the relays delete rows once they are published "
        "unless they run with --retention (OUTBOX_RETENTION)"
    )


@pytest.mark.parametrize("retentions", [(), (0.0,), (None,), (HOUR,)])
@pytest.mark.parametrize(
    "selection",
    [
        pytest.param(Selection(from_id=101, to_id=200), id="past-the-last-id"),
        pytest.param(Selection(ids=[150]), id="an-id-past-the-last-id"),
        pytest.param(Selection(since=NOW + dt.timedelta(hours=1)), id="in-the-future"),
    ],
)
def test_a_range_after_every_row_ever_written_has_no_events_whatever_the_relays_do(
    selection: Selection, retentions: tuple[float | None, ...]
) -> None:
    """Row ids past the last one handed out (100) never existed: nothing was deleted there."""
    assert explained(selection, retentions, last_id=100) == "no events in that range"


def test_an_unknown_last_id_leaves_an_id_range_possibly_purged() -> None:
    """A sequence that caches ids does not tell the last one handed out."""
    text = explained(Selection(from_id=101), (HOUR,), last_id=None)
    assert text.endswith("then purge")
