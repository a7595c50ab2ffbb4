"""A stream reader in memory: a position in one of the broker's streams (the owner's
journal and snapshots), read from any offset or time."""

from __future__ import annotations

import time

from brama_mq.errors import TransportError
from brama_mq.transport.base import StreamStart
from brama_mq.transport.memory.broker import MemoryBroker


class MemoryStreamReader:
    """StreamReader in memory: a position in one of the broker's streams."""

    def __init__(
        self, broker: MemoryBroker, stream: str, offset: StreamStart, since_ms: int | None
    ) -> None:
        self._broker = broker
        self._name = stream
        self._closed = False
        with broker.lock:
            records = broker.streams.get(stream)
            if records is None:
                raise TransportError(f"no stream {stream!r} (NOT_FOUND)")
            if since_ms is not None:
                self._pos = records.offset_at(since_ms)
            elif offset == "first":
                self._pos = records.first
            elif offset == "last":
                self._pos = max(records.first, records.end - 1)
            elif offset == "next":
                self._pos = records.end
            elif isinstance(offset, int) and offset >= 0:
                self._pos = offset
            else:
                raise ValueError(f"bad stream offset {offset!r}")

    @property
    def exhausted(self) -> bool:
        """Whether every record so far has been read."""
        with self._broker.lock:
            stream = self._broker.streams.get(self._name)
            return stream is None or self._pos >= stream.end

    def read(self, timeout: float) -> list[tuple[int, bytes]]:
        """Wait up to ``timeout`` s for records after the position; return what is there."""
        deadline = time.monotonic() + max(0.0, timeout)
        b = self._broker
        with b.cond:
            while True:
                if self._closed:
                    raise TransportError("stream reader is closed")
                stream = b.streams.get(self._name)
                if stream is not None and stream.end > self._pos:
                    out = stream.read_from(self._pos)
                    self._pos = stream.end
                    return out
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                b.cond.wait(remaining)

    def close(self) -> None:
        with self._broker.cond:
            self._closed = True

