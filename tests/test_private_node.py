"""Links against a throwaway rabbitmq-server node that the tests stop and restart.

The node (tests/brokers.py PrivateNode) has its own name, ports, data and cookie, so
restarting it never disturbs the shared broker other tests use.
"""

from __future__ import annotations

import threading
import time

import pytest

from brama_mq.transport import Outgoing, Topology
from brama_mq.transport.amqp import AmqpTransport

try:  # `python -m pytest` from the repo root: tests is a namespace package
    from tests import brokers
    from tests.test_transport_memory import _fetch_n
except ImportError:  # pytest's rootdir-based sys.path entry for tests/
    import brokers  # type: ignore[no-redef]
    from test_transport_memory import _fetch_n  # type: ignore[no-redef]

pytestmark = pytest.mark.private_node


def _events(lo: int, hi: int) -> list[Outgoing]:
    return [Outgoing("pay.api.state_change", b'{"n":%d}' % i, True, f"m{i}") for i in range(lo, hi)]


def test_private_node_starts_and_is_private(private_node: brokers.PrivateNode) -> None:
    """The node answers AMQP on its own port under its own name, apart from the shared node."""
    assert private_node.running()
    assert private_node.port not in (5672, 25672)
    assert private_node.last_start_seconds is not None and private_node.last_start_seconds < 90
    status = private_node.ctl("status").stdout
    assert private_node.name in status
    transport = AmqpTransport(private_node.url, Topology("pn0"))
    transport.declare()
    transport.close()


def test_owner_link_survives_node_restart(private_node: brokers.PrivateNode) -> None:
    """Across a node restart the owner link reconnects by itself; no critical event is lost.

    Batch 1 is confirmed before the stop, batch 2 is in flight when the node stops, and
    batch 3 is published while it is down (into a dead connection). After the restart
    every message id of the three batches is in a durable queue bound before the restart
    (duplicates allowed: at-least-once), and commands flow again both ways.
    """
    topo = Topology(f"pn{int(time.time())}")
    transport = AmqpTransport(private_node.url, topo, reconnect_timeout=90, heartbeat=10)
    queue = f"{topo.prefix}.probe"
    try:
        owner = transport.owner_link(prefetch=100)  # declares the topology
        brokers.WireProbe(private_node.url, queue, exchange=topo.events_exchange,
                          keys=["#"]).close()
        client = transport.client_link()
        for i in range(3):
            client.send(b"before-%d" % i)
        before = _fetch_n(owner, 3)
        assert len(before) == 3

        owner.publish(_events(0, 1000))
        assert owner.wait_confirms(30) == 1000
        owner.publish(_events(1000, 2000))  # not waited for: in flight at the stop

        private_node.stop()
        restarter = threading.Thread(target=private_node.start, daemon=True)
        restarter.start()
        owner.publish(_events(2000, 3000))  # the link finds its connection dead
        owner.wait_confirms(120)
        restarter.join(120)
        assert private_node.running()

        stats = owner.stats()
        assert stats["reconnects"] >= 1
        assert stats["republished"] >= 1
        assert stats["pending"] == 0

        # The commands fetched before the restart were never acked: they come back,
        # and acking their old tags is a no-op.
        owner.ack(before[-1].delivery_tag)
        assert owner.stats()["stale_acks"] == 1
        again = _fetch_n(owner, 3, timeout=30)
        assert sorted(d.body for d in again) == [b"before-0", b"before-1", b"before-2"]
        assert all(d.redelivered and d.epoch > before[0].epoch for d in again)
        owner.ack(again[-1].delivery_tag)

        # New traffic both ways after the restart.
        client.send(b"after")
        assert [d.body for d in _fetch_n(owner, 1, timeout=30)] == [b"after"]
        owner.publish(_events(3000, 3010))
        assert owner.wait_confirms(30) == 10

        probe = brokers.WireProbe(private_node.url, queue, declare=False)
        try:
            probe.wait_depth(3010, timeout=30)
            ids = [m.properties["message_id"] for m in probe.take()]
        finally:
            probe.close()
        assert set(ids) == {f"m{i}" for i in range(3010)}, "critical events lost"
        assert len(ids) >= 3010
    finally:
        transport.close()


def test_close_connections_is_survived(private_node: brokers.PrivateNode) -> None:
    """When the broker closes every connection, client and owner links carry on."""
    transport = AmqpTransport(private_node.url, Topology("pn-close"), reconnect_timeout=30)
    try:
        owner = transport.owner_link()
        client = transport.client_link()
        client.send(b"1")
        (first,) = _fetch_n(owner, 1)
        owner.ack(first.delivery_tag)
        private_node.close_connections()
        client.send(b"2")
        got = _fetch_n(owner, 1, timeout=30)
        assert [d.body for d in got] == [b"2"]
        assert owner.stats()["reconnects"] == 1
        assert client.stats()["reconnects"] == 1
    finally:
        transport.close()


def test_events_published_while_the_broker_is_down_stay_pending(
    private_node: brokers.PrivateNode,
) -> None:
    """publish() during an outage raises BrokerUnavailableError but keeps critical events
    pending; they are sent once a later wait_confirms reconnects."""
    from brama_mq.errors import BrokerUnavailableError

    topo = Topology(f"pd{int(time.time())}")
    transport = AmqpTransport(private_node.url, topo, reconnect_timeout=1.0)
    queue = f"{topo.prefix}.probe"
    try:
        owner = transport.owner_link()
        brokers.WireProbe(private_node.url, queue, exchange=topo.events_exchange,
                          keys=["#"]).close()
        private_node.stop()
        with pytest.raises(BrokerUnavailableError):
            owner.publish(_events(0, 50))
        assert owner.stats()["pending"] == 50
        private_node.start()
        transport.reconnect_timeout = 60.0
        assert owner.wait_confirms(60) == 50
        probe = brokers.WireProbe(private_node.url, queue, declare=False)
        try:
            probe.wait_depth(50)
            assert {m.properties["message_id"] for m in probe.take()} == {
                f"m{i}" for i in range(50)
            }
        finally:
            probe.close()
    finally:
        transport.close()
