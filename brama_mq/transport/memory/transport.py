"""The in-memory transport: the factory of links that all share one broker, and the
administration the owner and tests call (delete queues or the whole topology)."""

from __future__ import annotations

from collections.abc import Sequence

from brama_mq.transport.base import StreamStart
from brama_mq.transport.memory.client_link import MemoryClientLink
from brama_mq.transport.memory.endpoint import MemoryEndpoint
from brama_mq.transport.memory.event_source import MemoryEventSource
from brama_mq.transport.memory.owner_link import MemoryOwnerLink
from brama_mq.transport.memory.stream_reader import MemoryStreamReader


class MemoryTransport(MemoryEndpoint):
    """Transport in this process; every link made from one instance shares its broker."""

    def __repr__(self) -> str:
        return f"MemoryTransport(prefix={self.topology.prefix!r})"

    def delete_topology(self) -> None:
        """Delete the topology's queues and exchanges."""
        t, b = self.topology, self.broker
        with b.lock:
            for name in t.queue_names():
                b.delete_queue(name)
            for name, _ in t.exchanges():
                b.exchanges.pop(name, None)

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
