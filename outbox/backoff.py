"""Retry delays with full jitter: pure, with the randomness injected."""

from __future__ import annotations

import random
from collections.abc import Callable


def full_jitter(
    attempt: int, *, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): random(0, min(cap, base * 2**n)).

    Full jitter spreads the retries of many rows or relays over the whole window, so they don't
    hit a recovering broker or database at the same instant.
    """
    exponent = min(max(attempt, 0), 62)  # 2**62 * base overflows nothing and is above any cap
    return rand() * min(cap, base * (1 << exponent))
