"""A bounded memory of handled events, to drop duplicates by ``(scope, connection, seq)``.

Duplicates are normal in an at-least-once system: the broker redelivers what a lost
connection left unacknowledged, and the owner republishes a critical event whose confirm it
never saw. ``seq`` is unique per ``(scope, connection)``, so that triple names an event.
"""

from __future__ import annotations

from collections import deque

__all__ = ["EventKey", "SeenWindow"]

EventKey = tuple[str | None, str, int]


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
