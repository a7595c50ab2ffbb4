"""A deployment on a private node for fault-injection tests: a client, a durable tap
queue bound to the critical events before any load, and worker processes."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from brama_mq.client import Brama
from brama_mq.transport import Topology
from brama_mq.transport.amqp import AmqpTransport
from tests import brokers
from tests.wire import KombuTap, Seen
from tests.worker_proc import WorkerProcess


class NodeSetup:
    """What the failover and restart tests share; ``critical_keys`` are the tap's bindings."""

    critical_keys: list[str] = ["#.state_change", "#.circuit_opened"]

    def __init__(self, node: brokers.PrivateNode, prefix: str, tmp_path: Path) -> None:
        self.node = node
        self.topology = Topology(prefix)
        # Short reconnect window: a test sees an outage quickly (sends buffer or raise).
        self.transport = AmqpTransport(
            node.url, self.topology, connect_timeout=2, reconnect_timeout=2, max_backoff=0.5
        )
        self.transport.declare()
        self.tap_queue = f"{prefix}.durable-tap"
        # Declared (durable, bound) before any load; nobody consumes it until read_tap.
        KombuTap(node.url, self.topology.events_exchange, self.critical_keys,
                 queue=self.tap_queue, durable=True).conn.release()
        self.client = Brama(transport=self.transport, request_timeout=20)
        self.tmp_path = tmp_path
        self.workers: list[WorkerProcess] = []

    def start_worker(self, **settings: str) -> WorkerProcess:
        worker = WorkerProcess(
            self.tmp_path / f"worker{len(self.workers)}.log",
            {"BRAMA_BROKER_URL": self.node.url, "BRAMA_PREFIX": self.topology.prefix,
             **settings},
        )
        self.workers.append(worker)
        worker.wait_ready()
        return worker

    def depth(self, queue: str | None = None) -> int:
        probe = brokers.WireProbe(self.node.url, queue or self.tap_queue, declare=False)
        try:
            return probe.depth()
        finally:
            probe.close()

    def read_tap(self, done: Callable[[list[Seen]], bool], timeout: float) -> list[Seen]:
        """Consume the durable queue until ``done(seen)`` (then drain the duplicates);
        AssertionError if it never is."""
        tap = KombuTap(self.node.url, self.topology.events_exchange, self.critical_keys,
                       queue=self.tap_queue, durable=True)
        try:
            deadline = time.monotonic() + timeout
            while not done(tap.seen):
                if time.monotonic() > deadline:
                    raise AssertionError(f"critical events missing after {timeout} s "
                                         f"({len(tap.seen)} seen)")
                tap.drain(0.3)
            tap.drain(0.5)
            return list(tap.seen)
        finally:
            tap.close()

    def statuses(self) -> dict[str, dict[str, Any]]:
        """Every connection's status, by name, from the active owner."""
        return {str(s["connection"]): s for s in self.client.snapshot()}

    def close(self) -> None:
        try:
            for worker in self.workers:
                worker.close()
        finally:
            self.client.disconnect()
            self.transport.close()
            with contextlib.suppress(Exception):
                brokers.delete_names(self.node.url, [self.tap_queue], [])


S = TypeVar("S", bound=NodeSetup)


@contextlib.contextmanager
def deployed(
    kind: type[S], node: brokers.PrivateNode, prefix: str, tmp_path: Path,
    registry: brokers.Registry,
) -> Iterator[S]:
    """A ``kind`` on ``node`` (started again if an earlier test left it down), its prefix
    tracked for the sweep, closed at the end."""
    if not node.running():
        node.start()
    registry.track(prefix, node.url)
    s = kind(node, prefix, tmp_path)
    try:
        yield s
    finally:
        s.close()
