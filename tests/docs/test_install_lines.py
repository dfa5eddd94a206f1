"""The pages that say how to install name the same extras, and exactly those an application may
want: every extra of pyproject.toml but the ones of this repository's own development."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Extras for working on outbox-relay itself, not for applications.
OWN_EXTRAS = {"suite", "docs", "dev"}
INSTALL = re.compile(r"pip install '?outbox-relay(?:\[(?P<extra>[\w,-]+)\])?'?")
PAGES_WITH_EVERY_EXTRA = ["README.md", "docs/getting-started.md"]


def extras_named(page: str) -> set[str]:
    """The extras of the ``pip install outbox-relay[...]`` lines of a page ("" for none)."""
    found = INSTALL.finditer((ROOT / page).read_text())
    return {match["extra"] or "" for match in found}


def application_extras() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["optional-dependencies"]) - OWN_EXTRAS


@pytest.mark.parametrize("page", PAGES_WITH_EVERY_EXTRA)
def test_the_install_section_names_every_extra_for_applications(page: str) -> None:
    assert extras_named(page) == {"", *application_extras()}


def test_the_home_page_says_how_to_install() -> None:
    assert "" in extras_named("docs/index.md")
