"""In-process transport with RabbitMQ's semantics, for the demo and for users' tests.

Exchanges and queues are Python objects behind one lock; topic routing uses the core's
:class:`~brama_mq.core.matcher.TopicMatcher`, so wildcards behave as on RabbitMQ.
Modelled, because the owner and client rely on them: direct/topic/fanout exchanges and
the default exchange, mandatory returns, single active consumer, prefetch windows,
redelivery of unacked messages when a link closes (dead-lettering past the delivery
limit), direct reply-to, and ``max_length`` with drop-head. Confirms are immediate.
No kombu here.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

from brama_mq.core.matcher import TopicMatcher
from brama_mq.errors import RequestTimeoutError, TransportError
from brama_mq.transport.base import (
    JSON,
    PING_BODY,
    PING_HEADER,
    Delivery,
    Outgoing,
    StreamStart,
    decode_tag,
    encode_tag,
)
from brama_mq.transport.topology import Topology, event_queue_arguments

__all__ = [
    "MemoryBroker",
    "MemoryClientLink",
    "MemoryEventSource",
    "MemoryOwnerLink",
    "MemoryStream",
    "MemoryStreamReader",
    "MemoryTransport",
]

_EPOCH = 1  # a memory link never reconnects
REPLY_PREFIX = "amq.rabbitmq.reply-to."


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


class MemoryOwnerLink(_MemoryConsumer):
    """OwnerLink in memory: confirms are immediate, returns are counted."""

    def __init__(self, transport: MemoryTransport, *, prefetch: int, shard: int | None) -> None:
        self._t = transport
        self.queue = transport.topology.owner_queue(shard)
        self._owner_key = transport.topology.owner_key(shard)
        self.epoch = _EPOCH
        transport.declare()
        self._stats = {
            "published": 0,
            "transient": 0,
            "confirmed": 0,
            "nacked": 0,
            "returned": 0,
            "republished": 0,
            "reconnects": 0,
            "delivered": 0,
            "stale_acks": 0,
            "replies": 0,
            "dead_lettered": 0,
            "pending": 0,
            "epoch": _EPOCH,
        }
        self._settled = 0
        super().__init__(transport.broker, transport.broker.queues[self.queue], prefetch)

    def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Wait up to ``timeout`` s for a delivery, then return what is ready."""
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        out = self._take(max_messages, timeout)
        self._stats["delivered"] += len(out)
        return out

    def _confirmed_publish(self, exchange: str, key: str, message: _Message) -> None:
        self._stats["published"] += 1
        if not self._broker.publish(exchange, key, message):
            self._stats["returned"] += 1
        self._stats["confirmed"] += 1
        self._settled += 1

    def publish(self, events: Sequence[Outgoing]) -> None:
        """Route every event; critical ones count as confirmed at once."""
        if self._closed:
            raise TransportError("owner link is closed")
        exchange = self._t.topology.events_exchange
        for ev in events:
            props: dict[str, Any] = {
                "content_type": ev.content_type,
                "message_id": ev.message_id,
                "delivery_mode": 2 if ev.critical else 1,
            }
            if ev.headers:
                props["headers"] = dict(ev.headers)
            message = _Message(exchange, ev.routing_key, ev.body, props)
            if ev.critical:
                self._confirmed_publish(exchange, ev.routing_key, message)
            else:
                self._stats["transient"] += 1
                self._broker.publish(exchange, ev.routing_key, message)

    def wait_confirms(self, timeout: float) -> int:
        """Everything is confirmed already: return how many since the last call."""
        n, self._settled = self._settled, 0
        return n

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Copy the delivery to the dead exchange with ``x-brama-error``."""
        headers = dict(delivery.headers)
        headers["x-brama-error"] = reason
        headers["x-brama-original-routing-key"] = delivery.routing_key
        props = {k: v for k, v in delivery.properties.items() if k != "expiration"}
        props.update(
            content_type=delivery.content_type,
            headers=headers,
            delivery_mode=2,
        )
        if delivery.reply_to is not None:
            props["reply_to"] = delivery.reply_to
        if delivery.correlation_id is not None:
            props["correlation_id"] = delivery.correlation_id
        exchange = self._t.topology.dead_exchange
        self._stats["dead_lettered"] += 1
        self._confirmed_publish(
            exchange, delivery.routing_key,
            _Message(exchange, delivery.routing_key, delivery.body, props),
        )

    def append(self, stream: str, body: bytes) -> None:
        """Append a record to a stream (the owner's journal or snapshots), confirmed."""
        if self._closed:
            raise TransportError("owner link is closed")
        self._confirmed_publish("", stream, _Message("", stream, body, {"delivery_mode": 2}))

    def ping(self, confirmed: bool = False) -> None:
        """Send an owner ping to the owner queue (see AmqpOwnerLink.ping); in memory
        every publish is confirmed at once."""
        exchange = self._t.topology.commands_exchange
        props = {"headers": {PING_HEADER: 1}, "delivery_mode": 1, "content_type": JSON}
        self._broker.publish(exchange, self._owner_key, _Message(exchange, self._owner_key,
                                                                 PING_BODY, props))

    def reply(self, reply_to: str, correlation_id: str | None, body: bytes) -> None:
        """Answer an RPC; a reply to a caller that is gone is dropped, as on RabbitMQ."""
        props = {"content_type": JSON, "correlation_id": correlation_id}
        self._broker.publish("", reply_to, _Message("", reply_to, body, props))
        self._stats["replies"] += 1

    def ack(self, delivery_tag: int, multiple: bool = True) -> None:
        """Ack up to ``delivery_tag`` (or just it)."""
        super().ack(delivery_tag, multiple)
        self._stats["stale_acks"] = self._stale_acks

    def stats(self) -> dict[str, int]:
        """Same counters as the AMQP owner link (reconnects is always 0)."""
        return dict(self._stats)

    def close(self) -> None:
        """Leave the queue; unacked deliveries go back to it, marked redelivered."""
        self._release()


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


class MemoryClientLink:
    """ClientLink in memory; thread-safe through the broker's lock."""

    def __init__(self, transport: MemoryTransport) -> None:
        self._t = transport
        self._broker = transport.broker
        self._closed = False
        self._address = REPLY_PREFIX + uuid.uuid4().hex
        transport.declare()
        with self._broker.lock:
            self._broker.reply_boxes[self._address] = _ReplyBox()

    def send(
        self, body: bytes, routing_key: str = "owner", *, message_id: str | None = None
    ) -> None:
        """Route a persistent command; TransportError if nothing is bound to the key."""
        if self._closed:
            raise TransportError("client link is closed")
        exchange = self._t.topology.commands_exchange
        props = {"content_type": JSON, "delivery_mode": 2,
                 "message_id": message_id or uuid.uuid4().hex}
        if not self._broker.publish(exchange, routing_key, _Message(exchange, routing_key, body,
                                                                     props)):
            raise TransportError(
                f"command unroutable: nothing bound to {routing_key!r} on {exchange!r}"
            )

    def send_many(self, messages: Sequence[tuple[bytes, str]]) -> None:
        """Route persistent commands ``(body, routing_key)`` in order (see :meth:`send`)."""
        for body, routing_key in messages:
            self.send(body, routing_key)

    def post(
        self,
        body: bytes,
        routing_key: str = "owner",
        *,
        message_id: str | None = None,
        confirm: bool = False,
    ) -> bool:
        """As :meth:`send` (the in-memory broker is never away): True, routed."""
        self.send(body, routing_key, message_id=message_id)
        return True

    def post_many(self, messages: Sequence[tuple[bytes, str]]) -> None:
        """As :meth:`send_many`."""
        self.send_many(messages)

    #: Kept for the interface: the in-memory broker takes every command at once.
    max_buffer = 10_000

    def pending(self) -> int:
        """Always 0: nothing waits for a confirm in memory."""
        return 0

    def flush(self, timeout: float = 5.0) -> bool:
        """Nothing to wait for."""
        return True

    def request(self, body: bytes, timeout: float, routing_key: str = "owner") -> bytes:
        """RPC through the in-memory direct reply-to."""
        if self._closed:
            raise TransportError("client link is closed")
        corr = uuid.uuid4().hex
        exchange = self._t.topology.commands_exchange
        props = {
            "content_type": JSON,
            "delivery_mode": 1,
            "correlation_id": corr,
            "reply_to": self._address,
            "headers": {"x-brama-deadline": int(time.time() * 1000 + timeout * 1000)},
        }
        b = self._broker
        deadline = time.monotonic() + max(0.0, timeout)
        with b.cond:
            box = b.reply_boxes[self._address]
            box.waiting.add(corr)
            try:
                message = _Message(exchange, routing_key, body, props)
                if not b.publish(exchange, routing_key, message):
                    raise TransportError(
                        f"request unroutable: nothing bound to {routing_key!r} on {exchange!r}"
                    )
                while corr not in box.replies:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise RequestTimeoutError(
                            f"no answer on {routing_key!r} within {timeout} s"
                            " (is an owner running?)"
                        )
                    b.cond.wait(remaining)
                return box.replies.pop(corr)
            finally:
                box.waiting.discard(corr)

    def close(self) -> None:
        """Forget the reply address (late replies are dropped)."""
        self._closed = True
        with self._broker.lock:
            self._broker.reply_boxes.pop(self._address, None)


class MemoryEventSource(_MemoryConsumer):
    """EventSource in memory; ``stats()['dropped']`` counts drop-head losses."""

    def __init__(
        self,
        transport: MemoryTransport,
        *,
        queue: str | None,
        durable: bool,
        max_length: int | None,
        prefetch: int,
        quorum: bool = False,
        dead_letter_queue: str | None = None,
        delivery_limit: int | None = None,
    ) -> None:
        if max_length is not None and max_length < 0:
            raise ValueError("max_length must be >= 0")
        if quorum and (queue is None or not durable):
            raise ValueError("a quorum queue must be named and durable")
        self._t = transport
        transport.declare()
        name = queue or f"amq.gen-{uuid.uuid4().hex}"
        self._name = name
        self._durable = durable
        self._dead_queue = dead_letter_queue
        self._counts = {"delivered": 0, "dead_lettered": 0}
        # Same arguments as on RabbitMQ, read back the way the broker would apply them.
        args = event_queue_arguments(
            max_length=max_length, quorum=quorum, dead_letter_queue=dead_letter_queue,
            delivery_limit=delivery_limit,
        )
        if dead_letter_queue is not None:
            transport.broker.declare_queue(dead_letter_queue, durable=True)
        q = transport.broker.declare_queue(
            name,
            durable=durable,
            exclusive=queue is None,
            max_length=max_length,
            dead_letter_exchange=args.get("x-dead-letter-exchange"),
            dead_letter_routing_key=args.get("x-dead-letter-routing-key"),
            delivery_limit=args.get("x-delivery-limit"),
        )
        super().__init__(transport.broker, q, prefetch)

    @property
    def queue(self) -> str:
        """The queue's name."""
        return self._name

    def bind(self, keys: Sequence[str]) -> None:
        """Bind the queue to the events exchange with each key."""
        for key in keys:
            self._broker.bind(self._name, self._t.topology.events_exchange, key)

    def unbind(self, keys: Sequence[str]) -> None:
        """Remove those bindings; absent ones are fine."""
        for key in keys:
            self._broker.unbind(self._name, self._t.topology.events_exchange, key)

    def get(self, timeout: float) -> list[Delivery]:
        """Wait up to ``timeout`` s for an event, then return every ready one."""
        out = self._take(self._prefetch, timeout)
        self._counts["delivered"] += len(out)
        return out

    def wake(self) -> None:
        """End a get() waiting in another thread."""
        with self._broker.cond:
            self._woken = True
            self._broker.cond.notify_all()

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Copy the delivery to the dead-letter queue with ``x-brama-error``."""
        if self._dead_queue is None:
            raise TransportError(f"queue {self._name!r} has no dead-letter queue")
        headers = dict(delivery.headers)
        headers["x-brama-error"] = reason
        headers["x-brama-original-routing-key"] = delivery.routing_key
        headers["x-brama-original-queue"] = self._name
        props = {k: v for k, v in delivery.properties.items() if k != "expiration"}
        props.update(content_type=delivery.content_type, headers=headers, delivery_mode=2)
        message = _Message("", self._dead_queue, delivery.body, props)
        if not self._broker.publish("", self._dead_queue, message):
            raise TransportError(f"dead-letter queue {self._dead_queue!r} is gone")
        self._counts["dead_lettered"] += 1

    def depth(self) -> int:
        """Messages ready in the queue."""
        with self._broker.lock:
            return len(self._queue.messages)

    def stats(self) -> dict[str, int]:
        """``dropped`` (drop-head), ``messages`` ready, ``delivered``, ``stale_acks``."""
        with self._broker.lock:
            return {
                "dropped": self._queue.dropped,
                "messages": len(self._queue.messages),
                "stale_acks": self._stale_acks,
                "reconnects": 0,
                **self._counts,
            }

    def close(self) -> None:
        """Leave the queue; a non-durable queue with no consumer left is deleted."""
        self._release()
        with self._broker.lock:
            if not self._durable and not self._queue.consumers:
                self._broker.delete_queue(self._name)


class MemoryTransport:
    """Transport in this process; every link made from one instance shares its broker."""

    def __init__(self, topology: Topology | None = None, *, broker: MemoryBroker | None = None
                 ) -> None:
        self.topology = topology or Topology()
        self.broker = broker or MemoryBroker()
        self._links: list[Any] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryTransport(prefix={self.topology.prefix!r})"

    def declare(self) -> None:
        """Create the topology's exchanges, queues and bindings (idempotent)."""
        t, b = self.topology, self.broker
        with b.lock:
            for name, kind in t.exchanges():
                b.declare_exchange(name, kind)
            for queue, key in t.owner_queues():
                b.declare_queue(
                    queue,
                    durable=True,
                    single_active=True,
                    dead_letter_exchange=t.dead_exchange,
                    delivery_limit=t.delivery_limit,
                )
                b.bind(queue, t.commands_exchange, key)
            b.declare_queue(t.dead_queue, durable=True, max_length=t.dead_max_length)
            b.bind(t.dead_queue, t.dead_exchange, "")
            for stream, args in t.streams():  # a sixteenth of RabbitMQ's size: in-process
                b.declare_stream(stream, int(args["x-max-length-bytes"]) // 16)

    def delete_topology(self) -> None:
        """Delete the topology's queues and exchanges."""
        t, b = self.topology, self.broker
        with b.lock:
            for name in t.queue_names():
                b.delete_queue(name)
            for name, _ in t.exchanges():
                b.exchanges.pop(name, None)

    def _track(self, link: Any) -> Any:
        with self._lock:
            self._links.append(link)
        return link

    def owner_link(self, *, prefetch: int = 500, shard: int | None = None) -> MemoryOwnerLink:
        """A consumer of the owner queue (single active consumer, as on RabbitMQ)."""
        link: MemoryOwnerLink = self._track(MemoryOwnerLink(self, prefetch=prefetch, shard=shard))
        return link

    def client_link(self) -> MemoryClientLink:
        """A thread-safe sender and RPC caller."""
        link: MemoryClientLink = self._track(MemoryClientLink(self))
        return link

    def event_source(
        self,
        *,
        queue: str | None = None,
        durable: bool = False,
        max_length: int | None = None,
        prefetch: int = 1000,
        quorum: bool = False,
        dead_letter_queue: str | None = None,
        delivery_limit: int | None = None,
    ) -> MemoryEventSource:
        """A queue bound to the events exchange (see EventSource)."""
        link: MemoryEventSource = self._track(
            MemoryEventSource(
                self, queue=queue, durable=durable, max_length=max_length, prefetch=prefetch,
                quorum=quorum, dead_letter_queue=dead_letter_queue,
                delivery_limit=delivery_limit,
            )
        )
        return link

    def delete_queues(self, names: Sequence[str]) -> None:
        """Delete queues by name (absent ones are fine)."""
        for name in names:
            self.broker.delete_queue(name)

    def stream_reader(
        self, stream: str, *, offset: StreamStart = "first", since_ms: int | None = None
    ) -> MemoryStreamReader:
        """A reader of ``stream`` from ``offset`` (or the first record at ``since_ms``)."""
        self.declare()
        reader: MemoryStreamReader = self._track(
            MemoryStreamReader(self.broker, stream, offset, since_ms)
        )
        return reader

    def close(self) -> None:
        """Close every link made by this transport."""
        with self._lock:
            links, self._links = self._links, []
        for link in links:
            link.close()
