"""A registry whose snapshot is far over the broker's max message size survives owner
restarts (SIGTERM then a new worker; SIGKILL with a hot standby): snapshots are written
in compressed parts, and no worker ever exits on its own."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import amqp
import pytest

from bench.owner import SCOPE, command_bodies, publish_confirmed
from brama_mq.client import Brama
from brama_mq.owner.failover import latest_snapshot
from brama_mq.owner.journal import AppliedIds, encode_snapshot
from brama_mq.transport import Topology
from brama_mq.transport.amqp import AmqpTransport
from tests import brokers
from tests.worker_proc import WorkerProcess

pytestmark = pytest.mark.private_node

LIMIT = 1024 * 1024  # the node's max_message_size for this module
CONNECTIONS = 25_000  # about 15 MB as one version-1 record; 3 parts of about 0.2 MB


@pytest.fixture
def node(
    private_node: brokers.PrivateNode, broker_registry: brokers.Registry, prefix: str
) -> Iterator[brokers.PrivateNode]:
    if not private_node.running():
        private_node.start()
    private_node.ctl("eval", f"application:set_env(rabbit, max_message_size, {LIMIT}).")
    broker_registry.track(prefix, private_node.url)
    try:
        yield private_node
    finally:
        private_node.ctl("eval", "application:unset_env(rabbit, max_message_size).",
                         check=False)


def _limit_is_enforced(url: str) -> bool:
    """Whether the node refuses a message just over LIMIT (PRECONDITION_FAILED)."""
    conn = amqp.Connection(url.split("@")[1].rstrip("/"),
                           userid="guest", password="guest")
    conn.connect()
    try:
        ch = conn.channel()
        ch.confirm_select()
        try:
            ch.basic_publish(amqp.Message(b"x" * (LIMIT + 1)), exchange="",
                             routing_key="brama-nowhere", mandatory=False)
            conn.drain_events(timeout=3)
        except amqp.exceptions.PreconditionFailed:
            return True
        except Exception:  # a timeout: it was accepted
            return False
        return False
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def test_a_registry_over_the_message_size_limit_survives_restarts(
    node: brokers.PrivateNode, prefix: str, tmp_path: Path
) -> None:
    """25,000 connections (one-record snapshot ~15x the node's 1 MiB limit): the owner
    snapshots in parts; a new worker after SIGTERM, and a standby after SIGKILL, each
    take over with the whole registry; no worker exits on its own."""
    assert _limit_is_enforced(node.url)
    topology = Topology(prefix)
    transport = AmqpTransport(node.url, topology, connect_timeout=2, reconnect_timeout=5)
    transport.declare()
    settings = {"BRAMA_BROKER_URL": node.url, "BRAMA_PREFIX": prefix,
                "BRAMA_SNAPSHOT_INTERVAL": "0.5"}
    workers: list[WorkerProcess] = []

    def worker() -> WorkerProcess:
        w = WorkerProcess(tmp_path / f"worker{len(workers)}.log", settings)
        workers.append(w)
        return w

    stream = topology.snapshot_stream(None)

    def snapshot_size(timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while True:
            snap = latest_snapshot(transport, stream, prefix)
            size = 0 if snap is None else len(snap.engine)
            if size == CONNECTIONS or time.monotonic() > deadline:
                return size
            time.sleep(0.3)

    client = Brama(transport=transport, request_timeout=20)
    try:
        first = worker()
        first.wait_active()
        names = [f"big{i:06d}" for i in range(CONNECTIONS)]
        publish_confirmed(node.url, topology.commands_exchange,
                          [(topology.owner_key(None), b)
                           for b in command_bodies("register", names)])
        assert snapshot_size(60) == CONNECTIONS
        snap = latest_snapshot(transport, stream, prefix)
        assert snap is not None
        one_record = encode_snapshot(snap.engine, AppliedIds(), owner="x", n=1,
                                     kind="batch", ts=1)
        assert len(one_record) > 10 * LIMIT  # the version-1 record would be refused

        first.terminate()
        assert first.wait(30) == 0
        second = worker()
        second.wait_active()
        assert f"({CONNECTIONS} connections" in second.output()
        assert client.status(names[-1], scope=SCOPE)["state"] == "closed"

        standby = worker()
        standby.wait_ready()  # restored the parts, tails the journal
        time.sleep(1.0)  # the active owner writes another snapshot meanwhile
        second.kill()
        standby.wait_active(timeout=60)
        assert f"({CONNECTIONS} connections" in standby.output()
        assert client.status(names[0], scope=SCOPE)["state"] == "closed"
        assert standby.alive()
        for w in workers:
            out = w.output()
            assert "PRECONDITION_FAILED" not in out and "did not come back" not in out, out
            assert "Traceback" not in out, out
    finally:
        client.disconnect()
        for w in workers:
            w.close()
        with contextlib.suppress(Exception):
            transport.delete_topology()
        transport.close()


def test_a_snapshot_stream_of_an_earlier_version_is_used_as_it_is(
    node: brokers.PrivateNode, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A snapshot stream declared with the old 64 MiB retention does not stop the
    transport from declaring (stream arguments cannot change): kept, with a warning."""
    topology = Topology(prefix)
    stream = topology.snapshot_stream(None)
    conn = amqp.Connection(node.url.split("@")[1].rstrip("/"), userid="guest",
                           password="guest")
    conn.connect()
    try:
        conn.channel().queue_declare(stream, durable=True, auto_delete=False, arguments={
            "x-queue-type": "stream", "x-max-length-bytes": 64 * 1024 * 1024,
            "x-stream-max-segment-size-bytes": 8 * 1024 * 1024})
    finally:
        conn.close()
    transport = AmqpTransport(node.url, topology, connect_timeout=2, reconnect_timeout=5)
    try:
        with caplog.at_level("WARNING", logger="brama_mq.transport"):
            transport.declare()
        assert f"stream {stream} exists with x-max-length-bytes=67108864" in caplog.text
        assert latest_snapshot(transport, stream, prefix) is None
    finally:
        with contextlib.suppress(Exception):
            transport.delete_topology()
        transport.close()
