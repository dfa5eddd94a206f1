"""The documentation retries a dead letter with `outbox-relay dead-letters retry`, never by
clearing ``dead_lettered_at`` by hand.

A row cleared by hand keeps the backoff of its last attempt in ``next_attempt_at`` (up to
``--backoff-cap``), and it and the later rows of its key wait for it; the command makes it due
at once (``tests/acceptance/test_dead_letter_retry.py``). The guarantees page used to advise
clearing the column.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
#: An instruction to put a dead letter back by editing the row: "clear `dead_lettered_at` to
#: retry", "SET dead_lettered_at = NULL".
HAND_RETRY = re.compile(
    r"\bclear\w*\s+`?dead_lettered_at`?\s+(?:to|and)\s+retry|SET\s+dead_lettered_at\s*=\s*NULL",
    re.IGNORECASE,
)


def test_no_page_tells_to_retry_a_dead_letter_by_clearing_the_column() -> None:
    found = [
        f"{page.relative_to(ROOT)}: {match.group(0)!r}"
        for page in PAGES
        for match in HAND_RETRY.finditer(page.read_text())
    ]
    assert found == []


def test_the_guarantees_page_names_the_retry_command() -> None:
    text = (ROOT / "docs" / "guarantees.md").read_text()
    assert "outbox-relay dead-letters retry" in text
