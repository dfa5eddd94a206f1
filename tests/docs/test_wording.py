"""The documentation speaks to users: no page points at the project's issue tracker by number
("the targets of issue 6") for what it should say itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
INTERNAL = re.compile(r"\bissues? #?\d+", re.IGNORECASE)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_refers_to_an_issue_by_number(page: Path) -> None:
    lines = page.read_text().splitlines()
    found = [f"{n}: {line}" for n, line in enumerate(lines, 1) if INTERNAL.search(line)]
    assert found == []
