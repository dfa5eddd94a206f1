"""structlog set up as its documentation recommends: pretty on a terminal, JSON otherwise.

Standard-library loggers (psycopg, SQLAlchemy, librdkafka's bridge) go through the same
processors, so every line of a relay's output has one format.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Literal

import structlog

from outbox import client_logs

LogFormat = Literal["auto", "console", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("auto", "console", "json")

#: librdkafka's logger; during a broker outage it reports every reconnect attempt.
LIBRDKAFKA_LOGGER = "librdkafka"


class Repeats(logging.Filter):
    """Lets one line of a kind through per ``interval`` seconds (numbers ignored when
    comparing: :class:`outbox.client_logs.Repeats`), so an outage costs a few log lines, not a
    few per second."""

    def __init__(self, interval: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._repeats = client_logs.Repeats(interval, clock)

    def filter(self, record: logging.LogRecord) -> bool:
        return self._repeats.admit(record.getMessage()) is not None


def configure(log_format: LogFormat = "auto", level: str = "INFO") -> None:
    """Configure structlog and the stdlib root logger to write to stderr."""
    use_console = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *([] if use_console else [structlog.processors.format_exc_info]),
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    librdkafka = logging.getLogger(LIBRDKAFKA_LOGGER)
    librdkafka.filters[:] = [Repeats()]
