"""A ``brama-mq worker`` process against a private RabbitMQ node that the tests restart
and whose connections they close: the same worker process reconnects by itself and no
critical event is lost (at least once: a repeated event repeats its ``id`` and ``seq``).

What reached the broker is read from a durable classic queue bound before the load,
with plain kombu (tests/wire.py), not with brama_mq's subscriber code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import amqp
import kombu
import pytest
from amqp import spec

from brama_mq.errors import BramaError
from brama_mq.protocol import encode_command, make_command
from brama_mq.transport import Topology
from tests import brokers
from tests.node_setup import NodeSetup, deployed
from tests.wire import Seen

pytestmark = pytest.mark.private_node

CRITICAL_KEYS = ["#.state_change", "#.circuit_opened"]


class Setup(NodeSetup):
    """A client transport, a durable tap queue and a worker, all on the private node."""

    critical_keys = CRITICAL_KEYS


@pytest.fixture
def setup(
    private_node: brokers.PrivateNode, prefix: str, tmp_path: Path,
    broker_registry: brokers.Registry,
) -> Iterator[Setup]:
    with deployed(Setup, private_node, prefix, tmp_path, broker_registry) as s:
        yield s


def _in_parallel(calls: list[Callable[[], object]], threads: int = 8) -> None:
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(call) for call in calls]:
            future.result()


def _retrying(send: Callable[[], object], give_up: float) -> int:
    """Call ``send`` until it returns (the broker confirmed); returns how many tries failed."""
    failed = 0
    while True:
        try:
            send()
            return failed
        except BramaError:
            failed += 1
            if time.monotonic() > give_up:
                raise
            time.sleep(0.2)


def _check_openings(seen: list[Seen], names: list[str]) -> None:
    """Each name has circuit_opened and state_change; repeats of one share id and seq."""
    by: dict[tuple[str, str], set[tuple[str, int]]] = defaultdict(set)
    for s in seen:
        by[(str(s.body["connection"]), s.event)].add((str(s.body["id"]), int(s.body["seq"])))
        assert s.delivery_mode == 2, s
    for n in names:
        for event in ("circuit_opened", "state_change"):
            assert len(by[(n, event)]) == 1, (n, event, by[(n, event)])
        (_, opened_seq), = by[(n, "circuit_opened")]
        (_, change_seq), = by[(n, "state_change")]
        assert change_seq == opened_seq + 1


def _covers(names: list[str]) -> Callable[[list[Seen]], bool]:
    def done(seen: list[Seen]) -> bool:
        got = {(str(s.body.get("connection")), s.event) for s in seen}
        return all((n, "circuit_opened") in got and (n, "state_change") in got for n in names)

    return done


def test_worker_reconnects_by_itself_across_a_node_restart(setup: Setup) -> None:
    """Node restarted mid-load: the same worker process reconnects, and every confirmed
    failure's circuit_opened and state_change are in the durable queue. A standby worker
    told to stop while the node is down exits 0 at once instead of retrying for a minute."""
    worker = setup.start_worker()
    pid = worker.pid
    standby = setup.start_worker()  # same queue: waits behind the active one
    client = setup.client
    names = [f"n{i:04d}" for i in range(1000)]
    _in_parallel([lambda n=n: client.register(n, scope="r", max_attempts=1,
                                              expiry_ms=600_000) for n in names])
    assert client.status(names[-1], scope="r")["state"] == "closed"  # all applied

    confirmed: list[str] = []
    retried = 0
    buffered = 0  # most commands the client held while the broker was away
    problem: list[BaseException] = []
    node_down = threading.Event()

    def send_failures() -> None:
        nonlocal retried, buffered
        give_up = time.monotonic() + 120
        try:
            for i, n in enumerate(names):
                if i == 2 * len(names) // 3:
                    node_down.wait(60)  # the last third is sent into the outage
                retried += _retrying(lambda n=n: client.failure(n, scope="r"), give_up)
                if node_down.is_set():
                    buffered = max(buffered, client.pending())
                confirmed.append(n)
        except BaseException as exc:
            problem.append(exc)

    sender = threading.Thread(target=send_failures, daemon=True)
    sender.start()
    deadline = time.monotonic() + 60
    while len(confirmed) < len(names) // 3 and sender.is_alive():
        assert time.monotonic() < deadline, "the failures are not being confirmed"
        time.sleep(0.01)
    at_restart = len(confirmed)
    setup.node.stop()
    node_down.set()
    standby.wait_for_log("cannot reach", timeout=30)  # it is retrying the connection
    t0 = time.monotonic()
    standby.terminate()
    assert standby.wait(10) == 0, standby.output()
    assert time.monotonic() - t0 < 3, "SIGTERM must not wait for the broker to come back"
    assert "stopped while the broker is unreachable" in standby.output()
    setup.node.start()
    sender.join(150)
    assert not problem, problem
    assert confirmed == names
    # The client either retried (an error reached the caller) or buffered commands
    # while the broker was away (flushed on reconnect): either way none is lost.
    assert at_restart < len(names) and (retried > 0 or buffered > 0), (
        "the load went on across the outage")
    assert client.flush(60)

    worker.wait_for_log("owner link connected to", timeout=60)
    seen = setup.read_tap(_covers(confirmed), timeout=90)
    _check_openings(seen, confirmed)
    assert worker.alive() and worker.pid == pid
    os.kill(pid, 0)
    log = worker.output()
    assert log.count("worker starting") == 1, log
    assert "owner link lost its connection" in log, log
    assert "owner link connected to" in log, log
    assert client.status(names[0], scope="r")["state"] == "open"
    worker.terminate()
    assert worker.wait(20) == 0, worker.output()


def _prepublish(url: str, topology: Topology, commands: list[bytes]) -> None:
    """Publish persistent commands, pipelined, and wait until the broker confirmed all."""
    settled: set[int] = set()
    nacked: list[int] = []

    def on_ack(tag: int, multiple: bool) -> None:
        settled.update(range(1, tag + 1) if multiple else (tag,))

    def on_nack(tag: int, multiple: bool) -> None:
        nacked.append(tag)

    with kombu.Connection(url, connect_timeout=5) as conn:
        conn.ensure_connection(max_retries=0, reraise_as_library_errors=False)
        ch = conn.connection.channel()
        ch.confirm_select()
        ch.events["basic_ack"].add(on_ack)
        ch.events["basic_nack"].add(on_nack)
        for body in commands:  # basic.publish without py-amqp's wait for each confirm
            ch.send_method(
                spec.Basic.Publish, "Bssbb", (0, topology.commands_exchange, "owner", True, False),
                amqp.Message(body, delivery_mode=2, content_type="application/json"),
            )
        deadline = time.monotonic() + 60
        while len(settled) < len(commands) and not nacked:
            assert time.monotonic() < deadline, f"{len(settled)} of {len(commands)} confirmed"
            with contextlib.suppress(TimeoutError):
                conn.connection.drain_events(timeout=0.5)
        assert not nacked, f"the broker refused commands {nacked[:10]}"
        ch.close()


def test_no_critical_event_lost_when_connections_are_closed_mid_storm(setup: Setup) -> None:
    """close_all_connections in the middle of a storm of 3,000 openings, while the active
    worker waits for confirms of events the broker has not taken, and a hot standby is
    running: whichever reconnects first gets the queue, unconfirmed publishes go out
    again, every opening's circuit_opened and state_change reach the durable queue, and
    every connection's seq is exactly what applying each command once gives."""
    names = [f"s{i:04d}" for i in range(3000)]
    now = int(time.time() * 1000)
    policy = {"max_attempts": 1, "expiry_ms": 600_000}
    node = setup.node
    worker = setup.start_worker(BRAMA_PREFETCH="50")
    worker.wait_for_log("owner active")  # it has the queue; the standby waits behind it
    standby = setup.start_worker(BRAMA_PREFETCH="50")
    _prepublish(setup.node.url, setup.topology, [
        encode_command(make_command(op, n, "x", options=policy if op == "register" else None,
                                    now_ms=now))
        for op in ("register", "failure") for n in names
    ])
    probe = brokers.WireProbe(node.url, setup.tap_queue, declare=False)
    try:
        deadline = time.monotonic() + 60
        while probe.depth() < 300:  # the storm of openings is under way
            assert time.monotonic() < deadline, "the storm did not start within 60 s"
            time.sleep(0.005)
        # A memory alarm makes the broker stop reading publishing connections: the worker's
        # next events stay unconfirmed. The worker is frozen meanwhile, so the storm cannot
        # end before the alarm is on, however slow rabbitmqctl is.
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            node.ctl("set_vm_memory_high_watermark", "0")
        finally:
            os.kill(worker.pid, signal.SIGCONT)
        try:
            time.sleep(0.5)
            stuck_at = probe.depth()
            time.sleep(0.3)
            assert probe.depth() == stuck_at < 2 * len(names), "the worker is not blocked"
            node.close_connections("brama test: mid storm, confirms outstanding")
        finally:
            node.ctl("set_vm_memory_high_watermark", "0.4")
    finally:
        probe.close()
    seen = setup.read_tap(_covers(names), timeout=90)
    _check_openings(seen, names)
    statuses = {str(s["connection"]): s for s in setup.client.snapshot(scope="x")}
    # register (2 events), then failure, circuit_opened, state_change: seq 5, once each.
    assert {n: (statuses[n]["state"], statuses[n]["seq"]) for n in names} == {
        n: ("open", 5) for n in names}
    log = worker.output()
    assert "owner link lost its connection" in log and "(epoch 2)" in log, log
    assert worker.alive() and standby.alive()
    for w in (worker, standby):
        w.terminate()
        assert w.wait(20) == 0, w.output()


def test_worker_survives_a_frozen_node_and_serves_again(setup: Setup) -> None:
    """SIGSTOP of the worker's only node for longer than its lease: the owner gets no
    confirm, so it stops acting ("owner lease lost"), drops the connection and keeps
    trying to reconnect; after SIGCONT it takes the queue again through a new takeover
    and serves. The worker never exits (issue 14: a broker fault never ends a worker)."""
    worker = setup.start_worker(BRAMA_HEARTBEAT="2")  # lease 1 s
    worker.wait_active()
    setup.client.register("frozen", max_attempts=2, expiry_ms=3_600_000, wait=True)
    try:
        setup.node.signal_group(signal.SIGSTOP)
        worker.wait_for_log("owner lease lost", timeout=20)
        time.sleep(3)  # reconnect attempts against the frozen node time out meanwhile
    finally:
        setup.node.signal_group(signal.SIGCONT)
    worker.wait_active(timeout=60, count=2)
    for _ in range(2):
        setup.client.failure("frozen", reason="after the freeze", wait=True)
    assert setup.client.status("frozen")["state"] == "open"
    assert worker.alive(), worker.output()
    out = worker.output()
    assert "Traceback" not in out, out
