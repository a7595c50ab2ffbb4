"""The owner's link in memory: consume the owner queue (single active consumer), publish
events, dead letters, journal records and pings, all confirmed at once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from brama_mq.errors import TransportError
from brama_mq.transport.base import JSON, PING_BODY, PING_HEADER, Delivery, Outgoing
from brama_mq.transport.memory.broker import _Message
from brama_mq.transport.memory.consumer import _EPOCH, _MemoryConsumer
from brama_mq.transport.memory.endpoint import MemoryEndpoint


class MemoryOwnerLink(_MemoryConsumer):
    """OwnerLink in memory: confirms are immediate, returns are counted."""

    def __init__(self, transport: MemoryEndpoint, *, prefetch: int, shard: int | None) -> None:
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

