"""Subscribers under faults, with counts that show what was and was not lost:

* every kind of subscriber (transient, durable, batched, async) reconnects by itself after
  a cut connection and after two restarts of a throwaway broker node;
* a durable subscription that is away keeps its critical events across a broker restart;
* a stopped (SIGSTOP) durable subscriber: its events wait in its queue, the owner keeps
  going, and it handles every one of them once it runs again;
* a full ``{prefix}.dead`` drops its oldest dead letters and never holds the owner back.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import brama_mq
from brama_mq.client import Brama
from brama_mq.core.engine import Engine
from brama_mq.owner import run_owner
from brama_mq.protocol import Event, encode_command, make_command
from brama_mq.subscribe import Subscription
from brama_mq.transport import Topology
from brama_mq.transport.amqp import AmqpTransport
from tests import brokers
from tests.subscribe_helpers import NOW, Stack, owner_stack, wait_until
from tests.test_subscribe_processes import Child, _handled, _owner_rate, _preload


class _Kinds:
    """Five subscriptions to connection ``c`` of every kind, recording the seqs they got."""

    def __init__(self, transport: AmqpTransport, tag: str) -> None:
        self.got: dict[str, list[int]] = {k: [] for k in
                                          ("transient", "transient_batch", "durable",
                                           "durable_batch", "async_durable")}
        self.names = [f"{tag}d", f"{tag}b", f"{tag}a"]
        t = transport

        def one(kind: str) -> Any:
            return lambda e: self.got[kind].append(e.seq)

        def many(kind: str) -> Any:
            return lambda es: self.got[kind].extend(e.seq for e in es)

        self.subs: list[Subscription] = [
            brama_mq.subscribe(connection="c", handler=one("transient"), transport=t),
            brama_mq.subscribe(connection="c", handler=many("transient_batch"), batch_size=7,
                               batch_timeout=0.05, transport=t),
            brama_mq.subscribe(connection="c", name=self.names[0], handler=one("durable"),
                               transport=t),
            brama_mq.subscribe(connection="c", name=self.names[1],
                               handler=many("durable_batch"), batch_size=7,
                               batch_timeout=0.05, transport=t),
        ]
        for sub in self.subs:
            sub.start()
        ready: list[Subscription] = []
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._async(t, ready)), daemon=True
        )
        self._thread.start()
        wait_until(lambda: bool(ready), 10)
        self.subs.append(ready[0])

    async def _async(self, transport: AmqpTransport, ready: list[Subscription]) -> None:
        async with brama_mq.subscribe_async(connection="c", name=self.names[2],
                                            transport=transport) as sub:
            ready.append(sub.subscription)
            async for event in sub:
                self.got["async_durable"].append(event.seq)

    def reconnects(self) -> list[int]:
        """Reconnects of each subscription's connection (the transient ones share one)."""
        return [sub.stats()["reconnects"] for sub in self.subs]

    def connected(self) -> bool:
        """Every source has a live, set-up connection (bound again after a reconnect)."""
        for sub in self.subs:
            pump = sub._source_pump()
            source: Any = pump.source if pump is not None else None
            if source is None or source._conn is None or source._lost is not None:
                return False
        return True


def _seqs_of(stack: Stack) -> list[int]:
    return [e.seq for e in stack.events if e.connection == "c"]


@pytest.fixture
def private_stack(
    private_node: brokers.PrivateNode, prefix: str, broker_registry: brokers.Registry
) -> Iterator[Stack]:
    if not private_node.running():
        private_node.start()
    transport = AmqpTransport(private_node.url, Topology(prefix), connect_timeout=5,
                              reconnect_timeout=60, max_backoff=0.5)
    broker_registry.track_transport(prefix, transport)
    try:
        with owner_stack(transport) as s:
            yield s
    finally:
        brama_mq.unsubscribe()
        transport.close()


@pytest.mark.private_node
def test_every_kind_of_subscriber_reconnects_after_a_cut_and_two_broker_restarts(
    private_stack: Stack, private_node: brokers.PrivateNode
) -> None:
    """Transient, transient batched, durable, durable batched and async durable
    subscriptions each reconnect by themselves (backoff, rebinding) after the node closed
    every connection and after two restarts (each longer than their reconnect timeout),
    and get every event published once they were back; a durable subscription that was
    closed meanwhile finds every critical event published while it was away, across both
    restarts, in its queue."""
    stack = private_stack
    # The subscriptions' own transport gives up on a reconnect after 2 s, less than a
    # restart takes: their pumps must keep trying after that, not stop.
    t = AmqpTransport(private_node.url, Topology(stack.transport.topology.prefix),
                      connect_timeout=5, reconnect_timeout=2, max_backoff=0.5)
    tag = uuid.uuid4().hex[:6]
    kinds = _Kinds(t, tag)
    away_name = f"{tag}w"
    away = brama_mq.subscribe(connection="c", name=away_name, transport=t)
    away.close()  # the durable queue stays, bound, and collects while nobody consumes
    stack.client.register("c", max_attempts=100, wait=True)
    critical_away: list[int] = []

    def phase(n: int) -> None:
        """n failures and an open/close pair; every subscriber gets all of them."""
        for _ in range(n):
            stack.client.failure("c", wait=True)
        stack.client.open("c", wait=True)
        stack.client.close("c", wait=True)
        seqs = _seqs_of(stack)
        critical_away.extend(e.seq for e in stack.events
                             if e.connection == "c" and e.critical and e.seq not in
                             critical_away)

        def complete() -> bool:
            return all(set(seqs) <= set(got) for got in kinds.got.values())

        wait_until(complete, 30, lambda: f"{seqs[-3:]} vs "
                   f"{ {k: v[-3:] for k, v in kinds.got.items()} }")

    phase(3)
    faults = [
        ("cut", lambda: private_node.close_connections("brama test: cut")),
        ("restart", private_node.restart),
        ("restart", private_node.restart),
    ]
    for i, (_, fault) in enumerate(faults, start=1):
        fault()
        wait_until(lambda: min(kinds.reconnects()) >= i and kinds.connected(), 60,  # noqa: B023
                   lambda: f"reconnects {kinds.reconnects()}")
        phase(3)

    everything = _seqs_of(stack)
    assert everything == list(range(1, len(everything) + 1))
    for kind, got in kinds.got.items():
        if kind.startswith("durable") or kind.startswith("async"):
            # At-least-once with duplicates dropped: every event, each once. (Transient
            # events in the queue when the node stopped die with it, but none was there:
            # each phase waited for the subscribers to take all of its events.)
            assert sorted(got) == everything, (kind, got)
        else:
            # At-most-once: each phase's events, all of them (the queue was rebound
            # before the phase began); nothing twice.
            assert sorted(set(got)) == everything and len(got) == len(set(got)), (kind, got)
    # The durable subscription that was away: critical events are persistent and
    # survived both restarts in its durable queue (transient ones did not have to).
    back = brama_mq.subscribe(connection="c", name=away_name, transport=t)
    seen: list[Event] = []
    end = time.monotonic() + 20
    while time.monotonic() < end and not set(critical_away) <= {e.seq for e in seen}:
        got = back.receive(0.5)
        if got is not None:
            seen.append(got)
    assert set(critical_away) <= {e.seq for e in seen}, (critical_away, [e.seq for e in seen])
    assert len(critical_away) == 4 * 4  # open/close per phase: opened, closed, 2 state_change
    back.delete()
    brama_mq.unsubscribe()
    topo = t.topology
    t.delete_queues([q for name in kinds.names for q in
                     (topo.subscription_queue(name), topo.subscription_dead_queue(name))])
    t.close()


@pytest.mark.broker
def test_stopped_durable_subscriber_keeps_every_event_in_its_queue(
    amqp_transport: AmqpTransport, broker_url: str, prefix: str, tmp_path: Path
) -> None:
    """A named subscriber process stopped with SIGSTOP: the owner keeps going (no
    collapse next to its speed alone), the events wait in the durable queue (nothing
    dropped: ready + unacked in flight = all), and after SIGCONT the process handles each
    of them exactly once."""
    t = amqp_transport
    conns = [f"k{i}" for i in range(20)]
    n = 3000
    name = f"stall{uuid.uuid4().hex[:6]}"
    engine = Engine(lineage=t.topology.prefix)
    t.declare()
    first_owner = run_owner(t, engine=engine)
    client = Brama(transport=t)
    child: Child | None = None
    try:
        for c in conns:
            client.register(c, max_attempts=1_000_000, wait=True)
        first_owner.stop(wait=10)
        owner_queue = t.topology.owner_queue()

        def commands() -> list[bytes]:
            return [encode_command(make_command("failure", conns[i % 20], None, now_ms=NOW))
                    for i in range(n)]

        _preload(client, broker_url, owner_queue, commands())
        alone = _owner_rate(t, engine, n)
        args = ["--name", name, "--prefetch", "50"]
        for c in conns:
            args += ["--connection", c]
        child = Child(broker_url, prefix, tmp_path / "events.txt", *args)
        os.kill(child.pid, signal.SIGSTOP)
        try:
            _preload(client, broker_url, owner_queue, commands())
            stalled = _owner_rate(t, engine, n)
            probe = brokers.WireProbe(broker_url, t.topology.subscription_queue(name),
                                      declare=False)
            try:
                ready = probe.wait_depth(n - 50, 10)  # the last events may be in flight
            finally:
                probe.close()
        finally:
            os.kill(child.pid, signal.SIGCONT)
        assert n - 50 <= ready <= n, ready  # at most the prefetch window is in flight
        wait_until(lambda: len(_handled(child.lines())) >= n, 60,  # type: ignore[union-attr]
                   lambda: f"{len(_handled(child.lines()))} handled")  # type: ignore[union-attr]
        time.sleep(0.5)  # anything handled twice would show up now
        handled = _handled(child.lines())
        assert len(handled) == n and len({(c, s) for _, c, s in handled}) == n
        print(f"owner alone {alone:.0f}/s, durable subscriber stopped {stalled:.0f}/s; "
              f"{ready} events waited in its queue")
        assert stalled >= 0.3 * alone, (alone, stalled)  # loose: a shared 2-core machine
    finally:
        if child is not None:
            child.stop()
        client.disconnect()
        t.delete_queues([t.topology.subscription_queue(name),
                         t.topology.subscription_dead_queue(name)])


@pytest.mark.broker
def test_full_dead_letter_queue_drops_its_oldest_and_never_holds_the_owner_back(
    broker_url: str, prefix: str, broker_registry: brokers.Registry
) -> None:
    """With ``{prefix}.dead`` at its length limit, each new dead letter pushes out the
    oldest (drop-head): the owner's dead letters are all confirmed, it keeps applying the
    good commands between them (every one, in order), and the queue holds exactly the
    newest ``dead_max_length`` bad commands, each with its reason."""
    limit, bad = 10, 60
    t = AmqpTransport(broker_url, Topology(prefix, dead_max_length=limit), connect_timeout=5)
    broker_registry.track_transport(prefix, t)
    try:
        with owner_stack(t) as stack:
            stack.client.register("c", max_attempts=1_000_000, wait=True)
            base = len(_seqs_of(stack))
            link: Any = stack.client.link
            bodies = []
            for i in range(bad):
                bodies.append((encode_command(make_command("failure", "c", None, now_ms=NOW)),
                               "owner"))
                bodies.append((b"not json %d" % i, "owner"))
            link.send_many(bodies)
            wait_until(lambda: stack.owner.stats.dead_lettered >= bad
                       and len(_seqs_of(stack)) >= base + bad, 30,
                       lambda: f"{stack.owner.stats.dead_lettered} dead, "
                       f"{len(_seqs_of(stack))} events")
            assert _seqs_of(stack) == list(range(1, base + bad + 1))  # every good one applied
            assert stack.owner.stats.dead_lettered == bad
            probe = brokers.WireProbe(broker_url, t.topology.dead_queue, declare=False)
            try:
                assert probe.wait_depth(limit, 10) == limit
                time.sleep(0.3)
                assert probe.depth() == limit  # never above the limit
                kept = probe.take()
            finally:
                probe.close()
            assert [bytes(m.body) for m in kept] == [b"not json %d" % i
                                                     for i in range(bad - limit, bad)]
            assert all("x-brama-error" in m.headers for m in kept)
            # The owner still works after the flood.
            stack.client.failure("c", wait=True)
            assert _seqs_of(stack)[-1] == base + bad + 1
    finally:
        t.close()


def test_dead_queue_arguments_bound_it_and_are_checked() -> None:
    """The dead queue is a quorum queue (replicated on a cluster) with drop-head limits by
    default; None lifts a limit;
    nonsense is refused naming the field."""
    assert Topology("p").dead_queue_arguments() == {
        "x-queue-type": "quorum",
        "x-max-length": 100_000, "x-max-length-bytes": 128 * 1024 * 1024,
        "x-overflow": "drop-head",
    }
    assert Topology("p", dead_max_length=None, dead_max_bytes=None).dead_queue_arguments() == {
        "x-queue-type": "quorum"}
    assert Topology("p", dead_max_bytes=None).dead_queue_arguments() == {
        "x-queue-type": "quorum", "x-max-length": 100_000, "x-overflow": "drop-head"}
    with pytest.raises(ValueError, match="dead_max_length"):
        Topology("p", dead_max_length=0)
    with pytest.raises(ValueError, match="dead_max_bytes"):
        Topology("p", dead_max_bytes=-5)


@pytest.mark.broker
def test_sigkill_inside_a_batch_handler_redelivers_the_whole_batch(
    amqp_transport: AmqpTransport, broker_url: str, prefix: str, tmp_path: Path
) -> None:
    """A named batch subscriber SIGKILLed inside its batch handler: every event of that
    batch (none acknowledged) comes again to the restarted process; between the two
    processes every event was handled (at least once: batches handled just before the
    kill may not have been acked yet), and the second handled none twice."""
    name = f"batchvictim{uuid.uuid4().hex[:6]}"
    out = tmp_path / "events.txt"
    children: list[Child] = []
    try:
        with owner_stack(amqp_transport) as stack:
            stack.client.register("api", max_attempts=1_000, wait=True)
            base = len(_seqs_of_conn(stack, "api"))
            hang = base + 25
            first = Child(broker_url, prefix, out, "--name", name, "--connection", "api",
                          "--batch-size", "10", "--hang-on-seq", str(hang))
            children.append(first)
            stack.send([("failure", "api", None, {}) for _ in range(40)])
            wait_until(lambda: any(w[0] == "entered" for w in first.lines()), 20)
            os.kill(first.pid, signal.SIGKILL)
            first.proc.wait(10)
            entered = next(w for w in first.lines() if w[0] == "entered")
            batch = [int(x) for x in entered[2:]]
            assert hang in batch
            before = [seq for _, _, seq in _handled(first.lines())]
            assert not set(before) & set(batch)
            second = Child(broker_url, prefix, out, "--name", name, "--connection", "api",
                           "--batch-size", "10")
            children.append(second)
            last = base + 40
            wait_until(lambda: last in [s for _, _, s in _handled(second.lines())], 20)
            time.sleep(0.5)  # anything handled twice would show up now
            after = [seq for pid, _, seq in _handled(second.lines()) if pid == str(second.pid)]
            assert set(batch) <= set(after)  # the killed batch, again
            assert set(before) | set(after) == set(range(base + 1, last + 1))
            assert len(after) == len(set(after))
    finally:
        for child in children:
            child.stop()
        topo = amqp_transport.topology
        amqp_transport.delete_queues([topo.subscription_queue(name),
                                      topo.subscription_dead_queue(name)])


def _seqs_of_conn(stack: Stack, connection: str) -> list[int]:
    return [e.seq for e in stack.events if e.connection == connection]


#: ``{prefix}.dead`` as earlier versions declared it: classic, unbounded or bounded.
LEGACY_DEAD_QUEUES = [
    ("classic unbounded", {}, "unbounded"),
    ("classic bounded", {"x-max-length": 100_000, "x-max-length-bytes": 128 * 1024 * 1024,
                         "x-overflow": "drop-head"}, "classic queue"),
]


@pytest.mark.broker
@pytest.mark.parametrize(("shape", "arguments", "said"), LEGACY_DEAD_QUEUES,
                         ids=[c[0] for c in LEGACY_DEAD_QUEUES])
def test_a_dead_queue_from_before_is_kept_and_the_owner_starts(
    broker_url: str, prefix: str, broker_registry: brokers.Registry,
    caplog: pytest.LogCaptureFixture, shape: str, arguments: dict[str, Any], said: str,
) -> None:
    """A ``{prefix}.dead`` declared by an earlier version (classic, with or without the
    limits) does not stop the owner: RabbitMQ refuses the new arguments, the transport says
    so in one warning naming the queue and the migration section, keeps the queue as it
    is, and dead-letters into it."""
    t = AmqpTransport(broker_url, Topology(prefix), connect_timeout=5)
    broker_registry.track_transport(prefix, t)
    old = brokers.WireProbe(broker_url, t.topology.dead_queue, declare=False)
    old._ch.queue_declare(t.topology.dead_queue, durable=True, auto_delete=False,
                          arguments=arguments)
    try:
        with caplog.at_level("WARNING", logger="brama_mq.transport.amqp"), \
                owner_stack(t) as stack:
            stack.client.register("c", wait=True)
            stack.client.link.send(b"not json")
            assert old.wait_depth(1, 10) == 1
            stack.client.failure("c", wait=True)  # and it goes on
        warned = [r.getMessage() for r in caplog.records
                  if t.topology.dead_queue in r.getMessage() and r.levelname == "WARNING"]
        assert len(warned) == 1, warned
        assert said in warned[0] and "Migrating classic queues" in warned[0], warned[0]
    finally:
        old.close()
        t.close()
