"""SIGTERM and SIGINT: the first asks the relay to stop cleanly, the second exits at once.

Handlers only set a flag and write a byte to a pipe; the relay's wait selects on that pipe, so a
signal wakes an idle relay immediately. The previous handlers are restored on exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from types import FrameType
from typing import Any

import structlog

log = structlog.get_logger("relay.signals")
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    def __init__(self) -> None:
        self.requested_at: float | None = None
        self.reason = ""
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    @property
    def fd(self) -> int:
        """Becomes readable when a stop is requested."""
        return self._read

    def request(self, reason: str) -> None:
        if self.requested_at is None:
            self.requested_at = time.monotonic()
            self.reason = reason
        with contextlib.suppress(BlockingIOError):  # the pipe already holds a wake-up byte
            os.write(self._write, b"x")

    def install(self) -> None:
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            # Nothing is lost: rows being published stay unpublished (their transaction dies
            # with the connection) and are sent again by the next relay, possibly twice.
            os.write(2, f"outbox-relay: second {name}, exiting at once\n".encode())
            os._exit(128 + signum)
        log.info("relay.stop_requested", signal=name)
        self.request(name)

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)
