"""Guards across a broker outage, on a private RabbitMQ node the test stops and starts.

While the node is down the local views go stale after ``max_staleness`` and checks follow
the fail mode (``open`` lets calls through, ``closed`` refuses), saying so in the log;
outcomes of the calls that ran are buffered. When the node is back the views reconnect,
snapshot again and vouch for the circuits again, and the buffered failures reach the
owner, which opens the circuit: the views see it. A plain client buffers its commands
the same way, bounded by ``buffer_size``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import pytest

from brama_mq.client import Brama
from brama_mq.client.guard import runtime_for
from brama_mq.client.local_view import LocalView
from brama_mq.client.outbox import Outbox
from brama_mq.errors import CircuitOpenError, OutboxFullError
from brama_mq.owner import Owner, run_owner
from brama_mq.transport import Topology
from brama_mq.transport.amqp import AmqpTransport
from tests import brokers

pytestmark = pytest.mark.private_node


def _until(what: str, predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


@pytest.fixture
def node(private_node: brokers.PrivateNode, prefix: str,
         broker_registry: brokers.Registry) -> Iterator[brokers.PrivateNode]:
    if not private_node.running():  # a failed earlier test may have left it down
        private_node.start()
    broker_registry.track(prefix, private_node.url)
    yield private_node
    if not private_node.running():
        private_node.start()


def test_views_follow_fail_mode_while_cut_off_and_resync_when_back(
    node: brokers.PrivateNode, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Cut off: fail mode applies and is logged; back: views resync, buffered outcomes land."""
    caplog.set_level(logging.INFO, logger="brama_mq")
    topology = Topology(prefix)
    owner_transport = AmqpTransport(node.url, topology, connect_timeout=2, reconnect_timeout=60,
                                    max_backoff=0.5)
    transports = [
        AmqpTransport(node.url, topology, connect_timeout=2, reconnect_timeout=2, max_backoff=0.5)
        for _ in range(2)
    ]
    owner: Owner = run_owner(owner_transport)
    clients = [Brama(transport=t, request_timeout=5) for t in transports]
    lenient, strict = clients
    try:
        lenient.register("api", scope="s", wait=True, max_attempts=2, expiry_ms=60_000)
        views = [
            LocalView.attach(lenient, fail_mode="open", max_staleness=1.0),
            LocalView.attach(strict, fail_mode="closed", max_staleness=1.0),
        ]
        for client in clients:
            with client.guard("api", scope="s") as admission:
                assert admission.why == "closed"
            assert runtime_for(client).outbox.flush(10)  # those successes are confirmed

        node.stop()
        _until("both views stale", lambda: all(v.stale for v in views), timeout=10)
        for _ in range(2):
            with pytest.raises(TimeoutError), lenient.guard("api", scope="s") as admission:
                assert admission.why == "fail-open"
                raise TimeoutError("no route to the payment service")
        with pytest.raises(CircuitOpenError) as refused, strict.guard("api", scope="s"):
            pytest.fail("fail mode 'closed' let a call through while cut off")
        assert refused.value.state == "unknown"
        outbox = runtime_for(lenient).outbox
        assert outbox.pending() == 2
        text = caplog.text
        assert "no contact with the broker" in text
        assert "fail mode 'open': calls to s/api run" in text
        assert "fail mode 'closed': calls to s/api are refused" in text

        node.start()
        _until("views usable again", lambda: all(v.usable for v in views), timeout=30)
        _until("buffered outcomes delivered", lambda: outbox.pending() == 0, timeout=30)
        _until("the circuit open in both views",
               lambda: all(v.state("api", "s") == "open" for v in views), timeout=30)
        for client in clients:
            with pytest.raises(CircuitOpenError) as refused, client.guard("api", scope="s"):
                pytest.fail("an open circuit let a call through")
            assert refused.value.state == "open"
        for view in views:
            assert view.counters["snapshots"] >= 2, view.stats()
        assert "in contact with the broker again" in caplog.text
    finally:
        for client in clients:
            client.disconnect()
        owner.stop(wait=30)
        for t in (*transports, owner_transport):
            t.close()


def test_client_buffers_commands_while_the_broker_is_away_and_flushes_them(
    node: brokers.PrivateNode, prefix: str
) -> None:
    """Broker stopped: commands sent without ``wait`` return at once, buffered up to
    ``buffer_size``; one more raises OutboxFullError and is not kept; outcome reports
    wait in the outbox meanwhile. Broker back: the client reconnects by itself and every
    buffered command and report reaches the owner (counted)."""
    topology = Topology(prefix)
    owner_transport = AmqpTransport(node.url, topology, connect_timeout=2, reconnect_timeout=60,
                                    max_backoff=0.5)
    transport = AmqpTransport(node.url, topology, connect_timeout=2, max_backoff=0.5)
    owner: Owner = run_owner(owner_transport)
    client = Brama(transport=transport, buffer_size=40, request_timeout=10)
    try:
        client.register("api", scope="s", wait=True, max_attempts=1_000)
        client.failure("api", scope="s")  # connected: returns once confirmed
        assert client.pending() == 0

        node.stop()
        started = time.monotonic()
        for i in range(40):
            client.failure("api", scope="s", reason=f"during the outage {i}")
        assert time.monotonic() - started < 5, "buffering must not wait for the broker"
        assert client.pending() == 40
        with pytest.raises(OutboxFullError) as full:
            client.failure("api", scope="s", reason="one too many")
        assert "buffer size 40" in str(full.value) and "broker is away" in str(full.value)
        assert client.pending() == 40
        stats = client.link.stats()  # type: ignore[attr-defined]
        assert stats["refused"] == 1 and stats["reconnects"] >= 1
        # Outcome reports (what guards and Celery tasks send) follow the same rule: the
        # link refuses them while full, so the outbox keeps them and retries; none lost.
        outbox = Outbox(client.commands, linger=0)
        for i in range(25):
            assert outbox.put("failure", "api", "s", f"task {i} failed")
        _until("the outbox retried", lambda: outbox.counters["retries"] >= 1, timeout=10)
        assert outbox.pending() == 40 + 25 and outbox.counters["dropped"] == 0

        node.start()
        assert client.flush(60), client.link.stats()  # type: ignore[attr-defined]
        assert outbox.flush(60), outbox.stats()
        _until("the owner applied every buffered failure",
               lambda: client.status("api", scope="s")["failure_count"] == 41 + 25, timeout=30)
        assert client.status("api", scope="s")["state"] == "closed"
        assert client.link.stats()["republished"] >= 1  # type: ignore[attr-defined]
        assert outbox.counters["reports_sent"] == 25
        outbox.close()
    finally:
        client.disconnect()
        owner.stop(wait=30)
        for t in (transport, owner_transport):
            t.close()
