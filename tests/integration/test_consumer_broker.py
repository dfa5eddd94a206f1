"""A consume loop and its broker, against the real broker (or a closed port): a loop that reaches
no broker fails within ``connect_timeout`` with one clear error and a few log lines, and
``outbox_consumer_broker_up`` follows the broker going away and coming back.

Both kinds of loop run in a thread of their own (the async one on an event loop of its own),
so one test body covers both.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import sessionmaker
from structlog.testing import capture_logs

from outbox import testing
from outbox.consumer import ConsumeLoop, ConsumerSettings
from outbox.consumer_async import AsyncConsumeLoop
from outbox.errors import BrokerUnreachableError
from tests.acceptance.relay_harness import broker_behind_proxy, create_topic, wait_until
from tests.integration.test_consumer import (
    WAIT,
    effects,  # noqa: F401 - the side-effect table fixture
    produce,
    record,
    settings,
    unique_name,
)
from tests.integration.test_consumer_async import record as record_async

pytestmark = pytest.mark.kafka

KINDS = ["sync", "async"]
#: The librdkafka lines and error reports of the client, as the loop logs them.
CLIENT_EVENTS = {"consumer.kafka_log", "consumer.kafka_error", "consumer.kafka_log_repeated"}


class Running:
    """A loop of either kind, running in a thread; ``error`` is what ``run()`` raised, and
    ``seconds`` how long it ran."""

    def __init__(self, loop: ConsumeLoop | AsyncConsumeLoop) -> None:
        self.loop = loop
        self.error: BaseException | None = None
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        try:
            if isinstance(self.loop, AsyncConsumeLoop):
                asyncio.run(self.loop.run(handle_signals=False))
            else:
                self.loop.run(handle_signals=False)
        except BaseException as exc:  # reported by the test
            self.error = exc
        self.seconds = time.monotonic() - started

    def stop(self) -> None:
        self.loop.stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the loop did not stop"


def loop_of(
    kind: str,
    config: ConsumerSettings,
    registry: CollectorRegistry,
    engine: sa.Engine | None = None,
    database_url: str = "",
) -> ConsumeLoop | AsyncConsumeLoop:
    """A loop whose handler records each message in ``effects`` (no database: no handler)."""
    if kind == "sync":
        return ConsumeLoop(config, record, sessionmaker(engine), registry=registry)
    connect: Any = lambda: psycopg.AsyncConnection.connect(database_url)  # noqa: E731
    return AsyncConsumeLoop(config, record_async, connect, registry=registry)


def broker_up(registry: CollectorRegistry, consumer: str) -> float | None:
    return registry.get_sample_value("outbox_consumer_broker_up", {"consumer": consumer})


@pytest.mark.parametrize("kind", KINDS)
def test_a_loop_that_reaches_no_broker_fails_within_connect_timeout(
    kind: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """Nothing listens at the bootstrap address: the loop says the broker is down, fails with
    BrokerUnreachableError after ``connect_timeout`` (2 s here), naming the address and the
    setting, and logs a few lines: each kind of client line once, then their counts. Before,
    it kept trying forever and librdkafka printed about 20 lines a second to stderr."""
    bootstrap = f"127.0.0.1:{testing.free_port()}"
    name, registry = unique_name(), CollectorRegistry()
    config = ConsumerSettings(name, ["orders"], bootstrap, poll_timeout=0.2, connect_timeout=2)
    with capture_logs() as logs:
        run = Running(loop_of(kind, config, registry))
        wait_until(lambda: broker_up(registry, name) == 0, timeout=5)
        run.thread.join(timeout=15)
        trying = run.thread.is_alive()
        if trying:
            run.stop()
    raw = [line for line in capfd.readouterr().err.splitlines() if "|FAIL|" in line]
    lines = len(logs) + len(raw)
    with capfd.disabled():
        print(f"[broker] {kind}: {run.error!r:.60} after {run.seconds:.1f} s, {lines} log lines")
    assert not trying, f"still trying after 15 s: {lines} log lines"
    assert isinstance(run.error, BrokerUnreachableError), repr(run.error)
    assert 2 <= run.seconds < 5
    assert bootstrap in str(run.error)
    assert "ConsumerSettings.connect_timeout" in str(run.error)
    assert "Connection refused" in run.error.reason
    assert raw == []  # librdkafka's own printing is replaced by the loop's lines
    client = [e for e in logs if e["event"] in CLIENT_EVENTS]
    assert 1 <= len(client) <= 8, client
    assert lines <= 12, logs
    assert broker_up(registry, name) is None  # the loop does not run any more


@pytest.mark.parametrize("kind", KINDS)
def test_the_broker_gauge_follows_the_broker_going_and_coming_back(
    kind: str,
    tmp_path: Path,
    database_url: str,
    engine: sa.Engine,
    effects: str,  # noqa: F811
) -> None:
    """The broker is cut off when the loop starts: the gauge says 0 and the loop keeps trying
    (within connect_timeout); the broker back, it says 1 and messages are handled. Cut off
    while the loop runs, the gauge drops to 0 (the client reports every broker down) and comes
    back to 1 when the broker does."""
    with broker_behind_proxy(tmp_path) as (bootstrap, proxy):
        topic = create_topic(bootstrap, partitions=1)
        proxy.cut()
        name, registry = unique_name(), CollectorRegistry()
        config = settings(name, topic, bootstrap, connect_timeout=WAIT)
        run = Running(loop_of(kind, config, registry, engine, database_url))
        try:
            wait_until(lambda: broker_up(registry, name) == 0, timeout=10)
            time.sleep(2)
            assert broker_up(registry, name) == 0
            proxy.restore()
            wait_until(lambda: broker_up(registry, name) == 1, timeout=WAIT)
            produce(bootstrap, topic, [("after", str(uuid.uuid4()))])
            wait_until(lambda: run.loop.stats.processed == 1, timeout=WAIT)
            proxy.cut()
            wait_until(lambda: broker_up(registry, name) == 0, timeout=WAIT)
            proxy.restore()
            wait_until(lambda: broker_up(registry, name) == 1, timeout=WAIT)
        finally:
            run.stop()
    assert run.error is None, repr(run.error)
    assert broker_up(registry, name) is None
