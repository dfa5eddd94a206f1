"""An application's loop stop (outbox/stopping.py): signals are the application's, not ours."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest

from outbox.stopping import StopRequest


@pytest.fixture
def stop() -> Iterator[StopRequest]:
    request = StopRequest()
    yield request
    request.restore()


def test_signals_request_a_stop_and_the_previous_handlers_come_back(stop: StopRequest) -> None:
    before = signal.getsignal(signal.SIGTERM)
    assert stop.install()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.wait(5.0)
    assert stop.reason == "SIGTERM"
    os.kill(os.getpid(), signal.SIGTERM)  # a second one: still only a request, no exit
    assert stop.requested
    stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before


def test_off_the_main_thread_nothing_is_installed(stop: StopRequest) -> None:
    before = signal.getsignal(signal.SIGINT)
    installed: list[bool] = []
    thread = threading.Thread(target=lambda: installed.append(stop.install()))
    thread.start()
    thread.join()
    assert installed == [False]
    assert signal.getsignal(signal.SIGINT) is before


def test_stop_from_another_thread_ends_a_wait(stop: StopRequest) -> None:
    threading.Timer(0.05, stop.request, args=("stop()",)).start()
    assert stop.wait(10.0)
    assert stop.reason == "stop()"
