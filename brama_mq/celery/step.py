"""Receive brama_mq events inside a Celery worker: a consumer bootstep.

::

    from brama_mq.celery import install

    def on_open(event):
        notify_ops(f"{event.connection} opened: {event.data.get('reason')}")

    install(app, handler=on_open, events="circuit_opened", scope="payments")

:func:`install` checks its arguments at once (a misspelt event name raises
:class:`~brama_mq.errors.FilterError` here, not when a worker starts) and adds a
``celery.bootsteps.StartStopStep`` to ``app.steps["consumer"]``; it returns that step
class. Every worker of the app then, once connected to its own broker, opens
:func:`brama_mq.subscribe` with the filter, on the broker and prefix of the app's
settings (:func:`~brama_mq.celery.runtime.app_settings`: ``brama_broker_url``, default
the Celery broker with its TLS options; ``brama_prefix``, default ``BRAMA_PREFIX``, else
``brama``; ``brama_shards``; ``brama_tls_*``; ``brama_client`` to use a ready client's
transport instead).

* **Where the handler runs:** in the worker's main process (the prefork pool's parent,
  never a pool child; the only process of solo, threads and gevent workers), in the
  subscription's daemon thread ``brama-handler-<name or transient-N>``, one event (or
  batch) at a time. It does not hold up the worker's event loop; long work belongs in a
  task (``some_task.delay(...)`` from the handler).
* **No name:** a transient subscription (an exclusive queue of the process): each
  worker gets every event; the queue goes with the worker. A handler that raises is
  retried ``max_deliveries`` times, then the event is dropped (logged, counted).
* **name=...:** the durable queue ``{prefix}.sub.<name>`` shared by every worker that
  installs the same name: each event is handled by one of them, acked once the handler
  returned; a handler that raises is retried ``max_deliveries`` times, then the event is
  dead-lettered to ``{prefix}.sub.<name>.dead`` with the error. The queue outlives the
  workers (events wait there while none runs).
* **Lifetime:** opened by the step's ``start`` (after Celery's broker connection; with or
  without mingle, gossip and heart), kept across Celery's own consumer restarts (the
  subscription reconnects by itself), closed by the worker's shutdown (warm or cold),
  waiting for a running handler. If opening fails when the worker starts, the worker
  does not start; a failure to reopen after a consumer restart is logged.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
from typing import Any, Final, cast

from celery import bootsteps

from brama_mq.celery.runtime import app_settings
from brama_mq.settings import MEMORY_URL
from brama_mq.subscribe import Handler, Subscription, _options, subscribe
from brama_mq.subscribe.filters import FilterValues, filter_keys
from brama_mq.subscribe.subscription import _handler_calls
from brama_mq.transport import Transport, transport_for

__all__ = ["EventsStep", "install"]

log = logging.getLogger("brama_mq.celery")

_numbers = itertools.count(1)
_LABEL_CHARS: Final = re.compile(r"[^A-Za-z0-9_]")


class EventsStep(bootsteps.StartStopStep):  # type: ignore[misc]  # celery is untyped
    """The consumer step :func:`install` makes a subclass of (see the module doc).

    ``subscription`` is the open :class:`~brama_mq.subscribe.Subscription` of this
    worker (None before ``start`` and after shutdown).
    """

    label = "brama events"
    requires = ("celery.worker.consumer.connection:Connection",)
    #: subscribe() arguments, set by install() on the subclass.
    brama_subscribe: dict[str, Any] = {}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.subscription: Subscription | None = None
        self._transport: Transport | None = None
        self._owns_transport = False
        self._pid = os.getpid()
        self._started = False
        self._lock = threading.Lock()

    # -------------------------------------------------------------- Celery's calls
    def start(self, parent: Any) -> None:
        """Open the subscription, unless it is open (a consumer restart keeps it)."""
        with self._lock:
            sub = self.subscription
            if sub is not None and not sub.closed:
                return
            self._close_locked()  # one that died (its transport gave up): replace it
            try:
                self._open(parent.app)
            except Exception:
                if not self._started:
                    raise  # the worker's first start: fail it, loudly
                log.exception("%s: could not reopen the subscription; next try at the "
                              "next consumer restart", self.label)
                return
            self._started = True

    def stop(self, parent: Any) -> None:
        """Close, unless this is a consumer restart (Celery's broker connection was lost:
        the blueprint is still running, and the subscription has a connection of its own)."""
        blueprint = getattr(parent, "blueprint", None)
        if blueprint is not None and blueprint.state == bootsteps.RUN:
            return
        self.close_subscription()

    def shutdown(self, parent: Any) -> None:
        self.close_subscription()

    def terminate(self, parent: Any) -> None:
        self.close_subscription()

    # -------------------------------------------------------------- ours
    def _open(self, app: Any) -> None:
        options = dict(self.brama_subscribe)
        client = app.conf.get("brama_client")
        if client is not None:
            transport, owns = client.transport, False
        else:
            settings = app_settings(app)["settings"]
            if settings.broker_url.startswith(MEMORY_URL):
                raise ValueError("brama events on memory:// need brama_client (the client "
                                 "whose MemoryTransport the owner uses)")
            transport = transport_for(settings)
            owns = True
        try:
            sub = subscribe(transport=transport, **options)
            try:
                sub.start()
            except BaseException:
                sub.close()
                raise
        except BaseException:
            if owns:
                transport.close()
            raise
        self.subscription, self._transport, self._owns_transport = sub, transport, owns
        log.info(
            "%s: started in pid %d: queue %s, bindings %s, prefix %s",
            self.label, os.getpid(), sub.queue, ",".join(sub.bindings),
            transport.topology.prefix,
        )

    def close_subscription(self) -> None:
        """Close the subscription (waiting for a running handler) and its connection."""
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        sub, self.subscription = self.subscription, None
        transport, self._transport = self._transport, None
        if os.getpid() != self._pid:
            return  # inherited by fork (a prefork child): the parent's, not ours to close
        if sub is not None:
            try:
                sub.close()
                log.info("%s: closed in pid %d (%s)", self.label, os.getpid(),
                         ", ".join(f"{k} {v}" for k, v in sub.stats().items()
                                   if v or k in ("received", "handled")))
            except Exception:
                log.exception("brama events: closing %r failed", sub)
        if transport is not None and self._owns_transport:
            try:
                transport.close()
            except Exception:
                log.debug("brama events: closing the transport failed", exc_info=True)


def _values(value: FilterValues) -> FilterValues:
    """A filter value kept as given, an iterable as a list (a generator is read once)."""
    return value if value is None or isinstance(value, str) else list(value)


def install(
    app: Any,
    handler: Handler,
    events: FilterValues = None,
    connection: FilterValues = None,
    scope: FilterValues = None,
    *,
    name: str | None = None,
    patterns: FilterValues = None,
    batch_size: int = 1,
    batch_timeout: float = 1.0,
    prefetch: int = 100,
    quorum: bool | None = None,
    max_length: int = 10_000,
    queue_length: int = 10_000,
    max_deliveries: int = 5,
    retry_delay: float = 0.1,
    dedup_window: int = 10_000,
) -> type[EventsStep]:
    """Have every worker of ``app`` receive the events a filter selects, calling
    ``handler`` in its main process; returns the consumer step class it added.

    The filter and options are :func:`brama_mq.subscribe`'s, checked now (FilterError,
    ValueError, TypeError). Semantics: the module doc of :mod:`brama_mq.celery.step`.
    """
    if handler is None:
        raise TypeError("install() needs a handler: a worker has no one to iterate events")
    events, connection, scope, patterns = (_values(v) for v in (events, connection, scope,
                                                                 patterns))
    filter_keys(events, connection, scope, patterns)
    _options(handler, name, batch_size, batch_timeout, prefetch, quorum, max_length,
             queue_length, max_deliveries, retry_delay, dedup_window, asynchronous=False)
    _handler_calls(handler, batch_size)
    steps = app.steps["consumer"]
    if name is not None:
        for other in steps:
            if isinstance(other, type) and issubclass(other, EventsStep) and \
                    other.brama_subscribe.get("name") == name:
                raise ValueError(f"subscription {name!r} is already installed on {app!r}: "
                                 "one named subscription per worker (start more workers)")
    number = next(_numbers)
    label = f"brama events {name or number}"
    cls_name = f"BramaEvents{number}" + (f"_{_LABEL_CHARS.sub('_', name)}" if name else "")
    step = cast("type[EventsStep]", type(cls_name, (EventsStep,), {
        "__module__": __name__,
        "__doc__": f"Consumer step of brama_mq.celery.install(): {label}.",
        "name": f"{__name__}.{cls_name}",
        "label": label,
        "brama_subscribe": {
            "handler": handler, "events": events, "connection": connection, "scope": scope,
            "name": name, "patterns": patterns, "batch_size": batch_size,
            "batch_timeout": batch_timeout, "prefetch": prefetch, "quorum": quorum,
            "max_length": max_length, "queue_length": queue_length,
            "max_deliveries": max_deliveries, "retry_delay": retry_delay,
            "dedup_window": dedup_window,
        },
    }))
    steps.add(step)
    return step
