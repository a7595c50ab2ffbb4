"""Issue 15 with real processes: ``brama-mq worker`` owners, client processes of their
own, a prefork Celery worker. What the owner published is watched with a plain kombu
queue (tests/wire.py), independent of brama_mq's subscriber code."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from brama_mq.client import Brama
from brama_mq.transport import Topology
from brama_mq.transport.amqp import AmqpTransport
from tests import brokers
from tests.celery_proc import CeleryWorker
from tests.wire import KombuTap, Seen
from tests.worker_proc import ROOT, WorkerProcess, start_worker, worker_env
from workers.celery_app import CONNECTION, SCOPE, FakePaymentService

pytestmark = pytest.mark.broker

#: A client process of its own: N failures (each applied before the next), then its
#: default reporter and pid as JSON.
CLIENT = """
import json, os, sys
from brama_mq import Brama
with Brama() as client:
    for i in range(int(sys.argv[1])):
        client.failure("payment_api", scope="payments", reason=f"boom {i}", wait=True)
    print(json.dumps({"reporter": client.reporter, "pid": os.getpid()}))
"""


def _client_process(settings: dict[str, str], failures: int) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-c", CLIENT, str(failures)], cwd=ROOT,
                          env=worker_env(settings), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def _openings(tap: KombuTap, connection: str = "payment_api") -> list[Seen]:
    return [s for s in tap.seen
            if s.event == "circuit_opened" and s.body.get("connection") == connection]


def test_a_quorum_needs_failures_from_two_client_processes(
    amqp_transport: AmqpTransport, broker_url: str, prefix: str, tmp_path: Path,
    workers: list[WorkerProcess],
) -> None:
    """``min_reporters: 2``: one client process's failures alone never open the circuit,
    however many; one failure from a second process (its own default reporter,
    ``<host>:<pid>``) does, and the opening's ``data.reporters`` names both."""
    amqp_transport.declare()
    settings = {"BRAMA_BROKER_URL": broker_url, "BRAMA_PREFIX": prefix}
    start_worker(workers, tmp_path, settings)
    tap = KombuTap(broker_url, amqp_transport.topology.events_exchange, ["#"])
    client = Brama(transport=amqp_transport)
    try:
        client.register("payment_api", scope="payments", wait=True, max_attempts=3,
                        min_reporters=2, expiry_ms=60_000)
        first = _client_process(settings, 6)
        status = client.status("payment_api", scope="payments")
        assert (status["state"], status["failure_count"]) == ("closed", 6), status
        assert first["reporter"] == f"{socket.gethostname()}:{first['pid']}"
        tap.drain(0.3)
        assert _openings(tap) == []
        second = _client_process(settings, 1)
        assert second["reporter"] == f"{socket.gethostname()}:{second['pid']}"
        assert second["reporter"] != first["reporter"]
        tap.wait_for(lambda _: bool(_openings(tap)), timeout=10)
        (opened,) = _openings(tap)
        assert opened.body["data"]["reason"] == "Threshold exceeded"
        assert set(opened.body["data"]["reporters"]) == {first["reporter"], second["reporter"]}
        assert opened.body["data"]["reporter_count"] == 2
        assert client.status("payment_api", scope="payments")["state"] == "open"
    finally:
        client.disconnect()
        tap.close()


def test_slow_celery_tasks_open_the_circuit(
    broker_url: str, prefix: str, tmp_path: Path, broker_registry: brokers.Registry,
    workers: list[WorkerProcess],
) -> None:
    """A prefork Celery worker runs ``payments.charge`` (guarded) against a service that
    answers after 250 ms: the tasks succeed, but with ``slow_call_ms`` 100 their timed
    durations make them slow, and the circuit opens with reason ``slow_call_rate``; the
    opening names the worker process as reporter (``<node name>:<pid>``, the default)."""
    queue = f"{prefix}-payments"
    broker_registry.track(prefix, broker_url, queues=[queue], exchanges=[queue])
    settings = {"BRAMA_BROKER_URL": broker_url, "BRAMA_PREFIX": prefix,
                "CELERY_BROKER_URL": broker_url, "PAYMENTS_QUEUE": queue,
                "PAYMENT_SERVICE_DIR": str(tmp_path / "service")}
    service = FakePaymentService(tmp_path / "service")
    service.set(failure_rate=0.0, latency_s=0.25)
    start_worker(workers, tmp_path, settings)
    transport = AmqpTransport(broker_url, Topology(prefix), reconnect_timeout=10)
    broker_registry.track_transport(prefix, transport)
    client = Brama(transport=transport)
    tap = KombuTap(broker_url, transport.topology.events_exchange, ["*.*.circuit_opened"])
    sender = Celery("issue15-sender", broker=broker_url)
    worker: CeleryWorker | None = None
    try:
        client.register(CONNECTION, scope=SCOPE, wait=True, strategy="failure_rate",
                        window_size=10, minimum_calls=3, failure_rate_threshold=50.0,
                        slow_call_ms=100, slow_call_rate_threshold=50.0, expiry_ms=60_000)
        worker = CeleryWorker(tmp_path / "celery.log", settings, concurrency=1)
        worker.wait_for_log(" ready.", timeout=30)
        worker.wait_for_log("bootstrapped: 1 connections", timeout=15)
        for i in range(5):
            sender.send_task("payments.charge", args=(f"slow-{i}",), queue=queue)
        tap.wait_for(lambda seen: bool(seen), timeout=30)
        (opened,) = tap.seen
        data = opened.body["data"]
        assert data["reason"] == "slow_call_rate", data
        assert data["detail"].startswith("Slow-call rate"), data
        (reporter,) = data["reporters"]
        node = worker.nodename.replace("%h", socket.gethostname())
        assert reporter.startswith(node + ":"), (reporter, node)
        assert int(reporter.rsplit(":", 1)[1]) != worker.pid  # a pool process, not the main
        calls = service.calls()
        assert 3 <= len(calls) <= 5 and all(c["ok"] for c in calls), calls
        assert client.status(CONNECTION, scope=SCOPE)["state"] == "open"
    finally:
        if worker is not None:
            worker.close()
        tap.close()
        client.disconnect()
        transport.close()
        sender.close()


def test_a_takeover_keeps_a_time_windows_calls(
    amqp_transport: AmqpTransport, broker_url: str, prefix: str, tmp_path: Path,
    workers: list[WorkerProcess],
) -> None:
    """A time window (60 s, minimum 4 calls, 50 %) holds 2 successes and 1 failure when
    the active worker is killed (-9); the standby that takes over has the same window
    (failure rate 33.33 %), so one more failure opens the circuit at 2 of 4, 50 %, as
    the window says (an empty window would hold 1 call, below the minimum)."""
    amqp_transport.declare()
    settings = {"BRAMA_BROKER_URL": broker_url, "BRAMA_PREFIX": prefix}
    active = start_worker(workers, tmp_path, settings)
    active.wait_active()
    standby = start_worker(workers, tmp_path, settings)
    client = Brama(transport=amqp_transport)
    try:
        client.register("payment_api", scope="payments", wait=True, strategy="failure_rate",
                        window_type="time", window_seconds=60, minimum_calls=4,
                        failure_rate_threshold=50.0, expiry_ms=60_000)
        for op in ("success", "failure", "success"):
            getattr(client, op)("payment_api", scope="payments", wait=True)
        before = client.status("payment_api", scope="payments")
        assert (before["state"], before["failure_rate"]) == ("closed", 33.33), before
        assert "owner active" not in standby.output()
        active.kill()
        assert active.wait(10) == -9
        standby.wait_for_log("owner active", timeout=20)
        after = client.status("payment_api", scope="payments")
        assert (after["state"], after["failure_rate"], after["failure_count"]) == (
            "closed", 33.33, 1), after
        applied = client.failure("payment_api", scope="payments", wait=True)
        assert applied is not None
        opened = next(e for e in applied.events if e.event == "circuit_opened")
        assert (opened.reason, opened.detail) == ("failure_rate", "Failure rate 50.0% >= 50%")
        assert client.status("payment_api", scope="payments")["state"] == "open"
    finally:
        client.disconnect()
