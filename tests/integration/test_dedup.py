"""outbox.dedup on a real PostgreSQL: claim / claim_async in the caller's transaction, purge."""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

import outbox
from outbox import dedup, migrator
from outbox.connections import SyncDB
from outbox.settings import OutboxSettings
from tests.integration.connections import (
    ASYNC_KINDS,
    SYNC_KINDS,
    AsyncOpener,
    Opener,
    async_opener,
    execute,
    pgconn_of,
    sync_opener,
    traced,
)


class Boom(Exception):
    """Raised inside a transaction to make it roll back."""


def claims(database_url: str, table: str = "outbox_dedup") -> list[tuple[str, str]]:
    """The committed dedup records of ``table``, sorted."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            f"SELECT consumer, message_id FROM {table} ORDER BY consumer, message_id"
        ).fetchall()
    return [(c, m) for c, m in rows]


@pytest.fixture(params=SYNC_KINDS)
def transaction(request: pytest.FixtureRequest, engine: sa.Engine, database_url: str) -> Opener:
    return sync_opener(request.param, engine, database_url)


@pytest.fixture(params=ASYNC_KINDS)
def async_transaction(
    request: pytest.FixtureRequest, async_engine: AsyncEngine, database_url: str
) -> AsyncOpener:
    return async_opener(request.param, async_engine, database_url)


@pytest.fixture
def side_effects(database_url: str) -> str:
    """A table for the side effects that a claim guards; returns its name."""
    with psycopg.connect(database_url) as conn:
        conn.execute("CREATE TABLE side_effects (message_id text NOT NULL, worker int NOT NULL)")
    return "side_effects"


def side_effect_rows(database_url: str) -> list[tuple[str, int]]:
    with psycopg.connect(database_url) as conn:
        return [(m, w) for m, w in conn.execute("SELECT message_id, worker FROM side_effects")]


# --- claim: first True, then False --------------------------------------------------------------


def test_claim_is_true_once_per_consumer_and_id(transaction: Opener, database_url: str) -> None:
    """True the first time, False for the same (consumer, id) in the same and later
    transactions; another consumer or another id is independent."""
    with transaction() as db:
        assert dedup.claim(db, "billing", "evt-1") is True
        assert dedup.claim(db, "billing", "evt-1") is False
        assert dedup.claim(db, "shipping", "evt-1") is True
        assert dedup.claim(db, "billing", "evt-2") is True
    with transaction() as db:
        assert dedup.claim(db, "billing", "evt-1") is False
        assert dedup.claim(db, "shipping", "evt-1") is False
        assert dedup.claim(db, "billing", "evt-2") is False
        assert dedup.claim(db, "audit", "evt-1") is True
    assert claims(database_url) == [
        ("audit", "evt-1"),
        ("billing", "evt-1"),
        ("billing", "evt-2"),
        ("shipping", "evt-1"),
    ]


@pytest.mark.asyncio
async def test_claim_async_is_true_once_per_consumer_and_id(
    async_transaction: AsyncOpener, database_url: str
) -> None:
    """claim_async: True the first time, False for the same (consumer, id) in the same and
    later transactions; another consumer is independent."""
    async with async_transaction() as db:
        assert await dedup.claim_async(db, "billing", "evt-1") is True
        assert await dedup.claim_async(db, "billing", "evt-1") is False
        assert await dedup.claim_async(db, "shipping", "evt-1") is True
    async with async_transaction() as db:
        assert await dedup.claim_async(db, "billing", "evt-1") is False
        assert await dedup.claim_async(db, "shipping", "evt-1") is False
        assert await dedup.claim_async(db, "audit", "evt-1") is True
    assert claims(database_url) == [("audit", "evt-1"), ("billing", "evt-1"), ("shipping", "evt-1")]


def test_claim_many_returns_only_the_ids_claimed_now(
    transaction: Opener, database_url: str
) -> None:
    """claim_many: one statement; ids already processed, and repeats within the call, are not
    returned; an empty call claims nothing."""
    with transaction() as db:
        assert dedup.claim(db, "billing", "evt-1") is True
        assert dedup.claim_many(db, "billing", ["evt-3", "evt-1", "evt-2", "evt-3"]) == {
            "evt-2",
            "evt-3",
        }
        assert dedup.claim_many(db, "billing", []) == set()
    with transaction() as db:
        assert dedup.claim_many(db, "billing", ["evt-2", "evt-4"]) == {"evt-4"}
        assert dedup.claim(db, "billing", "evt-4") is False
    assert claims(database_url) == [("billing", f"evt-{i}") for i in range(1, 5)]


AWKWARD_IDS = ['a"b', "back\\slash", "comma,id", "{braces}", " spaced ", "NULL", "ünï €"]
AWKWARD_IDS += ["x" * 1024]


def test_claim_many_keeps_ids_with_quotes_commas_and_backslashes_intact(
    transaction: Opener, database_url: str
) -> None:
    """Ids that mean something in an array literal are claimed as themselves: each recorded
    exactly as given, and recognised again by claim and by claim_many."""
    with transaction() as db:
        assert dedup.claim_many(db, "billing", AWKWARD_IDS) == set(AWKWARD_IDS)
    with transaction() as db:
        assert dedup.claim_many(db, "billing", [*AWKWARD_IDS, "new"]) == {"new"}
        assert all(dedup.claim(db, "billing", i) is False for i in AWKWARD_IDS)
    # Sorted here, not by the server's collation, which orders spaces and accents its own way.
    assert sorted(claims(database_url)) == sorted(("billing", i) for i in [*AWKWARD_IDS, "new"])


@pytest.mark.asyncio
async def test_claim_many_async_returns_only_the_ids_claimed_now(
    async_transaction: AsyncOpener, database_url: str
) -> None:
    """claim_many_async: the async twin, same answers."""
    async with async_transaction() as db:
        assert await dedup.claim_many_async(db, "billing", ["a", "b", "a"]) == {"a", "b"}
        assert await dedup.claim_many_async(db, "billing", ["b", "c"]) == {"c"}
    assert claims(database_url) == [("billing", "a"), ("billing", "b"), ("billing", "c")]


def test_claim_rolls_back_with_the_transaction(transaction: Opener, database_url: str) -> None:
    """A claim in a transaction that rolls back leaves no record: the next claim is True."""

    def claim_then_fail() -> None:
        with transaction() as db:
            assert dedup.claim(db, "billing", "evt-1") is True
            raise Boom

    with pytest.raises(Boom):
        claim_then_fail()
    assert claims(database_url) == []
    with transaction() as db:
        assert dedup.claim(db, "billing", "evt-1") is True
    assert claims(database_url) == [("billing", "evt-1")]


@pytest.mark.asyncio
async def test_claim_async_rolls_back_with_the_transaction(
    async_transaction: AsyncOpener, database_url: str
) -> None:
    """An async claim in a transaction that rolls back leaves no record: the next is True."""

    async def claim_then_fail() -> None:
        async with async_transaction() as db:
            assert await dedup.claim_async(db, "billing", "evt-1") is True
            raise Boom

    with pytest.raises(Boom):
        await claim_then_fail()
    assert claims(database_url) == []
    async with async_transaction() as db:
        assert await dedup.claim_async(db, "billing", "evt-1") is True
    assert claims(database_url) == [("billing", "evt-1")]


def incompressible(length: int, low: int, high: int, seed: int) -> str:
    """``length`` random characters between code points ``low`` and ``high``."""
    rng = random.Random(seed)
    return "".join(chr(rng.randrange(low, high)) for _ in range(length))


LONGEST = [
    pytest.param(1, id="ascii"),  # 1,024 characters
    pytest.param(2, id="2-byte"),  # 512 characters
    pytest.param(4, id="4-byte"),  # 256 emoji
]


@pytest.mark.parametrize("width", LONGEST)
def test_claim_stores_the_longest_accepted_names(
    width: int, transaction: Opener, database_url: str
) -> None:
    """A consumer name and an id of MAX_ID_LENGTH UTF-8 bytes each, random so that PostgreSQL
    cannot compress them, fit the primary key: what validation accepts, the database stores."""
    low, high = {1: (0x21, 0x7F), 2: (0x100, 0x800), 4: (0x1F300, 0x1F600)}[width]
    consumer = incompressible(dedup.MAX_ID_LENGTH // width, low, high, seed=1)
    message_id = incompressible(dedup.MAX_ID_LENGTH // width, low, high, seed=2)
    assert len(consumer.encode()) == len(message_id.encode()) == dedup.MAX_ID_LENGTH
    with transaction() as db:
        assert dedup.claim(db, consumer, message_id) is True
        assert dedup.claim(db, consumer, message_id) is False
    assert claims(database_url) == [(consumer, message_id)]


# --- races ---------------------------------------------------------------------------------------


def waiting_for_lock(database_url: str, pid: int) -> bool:
    """Whether the backend ``pid`` is blocked on a lock."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
    return row is not None and row[0] == "Lock"


@pytest.mark.parametrize("first_outcome", ["commit", "rollback"])
def test_concurrent_claim_waits_for_the_first_transaction(
    first_outcome: str, database_url: str
) -> None:
    """A second transaction claiming the same id blocks until the first ends; it gets False if
    the first committed, True if the first rolled back."""
    result: list[bool | BaseException] = []
    with psycopg.connect(database_url) as first, psycopg.connect(database_url) as second:
        second_pid = second.info.backend_pid
        assert dedup.claim(first, "billing", "evt-1") is True

        def claim_second() -> None:
            try:
                with second.transaction():
                    result.append(dedup.claim(second, "billing", "evt-1"))
            except BaseException as exc:  # reported by the assertions below
                result.append(exc)

        thread = threading.Thread(target=claim_second)
        thread.start()
        try:
            deadline = time.monotonic() + 10
            while not waiting_for_lock(database_url, second_pid):
                assert time.monotonic() < deadline, "the second claim did not block"
                assert thread.is_alive(), f"the second claim returned at once: {result}"
                time.sleep(0.02)
            time.sleep(0.2)
            assert result == [], "the second claim returned while the first was open"
        finally:
            if first_outcome == "commit":
                first.commit()
            else:
                first.rollback()
            thread.join(timeout=10)
        assert not thread.is_alive()
    assert result == [first_outcome == "rollback"]
    assert claims(database_url) == [("billing", "evt-1")]


@pytest.mark.parametrize("kind", ["psycopg", "orm-session"])
def test_many_concurrent_claims_make_one_side_effect(
    kind: str, engine: sa.Engine, database_url: str, side_effects: str
) -> None:
    """Eight transactions claim one id at once, each inserting a side effect only if its claim
    is True: exactly one claim wins and exactly one side effect is committed."""
    workers = 8
    transaction = sync_opener(kind, engine, database_url)
    start = threading.Barrier(workers)
    won: dict[int, bool] = {}
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            with transaction() as db:
                execute(db, "SELECT 1")  # connected and in a transaction before the race
                start.wait(timeout=30)
                won[worker] = dedup.claim(db, "billing", "evt-1")
                if won[worker]:
                    execute(db, f"INSERT INTO {side_effects} VALUES ('evt-1', {worker})")
                    time.sleep(0.2)  # keep the winner open while the others queue behind it
        except BaseException as exc:  # reported by the assertions below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(won) == workers
    winners = [w for w, ok in won.items() if ok]
    assert len(winners) == 1, won
    assert side_effect_rows(database_url) == [("evt-1", winners[0])]
    assert claims(database_url) == [("billing", "evt-1")]


def test_concurrent_claims_after_a_rollback_still_make_one_side_effect(
    database_url: str, side_effects: str
) -> None:
    """Eight transactions race; the first winner rolls back: one of the others then wins, and
    exactly one side effect is committed."""
    workers = 8
    start = threading.Barrier(workers)
    outcome: dict[int, str] = {}
    errors: list[BaseException] = []
    rolled_back = threading.Event()

    def work(worker: int) -> None:
        try:
            with psycopg.connect(database_url) as conn:
                conn.execute("SELECT 1")
                start.wait(timeout=30)
                if not dedup.claim(conn, "billing", "evt-1"):
                    outcome[worker] = "duplicate"
                    return
                conn.execute(f"INSERT INTO {side_effects} VALUES ('evt-1', %s)", (worker,))
                time.sleep(0.2)
                if not rolled_back.is_set():
                    rolled_back.set()
                    conn.rollback()
                    outcome[worker] = "rolled back"
                else:
                    outcome[worker] = "committed"
        except BaseException as exc:  # reported by the assertions below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sorted(Counter(outcome.values()).items()) == [
        ("committed", 1),
        ("duplicate", workers - 2),
        ("rolled back", 1),
    ]
    (committed,) = [w for w, o in outcome.items() if o == "committed"]
    assert side_effect_rows(database_url) == [("evt-1", committed)]


# --- refused input -------------------------------------------------------------------------------

BAD_IDS = [
    pytest.param("", "evt-1", id="empty-consumer"),
    pytest.param("billing", "", id="empty-id"),
    pytest.param(None, "evt-1", id="none-consumer"),
    pytest.param("billing", 42, id="int-id"),
    pytest.param("billing", b"evt-1", id="bytes-id"),
    pytest.param("bill\x00ing", "evt-1", id="nul-consumer"),
    pytest.param("billing", "evt\x00-1", id="nul-id"),
    pytest.param("billing", "x" * (dedup.MAX_ID_LENGTH + 1), id="id-too-long"),
    pytest.param("c" * (dedup.MAX_ID_LENGTH + 1), "evt-1", id="consumer-too-long"),
    # 513 characters, 1,026 bytes: the limit counts UTF-8 bytes (the primary key's size).
    pytest.param("billing", "é" * (dedup.MAX_ID_LENGTH // 2 + 1), id="id-too-many-bytes"),
    pytest.param("billing", "evt-\ud800", id="lone-surrogate"),
]


@pytest.mark.parametrize(("consumer", "message_id"), BAD_IDS)
def test_bad_input_is_refused_before_any_io(
    consumer: Any, message_id: Any, transaction: Opener, database_url: str, tmp_path: Path
) -> None:
    """Empty, non-str, NUL-holding or over-long names raise InvalidEventError without sending
    anything; the transaction stays usable."""
    with transaction() as db:
        execute(db, "SELECT 1")
        with (
            traced(pgconn_of(db), tmp_path / "bad.trace") as sent,
            pytest.raises(outbox.InvalidEventError),
        ):
            dedup.claim(db, consumer, message_id)
        assert sent == Counter()
        assert dedup.claim(db, "billing", "good") is True
    assert claims(database_url) == [("billing", "good")]


@pytest.mark.parametrize(("consumer", "message_id"), BAD_IDS)
def test_bad_input_is_refused_on_a_closed_connection(
    consumer: Any, message_id: Any, database_url: str
) -> None:
    """Validation comes first: on a closed connection, where any I/O would fail, the error is
    still InvalidEventError."""
    conn = psycopg.connect(database_url)
    conn.close()
    with pytest.raises(outbox.InvalidEventError):
        dedup.claim(conn, consumer, message_id)
    with pytest.raises(psycopg.OperationalError):  # whereas a good claim does reach the wire
        dedup.claim(conn, "billing", "evt-1")


@pytest.mark.asyncio
@pytest.mark.parametrize(("consumer", "message_id"), BAD_IDS)
async def test_bad_input_is_refused_by_claim_async(
    consumer: Any, message_id: Any, database_url: str
) -> None:
    """claim_async validates like claim and leaves the transaction usable."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        with pytest.raises(outbox.InvalidEventError):
            await dedup.claim_async(conn, consumer, message_id)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE  # nothing sent
        assert await dedup.claim_async(conn, "billing", "good") is True
    assert claims(database_url) == [("billing", "good")]


# --- autocommit ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["psycopg", "sa-connection", "orm-session"])
def test_autocommit_without_transaction_is_refused(
    kind: str, engine: sa.Engine, database_url: str
) -> None:
    """A claim that would commit on its own, apart from the side effects, is refused."""
    autocommit_engine = engine.execution_options(isolation_level="AUTOCOMMIT")
    with contextlib.ExitStack() as stack:
        if kind == "psycopg":
            db: SyncDB = stack.enter_context(psycopg.connect(database_url, autocommit=True))
        elif kind == "sa-connection":
            db = stack.enter_context(autocommit_engine.connect())
        else:
            db = stack.enter_context(Session(autocommit_engine))
            stack.enter_context(db.begin())
        with pytest.raises(outbox.TransactionRequiredError, match="autocommit mode"):
            dedup.claim(db, "billing", "evt-1")
    assert claims(database_url) == []


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["psycopg-async", "sa-async-connection"])
async def test_autocommit_without_transaction_is_refused_async(
    kind: str, async_engine: AsyncEngine, database_url: str
) -> None:
    """claim_async refuses an autocommit connection with no transaction open."""
    if kind == "psycopg-async":
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as pg:
            with pytest.raises(outbox.TransactionRequiredError):
                await dedup.claim_async(pg, "billing", "evt-1")
    else:
        autocommit_engine = async_engine.execution_options(isolation_level="AUTOCOMMIT")
        async with autocommit_engine.connect() as conn:
            with pytest.raises(outbox.TransactionRequiredError):
                await dedup.claim_async(conn, "billing", "evt-1")
    assert claims(database_url) == []


# --- purge ---------------------------------------------------------------------------------------


class CountingConnection:
    """Delegates to a psycopg connection, recording the row count of every statement."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.rowcounts: list[int] = []
        self.transactions = 0

    def execute(self, *args: Any, **kwargs: Any) -> psycopg.Cursor[Any]:
        cursor = self.conn.execute(*args, **kwargs)
        self.rowcounts.append(cursor.rowcount)
        return cursor

    def transaction(self) -> contextlib.AbstractContextManager[Any]:
        self.transactions += 1
        return self.conn.transaction()


def age(
    database_url: str,
    consumer: str,
    ids: list[str],
    by: dt.timedelta,
    table: str = "outbox_dedup",
) -> None:
    """Set processed_at of these records of ``table`` to ``by`` ago."""
    with psycopg.connect(database_url) as conn:
        conn.execute(
            f"UPDATE {table} SET processed_at = now() - %s"
            " WHERE consumer = %s AND message_id = ANY(%s)",
            (by, consumer, ids),
        )


@pytest.mark.parametrize("autocommit", [True, False], ids=["autocommit", "non-autocommit"])
def test_purge_deletes_only_old_records_in_batches(autocommit: bool, database_url: str) -> None:
    """Records older than the period go, 3 per transaction, each batch committed; newer stay."""
    old = [f"old-{i}" for i in range(10)]
    recent = [f"new-{i}" for i in range(5)]
    with psycopg.connect(database_url) as conn:
        for message_id in old + recent:
            assert dedup.claim(conn, "billing", message_id)
    age(database_url, "billing", old, dt.timedelta(days=8))
    age(database_url, "billing", recent[:2], dt.timedelta(days=6))  # close to, but inside

    with psycopg.connect(database_url, autocommit=autocommit) as conn:
        spy = CountingConnection(conn)
        deleted = dedup.purge(spy, dt.timedelta(days=7), batch_size=3)  # type: ignore[arg-type]
        assert deleted == 10
        assert spy.rowcounts == [3, 3, 3, 1]
        assert spy.transactions == 4
        # Committed already: another connection sees the rows gone while this one is still open.
        assert claims(database_url) == [("billing", m) for m in sorted(recent)]
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE

    with psycopg.connect(database_url, autocommit=True) as conn:
        assert dedup.purge(conn, dt.timedelta(days=7), batch_size=3) == 0
        assert dedup.purge(conn, dt.timedelta(days=5)) == 2
    assert claims(database_url) == [("billing", m) for m in sorted(recent[2:])]


def test_purge_exact_multiple_of_the_batch_size(database_url: str) -> None:
    """Six old records with batch_size=3: all six deleted and the count returned."""
    ids = [f"old-{i}" for i in range(6)]
    with psycopg.connect(database_url) as conn:
        for message_id in ids:
            dedup.claim(conn, "billing", message_id)
            dedup.claim(conn, "shipping", message_id)
    age(database_url, "billing", ids, dt.timedelta(hours=2))
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert dedup.purge(conn, dt.timedelta(hours=1), batch_size=3) == 6
    assert claims(database_url) == [("shipping", m) for m in sorted(ids)]


@pytest.mark.parametrize("period", [dt.timedelta(0), dt.timedelta(seconds=-1)])
def test_purge_refuses_a_period_that_is_not_positive(
    period: dt.timedelta, database_url: str
) -> None:
    """A zero or negative period would delete records of messages still being redelivered."""
    with psycopg.connect(database_url) as conn:
        dedup.claim(conn, "billing", "evt-1")
    with (
        psycopg.connect(database_url, autocommit=True) as conn,
        pytest.raises(ValueError, match="positive"),
    ):
        dedup.purge(conn, period)
    assert claims(database_url) == [("billing", "evt-1")]


# --- outbox.configure -----------------------------------------------------------------------


@pytest.fixture
def configured(database_url: str) -> Iterator[OutboxSettings]:
    """``outbox.configure`` with a schema and table prefix of their own (applied); undone after."""
    settings = OutboxSettings(schema="billing", table_prefix="evt_")
    with psycopg.connect(database_url) as conn:
        migrator.apply(conn, settings)
    outbox.configure(settings)
    try:
        yield settings
    finally:
        outbox.configure()


def test_configure_retargets_claim_and_claim_many(
    configured: OutboxSettings, database_url: str
) -> None:
    """After outbox.configure(settings), dedup records go to the configured table, like events."""
    with psycopg.connect(database_url) as conn:
        assert dedup.claim(conn, "billing", "evt-1")
        assert not dedup.claim(conn, "billing", "evt-1")
        assert dedup.claim_many(conn, "billing", ["evt-1", "evt-2"]) == {"evt-2"}
        outbox.add(conn, "orders", {"id": 1})
    assert claims(database_url, configured.dedup_table) == [
        ("billing", "evt-1"),
        ("billing", "evt-2"),
    ]
    assert claims(database_url) == []


@pytest.mark.asyncio
async def test_configure_retargets_claim_async_and_claim_many_async(
    configured: OutboxSettings, database_url: str
) -> None:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        assert await dedup.claim_async(conn, "billing", "evt-1")
        assert not await dedup.claim_async(conn, "billing", "evt-1")
        assert await dedup.claim_many_async(conn, "billing", ["evt-1", "evt-2"]) == {"evt-2"}
    assert claims(database_url, configured.dedup_table) == [
        ("billing", "evt-1"),
        ("billing", "evt-2"),
    ]
    assert claims(database_url) == []


def test_configure_retargets_purge(configured: OutboxSettings, database_url: str) -> None:
    """purge without settings deletes from the configured table, and only there."""
    with psycopg.connect(database_url) as conn:
        dedup.claim(conn, "billing", "evt-1", settings=OutboxSettings())
        dedup.claim(conn, "billing", "evt-1")
        dedup.claim(conn, "billing", "evt-2")
    age(database_url, "billing", ["evt-1", "evt-2"], dt.timedelta(days=8), configured.dedup_table)
    age(database_url, "billing", ["evt-1"], dt.timedelta(days=8))
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert dedup.purge(conn, dt.timedelta(days=7)) == 2
    assert claims(database_url, configured.dedup_table) == []
    assert claims(database_url) == [("billing", "evt-1")]


def test_settings_given_to_a_call_win_over_the_configured_ones(
    configured: OutboxSettings, database_url: str
) -> None:
    with psycopg.connect(database_url) as conn:
        assert dedup.claim(conn, "billing", "evt-1", settings=OutboxSettings())
        assert dedup.claim_many(conn, "billing", ["evt-2"], settings=OutboxSettings()) == {"evt-2"}
    assert claims(database_url) == [("billing", "evt-1"), ("billing", "evt-2")]
    assert claims(database_url, configured.dedup_table) == []


def test_consume_loops_claim_in_the_configured_table_by_default(
    configured: OutboxSettings,
) -> None:
    """ConsumerSettings made after outbox.configure point the loop's claims at its table."""
    from outbox.consumer import ConsumerSettings

    made = ConsumerSettings(name="billing", topics=["orders"], bootstrap_servers="k:9092")
    assert made.outbox == configured
