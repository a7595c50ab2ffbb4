"""Test helpers that watch the wire from outside brama_mq.

``KombuTap`` is a plain kombu queue bound to the events exchange with a wildcard key:
what it receives is what any subscriber in any language would receive. Tests use it to
check the owner's output without trusting brama_mq's own subscriber code.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import kombu


@dataclass
class Seen:
    """One message as the tap saw it."""

    routing_key: str
    body: dict[str, Any]
    headers: dict[str, Any]
    delivery_mode: int | None
    content_type: str | None

    @property
    def event(self) -> str:
        return str(self.body.get("event"))


class KombuTap:
    """A kombu queue bound to ``exchange`` with ``keys``; collects everything it gets."""

    def __init__(
        self,
        broker_url: str,
        exchange: str,
        keys: Iterable[str],
        *,
        queue: str | None = None,
        durable: bool = False,
        exchange_type: str = "topic",
    ) -> None:
        self.conn = kombu.Connection(broker_url)
        self.channel = self.conn.channel()
        ex = kombu.Exchange(exchange, type=exchange_type, durable=True, passive=True)
        name = queue or f"tap-{uuid.uuid4().hex[:12]}"
        self.durable = durable
        self.queue = kombu.Queue(
            name,
            exchange=ex,
            bindings=[kombu.binding(ex, routing_key=k) for k in keys],
            durable=durable,
            auto_delete=not durable,
            exclusive=not durable,
            channel=self.channel,
        )
        self.queue.declare()
        self.seen: list[Seen] = []
        self.consumer = kombu.Consumer(
            self.channel, [self.queue], on_message=self._on_message, accept=None
        )
        self.consumer.consume()

    def _on_message(self, message: kombu.Message) -> None:
        raw = message.body  # raw bytes: the tap must see bad bodies too
        try:
            decoded = json.loads(raw)
        except (TypeError, ValueError):
            decoded = {"_raw": raw}
        props = message.properties
        self.seen.append(
            Seen(
                message.delivery_info.get("routing_key", ""),
                decoded,
                dict(message.headers or {}),
                props.get("delivery_mode"),
                message.content_type,
            )
        )
        message.ack()

    def drain(self, seconds: float = 0.2) -> list[Seen]:
        """Collect for ``seconds`` (or until quiet), return everything seen so far."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                self.conn.drain_events(timeout=0.05)
            except TimeoutError:
                pass
            except OSError:
                pass
        return self.seen

    def wait_for(
        self, predicate: Callable[[list[Seen]], bool], timeout: float = 10.0
    ) -> list[Seen]:
        """Drain until ``predicate(seen)`` holds; AssertionError with what was seen if not."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate(self.seen):
                return self.seen
            with contextlib.suppress(TimeoutError, OSError):
                self.conn.drain_events(timeout=0.05)
        if predicate(self.seen):
            return self.seen
        names = [(s.routing_key, s.event) for s in self.seen]
        raise AssertionError(f"condition not met within {timeout}s; seen {names}")

    def events_of(self, connection: str) -> list[str]:
        return [s.event for s in self.seen if s.body.get("connection") == connection]

    def close(self) -> None:
        try:
            if self.durable:
                self.queue.delete()
        finally:
            self.conn.release()
