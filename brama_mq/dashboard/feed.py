"""Fan-out of the board's changes to the pages that are connected (one queue each).

Lives on the event loop: :meth:`Broadcast.publish` is called there (the subscription's
thread hands events over with ``loop.call_soon_threadsafe``). A page that does not keep
up (its queue full) is dropped rather than slowing the others: its stream ends, the
browser's EventSource reconnects and starts again from a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Final

__all__ = ["Broadcast", "Listener", "sse"]

#: Messages one page may have waiting before it is dropped.
QUEUE_LIMIT: Final = 1_000


def sse(kind: str, data: Any) -> str:
    """One server-sent event (``event:`` + one ``data:`` line of JSON)."""
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


class Listener:
    """One connected page: the messages waiting for it; ``None`` ends its stream."""

    def __init__(self, limit: int = QUEUE_LIMIT) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=limit + 1)
        self.limit = limit
        self.dropped = False

    def offer(self, message: str) -> bool:
        """Queue ``message``; False (and the stream is ended) when the page is too slow."""
        if self.dropped:
            return False
        if self.queue.qsize() >= self.limit:
            self.dropped = True
            self.queue.put_nowait(None)
            return False
        self.queue.put_nowait(message)
        return True


class Broadcast:
    """The connected pages; every message goes to each of them."""

    def __init__(self, limit: int = QUEUE_LIMIT) -> None:
        self._listeners: set[Listener] = set()
        self._limit = limit
        self.closed = False

    def __len__(self) -> int:
        return len(self._listeners)

    def join(self) -> Listener:
        listener = Listener(self._limit)
        if self.closed:
            listener.queue.put_nowait(None)
        else:
            self._listeners.add(listener)
        return listener

    def leave(self, listener: Listener) -> None:
        self._listeners.discard(listener)

    def publish(self, message: str) -> None:
        for listener in list(self._listeners):
            if not listener.offer(message):
                self._listeners.discard(listener)

    def close(self) -> None:
        """End every stream (shutdown)."""
        self.closed = True
        for listener in self._listeners:
            if not listener.dropped:
                listener.dropped = True
                listener.queue.put_nowait(None)
        self._listeners.clear()
