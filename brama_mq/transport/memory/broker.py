"""The in-memory broker: exchanges with RabbitMQ's routing, queues (max length with
drop-head, delivery limit and dead-lettering), reply boxes for direct reply-to and
size-bounded streams, all behind one lock and its condition."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

from brama_mq.core.matcher import TopicMatcher
from brama_mq.errors import TransportError


class _Message:
    __slots__ = ("body", "delivery_count", "exchange", "properties", "redelivered", "routing_key")

    def __init__(
        self, exchange: str, routing_key: str, body: bytes, properties: dict[str, Any]
    ) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.body = body
        self.properties = properties
        self.redelivered = False
        self.delivery_count = 0


class _Exchange:
    __slots__ = ("direct", "fanout", "kind", "name", "topic")

    def __init__(self, name: str, kind: str) -> None:
        if kind not in ("direct", "topic", "fanout"):
            raise TransportError(f"unsupported exchange type {kind!r}")
        self.name = name
        self.kind = kind
        self.direct: dict[str, set[str]] = {}
        self.topic: TopicMatcher[str] = TopicMatcher()
        self.fanout: set[str] = set()

    def bind(self, queue: str, key: str) -> None:
        if self.kind == "direct":
            self.direct.setdefault(key, set()).add(queue)
        elif self.kind == "topic":
            self.topic.add(key, queue)
        else:
            self.fanout.add(queue)

    def unbind(self, queue: str, key: str) -> None:
        if self.kind == "direct":
            self.direct.get(key, set()).discard(queue)
        elif self.kind == "topic":
            self.topic.remove(key, queue)
        else:
            self.fanout.discard(queue)

    def unbind_queue(self, queue: str) -> None:
        for queues in self.direct.values():
            queues.discard(queue)
        self.topic.remove_value(queue)
        self.fanout.discard(queue)

    def route(self, key: str) -> set[str]:
        if self.kind == "direct":
            return set(self.direct.get(key, ()))
        if self.kind == "topic":
            return set(self.topic.match(key))
        return set(self.fanout)


class _Queue:
    __slots__ = (
        "consumers",
        "dead_letter_exchange",
        "dead_letter_routing_key",
        "delivery_limit",
        "dropped",
        "durable",
        "exclusive",
        "max_length",
        "messages",
        "name",
        "single_active",
    )

    def __init__(
        self,
        name: str,
        *,
        durable: bool,
        exclusive: bool = False,
        max_length: int | None = None,
        single_active: bool = False,
        dead_letter_exchange: str | None = None,
        dead_letter_routing_key: str | None = None,
        delivery_limit: int | None = None,
    ) -> None:
        self.name = name
        self.durable = durable
        self.exclusive = exclusive
        self.max_length = max_length
        self.single_active = single_active
        self.dead_letter_exchange = dead_letter_exchange
        self.dead_letter_routing_key = dead_letter_routing_key
        self.delivery_limit = delivery_limit
        self.messages: deque[_Message] = deque()
        self.dropped = 0
        self.consumers: list[object] = []


class _ReplyBox:
    __slots__ = ("replies", "waiting")

    def __init__(self) -> None:
        self.waiting: set[str | None] = set()
        self.replies: dict[str | None, bytes] = {}


class MemoryBroker:
    """The shared state: exchanges, queues, reply boxes, one lock and its condition."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.exchanges: dict[str, _Exchange] = {}
        self.queues: dict[str, _Queue] = {}
        self.reply_boxes: dict[str, _ReplyBox] = {}
        #: Streams: append-only, read from any offset, oldest records dropped past a size.
        self.streams: dict[str, MemoryStream] = {}

    # -- declaration -----------------------------------------------------------------
    def declare_exchange(self, name: str, kind: str) -> None:
        with self.lock:
            have = self.exchanges.get(name)
            if have is None:
                self.exchanges[name] = _Exchange(name, kind)
            elif have.kind != kind:
                raise TransportError(
                    f"exchange {name!r} exists as {have.kind}, not {kind} (PRECONDITION_FAILED)"
                )

    def declare_queue(self, name: str, **options: Any) -> _Queue:
        with self.lock:
            have = self.queues.get(name)
            if have is None:
                have = self.queues[name] = _Queue(name, **options)
            return have

    def bind(self, queue: str, exchange: str, key: str) -> None:
        with self.lock:
            ex = self.exchanges.get(exchange)
            if ex is None or queue not in self.queues:
                raise TransportError(f"cannot bind {queue!r} to {exchange!r}: NOT_FOUND")
            ex.bind(queue, key)

    def unbind(self, queue: str, exchange: str, key: str) -> None:
        with self.lock:
            ex = self.exchanges.get(exchange)
            if ex is not None:
                ex.unbind(queue, key)

    def declare_stream(self, name: str, max_bytes: int) -> None:
        with self.lock:
            if name not in self.streams:
                self.streams[name] = MemoryStream(max_bytes)

    def delete_queue(self, name: str) -> None:
        with self.lock:
            self.streams.pop(name, None)
            if self.queues.pop(name, None) is not None:
                for ex in self.exchanges.values():
                    ex.unbind_queue(name)
            self.cond.notify_all()

    # -- routing -----------------------------------------------------------------------
    def publish(self, exchange: str, routing_key: str, message: _Message) -> bool:
        """Route and enqueue; False when no queue took it (a mandatory publish returns)."""
        with self.lock:
            if exchange == "":
                stream = self.streams.get(routing_key)
                if stream is not None:
                    stream.append(time.time_ns() // 1_000_000, message.body)
                    self.cond.notify_all()
                    return True
                targets = {routing_key} if routing_key in self.queues else set()
                if not targets and routing_key in self.reply_boxes:
                    return self._reply(routing_key, message)
            else:
                ex = self.exchanges.get(exchange)
                if ex is None:
                    raise TransportError(f"no exchange {exchange!r} (NOT_FOUND)")
                targets = ex.route(routing_key)
            for name in sorted(targets):
                q = self.queues[name]
                copy = _Message(exchange, routing_key, message.body, dict(message.properties))
                self._enqueue(q, copy)
            if targets:
                self.cond.notify_all()
            return bool(targets)

    def _reply(self, address: str, message: _Message) -> bool:
        box = self.reply_boxes[address]
        corr = message.properties.get("correlation_id")
        if corr in box.waiting:  # late replies are dropped, as on RabbitMQ
            box.replies[corr] = message.body
        self.cond.notify_all()
        return True

    def _enqueue(self, q: _Queue, message: _Message) -> None:
        if q.max_length is not None:
            if q.max_length == 0:
                q.dropped += 1
                return
            while len(q.messages) >= q.max_length:
                q.messages.popleft()
                q.dropped += 1
        q.messages.append(message)

    def requeue(self, q: _Queue, messages: list[_Message]) -> None:
        """Put unacked messages back at the head, in order; dead-letter past the limit."""
        if self.queues.get(q.name) is not q:
            return  # the queue was deleted meanwhile
        back: list[_Message] = []
        for m in messages:
            m.redelivered = True
            m.delivery_count += 1
            if q.delivery_limit is not None and m.delivery_count > q.delivery_limit:
                if q.dead_letter_exchange is not None:  # "" is the default exchange
                    props = dict(m.properties)
                    headers = dict(props.get("headers") or {})
                    headers.setdefault("x-first-death-reason", "delivery_limit")
                    headers.setdefault("x-first-death-queue", q.name)
                    props["headers"] = headers
                    key = q.dead_letter_routing_key or m.routing_key
                    self.publish(
                        q.dead_letter_exchange, key,
                        _Message(m.exchange, m.routing_key, m.body, props),
                    )
                continue
            back.append(m)
        q.messages.extendleft(reversed(back))
        self.cond.notify_all()

    def inspect(self, queue: str) -> dict[str, int]:
        """``messages``, ``consumers`` and ``dropped`` of a queue (KeyError if absent)."""
        with self.lock:
            q = self.queues[queue]
            return {
                "messages": len(q.messages),
                "consumers": len(q.consumers),
                "dropped": q.dropped,
            }

    def messages(self, queue: str) -> list[tuple[str, bytes, dict[str, Any]]]:
        """``(routing_key, body, properties)`` of the ready messages (for tests)."""
        with self.lock:
            ready = self.queues[queue].messages
            return [(m.routing_key, m.body, dict(m.properties)) for m in ready]



class MemoryStream:
    """One stream: records numbered from 0; the oldest go once they exceed ``max_bytes``
    (the last one always stays), as a RabbitMQ stream drops whole segments."""

    __slots__ = ("first", "max_bytes", "records", "size")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.first = 0  # offset of records[0]
        self.records: deque[tuple[int, bytes]] = deque()
        self.size = 0

    def __len__(self) -> int:
        return len(self.records)

    @property
    def end(self) -> int:
        """The offset the next record gets."""
        return self.first + len(self.records)

    def append(self, ts: int, body: bytes) -> None:
        self.records.append((ts, body))
        self.size += len(body)
        while self.size > self.max_bytes and len(self.records) > 1:
            _, old = self.records.popleft()
            self.size -= len(old)
            self.first += 1

    def offset_at(self, since_ms: int) -> int:
        """The first record written at or after ``since_ms`` (``end`` if none)."""
        for i, (ts, _) in enumerate(self.records):
            if ts >= since_ms:
                return self.first + i
        return self.end

    def read_from(self, pos: int) -> list[tuple[int, bytes]]:
        start = max(pos, self.first)
        return [(self.first + i, body) for i, (_, body) in enumerate(self.records)
                if self.first + i >= start]

