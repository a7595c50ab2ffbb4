"""What every link needs of its transport: the settings, a new kombu connection, the
topology's declares and the registry of open links. Links depend on this, never on the
factory (:mod:`brama_mq.transport.amqp.transport`), which extends it with link makers."""

import logging
import threading
from collections.abc import Sequence
from typing import Any, TypeVar

import amqp.exceptions as amqp_exc
from amqp.exceptions import PreconditionFailed
from kombu.connection import Connection as _KombuConnection

from brama_mq.errors import (
    NoTopologyError,
    ShardMismatchError,
)
from brama_mq.settings import check_broker_url
from brama_mq.transport.errors import (
    describe,
    mask_url,
)
from brama_mq.transport.topology import (
    Topology,
    declare_shard_record,
    declare_topology,
    kept_queue_warning,
    stored_shards,
)

log = logging.getLogger(__name__)

_L = TypeVar("_L")
#: kombu has no type hints: typed here once, so mypy --strict accepts the call.
KombuConnection: Any = _KombuConnection


class AmqpEndpoint:
    """One RabbitMQ broker (or failover list) and one topology, as links see them."""

    def __init__(
        self,
        url: str,
        topology: Topology | None = None,
        *,
        connect_timeout: float = 5.0,
        heartbeat: float = 30.0,
        ssl: bool | dict[str, Any] | None = None,
        reconnect_timeout: float = 60.0,
        max_backoff: float = 5.0,
        confirm_timeout: float = 30.0,
        write_timeout: float | None = 30.0,
        bootstrap: bool = True,
    ) -> None:
        check_broker_url(url)
        self.url = url
        self.masked_url = mask_url(url)
        self.topology = topology or Topology()
        self.connect_timeout = connect_timeout
        self.heartbeat = heartbeat
        self.ssl = ssl
        self.reconnect_timeout = reconnect_timeout
        self.max_backoff = max_backoff
        self.confirm_timeout = confirm_timeout
        self.write_timeout = write_timeout
        #: False for read-only clients (status, watch): a missing topology is reported
        #: as NoTopologyError instead of declared, so a mistyped prefix leaves nothing.
        self.bootstrap = bootstrap
        self._links: list[Any] = []
        self._lock = threading.Lock()
        self._declared: set[tuple[str, str]] = set()
        self._dead_kept = False  # warned that an earlier version's dead queue is kept

    def new_kombu_connection(self) -> Any:
        options: dict[str, Any] = {}
        if self.write_timeout:
            options["write_timeout"] = self.write_timeout
        return KombuConnection(
            self.url,
            connect_timeout=self.connect_timeout,
            heartbeat=self.heartbeat,
            # A copy: kombu writes the host name into a dict's server_hostname.
            ssl=dict(self.ssl) if isinstance(self.ssl, dict) else bool(self.ssl),
            transport_options=options,
        )

    def declare_on(self, channel: Any) -> None:
        topology = self.topology
        try:
            declare_topology(channel, topology)
        except PreconditionFailed as exc:
            mismatch = self._shard_mismatch(exc)
            if mismatch is not None:
                raise mismatch from exc
            # A dead queue an earlier version made (classic, or unbounded): keep it as it
            # is rather than refuse to start, and say how to migrate it.
            if topology.dead_queue not in str(exc):
                raise
            log.log(
                logging.DEBUG if self._dead_kept else logging.WARNING,
                "%s (%s)", kept_queue_warning(topology.dead_queue, str(exc)),
                describe(exc, self.url),
            )
            self._dead_kept = True
            if not channel.is_open:  # py-amqp reopens a channel the broker closed
                channel.open()
            declare_topology(channel, topology, dead_as_found=True)
        for name, _ in self.topology.exchanges():
            self.note("exchange", name)
        for name in self.topology.queue_names():
            self.note("queue", name)

    def _shard_mismatch(self, exc: BaseException) -> ShardMismatchError | None:
        """The clear error for a refused shard record, or None for other refusals."""
        text = str(exc)
        if self.topology.shard_record not in text:
            return None
        stored = stored_shards(self.topology, text)
        return ShardMismatchError(self.topology.prefix, self.topology.shards, stored)

    def declare_shared(
        self,
        conn: Any,
        exchanges: Sequence[tuple[str, str]],
        queues: Sequence[str],
        *,
        record: bool = False,
        owner_side: bool = True,
    ) -> Any:
        """A channel, after checking the shared topology a client or subscriber uses.

        Passive declares need no permission, so a restricted user only needs the names it
        creates itself. When something is missing (no owner has run yet) the whole topology
        is declared, which needs configure permission (guest has it; a restricted user gets
        AccessRefusedError saying so). ``record``: also check the shard count (a client
        routes by it). ``owner_side=False`` (subscribers): bootstrap only the exchanges, so
        a subscriber, which does not know the shard count, never stores one.
        """
        ch = conn.channel()
        try:
            for name, kind in exchanges:
                ch.exchange_declare(name, kind, passive=True)
            for queue in queues:
                ch.queue_declare(queue, passive=True)
        except amqp_exc.NotFound as exc:
            if not self.bootstrap:
                raise self._missing(conn, exc) from exc
            ch = conn.channel()  # the failed check closed the other one
            if owner_side:
                self.declare_on(ch)
            else:
                for name, kind in self.topology.exchanges():
                    ch.exchange_declare(name, kind, durable=True, auto_delete=False)
                    self.note("exchange", name)
            return ch
        if record:
            try:
                declare_shard_record(ch, self.topology)
            except amqp_exc.PreconditionFailed as exc:
                mismatch = self._shard_mismatch(exc)
                if mismatch is None:
                    raise
                raise mismatch from exc
        return ch

    def _missing(self, conn: Any, exc: Any) -> BaseException:
        """What a read-only client reports for a missing name: a shard count that differs
        from the stored one (its owner queues have other names) before "no topology"."""
        missing = NoTopologyError(self.topology.prefix, self.masked_url,
                                  str(getattr(exc, "reply_text", "") or exc))
        ch = conn.channel()  # the failed check closed the other one
        try:
            ch.queue_declare(self.topology.shard_record, passive=True)
        except amqp_exc.NotFound:
            return missing  # no worker ever ran with this prefix
        try:
            declare_shard_record(ch, self.topology)  # exists: compares, creates nothing
        except amqp_exc.PreconditionFailed as refused:
            return self._shard_mismatch(refused) or missing
        return missing

    def note(self, kind: str, name: str) -> None:
        self._declared.add((kind, name))

    def forget(self, link: object) -> None:
        """A link closed: the transport's close() no longer reaches it."""
        with self._lock:
            if link in self._links:
                self._links.remove(link)

    def _track(self, link: _L) -> _L:
        with self._lock:
            self._links.append(link)
        return link

    def declared(self) -> set[tuple[str, str]]:
        """``(kind, name)`` of every exchange and queue declared through this transport."""
        return set(self._declared)

