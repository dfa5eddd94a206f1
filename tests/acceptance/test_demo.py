"""`make demo` (examples/demo.py) as users run it, on servers of its own.

Its point is the relay killed mid-batch: Kafka holds events of the batch the relay had not marked
published, so they are sent again, and the billing consumer's dedup table keeps one invoice per
order anyway. The demo catches the relay in that state before it kills it (it used to kill it at
a random moment, which at its rate of writes usually fell between batches: no duplicate at all).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from outbox import testing

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
ORDERS = 1500


def test_the_demo_kills_the_relay_mid_batch_and_bills_each_order_once() -> None:
    """The figures the demo prints: every order published and billed once, the kill caught a
    batch on Kafka that was not marked, and each of its events is on Kafka twice."""
    # The demo's servers, not the suite's: its topic and consumer group have fixed names.
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in (testing.DATABASE_URL_ENV, testing.KAFKA_BOOTSTRAP_ENV)
    }
    demo = subprocess.run(
        [sys.executable, "-m", "examples.demo", "--orders", str(ORDERS)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    figures = json.loads(demo.stdout.splitlines()[-1])
    assert figures["orders"] == figures["published"] == figures["invoices"] == ORDERS
    assert figures["outbox_left"] == 0
    # The kill landed mid-batch: the events of its batch that Kafka held were sent again.
    assert figures["kafka_duplicates"] > 0, demo.stdout
    assert figures["kafka_duplicates"] >= figures["unmarked_at_kill"] > 0
    assert figures["skipped"] >= figures["kafka_duplicates"]
    assert "mid-batch" in demo.stdout
