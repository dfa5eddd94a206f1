"""The documentation's Python code runs: every ```python block of README.md and docs/**/*.md.

Each block runs alone, as a script in a process of its own, against the embedded servers:
``OUTBOX_DATABASE_URL`` names a fresh database with the outbox schema (a
``postgresql+psycopg://`` URL), ``OUTBOX_KAFKA_BOOTSTRAP_SERVERS`` the broker, and the
``outbox-relay`` command is on the ``PATH``. A block that cannot run alone (a fragment that needs
an application's models or session) says so on the line right before it::

    <!-- skip: needs an application's engine and Order model -->

and is skipped with that reason; every other block must exit 0. Blocks nested in a longer fence
(an example of Markdown itself) are not code.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from outbox import urls

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
SKIP = re.compile(r"<!--\s*skip:(?P<reason>.*?)-->")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
TIMEOUT = 120


@dataclass(frozen=True)
class Block:
    """One fenced block: where it starts (the fence's line, from 1), its language, its code and
    the reason given to skip it (None: it must run)."""

    page: Path
    line: int
    end: int  # the closing fence's line
    language: str
    code: str
    skip: str | None

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def skip_reason(lines: list[str], fence: int) -> str | None:
    """The reason of a ``<!-- skip: ... -->`` comment on the line right before the fence."""
    if fence == 0:
        return None
    found = SKIP.fullmatch(lines[fence - 1].strip())
    return found["reason"].strip() if found else None


def fenced_blocks(page: Path) -> list[Block]:
    """Every top-level fenced block of a Markdown page (a fence closes on a line of at least as
    many of the same character and nothing else, as CommonMark has it)."""
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence = opening["fence"]
        end = i + 1
        while end < len(lines):
            closing = FENCE.match(lines[end])
            if (
                closing is not None
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            end += 1
        else:
            raise AssertionError(f"{page.relative_to(ROOT)}:{i + 1}: fence never closed")
        info = opening["info"].split()
        code = textwrap.dedent("\n".join(lines[i + 1 : end]))  # a block in a list is indented
        language = info[0] if info else ""
        blocks.append(Block(page, i + 1, end + 1, language, code, skip_reason(lines, i)))
        i = end + 1
    return blocks


PYTHON = [b for page in PAGES for b in fenced_blocks(page) if b.language == "python"]


def test_the_pages_hold_python_to_run() -> None:
    """The collection works: the README's example is among the blocks that run."""
    assert any(b.page.name == "README.md" and b.skip is None for b in PYTHON)
    assert any(b.skip is not None for b in PYTHON)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_skip_comment_names_its_reason_and_sits_on_a_python_block(page: Path) -> None:
    """A skip comment anywhere else (or with no reason) would silently stop skipping."""
    lines = page.read_text().splitlines()
    blocks = fenced_blocks(page)
    python_fences = {b.line - 1 for b in blocks if b.language == "python"}
    inside = {n for b in blocks for n in range(b.line - 1, b.end)}  # quoted, not a marker
    for n, line in enumerate(lines):
        found = SKIP.search(line)
        if found is None or n in inside:
            continue
        where = f"{page.relative_to(ROOT)}:{n + 1}"
        assert found["reason"].strip(), f"{where}: a skip comment without a reason"
        assert n + 1 in python_fences, f"{where}: a skip comment not right before a python block"


def as_param(block: Block) -> object:
    """The block as a test case, skipped with its page's reason if it gives one."""
    if block.skip is None:
        return pytest.param(block, id=block.name)
    skip = pytest.mark.skip(reason=f"{block.name}: {block.skip}")
    return pytest.param(block, marks=skip, id=block.name)


@pytest.mark.parametrize("block", [as_param(b) for b in PYTHON])
def test_python_block_runs(
    block: Block, database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    # Blank lines first, so a traceback's line numbers are the page's.
    script = tmp_path / f"{block.page.stem}_md.py"
    script.write_text("\n" * block.line + block.code + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env |= {
        "OUTBOX_DATABASE_URL": urls.to_sqlalchemy(database_url),
        "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, (
        f"{block.name} exited {done.returncode}\n"
        f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-5000:]}"
    )
