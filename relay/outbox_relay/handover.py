"""When shards taken over may be claimed: not while the relay that had them may still deliver.

A relay's row locks and shard locks go with its database sessions, but its Kafka producer does
not: a relay whose sessions died (terminated, a network partition, a database restart) can be
alive with a batch in librdkafka's queue, and librdkafka delivers it until the relay's delivery
timeout runs out. Had another relay published the same rows meanwhile, the late copy of an
earlier event would land after the last copy of a later event of its key, and a compacted topic
would keep the earlier one. So a relay that takes shards over after a relay went without leaving
cleanly claims them only once that relay's *linger* (its delivery timeout plus the publisher's
margin) has passed since it was seen gone. The registry that knows who went and when is the
``relays`` table (migration 0006); this module only keeps the times (pure, no I/O).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


class Handover:
    """The shards this relay holds but may not claim yet, and until when (``clock`` time)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._until: dict[int, float] = {}

    def acquired(self, shards: Iterable[int], wait: float) -> None:
        """Shards just locked, at a moment when a relay that may still deliver went ``wait``
        seconds ago at most (0: none did)."""
        if wait <= 0:
            return
        until = self._clock() + wait
        for shard in shards:
            self._until[shard] = max(until, self._until.get(shard, until))

    def released(self, shards: Iterable[int]) -> None:
        for shard in shards:
            self._until.pop(shard, None)

    def claimable(self, owned: frozenset[int]) -> frozenset[int]:
        """The shards of ``owned`` that may be claimed now."""
        if not self._until:
            return owned
        now = self._clock()
        self._until = {s: t for s, t in self._until.items() if t > now}
        return owned.difference(self._until)

    def waiting(self) -> float:
        """Seconds until every shard held back may be claimed (0: none is held back)."""
        if not self._until:
            return 0.0
        return max(0.0, max(self._until.values()) - self._clock())
