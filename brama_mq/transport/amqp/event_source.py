"""A subscriber's queue on the events exchange: bindings, deliveries read by the fast
frame reader, acks and dead letters, and a wake-up for the thread waiting in get()."""


import _socket
import contextlib
import functools
import logging
import select
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from amqp.basic_message import Message
from amqp.exceptions import MessageNacked, PreconditionFailed

from brama_mq.errors import (
    BramaError,
    BrokerUnavailableError,
    ConfirmError,
    TransportError,
)
from brama_mq.transport.amqp.endpoint import AmqpEndpoint
from brama_mq.transport.amqp.framing import (
    BASIC_DELIVER,
    OWN_DELIVER,
    DeliverAssembler,
    FrameReader,
    drain_frames,
    install_reader,
)
from brama_mq.transport.amqp.link import AmqpLink, ConsumerMixin, recoverable
from brama_mq.transport.amqp.messages import NOT_COPIED, OWN_FIELDS, as_bytes, to_delivery
from brama_mq.transport.amqp.waker import Waker
from brama_mq.transport.base import (
    Delivery,
    decode_tag,
    encode_tag,
)
from brama_mq.transport.errors import (
    RECOVERABLE_ERRORS,
    describe,
    is_fatal,
)
from brama_mq.transport.topology import (
    event_queue_arguments,
    kept_queue_warning,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")
#: kombu's Connection is only partly typed; it is used through ``Any`` like py-amqp's.


class AmqpEventSource(ConsumerMixin, AmqpLink):
    """A subscriber queue on the events exchange; bindings survive reconnects.

    :meth:`get` waits on the socket *and* on a wake-up socket pair, so another thread can
    end the wait (:meth:`wake`) when it needs the owning thread to ack or rebind now,
    instead of waiting for the next message or the end of a poll interval.
    """

    role = "event source"

    def __init__(
        self,
        transport: AmqpEndpoint,
        *,
        queue: str | None,
        durable: bool,
        max_length: int | None,
        prefetch: int,
        quorum: bool = False,
        dead_letter_queue: str | None = None,
        delivery_limit: int | None = None,
    ) -> None:
        if max_length is not None and max_length < 0:
            raise ValueError("max_length must be >= 0")
        if quorum and (not queue or not durable):
            raise ValueError("a quorum queue must be named and durable")
        self._wanted = queue or ""
        self._durable = durable
        self._max_length = max_length
        self._quorum = quorum
        self._dead_queue = dead_letter_queue
        self._delivery_limit = delivery_limit
        self._prefetch = prefetch
        self._keys: list[str] = []
        self._name = ""
        self._buffer = deque()
        self._cancelled = False
        self._channel: Any = None
        self._confirm: Any = None
        self._returned = False
        self._reader: FrameReader | None = None
        self._assembler = DeliverAssembler()
        self._consume_id = -1
        self._consumer_tag = ""
        self._stale_acks = 0
        self._counts = {"delivered": 0, "dead_lettered": 0}
        self._waker = Waker()
        try:
            super().__init__(transport)
        except BaseException:
            self._waker.close()
            raise

    @property
    def queue(self) -> str:
        """The queue name (a server-named queue gets a new name after a reconnect)."""
        return self._name

    def _arguments(self) -> dict[str, Any]:
        return event_queue_arguments(
            max_length=self._max_length,
            quorum=self._quorum,
            dead_letter_queue=self._dead_queue,
            delivery_limit=self._delivery_limit,
        )

    def _declare_subscription_dead_queue(self, conn: Any, ch: Any, name: str) -> Any:
        """Declare the bounded dead queue; one made unbounded by an earlier version is
        kept as it is (RabbitMQ refuses other arguments), with a warning saying how to
        bound it. Returns the channel to go on with (a refusal closes the channel)."""
        arguments = self._t.topology.subscription_dead_queue_arguments()
        try:
            ch.queue_declare(name, durable=True, auto_delete=False, arguments=arguments)
        except PreconditionFailed as exc:
            if name not in str(exc):
                raise
            log.warning("%s (%s)", kept_queue_warning(name, str(exc)),
                        describe(exc, self._t.url))
            if not ch.is_open:  # py-amqp reopens a channel the broker closed
                ch.open()
            ch.queue_declare(name, durable=True, auto_delete=False, passive=True)
        self._t.note("queue", name)
        return ch

    def _setup(self, conn: Any) -> None:
        # Only its own queues: the shared topology is checked passively (a subscriber's
        # permissions need not cover the owner's queues).
        ch = self._t.declare_shared(
            conn, [(self._t.topology.events_exchange, "topic")], [], owner_side=False
        )
        if self._dead_queue is not None:
            ch = self._declare_subscription_dead_queue(conn, ch, self._dead_queue)
        if self._wanted:
            try:
                ok = ch.queue_declare(
                    self._wanted,
                    durable=self._durable,
                    auto_delete=not self._durable,
                    arguments=self._arguments(),
                )
            except PreconditionFailed as exc:
                # A named subscription's queue an earlier version made (e.g. classic):
                # its events are there, so it is used as it is, with the way to migrate.
                if not self._durable or self._wanted not in str(exc):
                    raise
                log.warning("%s (%s)", kept_queue_warning(self._wanted, str(exc)),
                            describe(exc, self._t.url))
                if not ch.is_open:
                    ch.open()
                ok = ch.queue_declare(self._wanted, passive=True)
        else:
            ok = ch.queue_declare(
                "", exclusive=True, auto_delete=True, arguments=self._arguments()
            )
        self._name = ok.queue
        self._t.note("queue", self._name)
        for key in self._keys:
            ch.queue_bind(self._name, self._t.topology.events_exchange, key)
        ch.basic_qos(prefetch_size=0, prefetch_count=self._prefetch, a_global=False)
        self._buffer.clear()
        self._cancelled = False
        self._consumer_tag = ch.basic_consume(
            self._name, callback=self._on_delivery, on_cancel=self._on_cancel
        )
        self._channel = ch
        self._assembler.reset()
        # Only on a native socket: gevent's and eventlet's wait inside recv(MSG_DONTWAIT)
        # instead of failing with EAGAIN, which would stall this source's waits.
        native = isinstance(getattr(conn.transport, "sock", None), _socket.socket)
        self._reader = reader = install_reader(conn) if native else None
        if reader is not None and OWN_DELIVER:
            # Every read, py-amqp's own waits (bind-ok, confirms) included, passes the
            # consume channel's deliveries to _on_deliver_frame: none is half-read by both.
            self._consume_id = ch.channel_id
            conn.transport.read_frame = functools.partial(self._read_frame, reader, conn)
        else:
            self._consume_id = -1
        if self._dead_queue is not None:
            # Dead letters are rare: a confirm channel that waits for each one is enough.
            confirm = conn.channel()
            confirm.events["basic_return"].add(self._on_return)
            self._confirm = confirm

    def _on_lost(self) -> None:
        self._buffer.clear()
        self._channel = self._confirm = None
        self._reader = None
        self._assembler.reset()
        self._consume_id = -1

    def _on_return(self, exc: Any, exchange: str, routing_key: str, message: Any) -> None:
        self._returned = True

    def _retrying(self, what: str, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the current channel, reconnecting (and retrying) when it is lost."""
        while True:
            self._ensure()
            try:
                return fn()
            except BramaError:
                raise
            except RECOVERABLE_ERRORS as exc:
                if is_fatal(exc):
                    raise self._error(exc, what) from exc
                self._recover(exc)

    def bind(self, keys: Sequence[str]) -> None:
        """Bind the queue with each key (kept, and bound again after a reconnect)."""
        for key in keys:
            if key not in self._keys:
                self._keys.append(key)
        exchange = self._t.topology.events_exchange

        def run() -> None:
            for key in keys:
                self._channel.queue_bind(self._name, exchange, key)

        self._retrying("bind", run)

    def unbind(self, keys: Sequence[str]) -> None:
        """Remove those bindings (also from what a reconnect binds again)."""
        gone = set(keys)
        self._keys = [k for k in self._keys if k not in gone]
        exchange = self._t.topology.events_exchange

        def run() -> None:
            for key in keys:
                self._channel.queue_unbind(self._name, exchange, key)

        self._retrying("unbind", run)

    def wake(self) -> None:
        """End a get() waiting in another thread (thread-safe)."""
        self._waker.wake()

    def _drain_nowait(self, enough: Callable[[], bool]) -> None:
        """Process frames already received, without waiting, until ``enough()``.

        With a :class:`FrameReader` (plain TCP) frames are cut out of 64 KiB reads: py-amqp
        reads each frame with three ``recv`` calls (nine per event), which was most of a
        busy subscriber's CPU. Otherwise (SSL) the socket is made non-blocking once per
        drain instead of py-amqp switching its timeout around every frame. Heartbeat
        accounting is unchanged: py-amqp's frame handler counts received frames.
        """
        conn = self._conn
        reader = self._reader
        if reader is not None:
            drain_frames(conn, reader, enough, deliver_id=self._consume_id,
                          assembler=self._assembler, on_deliver=self._on_deliver_frame)
            return
        transport = conn.transport
        read_frame = transport.read_frame
        on_frame = conn.on_inbound_frame
        sock = transport.sock
        previous = sock.gettimeout()
        sock.settimeout(0)
        try:
            while not enough():
                try:
                    frame = read_frame()  # a partial frame is kept by py-amqp for next time
                except TimeoutError:
                    return
                on_frame(frame)
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(previous)

    def _read_frame(self, reader: FrameReader, conn: Any, *args: Any) -> tuple[int, int, bytes]:
        """``transport.read_frame`` of ``conn`` for py-amqp's own waits: the next frame
        that is not part of a delivery on the consume channel (those go to
        :meth:`_on_deliver_frame`). Bound to its connection's reader, so a late read on a
        replaced connection never touches the new one."""
        if reader is not self._reader:  # a dead connection being closed: plain frames
            return reader.read_frame(*args)
        while True:
            frame = reader.read_frame(*args)
            if frame[1] == self._consume_id and (
                self._assembler.busy or (frame[0] == 1 and frame[2].startswith(BASIC_DELIVER))
            ):
                conn.bytes_recv += 1
                self._on_deliver_frame(frame)
                continue
            return frame

    def _on_deliver_frame(self, frame: tuple[int, int, bytes]) -> None:
        """A frame of a basic.deliver on the consume channel, assembled into a Delivery
        with what py-amqp's frame handler, Channel and :func:`to_delivery` would make."""
        done = self._assembler.feed(frame)
        if done is None:
            return
        (consumer_tag, delivery_tag, redelivered, exchange, routing_key), props, body = done
        channel = self._channel
        if channel is None or channel.is_closing:
            return  # py-amqp ignores what arrives on a closing channel
        if consumer_tag != self._consumer_tag:  # as py-amqp: nobody consumes with that tag
            log.warning("rejecting delivery %s for unknown consumer %r", delivery_tag,
                        consumer_tag)
            channel.basic_reject(delivery_tag, requeue=True)
            return
        if "content_encoding" in props and channel.auto_decode:
            with contextlib.suppress(Exception):  # as py-amqp: keep the bytes if it fails
                body = as_bytes(body.decode(props["content_encoding"]))
        headers = props.get("application_headers")
        epoch = self._epoch
        self._buffer.append(Delivery(
            body=body,
            delivery_tag=encode_tag(epoch, delivery_tag),
            content_type=props.get("content_type"),
            headers=dict(headers) if headers else {},
            reply_to=props.get("reply_to"),
            correlation_id=props.get("correlation_id"),
            redelivered=redelivered,
            routing_key=routing_key,
            properties={k: v for k, v in props.items() if k not in OWN_FIELDS},
            epoch=epoch,
            exchange=exchange,
        ))

    def _wait(self, deadline: float, done: Callable[[], bool]) -> None:
        """Process frames until ``done()``, the deadline, or a wake()."""
        conn = self._conn
        wake = self._waker.socket
        while True:
            self._drain_nowait(done)  # frames already received
            if done():
                return
            self._tick()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                ready, _, _ = select.select(
                    [conn.sock, wake], [], [], min(remaining, self._max_wait)
                )
            except (OSError, ValueError, TypeError) as exc:  # socket closed under us
                raise BrokerUnavailableError(f"event source socket failed: {exc}") from exc
            if wake in ready:
                self._waker.clear()
                return

    def get(self, timeout: float) -> list[Delivery]:
        """Wait up to ``timeout`` s (or until wake()) for events; return every buffered one."""
        deadline = time.monotonic() + max(0.0, timeout)
        buffer = self._buffer

        def attempt() -> None:
            if self._cancelled:
                raise BrokerUnavailableError("consumer cancelled by the broker")
            if not buffer:
                self._wait(deadline, lambda: bool(buffer) or self._cancelled)
            if buffer:
                self._drain_nowait(lambda: len(buffer) >= self._prefetch)

        self._with_recovery(deadline, attempt)
        epoch = self._epoch
        # Deliveries assembled by _on_deliver_frame are ready; py-amqp's (SSL) are not.
        out = [m if type(m) is Delivery else to_delivery(m, epoch) for m in buffer]
        buffer.clear()
        self._counts["delivered"] += len(out)
        return out

    def ack(self, delivery_tag: int, multiple: bool = True) -> None:
        """Ack up to ``delivery_tag``; tags from an earlier connection are ignored."""
        epoch, tag = decode_tag(delivery_tag)
        if epoch != self._epoch or self._channel is None or self._lost is not None:
            self._stale_acks += 1
            return
        try:
            self._channel.basic_ack(tag, multiple=multiple)
        except RECOVERABLE_ERRORS as exc:
            if not recoverable(exc):
                raise
            self._recover(exc)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Copy ``delivery`` to the dead-letter queue with ``x-brama-error``, confirmed.

        Sent through the default exchange straight to the queue, ``mandatory`` so a
        deleted dead-letter queue is an error rather than silent loss. The caller acks.
        """
        dead = self._dead_queue
        if dead is None:
            raise TransportError(f"{self.role}: queue {self._name!r} has no dead-letter queue")
        headers = dict(delivery.headers)
        headers["x-brama-error"] = reason
        headers["x-brama-original-routing-key"] = delivery.routing_key
        headers["x-brama-original-queue"] = self._name
        props = {k: v for k, v in delivery.properties.items() if k not in NOT_COPIED}
        if delivery.content_type is not None:
            props["content_type"] = delivery.content_type
        msg = Message(delivery.body, delivery_mode=2, application_headers=headers, **props)

        def run() -> None:
            self._returned = False
            try:
                self._confirm.basic_publish_confirm(
                    msg, "", dead, mandatory=True, confirm_timeout=self._t.confirm_timeout
                )
            except MessageNacked as exc:
                raise ConfirmError(f"{self.role}: the broker refused the dead letter") from exc
            if self._returned:
                raise TransportError(f"{self.role}: dead-letter queue {dead!r} does not exist")

        self._retrying("dead-letter", run)
        self._counts["dead_lettered"] += 1

    def depth(self) -> int:
        """Messages ready in the queue (a passive declare: one round trip)."""
        return self._retrying(
            "depth",
            lambda: int(self._channel.queue_declare(self._name, passive=True).message_count),
        )

    def stats(self) -> dict[str, int]:
        """Delivered, dead-lettered, reconnects and ignored (stale) acks. No ``dropped``:
        RabbitMQ does not count what ``x-max-length`` removes."""
        return {
            "reconnects": self._counters["reconnects"],
            "stale_acks": self._stale_acks,
            **self._counts,
        }

    def close(self) -> None:
        """Close the connection (an exclusive queue goes with it) and the wake-up pair."""
        super().close()
        self._waker.close()
