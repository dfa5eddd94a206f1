"""Django: the example project (``examples/django_app``) on the embedded PostgreSQL.

Django is set up once in this process with the example's settings, on a database of this
module's own, and ``migrate`` is run with Django's own command: it creates the outbox through
the ``outbox.django`` app and the example's ``Order`` table through the example's migration.
Each test then writes through Django's connection and checks the database, the schema check,
or what the relay publishes.
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import outbox
from outbox import dedup, migrator, schema, testing
from outbox.settings import OutboxSettings
from outbox.testkit import ensure_topics
from tests.acceptance.relay_harness import read_topic, run_relay
from tests.acceptance.test_cli import run

django = pytest.importorskip("django")
from asgiref.sync import sync_to_async  # noqa: E402 - Django's dependency, after the skip
from django.core.management import call_command  # noqa: E402
from django.db import connection, connections, transaction  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "django_app"


@pytest.fixture(scope="module")
def django_database(pg_server: str) -> Iterator[str]:
    """libpq URL of the database Django uses, migrated with ``manage.py migrate``."""
    name = testing.unique_name("outbox_django")
    url = testing.create_database(pg_server, name)
    saved = {k: os.environ.get(k) for k in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE")}
    os.environ["DATABASE_URL"] = url
    os.environ["DJANGO_SETTINGS_MODULE"] = "shop_site.settings"
    sys.path.insert(0, str(EXAMPLE))
    try:
        django.setup()
        call_command("migrate", verbosity=0)
        yield url
    finally:
        connections.close_all()
        sys.path.remove(str(EXAMPLE))
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        testing.drop_database(pg_server, name)


def orders_and_events(url: str, item: str) -> tuple[int, int]:
    """How many orders of ``item``, and how many events naming it, are committed."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM shop_order WHERE item = %s),"
            " (SELECT count(*) FROM outbox_events WHERE convert_from(payload, 'UTF8')::jsonb"
            "  ->> 'item' = %s)",
            (item, item),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def test_migrate_installs_the_outbox_and_schema_check_passes(django_database: str) -> None:
    """``manage.py migrate`` leaves the outbox current: ``outbox-relay schema check`` exits 0,
    and Django recorded the app's migrations under its label."""
    checked = run("schema", "check", "--database-url", django_database)
    assert checked.returncode == 0, checked.stderr
    assert f"schema is current (version {schema.latest_version()})" in checked.stdout
    with psycopg.connect(django_database) as conn:
        assert conn.execute(
            "SELECT name FROM django_migrations WHERE app = 'outbox_relay' ORDER BY id"
        ).fetchall() == [
            ("0001_outbox_schema",),
            ("0002_relay_registry",),
            ("0003_relay_retention",),
            ("0004_published_partitions",),
            ("0005_scheduled_events",),
        ]


def test_migrate_again_and_backwards_keep_the_outbox(django_database: str) -> None:
    """Migrating the app back to zero keeps the outbox's tables and events (forward-only), and
    migrating forward again finds nothing to apply."""
    from shop.orders import place_order

    place_order("kept", 1)
    call_command("migrate", "outbox_relay", "zero", verbosity=0)
    assert orders_and_events(django_database, "kept") == (1, 1)
    call_command("migrate", verbosity=0)
    with psycopg.connect(django_database) as conn:
        migrator.require_current(conn, OutboxSettings())


def test_the_example_models_match_their_migrations(django_database: str) -> None:
    """The example's migration is what ``makemigrations`` would write (none missing)."""
    out = io.StringIO()
    call_command("makemigrations", "--check", "--dry-run", stdout=out)
    assert "No changes detected" in out.getvalue()


def test_an_order_and_its_event_commit_together(django_database: str) -> None:
    from shop.orders import place_order

    order = place_order("lamp", 2)
    assert orders_and_events(django_database, "lamp") == (1, 1)
    with psycopg.connect(django_database) as conn:
        row = conn.execute(
            "SELECT topic, key FROM outbox_events WHERE key = %s", (str(order.id),)
        ).fetchone()
    assert row == ("orders", str(order.id).encode())


def test_connections_by_alias_work_as_the_default_proxy(django_database: str) -> None:
    """``connections["default"]`` is the backend's own wrapper, not the proxy: same result."""
    wrapper = connections["default"]
    assert type(wrapper).__module__.startswith("django.db.backends.postgresql")
    with transaction.atomic():
        outbox.add(wrapper, "orders", {"item": "by alias"})
    with pytest.raises(outbox.TransactionRequiredError):
        outbox.add(wrapper, "orders", {"item": "by alias, loose"})
    assert orders_and_events(django_database, "by alias")[1] == 1
    assert orders_and_events(django_database, "by alias, loose")[1] == 0


def test_an_order_and_its_event_roll_back_together(django_database: str) -> None:
    from shop.models import Order

    def place_then_fail() -> None:
        with transaction.atomic():
            order = Order.objects.create(item="vase", quantity=1)
            outbox.add(connection, "orders", {"item": "vase"}, key=str(order.id))
            raise RuntimeError("payment declined")

    with pytest.raises(RuntimeError, match="payment declined"):
        place_then_fail()
    assert orders_and_events(django_database, "vase") == (0, 0)


def test_a_savepoint_rolled_back_takes_its_event_with_it(django_database: str) -> None:
    """A nested ``atomic()`` is a savepoint: its event goes when it rolls back, the outer
    one stays."""

    def inner() -> None:
        with transaction.atomic():
            outbox.add(connection, "orders", {"item": "inner"})
            raise ValueError("inner")

    with transaction.atomic():
        outbox.add(connection, "orders", {"item": "outer"})
        with pytest.raises(ValueError, match="inner"):
            inner()
    assert orders_and_events(django_database, "outer")[1] == 1
    assert orders_and_events(django_database, "inner")[1] == 0


def test_autocommit_outside_atomic_is_refused(django_database: str) -> None:
    """Outside ``atomic()`` Django autocommits each statement, so the event would commit
    apart from the business change: refused, and nothing is written."""
    with pytest.raises(outbox.TransactionRequiredError, match="autocommit"):
        outbox.add(connection, "orders", {"item": "loose"})
    with pytest.raises(outbox.TransactionRequiredError):
        dedup.claim(connection, "billing", "m-loose")
    assert orders_and_events(django_database, "loose") == (0, 0)


def test_dedup_claim_on_a_django_connection(django_database: str) -> None:
    """The consumer side: a message id is claimed once; a rolled-back claim does not count."""
    claimed: list[bool] = []

    def claim_then_fail() -> None:
        with transaction.atomic():
            claimed.append(dedup.claim(connection, "billing", "m-1"))
            raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError, match="handler failed"):
        claim_then_fail()
    assert claimed == [True]
    with transaction.atomic():
        assert dedup.claim(connection, "billing", "m-1") is True
    with transaction.atomic():
        assert dedup.claim(connection, "billing", "m-1") is False


def test_a_missing_schema_is_named_through_django(django_database: str) -> None:
    """Django wraps driver errors; the library still says what is wrong and what to run."""
    settings = OutboxSettings(table_prefix="absent_")
    with pytest.raises(outbox.SchemaMissingError, match="schema apply"), transaction.atomic():
        outbox.Outbox(settings).add(connection, "orders", {"item": "nowhere"})


def test_async_code_is_told_to_use_sync_to_async_and_that_way_works(
    django_database: str,
) -> None:
    """Django's transactions cannot span awaits: ``add_async`` refuses its connection and says
    what to do; the way it names (sync_to_async around the atomic block) commits both."""
    from shop.orders import place_order

    async def view() -> None:
        with pytest.raises(outbox.UnsupportedConnectionError, match="sync_to_async"):
            await outbox.add_async(connection, "orders", {"item": "async"})  # type: ignore[arg-type]
        await sync_to_async(place_order)("async-desk", 1)

    asyncio.run(view())
    assert orders_and_events(django_database, "async-desk") == (1, 1)


@pytest.mark.kafka
def test_the_relay_publishes_what_django_wrote(django_database: str, kafka_bootstrap: str) -> None:
    """Orders placed through the example's management command reach Kafka, keyed by order."""
    from shop.models import Order

    ensure_topics(kafka_bootstrap, {"orders"})  # the example's topic name
    out = io.StringIO()
    for item in ("pen", "ink", "paper"):
        call_command("place_order", item, stdout=out)
    assert out.getvalue().count("placed") == 3
    placed = {str(o.id) for o in Order.objects.filter(item__in=["pen", "ink", "paper"])}
    with psycopg.connect(django_database) as conn:
        ids = {
            str(r[0])
            for r in conn.execute(
                "SELECT event_id FROM outbox_events WHERE convert_from(key, 'UTF8') = ANY(%s)",
                (list(placed),),
            ).fetchall()
        }
    assert len(ids) == 3
    done = run_relay(django_database, kafka_bootstrap, "--exit-when-idle")
    assert done.returncode == 0, done.stdout + done.stderr
    received = [
        r for r in read_topic(kafka_bootstrap, "orders", expect_ids=ids) if r.event_id in ids
    ]
    assert {r.event_id for r in received} == ids
    assert {r.key.decode() for r in received if r.key is not None} == placed
