"""The transport contract against RabbitMQ (fixtures: tests/conftest.py), plus what only
the AMQP transport has: quorum/SAC arguments, reconnects, and error mapping."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import amqp
import pytest

from brama_mq.errors import BrokerUnavailableError, TransportError
from brama_mq.transport import ClientLink, EventSource, Outgoing, OwnerLink, Transport
from brama_mq.transport.amqp import AmqpTransport

try:  # `python -m pytest` from the repo root: tests is a namespace package
    from tests import brokers
    from tests.test_transport_memory import Seen, TransportContract, _fetch_n
except ImportError:  # pytest's rootdir-based sys.path entry for tests/
    import brokers  # type: ignore[no-redef]
    from test_transport_memory import (  # type: ignore[no-redef]
        Seen,
        TransportContract,
        _fetch_n,
    )

pytestmark = pytest.mark.broker


class TestAmqpTransport(TransportContract):
    """The shared contract, on the test broker; the wire is read with plain py-amqp."""

    @pytest.fixture
    def transport(self, amqp_transport: AmqpTransport) -> Iterator[AmqpTransport]:
        yield amqp_transport

    def depth(self, transport: Any, queue: str) -> int:
        probe = brokers.WireProbe(transport.url, queue, declare=False)
        try:
            return probe.depth()
        finally:
            probe.close()

    def read(self, transport: Any, queue: str) -> list[Seen]:
        probe = brokers.WireProbe(transport.url, queue, declare=False)
        try:
            return [
                (m.delivery_info["routing_key"], bytes(m.body),
                 dict(m.properties.get("application_headers") or {}))
                for m in probe.take()
            ]
        finally:
            probe.close()


def _redeclare(url: str, queue: str, arguments: dict[str, Any]) -> str | None:
    """Declare ``queue`` with ``arguments``: None if equivalent, else the broker's complaint."""
    conn = amqp.Connection(url.split("//")[1].split("@")[1].rstrip("/"), userid="guest",
                           password="guest")
    conn.connect()
    try:
        conn.channel().queue_declare(queue, durable=True, auto_delete=False, arguments=arguments)
        return None
    except amqp.exceptions.PreconditionFailed as exc:
        return str(exc)
    finally:
        conn.collect()


def test_owner_queue_is_quorum_with_single_active_consumer(
    amqp_transport: AmqpTransport, broker_url: str
) -> None:
    """declare() makes {p}.owner a quorum queue with SAC, dead-lettering and a delivery limit."""
    topo = amqp_transport.topology
    amqp_transport.declare()
    amqp_transport.declare()
    expected = topo.owner_queue_arguments()
    assert expected == {
        "x-queue-type": "quorum",
        "x-single-active-consumer": True,
        "x-dead-letter-exchange": f"{topo.prefix}.dead",
        "x-delivery-limit": 20,
    }
    queue = topo.owner_queue()
    # The broker refuses a redeclaration with any other value: that pins every argument.
    assert _redeclare(broker_url, queue, expected) is None
    for key, other in [
        ("x-queue-type", "classic"),
        ("x-single-active-consumer", False),
        ("x-dead-letter-exchange", "elsewhere"),
        ("x-delivery-limit", 5),
    ]:
        complaint = _redeclare(broker_url, queue, {**expected, key: other})
        assert complaint is not None and key in complaint


def test_sharded_topology_declares_one_queue_per_shard(
    broker_url: str, prefix: str, broker_registry: brokers.Registry
) -> None:
    """With shards=3, owner.<k> keys reach {p}.owner.<k> and each shard has its own link."""
    from brama_mq.transport import Topology

    t = broker_registry.track_transport(prefix, AmqpTransport(broker_url, Topology(prefix, 3)))
    links = [t.owner_link(shard=k) for k in range(3)]
    client = t.client_link()
    for k in range(3):
        client.send(b"for %d" % k, routing_key=f"owner.{k}")
    for k, link in enumerate(links):
        assert [d.body for d in _fetch_n(link, 1)] == [b"for %d" % k]
    with pytest.raises(ValueError):
        t.owner_link()


def test_links_match_the_protocols(amqp_transport: AmqpTransport) -> None:
    """The AMQP links satisfy the base.py protocols (runtime-checkable)."""
    assert isinstance(amqp_transport, Transport)
    assert isinstance(amqp_transport.owner_link(), OwnerLink)
    assert isinstance(amqp_transport.client_link(), ClientLink)
    assert isinstance(amqp_transport.event_source(), EventSource)


def _cut(link: Any) -> None:
    """Break a link's TCP connection under it, as a network failure would."""
    link._conn.sock.shutdown(socket.SHUT_RDWR)


def test_lost_connection_redelivers_and_ignores_stale_acks(
    amqp_transport: AmqpTransport,
) -> None:
    """After a lost connection: reconnect, old tags' acks are no-ops, redelivery follows."""
    owner = amqp_transport.owner_link(prefetch=10)
    client = amqp_transport.client_link()
    for i in range(3):
        client.send(b"c%d" % i)
    before = _fetch_n(owner, 3)
    assert [d.epoch for d in before] == [1, 1, 1]
    _cut(owner)
    again = _fetch_n(owner, 3)
    assert [d.body for d in again] == [b"c0", b"c1", b"c2"]
    assert all(d.redelivered and d.epoch == 2 for d in again)
    owner.ack(before[-1].delivery_tag)  # stale: ignored, must not ack on the new channel
    stats = owner.stats()
    assert stats["reconnects"] == 1 and stats["stale_acks"] == 1
    owner.ack(again[-1].delivery_tag)
    assert owner.fetch(5, 0.3) == []


def test_unconfirmed_publishes_are_republished_after_a_lost_connection(
    amqp_transport: AmqpTransport,
) -> None:
    """Critical events unconfirmed when the connection dies are sent again: none lost."""
    probe = f"{amqp_transport.topology.prefix}.probe"
    src = amqp_transport.event_source(queue=probe, durable=True)
    src.bind(["#"])
    src.close()
    owner = amqp_transport.owner_link()
    owner.publish([Outgoing("a.b.state_change", b"%d" % i, True, f"m{i}") for i in range(500)])
    _cut(owner)
    owner.publish([Outgoing("a.b.state_change", b"%d" % i, True, f"m{i}") for i in range(500, 600)])
    assert owner.wait_confirms(30) >= 600
    stats = owner.stats()
    assert stats["reconnects"] == 1 and stats["republished"] > 0 and stats["pending"] == 0
    wire = brokers.WireProbe(amqp_transport.url, probe, declare=False)
    try:
        wire.wait_depth(600)
        ids = {m.properties["message_id"] for m in wire.take()}
    finally:
        wire.close()
    assert ids == {f"m{i}" for i in range(600)}


def test_client_survives_a_lost_connection(amqp_transport: AmqpTransport) -> None:
    """A ClientLink whose connection died reconnects on its next send."""
    owner = amqp_transport.owner_link()
    client = amqp_transport.client_link()
    client.send(b"one")
    _cut(client)
    client.send(b"two")
    assert [d.body for d in _fetch_n(owner, 2)] == [b"one", b"two"]
    assert client.stats()["reconnects"] == 1


def test_client_link_threads_share_the_connection_and_every_send_is_confirmed(
    amqp_transport: AmqpTransport,
) -> None:
    """Eight threads sending at once: each send returns confirmed, nothing left pending,
    and the queue holds every command."""
    import threading

    client = amqp_transport.client_link()
    errors: list[BaseException] = []

    def send(k: int) -> None:
        try:
            for i in range(100):
                client.send(b"t%d-%d" % (k, i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    stats = client.stats()
    assert stats["sent"] == stats["confirmed"] == 800 and stats["pending"] == 0
    wire = brokers.WireProbe(amqp_transport.url, amqp_transport.topology.owner_queue(),
                             declare=False)
    try:
        wire.wait_depth(800)
    finally:
        wire.close()


def test_posted_commands_and_a_later_request_reach_the_queue_in_order(
    amqp_transport: AmqpTransport,
) -> None:
    """post() returns without waiting; flush() waits for the confirms; a request sent
    after them (no owner: it times out) is queued behind them, on the same channel."""
    from brama_mq.errors import RequestTimeoutError

    client = amqp_transport.client_link()
    for i in range(300):
        client.post(b"p%d" % i)
    assert client.flush(30) and client.pending() == 0
    with pytest.raises(RequestTimeoutError):
        client.request(b"query", 0.3)
    owner = amqp_transport.owner_link(prefetch=500)
    bodies = [d.body for d in _fetch_n(owner, 301)]
    assert bodies == [b"p%d" % i for i in range(300)] + [b"query"]


def test_a_full_client_buffer_waits_for_confirms_while_connected(
    amqp_transport: AmqpTransport,
) -> None:
    """Connected, a full buffer is backpressure (post waits for confirms), not an error."""
    client = amqp_transport.client_link()
    client.max_buffer = 20  # type: ignore[attr-defined]
    for i in range(200):
        client.post(b"b%d" % i)
    assert client.flush(30)
    stats = client.stats()
    assert stats["refused"] == 0 and stats["confirmed"] == 200


def test_refused_connection_maps_to_broker_unavailable() -> None:
    """A closed port gives BrokerUnavailableError with the cause kept and no password shown."""
    url = f"amqp://brama:s3cr3t@127.0.0.1:{brokers.free_port()}//"
    transport = AmqpTransport(url, connect_timeout=2)
    for attempt in (transport.declare, transport.owner_link, transport.client_link):
        with pytest.raises(BrokerUnavailableError) as info:
            attempt()
        err = info.value
        assert isinstance(err.__cause__, OSError)
        assert "s3cr3t" not in str(err) and "s3cr3t" not in repr(err)
        assert "brama:**@127.0.0.1" in str(err)


def test_refused_login_is_a_transport_error_without_password(broker_url: str) -> None:
    """Wrong credentials give TransportError (not retried as unavailable), password masked."""
    host = broker_url.split("@", 1)[1]
    url = f"amqp://guest:s3cr3t-wrong@{host}"
    t0 = time.monotonic()
    with pytest.raises(TransportError) as info:
        AmqpTransport(url, connect_timeout=3).owner_link()
    assert time.monotonic() - t0 < 10
    assert not isinstance(info.value, BrokerUnavailableError)
    assert info.value.__cause__ is not None
    assert "s3cr3t" not in str(info.value)


def test_mask_url_hides_every_password() -> None:
    """mask_url masks passwords in single and failover URLs."""
    from brama_mq.transport.errors import mask_url

    assert mask_url("amqp://u:p%40ss@h:5672/v") == "amqp://u:**@h:5672/v"
    assert mask_url("amqp://u:a@h1//;amqp://u:b@h2//") == "amqp://u:**@h1//;amqp://u:**@h2//"
    assert mask_url("amqp://h//") == "amqp://h//"


# -- the house rule for finding a broker (tests/brokers.py) ------------------------------


def test_without_url_or_docker_the_broker_fixture_fails_saying_how(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No BRAMA_TEST_BROKER_URL and no Docker: an error that says how to provide a broker."""
    monkeypatch.delenv(brokers.ENV_URL, raising=False)
    monkeypatch.setattr(brokers, "docker_answers", lambda timeout=2.0: False)
    with pytest.raises(brokers.BrokerSetupError) as info:
        brokers.resolve_broker()
    assert "BRAMA_TEST_BROKER_URL=amqp://guest:guest@127.0.0.1:5672//" in str(info.value)
    assert "Docker" in str(info.value)


def test_env_url_wins_and_a_dead_one_is_reported_masked(
    monkeypatch: pytest.MonkeyPatch, broker_url: str
) -> None:
    """BRAMA_TEST_BROKER_URL is used when set; one that does not answer fails, masked."""
    monkeypatch.setenv(brokers.ENV_URL, broker_url)
    assert brokers.resolve_broker()[0] == broker_url
    monkeypatch.setenv(brokers.ENV_URL, f"amqp://u:s3cr3t@127.0.0.1:{brokers.free_port()}//")
    with pytest.raises(brokers.BrokerSetupError) as info:
        brokers.resolve_broker()
    assert "s3cr3t" not in str(info.value) and "u:**@" in str(info.value)


def test_docker_path_starts_a_container(monkeypatch: pytest.MonkeyPatch, broker_url: str) -> None:
    """With Docker answering, a RabbitMQ container is started, probed, and stopped at the end."""
    from urllib.parse import urlsplit

    import testcontainers.core.container as tc

    where = urlsplit(broker_url.split(";")[0])
    host, port = where.hostname or "127.0.0.1", where.port or 5672
    calls: list[str] = []

    class FakeContainer:
        def __init__(self, image: str) -> None:
            calls.append(image)

        def with_exposed_ports(self, *ports: int) -> FakeContainer:
            return self

        def start(self) -> FakeContainer:
            return self

        def get_container_host_ip(self) -> str:
            return host

        def get_exposed_port(self, p: int) -> int:
            return port

        def stop(self) -> None:
            calls.append("stop")

    monkeypatch.delenv(brokers.ENV_URL, raising=False)
    monkeypatch.setattr(brokers, "docker_answers", lambda timeout=2.0: True)
    monkeypatch.setattr(tc, "DockerContainer", FakeContainer)
    import sys

    monkeypatch.setitem(sys.modules, "testcontainers.rabbitmq", None)  # as without pika
    url, stop = brokers.resolve_broker()
    assert url == f"amqp://guest:guest@{host}:{port}//"
    stop()
    assert calls == [brokers.RABBITMQ_IMAGE, "stop"]
