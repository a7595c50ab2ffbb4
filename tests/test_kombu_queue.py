"""brama_mq.kombu_queue(): a subscription's queue as a kombu.Queue for users' own
ConsumerMixin, with exactly the bindings and arguments subscribe() makes, on a real
broker with a real owner."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import amqp
import kombu
import pytest
from kombu.mixins import ConsumerMixin

import brama_mq
from brama_mq.protocol import Event, decode_event
from brama_mq.transport.amqp import AmqpTransport
from tests.subscribe_helpers import Stack, owner_stack, wait_until
from tests.test_subscribe_api import _shapes


@pytest.fixture
def stack(amqp_transport: AmqpTransport) -> Iterator[Stack]:
    try:
        with owner_stack(amqp_transport) as s:
            yield s
    finally:
        brama_mq.unsubscribe()


class Collector(ConsumerMixin):  # type: ignore[misc]
    """A user's own kombu consumer: collects events, rejects those it is told to."""

    def __init__(self, connection: kombu.Connection, queue: kombu.Queue,
                 reject: set[str] | None = None) -> None:
        self.connection = connection
        self.queue = queue
        self.reject = reject or set()
        self.events: list[Event] = []
        self.ready = threading.Event()
        self.queue_name = ""

    def get_consumers(self, consumer_cls: Any, channel: Any) -> list[Any]:
        return [consumer_cls(queues=[self.queue], callbacks=[self.on_message],
                             accept=["json"], prefetch_count=50)]

    def on_consume_ready(self, connection: Any, channel: Any, consumers: Any,
                         **kwargs: Any) -> None:
        self.queue_name = consumers[0].queues[0].name  # a server-named queue's name
        self.ready.set()

    def on_message(self, body: Any, message: Any) -> None:
        event = decode_event(message.body, message.content_type)
        if event.event in self.reject:
            message.reject(requeue=False)
            return
        self.events.append(event)
        message.ack()


def _run(collector: Collector) -> threading.Thread:
    thread = threading.Thread(target=collector.run, daemon=True)
    thread.start()
    assert collector.ready.wait(20), "the kombu consumer never became ready"
    return thread


@pytest.mark.parametrize("shape", sorted(_shapes()))
def test_bindings_are_exactly_a_subscriptions(shape: str, prefix: str) -> None:
    """For every filter shape, the queue's routing keys are the subscription's bindings,
    on the prefix's events exchange."""
    from brama_mq.subscribe.filters import filter_keys

    kwargs = _shapes()[shape]
    queue = brama_mq.kombu_queue(**kwargs, prefix=prefix)
    keys = filter_keys(kwargs.get("events"), kwargs.get("connection"), kwargs.get("scope"),
                       kwargs.get("patterns"))
    assert sorted(b.routing_key for b in queue.bindings) == sorted(keys)  # kombu: a set
    assert {b.exchange.name for b in queue.bindings} == {f"{prefix}.events"}
    assert {b.exchange.type for b in queue.bindings} == {"topic"}


def test_bad_filters_and_names_are_refused_like_subscribe() -> None:
    """A typo'd event name or a bad subscription name fails as subscribe() fails."""
    with pytest.raises(brama_mq.FilterError, match="circuit_opnd"):
        brama_mq.kombu_queue(events="circuit_opnd")
    with pytest.raises(ValueError, match="printable"):
        brama_mq.kombu_queue(name="has space")
    with pytest.raises(ValueError, match="needs a name"):
        brama_mq.kombu_queue(quorum=True)


@pytest.mark.broker
def test_a_consumer_mixin_on_a_named_queue_gets_events_and_dead_letters_rejects(
    stack: Stack, broker_url: str, prefix: str, broker_registry: Any
) -> None:
    """A ConsumerMixin on kombu_queue(name=...) receives exactly the filtered events; a
    message it rejects lands in {p}.sub.<name>.dead (declared with the queue); and
    subscribe(name=...) elsewhere accepts the same queue (same arguments)."""
    name = f"k{uuid.uuid4().hex[:8]}"
    queue = brama_mq.kombu_queue(events=["circuit_opened", "failure"], scope="payments",
                                 name=name, prefix=prefix)
    broker_registry.track(prefix, broker_url, queues=[queue.name, f"{queue.name}.dead"])
    with kombu.Connection(broker_url) as conn:
        collector = Collector(conn, queue, reject={"failure"})
        thread = _run(collector)
        try:
            c = stack.client
            c.register("payment_api", scope="payments", max_attempts=2, wait=True)
            c.register("other", scope="elsewhere", max_attempts=1, wait=True)
            c.failure("other", scope="elsewhere", wait=True)  # not in the filter
            c.failure("payment_api", scope="payments", wait=True)
            c.failure("payment_api", scope="payments", wait=True)  # opens
            wait_until(lambda: len(collector.events) >= 1, 20)
        finally:
            collector.should_stop = True
            thread.join(10)
    assert [(e.scope, e.connection, e.event) for e in collector.events] == [
        ("payments", "payment_api", "circuit_opened")
    ]
    with kombu.Connection(broker_url) as conn:
        ch = conn.channel()
        dead = ch.queue_declare(f"{queue.name}.dead", passive=True)
        assert dead.message_count == 2, "both rejected failure events were dead-lettered"
        declared = ch.queue_declare(queue.name, passive=True)
        assert declared.queue == f"{prefix}.sub.{name}"
    # subscribe() with the same name redeclares the same queue: arguments are identical,
    # or the broker would refuse it with PRECONDITION_FAILED.
    sub = brama_mq.subscribe(events=["circuit_opened", "failure"], scope="payments",
                             name=name, transport=stack.transport)
    try:
        assert sorted(sub.bindings) == sorted(b.routing_key for b in queue.bindings)
    finally:
        sub.close()


@pytest.mark.broker
def test_a_transient_kombu_queue_is_exclusive_and_bounded(
    stack: Stack, broker_url: str, prefix: str
) -> None:
    """Without a name the queue is server-named and exclusive (gone with the consumer's
    connection) and receives the filtered events."""
    queue = brama_mq.kombu_queue(connection="payment_api", prefix=prefix, queue_length=100)
    with kombu.Connection(broker_url) as conn:
        collector = Collector(conn, queue)
        thread = _run(collector)
        try:
            stack.client.register("payment_api", scope="payments", wait=True)
            wait_until(lambda: any(e.event == "registration" for e in collector.events), 20)
        finally:
            collector.should_stop = True
            thread.join(10)
    assert {e.connection for e in collector.events} == {"payment_api"}
    assert queue.queue_arguments == {"x-max-length": 100, "x-overflow": "drop-head"}
    assert queue.exclusive and queue.auto_delete and not queue.durable
    assert collector.queue_name.startswith("amq.gen-")
    with kombu.Connection(broker_url) as conn, pytest.raises(amqp.exceptions.NotFound):
        conn.channel().queue_declare(collector.queue_name, passive=True)
