"""The owner's link: consume the owner queue as single active consumer, publish events in
batched frames on one confirm channel, ack, reply, dead-letter."""


import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from amqp.basic_message import Message

from brama_mq.errors import (
    BramaError,
    BrokerUnavailableError,
    ConfirmError,
)
from brama_mq.transport.amqp.confirms import ConfirmTracker, Pending
from brama_mq.transport.amqp.endpoint import AmqpEndpoint
from brama_mq.transport.amqp.framing import (
    BATCHED_FRAMING,
    OWN_DELIVER,
    WRITE_CHUNK,
    DeliverAssembler,
    FrameReader,
    Inbound,
    drain_frames,
    fan_out,
    frame_publish,
    install_reader,
    shortstr,
    write_frames,
)
from brama_mq.transport.amqp.link import AmqpLink, ConsumerMixin, recoverable
from brama_mq.transport.amqp.messages import NOT_COPIED, event_message, publish, to_delivery
from brama_mq.transport.base import (
    JSON,
    PING_BODY,
    PING_HEADER,
    Delivery,
    Outgoing,
    decode_tag,
)
from brama_mq.transport.errors import (
    RECOVERABLE_ERRORS,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")
#: kombu's Connection is only partly typed; it is used through ``Any`` like py-amqp's.


class AmqpOwnerLink(ConsumerMixin, AmqpLink):
    """The state owner's link: consume commands, publish events, confirm, ack.

    Three channels on one connection: *consume* (QoS per consumer, since quorum queues
    refuse global QoS), *plain* (RPC replies) and *confirm* (every event and dead letter:
    one channel keeps each connection's events in ``seq`` order on the wire; transient
    ones take a confirm tag that nobody waits for). Used from one thread.
    """

    role = "owner link"
    #: After a reconnect, publish again what the broker had not confirmed (events, dead
    #: letters, journal records). A journaled owner turns this off: it steps down on a new
    #: connection and whoever takes over republishes from the journal, so a superseded
    #: owner's unconfirmed batch never reaches subscribers late, after a newer owner's.
    republish_on_reconnect = True

    def __init__(self, transport: AmqpEndpoint, *, prefetch: int, shard: int | None) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, not {prefetch}")
        self._prefetch = prefetch
        self._queue = transport.topology.owner_queue(shard)
        self._buffer = deque()
        self._cancelled = False
        self._tracker = ConfirmTracker()
        # Confirmed pings not yet seen confirmed, and the mark of the newest that was.
        self._pings: deque[Pending] = deque(maxlen=64)
        self._pinged_through = 0
        self._plain: Any = None
        self._confirm: Any = None
        self._consume: Any = None
        self._reader: FrameReader | None = None
        self._assembler = DeliverAssembler()
        self._handed = 0
        self._stats = {
            "published": 0,
            "transient": 0,
            "returned": 0,
            "republished": 0,
            "delivered": 0,
            "stale_acks": 0,
            "replies": 0,
            "dead_lettered": 0,
            "appended": 0,
            "discarded": 0,
        }
        self._owner_key = transport.topology.owner_key(shard)
        super().__init__(transport)

    @property
    def queue(self) -> str:
        """The owner queue this link consumes."""
        return self._queue

    @property
    def epoch(self) -> int:
        """Number of the current connection (1 for the first, +1 per reconnect)."""
        return self._epoch

    def _setup(self, conn: Any) -> None:
        plain = conn.channel()
        self._t.declare_on(plain)
        confirm = conn.channel()
        confirm.confirm_select()
        confirm.events["basic_ack"].add(self._tracker.on_ack)
        confirm.events["basic_nack"].add(self._tracker.on_nack)
        confirm.events["basic_return"].add(self._on_return)
        consume = conn.channel()
        consume.basic_qos(prefetch_size=0, prefetch_count=self._prefetch, a_global=False)
        self._buffer.clear()
        self._cancelled = False
        consume.basic_consume(
            self._queue, callback=self._on_delivery, on_cancel=self._on_cancel
        )
        self._plain, self._confirm, self._consume = plain, confirm, consume
        self._reader = install_reader(conn)
        self._assembler.reset()
        unsettled = self._tracker.restart()
        if not self.republish_on_reconnect:
            self._stats["discarded"] += len(unsettled)
            return
        for pending in unsettled:
            self._send_pending(pending)
            self._stats["republished"] += 1

    def _on_lost(self) -> None:
        self._buffer.clear()
        self._plain = self._confirm = self._consume = None
        self._reader = None
        self._assembler.reset()

    def _drain_nowait(self, enough: Callable[[], bool]) -> None:
        """Process frames already received without waiting, until ``enough()``.

        Complete frames are taken from the buffered reader and the socket is read with
        ``MSG_DONTWAIT``, so no timeout is switched per frame (see :class:`FrameReader`).
        Every frame of this connection goes through here once the reader is installed
        (:meth:`_drain_until` waits with select, replies skip py-amqp's drain), so the
        deliveries taken over by :meth:`_on_consume_frame` never reach py-amqp half-read.
        """
        reader = self._reader
        if reader is None:
            super()._drain_nowait(enough)
            return
        confirm = self._confirm
        on_ack = None
        if confirm is not None:  # a basic.ack goes where py-amqp would dispatch it
            callbacks = confirm.events["basic_ack"]
            on_ack = next(iter(callbacks)) if len(callbacks) == 1 else fan_out(callbacks)
        consume = self._consume
        drain_frames(
            self._conn, reader, enough,
            deliver_id=consume.channel_id if consume is not None and OWN_DELIVER else -1,
            assembler=self._assembler, on_deliver=self._on_consume_frame,
            confirm=confirm, on_ack=on_ack,
        )

    def _drain_until(self, deadline: float, done: Callable[[], bool]) -> None:
        """Like the base class, but every frame goes through :meth:`_drain_nowait`: it
        waits for the socket with select and reads without waiting."""
        reader = self._reader
        if reader is None:
            super()._drain_until(deadline, done)
            return
        while not done():
            self._drain_nowait(done)
            if done():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            reader.wait(min(remaining, self._max_wait))
            self._tick()

    def _on_consume_frame(self, frame: tuple[int, int, bytes]) -> None:
        """A frame of a basic.deliver on the consume channel, assembled and handed to the
        consumer callback as py-amqp's frame handler and Channel would, without them."""
        done = self._assembler.feed(frame)
        if done is None:
            return
        (consumer_tag, delivery_tag, redelivered, exchange, routing_key), properties, body = done
        consume = self._consume
        if consume.is_closing:
            return  # py-amqp ignores what arrives on a closing channel
        if consume.auto_decode and "content_encoding" in properties:
            with contextlib.suppress(Exception):  # as py-amqp: keep the bytes if it fails
                body = body.decode(properties["content_encoding"])
        info = {
            "consumer_tag": consumer_tag,
            "delivery_tag": delivery_tag,
            "redelivered": redelivered,
            "exchange": exchange,
            "routing_key": routing_key,
        }
        callback = consume.callbacks.get(consumer_tag)
        if callback is None:  # as py-amqp: nobody consumes with that tag
            log.warning("rejecting delivery %s for unknown consumer %r", delivery_tag,
                        consumer_tag)
            consume.basic_reject(delivery_tag, requeue=True)
            return
        callback(Inbound(body, consume, info, properties))

    def _on_return(self, exc: Any, exchange: str, routing_key: str, message: Any) -> None:
        # Unroutable (nobody bound): counted, not retried; its ack follows. Events with
        # no subscriber are normal; a dead letter with no dead queue loses evidence.
        self._stats["returned"] += 1
        if exchange == self._t.topology.dead_exchange:
            log.warning("dead letter returned: nothing is bound to %s (was %s deleted?)",
                        exchange, self._t.topology.dead_queue)

    def _send_pending(self, pending: Pending) -> None:
        self._tracker.register(pending)
        publish(self._confirm, self._message(pending), pending.exchange, pending.routing_key,
                 True)

    @staticmethod
    def _message(pending: Pending) -> Any:
        if pending.message is None:
            assert pending.event is not None
            pending.message = event_message(pending.event, 2)
        return pending.message

    # -- pipelined confirms --------------------------------------------------------
    def confirm_mark(self) -> int:
        """A number for "every critical publish and dead letter handed over so far"."""
        return self._tracker.seq

    def confirmed_mark(self) -> int:
        """The highest mark (see :meth:`confirm_mark`) whose publishes are all confirmed.

        Never blocks; nacked publishes are republished first, as wait_confirms does.
        """
        tracker = self._tracker
        if tracker.nacked and self._confirm is not None and self._lost is None:
            try:
                for pending in tracker.take_nacked():
                    self._send_pending(pending)
                    self._stats["republished"] += 1
            except BramaError:
                raise
            except RECOVERABLE_ERRORS as exc:
                self._lost = exc  # the next call reconnects (and republishes)
        return tracker.settled_through()

    def proven_mark(self) -> int:
        """Like :meth:`confirmed_mark`, but also the mark of the newest confirmed ping even
        while older publishes wait: the owner queue's leader took that ping from this
        channel, a round trip the lease can count although a stream electing a new leader
        holds the journal's confirms back (the lease only needs *when* the broker last
        answered, not that everything before it is safe)."""
        pings = self._pings
        for ping in pings:  # a few at most: one goes out per quarter lease
            if ping.done and ping.seq > self._pinged_through:
                self._pinged_through = ping.seq
        while pings and pings[0].done:
            pings.popleft()
        return max(self.confirmed_mark(), self._pinged_through)

    # -- consuming ---------------------------------------------------------------
    def fetch(
        self, max_messages: int, timeout: float, until: Callable[[], bool] | None = None
    ) -> list[Delivery]:
        """Wait up to ``timeout`` s for a delivery, then return what is buffered.

        ``until``: also stop waiting (returning what is buffered, maybe nothing) as soon
        as it returns True; checked while frames are processed, e.g. as confirms arrive.
        """
        if max_messages < 1:
            raise ValueError("max_messages must be >= 1")
        deadline = time.monotonic() + max(0.0, timeout)
        buffer = self._buffer
        if until is None:
            def ready() -> bool:
                return bool(buffer) or self._cancelled
        else:
            def ready() -> bool:
                return bool(buffer) or self._cancelled or until()

        def attempt() -> None:
            if self._cancelled:
                raise BrokerUnavailableError("consumer cancelled by the broker")
            if not buffer:
                self._drain_until(deadline, ready)
            if buffer:
                self._drain_nowait(lambda: len(buffer) >= max_messages)
            if self._cancelled and not buffer:
                raise BrokerUnavailableError("consumer cancelled by the broker")

        self._with_recovery(deadline, attempt, until)
        n = min(max_messages, len(buffer))
        epoch = self._epoch
        out = [to_delivery(buffer.popleft(), epoch) for _ in range(n)]
        self._stats["delivered"] += n
        return out

    def ack(self, delivery_tag: int, multiple: bool = True) -> None:
        """Ack up to ``delivery_tag``; tags from an earlier connection are ignored."""
        epoch, tag = decode_tag(delivery_tag)
        if epoch != self._epoch or self._consume is None or self._lost is not None:
            self._stats["stale_acks"] += 1
            return
        try:
            self._consume.basic_ack(tag, multiple=multiple)
        except RECOVERABLE_ERRORS as exc:
            if not recoverable(exc):
                raise
            # The ack is lost with the connection; the broker will redeliver.
            self._stats["stale_acks"] += 1
            self._recover(exc)

    # -- publishing --------------------------------------------------------------
    def publish(self, events: Sequence[Outgoing]) -> None:
        """Send events: transient at once, critical pipelined on the confirm channel.

        A critical event handed over here is never dropped by the link: if the broker
        stays away past ``reconnect_timeout`` the BrokerUnavailableError leaves the rest
        pending, and they go out when a later call reconnects. Transient ones are lost.
        """
        i, n = 0, len(events)
        exchange = self._t.topology.events_exchange
        tracker = self._tracker
        try:
            while i < n:
                self._ensure()
                self._handed = i
                try:
                    i = self._send_events(events, i, exchange)
                except BramaError:
                    raise
                except RECOVERABLE_ERRORS as exc:
                    # Critical events up to here are pending: the recovery republishes
                    # them. Transient ones that were in the failed write are lost.
                    i = self._handed
                    self._recover(exc)
        except BramaError:
            for ev in events[i:]:
                if ev.critical:
                    tracker.defer(tracker.new(exchange, ev.routing_key, event_message(ev, 2)))
                    self._stats["published"] += 1
            raise

    def _send_events(self, events: Sequence[Outgoing], i: int, exchange: str) -> int:
        """Publish ``events[i:]`` on the confirm channel, framed here and written in few
        writes; returns ``len(events)``. ``self._handed`` tracks how far they were handed
        over (registered as pending if critical), for the caller's recovery.

        Every event goes on the confirm channel, so one connection's events reach a queue
        in seq order; a transient one takes a tag nobody waits for.
        """
        conn = self._conn
        confirm = self._confirm
        tracker = self._tracker
        stats = self._stats
        batched = BATCHED_FRAMING
        channel_id = confirm.channel_id
        frame_max = conn.frame_max
        exchange_word = shortstr(exchange) or b""
        parts: list[bytes] = []
        size = 0
        n = len(events)
        for j in range(i, n):
            ev = events[j]
            critical = ev.critical
            framed = (
                frame_publish(parts, channel_id, exchange_word, ev, 2 if critical else 1,
                               critical, frame_max)
                if batched and exchange_word
                else 0
            )
            if not framed:  # py-amqp frames this one, after what is waiting
                if parts:
                    write_frames(conn, parts)
                    parts, size = [], 0
                if critical:
                    pending = tracker.new(exchange, ev.routing_key, event_message(ev, 2))
                    self._handed = j + 1
                    stats["published"] += 1
                    self._send_pending(pending)
                else:
                    tracker.next_tag += 1
                    self._handed = j + 1
                    stats["transient"] += 1
                    publish(confirm, event_message(ev, 1), exchange, ev.routing_key, False)
                continue
            if critical:
                pending = tracker.new(exchange, ev.routing_key, None)
                pending.event = ev
                tracker.register(pending)
                stats["published"] += 1
            else:
                tracker.next_tag += 1
                stats["transient"] += 1
            self._handed = j + 1
            size += framed
            if size >= WRITE_CHUNK:
                write_frames(conn, parts)
                parts, size = [], 0
        if parts:
            write_frames(conn, parts)
        return n

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Copy ``delivery`` to the dead exchange with ``x-brama-error``, confirmed."""
        headers = dict(delivery.headers)
        headers["x-brama-error"] = reason
        headers["x-brama-original-routing-key"] = delivery.routing_key
        props = {k: v for k, v in delivery.properties.items() if k not in NOT_COPIED}
        if delivery.content_type is not None:
            props["content_type"] = delivery.content_type
        if delivery.reply_to is not None:
            props["reply_to"] = delivery.reply_to
        if delivery.correlation_id is not None:
            props["correlation_id"] = delivery.correlation_id
        msg = Message(delivery.body, delivery_mode=2, application_headers=headers, **props)
        pending = self._tracker.new(self._t.topology.dead_exchange, delivery.routing_key, msg)
        self._stats["published"] += 1
        self._stats["dead_lettered"] += 1
        self._send_confirmed(pending)

    def append(self, stream: str, body: bytes) -> None:
        """Publish a journal or snapshot record to ``stream`` (default exchange),
        persistent and confirmed, on the confirm channel: in order with the events."""
        msg = Message(body, delivery_mode=2, content_type=JSON)
        pending = self._tracker.new("", stream, msg)
        self._stats["published"] += 1
        self._stats["appended"] += 1
        self._send_confirmed(pending)

    def _send_confirmed(self, pending: Pending) -> None:
        """Send a tracked publish now, or keep it for the reconnect that resends it."""
        try:
            self._ensure()
        except BramaError:
            self._tracker.defer(pending)  # sent when a later call reconnects
            raise
        try:
            self._send_pending(pending)
        except BramaError:
            raise
        except RECOVERABLE_ERRORS as exc:
            self._recover(exc)  # republishes it

    def ping(self, confirmed: bool = False) -> None:
        """An empty transient message with PING_HEADER to this link's own owner queue.

        ``confirmed``: on the confirm channel, tracked like a critical publish, so its
        confirm (the quorum queue took it: a majority of its nodes) is a broker round
        trip an owner can count on for its lease (:meth:`confirm_mark`)."""
        msg = Message(PING_BODY, delivery_mode=1, content_type=JSON,
                      application_headers={PING_HEADER: 1})
        topology = self._t.topology
        if confirmed:
            pending = self._tracker.new(topology.commands_exchange, self._owner_key, msg)
            self._pings.append(pending)
            self._send_confirmed(pending)
            return
        self._ensure()
        try:
            publish(self._plain, msg, topology.commands_exchange, self._owner_key, False)
        except BramaError:
            raise
        except RECOVERABLE_ERRORS as exc:
            self._recover(exc)

    def wait_confirms(self, timeout: float) -> int:
        """Block until every critical publish so far is confirmed; see OwnerLink."""
        deadline = time.monotonic() + max(0.0, timeout)
        tracker = self._tracker
        while True:
            self._ensure()
            try:
                for pending in tracker.take_nacked():
                    self._send_pending(pending)
                    self._stats["republished"] += 1
                if not tracker.outstanding():
                    break
                if time.monotonic() >= deadline:
                    raise ConfirmError(
                        f"{tracker.outstanding()} critical publishes not confirmed within "
                        f"{timeout} s ({self._t.masked_url}); they stay pending"
                    )
                self._drain_until(deadline, lambda: not tracker.unconfirmed or bool(tracker.nacked))
            except BramaError:
                raise
            except RECOVERABLE_ERRORS as exc:
                self._recover(exc)
        n, tracker.settled_since_wait = tracker.settled_since_wait, 0
        return n

    # -- RPC ---------------------------------------------------------------------
    def reply(self, reply_to: str, correlation_id: str | None, body: bytes) -> None:
        """Answer an RPC through direct reply-to (default exchange, key = reply_to)."""
        msg = Message(body, delivery_mode=1, content_type=JSON, correlation_id=correlation_id)
        for attempt in range(2):
            self._ensure()
            try:
                # Not basic_publish: its frame drain would bypass _drain_nowait.
                publish(self._plain, msg, "", reply_to, False)
                self._stats["replies"] += 1
                return
            except BramaError:
                raise
            except RECOVERABLE_ERRORS as exc:
                if attempt:
                    raise self._error(exc, "reply") from exc
                self._recover(exc)

    def stats(self) -> dict[str, int]:
        """Counters since the link was made (see the OwnerLink protocol)."""
        out = dict(self._stats)
        out["confirmed"] = self._tracker.confirmed
        out["nacked"] = self._tracker.nacks
        out["pending"] = self._tracker.outstanding()
        out["reconnects"] = self._counters["reconnects"]
        out["epoch"] = self._epoch
        return out
