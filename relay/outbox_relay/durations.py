"""Lengths of time as people write them: ``90`` or ``90s``, ``250ms``, ``15m``, ``12h``, ``7d``.

A bare number is seconds. Pure; the command line's option type is ``cli.duration.Duration``.
"""

from __future__ import annotations

import math

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(text: str) -> float:
    """``text``'s length of time in seconds; ValueError unless it is a duration."""
    text = text.strip()
    unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if text.endswith(u)), "")
    value = float(text.removesuffix(unit)) * _UNITS.get(unit, 1)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite duration")
    return value
