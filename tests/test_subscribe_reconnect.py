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


def test_watch_reads_the_states_again_after_a_reconnect(
    stack: Stack, private_node: brokers.PrivateNode
) -> None:
    """``brama-mq watch`` (plain lines) prints the owner's states at start and, after its
    connection was cut and replaced, says so and prints them again: a transient queue
    misses what happened while it was away, so the table is not left stale."""
    import io
    import threading

    from rich.console import Console

    from brama_mq.cli.watch import run_watch
    from tests.subscribe_helpers import wait_until

    stack.client.register("w", max_attempts=1, wait=True)
    stack.client.failure("w", wait=True)  # open
    buf = io.StringIO()
    ready = threading.Event()
    thread = threading.Thread(target=run_watch, kwargs=dict(
        connection=["w"], count=2, seconds=30, live=False, transport=stack.transport,
        console=Console(file=buf, width=200), on_ready=lambda _: ready.set()))
    thread.start()
    try:
        assert ready.wait(10)

        def state_lines() -> int:
            return sum(1 for line in buf.getvalue().splitlines()
                       if line.split()[:3] == ["state", "w", "open"])

        wait_until(lambda: state_lines() == 1, 10, buf.getvalue)
        private_node.close_connections("brama test: watch must reconnect")
        wait_until(lambda: state_lines() == 2, 20, buf.getvalue)
        assert "reconnected: states read again from the owner" in buf.getvalue()
        stack.client.close("w", wait=True)  # and events keep coming (2: the watch ends)
        wait_until(lambda: "circuit_closed" in buf.getvalue(), 20, buf.getvalue)
    finally:
        thread.join(20)
