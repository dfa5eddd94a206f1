"""outbox.migrator against a real PostgreSQL: apply, re-apply, race, check, lock timeouts."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

import outbox
from outbox import migrator, schema, testing
from outbox.settings import OutboxSettings

DEFAULT = OutboxSettings()

#: Every column of the events table: name -> PostgreSQL type (udt_name).
EVENTS_COLUMNS = {
    "id": "int8",
    "event_id": "uuid",
    "topic": "text",
    "key": "bytea",
    "payload": "bytea",
    "header_names": "_text",
    "header_values": "_bytea",
    "shard": "int2",
    "created_at": "timestamptz",
    "attempts": "int4",
    "last_error": "text",
    "next_attempt_at": "timestamptz",
    "published_at": "timestamptz",
    "dead_lettered_at": "timestamptz",
}
DEDUP_COLUMNS = {"consumer": "text", "message_id": "text", "processed_at": "timestamptz"}
MIGRATIONS_COLUMNS = {
    "version": "int4",
    "name": "text",
    "checksum": "text",
    "applied_at": "timestamptz",
}

CUSTOM = [
    pytest.param(OutboxSettings(schema="app", table_prefix="ob_"), id="app-ob"),
    pytest.param(OutboxSettings(schema="order", table_prefix=""), id="reserved-no-prefix"),
]


def _columns(
    conn: psycopg.Connection[Any], settings: OutboxSettings, suffix: str
) -> dict[str, str]:
    rows = conn.execute(
        "SELECT column_name, udt_name FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
        (settings.schema, settings.name(suffix)),
    ).fetchall()
    return dict(rows)


def _tables(conn: psycopg.Connection[Any], schema_name: str) -> set[str]:
    rows = conn.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
        (schema_name,),
    ).fetchall()
    return {name for (name,) in rows}


def _catalog(
    conn: psycopg.Connection[Any], settings: OutboxSettings, *, with_times: bool = True
) -> dict[str, list[tuple[Any, ...]]]:
    """Everything PostgreSQL knows about the outbox's objects, to compare two databases."""
    namespace = (settings.schema,)
    migrations_cols = "version, name, checksum" + (", applied_at" if with_times else "")
    return {
        "columns": conn.execute(
            "SELECT table_name, column_name, ordinal_position, data_type, udt_name, is_nullable,"
            " column_default, is_identity, identity_generation, is_generated,"
            " generation_expression FROM information_schema.columns WHERE table_schema = %s"
            " ORDER BY table_name, ordinal_position",
            namespace,
        ).fetchall(),
        "constraints": conn.execute(
            "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)"
            " FROM pg_constraint WHERE connamespace = %s::regnamespace ORDER BY 1, 2",
            namespace,
        ).fetchall(),
        "indexes": conn.execute(
            "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = %s"
            " ORDER BY 1, 2",
            namespace,
        ).fetchall(),
        "relations": conn.execute(
            "SELECT relname, relkind, relpersistence FROM pg_class"
            " WHERE relnamespace = %s::regnamespace ORDER BY 1",
            namespace,
        ).fetchall(),
        "migrations": conn.execute(
            f"SELECT {migrations_cols} FROM {settings.migrations_table} ORDER BY version"
        ).fetchall(),
    }


def _apply(url: str, settings: OutboxSettings = DEFAULT, **kwargs: Any) -> list[schema.Migration]:
    with psycopg.connect(url) as conn:
        return migrator.apply(conn, settings, **kwargs)


def _recorded(conn: psycopg.Connection[Any], settings: OutboxSettings = DEFAULT) -> list[Any]:
    return conn.execute(
        f"SELECT version, name, checksum FROM {settings.migrations_table} ORDER BY version"
    ).fetchall()


def _shipped() -> list[tuple[int, str, str]]:
    return [(m.version, m.name, m.checksum) for m in schema.all_migrations()]


def test_apply_on_empty_database_creates_the_outbox(empty_database_url: str) -> None:
    """All migrations are applied and recorded; the tables have exactly the expected columns."""
    assert _apply(empty_database_url) == list(schema.all_migrations())
    with psycopg.connect(empty_database_url) as conn:
        assert {"outbox_events", "outbox_dedup", "outbox_schema_migrations"} <= _tables(
            conn, "public"
        )
        assert _columns(conn, DEFAULT, "events") == EVENTS_COLUMNS
        assert _columns(conn, DEFAULT, "dedup") == DEDUP_COLUMNS
        assert _columns(conn, DEFAULT, "schema_migrations") == MIGRATIONS_COLUMNS
        assert _recorded(conn) == _shipped()
        assert migrator.require_current(conn, DEFAULT).current


def test_writer_can_insert_into_a_freshly_applied_schema(empty_database_url: str) -> None:
    """The columns the writer inserts exist, and the generated ones are filled by PostgreSQL."""
    _apply(empty_database_url)
    with psycopg.connect(empty_database_url) as conn:
        event_id = outbox.Outbox(DEFAULT).add(conn, "orders", {"id": 1}, key="order-1")
        row = conn.execute(
            "SELECT topic, key, payload, header_names, header_values, shard, attempts,"
            " published_at IS NULL, created_at IS NOT NULL FROM outbox_events WHERE event_id = %s",
            (event_id,),
        ).fetchone()
    assert row is not None
    topic, key, payload, names, values, shard, attempts, unpublished, has_time = row
    assert (topic, key, payload, attempts, unpublished, has_time) == (
        "orders",
        b"order-1",
        b'{"id":1}',
        0,
        True,
        True,
    )
    assert len(names) == len(values)
    assert 0 <= shard < outbox.SHARD_COUNT


def test_apply_twice_changes_nothing(empty_database_url: str) -> None:
    """The second apply returns [] and leaves every definition and record as it was."""
    _apply(empty_database_url)
    with psycopg.connect(empty_database_url) as conn:
        before = _catalog(conn, DEFAULT)
    assert _apply(empty_database_url) == []
    with psycopg.connect(empty_database_url) as conn:
        assert _catalog(conn, DEFAULT) == before


@pytest.mark.parametrize(
    "prefixes",
    [pytest.param(["ob_"] * 4, id="same-outbox"), pytest.param(["a_", "b_", "c_", "d_"], id="4")],
)
def test_concurrent_apply_serialises(empty_database_url: str, prefixes: list[str]) -> None:
    """Four connections applying at once: each outbox is migrated exactly once, nobody fails."""
    barrier = threading.Barrier(len(prefixes))
    results: dict[int, list[schema.Migration]] = {}
    errors: list[BaseException] = []

    def run(index: int, prefix: str) -> None:
        settings = OutboxSettings(schema="app", table_prefix=prefix)
        try:
            with psycopg.connect(empty_database_url) as conn:
                barrier.wait(timeout=30)
                results[index] = migrator.apply(conn, settings, lock_timeout_ms=30_000)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=item) for item in enumerate(prefixes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    everything = list(schema.all_migrations())
    for prefix in set(prefixes):
        outcomes = [results[i] for i, p in enumerate(prefixes) if p == prefix]
        assert sorted(outcomes, key=len) == [[]] * (len(outcomes) - 1) + [everything]
    with psycopg.connect(empty_database_url) as conn:
        for prefix in set(prefixes):
            settings = OutboxSettings(schema="app", table_prefix=prefix)
            assert _recorded(conn, settings) == _shipped()
            migrator.require_current(conn, settings)
        count = conn.execute(
            "SELECT count(*) FROM pg_class WHERE relname LIKE '%%events' AND relkind = 'r'"
        ).fetchone()
        assert count == (len(set(prefixes)),)


def test_require_current_on_empty_database_says_to_apply(empty_database_url: str) -> None:
    """No outbox at all: SchemaMissingError naming the table and the command to run."""
    with (
        psycopg.connect(empty_database_url) as conn,
        pytest.raises(outbox.SchemaMissingError) as excinfo,
    ):
        migrator.require_current(conn, DEFAULT)
    message = str(excinfo.value)
    assert "outbox-relay schema apply" in message
    assert DEFAULT.migrations_table in message


def test_missing_record_makes_the_schema_outdated(empty_database_url: str) -> None:
    """A database behind this version: SchemaOutdatedError lists the pending migration."""
    _apply(empty_database_url)
    latest = schema.all_migrations()[-1]
    with psycopg.connect(empty_database_url) as conn:
        conn.execute(
            f"DELETE FROM {DEFAULT.migrations_table} WHERE version = %s", (latest.version,)
        )
        found = migrator.status(conn, DEFAULT)
        assert found.pending == (latest,)
        assert not found.current
        with pytest.raises(outbox.SchemaOutdatedError) as excinfo:
            migrator.require_current(conn, DEFAULT)
    assert latest.label in str(excinfo.value)
    assert "outbox-relay schema apply" in str(excinfo.value)


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        pytest.param(
            "INSERT INTO {table} (version, name, checksum) VALUES (9999, 'future', 'x')",
            ["[9999]", "upgrade outbox-relay"],
            id="unknown-version",
        ),
        pytest.param(
            "UPDATE {table} SET checksum = 'edited' WHERE version = 1",
            ["[1]", "checksum mismatch"],
            id="changed-checksum",
        ),
    ],
)
def test_mismatched_records_are_refused(
    empty_database_url: str, tamper: str, expected: list[str]
) -> None:
    """Unknown or edited migrations: require_current and apply raise SchemaMismatchError."""
    _apply(empty_database_url)
    with psycopg.connect(empty_database_url) as conn:
        conn.execute(tamper.format(table=DEFAULT.migrations_table))
        conn.commit()
        before = _catalog(conn, DEFAULT)
        with pytest.raises(outbox.SchemaMismatchError) as excinfo:
            migrator.require_current(conn, DEFAULT)
        for text in expected:
            assert text in str(excinfo.value)
        with pytest.raises(outbox.SchemaMismatchError):
            migrator.apply(conn, DEFAULT)
        conn.rollback()
        assert _catalog(conn, DEFAULT) == before


@pytest.mark.parametrize("settings", CUSTOM)
def test_custom_schema_and_prefix_leave_public_untouched(
    empty_database_url: str, settings: OutboxSettings
) -> None:
    """The tables are created in the given schema with the given prefix, and nowhere else."""
    with psycopg.connect(empty_database_url) as conn:
        public_before = _tables(conn, "public")
    assert _apply(empty_database_url, settings) == list(schema.all_migrations())
    with psycopg.connect(empty_database_url) as conn:
        assert _tables(conn, settings.schema) == {
            settings.name("events"),
            settings.name("dedup"),
            settings.name("schema_migrations"),
            settings.name("dead_letter_log"),
            settings.name("relays"),
            settings.name("published"),
            settings.name("published_default"),
            settings.name("scheduled"),
        }
        assert _columns(conn, settings, "events") == EVENTS_COLUMNS
        assert _tables(conn, "public") == public_before
        migrator.require_current(conn, settings)
        with pytest.raises(outbox.SchemaMissingError):
            migrator.require_current(conn, DEFAULT)
        event_id = outbox.Outbox(settings).add(conn, "orders", b"x")
        found = conn.execute(
            f"SELECT count(*) FROM {settings.events_table} WHERE event_id = %s", (event_id,)
        ).fetchone()
        assert found == (1,)


def test_two_prefixes_in_one_schema_coexist(empty_database_url: str) -> None:
    """A second outbox with another prefix gets its own tables and its own records."""
    first = OutboxSettings(schema="app", table_prefix="a_")
    second = OutboxSettings(schema="app", table_prefix="b_")
    assert _apply(empty_database_url, first) == list(schema.all_migrations())
    assert _apply(empty_database_url, second) == list(schema.all_migrations())
    with psycopg.connect(empty_database_url) as conn:
        for settings in (first, second):
            migrator.require_current(conn, settings)
            assert _recorded(conn, settings) == _shipped()
        outbox.Outbox(first).add(conn, "orders", b"only in a")
        counts = conn.execute(
            f"SELECT (SELECT count(*) FROM {first.events_table}),"
            f" (SELECT count(*) FROM {second.events_table})"
        ).fetchone()
        assert counts == (1, 0)


def test_apply_gives_up_after_lock_timeout(empty_database_url: str) -> None:
    """While another session holds the apply lock, apply fails fast and applies nothing."""
    with psycopg.connect(empty_database_url) as holder:
        holder.execute(schema.lock_statement(DEFAULT))  # held until holder's transaction ends
        with psycopg.connect(empty_database_url) as conn:
            started = time.monotonic()
            with pytest.raises(psycopg.errors.LockNotAvailable):
                migrator.apply(conn, DEFAULT, lock_timeout_ms=200)
            assert time.monotonic() - started < 5
            conn.rollback()
            exists = conn.execute("SELECT to_regclass(%s)", (DEFAULT.migrations_table,)).fetchone()
            assert exists == (None,)
            assert _tables(conn, "public") == set()
        holder.rollback()
    # Once the lock is free the same call succeeds.
    assert _apply(empty_database_url, lock_timeout_ms=200) == list(schema.all_migrations())


@pytest.mark.parametrize("settings", [pytest.param(DEFAULT, id="default"), *CUSTOM])
def test_script_is_equivalent_to_apply(
    pg_server: str, empty_database_url: str, settings: OutboxSettings
) -> None:
    """Running the `schema show` SQL yields the same objects and records as apply does."""
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(schema.script(settings).encode())
        assert migrator.require_current(conn, settings).current
        scripted = _catalog(conn, settings, with_times=False)
        assert migrator.apply(conn, settings) == []
    name = testing.unique_name("outbox_applied")
    applied_url = testing.create_database(pg_server, name)
    try:
        _apply(applied_url, settings)
        with psycopg.connect(applied_url) as conn:
            assert _catalog(conn, settings, with_times=False) == scripted
    finally:
        testing.drop_database(pg_server, name)
