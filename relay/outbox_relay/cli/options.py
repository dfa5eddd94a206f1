"""Click options generated from the relay's settings, so that each is described once.

A :class:`~outbox_relay.config.RelaySettings` field with an :class:`~outbox_relay.config.Option`
becomes one option: the flag and the variable from the field's name, the type and bounds from
its annotation and the Option, the default from the field. A float is a length of time in
seconds, given as a duration (``7d``). ``run`` takes them all; other commands take the ones they
share with the relays (``status`` reads ``--retention`` as the relays do).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any, TypeVar

import click

from outbox.settings import OutboxSettings
from outbox_relay.cli import duration
from outbox_relay.config import Option, RelaySettings, option_of

F = TypeVar("F", bound=Callable[..., Any])


def flag(name: str) -> str:
    option = option_of(name)
    return (option.flag if option and option.flag else None) or "--" + name.replace("_", "-")


def envvar(name: str) -> str:
    """``OUTBOX_`` and the flag: ``--batch-size`` is read from ``OUTBOX_BATCH_SIZE``."""
    return "OUTBOX_" + flag(name).removeprefix("--").replace("-", "_").upper()


@cache
def _value_types() -> Mapping[str, type]:
    """Each field's type, with ``X | None`` read as X."""
    found: dict[str, type] = {}
    for name, hint in typing.get_type_hints(RelaySettings).items():
        if isinstance(hint, types.UnionType):
            (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        found[name] = typing.get_origin(hint) or hint
    return found


def _parameter(name: str, option: Option, default: object) -> dict[str, Any]:
    """click.option's arguments for the setting's type: a choice, a number, text, or a flag."""
    kind = _value_types()[name]
    if option.choices is not None:
        choices = option.choices
        word = next((w for w, value in choices.items() if value == default), None)
        return {
            "type": click.Choice(list(choices)),
            "default": word,
            "callback": lambda _ctx, _param, given: choices[given],
        }
    if option.multiple:
        return {"multiple": True}
    if kind is int:
        numbers = click.IntRange(_int(option.minimum), _int(option.maximum))
        return {"type": numbers, "default": default}
    if kind is float:
        # Every float setting is a length of time in seconds; --help shows the default as 30s.
        shown = duration.shown(default) if isinstance(default, float) else default
        return {"type": duration.Duration(option.minimum, option.maximum), "default": shown}
    return {"default": default}


def _int(bound: float | None) -> int | None:
    return None if bound is None else int(bound)


def setting_option(name: str) -> Callable[[F], F]:
    """The option of the ``RelaySettings`` field ``name``."""
    option = option_of(name)
    if option is None:
        raise ValueError(f"RelaySettings.{name} is not an option")
    spec = RelaySettings.__dataclass_fields__[name]
    default = None if spec.default is dataclasses.MISSING else spec.default
    arguments = _parameter(name, option, default)
    declaration = flag(name)
    if _value_types()[name] is bool and option.choices is None:
        declaration = f"{declaration}/--no-{declaration.removeprefix('--')}"
    return click.option(
        declaration,
        name,
        envvar=envvar(name),
        show_envvar=True,
        show_default=option.shown_default or default is not None,
        help=option.help,
        **arguments,
    )


def options(*names: str) -> Callable[[F], F]:
    """The options of these settings, shown in this order by ``--help``."""

    def decorate(func: F) -> F:
        for name in reversed(names):
            func = setting_option(name)(func)
        return func

    return decorate


#: Every setting that is an option, in the order of the fields.
SETTINGS = tuple(f.name for f in dataclasses.fields(RelaySettings) if option_of(f.name))


def relay_settings(values: Mapping[str, Any], outbox: OutboxSettings) -> RelaySettings:
    """The settings of ``run``'s options; an option left unset keeps the field's default.

    Values that need parsing (``--kafka-config``) are parsed here, where a ConfigurationError
    reaches the command's error handling, rather than in a click callback."""
    given = {name: value for name, value in values.items() if value is not None}
    for name, value in given.items():
        option = option_of(name)
        if option is not None and option.parse is not None:
            given[name] = option.parse(value)
    given.setdefault("database_url", "")
    given.setdefault("kafka_bootstrap_servers", "")
    return RelaySettings(outbox=outbox, **given)
