"""How an application's loop is asked to stop: ``stop()`` from any thread, or SIGTERM / SIGINT.

Unlike the relay daemon's handlers, these are an application's guests: they are installed only
when asked and only on the main thread (Python allows no other), the previous handlers come
back when the loop ends, and a second signal never exits the process.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import structlog

log = structlog.get_logger("outbox.stopping")
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self, reason: str) -> None:
        """Ask for a stop (thread-safe); the first reason is kept."""
        if not self._event.is_set():
            self.reason = reason
        self._event.set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, less if a stop is requested; whether one was."""
        return self._event.wait(seconds)

    def install(self) -> bool:
        """Handle SIGTERM and SIGINT as stop requests; False (and nothing changed) off the main
        thread, where Python cannot install them."""
        if threading.current_thread() is not threading.main_thread():
            log.warning(
                "consumer.signals_not_handled",
                reason="not on the main thread; call stop() to end the loop",
            )
            return False
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def restore(self) -> None:
        """The handlers that were there before ``install``."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        log.info("consumer.stop_requested", signal=name, again=self.requested)
        self.request(name)
