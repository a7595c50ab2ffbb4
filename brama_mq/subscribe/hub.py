"""What one process subscribes through one transport, shared.

* Every **transient** subscription of the process shares one exclusive, auto-delete queue
  (one connection, one consumer, one pump thread). Its bindings are the union of the
  subscriptions' bindings, reference-counted: a key is bound once however many
  subscriptions want it and unbound when the last one lets go. The broker puts one copy of
  an event in the queue whatever number of bindings match, and the pump hands it to each
  matching subscription once (the core's topic matcher decides, with the broker's rules).
* Every **named** subscription has its own durable queue, connection and pump, because
  its acks follow its handler and must not wait for anyone else's.

Drop accounting (transient): RabbitMQ does not say what ``x-max-length`` removed, so the
hub watches ``seq``, which grows by one per event of a ``(scope, connection)`` and carries
on across takeovers (ordered with ``epoch`` by :mod:`brama_mq.core.ordering`). A gap on
the shared queue is a loss for every subscription bound to *every* event type of that
connection; subscriptions filtered by event type cannot tell a loss from a filtered-out
event, so for them the count is a lower bound, and so it is for losses before the first
event seen of a connection (there is no gap without a baseline). Baselines restart
whenever bindings change.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Sequence
from typing import Final

from brama_mq.core.events import EVENT_TYPES
from brama_mq.core.matcher import TopicMatcher
from brama_mq.core.ordering import SEQ_BITS, Order, classify
from brama_mq.errors import BramaError, ProtocolError
from brama_mq.protocol import Event
from brama_mq.settings import MEMORY_URL, Settings
from brama_mq.subscribe.decode import fast_decode_event
from brama_mq.subscribe.pump import Pump
from brama_mq.subscribe.subscription import Options, Subscription, _Item
from brama_mq.transport import Transport, transport_for
from brama_mq.transport.base import Delivery

__all__ = ["Hub", "all_hubs", "hub_done", "hub_for"]

log = logging.getLogger("brama_mq.subscribe")

#: Prefetch of the shared transient queue: the pump acks on receipt, so this only sizes
#: the batches it reads.
TRANSIENT_PREFETCH: Final = 1000
_ACCOUNTING_LIMIT: Final = 100_000


class Hub:
    """The subscriptions of this process on one transport (see the module docstring)."""

    def __init__(self, key: Hashable, transport: Transport, *, owns_transport: bool) -> None:
        self.key = key
        self.transport = transport
        self._owns_transport = owns_transport
        # _admin serialises subscribe/unsubscribe and is held across broker calls; _lock
        # guards the dispatch tables and is never held across I/O (the pump needs it).
        self._admin = threading.RLock()
        self._lock = threading.Lock()
        self._transient: dict[int, Subscription] = {}
        self._matcher: TopicMatcher[int] = TopicMatcher()
        self._refs: dict[str, set[int]] = {}
        self._pump: Pump | None = None
        self._named: dict[str, Subscription] = {}
        self._identities: dict[Hashable, Subscription] = {}
        self._routes: dict[str, tuple[Subscription, ...]] = {}  # routing key -> targets
        self._last_mark: dict[str, int] = {}
        self._full: dict[str, tuple[int, ...]] = {}
        self.pending = 0  # subscribe() calls in progress (guarded by the registry lock)
        self.invalid = 0

    @property
    def shared_pump(self) -> Pump | None:
        """The pump of the shared transient queue (None while no transient subscription)."""
        return self._pump

    def empty(self) -> bool:
        return not self._transient and not self._named

    def subscriptions(self) -> list[Subscription]:
        with self._admin:
            return [*self._transient.values(), *self._named.values()]

    # ------------------------------------------------------------------ subscribe
    def subscribe(self, keys: list[str], options: Options) -> Subscription:
        """A new subscription, or the live one with the same identity (see Subscription)."""
        identity = _identity(keys, options)
        with self._admin:
            if identity is not None:
                existing = self._identities.get(identity)
                if existing is not None and not existing.closed:
                    existing._refs += 1
                    return existing
            name = options.name
            if name is not None and name in self._named:
                raise ValueError(
                    f"subscription {name!r} is already consumed in this process with other "
                    f"filters, handler or batch size ({self._named[name]!r}); a named "
                    "subscription is one queue: start more processes to scale it"
                )
            sub = Subscription(self, keys, options)
            if name is None:
                self._attach_transient(sub)
            else:
                self._attach_named(sub)
            if identity is not None:
                self._identities[identity] = sub
            return sub

    def _attach_transient(self, sub: Subscription) -> None:
        pump = self._ensure_pump(sub._options.queue_length)
        with self._lock:
            new = [k for k in sub._keys if not self._refs.get(k)]
            for key in sub._keys:
                self._refs.setdefault(key, set()).add(sub.id)
                self._matcher.add(key, sub.id)
            self._transient[sub.id] = sub
            self._reset_accounting()
        if not new:
            return
        try:
            pump.call(lambda source: source.bind(new))
        except BaseException:
            self._drop_transient(sub, list(sub._keys))
            raise

    def _ensure_pump(self, queue_length: int) -> Pump:
        """The shared queue's pump; a new one (rebinding every key) if it died.

        ``queue_length`` (the first transient subscription's) is the queue's ``x-max-length``:
        what the broker keeps when the whole process stops reading. Each subscription's
        own ``max_length`` bounds its in-process buffer instead, so one subscription with a
        small limit does not make the queue lossy for the others.
        """
        pump = self._pump
        if pump is not None and pump.alive:
            return pump
        source = self.transport.event_source(max_length=queue_length,
                                             prefetch=TRANSIENT_PREFETCH)
        with self._lock:
            keys = list(self._refs)
        try:
            if keys:
                source.bind(keys)
        except BaseException:
            source.close()
            raise
        if pump is not None:
            log.warning("the shared subscription queue's connection died; replaced")
            pump.stop()
        self._pump = Pump(source, self._dispatch, name="brama-subscriptions",
                          ack_on_receipt=True).start()
        return self._pump

    def _attach_named(self, sub: Subscription) -> None:
        options = sub._options
        assert options.name is not None
        topo = self.transport.topology
        source = self.transport.event_source(
            queue=topo.subscription_queue(options.name),
            durable=True,
            prefetch=max(options.prefetch, options.batch_size),
            quorum=options.quorum,
            dead_letter_queue=topo.subscription_dead_queue(options.name),
            delivery_limit=options.max_deliveries if options.quorum else None,
        )
        try:
            source.bind(sub._keys)
        except BaseException:
            source.close()
            raise
        sub._pump = Pump(source, sub._receive_deliveries, name=f"brama-sub-{options.name}",
                         ack_on_receipt=False).start()
        self._named[options.name] = sub

    # ------------------------------------------------------------------ unsubscribe
    def release(self, sub: Subscription, *, force: bool = False) -> None:
        """One close() of ``sub``; the last (or a forced one) stops it and its bindings."""
        with self._admin:
            if sub._closed:
                return
            if sub._refs > 1 and not force:
                sub._refs -= 1
                return
            sub._closed = True
            for identity, live in list(self._identities.items()):
                if live is sub:
                    del self._identities[identity]
        sub._shutdown()  # outside _admin: a handler being joined may be unsubscribing
        with self._admin:
            if sub.name is None:
                self._drop_transient(sub, list(sub._keys))
            else:
                self._named.pop(sub.name, None)
                if sub._pump is not None:
                    sub._pump.stop()  # flushes acks, closes: unacked messages are requeued
        _released(self)

    def remove_bindings(self, sub: Subscription, keys: Sequence[str]) -> None:
        """Stop ``sub`` receiving through ``keys`` (unsubscribe with a filter)."""
        with self._admin:
            if sub._closed:
                return
            keys = [k for k in keys if k in sub._keys]
            if not keys:
                return
            sub._keys = [k for k in sub._keys if k not in keys]
            if sub.name is None:
                self._drop_transient(sub, keys, keep=bool(sub._keys))
            elif sub._pump is not None:
                gone = list(keys)
                sub._pump.call(lambda source: source.unbind(gone))
            empty = not sub._keys
        if empty:
            self.release(sub, force=True)

    def _drop_transient(self, sub: Subscription, keys: list[str], keep: bool = False) -> None:
        """Take ``keys`` of ``sub`` out of the tables; unbind what nobody holds any more."""
        with self._lock:
            gone = []
            for key in keys:
                self._matcher.remove(key, sub.id)
                holders = self._refs.get(key)
                if holders is not None:
                    holders.discard(sub.id)
                    if not holders:
                        del self._refs[key]
                        gone.append(key)
            if not keep:
                self._transient.pop(sub.id, None)
            last = not self._transient
            self._reset_accounting()
        pump = self._pump
        if pump is None:
            return
        if last:
            self._pump = None
            pump.stop()  # the exclusive queue and its bindings go with the connection
        elif gone:
            try:
                pump.call(lambda source: source.unbind(gone))
            except BramaError:
                log.exception("could not unbind %s", gone)

    # ------------------------------------------------------------------ dispatch (pump)
    def _reset_accounting(self) -> None:
        """Bindings changed: forget cached routes and restart the seq baselines."""
        self._routes.clear()
        self._full.clear()
        self._last_mark.clear()

    def _dispatch(self, deliveries: list[Delivery]) -> None:
        """Sink of the shared queue: decode once, hand to every matching subscription."""
        decoded: list[tuple[Delivery, Event]] = []
        for d in deliveries:
            try:
                decoded.append((d, fast_decode_event(d.body, d.content_type)))
            except ProtocolError as exc:
                self.invalid += 1
                if self.invalid == 1 or self.invalid % 1000 == 0:
                    log.warning("ignored %d invalid event(s) on %s: %s", self.invalid,
                                d.routing_key, exc)
        out: dict[Subscription, list[_Item]] = {}
        with self._lock:
            routes = self._routes
            for d, event in decoded:
                key = d.routing_key
                targets = routes.get(key)
                if targets is None:
                    targets = self._route(key)
                if not targets:
                    continue
                self._account(key, (event.epoch << SEQ_BITS) | event.seq)
                item = _Item(event, d, 0)
                for sub in targets:
                    got = out.get(sub)
                    if got is None:
                        out[sub] = [item]
                    else:
                        got.append(item)
        for sub, items in out.items():
            sub._receive(items)

    def _route(self, key: str) -> tuple[Subscription, ...]:
        """The subscriptions a routing key reaches (cached until bindings change)."""
        subs = self._transient
        targets = tuple(subs[sid] for sid in self._matcher.match(key) if sid in subs)
        if len(self._routes) >= _ACCOUNTING_LIMIT:
            self._routes.clear()
        self._routes[key] = targets
        return targets

    def _account(self, key: str, m: int) -> None:
        """Count a ``seq`` gap as lost for the subscriptions bound to all of its events.

        ``m`` is the event's :func:`~brama_mq.core.ordering.mark`; the gap is kept per
        ``<scope>.<connection>`` words of the routing key (the words the owner derives from
        the event's own scope and connection). A newer epoch is a new baseline; a
        duplicate or a stale event moves nothing.
        """
        sc = key.rpartition(".")[0]
        last = self._last_mark.get(sc)
        if last is not None and m == last + 1:
            self._last_mark[sc] = m  # the usual case, decided without classify()
            return
        order, missing = classify(last, m)
        if order is Order.DUPLICATE or order is Order.STALE:
            return
        if last is None and len(self._last_mark) >= _ACCOUNTING_LIMIT:
            self._last_mark.clear()
            self._full.clear()
        self._last_mark[sc] = m
        if not missing:
            return
        full = self._full.get(sc)
        if full is None:
            match = self._matcher.match
            common = set(match(f"{sc}.{EVENT_TYPES[0]}"))
            for name in EVENT_TYPES[1:]:
                common &= match(f"{sc}.{name}")
            full = self._full[sc] = tuple(common)
        for sid in full:
            sub = self._transient.get(sid)
            if sub is not None:
                sub.queue_dropped += missing


def _identity(keys: list[str], options: Options) -> Hashable | None:
    """Subscriptions that are "the same subscriber" share one object: same handler (or
    same name) and the same filter and batch size. Plain iterators are each their own."""
    if options.handler is None and options.name is None:
        return None
    handler: object = options.handler
    try:
        hash(handler)
    except TypeError:
        handler = ("id", id(handler))
    return (options.name, tuple(sorted(keys)), handler, options.batch_size)


# ---------------------------------------------------------------------- registry
_registry_lock = threading.Lock()
_hubs: dict[Hashable, Hub] = {}


def hub_for(broker_url: str | None, transport: Transport | None, prefix: str | None) -> Hub:
    """The hub for a transport (or for the broker and prefix of the settings), marked busy
    until :func:`hub_done`."""
    if transport is not None:
        if prefix is not None and prefix != transport.topology.prefix:
            raise ValueError(
                f"prefix {prefix!r} differs from the transport's {transport.topology.prefix!r}"
            )
        key: Hashable = ("transport", id(transport))
        with _registry_lock:
            hub = _hubs.get(key)
            if hub is None or hub.transport is not transport:
                hub = _hubs[key] = Hub(key, transport, owns_transport=False)
            hub.pending += 1
            return hub
    settings = Settings.from_env(broker_url=broker_url, prefix=prefix)
    if settings.broker_url.startswith(MEMORY_URL):
        raise ValueError(
            "memory:// is one in-process broker per transport: pass transport= (the "
            "MemoryTransport the owner and clients use) to subscribe on it"
        )
    key = ("url", settings.broker_url, settings.prefix)
    with _registry_lock:
        hub = _hubs.get(key)
        if hub is None:
            opened = transport_for(settings)
            hub = _hubs[key] = Hub(key, opened, owns_transport=True)
        hub.pending += 1
        return hub


def hub_done(hub: Hub) -> None:
    """End of a subscribe() call on ``hub``."""
    with _registry_lock:
        hub.pending -= 1
    _released(hub)


def _released(hub: Hub) -> None:
    """Forget a hub with no subscription left (closing the transport it opened)."""
    with _registry_lock:
        if hub.pending or not hub.empty() or _hubs.get(hub.key) is not hub:
            return
        del _hubs[hub.key]
    if hub._owns_transport:
        try:
            hub.transport.close()
        except Exception:
            log.debug("closing a subscription transport failed", exc_info=True)


def all_hubs() -> list[Hub]:
    with _registry_lock:
        return list(_hubs.values())
