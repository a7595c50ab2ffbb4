"""Subscriptions against the real broker: filter shapes (checked against the core's
matcher), unsubscribe variants, one queue and one delivery per process, named queues
(acks after the handler, quorum, dead letters), duplicates, asyncio."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator

import amqp
import kombu
import pytest

import brama_mq
from brama_mq.protocol import Event, decode_event, encode_event
from brama_mq.transport.amqp import AmqpTransport
from tests import brokers
from tests.subscribe_helpers import Stack, collect, drain, expected, k, owner_stack, wait_until
from tests.test_subscribe_api import _shapes, _traffic

pytestmark = pytest.mark.broker


@pytest.fixture
def stack(amqp_transport: AmqpTransport) -> Iterator[Stack]:
    try:
        with owner_stack(amqp_transport) as s:
            yield s
    finally:
        brama_mq.unsubscribe()


def _name() -> str:
    return f"n{uuid.uuid4().hex[:8]}"


def _depth(url: str, queue: str) -> int:
    probe = brokers.WireProbe(url, queue, declare=False)
    try:
        return probe.depth()
    finally:
        probe.close()


def _queue_exists(url: str, queue: str) -> bool:
    with kombu.Connection(url) as conn:
        ch = conn.channel()
        try:
            ch.queue_declare(queue, passive=True)
            return True
        except amqp.exceptions.NotFound:
            return False


def _delivered(sub: brama_mq.Subscription) -> int:
    """How many messages the broker delivered to the queue's consumer in this process."""
    pump = sub._pump if sub._pump is not None else sub._hub.shared_pump
    assert pump is not None
    return pump.source.stats()["delivered"]  # type: ignore[attr-defined]


def test_each_filter_shape_receives_exactly_its_events(stack: Stack) -> None:
    """Each filter shape gets exactly the events the core's matcher selects, in order."""
    t = stack.transport
    subs = {label: brama_mq.subscribe(**kw, transport=t) for label, kw in _shapes().items()}
    name = _name()
    named = brama_mq.subscribe(scope="payments", events=["failure", "state_change"], name=name,
                               transport=t)
    assert len({s.queue for s in subs.values()}) == 1 and named.queue.endswith(f".sub.{name}")
    _traffic(stack)
    time.sleep(0.2)
    events = list(stack.events)
    for label, sub in [*subs.items(), ("named", named)]:
        want = [k(e) for e in expected(events, sub.bindings)]
        assert want, label
        assert [k(e) for e in collect(sub, len(want))] == want, label
    time.sleep(0.3)
    for label, sub in [*subs.items(), ("named", named)]:
        assert sub.receive(0) is None, f"{label} got an event it should not"
    named.delete()
    assert not _queue_exists(t.url, named.queue)  # type: ignore[attr-defined]


def test_unsubscribe_filter_unbinds_exactly_the_covered_bindings(stack: Stack) -> None:
    """unsubscribe(connection=a) unbinds *.a.* on the broker; *.b.* keeps working."""
    t = stack.transport
    only_a = brama_mq.subscribe(connection="a", transport=t)
    a_fail_b = brama_mq.subscribe(connection=["a", "b"], events="failure", transport=t)
    only_b = brama_mq.subscribe(connection="b", transport=t)
    brama_mq.unsubscribe(connection="a")
    assert only_a.closed and a_fail_b.bindings == ["*.b.failure"] and not only_b.closed
    before = _delivered(only_b)
    for name in ("a", "b"):
        stack.client.register(name, max_attempts=100, wait=True)
        stack.client.failure(name, wait=True)
    assert [(e.connection, e.event) for e in drain(a_fail_b)] == [("b", "failure")]
    assert [e.event for e in drain(only_b)] == ["registration", "connection_registered",
                                                "failure"]
    assert _delivered(only_b) - before == 3  # a's events no longer reach the process


def test_unsubscribe_on_a_named_subscription_unbinds_its_durable_queue(stack: Stack) -> None:
    """unsubscribe(connection=..., name=...) removes that binding from the named queue."""
    t = stack.transport
    name = _name()
    sub = brama_mq.subscribe(connection=["a", "b"], name=name, transport=t)
    brama_mq.unsubscribe(connection="a", name=name)
    assert sub.bindings == ["*.b.*"]
    sub.close()  # the queue stays, with the binding left
    stack.client.register("a", wait=True)
    stack.client.register("b", wait=True)
    queue = t.topology.subscription_queue(name)
    wait_until(lambda: _depth(t.url, queue) == 2, 5)  # type: ignore[attr-defined]
    time.sleep(0.2)
    assert _depth(t.url, queue) == 2  # type: ignore[attr-defined]
    t.delete_queues([queue, t.topology.subscription_dead_queue(name)])


def test_unsubscribe_everything_closes_all_and_drops_the_process_queue(stack: Stack) -> None:
    """unsubscribe() ends every subscription; the shared queue is deleted, named ones stay."""
    t = stack.transport
    name = _name()
    transient = brama_mq.subscribe(scope="s", transport=t)
    named = brama_mq.subscribe(scope="s", name=name, transport=t)
    shared = transient.queue
    assert _queue_exists(t.url, named.queue)  # type: ignore[attr-defined]
    brama_mq.unsubscribe()
    assert transient.closed and named.closed and list(transient) == []
    stack.client.register("x", scope="s", wait=True)
    wait_until(lambda: _depth(t.url, named.queue) == 2, 5)  # type: ignore[attr-defined]
    assert not _queue_exists(t.url, shared)  # type: ignore[attr-defined]
    t.delete_queues([named.queue, t.topology.subscription_dead_queue(name)])


def test_same_filter_twice_is_one_binding_and_one_delivery(stack: Stack) -> None:
    """One filter subscribed twice: one copy on the wire, one call per event per handler."""
    t = stack.transport
    calls: list[tuple[str | None, str, int]] = []

    def handler(event: Event) -> None:
        calls.append(k(event))

    one = brama_mq.subscribe(events="state_change", handler=handler, transport=t)
    two = brama_mq.subscribe(events="state_change", handler=handler, transport=t)
    assert one is two
    it1 = brama_mq.subscribe(events="state_change", transport=t)
    it2 = brama_mq.subscribe(events="state_change", transport=t)
    one.start()
    before = _delivered(it1)
    for name in ("p", "q"):
        stack.client.register(name, max_attempts=1, wait=True)
        stack.client.failure(name, wait=True)
    assert [k(e) for e in collect(it1, 2)] == [k(e) for e in collect(it2, 2)]
    wait_until(lambda: len(calls) == 2, 5)
    time.sleep(0.2)
    assert len(calls) == 2 and _delivered(it1) - before == 2


def test_named_batch_is_acked_only_after_its_handler_returned(stack: Stack) -> None:
    """A batch whose handler never returned is redelivered whole; one that returned is gone."""
    t = stack.transport
    name = _name()
    entered, gate = threading.Event(), threading.Event()
    sizes: list[int] = []

    def first(events: list[Event]) -> None:
        sizes.append(len(events))
        entered.set()
        gate.wait(10)
        raise RuntimeError("interrupted by close()")

    sub = brama_mq.subscribe(connection="c", name=name, handler=first, batch_size=5,
                             batch_timeout=0.5, transport=t).start()
    stack.client.register("c", max_attempts=100, wait=True)
    stack.send([("failure", "c", None, {})] * 5)  # 7 events: a batch of 5, then 2
    assert entered.wait(10)
    closer = threading.Thread(target=sub.close)
    closer.start()
    time.sleep(0.2)
    gate.set()
    closer.join(10)
    queue = t.topology.subscription_queue(name)
    wait_until(lambda: _depth(t.url, queue) == 7, 5)  # type: ignore[attr-defined]
    with brama_mq.subscribe(connection="c", name=name, batch_size=5, batch_timeout=0.5,
                            transport=t) as again:
        batches = [again.receive(5), again.receive(5)]
    assert [[e.seq for e in b] for b in batches] == [[1, 2, 3, 4, 5], [6, 7]]
    assert sizes == [5] and _depth(t.url, queue) == 0  # type: ignore[attr-defined]
    t.delete_queues([queue, t.topology.subscription_dead_queue(name)])


def test_named_quorum_queue_with_delivery_limit_and_dead_letters(stack: Stack) -> None:
    """quorum=True makes a quorum queue; a handler that keeps raising dead-letters its event."""
    t = stack.transport
    name = _name()
    failures: list[int] = []

    def broken(event: Event) -> None:
        failures.append(event.seq)
        raise ValueError(f"cannot handle {event.event}")

    sub = brama_mq.subscribe(connection="c", events="registration", name=name, quorum=True,
                             handler=broken, max_deliveries=2, retry_delay=0.01,
                             transport=t).start()
    queue, dead = t.topology.subscription_queue(name), t.topology.subscription_dead_queue(name)
    conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest")
    conn.connect()
    try:
        args = {"x-queue-type": "quorum", "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": dead, "x-delivery-limit": 2}
        conn.channel().queue_declare(queue, durable=True, auto_delete=False, arguments=args)
        with pytest.raises(amqp.exceptions.PreconditionFailed):
            conn.channel().queue_declare(queue, durable=True, auto_delete=False, arguments={})
    finally:
        conn.collect()
    stack.client.register("c", wait=True)
    wait_until(lambda: _depth(t.url, dead) == 1, 10)  # type: ignore[attr-defined]
    assert failures == [1, 1]
    probe = brokers.WireProbe(t.url, dead, declare=False)  # type: ignore[attr-defined]
    try:
        [letter] = probe.take()
    finally:
        probe.close()
    headers = letter.properties["application_headers"]
    assert headers["x-brama-error"].startswith("ValueError: cannot handle registration")
    assert headers["x-brama-original-routing-key"] == "_.c.registration"
    assert sub.stats()["dead_lettered"] == 1
    sub.delete()
    assert not _queue_exists(t.url, queue) and not _queue_exists(t.url, dead)  # type: ignore


def test_republished_event_is_delivered_once(stack: Stack, broker_url: str) -> None:
    """An event published twice reaches each subscriber once (deduplicated by seq)."""
    t = stack.transport
    name = _name()
    transient = brama_mq.subscribe(connection="c", transport=t)
    named = brama_mq.subscribe(connection="c", name=name, transport=t)
    stack.client.register("c", wait=True)
    [registration, _] = collect(transient, 2)
    with kombu.Connection(broker_url) as conn:
        ch = conn.channel()
        message = ch.prepare_message(encode_event(registration),
                                     content_type="application/json")
        for _ in range(2):
            ch.basic_publish(message, t.topology.events_exchange, "_.c.registration")
    stack.client.failure("c", wait=True)
    assert [e.event for e in drain(transient)] == ["failure"]
    assert [e.event for e in drain(named)] == ["registration", "connection_registered",
                                               "failure"]
    assert transient.stats()["duplicates"] == 2 and named.stats()["duplicates"] == 2
    named.delete()


def test_async_for_on_a_named_subscription(stack: Stack) -> None:
    """async for yields the events of a named subscription and acks them as it goes."""
    t = stack.transport
    name = _name()

    async def main() -> list[str]:
        got: list[str] = []
        async with brama_mq.subscribe_async(connection="c", name=name, transport=t) as sub:
            await asyncio.to_thread(stack.client.register, "c", wait=True)
            async for event in sub:
                got.append(event.event)
                if len(got) == 2:
                    break
        return got

    assert asyncio.run(main()) == ["registration", "connection_registered"]
    queue = t.topology.subscription_queue(name)
    assert _depth(t.url, queue) == 0  # type: ignore[attr-defined]
    t.delete_queues([queue, t.topology.subscription_dead_queue(name)])


def test_named_dead_queue_is_bounded_and_keeps_the_newest_letters(
    broker_url: str, prefix: str, broker_registry: brokers.Registry
) -> None:
    """A named subscription's dead queue has the dead queue's bounds (here 3 letters):
    a handler that fails on every event leaves the 3 newest failed events there, the
    older ones dropped, instead of growing the queue without end."""
    from brama_mq.transport import Topology

    t = AmqpTransport(broker_url, Topology(prefix, dead_max_length=3), connect_timeout=5)
    broker_registry.track_transport(prefix, t)
    name = _name()
    dead = t.topology.subscription_dead_queue(name)
    try:
        with owner_stack(t) as stack:
            sub = brama_mq.subscribe(connection="c", events="failure", name=name,
                                     handler=lambda e: 1 / 0, max_deliveries=1,
                                     retry_delay=0.01, transport=t).start()
            stack.client.register("c", max_attempts=1_000, wait=True)
            for _ in range(6):
                stack.client.failure("c", wait=True)
            wait_until(lambda: sub.stats()["dead_lettered"] == 6, 10, lambda: str(sub.stats()))
            assert _depth(broker_url, dead) == 3
            probe = brokers.WireProbe(broker_url, dead, declare=False)
            try:
                letters = probe.take()
            finally:
                probe.close()
            counts = [decode_event(m.body).data["failure_count"] for m in letters]
            assert counts == [4, 5, 6]
            sub.delete()
    finally:
        brama_mq.unsubscribe()
        t.close()


def test_an_unbounded_named_dead_queue_from_before_is_kept(
    amqp_transport: AmqpTransport, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``{p}.sub.<name>.dead`` made unbounded by an earlier version does not stop the
    subscription: the transport warns, naming the queue, and dead-letters into it."""
    t = amqp_transport
    name = _name()
    dead = t.topology.subscription_dead_queue(name)
    old = brokers.WireProbe(t.url, dead)  # durable, no arguments
    try:
        with caplog.at_level("WARNING", logger="brama_mq.transport.amqp"), \
                owner_stack(t) as stack:
            sub = brama_mq.subscribe(connection="c", events="failure", name=name,
                                     handler=lambda e: 1 / 0, max_deliveries=1,
                                     retry_delay=0.01, transport=t).start()
            stack.client.register("c", wait=True)
            stack.client.failure("c", wait=True)
            assert old.wait_depth(1, 10) == 1
            sub.delete()
        assert any(dead in r.getMessage() and "unbounded" in r.getMessage()
                   for r in caplog.records)
    finally:
        brama_mq.unsubscribe()
        old.close()


def _queue_types(names: list[str]) -> dict[str, str]:
    """``{queue: type}`` of the shared broker's queues among ``names`` (rabbitmqctl)."""
    out = subprocess.run(["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name",
                          "type"], capture_output=True, text=True, timeout=60, check=True)
    found = dict(line.split()[:2] for line in out.stdout.splitlines() if line.strip())
    return {n: found.get(n, "missing") for n in names}


def test_named_subscriptions_are_quorum_queues_by_default(stack: Stack) -> None:
    """A named subscription's queue and its dead queue are quorum queues unless
    ``quorum=False`` is asked for (a classic queue is lost while its one node is down)."""
    t = stack.transport
    replicated, classic = _name(), _name()
    topo = t.topology
    subs = [brama_mq.subscribe(connection="c", name=replicated, handler=lambda e: None,
                               transport=t).start(),
            brama_mq.subscribe(connection="c", name=classic, quorum=False,
                               handler=lambda e: None, transport=t).start()]
    try:
        types = _queue_types([topo.subscription_queue(replicated),
                              topo.subscription_dead_queue(replicated),
                              topo.subscription_queue(classic)])
        assert types == {topo.subscription_queue(replicated): "quorum",
                         topo.subscription_dead_queue(replicated): "quorum",
                         topo.subscription_queue(classic): "classic"}
    finally:
        for sub in subs:
            sub.delete()


def test_a_classic_named_queue_from_before_is_kept_and_receives(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """``{p}.sub.<name>`` made classic by an earlier version still serves its subscriber:
    one warning names the queue as classic and the migration section, and the events it
    holds and gets are handled."""
    t = stack.transport
    name = _name()
    queue, dead = t.topology.subscription_queue(name), t.topology.subscription_dead_queue(name)
    old = brokers.WireProbe(t.url, queue, declare=False)
    old._ch.queue_declare(queue, durable=True, auto_delete=False, arguments={
        "x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead})
    got: list[Event] = []
    try:
        with caplog.at_level("WARNING", logger="brama_mq.transport.amqp"):
            sub = brama_mq.subscribe(connection="c", events="registration", name=name,
                                     handler=got.append, transport=t).start()
        stack.client.register("c", wait=True)
        wait_until(lambda: len(got) == 1, 10)
        warned = [r.getMessage() for r in caplog.records if queue + " " in r.getMessage()]
        assert len(warned) == 1 and "classic queue" in warned[0], warned
        assert "Migrating classic queues" in warned[0]
        sub.delete()
    finally:
        old.close()
        t.delete_queues([queue, dead])
