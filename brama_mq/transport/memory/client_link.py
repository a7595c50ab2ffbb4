"""The client's link in memory: route commands to the owner queues and make RPCs
through an in-memory direct reply-to box."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

from brama_mq.errors import RequestTimeoutError, TransportError
from brama_mq.transport.base import JSON
from brama_mq.transport.memory.broker import _Message, _ReplyBox
from brama_mq.transport.memory.endpoint import MemoryEndpoint

REPLY_PREFIX = "amq.rabbitmq.reply-to."


class MemoryClientLink:
    """ClientLink in memory; thread-safe through the broker's lock."""

    def __init__(self, transport: MemoryEndpoint) -> None:
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

