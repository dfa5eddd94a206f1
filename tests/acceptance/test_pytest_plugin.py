"""The pytest plugin, as a user's test suite meets it: ``pytester`` writes a user's tests into a
temporary directory and runs pytest on them in a subprocess, where the plugin is loaded
through its ``pytest11`` entry point (nothing in the user's conftest)."""

from __future__ import annotations

import pytest

from tests.docs.test_snippets import ROOT, Block, fenced_blocks

pytest_plugins = ["pytester"]

USER_TESTS = '''
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox
from outbox.testkit import RelayOnceError, outbox_events


def place_order(session: Session, item: str) -> None:
    """The user's function under test: an order and its event, in the caller's transaction."""
    session.execute(sa.text("INSERT INTO orders (item) VALUES (:item)"), {"item": item})
    outbox.add(session, "orders", {"item": item}, key=item)


@pytest.fixture
def engine(outbox_database):
    engine = sa.create_engine(outbox_database)
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE orders (id serial PRIMARY KEY, item text)"))
    yield engine
    engine.dispose()


def test_the_transaction_wrote_its_event(engine):
    with Session(engine) as session, session.begin():
        place_order(session, "book")
        with session.begin_nested():  # a savepoint's events are the transaction's too
            place_order(session, "pen")
        [book, pen] = outbox_events(session, topic="orders")
        assert (book.key, book.payload) == ("book", {"item": "book"})
        assert pen.payload == {"item": "pen"}
        assert outbox_events(session, topic="elsewhere") == []


def test_only_this_transaction_s_events(engine):
    with Session(engine) as session, session.begin():
        place_order(session, "committed earlier")
    with Session(engine) as session, session.begin():
        assert outbox_events(session) == []
        place_order(session, "now")
        assert [e.payload["item"] for e in outbox_events(session)] == ["now"]


def test_a_fresh_database_per_test(engine):
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM outbox_events")).scalar() == 0


def test_the_relay_publishes_it(engine, relay_once, consumed):
    with Session(engine) as session, session.begin():
        place_order(session, "lamp")
    with pytest.raises(RuntimeError), Session(engine) as session, session.begin():
        place_order(session, "rolled back")
        raise RuntimeError
    [published] = relay_once()
    assert published.payload == {"item": "lamp"}
    assert relay_once() == []  # nothing left
    [on_topic] = [m for m in consumed("orders") if m.event_id == published.event_id]
    assert (on_topic.key, on_topic.payload) == ("lamp", {"item": "lamp"})
    assert on_topic.offset is not None


def test_an_event_that_cannot_be_published_is_named(engine, relay_once):
    with Session(engine) as session, session.begin():
        outbox.add(session, "big", {"blob": "x" * 5000})
    # A producer limit below the event's size: the broker is never asked, the event fails.
    with pytest.raises(RelayOnceError, match="1 event.*to 'big'.*too large"):
        relay_once(kafka_config={"message.max.bytes": "2000"})
'''


EXAMPLES = [
    block
    for page in (ROOT / "README.md", ROOT / "docs" / "stacks.md")
    for block in fenced_blocks(page)
    if block.skip is not None and "test_pytest_plugin.py" in block.skip
]


@pytest.mark.kafka
@pytest.mark.parametrize("block", EXAMPLES, ids=[b.name for b in EXAMPLES])
def test_the_documented_example_passes(pytester: pytest.Pytester, block: Block) -> None:
    """The complete test of a user's function in the README and the docs, as printed there."""
    pytester.makepyfile(test_example=block.code)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=1)


def test_both_pages_show_the_example() -> None:
    assert [b.page.name for b in EXAMPLES] == ["README.md", "stacks.md"]


@pytest.mark.kafka
def test_a_user_test_suite_runs_on_the_plugin_s_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=300)
    result.assert_outcomes(passed=5)


def test_the_fixtures_are_listed_with_their_help(pytester: pytest.Pytester) -> None:
    """``pytest --fixtures`` shows each fixture with its first line of help; starts nothing."""
    result = pytester.runpytest_subprocess("--fixtures", timeout=120)
    for name in ("outbox_database", "outbox_kafka", "outbox_postgres", "relay_once", "consumed"):
        result.stdout.fnmatch_lines([f"{name}*"])
    assert result.ret == 0
