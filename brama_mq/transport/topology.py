"""The broker objects of the wire contract (docs/protocol.md), named from one prefix.

:class:`Topology` is plain data (no kombu, no I/O) so the owner and client can name queues
and routing keys without touching the broker. :func:`declare_topology` and
:func:`delete_topology` take any channel with py-amqp's method names (``exchange_declare``,
``queue_declare``, ...), which keeps this module free of kombu imports too.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Final, Protocol

__all__ = [
    "DEFAULT_DEAD_MAX_BYTES",
    "DEFAULT_DEAD_MAX_LENGTH",
    "DEFAULT_DELIVERY_LIMIT",
    "DEFAULT_PREFIX",
    "AmqpChannelLike",
    "Topology",
    "declare_shard_record",
    "declare_topology",
    "delete_topology",
    "event_queue_arguments",
    "kept_queue_warning",
    "permission_layout",
    "stored_shards",
    "stream_arguments",
]

DEFAULT_PREFIX = "brama"
#: Deliveries of one command before the quorum queue dead-letters it: a poison message
#: that keeps crashing owners ends in ``{prefix}.dead`` instead of looping forever.
DEFAULT_DELIVERY_LIMIT = 20
_log = logging.getLogger("brama_mq.transport")

#: Retention of the owner's journal and snapshot streams: the broker drops whole
#: segments, oldest first, once a stream is over its size. A snapshot is written every
#: few seconds, so only the tail after the newest one is ever read back.
JOURNAL_MAX_BYTES = 256 * 1024 * 1024
#: At least two complete snapshots of a 1,000,000-connection registry (a part record
#: compresses to 18-60 bytes a connection) plus a segment: docs/architecture.md.
SNAPSHOT_MAX_BYTES = 256 * 1024 * 1024
STREAM_SEGMENT_BYTES = 8 * 1024 * 1024
#: How RabbitMQ words an inequivalent ``x-max-length`` (3.8 to 3.13 at least):
#: ``... for queue 'p.shards' in vhost '/': received '3' but current is '2'``.
_RECORD_MISMATCH: Final = re.compile(
    r"inequivalent arg 'x-max-length' for queue '(?P<queue>[^']*)'.*?"
    r"current is (?:the value )?'(?P<stored>\d+)'"
)
#: Bounds of ``{prefix}.dead``: beyond either, the broker drops the *oldest* dead letters
#: (``drop-head``), so a flood of bad commands can neither fill the broker nor block the
#: owner (reject-publish would nack its dead letters, which it republishes until
#: confirmed). Every dead letter is also logged by the owner with its reason.
DEFAULT_DEAD_MAX_LENGTH = 100_000
DEFAULT_DEAD_MAX_BYTES = 128 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Topology:
    """Names and arguments of every exchange and queue for one prefix."""

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

    def journal_stream(self, shard: int | None = None) -> str:
        """The owner's journal (a stream): ``{p}.journal`` or ``{p}.journal.<k>``."""
        k = self._check_shard(shard)
        return f"{self.prefix}.journal" if k is None else f"{self.prefix}.journal.{k}"

    def snapshot_stream(self, shard: int | None = None) -> str:
        """The owner's snapshots (a stream): ``{p}.snapshots`` or ``{p}.snapshots.<k>``."""
        k = self._check_shard(shard)
        return f"{self.prefix}.snapshots" if k is None else f"{self.prefix}.snapshots.{k}"

    def streams(self) -> list[tuple[str, dict[str, Any]]]:
        """Every ``(stream, arguments)`` pair: each shard's journal and snapshots."""
        shards: list[int | None] = [None] if self.shards == 1 else list(range(self.shards))
        out = []
        for k in shards:
            out.append((self.journal_stream(k), stream_arguments(JOURNAL_MAX_BYTES)))
            out.append((self.snapshot_stream(k), stream_arguments(SNAPSHOT_MAX_BYTES)))
        return out

    @property
    def shard_record(self) -> str:
        """The durable queue whose arguments hold the shard count: ``{p}.shards``.

        Declared with ``x-max-length`` = the shard count before any owner queue, by the
        first process to start; a later declare with another count is refused by the
        broker itself (PRECONDITION_FAILED), atomically, even when processes race. The
        queue never holds a message (nothing is routed to it).
        """
        return f"{self.prefix}.shards"

    def shard_record_arguments(self) -> dict[str, Any]:
        """Quorum (replicated, so a cluster node going down does not hide it), length =
        the shard count; ``x-brama-shards`` repeats it for people reading the admin UI."""
        return {
            "x-queue-type": "quorum",
            "x-max-length": self.shards,
            "x-overflow": "reject-publish",
            "x-brama-shards": self.shards,
        }
    def dead_queue_arguments(self) -> dict[str, Any]:
        """Arguments of the dead queue: a quorum queue (a classic queue lives on one node:
        while that node is down every owner's declare fails), bounded, the oldest dropped
        first (see DEFAULT_DEAD_MAX_LENGTH). RabbitMQ refuses to redeclare a queue with
        other arguments: the AMQP transport keeps one made without them, warning."""
        args: dict[str, Any] = {"x-queue-type": "quorum"}
        if self.dead_max_length is not None:
            args["x-max-length"] = self.dead_max_length
        if self.dead_max_bytes is not None:
            args["x-max-length-bytes"] = self.dead_max_bytes
        if len(args) > 1:
            args["x-overflow"] = "drop-head"
        return args

    def subscription_dead_queue_arguments(self) -> dict[str, Any]:
        """A named subscription's dead queue has the same bounds as ``{p}.dead``: a
        handler that fails on every event must not fill the broker's disk (its alarm would
        block every publisher, the owner included). Its oldest letters go first."""
        return self.dead_queue_arguments()

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
        return (
            [q for q, _ in self.owner_queues()] + [self.dead_queue, self.shard_record]
            + [name for name, _ in self.streams()]
        )


def stream_arguments(max_bytes: int) -> dict[str, Any]:
    """A durable stream capped at ``max_bytes`` (whole segments are dropped, oldest first)."""
    return {
        "x-queue-type": "stream",
        "x-max-length-bytes": max_bytes,
        "x-stream-max-segment-size-bytes": min(STREAM_SEGMENT_BYTES, max_bytes),
    }


#: The roles of :func:`permission_layout`.
ROLES: Final = ("owner", "reporter", "subscriber", "durable_subscriber")


def permission_layout(prefix: str = DEFAULT_PREFIX) -> dict[str, tuple[str, str, str]]:
    """RabbitMQ permissions ``(configure, write, read)`` per role, for ``set_permissions``.

    * ``owner``: everything under the prefix, plus writing to the default exchange
      (``amq.default``), which carries RPC replies to direct reply-to.
    * ``reporter`` (services that report outcomes and read states): publish to
      ``{p}.commands``; declare/check the shard record; its own server-named queues
      (``amq.gen-*``, exclusive to its connection) bound to ``{p}.events``. Nothing on the
      owner queues, no publishing to ``{p}.events``.
    * ``subscriber``: server-named queues bound to ``{p}.events``; nothing else.
    * ``durable_subscriber``: also named subscriptions (``{p}.sub.*``); their dead-letter
      queue is fed through the default exchange, so this role writes to ``amq.default``,
      which RabbitMQ cannot limit by queue: grant it only where that is acceptable.
    """
    p = re.escape(prefix)
    gen = r"amq\.gen-.*"
    return {
        "owner": (rf"^{p}\..*$", rf"^({p}\..*|amq\.default)$", rf"^{p}\..*$"),
        "reporter": (
            rf"^({gen}|{p}\.shards)$",
            rf"^({gen}|{p}\.commands)$",
            rf"^({gen}|{p}\.events)$",
        ),
        "subscriber": (rf"^{gen}$", rf"^{gen}$", rf"^({gen}|{p}\.events)$"),
        "durable_subscriber": (
            rf"^({gen}|{p}\.sub\..*)$",
            rf"^({gen}|{p}\.sub\..*|amq\.default)$",
            rf"^({gen}|{p}\.sub\..*|{p}\.events)$",
        ),
    }


def stored_shards(topology: Topology, message: str) -> int | None:
    """The count the broker holds, from the text of a PRECONDITION_FAILED about the shard
    record; None when ``message`` is about something else (or worded unexpectedly)."""
    m = _RECORD_MISMATCH.search(message)
    if m is None or m.group("queue") != topology.shard_record:
        return None
    return int(m.group("stored"))


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


def kept_queue_warning(queue: str, refusal: str) -> str:
    """What to tell the operator when ``queue`` exists with other arguments than this
    version declares (the broker's PRECONDITION_FAILED text is ``refusal``) and is used
    as it is: a legacy classic queue is named as the single point of failure it is."""
    if "x-queue-type" in refusal:
        return (
            f"queue {queue} is a classic queue made by an earlier brama_mq version: it "
            f"lives on one broker node, so on a cluster it (and every declare of it) is "
            f"unavailable while that node is down; using it as it is. Migrate it to a "
            f"quorum queue: docs/operations.md, 'Migrating classic queues'"
        )
    # The broker names only the first argument that differs: this one may be classic too.
    return (
        f"queue {queue} exists with other arguments than this version declares (a bounded "
        f"quorum queue); using it as it is, maybe unbounded and, if classic, not "
        f"replicated. Migrate it: docs/operations.md, 'Migrating classic queues'"
    )


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


def declare_topology(
    channel: AmqpChannelLike, topology: Topology, *, dead_as_found: bool = False
) -> None:
    """Declare every exchange, queue and binding of ``topology`` (idempotent).

    A queue that already exists with other arguments makes the broker close the channel
    with PRECONDITION_FAILED; the caller maps that to a TransportError. The shard record
    goes first, so a process with the wrong count stops before it declares any owner queue
    of its own count. ``dead_as_found`` checks the dead queue passively: the caller keeps
    one an earlier version made with other arguments (see :func:`kept_queue_warning`).
    """
    declare_shard_record(channel, topology)
    for name, kind in topology.exchanges():
        channel.exchange_declare(name, kind, durable=True, auto_delete=False)
    args = topology.owner_queue_arguments()
    for queue, key in topology.owner_queues():
        channel.queue_declare(queue, durable=True, auto_delete=False, arguments=dict(args))
        channel.queue_bind(queue, topology.commands_exchange, key)
    if dead_as_found:
        channel.queue_declare(topology.dead_queue, passive=True)
    else:
        channel.queue_declare(topology.dead_queue, durable=True, auto_delete=False,
                              arguments=topology.dead_queue_arguments())
    channel.queue_bind(topology.dead_queue, topology.dead_exchange, "")
    for stream, stream_args in topology.streams():
        try:
            channel.queue_declare(stream, durable=True, auto_delete=False,
                                  arguments=stream_args)
        except Exception as exc:  # the broker's PRECONDITION_FAILED (kombu-free module)
            _keep_older_stream(channel, stream, stream_args, exc)


#: A stream declared by an earlier version with another retention (the snapshot stream
#: grew from 64 to 256 MiB when snapshots came in parts).
_STREAM_MISMATCH: Final = re.compile(
    r"inequivalent arg 'x-max-length-bytes' for queue '(?P<queue>[^']*)'.*?"
    r"current is (?:the value )?'(?P<stored>\d+)'"
)


def _keep_older_stream(
    channel: AmqpChannelLike, stream: str, stream_args: dict[str, Any], exc: Exception
) -> None:
    """Use a stream that exists with another ``x-max-length-bytes`` as it is (a stream's
    arguments cannot change; a policy can), saying so; re-raise anything else."""
    m = _STREAM_MISMATCH.search(str(exc))
    if m is None or m.group("queue") != stream:
        raise exc
    stored = int(m.group("stored"))
    _log.warning(
        "stream %s exists with x-max-length-bytes=%d, this version declares %d: using it "
        "as it is (set a max-length-bytes policy on it, or delete it while no owner runs)",
        stream, stored, stream_args["x-max-length-bytes"],
    )
    if not getattr(channel, "is_open", True):  # py-amqp reopens a channel the broker closed
        channel.open()  # type: ignore[attr-defined]
    channel.queue_declare(stream, durable=True, auto_delete=False,
                          arguments={**stream_args, "x-max-length-bytes": stored})


def declare_shard_record(channel: AmqpChannelLike, topology: Topology) -> None:
    """Declare (first start) or check (later ones) the shard record; see
    :attr:`Topology.shard_record`. Needs configure permission on that one queue only."""
    channel.queue_declare(
        topology.shard_record,
        durable=True,
        auto_delete=False,
        arguments=topology.shard_record_arguments(),
    )


def delete_topology(channel: AmqpChannelLike, topology: Topology) -> None:
    """Delete every queue and exchange of ``topology`` (missing ones are fine: RabbitMQ
    treats deleting an absent queue or exchange as success)."""
    for queue in topology.queue_names():
        channel.queue_delete(queue)
    for name, _ in topology.exchanges():
        channel.exchange_delete(name)
