"""The client's link to the owner: confirmed, paced command publishes and RPCs over
direct reply-to, with an I/O thread for heartbeats and confirms nobody waits for."""


import atexit
import contextlib
import itertools
import logging
import os
import select
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from amqp.basic_message import Message

from brama_mq.errors import (
    BrokerUnavailableError,
    ConfirmError,
    OutboxFullError,
    RequestTimeoutError,
    TransportError,
)
from brama_mq.transport.amqp.confirms import ConfirmTracker, Pending
from brama_mq.transport.amqp.endpoint import AmqpEndpoint
from brama_mq.transport.amqp.framing import (
    BATCHED_FRAMING,
    WRITE_CHUNK,
    FrameReader,
    drain_frames,
    frame_publish,
    install_reader,
    shortstr,
    write_frames,
)
from brama_mq.transport.amqp.link import AmqpLink, backoff
from brama_mq.transport.amqp.messages import DIRECT_REPLY_TO, as_bytes, publish
from brama_mq.transport.amqp.waker import Waker
from brama_mq.transport.base import (
    JSON,
    Outgoing,
)
from brama_mq.transport.errors import (
    RECOVERABLE_ERRORS,
    describe,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")
#: kombu's Connection is only partly typed; it is used through ``Any`` like py-amqp's.


class _RpcSlot:
    """One RPC in flight: sent on connection ``epoch`` (0: not yet), answered or returned."""

    __slots__ = ("body", "done", "epoch", "returned")

    def __init__(self) -> None:
        self.epoch = 0
        self.done = False
        self.returned = False
        self.body = b""


#: Commands a client link keeps while the broker has not confirmed them (see
#: :class:`AmqpClientLink`); ``BRAMA_CLIENT_BUFFER`` / ``Brama(buffer_size=...)``.
DEFAULT_CLIENT_BUFFER = 10_000
#: While nobody waits for a frame, a client link reads the confirms every this many
#: seconds instead of waking up for each (one wake-up per command, at 500 commands/s,
#: was most of a client's CPU per command here).
_IDLE_DRAIN = 0.1
#: Seconds between two log lines about commands the broker returned as unroutable.
_RETURN_LOG_INTERVAL = 10.0


class AmqpClientLink(AmqpLink):
    """Commands and RPC for clients; safe to share between threads.

    **Reading.** A caller waiting for a confirm or a reply reads the socket itself when
    nobody else does (leader/followers, see :meth:`_wait_for`); the others sleep on one
    Condition. **One I/O thread per link** reads confirms nobody waits for every
    ``_IDLE_DRAIN`` s (not one wake-up per confirm), keeps heartbeats going and, when the
    connection is lost, reconnects with backoff (capped at the transport's
    ``max_backoff``) for as long as the link is open, then republishes every unconfirmed
    command in order. Callers write under the lock: a command is framed here (no py-amqp
    ``Message``, no per-publish read of incoming frames) and written at once.

    **Buffer.** Every command stays in the link until the broker confirmed it: sent and
    unconfirmed, or waiting for the broker to come back. :meth:`post` returns once the
    command is written (``confirm=True``: once confirmed while connected) or, while the
    broker is away, buffered; when ``max_buffer`` commands already wait it raises
    :class:`~brama_mq.errors.OutboxFullError` and keeps nothing (while connected it waits
    for confirms instead): a command is never dropped without the caller hearing of it.
    :meth:`send` / :meth:`send_many` post and wait for the confirms; :meth:`flush` waits
    for everything posted so far.

    RPC requests go out on the same channel as commands (it consumes the direct
    reply-to pseudo-queue), so a query sent after a command reaches the owner after it.
    """

    role = "client link"

    def __init__(self, transport: AmqpEndpoint, *, max_buffer: int | None = None) -> None:
        self._lock = threading.Lock()  # not re-entrant: _wait_for releases it to select
        self._cond = threading.Condition(self._lock)
        self._tracker = ConfirmTracker()
        self._by_id: dict[str, Pending] = {}
        self._rpc: dict[str, _RpcSlot] = {}
        self._confirm: Any = None
        self._reader: FrameReader | None = None
        self._reading = False  # a waiting caller is reading the socket (see _wait_for)
        self._exchange = transport.topology.commands_exchange
        self._exchange_word = shortstr(self._exchange) or b""
        self.max_buffer = DEFAULT_CLIENT_BUFFER if max_buffer is None else max_buffer
        self._ids = itertools.count(1)
        self._id_prefix = uuid.uuid4().hex[:16] + "-"
        self._last_return_log = 0.0
        self._stats = {"sent": 0, "requests": 0, "republished": 0, "returned": 0, "refused": 0}
        self._stop = threading.Event()
        self.pid = os.getpid()
        self._waker = Waker()
        try:
            with self._lock:
                super().__init__(transport)
        except BaseException:
            self._waker.close()
            raise
        self._io = threading.Thread(target=self._io_loop, name="brama-client-io", daemon=True)
        self._io.start()
        _CLIENT_LINKS.add(self)

    def _setup(self, conn: Any) -> None:
        topo = self._t.topology
        # Checked passively (plus the shard record), so a reporting service needs no
        # configure permission on the owner's queues once an owner has declared them.
        confirm = self._t.declare_shared(
            conn, [(topo.commands_exchange, "direct")],
            [q for q, _ in topo.owner_queues()], record=True,
        )
        confirm.confirm_select()
        confirm.events["basic_ack"].add(self._on_ack)
        confirm.events["basic_nack"].add(self._tracker.on_nack)
        confirm.events["basic_return"].add(self._on_return)
        confirm.basic_consume(DIRECT_REPLY_TO, no_ack=True, callback=self._on_reply)
        self._confirm = confirm
        # The buffered reader reads with MSG_DONTWAIT, which a cooperative socket (gevent's
        # monkey-patching) turns into a wait: there, py-amqp reads as before.
        sock = getattr(getattr(conn, "transport", None), "sock", None)
        native = type(sock).__module__ == "socket"
        self._reader = install_reader(conn) if native else None
        again = self._tracker.restart()
        if again:
            self._write(again)
            self._stats["republished"] += len(again)

    def _on_lost(self) -> None:
        self._confirm = None
        self._reader = None

    def _drain_nowait(self, enough: Callable[[], bool]) -> None:
        """Process frames already received, without waiting: through the buffered
        reader (as the owner link), confirms of the command channel handled here
        without py-amqp's dispatch, every other frame by py-amqp, in order."""
        reader = self._reader
        if reader is None:
            super()._drain_nowait(enough)
            return
        drain_frames(self._conn, reader, enough, confirm=self._confirm, on_ack=self._on_ack)

    # -- callbacks (run inside drain_events, with the lock held) -----------------
    def _on_ack(self, tag: int, multiple: bool) -> None:
        tracker = self._tracker
        by_id = self._by_id
        for p in tracker._settle(tag, multiple):
            p.done = True
            tracker.confirmed += 1
            if p.event is not None:
                by_id.pop(p.event.message_id, None)

    def _on_return(self, exc: Any, exchange: str, routing_key: str, message: Any) -> None:
        props = message.properties
        slot = self._rpc.get(props.get("correlation_id") or "")
        if slot is not None:
            slot.returned = True
            return
        self._stats["returned"] += 1
        pending = self._by_id.get(props.get("message_id") or "")
        if pending is not None:
            pending.returned = True
        now = time.monotonic()
        if now - self._last_return_log >= _RETURN_LOG_INTERVAL:
            self._last_return_log = now
            log.warning(
                "client link: a command to %r was returned unroutable: nothing is bound to "
                "it on %r (%d returned so far)", routing_key, exchange, self._stats["returned"]
            )

    def _on_reply(self, msg: Any) -> None:
        slot = self._rpc.get(msg.properties.get("correlation_id", ""))
        if slot is not None:  # late replies to requests that timed out are dropped
            slot.body = as_bytes(msg.body)
            slot.done = True

    # -- the I/O thread ---------------------------------------------------------------
    def _connected(self) -> bool:
        return self._conn is not None and self._lost is None and self._confirm is not None

    def _io_loop(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                with self._lock:
                    conn = self._conn if self._connected() else None
                if conn is None:
                    if self._reconnect():
                        attempt = 0
                    else:
                        attempt += 1
                        self._stop.wait(backoff(attempt - 1, self._t.max_backoff))
                    continue
                # Confirms nobody waits for are read in bulk every _IDLE_DRAIN s rather
                # than one wake-up each (with nothing unconfirmed: only for heartbeats);
                # a caller waiting for a frame reads the socket itself (see _wait_for),
                # so this thread never competes with it.
                idle = self._max_wait if not self._tracker.outstanding() else _IDLE_DRAIN
                try:
                    readable, _, _ = select.select(
                        [self._waker.socket], [], [], min(self._max_wait, idle)
                    )
                except (OSError, ValueError):
                    readable = []
                if readable:
                    self._waker.clear()
                with self._lock:
                    if self._closed or self._conn is not conn or self._lost is not None:
                        continue
                    try:
                        if not self._reading:
                            self._drain_nowait(lambda: False)
                            self._republish_nacked()
                        self._tick()
                    except RECOVERABLE_ERRORS as exc:
                        self._mark_lost(exc)
                    self._cond.notify_all()
            except Exception:  # the I/O thread must outlive any surprise
                log.exception("client link: I/O thread error; reconnecting")
                with self._lock:
                    self._mark_lost(BrokerUnavailableError("I/O thread error"))
                self._stop.wait(0.5)

    def _mark_lost(self, exc: BaseException) -> None:
        """Forget a dead connection (lock held); the I/O thread reconnects."""
        if self._conn is None and self._lost is not None:
            return
        if not self._closed:
            log.warning("%s lost its connection to %s (%s); reconnecting (%d commands kept)",
                        self.role, self._connector.host, describe(exc, self._t.url),
                        self._tracker.outstanding())
            self._counters["reconnects"] += 1
        self._connector.drop()
        self._connector.switch_next()
        self._conn = None
        self._lost = exc
        self._on_lost()
        self._cond.notify_all()

    def _reconnect(self) -> bool:
        """One attempt: connect without the lock (callers keep buffering meanwhile), then
        set up and republish under it. False when the broker is still away."""
        try:
            conn = self._connector.connect()
        except RECOVERABLE_ERRORS as exc:
            self._connector.drop()
            with self._lock:
                self._lost = exc
            log.warning("%s cannot reach %s (%s); %d commands waiting", self.role,
                        self._t.masked_url, describe(exc, self._t.url),
                        self._tracker.outstanding())
            return False
        with self._lock:
            if self._closed:
                return True
            try:
                self._conn = conn
                self._epoch += 1
                self._setup(conn)
                self._lost = None
            except RECOVERABLE_ERRORS as exc:
                self._connector.drop()
                self._conn = None
                self._lost = exc
                self._on_lost()
                return False
            self._cond.notify_all()
        log.info("%s connected to %s (epoch %d)", self.role, self._connector.host, self._epoch)
        return True

    def _wake_io(self) -> None:
        self._waker.wake()

    # -- writing (lock held) -------------------------------------------------------
    def _new_pending(self, body: bytes, routing_key: str, message_id: str | None) -> Pending:
        mid = message_id or f"{self._id_prefix}{next(self._ids):x}"
        pending = self._tracker.new(self._exchange, routing_key, None)
        pending.event = Outgoing(routing_key, body, True, mid)
        self._by_id[mid] = pending
        return pending

    @staticmethod
    def _message(pending: Pending) -> Any:
        if pending.message is None:
            assert pending.event is not None
            ev = pending.event
            pending.message = Message(ev.body, delivery_mode=2, content_type=JSON,
                                      message_id=ev.message_id)
        return pending.message

    def _write(self, pendings: Sequence[Pending]) -> None:
        """Frame and write publishes on the confirm channel, each registered first (so a
        failed write is republished by the reconnect)."""
        conn = self._conn
        confirm = self._confirm
        tracker = self._tracker
        channel_id = confirm.channel_id
        frame_max = conn.frame_max
        word = self._exchange_word
        parts: list[bytes] = []
        size = 0
        for p in pendings:
            tracker.register(p)
            framed = (
                frame_publish(parts, channel_id, word, p.event, 2, True, frame_max)
                if BATCHED_FRAMING and word and p.event is not None
                else 0
            )
            if not framed:
                if parts:
                    write_frames(conn, parts)
                    parts, size = [], 0
                publish(confirm, self._message(p), p.exchange, p.routing_key, True)
                continue
            size += framed
            if size >= WRITE_CHUNK:
                write_frames(conn, parts)
                parts, size = [], 0
        if parts:
            write_frames(conn, parts)

    def _post(self, messages: Sequence[tuple[bytes, str, str | None]]) -> list[Pending]:
        """Hand commands over (lock held): written now if connected, else kept for the
        reconnect. OutboxFullError, with nothing kept, if they do not fit the buffer."""
        if self._closed:
            raise TransportError("client link is closed")
        tracker = self._tracker
        waiting = tracker.outstanding()
        if waiting + len(messages) > self.max_buffer // 2 and self._connected():
            # Confirms may be waiting unread (see _io_loop): read them now; when the
            # buffer is full while connected, wait for confirms (backpressure) rather
            # than refuse at once.
            if not self._reading:
                try:
                    self._drain_nowait(lambda: False)
                except RECOVERABLE_ERRORS as exc:
                    self._mark_lost(exc)
                    self._wake_io()
            if tracker.outstanding() + len(messages) > self.max_buffer:
                room = self.max_buffer - len(messages)
                self._wait_for(
                    time.monotonic() + self._t.confirm_timeout,
                    lambda: tracker.outstanding() <= room or not self._connected(),
                )
            waiting = tracker.outstanding()
        if waiting + len(messages) > self.max_buffer:
            self._stats["refused"] += len(messages)
            state = "connected" if self._connected() else "the broker is away"
            raise OutboxFullError(
                f"client buffer full: {waiting} commands wait for the broker's confirm "
                f"({state}; {self._t.masked_url}); buffer size {self.max_buffer} "
                f"(BRAMA_CLIENT_BUFFER); {len(messages)} not sent"
            )
        batch = [self._new_pending(body, key, mid) for body, key, mid in messages]
        self._stats["sent"] += len(batch)
        if self._connected():
            try:
                self._write(batch)
            except RECOVERABLE_ERRORS as exc:
                self._mark_lost(exc)  # registered: the reconnect republishes them
                self._wake_io()
        else:
            for p in batch:
                tracker.defer(p)
        return batch

    def _republish_nacked(self) -> None:
        nacked = self._tracker.take_nacked()
        if nacked:
            self._write(nacked)
            self._stats["republished"] += len(nacked)

    def _forget_pending(self, pending: Pending) -> None:
        if pending.event is not None:
            self._by_id.pop(pending.event.message_id, None)
        if not pending.done:  # given up: stop tracking it (no republish later)
            tracker = self._tracker
            for tag, p in list(tracker.unconfirmed.items()):
                if p is pending:
                    del tracker.unconfirmed[tag]
            tracker.nacked = [p for p in tracker.nacked if p is not pending]

    def _wait_for(self, deadline: float, done: Callable[[], bool]) -> None:
        """Wait (lock held; released while waiting) until ``done()`` or the deadline.

        Leader and followers: one waiting caller at a time reads the socket itself
        (select without the lock, then drain under it) and wakes the others when
        something arrived; the rest wait on the condition. So a confirm or a reply costs
        the caller one wake-up, no hand-off through another thread, and waiting threads
        do not all wake for every frame. While the broker is away everyone waits for the
        I/O thread's reconnect.
        """
        cond = self._cond
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self._reading or not self._connected():
                cond.wait(remaining)
                continue
            conn = self._conn
            sock = conn.sock
            self._reading = True
            self._lock.release()
            try:
                with contextlib.suppress(OSError, ValueError, TypeError):
                    select.select([sock], [], [], min(remaining, self._max_wait))
            finally:
                self._lock.acquire()
                self._reading = False
            if self._conn is conn and self._lost is None and not self._closed:
                try:
                    self._drain_nowait(lambda: False)
                    self._republish_nacked()
                except RECOVERABLE_ERRORS as exc:
                    self._mark_lost(exc)
                    self._wake_io()
            cond.notify_all()

    def _unconfirmed_error(self, missing: int, total: int) -> TransportError:
        if not self._connected():
            cause = self._lost
            detail = f" ({describe(cause, self._t.url)})" if cause is not None else ""
            return BrokerUnavailableError(
                f"{missing} of {total} commands not confirmed within "
                f"{self._t.confirm_timeout} s: the broker is away{detail} "
                f"({self._t.masked_url})"
            )
        return ConfirmError(
            f"{missing} of {total} commands not confirmed within {self._t.confirm_timeout} s "
            f"({self._t.masked_url})"
        )

    # -- API ----------------------------------------------------------------------
    def post(
        self,
        body: bytes,
        routing_key: str = "owner",
        *,
        message_id: str | None = None,
        confirm: bool = False,
    ) -> bool:
        """Publish a persistent command; it stays in the link's buffer until confirmed,
        through reconnects (republished in order). OutboxFullError when ``max_buffer``
        commands already wait.

        ``confirm=False``: return at once. ``confirm=True``: while connected, wait for
        the broker's confirm (so a busy client is paced by the broker, as with
        :meth:`send`) and return True; while the broker is away (or if the connection
        drops during the wait) return False at once, the command buffered. ConfirmError
        (the command given up) if a connected broker does not confirm it within
        ``confirm_timeout``; TransportError if it was returned unroutable.
        """
        deadline = time.monotonic() + self._t.confirm_timeout
        with self._lock:
            (pending,) = self._post([(body, routing_key, message_id)])
            if not confirm or not self._connected():
                return False
            self._wait_for(deadline, lambda: pending.done or not self._connected())
            if pending.done:
                if pending.returned:
                    raise TransportError(
                        f"command unroutable: nothing bound to {routing_key!r} on "
                        f"{self._exchange!r}"
                    )
                return True
            if not self._connected():
                return False
            self._forget_pending(pending)
            raise self._unconfirmed_error(1, 1)

    def post_many(self, messages: Sequence[tuple[bytes, str]]) -> None:
        """:meth:`post` for several commands ``(body, routing_key)``, written together;
        all or none: OutboxFullError keeps none of them."""
        if messages:
            with self._lock:
                self._post([(body, key, None) for body, key in messages])

    def send(self, body: bytes, routing_key: str = "owner", *, message_id: str | None = None
             ) -> None:
        """Publish a persistent command and return once the broker confirmed it.

        ConfirmError if it is not confirmed within the transport's ``confirm_timeout``
        (BrokerUnavailableError if the broker is away then; the command is given up);
        TransportError if nothing is bound to ``routing_key`` (the broker returned it);
        OutboxFullError if the buffer is full.
        """
        self._send_confirmed([(body, routing_key, message_id)])

    def send_many(self, messages: Sequence[tuple[bytes, str]]) -> None:
        """Publish persistent commands ``(body, routing_key)`` pipelined, in order, and
        return once the broker confirmed every one (one wait for the whole batch).

        Errors as :meth:`send`. After an error some of them may have been confirmed
        already: a caller that sends the batch again delivers those twice (at least once).
        """
        if messages:
            self._send_confirmed([(body, key, None) for body, key in messages])

    def _send_confirmed(self, messages: Sequence[tuple[bytes, str, str | None]]) -> None:
        deadline = time.monotonic() + self._t.confirm_timeout
        with self._lock:
            batch = self._post(messages)
            try:
                self._wait_for(deadline, lambda: all(p.done for p in batch))
            finally:
                for p in batch:
                    self._forget_pending(p)
            settled = sum(1 for p in batch if p.done)
            returned = [p.routing_key for p in batch if p.returned]
            if returned:
                raise TransportError(
                    f"{len(returned)} command(s) unroutable: nothing bound to "
                    f"{returned[0]!r} on {self._exchange!r}"
                )
            if settled < len(batch):
                raise self._unconfirmed_error(len(batch) - settled, len(batch))

    def pending(self) -> int:
        """Commands handed over and not yet confirmed by the broker."""
        with self._lock:
            return self._tracker.outstanding()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every command posted so far is confirmed; False on timeout."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            mark = self._tracker.seq
            self._wait_for(deadline, lambda: self._tracker.settled_through() >= mark)
            return self._tracker.settled_through() >= mark

    def request(self, body: bytes, timeout: float, routing_key: str = "owner") -> bytes:
        """RPC over direct reply-to; RequestTimeoutError when no answer arrives in time
        (BrokerUnavailableError when the broker was away all along).

        The request goes out on the commands' channel, after every command posted
        before it. One in flight when the connection drops is sent again on the new one
        (queries are idempotent; a duplicate probe lease times out).
        """
        corr = uuid.uuid4().hex
        deadline = time.monotonic() + max(0.0, timeout)
        exchange = self._exchange
        msg = Message(
            body,
            delivery_mode=1,
            content_type=JSON,
            correlation_id=corr,
            reply_to=DIRECT_REPLY_TO,
            application_headers={"x-brama-deadline": int(time.time() * 1000 + timeout * 1000)},
        )
        slot = _RpcSlot()
        with self._lock:
            if self._closed:
                raise TransportError("client link is closed")
            self._rpc[corr] = slot
            self._stats["requests"] += 1
            try:
                while not (slot.done or slot.returned):
                    if slot.epoch != self._epoch and self._connected():
                        slot.epoch = self._epoch
                        try:
                            self._tracker.next_tag += 1  # a tag of the channel nobody waits for
                            publish(self._confirm, msg, exchange, routing_key, True)
                        except RECOVERABLE_ERRORS as exc:
                            self._mark_lost(exc)
                            self._wake_io()
                            continue
                    if time.monotonic() >= deadline:
                        break
                    self._wait_for(
                        deadline,
                        lambda: slot.done
                        or slot.returned
                        or (slot.epoch != self._epoch and self._connected()),
                    )
            finally:
                self._rpc.pop(corr, None)
            if slot.done:
                return slot.body
            if slot.returned:
                raise TransportError(
                    f"request unroutable: nothing bound to {routing_key!r} on {exchange!r}"
                )
            if slot.epoch == 0 and not self._connected():
                raise self._error(self._lost or OSError("not connected"),
                                  f"request (no connection within {timeout} s)")
        raise RequestTimeoutError(
            f"no answer on {routing_key!r} within {timeout} s (is an owner running?)"
        )

    def stats(self) -> dict[str, int]:
        """Counters: sent, requests, republished, returned, refused (buffer full),
        confirmed, nacked, reconnects, pending."""
        with self._lock:
            out = dict(self._stats)
            out["confirmed"] = self._tracker.confirmed
            out["nacked"] = self._tracker.nacks
            out["reconnects"] = self._counters["reconnects"]
            out["pending"] = self._tracker.outstanding()
            return out

    def close(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` s for unconfirmed commands (when connected), then stop
        the I/O thread and close the connection. Commands still unconfirmed are logged."""
        if self._closed:
            return
        if self.pid != os.getpid():  # the parent's link, inherited by fork: not ours
            self._closed = True
            return
        with self._lock:
            connected = self._connected()
        if connected and not self.flush(timeout):
            log.warning("%s closed with %d commands unconfirmed", self.role, self.pending())
        elif not connected and self.pending():
            log.warning("%s closed while the broker is away: %d commands not sent",
                        self.role, self.pending())
        self._stop.set()
        self._wake_io()
        io = self._io
        if io is not threading.current_thread():
            io.join(timeout=max(1.0, self._t.connect_timeout + 1))
        with self._lock:
            self._cond.notify_all()
            super().close()
        self._waker.close()

_CLIENT_LINKS: weakref.WeakSet[AmqpClientLink] = weakref.WeakSet()


def _flush_client_links(timeout: float = 5.0) -> None:
    """At exit: give posted commands up to ``timeout`` s to be confirmed."""
    pid = os.getpid()
    for link in list(_CLIENT_LINKS):
        if link.pid == pid and not link._closed and link.pending() and not link.flush(timeout):
            log.warning("client link (pid %d): %d commands not confirmed before exit",
                        pid, link.pending())


atexit.register(_flush_client_links)
