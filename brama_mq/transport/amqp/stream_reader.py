"""Reading a RabbitMQ stream over AMQP 0.9.1: the owner's journal and snapshots.

A stream is consumed with a prefetch window and manual acks (acks only return credit:
nothing is removed) from an ``x-stream-offset``: "first", "last" (the last chunk),
"next", a number, or a timestamp. Every delivery carries its offset in the
``x-stream-offset`` header; after a reconnect the reader resumes right after the last
offset it returned, so a reader never skips nor repeats a record.
"""

from __future__ import annotations

import datetime
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from brama_mq.errors import BrokerUnavailableError
from brama_mq.transport.amqp.link import AmqpLink, ConsumerMixin
from brama_mq.transport.amqp.messages import as_bytes
from brama_mq.transport.base import StreamStart
from brama_mq.transport.errors import RECOVERABLE_ERRORS

if TYPE_CHECKING:
    from brama_mq.transport.amqp.endpoint import AmqpEndpoint

__all__ = ["AmqpStreamReader"]

_PREFETCH = 2_000


class AmqpStreamReader(ConsumerMixin, AmqpLink):
    """One consumer of one stream, from a position; used from one thread."""

    role = "stream reader"

    def __init__(
        self,
        transport: AmqpEndpoint,
        stream: str,
        *,
        offset: StreamStart = "first",
        since_ms: int | None = None,
    ) -> None:
        if isinstance(offset, str) and offset not in ("first", "last", "next"):
            raise ValueError(f"bad stream offset {offset!r}: first, last, next or a number")
        self._stream = stream
        self._start: Any = offset
        if since_ms is not None:  # AMQP timestamps are whole seconds
            self._start = datetime.datetime.fromtimestamp(
                max(0, since_ms // 1000), datetime.timezone.utc
            )
        self._next: int | None = None  # offset after the last one returned
        self._buffer = deque()
        self._cancelled = False
        self._channel: Any = None
        self._last_tag = 0
        super().__init__(transport)

    def _setup(self, conn: Any) -> None:
        # The stream is checked, not the whole topology declared again on every
        # (re)connect: the owner declares that, and on a cluster a reconnect should not
        # wait on queues it does not read.
        ch = self._t.declare_shared(conn, [], [self._stream])
        ch.basic_qos(prefetch_size=0, prefetch_count=_PREFETCH, a_global=False)
        self._buffer.clear()
        self._cancelled = False
        start = self._start if self._next is None else self._next
        ch.basic_consume(
            self._stream, callback=self._on_delivery, on_cancel=self._on_cancel,
            arguments={"x-stream-offset": start},
        )
        self._channel = ch
        self._last_tag = 0

    def _on_lost(self) -> None:
        self._buffer.clear()
        self._channel = None

    def read(self, timeout: float) -> list[tuple[int, bytes]]:
        """Wait up to ``timeout`` s for a record; return ``(offset, body)`` of all buffered."""
        deadline = time.monotonic() + max(0.0, timeout)
        buffer = self._buffer

        def ready() -> bool:
            return bool(buffer) or self._cancelled

        def attempt() -> None:
            if not buffer:
                self._drain_until(deadline, ready)
            if buffer:
                self._drain_nowait(lambda: len(buffer) >= _PREFETCH)
            if self._cancelled and not buffer:
                raise BrokerUnavailableError(f"stream {self._stream} consumer cancelled")

        self._with_recovery(deadline, attempt)
        out: list[tuple[int, bytes]] = []
        last_tag = 0
        nxt = self._next
        while buffer:
            msg = buffer.popleft()
            headers = msg.properties.get("application_headers") or {}
            offset = headers.get("x-stream-offset")
            last_tag = msg.delivery_info["delivery_tag"]
            if not isinstance(offset, int) or (nxt is not None and offset < nxt):
                continue  # a repeat after a reconnect
            out.append((offset, as_bytes(msg.body)))
            nxt = offset + 1
        self._next = nxt
        if last_tag and self._channel is not None:
            try:  # credit for the next records; nothing is removed from a stream
                self._channel.basic_ack(last_tag, multiple=True)
            except RECOVERABLE_ERRORS as exc:
                self._lost = exc  # the next read reconnects and resumes at _next
        return out
