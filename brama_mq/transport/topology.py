"""The broker objects of ARCHITECTURE.md section 3, named from one configurable prefix.

:class:`Topology` is plain data (no kombu, no I/O) so the owner and client can name queues
and routing keys without touching the broker. :func:`declare_topology` and
:func:`delete_topology` take any channel with py-amqp's method names (``exchange_declare``,
``queue_declare``, ...), which keeps this module free of kombu imports too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "DEFAULT_DEAD_MAX_BYTES",
    "DEFAULT_DEAD_MAX_LENGTH",
    "DEFAULT_DELIVERY_LIMIT",
    "DEFAULT_PREFIX",
    "AmqpChannelLike",
    "Topology",
    "declare_topology",
    "delete_topology",
    "event_queue_arguments",
]

DEFAULT_PREFIX = "brama"
#: Deliveries of one command before the quorum queue dead-letters it: a poison message
#: that keeps crashing owners ends in ``{prefix}.dead`` instead of looping forever.
DEFAULT_DELIVERY_LIMIT = 20
#: Bounds of ``{prefix}.dead``: beyond either, the broker drops the *oldest* dead letters
#: (``drop-head``), so a flood of bad commands can neither fill the broker nor block the
#: owner (reject-publish would nack its dead letters, which it republishes until
#: confirmed). Every dead letter is also logged by the owner with its reason.
DEFAULT_DEAD_MAX_LENGTH = 100_000
DEFAULT_DEAD_MAX_BYTES = 128 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Topology:
    """Names and arguments of every exchange and queue for one prefix (section 3)."""

    prefix: str = DEFAULT_PREFIX
    shards: int = 1
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT
    dead_max_length: int | None = DEFAULT_DEAD_MAX_LENGTH
    dead_max_bytes: int | None = DEFAULT_DEAD_MAX_BYTES

    def __post_init__(self) -> None:
        if not self.prefix or not self.prefix.isprintable() or " " in self.prefix:
            raise ValueError(f"invalid topology prefix {self.prefix!r}: need printable, no spaces")
        if len(self.prefix.encode()) > 200:
            raise ValueError("topology prefix too long: queue names are limited to 255 bytes")
        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, not {self.shards}")
        if self.delivery_limit < 1:
            raise ValueError(f"delivery_limit must be >= 1, not {self.delivery_limit}")
        for field_name in ("dead_max_length", "dead_max_bytes"):
            value = getattr(self, field_name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{field_name} must be None or an int >= 1, not {value!r}")

    @property
    def commands_exchange(self) -> str:
        """Direct exchange clients publish commands to."""
        return f"{self.prefix}.commands"

    @property
    def events_exchange(self) -> str:
        """Topic exchange the owner publishes every event to."""
        return f"{self.prefix}.events"

    @property
    def dead_exchange(self) -> str:
        """Fanout exchange for commands that could not be applied."""
        return f"{self.prefix}.dead"

    @property
    def dead_queue(self) -> str:
        """Durable queue bound to the dead exchange."""
        return f"{self.prefix}.dead"

    def _check_shard(self, shard: int | None) -> int | None:
        if self.shards == 1:
            if shard not in (None, 0):
                raise ValueError(f"shard {shard} given but the topology has one owner queue")
            return None
        if shard is None:
            raise ValueError(f"the topology has {self.shards} shards: say which one")
        if not 0 <= shard < self.shards:
            raise ValueError(f"shard {shard} out of range 0..{self.shards - 1}")
        return shard

    def owner_queue(self, shard: int | None = None) -> str:
        """The owner's quorum queue (``{p}.owner``, or ``{p}.owner.<k>`` when sharded)."""
        k = self._check_shard(shard)
        return f"{self.prefix}.owner" if k is None else f"{self.prefix}.owner.{k}"

    def owner_key(self, shard: int | None = None) -> str:
        """Routing key binding the owner queue to the commands exchange."""
        k = self._check_shard(shard)
        return "owner" if k is None else f"owner.{k}"

    def owner_queues(self) -> list[tuple[str, str]]:
        """Every ``(queue, routing key)`` pair of owner queues."""
        if self.shards == 1:
            return [(self.owner_queue(), self.owner_key())]
        return [(self.owner_queue(k), self.owner_key(k)) for k in range(self.shards)]

    def owner_queue_arguments(self) -> dict[str, Any]:
        """Arguments of the owner queues: quorum, one active consumer, dead-lettering."""
        return {
            "x-queue-type": "quorum",
            "x-single-active-consumer": True,
            "x-dead-letter-exchange": self.dead_exchange,
            "x-delivery-limit": self.delivery_limit,
        }

    def dead_queue_arguments(self) -> dict[str, Any]:
        """Arguments of the dead queue: bounded, the oldest dropped first (see
        DEFAULT_DEAD_MAX_LENGTH). RabbitMQ refuses to redeclare a queue with other
        arguments: the AMQP transport keeps a dead queue made without them, warning."""
        args: dict[str, Any] = {}
        if self.dead_max_length is not None:
            args["x-max-length"] = self.dead_max_length
        if self.dead_max_bytes is not None:
            args["x-max-length-bytes"] = self.dead_max_bytes
        if args:
            args["x-overflow"] = "drop-head"
        return args

    def subscription_queue(self, name: str) -> str:
        """The durable queue of the named subscription ``name``: ``{p}.sub.<name>``."""
        _check_subscription_name(self.prefix, name)
        return f"{self.prefix}.sub.{name}"

    def subscription_dead_queue(self, name: str) -> str:
        """Where the named subscription's failed events go: ``{p}.sub.<name>.dead``."""
        _check_subscription_name(self.prefix, name)
        return f"{self.prefix}.sub.{name}.dead"

    def exchanges(self) -> list[tuple[str, str]]:
        """Every ``(exchange, type)`` pair."""
        return [
            (self.commands_exchange, "direct"),
            (self.events_exchange, "topic"),
            (self.dead_exchange, "fanout"),
        ]

    def queue_names(self) -> list[str]:
        """Every queue name the topology declares."""
        return [q for q, _ in self.owner_queues()] + [self.dead_queue]


def _check_subscription_name(prefix: str, name: object) -> None:
    """Refuse names that cannot be part of a queue name (255 bytes, printable, no spaces)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"subscription name must be a non-empty str, not {name!r}")
    if not name.isprintable() or any(c.isspace() for c in name):
        raise ValueError(f"subscription name {name!r} must be printable, without spaces")
    longest = f"{prefix}.sub.{name}.dead"
    if len(longest.encode()) > 255:
        raise ValueError(
            f"subscription name {name!r} is too long: queue {longest!r} would exceed 255 bytes"
        )


def event_queue_arguments(
    *,
    max_length: int | None = None,
    quorum: bool = False,
    dead_letter_queue: str | None = None,
    delivery_limit: int | None = None,
) -> dict[str, Any]:
    """Arguments of a subscriber queue on the events exchange.

    ``max_length`` drops the *oldest* messages beyond it (``x-overflow: drop-head``), so a
    stalled subscriber costs the broker a bounded amount of memory. ``dead_letter_queue``
    routes rejected messages through the default exchange straight to that queue (no extra
    exchange to declare or delete). ``delivery_limit`` (quorum queues only: classic queues
    do not count deliveries) dead-letters a message that keeps killing its consumers.
    """
    args: dict[str, Any] = {}
    if quorum:
        args["x-queue-type"] = "quorum"
    if max_length is not None:
        args["x-max-length"] = max_length
        args["x-overflow"] = "drop-head"
    if dead_letter_queue is not None:
        args["x-dead-letter-exchange"] = ""
        args["x-dead-letter-routing-key"] = dead_letter_queue
    if quorum and delivery_limit is not None:
        args["x-delivery-limit"] = delivery_limit
    return args


class AmqpChannelLike(Protocol):
    """The subset of py-amqp's ``Channel`` the topology functions call."""

    def exchange_declare(
        self,
        exchange: str,
        type: str,
        passive: bool = ...,
        durable: bool = ...,
        auto_delete: bool = ...,
        nowait: bool = ...,
        arguments: dict[str, Any] | None = ...,
    ) -> Any: ...

    def exchange_delete(self, exchange: str, if_unused: bool = ..., nowait: bool = ...) -> Any: ...

    def queue_declare(
        self,
        queue: str = ...,
        passive: bool = ...,
        durable: bool = ...,
        exclusive: bool = ...,
        auto_delete: bool = ...,
        nowait: bool = ...,
        arguments: dict[str, Any] | None = ...,
    ) -> Any: ...

    def queue_bind(
        self,
        queue: str,
        exchange: str = ...,
        routing_key: str = ...,
        nowait: bool = ...,
        arguments: dict[str, Any] | None = ...,
    ) -> Any: ...

    def queue_delete(
        self, queue: str = ..., if_unused: bool = ..., if_empty: bool = ..., nowait: bool = ...
    ) -> Any: ...


def declare_topology(channel: AmqpChannelLike, topology: Topology) -> None:
    """Declare every exchange, queue and binding of ``topology`` (idempotent).

    A queue that already exists with other arguments makes the broker close the channel
    with PRECONDITION_FAILED; the caller maps that to a TransportError.
    """
    for name, kind in topology.exchanges():
        channel.exchange_declare(name, kind, durable=True, auto_delete=False)
    args = topology.owner_queue_arguments()
    for queue, key in topology.owner_queues():
        channel.queue_declare(queue, durable=True, auto_delete=False, arguments=dict(args))
        channel.queue_bind(queue, topology.commands_exchange, key)
    channel.queue_declare(topology.dead_queue, durable=True, auto_delete=False,
                          arguments=topology.dead_queue_arguments())
    channel.queue_bind(topology.dead_queue, topology.dead_exchange, "")


def delete_topology(channel: AmqpChannelLike, topology: Topology) -> None:
    """Delete every queue and exchange of ``topology`` (missing ones are fine: RabbitMQ
    treats deleting an absent queue or exchange as success)."""
    for queue in topology.queue_names():
        channel.queue_delete(queue)
    for name, _ in topology.exchanges():
        channel.exchange_delete(name)
