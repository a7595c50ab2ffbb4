"""A subscriber's event source in memory: its own queue bound to the events exchange,
declared with the arguments RabbitMQ would get, with dead-lettering and drop-head."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from brama_mq.errors import TransportError
from brama_mq.transport.base import Delivery
from brama_mq.transport.memory.broker import _Message
from brama_mq.transport.memory.consumer import _MemoryConsumer
from brama_mq.transport.memory.endpoint import MemoryEndpoint
from brama_mq.transport.topology import event_queue_arguments


class MemoryEventSource(_MemoryConsumer):
    """EventSource in memory; ``stats()['dropped']`` counts drop-head losses."""

    def __init__(
        self,
        transport: MemoryEndpoint,
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

