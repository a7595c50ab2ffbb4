"""A subscription: typed events from one queue, iterated or handed to a handler.

Deliveries reach a subscription through its *inbox*, filled by the pump thread that owns
the connection (:mod:`.pump`); the subscription's consumer (an iterating thread, or the
thread of :meth:`Subscription.run` / :meth:`Subscription.start`) takes them from there, so
a slow handler never blocks the connection that other subscriptions share.

* **transient** subscriptions share one exclusive queue per process; the pump acks on
  receipt and the inbox keeps at most ``max_length`` events, dropping the oldest (counted).
* **named (durable)** subscriptions have a queue of their own; an event is acked only
  after its handler (or the body of the ``for`` loop) returned, a handler that raises is
  retried ``max_deliveries`` times and then dead-lettered with the error.

Both drop duplicates by ``(scope, connection, epoch, seq)`` within ``dedup_window`` events,
and events of an older epoch than one seen for their connection (a superseded owner's;
counted as ``stale_epoch``), see :mod:`brama_mq.core.ordering`.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Protocol, runtime_checkable

from brama_mq.errors import BramaError, ProtocolError
from brama_mq.protocol import Event
from brama_mq.subscribe.decode import fast_decode_event
from brama_mq.subscribe.pump import Pump
from brama_mq.subscribe.window import EpochBook, EventKey, SeenWindow, event_key
from brama_mq.transport.base import Delivery, EventSource, Transport

__all__ = ["BatchHandler", "EventHandler", "Handler", "Host", "Options", "Subscription"]

log = logging.getLogger("brama_mq.subscribe")

_MAX_RETRY_DELAY_S: Final = 5.0
#: A subscription that drops events says so in the log at most this often.
_DROP_WARNING_S: Final = 10.0
_JOIN_TIMEOUT_S: Final = 30.0
_ids = itertools.count(1)


@runtime_checkable
class EventHandler(Protocol):
    """A handler object: ``handle_event(event)`` is called once per event."""

    def handle_event(self, event: Event) -> object: ...


@runtime_checkable
class BatchHandler(Protocol):
    """A handler object for batched delivery: ``handle_batch(events)`` per batch."""

    def handle_batch(self, events: list[Event]) -> object: ...


#: A callable (given an Event, or a list of them when ``batch_size > 1``) or an object
#: with ``handle_event`` and/or ``handle_batch``.
Handler = Callable[[Any], object] | EventHandler | BatchHandler


class Host(Protocol):
    """What a subscription needs of the hub that made it (:class:`~brama_mq.subscribe.
    hub.Hub`): a protocol, so this module does not import the hub, which imports it."""

    @property
    def transport(self) -> Transport:
        """The transport of the subscription's queue (``delete()`` removes it there)."""
        ...

    @property
    def shared_pump(self) -> Pump | None:
        """The pump of the process's shared transient queue, if one runs."""
        ...

    def release(self, sub: Subscription, *, force: bool = False) -> None:
        """One ``close()`` of ``sub``; the last one (or a forced one) stops it."""
        ...


@dataclass(frozen=True, slots=True)
class Options:
    """Everything subscribe() was asked for except the filter (checked by subscribe())."""

    handler: Handler | None = None
    name: str | None = None
    batch_size: int = 1
    batch_timeout: float = 1.0
    prefetch: int = 100
    quorum: bool = False
    max_length: int = 10_000
    queue_length: int = 10_000
    max_deliveries: int = 5
    retry_delay: float = 0.1
    dedup_window: int = 10_000


class _Item:
    """One decoded event and the delivery it came in (tag 0: acked on receipt)."""

    __slots__ = ("delivery", "event", "tag")

    def __init__(self, event: Event, delivery: Delivery, tag: int) -> None:
        self.event = event
        self.delivery = delivery
        self.tag = tag


class _Batch:
    """Fresh events to hand out, and the highest tag taken (duplicates included)."""

    __slots__ = ("items", "keys", "tag")

    def __init__(self, items: list[_Item], keys: list[EventKey], tag: int) -> None:
        self.items = items
        self.keys = keys
        self.tag = tag

    @property
    def events(self) -> list[Event]:
        return [it.event for it in self.items]


class _Inbox:
    """Events passed from the pump to the consumer; beyond ``limit`` the oldest go."""

    def __init__(self, limit: int | None) -> None:
        self._cond = threading.Condition()
        self._items: deque[_Item] = deque()
        self._limit = limit
        self._wakers: list[Callable[[], object]] = []
        self._want = 1  # items the waiting consumer needs before waking is worth it
        self.received = 0
        self.dropped = 0
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    def add_waker(self, waker: Callable[[], object]) -> None:
        """Also call ``waker()`` (from the putting thread) on every put and on close."""
        with self._cond:
            self._wakers.append(waker)

    def _wake(self, wakers: list[Callable[[], object]]) -> None:
        for waker in wakers:
            try:
                waker()
            except Exception:  # e.g. the event loop of an async consumer is gone
                log.debug("waker failed", exc_info=True)

    def put(self, items: list[_Item]) -> None:
        with self._cond:
            if self.closed or not items:
                return
            self._items.extend(items)
            self.received += len(items)
            if self._limit is not None:
                over = len(self._items) - self._limit
                if over > 0:
                    for _ in range(over):
                        self._items.popleft()
                    self.dropped += over
            if len(self._items) >= self._want:
                self._cond.notify_all()
            wakers = self._wakers
        if wakers:
            self._wake(wakers)

    def take(self, n: int, timeout: float | None, *, fill: bool = False) -> list[_Item]:
        """Up to ``n`` items, waiting up to ``timeout`` s (None: forever) for the first
        (with ``fill``: for all ``n``, so a batch being filled is not woken per item);
        ``[]`` on timeout or once closed."""
        need = n if fill else 1
        with self._cond:
            if len(self._items) < need and not self.closed and (timeout is None or timeout > 0):
                end = None if timeout is None else time.monotonic() + timeout
                self._want = need
                try:
                    while len(self._items) < need and not self.closed:
                        if end is None:
                            self._cond.wait()
                            continue
                        remaining = end - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                finally:
                    self._want = 1
            if self.closed:
                return []
            items = self._items
            return [items.popleft() for _ in range(min(n, len(items)))]

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._items.clear()
            self._cond.notify_all()
            wakers = self._wakers
        self._wake(wakers)


class _Collector:
    """Builds one batch: fresh events up to ``size``, for ``timeout`` s after the first."""

    __slots__ = ("deadline", "items", "keys", "seen", "size", "sub", "tag", "taken", "timeout")

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        self.size = sub._options.batch_size
        self.timeout = sub._options.batch_timeout
        self.seen = sub._seen
        self.items: list[_Item] = []
        self.keys: list[EventKey] = []
        self.taken: set[EventKey] = set()
        self.tag = 0
        self.deadline: float | None = None

    @property
    def room(self) -> int:
        return self.size - len(self.items)

    def add(self, got: list[_Item]) -> None:
        seen, keys, taken, epochs = self.seen, self.keys, self.taken, self.sub._epochs
        for it in got:
            if it.tag > self.tag:
                self.tag = it.tag
            ev = it.event
            key = event_key(ev.scope, ev.connection, ev.epoch, ev.seq)
            if key in seen or key in taken:
                self.sub._counts["duplicates"] += 1
                continue
            if epochs.stale(ev.scope, ev.connection, ev.epoch):
                self.sub._counts["stale_epoch"] += 1
                continue
            keys.append(key)
            taken.add(key)
            self.items.append(it)
        if self.items and self.deadline is None:
            self.deadline = time.monotonic() + self.timeout
        elif not self.items and self.tag:
            self.sub._ack(self.tag, wake=False)  # only duplicates so far: settle them now

    def batch(self) -> _Batch | None:
        if not self.items:
            return None
        return _Batch(self.items, self.keys, self.tag)


class Subscription:
    """Events matching a filter, from this process's transient queue or a named queue.

    Iterate it (``for event in sub``), or give it a handler and call :meth:`run` (blocks)
    or :meth:`start` (background thread). ``with`` closes it. With ``batch_size > 1``
    iteration yields lists and the handler gets lists (``handle_batch``).

    Made by :func:`brama_mq.subscribe`; subscribing again with the same filter and the
    same handler (or, for a named subscription, the same name) in this process returns
    this same object, so each event reaches that handler once. Then :meth:`close` must
    be called once per subscribe() (or use :func:`brama_mq.unsubscribe`).
    """

    def __init__(self, hub: Host, keys: list[str], options: Options) -> None:
        self.id = next(_ids)
        self._hub = hub
        self._options = options
        self._keys = list(keys)
        self._seen = SeenWindow(options.dedup_window)
        self._epochs = EpochBook()
        self._inbox = _Inbox(None if options.name else options.max_length)
        self._pump: Pump | None = None  # named subscriptions: their own connection
        self._refs = 1
        self._closed = False
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = False
        self._pending: _Batch | None = None
        self._unacked = 0
        self.queue_dropped = 0  # losses seen as seq gaps on the shared queue (hub)
        self._dropped_told = 0
        self._told_at = 0.0
        self._counts: dict[str, int] = dict.fromkeys(
            ("handled", "duplicates", "stale_epoch", "errors", "retries", "dead_lettered", "failed",
             "invalid"),
            0,
        )
        self._call_one, self._call_many = _handler_calls(options.handler, options.batch_size)

    # ------------------------------------------------------------------ properties
    def __repr__(self) -> str:
        kind = f"name={self.name!r}" if self.name else "transient"
        return f"<Subscription {kind} bindings={self._keys!r}{' closed' if self.closed else ''}>"

    @property
    def name(self) -> str | None:
        """The named subscription's name; None for a transient one."""
        return self._options.name

    @property
    def durable(self) -> bool:
        return self._options.name is not None

    @property
    def bindings(self) -> list[str]:
        """The topic binding keys this subscription receives (unsubscribe() may shrink it)."""
        return list(self._keys)

    @property
    def queue(self) -> str:
        """The broker queue the events come from (shared by every transient subscription
        of the process; a server-named queue is renamed by a reconnect)."""
        pump = self._source_pump()
        return pump.source.queue if pump is not None else ""

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def dropped(self) -> int:
        """Events this subscription lost: pushed out of its full buffer by newer ones
        (exact), plus gaps in ``seq`` on the shared queue (its ``queue_length`` limit, a
        reconnect) for connections whose every event it is bound to. Gaps cannot show
        losses before the first event it saw of a connection, nor for a subscription
        filtered by event type: then this is a lower bound. Named subscriptions drop
        nothing."""
        return self._inbox.dropped + self.queue_dropped

    def stats(self) -> dict[str, int]:
        """Counters: received, handled, duplicates, stale_epoch (a superseded owner's events, see
        :mod:`brama_mq.core.ordering`), dropped (+ dropped_buffer, dropped_queue),
        errors, retries, dead_lettered, failed, invalid, buffered, and reconnects (of the
        connection it receives through, shared by a process's transient subscriptions)."""
        out = dict(self._counts)
        pump = self._source_pump()
        out.update(
            received=self._inbox.received,
            dropped=self.dropped,
            dropped_buffer=self._inbox.dropped,
            dropped_queue=self.queue_dropped,
            buffered=len(self._inbox),
            reconnects=pump.source.stats().get("reconnects", 0) if pump is not None else 0,
        )
        return out

    def queue_depth(self) -> int:
        """Messages waiting in the broker queue (one round trip; 0 once closed)."""
        pump = self._source_pump()
        if pump is None or self._closed:
            return 0
        return pump.call(lambda source: source.depth())

    def _source_pump(self) -> Pump | None:
        return self._pump if self._pump is not None else self._hub.shared_pump

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        out = self.receive(None)
        if out is None:
            raise StopIteration
        return out

    def receive(self, timeout: float | None = None) -> Any:
        """The next event (a list with ``batch_size > 1``), waiting up to ``timeout`` s
        (None: until one comes); None on timeout or once closed. Receiving settles the
        previous one (acks it, for a named subscription)."""
        self._settle_pending()
        batch = self._take_batch(timeout)
        if batch is None:
            return None
        self._pending = batch
        return self._shape(batch)

    def _shape(self, batch: _Batch) -> Any:
        if self._options.batch_size == 1:
            return batch.items[0].event
        return batch.events

    def _settle_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._finish(pending)

    def _take_batch(self, timeout: float | None) -> _Batch | None:
        col = _Collector(self)
        end = None if timeout is None else time.monotonic() + timeout
        inbox = self._inbox
        while col.room > 0:
            if col.deadline is not None:
                wait: float | None = col.deadline - time.monotonic()
            else:
                wait = None if end is None else end - time.monotonic()
            if wait is not None and wait <= 0:
                break
            got = inbox.take(col.room, wait, fill=bool(col.items))
            if got:
                col.add(got)
            elif inbox.closed:
                break
        return col.batch()

    # ------------------------------------------------------------------ settling
    def _ack(self, tag: int, *, wake: bool) -> None:
        if self._pump is not None and tag:
            self._pump.ack_upto(tag, wake=wake)

    def _finish(self, batch: _Batch, handled: bool = True) -> None:
        """The batch is done with: remember its keys (duplicates), ack it (named)."""
        for key in batch.keys:
            self._seen.add(key)
        if handled:
            self._counts["handled"] += len(batch.items)
        if self._pump is not None:
            # Wake the pump when the consumer ran dry (the prefetch window may be full) or
            # half a window is waiting; otherwise the ack rides along with the pump's next turn.
            self._unacked += len(batch.items)
            wake = len(self._inbox) == 0 or self._unacked * 2 >= self._options.prefetch
            if wake:
                self._unacked = 0
            self._ack(batch.tag, wake=wake)

    def _give_up(self, batch: _Batch, error: BaseException, attempts: int) -> None:
        """The handler failed ``attempts`` times: dead-letter (named) or drop, then settle."""
        where = f"subscription {self.name!r}" if self.name else "a transient subscription"
        reason = f"{type(error).__name__}: {error} (handler failed {attempts} times in {where})"
        if self._pump is not None:
            for it in batch.items:
                self._pump.call(_dead_letter_call(it.delivery, reason))
            self._counts["dead_lettered"] += len(batch.items)
            log.error("dead-lettered %d event(s): %s", len(batch.items), reason)
        else:
            self._counts["failed"] += len(batch.items)
            log.error("dropped %d event(s): %s", len(batch.items), reason)
        self._finish(batch, handled=False)

    # ------------------------------------------------------------------ handlers
    def _invoke(self, batch: _Batch) -> None:
        one, many = self._call_one, self._call_many
        if self._options.batch_size == 1 and one is not None:
            result = one(batch.items[0].event)
        elif many is not None:
            result = many(batch.events)
        else:
            assert one is not None
            for it in batch.items:
                _refuse_awaitable(one(it.event))
            return
        _refuse_awaitable(result)

    def _retry_delay(self, attempt: int) -> float:
        return float(min(self._options.retry_delay * 2 ** (attempt - 1), _MAX_RETRY_DELAY_S))

    def _handle(self, batch: _Batch) -> None:
        """Call the handler; retry with backoff; give up after ``max_deliveries`` tries."""
        attempt = 0
        while True:
            attempt += 1
            try:
                self._invoke(batch)
            except Exception as exc:
                self._counts["errors"] += 1
                if self._stopping.is_set():
                    return  # left unacked: a named queue delivers it again
                if attempt >= self._options.max_deliveries:
                    self._give_up(batch, exc, attempt)
                    return
                delay = self._retry_delay(attempt)
                log.warning("handler failed (attempt %d of %d), retrying in %.2f s: %r",
                            attempt, self._options.max_deliveries, delay, exc)
                self._counts["retries"] += 1
                if self._stopping.wait(delay):
                    return
                continue
            self._finish(batch)
            return

    def run(self) -> None:
        """Handle events in this thread until the subscription is closed (by another
        thread, a signal handler, or unsubscribe()). A transport error that would leave
        an event neither handled nor dead-lettered closes the subscription and is raised."""
        if self._options.handler is None:
            raise TypeError("run() needs a handler: subscribe(..., handler=...)")
        if self._running:
            raise RuntimeError("this subscription's handler loop is already running")
        self._running = True
        try:
            while not self._stopping.is_set():
                batch = self._take_batch(None)
                if batch is None:
                    if self._inbox.closed:
                        return
                    continue
                self._handle(batch)
        except BramaError:
            self._stopping.set()
            self._hub.release(self, force=True)
            raise
        finally:
            self._running = False

    def start(self) -> Subscription:
        """Run the handler loop in a daemon thread; returns the subscription."""
        if self._options.handler is None:
            raise TypeError("start() needs a handler: subscribe(..., handler=...)")
        if self._thread is None and not self._closed:
            label = self.name or f"transient-{self.id}"
            self._thread = threading.Thread(
                target=self._run_logged, name=f"brama-handler-{label}", daemon=True
            )
            self._thread.start()
        return self

    def _run_logged(self) -> None:
        try:
            self.run()
        except Exception:
            log.exception("%r stopped", self)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread of :meth:`start` to end (after close())."""
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Stop and clean up (once per subscribe() that returned this object).

        A transient subscription's bindings go (and with the last one the process's queue);
        a named one stops consuming here while its queue keeps collecting events for the
        next start (or the other processes of that name). An event being iterated is not
        acked by close(): it comes again (leave a ``with`` block normally to ack it)."""
        self._hub.release(self)

    def delete(self) -> None:
        """Close, and for a named subscription delete its queue and dead-letter queue."""
        self._hub.release(self, force=True)
        if self.name is not None:
            topo = self._hub.transport.topology
            self._hub.transport.delete_queues(
                [topo.subscription_queue(self.name), topo.subscription_dead_queue(self.name)]
            )

    def _shutdown(self) -> None:
        """Stop taking events and wait for the handler thread (called by the hub)."""
        self._closed = True
        self._stopping.set()
        self._inbox.close()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_TIMEOUT_S)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None and not self._closed:
            self._settle_pending()  # the loop body finished: that event counts as handled
        self._pending = None
        self.close()

    # ------------------------------------------------------------------ from the pump
    def _receive(self, items: list[_Item]) -> None:
        self._inbox.put(items)
        dropped = self.dropped
        if dropped != self._dropped_told:
            now = time.monotonic()
            if now - self._told_at >= _DROP_WARNING_S:
                log.warning(
                    "%r dropped %d event(s) so far (its consumer is slower than the events; "
                    "max_length=%d)", self, dropped, self._options.max_length,
                )
                self._dropped_told, self._told_at = dropped, now

    def _receive_deliveries(self, deliveries: list[Delivery]) -> None:
        """Sink of a named subscription's pump: decode; dead-letter what cannot be."""
        items: list[_Item] = []
        for d in deliveries:
            try:
                event = fast_decode_event(d.body, d.content_type)
            except ProtocolError as exc:
                self._counts["invalid"] += 1
                self._dead_letter_invalid(d, exc)
                continue
            items.append(_Item(event, d, d.delivery_tag))
        self._inbox.put(items)

    def _dead_letter_invalid(self, delivery: Delivery, exc: ProtocolError) -> None:
        assert self._pump is not None
        source = self._pump.source
        try:
            source.dead_letter(delivery, f"not a valid event: {exc}")
            # Acked alone, before any later ack: the consumer never sees this tag.
            source.ack(delivery.delivery_tag, multiple=False)
        except BramaError:
            log.exception("could not dead-letter an invalid event")


def _dead_letter_call(delivery: Delivery, reason: str) -> Callable[[EventSource], None]:
    def run(source: EventSource) -> None:
        source.dead_letter(delivery, reason)

    return run


def _refuse_awaitable(result: object) -> None:
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise TypeError("the handler returned an awaitable: use brama_mq.subscribe_async")


def _handler_calls(
    handler: Handler | None, batch_size: int
) -> tuple[Callable[[Event], object] | None, Callable[[list[Event]], object] | None]:
    """How to call ``handler``: ``(per event, per batch)``; None where it has no way."""
    if handler is None:
        return None, None
    one = getattr(handler, "handle_event", None)
    many = getattr(handler, "handle_batch", None)
    if one is not None or many is not None:
        if one is not None and not callable(one):
            raise TypeError("handler.handle_event must be callable")
        if many is not None and not callable(many):
            raise TypeError("handler.handle_batch must be callable")
        return one, many
    if not callable(handler):
        raise TypeError(
            "handler must be a callable or have handle_event(event) / handle_batch(events), "
            f"not {type(handler).__name__}"
        )
    if batch_size == 1:
        return handler, None
    return None, handler
