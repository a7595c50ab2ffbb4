"""End to end with real processes: RabbitMQ, ``brama-mq worker``, a prefork Celery worker
(concurrency 2) running ``workers.celery_app``, and a subscriber on the events exchange.

The fake payment service keeps its failure rate and latency in a directory the test
changes at run time, and logs every call (time, pid, order, outcome) there, so the test
counts body executions across both children. The subscriber is a plain kombu queue
bound to ``*.*.state_change`` (tests/wire.py), independent of brama_mq's own code.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from celery import Celery

from brama_mq.client import Brama
from brama_mq.transport import Topology
from brama_mq.transport.amqp import AmqpTransport
from tests import brokers
from tests.celery_proc import CeleryWorker
from tests.wire import KombuTap
from tests.worker_proc import WorkerProcess
from workers.celery_app import CONNECTION, SCOPE, FakePaymentService

pytestmark = pytest.mark.broker

MAX_ATTEMPTS = 3
EXPIRY_MS = 3_000
HALF_OPEN_PERMITS = 1


@dataclass
class Deployment:
    owner: WorkerProcess
    worker: CeleryWorker
    client: Brama
    tap: KombuTap
    service: FakePaymentService
    sender: Celery
    queue: str

    def charge(self, order: str) -> None:
        self.sender.send_task("payments.charge", args=(order,), queue=self.queue)

    def transitions(self) -> list[tuple[str, str, int]]:
        return [
            (s.body["data"]["previous_state"], s.body["data"]["new_state"], s.body["timestamp"])
            for s in self.tap.seen
            if s.body.get("connection") == CONNECTION
        ]

    def wait(self, what: str, predicate: object, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():  # type: ignore[operator]
            self.tap.drain(0.05)
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{what} did not happen within {timeout} s; transitions "
                    f"{self.transitions()}, calls {self.service.calls()}\n"
                    f"--- celery worker log:\n{self.worker.output()[-6000:]}"
                )


@contextlib.contextmanager
def deploy(
    broker_url: str, prefix: str, tmp_path: Path, broker_registry: brokers.Registry,
    *, pool: str = "prefork", concurrency: int = 2, views: int = 2,
) -> Iterator[Deployment]:
    """Owner and Celery worker as subprocesses under this test's prefix and queue."""
    queue = f"{prefix}-payments"
    broker_registry.track(prefix, broker_url, queues=[queue], exchanges=[queue])
    settings = {
        "BRAMA_BROKER_URL": broker_url,
        "BRAMA_PREFIX": prefix,
        "CELERY_BROKER_URL": broker_url,
        "PAYMENTS_QUEUE": queue,
        "PAYMENT_SERVICE_DIR": str(tmp_path / "service"),
    }
    service = FakePaymentService(tmp_path / "service")
    owner = WorkerProcess(tmp_path / "owner.log", settings)
    worker: CeleryWorker | None = None
    transport = AmqpTransport(broker_url, Topology(prefix), reconnect_timeout=10)
    broker_registry.track_transport(prefix, transport)
    client = Brama(transport=transport)
    tap: KombuTap | None = None
    sender = Celery("e2e-sender", broker=broker_url)
    try:
        owner.wait_ready()
        client.register(
            CONNECTION, scope=SCOPE, wait=True, max_attempts=MAX_ATTEMPTS, expiry_ms=EXPIRY_MS,
            half_open_permits=HALF_OPEN_PERMITS, success_threshold=1, probe_timeout_ms=10_000,
        )
        tap = KombuTap(broker_url, transport.topology.events_exchange, ["*.*.state_change"])
        worker = CeleryWorker(tmp_path / "celery.log", settings, pool=pool,
                              concurrency=concurrency)
        worker.wait_for_log(" ready.", timeout=30)
        if views:  # prefork children start theirs when forked; other pools on first use
            worker.wait_for_log("bootstrapped: 1 connections", timeout=15, count=views)
        yield Deployment(owner, worker, client, tap, service, sender, queue)
    finally:
        if worker is not None:
            worker.close()
        owner.terminate()
        try:
            owner.wait(15)
        finally:
            owner.close()
        if tap is not None:
            tap.close()
        client.disconnect()
        transport.close()
        sender.close()


@pytest.fixture
def deployment(
    broker_url: str, prefix: str, tmp_path: Path, broker_registry: brokers.Registry
) -> Iterator[Deployment]:
    """The e2e deployment: a prefork worker with two children."""
    with deploy(broker_url, prefix, tmp_path, broker_registry) as d:
        yield d


def test_circuit_defers_tasks_rations_probes_and_recovers(deployment: Deployment) -> None:
    """Open defers tasks unrun; one probe per permit runs; a success closes; all run once."""
    d = deployment
    d.service.set(failure_rate=1.0, latency_s=0.0)
    for i in range(MAX_ATTEMPTS):
        d.charge(f"fail-{i}")
    d.wait("the circuit opening", lambda: len(d.transitions()) >= 1, timeout=15)
    assert [t[:2] for t in d.transitions()] == [("closed", "open")]
    calls = d.service.calls()
    assert len(calls) == MAX_ATTEMPTS and not any(c["ok"] for c in calls)

    deferred = [f"order-{i}" for i in range(8)]
    for order in deferred:
        d.charge(order)
    d.worker.wait_for_log("brama guard: deferred", timeout=10, count=len(deferred))
    time.sleep(0.5)
    assert len(d.service.calls()) == MAX_ATTEMPTS, "a body ran while the circuit was open"

    # Healthy again, but slow: the probe is still running when the other child's
    # deferred tasks come due, so the permit limit is what stops them.
    d.service.set(failure_rate=0.0, latency_s=1.0)
    d.wait("the circuit closing", lambda: len(d.transitions()) >= 3, timeout=EXPIRY_MS / 1000 + 10)
    d.service.set(latency_s=0.0)
    d.wait(
        "every deferred task completing",
        lambda: {c["order"] for c in d.service.calls() if c["ok"]} >= set(deferred),
        timeout=20,
    )
    d.tap.drain(0.5)
    steps = d.transitions()
    assert [t[:2] for t in steps] == [("closed", "open"), ("open", "half_open"),
                                      ("half_open", "closed")]
    t_open, t_half_open, t_closed = (t[2] for t in steps)

    calls = d.service.calls()
    assert not [c for c in calls if t_open <= c["t"] < t_half_open], "a body ran while open"
    probes = [c for c in calls if t_half_open <= c["t"] < t_closed]
    assert len(probes) == HALF_OPEN_PERMITS, probes
    log = d.worker.output()
    assert "is half_open" in log, "no deferred task was refused a permit while half-open"
    ok = Counter(c["order"] for c in calls if c["ok"])
    assert all(ok[order] == 1 for order in deferred), ok
    assert len(calls) == MAX_ATTEMPTS + len(deferred)
    assert d.client.status(CONNECTION, scope=SCOPE)["state"] == "closed"


@pytest.mark.parametrize("pool", ["solo", "threads", "gevent"])
def test_solo_threads_and_gevent_pools_guard_in_the_worker_process(
    broker_url: str, prefix: str, tmp_path: Path, broker_registry: brokers.Registry, pool: str
) -> None:
    """Solo, threads and gevent pools run one view in the worker process and guard tasks."""
    with deploy(broker_url, prefix, tmp_path, broker_registry, pool=pool, concurrency=2,
                views=0) as d:
        d.client.open(CONNECTION, scope=SCOPE, expiry_ms=None, wait=True)
        d.charge("held")
        d.worker.wait_for_log("brama guard: deferred", timeout=15)
        out = d.worker.output()
        assert out.count("bootstrapped: 1 connections") == 1, "one view, in the worker process"
        assert "held" not in {c["order"] for c in d.service.calls()}
        d.client.close(CONNECTION, scope=SCOPE, wait=True)
        # Held open: the task comes back after HELD_OPEN_RETRY_MS, so send others. The
        # worker's view hears of the close a moment after the owner applied it: a task
        # sent in that moment is deferred too, so keep sending until one runs.
        def ran_after_close() -> bool:
            return any(c["order"].startswith("after-close") and c["ok"]
                       for c in d.service.calls())

        for attempt in range(15):
            d.charge(f"after-close-{attempt}")
            with contextlib.suppress(AssertionError):
                d.wait("a task running after the close", ran_after_close, timeout=1)
                break
        d.wait("a task running after the close", ran_after_close, timeout=5)
        assert "held" not in {c["order"] for c in d.service.calls()}
