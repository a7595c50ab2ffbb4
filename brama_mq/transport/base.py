"""The transport interfaces the owner and the client are written against.

Nothing here imports kombu or amqp: the owner and client see only these types, and
two implementations provide them: :mod:`brama_mq.transport.amqp` (RabbitMQ) and
:mod:`brama_mq.transport.memory` (in-process, for the demo and users' tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias, runtime_checkable

from brama_mq.transport.topology import Topology

__all__ = [
    "JSON",
    "PING_BODY",
    "PING_HEADER",
    "ClientLink",
    "Delivery",
    "EventSource",
    "JournalLink",
    "Outgoing",
    "OwnerLink",
    "StreamReader",
    "StreamStart",
    "Topology",
    "Transport",
    "decode_tag",
    "encode_tag",
]

JSON = "application/json"
#: Header of an owner ping: an empty message an owner that does not know whether it is
#: the active consumer sends to its own queue (see docs/protocol.md). The active owner
#: acks it and applies nothing; a standby that receives one knows it has the queue.
PING_HEADER = "x-brama-owner-ping"
#: A ping's body: an empty JSON object (so a tool that parses the queue is not upset).
PING_BODY = b"{}"
#: Where a stream reader starts: "first", "last" (the last chunk), "next", or an offset.
StreamStart: TypeAlias = str | int

#: Delivery tags handed out by links carry the channel epoch in their high bits, so a
#: tag taken before a reconnect can never acknowledge a message on the new channel.
_TAG_BITS = 48
_TAG_MASK = (1 << _TAG_BITS) - 1


def encode_tag(epoch: int, broker_tag: int) -> int:
    """Link-level delivery tag: ``epoch`` in the high bits, the broker's tag below."""
    return (epoch << _TAG_BITS) | broker_tag


def decode_tag(tag: int) -> tuple[int, int]:
    """Split a link-level delivery tag into ``(epoch, broker_tag)``."""
    return tag >> _TAG_BITS, tag & _TAG_MASK


@dataclass(slots=True)
class Delivery:
    """One message taken from a queue (a command for the owner, an event for a subscriber).

    ``delivery_tag`` is opaque: pass it back to the link's ``ack``. It encodes ``epoch``,
    the number of the channel it came on; after a reconnect the broker redelivers what
    was unacknowledged and acks of older tags are ignored.
    """

    body: bytes
    delivery_tag: int
    content_type: str | None
    headers: dict[str, Any]
    reply_to: str | None
    correlation_id: str | None
    redelivered: bool
    routing_key: str
    properties: dict[str, Any]
    epoch: int = 0
    exchange: str = ""


@dataclass(slots=True)
class Outgoing:
    """One event to publish on the events exchange.

    ``critical``: persistent, mandatory and confirmed (wait_confirms covers it);
    otherwise transient and unconfirmed.
    """

    routing_key: str
    body: bytes
    critical: bool
    message_id: str
    content_type: str | None = JSON
    headers: dict[str, Any] | None = field(default=None)


@runtime_checkable
class OwnerLink(Protocol):
    """What the state owner needs; one per owner process, used from one thread."""

    def fetch(self, max_messages: int, timeout: float) -> list[Delivery]:
        """Wait up to ``timeout`` s for a first delivery, then return it plus whatever is
        already buffered (up to ``max_messages``) without waiting more; ``[]`` on timeout."""
        ...

    def publish(self, events: Sequence[Outgoing]) -> None:
        """Transient events go out at once on a plain channel; critical ones on a separate
        confirm-mode channel, pipelined (never waiting per message)."""
        ...

    def wait_confirms(self, timeout: float) -> int:
        """Block until every critical publish so far is acked; republish nacked ones (and,
        after a lost connection, every unconfirmed one); count returns without retrying.
        Returns how many were confirmed since the last call; ConfirmError on timeout."""
        ...

    def ack(self, delivery_tag: int, multiple: bool = True) -> None:
        """Acknowledge (by default everything up to ``delivery_tag``); a tag from before a
        reconnect is ignored (the broker already requeued it)."""
        ...

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Publish a copy to the dead exchange with header ``x-brama-error``, persistent
        and confirmed; ack the delivery after :meth:`wait_confirms`."""
        ...

    def reply(self, reply_to: str, correlation_id: str | None, body: bytes) -> None:
        """Answer an RPC through direct reply-to."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters: published, transient, confirmed, nacked, returned, republished,
        reconnects, delivered, stale_acks."""
        ...

    def close(self) -> None:
        """Close the link; unacknowledged deliveries go back to the queue."""
        ...


@runtime_checkable
class JournalLink(Protocol):
    """What an owner link offers (beyond :class:`OwnerLink`) for failover and persistence."""

    @property
    def epoch(self) -> int:
        """Number of the link's current connection: it changes on every reconnect."""
        ...

    def append(self, stream: str, body: bytes) -> None:
        """Publish a record to ``stream``, persistent and confirmed like a critical event,
        on the same channel (so in the same order as the events around it)."""
        ...

    def ping(self, confirmed: bool = False) -> None:
        """Send an empty message with :data:`PING_HEADER` to this link's owner queue;
        ``confirmed``: as a confirmed publish (a broker round trip for the owner's lease)."""
        ...


@runtime_checkable
class StreamReader(Protocol):
    """Reads one stream from a position; used from one thread."""

    def read(self, timeout: float) -> list[tuple[int, bytes]]:
        """Wait up to ``timeout`` s for a record, then return ``(offset, body)`` of what is
        buffered (maybe ``[]``). Reconnects by itself, resuming after the last offset."""
        ...

    def close(self) -> None:
        """Stop reading."""
        ...


@runtime_checkable
class ClientLink(Protocol):
    """What a client needs; safe to share between threads."""

    def send(
        self, body: bytes, routing_key: str = "owner", *, message_id: str | None = None
    ) -> None:
        """Publish a persistent command; returns once the broker confirmed it."""
        ...

    def post(
        self,
        body: bytes,
        routing_key: str = "owner",
        *,
        message_id: str | None = None,
        confirm: bool = False,
    ) -> bool:
        """Publish a persistent command, kept (bounded, republished after a reconnect)
        until confirmed; OutboxFullError when the link's buffer is full. With
        ``confirm``, wait for the confirm while connected (True); while the broker is
        away return False at once, the command buffered."""
        ...

    def request(self, body: bytes, timeout: float, routing_key: str = "owner") -> bytes:
        """RPC over direct reply-to; RequestTimeoutError when no answer comes in time."""
        ...

    def close(self) -> None:
        """Close the link."""
        ...


@runtime_checkable
class EventSource(Protocol):
    """Subscriber side: a queue bound to the events exchange.

    Used from one thread, except :meth:`wake`, which any thread may call.
    """

    @property
    def queue(self) -> str:
        """The queue's name (server-named ones are known once declared)."""
        ...

    def bind(self, keys: Sequence[str]) -> None:
        """Bind the queue to the events exchange with each binding key."""
        ...

    def unbind(self, keys: Sequence[str]) -> None:
        """Remove those bindings (absent ones are fine); the others stay."""
        ...

    def get(self, timeout: float) -> list[Delivery]:
        """Like :meth:`OwnerLink.fetch`: wait for one, return all that are buffered.

        Returns early (possibly ``[]``) when another thread calls :meth:`wake`.
        """
        ...

    def wake(self) -> None:
        """Make a :meth:`get` blocked in another thread return now (thread-safe), so the
        thread that owns the source can ack, bind or unbind without waiting for a message."""
        ...

    def ack(self, delivery_tag: int, multiple: bool = True) -> None:
        """Acknowledge deliveries (stale tags after a reconnect are ignored)."""
        ...

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Copy ``delivery`` to the source's dead-letter queue with header ``x-brama-error``
        (persistent, confirmed); the caller acks the original afterwards.
        TransportError when the source has no dead-letter queue."""
        ...

    def depth(self) -> int:
        """Messages ready in the queue (not counting delivered, unacked ones)."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters: ``delivered``, ``dead_lettered``, ``reconnects``, ``stale_acks``; plus
        ``dropped`` (removed by the length limit) where the broker can tell."""
        ...

    def close(self) -> None:
        """Close; a non-durable queue disappears with it."""
        ...


@runtime_checkable
class Transport(Protocol):
    """Factory of links for one broker and topology; one per process and configuration."""

    topology: Topology

    def declare(self) -> None:
        """Declare the topology (idempotent)."""
        ...

    def delete_topology(self) -> None:
        """Delete every exchange and queue of the topology (tests, demo tear-down)."""
        ...

    def owner_link(self, *, prefetch: int = 500, shard: int | None = None) -> OwnerLink:
        """A consumer of the owner queue (of ``shard`` when sharded)."""
        ...

    def client_link(self) -> ClientLink:
        """A thread-safe command sender and RPC caller."""
        ...

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
    ) -> EventSource:
        """A queue on the events exchange: server-named and exclusive when ``queue`` is
        None; ``max_length`` drops the oldest messages beyond it. ``quorum`` (durable
        only) makes a quorum queue; ``dead_letter_queue`` (a durable queue, declared too)
        receives what the broker rejects and what :meth:`EventSource.dead_letter` sends;
        ``delivery_limit`` (quorum only) dead-letters a message after that many deliveries.
        See :func:`~brama_mq.transport.topology.event_queue_arguments`."""
        ...

    def delete_queues(self, names: Sequence[str]) -> None:
        """Delete queues by name (absent ones are fine): named subscriptions' clean-up."""
        ...

    def close(self) -> None:
        """Close every link this transport made."""
        ...
