"""Subscriptions across a lost connection, on a throwaway RabbitMQ node of their own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import brama_mq
from brama_mq.transport import Topology
from brama_mq.transport.amqp import AmqpTransport
from tests import brokers
from tests.subscribe_helpers import Stack, collect, drain, owner_stack

pytestmark = pytest.mark.private_node


@pytest.fixture
def stack(
    private_node: brokers.PrivateNode, prefix: str, broker_registry: brokers.Registry
) -> Iterator[Stack]:
    if not private_node.running():
        private_node.start()
    transport = AmqpTransport(private_node.url, Topology(prefix), connect_timeout=5,
                              reconnect_timeout=30, max_backoff=0.5)
    broker_registry.track_transport(prefix, transport)
    try:
        with owner_stack(transport) as s:
            yield s
    finally:
        brama_mq.unsubscribe()
        transport.close()


def test_subscriptions_survive_closed_connections(
    stack: Stack, private_node: brokers.PrivateNode
) -> None:
    """Transient and named subscriptions keep receiving after all connections closed."""
    t = stack.transport
    transient = brama_mq.subscribe(connection="c", transport=t)
    named = brama_mq.subscribe(connection="c", name="survivor", transport=t)
    stack.client.register("c", max_attempts=100, wait=True)
    assert [e.seq for e in collect(transient, 2)] == [1, 2]
    assert [e.seq for e in collect(named, 2)] == [1, 2]
    old_queue = transient.queue
    private_node.close_connections("brama test: subscribers must reconnect")
    stack.client.failure("c", wait=True)  # the client and owner reconnect by themselves
    stack.client.failure("c", wait=True)
    assert [e.seq for e in collect(named, 2, timeout=30)] == [3, 4]
    got = [e.seq for e in drain(transient, quiet=1.0)]
    assert got and got[-1] == 4 and set(got) <= {3, 4}  # what came before the rebind is lost
    assert transient.queue != old_queue  # a new server-named queue, bound again
    named.delete()
