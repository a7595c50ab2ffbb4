"""brama_mq's transport layer: the only package that imports kombu or amqp.

The owner and client are written against the interfaces of :mod:`.base`
(:class:`OwnerLink`, :class:`ClientLink`, :class:`EventSource`, :class:`Transport`)
and get an implementation from :func:`open_transport`: :class:`AmqpTransport` for
RabbitMQ, :class:`MemoryTransport` in-process. ``AmqpTransport`` is imported lazily so
the embedded transport does not pay for importing kombu.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from brama_mq.settings import MEMORY_URL, Settings, check_broker_url
from brama_mq.transport.base import (
    JSON,
    ClientLink,
    Delivery,
    EventSource,
    Outgoing,
    OwnerLink,
    Transport,
)
from brama_mq.transport.memory import MemoryTransport
from brama_mq.transport.topology import DEFAULT_PREFIX, Topology

if TYPE_CHECKING:
    from brama_mq.transport.amqp import AmqpTransport

__all__ = [
    "DEFAULT_PREFIX",
    "JSON",
    "AmqpTransport",
    "ClientLink",
    "Delivery",
    "EventSource",
    "MemoryTransport",
    "Outgoing",
    "OwnerLink",
    "Topology",
    "Transport",
    "open_transport",
    "transport_for",
]


def open_transport(url: str | None, topology: Topology | None = None, **options: Any) -> Transport:
    """A transport for ``url``: ``None`` or ``memory://`` is in-process, else RabbitMQ.

    ``options`` go to :class:`AmqpTransport` (connect_timeout, heartbeat, ssl, ...).
    """
    if url is None or url.startswith(MEMORY_URL):
        return MemoryTransport(topology)
    check_broker_url(url)
    from brama_mq.transport.amqp import AmqpTransport

    return AmqpTransport(url, topology, **options)


def transport_for(settings: Settings, **options: Any) -> Transport:
    """The transport ``settings`` describe: their broker URL, prefix and shard count,
    heartbeat and TLS; ``options`` add or override AmqpTransport's (ignored in memory)."""
    return open_transport(
        settings.broker_url,
        Topology(settings.prefix, settings.shards),
        **{**settings.transport_options(), **options},
    )


def __getattr__(name: str) -> Any:
    if name == "AmqpTransport":
        from brama_mq.transport.amqp import AmqpTransport

        return AmqpTransport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
