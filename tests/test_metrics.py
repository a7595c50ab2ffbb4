"""Prometheus metrics of ``brama-mq worker --metrics-port`` (scraped over HTTP from real
worker processes), the same on an OpenTelemetry meter, and the guard-check counter of a
real prefork Celery worker (prometheus_client's multiprocess mode)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from brama_mq.client import Brama
from brama_mq.owner import run_owner
from brama_mq.transport import MemoryTransport, Topology
from brama_mq.transport.amqp import AmqpTransport
from tests import brokers
from tests.metrics_helpers import Samples, free_port, scrape, value, wait_for
from tests.worker_proc import WorkerProcess, run_cli


@pytest.mark.broker
def test_worker_serves_metrics_and_only_the_active_owner_says_so(
    broker_url: str, prefix: str, tmp_path: Path, broker_registry: brokers.Registry
) -> None:
    """Two owners with --metrics-port: circuit state (1 current, 0 others), failure count,
    events, commands by op/result, dead letters, confirm latency; active 1 on one owner,
    0 on the standby; after a takeover the new active owner says so and shows every
    circuit of the registry it took over."""
    settings = {"BRAMA_BROKER_URL": broker_url, "BRAMA_PREFIX": prefix}
    port_a, port_b = free_port(), free_port()
    transport = AmqpTransport(broker_url, Topology(prefix), reconnect_timeout=10)
    broker_registry.track_transport(prefix, transport)
    a = WorkerProcess(tmp_path / "a.log", settings, ["--metrics-port", str(port_a)])
    b: WorkerProcess | None = None
    client = Brama(transport=transport)
    try:
        a.wait_ready()
        b = WorkerProcess(tmp_path / "b.log", settings, ["--metrics-port", str(port_b)])
        b.wait_ready()
        client.register("payment_api", scope="payments", max_attempts=2, wait=True)
        client.register("ledger_db", wait=True)
        client.failure("payment_api", scope="payments", reason="timeout", wait=True)
        client.failure("payment_api", scope="payments", reason="timeout", wait=True)
        client.failure("ledger_db", reason="slow", wait=True)
        transport.client_link().send(b"{not json", "owner")
        client.status("ledger_db")  # answered after the bad command's batch

        def both() -> tuple[Samples, Samples]:
            return scrape(port_a), scrape(port_b)

        def settled(pair: tuple[Samples, Samples]) -> bool:
            return any(value(s, "brama_dead_letters_total", reason="decode") == 1.0
                       for s in pair)

        deadline = time.monotonic() + 20
        while not settled(pair := both()):
            assert time.monotonic() < deadline, pair
            time.sleep(0.2)
        active = [s for s in pair if value(s, "brama_owner_active") == 1.0]
        standby = [s for s in pair if value(s, "brama_owner_active") == 0.0]
        assert len(active) == 1 and len(standby) == 1, pair
        m = active[0]
        for state, v in (("open", 1.0), ("closed", 0.0), ("half_open", 0.0)):
            assert value(m, "brama_circuit_state", scope="payments", connection="payment_api",
                         state=state) == v
        assert value(m, "brama_circuit_state", scope="", connection="ledger_db",
                     state="closed") == 1.0
        assert value(m, "brama_failure_count", scope="payments",
                     connection="payment_api") == 2.0
        assert value(m, "brama_failure_count", scope="", connection="ledger_db") == 1.0
        assert value(m, "brama_events_total", event="circuit_opened") == 1.0
        assert value(m, "brama_events_total", event="failure") == 3.0
        assert value(m, "brama_commands_total", op="failure", result="applied") == 3.0
        assert value(m, "brama_commands_total", op="register", result="applied") == 2.0
        assert value(m, "brama_commands_total", op="invalid", result="decode") == 1.0
        assert (value(m, "brama_confirm_latency_seconds_count") or 0) >= 1
        assert value(m, "brama_circuitbreaker_calls_total", scope="payments",
                     connection="payment_api", kind="failed") == 2.0
        assert value(m, "brama_circuitbreaker_calls_total", scope="", connection="ledger_db",
                     kind="failed") == 1.0
        assert value(standby[0], "brama_events_total", event="failure") is None

        # The active one stops: the standby takes over and, on its first delivery
        # (commands, or its own probe within 10 s), says it is active.
        active_port = port_a if active[0] is pair[0] else port_b
        first, second = (a, b) if active_port == port_a else (b, a)
        first.terminate()
        assert first.wait(15) == 0
        other_port = port_b if active_port == port_a else port_a
        client.register("after_takeover", wait=True)
        taken = wait_for(lambda: scrape(other_port),
                         lambda s: value(s, "brama_owner_active") == 1.0, 15, "takeover")
        assert value(taken, "brama_commands_total", op="register", result="applied") == 1.0
        # Its circuits are the registry it rebuilt at takeover, not the empty one it had
        # as a standby: the open circuit from before the takeover is there.
        assert value(taken, "brama_circuit_state", scope="payments", connection="payment_api",
                     state="open") == 1.0
        assert value(taken, "brama_failure_count", scope="", connection="ledger_db") == 1.0
        assert value(taken, "brama_circuit_state", scope="", connection="after_takeover",
                     state="closed") == 1.0
        assert second.alive()
    finally:
        client.disconnect()
        for w in (a, b):
            if w is not None:
                if w.alive():
                    w.terminate()
                    w.wait(15)
                w.close()
        transport.close()


def test_worker_metrics_port_errors_are_one_line(tmp_path: Path) -> None:
    """A port already in use exits 2 with one line saying what to do."""
    import socket

    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run_cli(["worker", "--broker", "memory://", "--metrics-port", str(port)], {},
                      timeout=30)
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("brama-mq: cannot serve metrics on port"), out.stderr
    assert "--metrics-port" in lines[-1]


def test_opentelemetry_meter_records_the_same(memory_transport: MemoryTransport) -> None:
    """The OpenTelemetry meter (SDK in-memory reader) records states, counts, commands,
    events, dead letters, confirm latency and activity like the Prometheus exporter."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from brama_mq.metrics.otel import OtelOwnerMetrics

    reader = InMemoryMetricReader()
    otel = OtelOwnerMetrics(MeterProvider(metric_readers=[reader])).attach()
    owner = run_owner(memory_transport)
    client = Brama(transport=memory_transport)
    try:
        client.register("api", scope="pay", max_attempts=1, wait=True)
        client.failure("api", scope="pay", reason="down", wait=True)
        memory_transport.client_link().send(b"[]", "owner")
        client.status("api", scope="pay")
        data = reader.get_metrics_data()
    finally:
        client.disconnect()
        owner.stop(wait=5)
        otel.detach()
    points: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                for p in metric.data.data_points:
                    val = getattr(p, "value", None)
                    points.setdefault(metric.name, []).append(
                        (dict(p.attributes), val if val is not None else p.count))

    def get(name: str, **attrs: str) -> Any:
        return next((v for a, v in points.get(name, []) if a == attrs), None)

    assert get("brama_circuit_state", scope="pay", connection="api", state="open") == 1
    assert get("brama_circuit_state", scope="pay", connection="api", state="closed") == 0
    assert get("brama_failure_count", scope="pay", connection="api") == 1
    assert get("brama_events", event="circuit_opened") == 1
    assert get("brama_commands", op="failure", result="applied") == 1
    assert get("brama_commands", op="invalid", result="decode") == 1
    assert get("brama_dead_letters", reason="decode") == 1
    assert get("brama_confirm_latency") >= 1
    assert get("brama_owner_active") == 1
    assert get("brama_circuitbreaker_calls", scope="pay", connection="api", kind="failed") == 1


@pytest.mark.broker
def test_prefork_celery_worker_serves_guard_checks_of_all_children(
    broker_url: str, prefix: str, tmp_path: Path, broker_registry: brokers.Registry
) -> None:
    """A real prefork worker (2 children) with BRAMA_METRICS_PORT: its main process serves
    brama_guard_checks_total{scope,connection,result}, not-permitted calls and call
    durations summed over the children (multiprocess
    mode): every closed check and every refusal while open is counted once."""
    from celery import Celery

    from tests.celery_proc import CeleryWorker
    from workers.celery_app import CONNECTION, SCOPE, FakePaymentService

    queue = f"{prefix}-payments"
    broker_registry.track(prefix, broker_url, queues=[queue], exchanges=[queue])
    settings = {
        "BRAMA_BROKER_URL": broker_url, "BRAMA_PREFIX": prefix, "CELERY_BROKER_URL": broker_url,
        "PAYMENTS_QUEUE": queue, "PAYMENT_SERVICE_DIR": str(tmp_path / "service"),
    }
    port = free_port()
    service = FakePaymentService(tmp_path / "service")
    owner = WorkerProcess(tmp_path / "owner.log", settings)
    transport = AmqpTransport(broker_url, Topology(prefix), reconnect_timeout=10)
    broker_registry.track_transport(prefix, transport)
    client = Brama(transport=transport)
    sender = Celery("metrics-sender", broker=broker_url)
    worker: CeleryWorker | None = None
    try:
        owner.wait_ready()
        client.register(CONNECTION, scope=SCOPE, wait=True, max_attempts=100)
        worker = CeleryWorker(tmp_path / "celery.log", {
            **settings, "BRAMA_METRICS_PORT": str(port),
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        }, pool="prefork", concurrency=2)
        worker.wait_for_log(" ready.", timeout=30)
        worker.wait_for_log("bootstrapped: 1 connections", timeout=15, count=2)
        n = 20
        for i in range(n):
            sender.send_task("payments.charge", args=(f"o-{i}",), queue=queue)
        deadline = time.monotonic() + 30
        while len(service.calls()) < n:
            assert time.monotonic() < deadline, worker.output()[-4000:]
            time.sleep(0.1)
        samples = wait_for(
            lambda: scrape(port),
            lambda s: value(s, "brama_guard_checks_total", scope=SCOPE, connection=CONNECTION,
                            result="closed") == n, 10, "the closed checks")
        # every body ran and was timed, in whichever child ran it
        assert value(samples, "brama_circuitbreaker_calls_seconds_count", scope=SCOPE,
                     connection=CONNECTION, kind="successful") == n
        pids = {c["pid"] for c in service.calls()}
        assert worker.proc.pid not in pids  # the bodies ran in the children

        client.open(CONNECTION, scope=SCOPE, expiry_ms=None, wait=True)
        time.sleep(0.5)  # the children's views see the state change
        for i in range(3):
            sender.send_task("payments.charge", args=(f"held-{i}",), queue=queue)
        worker.wait_for_log("brama guard: deferred", timeout=15, count=3)
        samples = wait_for(
            lambda: scrape(port),
            lambda s: value(s, "brama_guard_checks_total", scope=SCOPE, connection=CONNECTION,
                            result="open") == 3, 10, "the refused checks")
        assert value(samples, "brama_guard_checks_total", scope=SCOPE, connection=CONNECTION,
                     result="closed") == n
        assert value(samples, "brama_circuitbreaker_calls_total", scope=SCOPE,
                     connection=CONNECTION, kind="not_permitted") == 3
        assert len(list((tmp_path / "prom").glob("counter_*.db"))) >= 1
        print(f"task bodies ran in {len(pids)} child process(es)")
    finally:
        if worker is not None:
            worker.close()
        owner.terminate()
        try:
            owner.wait(15)
        finally:
            owner.close()
        client.disconnect()
        transport.close()
        sender.close()


SITECUSTOMIZE = '''
import os
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

_out = open(os.environ["OTEL_TEST_OUT"], "a", buffering=1)
_exporter = ConsoleMetricExporter(out=_out, formatter=lambda d: d.to_json(indent=None) + "\\n")
metrics.set_meter_provider(MeterProvider(
    metric_readers=[PeriodicExportingMetricReader(_exporter, export_interval_millis=300)]))
'''


@pytest.mark.broker
def test_worker_otel_flag_records_on_the_global_meter_provider(
    broker_url: str, prefix: str, tmp_path: Path, broker_registry: brokers.Registry
) -> None:
    """`brama-mq worker --otel` records on whatever global MeterProvider the process has
    (here an SDK provider exporting JSON lines, installed by a sitecustomize, as
    opentelemetry-instrument would): the circuit opened and the owner is active."""
    import json
    import os

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out = tmp_path / "otel.jsonl"
    root = str(Path(__file__).resolve().parent.parent)
    settings = {"BRAMA_BROKER_URL": broker_url, "BRAMA_PREFIX": prefix,
                "OTEL_TEST_OUT": str(out),
                "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), root])}
    transport = AmqpTransport(broker_url, Topology(prefix), reconnect_timeout=10)
    broker_registry.track_transport(prefix, transport)
    worker = WorkerProcess(tmp_path / "owner.log", settings, ["--otel"])
    client = Brama(transport=transport)
    try:
        worker.wait_ready()
        client.register("payment_api", scope="payments", max_attempts=1, wait=True)
        client.failure("payment_api", scope="payments", reason="down", wait=True)

        def latest() -> dict[str, list[tuple[dict[str, Any], Any]]]:
            lines = out.read_text().splitlines() if out.exists() else []
            found: dict[str, list[tuple[dict[str, Any], Any]]] = {}
            # The exporter may be writing the last line as we read: use the newest whole one.
            parsed = None
            for line in reversed(lines):
                try:
                    parsed = json.loads(line)
                    break
                except json.JSONDecodeError:
                    continue
            if parsed is None:
                return found
            for rm in parsed["resource_metrics"]:
                for sm in rm["scope_metrics"]:
                    for metric in sm["metrics"]:
                        for p in metric["data"]["data_points"]:
                            found.setdefault(metric["name"], []).append(
                                (p["attributes"], p.get("value", p.get("count"))))
            return found

        def opened(found: dict[str, list[tuple[dict[str, Any], Any]]]) -> bool:
            return ({"scope": "payments", "connection": "payment_api", "state": "open"}, 1) in \
                found.get("brama_circuit_state", [])

        found = wait_for(latest, opened, 20, "brama_circuit_state on the OTel exporter")
        assert ({}, 1) in found["brama_owner_active"]
        assert ({"op": "failure", "result": "applied"}, 1) in found["brama_commands"]
    finally:
        client.disconnect()
        worker.terminate()
        try:
            assert worker.wait(15) == 0
        finally:
            worker.close()
        transport.close()
