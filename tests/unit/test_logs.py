"""Log set-up: librdkafka's repeated lines are thinned out; structlog renders JSON off a TTY."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from outbox_relay import logs


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("librdkafka", logging.ERROR, __file__, 1, message, None, None)


def test_repeats_lets_one_line_of_a_kind_through_per_interval() -> None:
    """Lines that differ only in numbers count as one kind; a new interval lets one more through."""
    now = [0.0]
    repeats = logs.Repeats(interval=60, clock=lambda: now[0])
    first = record("Connect to ipv4#127.0.0.1:9092 failed (after 0ms in state CONNECT)")
    again = record("Connect to ipv4#127.0.0.1:9092 failed (after 12ms in state CONNECT)")
    other = record("Producer terminating with 3 messages still in queue")
    assert repeats.filter(first)
    assert not repeats.filter(again)
    assert repeats.filter(other)
    now[0] = 61.0
    assert repeats.filter(again)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure() replaces the root handlers; put the test runner's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """With --log-format json, stdlib and structlog lines are JSON with level and event."""
    logs.configure("json", "INFO")
    logging.getLogger("some.library").warning("plain %s", "stdlib")
    captured = capsys.readouterr().err.strip().splitlines()
    line = json.loads(captured[-1])
    assert line["event"] == "plain stdlib"
    assert line["level"] == "warning"
