"""Subscriptions: Brama's status notifications as AMQP bindings.

``subscribe()`` turns a filter into topic bindings on ``{prefix}.events`` and returns a
:class:`Subscription` (iterate it, or give it a handler); ``subscribe_async()`` is the
asyncio form; ``unsubscribe()`` removes every subscription of the process, or exactly the
bindings a filter covers. See README.md "Subscriptions" and docs/protocol.md for queues.

This package imports protocol, core, transport interfaces and settings, never kombu.
"""

from __future__ import annotations

import atexit
import inspect
import sys
import types
from typing import Any

from brama_mq.errors import FilterError
from brama_mq.subscribe.aio import AsyncSubscription
from brama_mq.subscribe.filters import FilterValues, covers, filter_keys
from brama_mq.subscribe.hub import all_hubs, hub_done, hub_for
from brama_mq.subscribe.subscription import (
    BatchHandler,
    EventHandler,
    Handler,
    Options,
    Subscription,
)
from brama_mq.transport import Topology, Transport

__all__ = [
    "AsyncSubscription",
    "BatchHandler",
    "EventHandler",
    "Handler",
    "Subscription",
    "subscribe",
    "subscribe_async",
    "unsubscribe",
]


def _options(
    handler: Handler | None,
    name: str | None,
    batch_size: int,
    batch_timeout: float,
    prefetch: int,
    quorum: bool | None,
    max_length: int,
    queue_length: int,
    max_deliveries: int,
    retry_delay: float,
    dedup_window: int,
    *,
    asynchronous: bool,
) -> Options:
    """Check every option before anything touches the broker."""
    for label, value, low in (
        ("batch_size", batch_size, 1),
        ("prefetch", prefetch, 1),
        ("max_length", max_length, 1),
        ("queue_length", queue_length, 1),
        ("max_deliveries", max_deliveries, 1),
        ("dedup_window", dedup_window, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{label} must be an int >= {low}, not {value!r}")
    if prefetch > 65_535:
        raise ValueError(f"prefetch must be <= 65535, not {prefetch}")
    for label, number in (("batch_timeout", batch_timeout), ("retry_delay", retry_delay)):
        if isinstance(number, bool) or not isinstance(number, int | float) or number < 0:
            raise ValueError(f"{label} must be a number >= 0, not {number!r}")
    if name is not None:
        Topology().subscription_queue(name)  # raises ValueError naming the problem
        # Replicated unless asked otherwise: a classic queue is lost with its node.
        quorum = True if quorum is None else quorum
    elif quorum:
        raise ValueError("quorum=True needs a name: only named subscriptions are durable")
    quorum = bool(quorum)
    if handler is not None and not asynchronous:
        for fn in (handler, getattr(handler, "handle_event", None),
                   getattr(handler, "handle_batch", None)):
            if fn is not None and inspect.iscoroutinefunction(fn):
                raise TypeError("an async handler needs brama_mq.subscribe_async")
    return Options(
        handler=handler,
        name=name,
        batch_size=batch_size,
        batch_timeout=float(batch_timeout),
        prefetch=prefetch,
        quorum=quorum,
        max_length=max_length,
        queue_length=queue_length,
        max_deliveries=max_deliveries,
        retry_delay=float(retry_delay),
        dedup_window=dedup_window,
    )


def _open(
    keys: list[str],
    options: Options,
    broker_url: str | None,
    transport: Transport | None,
    prefix: str | None,
) -> Subscription:
    hub = hub_for(broker_url, transport, prefix)
    try:
        return hub.subscribe(keys, options)
    finally:
        hub_done(hub)


def subscribe(
    events: FilterValues = None,
    connection: FilterValues = None,
    scope: FilterValues = None,
    handler: Handler | None = None,
    name: str | None = None,
    batch_size: int = 1,
    batch_timeout: float = 1.0,
    prefetch: int = 100,
    *,
    patterns: FilterValues = None,
    quorum: bool | None = None,
    max_length: int = 10_000,
    queue_length: int = 10_000,
    max_deliveries: int = 5,
    retry_delay: float = 0.1,
    dedup_window: int = 10_000,
    broker_url: str | None = None,
    transport: Transport | None = None,
    prefix: str | None = None,
) -> Subscription:
    """Receive the events a filter selects; returns a :class:`Subscription`.

    ``events``, ``connection`` and ``scope`` take a value or a list; the bindings are their
    cross product, ``*`` where a filter is absent, ``#`` when none is given (``patterns``
    adds raw topic keys). Event names are checked (a typo raises FilterError listing the
    valid ones).

    Without ``name`` the subscription is *transient*: it shares this process's exclusive
    auto-delete queue (holding at most ``queue_length`` events, oldest dropped, when the
    whole process stops reading; the first transient subscription sets it), keeps at most
    ``max_length`` events when its own consumer stalls (dropping the oldest;
    ``sub.dropped`` says how many) and ends with the process. With
    ``name`` it is *durable*: queue ``{prefix}.sub.<name>`` (a quorum queue, replicated
    on a cluster; ``quorum=False`` makes a classic one) outlives the process, each event
    is acked after the handler returned, a handler that raises is retried up to
    ``max_deliveries`` times (backoff from ``retry_delay`` s) and then dead-lettered to
    ``{prefix}.sub.<name>.dead`` with the error, and processes subscribing with the same
    name share (compete for) its events.
    ``prefetch`` bounds a named subscription's unacked events. With ``batch_size > 1``,
    events come as lists of up to that many, or fewer after ``batch_timeout`` s.
    Duplicates are dropped by ``(scope, connection, seq)`` among the last ``dedup_window``.

    The broker is ``transport``, else ``broker_url`` / ``prefix`` (default: BRAMA_* settings).
    """
    keys = filter_keys(events, connection, scope, patterns)
    options = _options(handler, name, batch_size, batch_timeout, prefetch, quorum, max_length,
                       queue_length, max_deliveries, retry_delay, dedup_window,
                       asynchronous=False)
    return _open(keys, options, broker_url, transport, prefix)


def subscribe_async(
    events: FilterValues = None,
    connection: FilterValues = None,
    scope: FilterValues = None,
    handler: Handler | None = None,
    name: str | None = None,
    batch_size: int = 1,
    batch_timeout: float = 1.0,
    prefetch: int = 100,
    *,
    patterns: FilterValues = None,
    quorum: bool | None = None,
    max_length: int = 10_000,
    queue_length: int = 10_000,
    max_deliveries: int = 5,
    retry_delay: float = 0.1,
    dedup_window: int = 10_000,
    broker_url: str | None = None,
    transport: Transport | None = None,
    prefix: str | None = None,
) -> AsyncSubscription:
    """:func:`subscribe` for asyncio: ``async for event in subscribe_async(...)``.

    The filter and options are checked now; connecting happens on first use (``async
    with``, ``async for``, ``await sub.open()``) in a worker thread. Handlers may be
    ``async def``.
    """
    keys = filter_keys(events, connection, scope, patterns)
    options = _options(handler, name, batch_size, batch_timeout, prefetch, quorum, max_length,
                       queue_length, max_deliveries, retry_delay, dedup_window,
                       asynchronous=True)
    return AsyncSubscription(lambda: _open(keys, options, broker_url, transport, prefix))


def unsubscribe(
    events: FilterValues = None,
    connection: FilterValues = None,
    scope: FilterValues = None,
    *,
    patterns: FilterValues = None,
    name: str | None = None,
) -> None:
    """Without a filter: close every subscription of this process (of ``name`` only,
    when given). With one: remove from each subscription exactly the bindings the filter's
    own bindings cover (``connection="a"`` removes ``*.a.*`` and ``*.a.failure``, keeps
    ``payments.*.*`` and ``#``); a subscription left with no binding is closed.

    Transient bindings live in this process only. A named subscription's bindings belong
    to its durable queue: removing them stops that queue collecting those events for every
    process of that name (closing it, by contrast, leaves the queue and its bindings).
    """
    if name is not None and not isinstance(name, str):
        raise FilterError(f"name must be a str, not {name!r}")
    everything = events is None and connection is None and scope is None and patterns is None
    wide = [] if everything else filter_keys(events, connection, scope, patterns)
    for hub in all_hubs():
        for sub in hub.subscriptions():
            if name is not None and sub.name != name:
                continue
            if everything:
                hub.release(sub, force=True)
                continue
            narrow = [k for k in sub.bindings if any(covers(w, k) for w in wide)]
            if narrow:
                hub.remove_bindings(sub, narrow)


@atexit.register
def _close_all() -> None:
    """At exit, settle and close what is still open (named queues get their acks)."""
    unsubscribe()


class _CallableModule(types.ModuleType):
    """``brama_mq.subscribe`` is this package *and* the function of the same name.

    Importing the package (``from brama_mq.subscribe.hub import ...``) makes Python set the
    attribute ``subscribe`` of ``brama_mq`` to the package, shadowing the function the lazy
    facade exports; calling the package calls the function, so both keep working.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Subscription:
        return subscribe(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
