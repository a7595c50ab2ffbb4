"""The transport contract, run here on MemoryTransport (test_transport_amqp.py runs the
same :class:`TransportContract` against RabbitMQ), plus memory-only behaviours."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from brama_mq.errors import RequestTimeoutError, TransportError
from brama_mq.transport import Delivery, Outgoing, Topology, Transport
from brama_mq.transport.memory import MemoryTransport

#: (routing_key, body, headers) of a message found in a queue.
Seen = tuple[str, bytes, dict[str, Any]]


def _events(n: int, key: str = "payments.api.state_change", *, critical: bool = True,
            tag: str = "e") -> list[Outgoing]:
    return [Outgoing(key, f'{{"n":{i}}}'.encode(), critical, f"{tag}{i}") for i in range(n)]


def _fetch_n(link: Any, n: int, timeout: float = 10.0) -> list[Delivery]:
    """Fetch until ``n`` deliveries arrived (or the time is up)."""
    out: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += link.fetch(n - len(out), 0.5)
    return out


def _get_n(source: Any, n: int, timeout: float = 10.0) -> list[Delivery]:
    out: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += source.get(0.5)
    return out


def _answer_one(link: Any, prefix: bytes = b"re:") -> threading.Thread:
    """A thread that answers the next request on ``link`` (owner side of an RPC)."""

    def run() -> None:
        for d in _fetch_n(link, 1):
            assert d.reply_to is not None
            link.reply(d.reply_to, d.correlation_id, prefix + d.body)
            link.ack(d.delivery_tag)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


class TransportContract:
    """Behaviours every Transport must show; subclasses provide ``transport`` and the
    two ways of looking into a queue independently of the links under test."""

    def depth(self, transport: Any, queue: str) -> int:
        raise NotImplementedError

    def read(self, transport: Any, queue: str) -> list[Seen]:
        raise NotImplementedError

    def wait_depth(self, transport: Any, queue: str, n: int, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            d = self.depth(transport, queue)
            if d >= n or time.monotonic() > deadline:
                return d
            time.sleep(0.05)

    def durable_probe(self, transport: Transport, name: str, keys: list[str]) -> str:
        """A durable queue bound to the events exchange that nobody consumes."""
        src = transport.event_source(queue=name, durable=True)
        src.bind(keys)
        src.close()
        return name

    # -- topology and commands -----------------------------------------------------------
    def test_declare_is_idempotent(self, transport: Transport) -> None:
        """Declaring twice is harmless and leaves a working owner queue."""
        transport.declare()
        transport.declare()
        owner = transport.owner_link()
        transport.client_link().send(b'{"op":"success"}')
        assert [d.body for d in _fetch_n(owner, 1)] == [b'{"op":"success"}']

    def test_send_arrives_at_fetch(self, transport: Transport) -> None:
        """ClientLink.send delivers persistent JSON commands to OwnerLink.fetch, in order."""
        owner = transport.owner_link(prefetch=50)
        client = transport.client_link()
        for i in range(20):
            client.send(f'{{"i":{i}}}'.encode(), message_id=f"m{i}")
        got = _fetch_n(owner, 20)
        assert [d.body for d in got] == [f'{{"i":{i}}}'.encode() for i in range(20)]
        assert [d.properties["message_id"] for d in got] == [f"m{i}" for i in range(20)]
        assert {d.content_type for d in got} == {"application/json"}
        assert {d.routing_key for d in got} == {"owner"}
        assert not any(d.redelivered for d in got)
        owner.ack(got[-1].delivery_tag, multiple=True)

    def test_fetch_returns_buffered_without_waiting_more(self, transport: Transport) -> None:
        """fetch returns what is there at once (up to max_messages) and [] on timeout."""
        owner = transport.owner_link(prefetch=100)
        client = transport.client_link()
        for i in range(30):
            client.send(b"x%d" % i)
        time.sleep(0.3)
        t0 = time.monotonic()
        first = owner.fetch(10, 5.0)
        assert time.monotonic() - t0 < 2.0
        assert 1 <= len(first) <= 10
        rest = _fetch_n(owner, 30 - len(first))
        assert len(first) + len(rest) == 30
        owner.ack(rest[-1].delivery_tag)
        t0 = time.monotonic()
        assert owner.fetch(10, 0.3) == []
        assert 0.25 <= time.monotonic() - t0 < 2.0

    def test_single_active_consumer(self, transport: Transport) -> None:
        """Only the first owner gets commands; when it leaves, its unacked ones go to the next."""
        first = transport.owner_link(prefetch=50)
        second = transport.owner_link(prefetch=50)
        client = transport.client_link()
        for i in range(5):
            client.send(b"c%d" % i)
        got = _fetch_n(first, 5)
        assert len(got) == 5
        assert second.fetch(10, 0.5) == []
        first.close()
        again = _fetch_n(second, 5)
        assert [d.body for d in again] == [b"c0", b"c1", b"c2", b"c3", b"c4"]
        assert all(d.redelivered for d in again)

    # -- events ---------------------------------------------------------------------------
    def test_2000_critical_events_confirmed_and_stored(self, transport: Transport) -> None:
        """2,000 critical events: wait_confirms returns 2000 and a wildcard-bound queue has 2000."""
        probe = f"{transport.topology.prefix}.probe"
        self.durable_probe(transport, probe, ["*.*.state_change"])
        owner = transport.owner_link()
        owner.publish(_events(2000))
        assert owner.wait_confirms(30.0) == 2000
        assert self.wait_depth(transport, probe, 2000) == 2000
        stats = owner.stats()
        assert stats["confirmed"] == 2000 and stats["returned"] == 0 and stats["pending"] == 0
        assert owner.wait_confirms(1.0) == 0

    def test_transient_events_arrive(self, transport: Transport) -> None:
        """Transient events reach a subscriber bound with wildcards; others are filtered out."""
        src = transport.event_source()
        src.bind(["payments.*.*", "#.circuit_opened"])
        owner = transport.owner_link()
        owner.publish(
            [
                Outgoing("payments.api.failure", b"1", False, "a"),
                Outgoing("ledger.db.failure", b"2", False, "b"),
                Outgoing("ledger.db.circuit_opened", b"3", True, "c"),
                Outgoing("payments.api.success", b"4", False, "d"),
            ]
        )
        owner.wait_confirms(10.0)
        got = _get_n(src, 3)
        assert sorted(d.body for d in got) == [b"1", b"3", b"4"]
        assert {d.properties.get("delivery_mode") for d in got if d.body != b"3"} == {1}
        assert [d.properties.get("delivery_mode") for d in got if d.body == b"3"] == [2]
        src.ack(got[-1].delivery_tag)
        assert src.get(0.3) == []

    def test_unroutable_critical_is_returned_and_confirmed(self, transport: Transport) -> None:
        """A critical event nobody is bound for is counted as returned, confirmed, not retried."""
        owner = transport.owner_link()
        owner.publish(_events(3, "nobody.listens.state_change"))
        assert owner.wait_confirms(10.0) == 3
        stats = owner.stats()
        assert stats["returned"] == 3
        assert stats["republished"] == 0 and stats["pending"] == 0

    def test_dead_letter_carries_reason(self, transport: Transport) -> None:
        """dead_letter puts a copy in {p}.dead with x-brama-error and the original key."""
        owner = transport.owner_link()
        transport.client_link().send(b"{not json", message_id="bad-1")
        (d,) = _fetch_n(owner, 1)
        owner.dead_letter(d, "bad JSON: Expecting property name")
        assert owner.wait_confirms(10.0) == 1
        owner.ack(d.delivery_tag)
        dead = transport.topology.dead_queue
        assert self.wait_depth(transport, dead, 1) == 1
        ((_key, body, headers),) = self.read(transport, dead)
        assert body == b"{not json"
        assert headers["x-brama-error"] == "bad JSON: Expecting property name"
        assert headers["x-brama-original-routing-key"] == "owner"

    # -- RPC --------------------------------------------------------------------------------
    def test_request_reply_round_trip(self, transport: Transport) -> None:
        """request() gets the owner's reply through direct reply-to."""
        owner = transport.owner_link()
        client = transport.client_link()
        th = _answer_one(owner)
        assert client.request(b'{"q":"status"}', timeout=10.0) == b're:{"q":"status"}'
        th.join(5)

    def test_concurrent_requests_get_their_own_answers(self, transport: Transport) -> None:
        """Threads sharing one ClientLink each get the answer to their own request."""
        owner = transport.owner_link()
        client = transport.client_link()
        n = 8
        answers: dict[int, bytes] = {}

        def answer_all() -> None:
            for d in _fetch_n(owner, n, timeout=20):
                assert d.reply_to is not None
                owner.reply(d.reply_to, d.correlation_id, b"re:" + d.body)
                owner.ack(d.delivery_tag)

        def ask(i: int) -> None:
            answers[i] = client.request(b"%d" % i, timeout=20.0)

        answerer = threading.Thread(target=answer_all, daemon=True)
        answerer.start()
        askers = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
        for t in askers:
            t.start()
        for t in askers:
            t.join(30)
        answerer.join(5)
        assert answers == {i: b"re:%d" % i for i in range(n)}

    def test_request_times_out_without_answerer(self, transport: Transport) -> None:
        """With no owner answering, request() raises RequestTimeoutError after its timeout."""
        transport.declare()
        client = transport.client_link()
        t0 = time.monotonic()
        with pytest.raises(RequestTimeoutError):
            client.request(b"{}", timeout=0.5)
        assert 0.45 <= time.monotonic() - t0 < 3.0

    def test_send_to_unbound_key_is_an_error(self, transport: Transport) -> None:
        """A command for a routing key with no owner queue raises instead of vanishing."""
        client = transport.client_link()
        with pytest.raises(TransportError, match="unroutable"):
            client.send(b"{}", routing_key="owner.nope")

    def test_concurrent_sends_all_arrive(self, transport: Transport) -> None:
        """Eight threads sending on one ClientLink: every command arrives exactly once."""
        owner = transport.owner_link(prefetch=500)
        client = transport.client_link()

        def sender(k: int) -> None:
            for i in range(40):
                client.send(b"%d-%d" % (k, i))

        threads = [threading.Thread(target=sender, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        got = _fetch_n(owner, 320, timeout=20)
        assert sorted(d.body for d in got) == sorted(
            b"%d-%d" % (k, i) for k in range(8) for i in range(40)
        )

    def test_max_length_drops_oldest(self, transport: Transport) -> None:
        """An event source with max_length keeps only the newest messages (drop-head)."""
        name = f"{transport.topology.prefix}.bounded"
        src = transport.event_source(queue=name, durable=True, max_length=5)
        src.bind(["#"])
        src.close()
        owner = transport.owner_link()
        owner.publish(_events(12, "a.b.failure", critical=True))
        owner.wait_confirms(10)
        assert self.wait_depth(transport, name, 5) == 5
        time.sleep(0.1)
        assert [b for _, b, _ in self.read(transport, name)] == [
            f'{{"n":{i}}}'.encode() for i in range(7, 12)
        ]


class TestMemoryTransport(TransportContract):
    """The contract on the in-process transport."""

    @pytest.fixture
    def transport(self, memory_transport: MemoryTransport) -> Iterator[MemoryTransport]:
        yield memory_transport

    def depth(self, transport: Any, queue: str) -> int:
        return int(transport.broker.inspect(queue)["messages"])

    def read(self, transport: Any, queue: str) -> list[Seen]:
        found = transport.broker.messages(queue)
        return [(k, b, dict(p.get("headers") or {})) for k, b, p in found]


# -- memory-only -------------------------------------------------------------------------


def test_drop_head_is_counted(memory_transport: MemoryTransport) -> None:
    """A bounded memory queue counts what drop-head discarded."""
    src = memory_transport.event_source(max_length=3)
    src.bind(["#"])
    owner = memory_transport.owner_link()
    owner.publish(_events(10, "a.b.c", critical=False))
    assert src.stats()["dropped"] == 7
    assert [d.body for d in src.get(0.1)] == [f'{{"n":{i}}}'.encode() for i in range(7, 10)]


@pytest.mark.parametrize(
    ("pattern", "key", "routed"),
    [
        ("#", "a.b.c", True),
        ("a.#", "a", True),
        ("*.b.*", "a.b.c", True),
        ("*.b.*", "a.b", False),
        ("a.*", "a.b.c", False),
        ("#.c", "c", True),
        ("a*.b.c", "ab.b.c", False),
    ],
)
def test_topic_routing_has_rabbitmq_semantics(
    memory_transport: MemoryTransport, pattern: str, key: str, routed: bool
) -> None:
    """Bindings match like RabbitMQ's topic exchange (* one word, # zero or more)."""
    src = memory_transport.event_source()
    src.bind([pattern])
    owner = memory_transport.owner_link()
    owner.publish([Outgoing(key, b"x", True, "m")])
    owner.wait_confirms(1)
    assert bool(src.get(0.05)) is routed
    assert owner.stats()["returned"] == (0 if routed else 1)


def test_poison_command_is_dead_lettered_after_delivery_limit() -> None:
    """A command redelivered past the delivery limit goes to the dead queue, not round again."""
    transport = MemoryTransport(Topology("poison", delivery_limit=2))
    transport.client_link().send(b"boom")
    for _ in range(3):
        link = transport.owner_link()
        assert [d.body for d in link.fetch(1, 1.0)] == [b"boom"]
        link.close()  # crash without ack
    assert transport.owner_link().fetch(1, 0.1) == []
    assert [b for _, b, _ in transport.broker.messages("poison.dead")] == [b"boom"]


def test_late_reply_is_dropped(memory_transport: MemoryTransport) -> None:
    """A reply arriving after the request timed out is dropped, not kept forever."""
    owner = memory_transport.owner_link()
    client = memory_transport.client_link()
    with pytest.raises(RequestTimeoutError):
        client.request(b"q", timeout=0.05)
    (d,) = owner.fetch(1, 1.0)
    assert d.reply_to is not None
    owner.reply(d.reply_to, d.correlation_id, b"late")
    assert all(not box.replies for box in memory_transport.broker.reply_boxes.values())


def test_links_match_the_protocols(memory_transport: MemoryTransport) -> None:
    """The memory links satisfy the base.py protocols (runtime-checkable)."""
    from brama_mq.transport import ClientLink, EventSource, OwnerLink

    assert isinstance(memory_transport, Transport)
    assert isinstance(memory_transport.owner_link(), OwnerLink)
    assert isinstance(memory_transport.client_link(), ClientLink)
    assert isinstance(memory_transport.event_source(), EventSource)
