"""A consumer of one in-memory queue, shared by the owner link and the event source:
deliveries out through a prefetch window, acks in, unacked messages requeued on close."""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict

from brama_mq.errors import TransportError
from brama_mq.transport.base import Delivery, decode_tag, encode_tag
from brama_mq.transport.memory.broker import MemoryBroker, _Message, _Queue

_EPOCH = 1  # a memory link never reconnects


def _delivery(message: _Message, tag: int) -> Delivery:
    props = message.properties
    return Delivery(
        body=message.body,
        delivery_tag=encode_tag(_EPOCH, tag),
        content_type=props.get("content_type"),
        headers=dict(props.get("headers") or {}),
        reply_to=props.get("reply_to"),
        correlation_id=props.get("correlation_id"),
        redelivered=message.redelivered,
        routing_key=message.routing_key,
        properties={
            k: v
            for k, v in props.items()
            if k not in ("content_type", "headers", "reply_to", "correlation_id")
        },
        epoch=_EPOCH,
        exchange=message.exchange,
    )


class _MemoryConsumer:
    """Taking messages from one queue with a prefetch window; requeue on close."""

    def __init__(self, broker: MemoryBroker, queue: _Queue, prefetch: int) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, not {prefetch}")
        self._broker = broker
        self._queue = queue
        self._prefetch = prefetch
        self._tags = itertools.count(1)
        self._unacked: OrderedDict[int, _Message] = OrderedDict()
        self._closed = False
        self._woken = False
        self._stale_acks = 0
        with broker.lock:
            queue.consumers.append(self)

    def _active(self) -> bool:
        q = self._queue
        return not q.single_active or (bool(q.consumers) and q.consumers[0] is self)

    def _take(self, max_messages: int, timeout: float) -> list[Delivery]:
        deadline = time.monotonic() + max(0.0, timeout)
        b = self._broker
        with b.cond:
            while True:
                if self._closed:
                    raise TransportError("link is closed")
                room = self._prefetch - len(self._unacked)
                if room > 0 and self._queue.messages and self._active():
                    break
                if self._woken:
                    self._woken = False
                    return []
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                b.cond.wait(remaining)
            out = []
            for _ in range(min(max_messages, room, len(self._queue.messages))):
                m = self._queue.messages.popleft()
                tag = next(self._tags)
                self._unacked[tag] = m
                out.append(_delivery(m, tag))
            return out

    def ack(self, delivery_tag: int, multiple: bool = True) -> None:
        """Settle one delivery, or every one up to ``delivery_tag``."""
        epoch, tag = decode_tag(delivery_tag)
        with self._broker.lock:
            if epoch != _EPOCH or self._closed:
                self._stale_acks += 1
                return
            if multiple:
                while self._unacked:
                    first = next(iter(self._unacked))
                    if first > tag:
                        break
                    del self._unacked[first]
            else:
                self._unacked.pop(tag, None)
            self._broker.cond.notify_all()  # the window has room again

    def _release(self) -> None:
        b = self._broker
        with b.lock:
            if self._closed:
                return
            self._closed = True
            q = self._queue
            if self in q.consumers:
                q.consumers.remove(self)
            b.requeue(q, list(self._unacked.values()))
            self._unacked.clear()
            b.cond.notify_all()

