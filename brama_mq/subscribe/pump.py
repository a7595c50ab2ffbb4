"""The one thread that drives an :class:`~brama_mq.transport.base.EventSource`.

An AMQP connection must be used from one thread, while subscriptions are iterated and
handlers run in others (and several subscriptions share one source). So a pump thread
owns the source: it waits for deliveries and passes them to a sink, and runs what other
threads ask of it (bind, unbind, dead-letter, depth) and their acks. Those threads call
``source.wake()`` so the pump does it now rather than when the next message comes.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Final, Generic, TypeVar

from brama_mq.errors import BramaError, TransportError
from brama_mq.transport.base import Delivery, EventSource

__all__ = ["Pump"]

log = logging.getLogger("brama_mq.subscribe")

T = TypeVar("T")

#: Longest a pump waits in one ``get``; wake() ends it early, so this only bounds how
#: long a stop request can go unnoticed if a wake-up were ever lost.
_IDLE_S: Final = 1.0
#: Pause after a failed ``get`` (the source already retried for its reconnect timeout).
_ERROR_PAUSE_S: Final = 1.0


class _Op(Generic[T]):
    """One request from another thread, answered by the pump."""

    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[EventSource], T]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


class Pump:
    """Drives ``source`` from a daemon thread; ``sink`` receives every batch of deliveries.

    ``ack_on_receipt``: ack each batch as soon as the sink took it (transient queues, whose
    messages die with the process anyway). Otherwise acks come from :meth:`ack_upto`, after
    the handler returned (durable queues: at-least-once).
    """

    def __init__(
        self,
        source: EventSource,
        sink: Callable[[list[Delivery]], None],
        *,
        name: str,
        ack_on_receipt: bool,
    ) -> None:
        self.source = source
        self._sink = sink
        self._ack_on_receipt = ack_on_receipt
        self._lock = threading.Lock()
        self._ops: deque[_Op[object]] = deque()
        self._ack_to = 0
        self._acked = 0
        self._stop = threading.Event()
        self._closed = False  # set once the loop took its last op: later calls fail at once
        self.errors = 0
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> Pump:
        self._thread.start()
        return self

    @property
    def name(self) -> str:
        return self._thread.name

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def in_pump(self) -> bool:
        """Whether the caller is the pump thread (e.g. a sink that closes a subscription)."""
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[[EventSource], T], timeout: float = 120.0) -> T:
        """Run ``fn(source)`` on the pump thread and return its result (or raise its error)."""
        if self.in_pump() or self._thread.ident is None:  # the pump, or not started yet
            return fn(self.source)
        op: _Op[T] = _Op(fn)
        with self._lock:
            if self._closed:
                raise TransportError("the subscription's connection is closed")
            self._ops.append(op)  # type: ignore[arg-type]
        self.source.wake()
        if not op.done.wait(timeout):
            raise TransportError(f"the subscription's connection did not answer in {timeout} s")
        if op.error is not None:
            raise op.error
        return op.result  # type: ignore[return-value]

    def ack_upto(self, tag: int, *, wake: bool) -> None:
        """Acknowledge every delivery up to ``tag`` (in the pump; ``wake``: right away)."""
        with self._lock:
            if tag <= self._ack_to:
                return
            self._ack_to = tag
        if wake:
            self.source.wake()

    def stop(self, timeout: float = 30.0) -> None:
        """Run what is queued, flush acks, close the source (unacked messages are requeued)."""
        self._stop.set()
        if self.in_pump():
            return  # the loop ends after this turn
        if self._thread.is_alive():
            self.source.wake()
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("%s did not stop within %.0f s", self._thread.name, timeout)
        elif not self._thread.ident:  # never started
            self.source.close()

    # -- the thread ---------------------------------------------------------------------
    def _run_ops(self) -> None:
        while True:
            with self._lock:
                if not self._ops:
                    return
                op = self._ops.popleft()
            try:
                op.result = op.fn(self.source)
            except BaseException as exc:  # handed to the caller, who raises it
                op.error = exc
            finally:
                op.done.set()

    def _flush_acks(self) -> None:
        with self._lock:
            tag = self._ack_to
        if tag > self._acked:
            self.source.ack(tag, multiple=True)
            self._acked = tag

    def _loop(self) -> None:
        source = self.source
        try:
            while True:
                self._run_ops()
                try:
                    self._flush_acks()
                except BramaError as exc:
                    self._failed(exc)
                if self._stop.is_set():
                    break
                try:
                    deliveries = source.get(_IDLE_S)
                except BramaError as exc:
                    if getattr(source, "_closed", False):  # its transport was closed under it
                        log.warning("%s: the event source was closed; stopping", self.name)
                        break
                    self._failed(exc)
                    self._stop.wait(_ERROR_PAUSE_S)
                    continue
                if not deliveries:
                    continue
                try:
                    self._sink(deliveries)
                except Exception:  # a bug must not stop every subscription on the source
                    log.exception("dispatching %d events failed", len(deliveries))
                if self._ack_on_receipt:
                    try:
                        source.ack(deliveries[-1].delivery_tag, multiple=True)
                    except BramaError as exc:
                        self._failed(exc)
        except Exception:
            log.exception("%s died", self._thread.name)
        finally:
            self._stop.set()
            try:
                self._run_ops()
                self._flush_acks()
            except Exception:
                log.debug("final acks failed", exc_info=True)
            with self._lock:
                self._closed = True
                left, self._ops = list(self._ops), deque()
            for op in left:
                op.error = TransportError("the subscription's connection is closed")
                op.done.set()
            try:
                source.close()
            except Exception:
                log.debug("closing the event source failed", exc_info=True)

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = str(exc)
        log.warning("%s: %s", self._thread.name, exc)
