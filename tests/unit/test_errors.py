"""One exception hierarchy: every error class of the packages derives from OutboxError."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest

import outbox
import outbox_relay
from outbox import errors
from outbox.errors import OutboxError

PACKAGES = [outbox, outbox_relay]
ROOT = Path(outbox.__file__).parent.parent

#: Exception classes that are deliberately not OutboxErrors, each with the reason.
NOT_OUTBOX_ERRORS: dict[str, str] = {}


def modules() -> list[ModuleType]:
    """Every module of the two packages (``__main__`` would run the command; the Django app's
    modules import only inside a configured Django project, and define no exceptions)."""
    found: list[ModuleType] = list(PACKAGES)
    for package in PACKAGES:
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if not info.name.endswith(".__main__") and not info.name.startswith("outbox.django."):
                found.append(importlib.import_module(info.name))
    return found


def exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined (not just imported) in the packages, by qualified name."""
    return {
        f"{module.__name__}.{name}": value
        for module in modules()
        for name, value in vars(module).items()
        if isinstance(value, type)
        and issubclass(value, BaseException)
        and value.__module__ == module.__name__
    }


def test_the_walk_sees_the_errors_outside_outbox_errors() -> None:
    """Guards against a vacuous walk: the classes defined in the other modules are found."""
    assert {
        "outbox.errors.OutboxError",
        "outbox_relay.pg.DatabaseUnavailableError",
        "outbox_relay.kafka.BrokerUnavailableError",
        "outbox.consumer.ConsumerStopped",
        "outbox.schema.MigrationFileError",
    } <= set(exception_classes())


@pytest.mark.parametrize("name", sorted(set(exception_classes()) - set(NOT_OUTBOX_ERRORS)))
def test_every_error_derives_from_outbox_error(name: str) -> None:
    assert issubclass(exception_classes()[name], OutboxError)


def test_errors_keep_deriving_from_exception() -> None:
    """A handler of ``Exception`` (the old base of the moved classes) still catches them all."""
    assert all(issubclass(cls, Exception) for cls in exception_classes().values())


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (ValueError("refused\n\tDETAIL:  server   closed"), "refused DETAIL: server closed"),
        (ValueError("  one line  "), "one line"),
        (TimeoutError(), "TimeoutError"),
        (OSError(" \n "), "OSError"),
    ],
)
def test_one_line_collapses_whitespace_or_names_the_type(error: Exception, text: str) -> None:
    assert errors.one_line(error) == text


def test_the_one_line_idiom_is_written_only_in_one_line() -> None:
    """Error text is flattened by ``outbox.errors.one_line``, not by a copy of its body."""
    idiom = re.compile(r"""["'] ["']\.join\(str\(""")
    offenders = {
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in Path(package.__path__[0]).rglob("*.py")
        if idiom.search(path.read_text())
    }
    assert offenders <= {"outbox/errors.py"}
