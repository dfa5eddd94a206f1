"""Lengths of time on the command line, one syntax for every option: ``90`` or ``90s``,
``250ms``, ``15m``, ``12h``, ``7d``. A bare number is seconds, as the options always took."""

from __future__ import annotations

from typing import Any

import click

from outbox_relay.durations import seconds

__all__ = ["SYNTAX", "Duration", "seconds", "shown"]

_EXAMPLES = "90s, 250ms, 15m, 12h or 7d"

#: The syntax in a sentence, for the commands' --help.
SYNTAX = "A DURATION is 90 or 90s (seconds), 250ms, 15m, 12h or 7d."


# Generic in click 8.5 only; its parameters cannot be given at run time with click 8.1.
class Duration(click.ParamType):  # type: ignore[type-arg]
    """A length of time, in seconds, within bounds (inclusive unless ``min_open``)."""

    name = "duration"

    def __init__(
        self, minimum: float | None = None, maximum: float | None = None, *, min_open: bool = False
    ) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.min_open = min_open

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            found = float(value)
        else:
            try:
                found = seconds(str(value))
            except ValueError:
                self.fail(f"{value!r} is not a duration like {_EXAMPLES}", param, ctx)
        refused = self._out_of_bounds(found)
        if refused:
            self.fail(f"{value!r} is {refused}", param, ctx)
        return found

    def _out_of_bounds(self, value: float) -> str | None:
        if self.minimum is not None and self.min_open and value <= self.minimum:
            return f"not longer than {self.minimum:g}s"
        if self.minimum is not None and value < self.minimum:
            return f"shorter than {self.minimum:g}s"
        if self.maximum is not None and value > self.maximum:
            return f"longer than {self.maximum:g}s"
        return None

    def to_info_dict(self) -> Any:  # click 8.5's ParamTypeInfoDict, plus the bounds
        bounds = {"minimum": self.minimum, "maximum": self.maximum, "min_open": self.min_open}
        return {**super().to_info_dict(), **bounds}

    def __repr__(self) -> str:
        return f"Duration({self.minimum!r}, {self.maximum!r}, min_open={self.min_open!r})"


def shown(default: float) -> str:
    """A default as --help shows it: 30s."""
    return f"{default:g}s"
