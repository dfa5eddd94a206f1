"""The command reference lists every environment variable the command reads, and no other."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import click

from outbox_relay.cli import cli

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "reference" / "cli.md"


def variables_read(cmd: click.Command) -> Iterator[str]:
    """The ``envvar`` of every option of ``cmd`` and of the commands under it."""
    for param in cmd.params:
        envvar = param.envvar if isinstance(param, click.Option) else None
        yield from [envvar] if isinstance(envvar, str) else envvar or []
    for sub in getattr(cmd, "commands", {}).values():
        yield from variables_read(sub)


def variables_listed() -> set[str]:
    """The variables named in the reference's section "Environment variables"."""
    text = REFERENCE.read_text()
    section = text.split("\n## Environment variables\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`(OUTBOX_[A-Z0-9_]+)`", section))


def test_the_command_reads_variables() -> None:
    """The tree walk finds the options' variables (guards against a vacuous comparison)."""
    assert {"OUTBOX_DATABASE_URL", "OUTBOX_RETENTION", "OUTBOX_LOG_LEVEL"} <= set(
        variables_read(cli)
    )


def test_every_variable_the_command_reads_is_listed() -> None:
    """A variable added to an option must be added to the reference's list (issue 29:
    OUTBOX_DEDUP_RETENTION was read by `dedup purge` and missing from it)."""
    assert set(variables_read(cli)) - variables_listed() == set()


def test_every_variable_listed_is_read() -> None:
    """The list names no variable that no option reads (a renamed or removed one)."""
    assert variables_listed() - set(variables_read(cli)) == set()
