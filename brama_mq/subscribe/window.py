"""Bounded memories of events seen, to drop duplicates and a superseded owner's events.

Duplicates are normal in an at-least-once system: the broker redelivers what a lost
connection left unacknowledged, and an owner republishes what it cannot prove was
published. ``(epoch, seq)`` is unique per ``(scope, connection)``, so ``(scope,
connection, mark)`` names an event (:mod:`brama_mq.core.ordering`). An event of an older
epoch than one seen for its connection comes from an owner that was superseded: stale.
"""

from __future__ import annotations

from collections import deque

from brama_mq.core.ordering import SEQ_BITS

__all__ = ["EpochBook", "EventKey", "SeenWindow", "event_key"]

#: ``(scope, connection, mark)``, the mark packing ``(epoch, seq)``.
EventKey = tuple[str | None, str, int]


def event_key(scope: str | None, connection: str, epoch: int, seq: int) -> EventKey:
    return (scope, connection, (epoch << SEQ_BITS) | seq)


class SeenWindow:
    """The last ``size`` keys added; older ones are forgotten first (O(1) per operation)."""

    __slots__ = ("_keys", "_order", "size")

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"dedup window must be >= 0, not {size}")
        self.size = size
        self._order: deque[EventKey] = deque()
        self._keys: set[EventKey] = set()

    def __contains__(self, key: EventKey) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: EventKey) -> None:
        if self.size == 0 or key in self._keys:
            return
        self._keys.add(key)
        self._order.append(key)
        if len(self._order) > self.size:
            self._keys.discard(self._order.popleft())


class EpochBook:
    """The newest epoch seen per ``(scope, connection)``, for at most ``limit`` of them
    (then it starts over: a forgotten connection only loses its stale check)."""

    __slots__ = ("_newest", "limit")

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._newest: dict[tuple[str | None, str], int] = {}

    def stale(self, scope: str | None, connection: str, epoch: int) -> bool:
        """Whether ``epoch`` is older than one seen; otherwise remember it."""
        key = (scope, connection)
        newest = self._newest.get(key)
        if newest is None:
            if len(self._newest) >= self.limit:
                self._newest.clear()
        elif epoch <= newest:
            return epoch < newest
        self._newest[key] = epoch
        return False
