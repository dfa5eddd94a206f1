"""The Python API reference (docs/reference/api.md) shows what a consumer needs to write one: every
field of ``ConsumerSettings`` (``kafka_config`` carries SASL and TLS), each consume loop's
constructor parameters, and its ``run`` and ``stop``.

The site is built with mkdocs into a temporary directory (not strict: a broken link elsewhere is
``make docs``'s business, not this test's) and the generated page is read. The names expected
come from the code, so a field added later must show up too.
"""

from __future__ import annotations

import dataclasses
import html
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from outbox.consumer import BatchConsumeLoop, ConsumeLoop, ConsumerSettings
from outbox.consumer_async import AsyncBatchConsumeLoop, AsyncConsumeLoop

ROOT = Path(__file__).resolve().parents[2]
LOOPS = {
    "outbox.consumer.ConsumeLoop": ConsumeLoop,
    "outbox.consumer.BatchConsumeLoop": BatchConsumeLoop,
    "outbox.consumer_async.AsyncConsumeLoop": AsyncConsumeLoop,
    "outbox.consumer_async.AsyncBatchConsumeLoop": AsyncBatchConsumeLoop,
}
TAG = re.compile(r"<[^>]+>")


@pytest.fixture(scope="module")
def api_page(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The generated HTML of reference/api.md."""
    site = tmp_path_factory.mktemp("site")
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--no-strict", "--quiet", "--site-dir", site],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    return (site / "reference" / "api" / "index.html").read_text()


def heading_ids(page: str) -> set[str]:
    return set(re.findall(r'<h\d id="([^"]+)"', page))


def signature(page: str, identifier: str) -> str:
    """The text of the signature shown right after the heading ``identifier``."""
    start = page.index(f'id="{identifier}"')
    found = re.search(r'class="doc-signature[^"]*".*?</pre>', page[start:], re.DOTALL)
    assert found is not None, f"no signature after {identifier}"
    return html.unescape(TAG.sub("", found.group(0)))


def test_every_consumer_setting_is_listed(api_page: str) -> None:
    """Each field of ConsumerSettings has an entry of its own, kafka_config among them."""
    fields = [f.name for f in dataclasses.fields(ConsumerSettings)]
    assert "kafka_config" in fields
    ids = heading_ids(api_page)
    missing = [f for f in fields if f"outbox.consumer.ConsumerSettings.{f}" not in ids]
    assert missing == []


@pytest.mark.parametrize("identifier", LOOPS)
def test_each_loop_shows_its_constructor_and_run_and_stop(api_page: str, identifier: str) -> None:
    parameters = [p for p in inspect.signature(LOOPS[identifier]).parameters if p != "self"]
    assert {"settings", "handler"} <= set(parameters)
    shown = signature(api_page, identifier)
    assert [p for p in parameters if not re.search(rf"\b{p}\b", shown)] == []
    ids = heading_ids(api_page)
    assert {f"{identifier}.run", f"{identifier}.stop"} <= ids
