"""The AMQP transport: the factory of links (owner, client, event source, stream
reader) over one :class:`~brama_mq.transport.amqp.endpoint.AmqpEndpoint`, and the
topology's administration (declare, delete) on short-lived connections."""

from collections.abc import Callable, Sequence
from typing import Any

from brama_mq.errors import (
    BramaError,
)
from brama_mq.transport.amqp.client_link import AmqpClientLink
from brama_mq.transport.amqp.endpoint import AmqpEndpoint
from brama_mq.transport.amqp.event_source import AmqpEventSource
from brama_mq.transport.amqp.link import Connector
from brama_mq.transport.amqp.owner_link import AmqpOwnerLink
from brama_mq.transport.amqp.stream_reader import AmqpStreamReader
from brama_mq.transport.base import (
    StreamStart,
)
from brama_mq.transport.errors import (
    RECOVERABLE_ERRORS,
    map_error,
)
from brama_mq.transport.topology import (
    delete_topology,
)


class AmqpTransport(AmqpEndpoint):
    """Links to one RabbitMQ broker (or failover list) for one topology.

    ``url`` is a kombu URL (``amqp://user:pass@host:5672/vhost``, ``;``-separated for
    failover). Links reconnect by themselves with exponential backoff and jitter (capped
    at ``max_backoff``) for up to ``reconnect_timeout`` seconds per outage, then raise
    BrokerUnavailableError (the next call tries again). The URL's password is masked in
    every message and log line.

    Heartbeats (``heartbeat`` s, 0 to disable) are sent from the calls themselves: an
    owner must call ``fetch`` or ``wait_confirms`` at least every ``heartbeat`` seconds
    or the broker drops the connection (the link then reconnects on its next call);
    client links run a small daemon thread for that.
    """


    def __repr__(self) -> str:
        return f"AmqpTransport({self.masked_url!r}, prefix={self.topology.prefix!r})"


    def _admin(self, what: str, fn: Callable[[Any], None]) -> None:
        """Run ``fn(channel)`` on a short-lived connection, mapping errors."""
        connector = Connector(self)
        try:
            conn = connector.connect()
            ch = conn.channel()
            fn(ch)
        except BramaError:
            raise
        except RECOVERABLE_ERRORS as exc:
            raise map_error(exc, what, self.url) from exc
        finally:
            connector.close()


    # -- Transport API ------------------------------------------------------------
    def declare(self) -> None:
        """Declare every exchange, queue and binding of the topology (idempotent)."""
        self._admin("declare topology", self.declare_on)

    def delete_topology(self) -> None:
        """Delete every exchange and queue of the topology (tests, demo tear-down)."""
        self._admin("delete topology", lambda ch: delete_topology(ch, self.topology))

    def owner_link(self, *, prefetch: int = 500, shard: int | None = None) -> AmqpOwnerLink:
        """A consumer of the owner queue (declares the topology first)."""
        return self._track(AmqpOwnerLink(self, prefetch=prefetch, shard=shard))

    def client_link(self) -> AmqpClientLink:
        """A thread-safe command sender and RPC caller."""
        return self._track(AmqpClientLink(self))

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
    ) -> AmqpEventSource:
        """A subscriber queue bound to the events exchange (see EventSource)."""
        return self._track(
            AmqpEventSource(
                self, queue=queue, durable=durable, max_length=max_length, prefetch=prefetch,
                quorum=quorum, dead_letter_queue=dead_letter_queue,
                delivery_limit=delivery_limit,
            )
        )

    def delete_queues(self, names: Sequence[str]) -> None:
        """Delete queues by name (absent ones are fine): named subscriptions' clean-up."""

        def run(ch: Any) -> None:
            for name in names:
                ch.queue_delete(name)

        self._admin("delete queues", run)

    def stream_reader(
        self, stream: str, *, offset: StreamStart = "first", since_ms: int | None = None
    ) -> AmqpStreamReader:
        """A reader of ``stream`` (see :class:`.stream_reader.AmqpStreamReader`)."""
        return self._track(AmqpStreamReader(self, stream, offset=offset, since_ms=since_ms))

    def close(self) -> None:
        """Close every link made by this transport."""
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()
