"""What every in-memory link needs of its transport: the topology, the broker, the
topology's declares and the registry of open links. Links depend on this, never on the
factory (:mod:`brama_mq.transport.memory.transport`), which extends it with link makers."""

from __future__ import annotations

import threading
from typing import Any

from brama_mq.transport.memory.broker import MemoryBroker
from brama_mq.transport.topology import Topology


class MemoryEndpoint:
    """One in-process broker and one topology, as links see them."""

    def __init__(self, topology: Topology | None = None, *, broker: MemoryBroker | None = None
                 ) -> None:
        self.topology = topology or Topology()
        self.broker = broker or MemoryBroker()
        self._links: list[Any] = []
        self._lock = threading.Lock()

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

    def _track(self, link: Any) -> Any:
        with self._lock:
            self._links.append(link)
        return link
