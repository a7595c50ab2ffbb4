"""``brama_mq.celery`` with real Celery apps in this process.

Decorator semantics (Retry/Reject/Ignore, record/ignore, on_open modes, the base class)
run eagerly against an owner on the in-process transport (``brama_client``); the
deferral that keeps the task's retry budget runs on a real in-process Celery worker
(solo and threads pools) with RabbitMQ as the Celery broker and a real owner.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.exceptions import Ignore, Reject
from celery.signals import task_retry

from brama_mq.celery import GuardedTask, guarded, runtime_for_app, shutdown_runtimes
from brama_mq.client import Brama
from brama_mq.errors import CircuitOpenError, InvalidNameError
from brama_mq.owner import Owner, run_owner
from brama_mq.transport import MemoryTransport
from brama_mq.transport.amqp import AmqpTransport
from brama_mq.transport.base import EventSource
from tests import brokers


@dataclass
class Eager:
    app: Celery
    client: Brama
    owner: Owner
    tap: EventSource

    def settle(self) -> None:
        """Until the owner applied every report so far."""
        assert runtime_for_app(self.app).outbox.flush(5)
        self.client.snapshot()

    def outcomes(self) -> list[tuple[str, Any]]:
        out = []
        for d in self.tap.get(0.2):
            event = json.loads(d.body)
            if event["event"] in ("success", "failure"):  # batched successes carry count
                out += [(event["event"], event["data"].get("reason"))] * event["data"].get(
                    "count", 1
                )
        return out


@pytest.fixture
def eager(memory_transport: MemoryTransport) -> Iterator[Eager]:
    """A Celery app running tasks eagerly, guarded by an owner on the in-process transport."""
    owner = run_owner(memory_transport)
    client = Brama(transport=memory_transport)
    client.register("api", scope="s", wait=True, max_attempts=3, expiry_ms=60_000)
    tap = memory_transport.event_source()
    tap.bind(["s.api.*"])
    app = Celery(f"eager-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(task_always_eager=True, brama_client=client)
    try:
        yield Eager(app, client, owner, tap)
    finally:
        shutdown_runtimes()
        client.disconnect()
        owner.stop(wait=5)


def test_success_and_recorded_failure_are_reported_with_reason(eager: Eager) -> None:
    """A returning body reports a success; a recorded exception a failure "Type: message"."""
    @eager.app.task(shared=False)
    @guarded("api", scope="s", record=(TimeoutError,))
    def pay(fail: bool) -> str:
        if fail:
            raise TimeoutError("gateway slow")
        return "paid"

    assert pay.delay(False).get() == "paid"
    result = pay.apply(args=(True,))
    assert result.state == "FAILURE" and isinstance(result.result, TimeoutError)
    eager.settle()
    assert eager.outcomes() == [("success", None), ("failure", "TimeoutError: gateway slow")]


def test_ignored_and_unrecorded_exceptions(eager: Eager) -> None:
    """``ignore`` reports nothing; an exception outside ``record`` counts as a success."""
    @eager.app.task(shared=False)
    @guarded("api", scope="s", record=(TimeoutError,), ignore=(KeyError,))
    def pay(kind: str) -> None:
        raise {"ignored": KeyError, "other": ValueError}[kind]("x")

    assert pay.apply(args=("ignored",)).state == "FAILURE"
    assert pay.apply(args=("other",)).state == "FAILURE"
    eager.settle()
    assert eager.outcomes() == [("success", None)]


def test_celery_retry_keeps_its_meaning_and_reports_the_exception_it_carries(
    eager: Eager,
) -> None:
    """Celery's Retry passes through, reporting the exception it carries (none: nothing)."""
    runs: list[int] = []

    @eager.app.task(bind=True, max_retries=1, shared=False)
    @guarded("api", scope="s")
    def pay(self: Any, carry: bool) -> str:
        runs.append(self.request.retries)
        if self.request.retries == 0:
            raise self.retry(exc=TimeoutError("try later") if carry else None, countdown=0)
        return "paid"

    assert pay.apply(args=(True,)).get() == "paid"
    assert pay.apply(args=(False,)).get() == "paid"
    assert runs == [0, 1, 0, 1]
    eager.settle()
    assert eager.outcomes() == [
        ("failure", "TimeoutError: try later"), ("success", None), ("success", None)
    ]


def test_reject_and_ignore_keep_their_meaning_and_report_nothing(eager: Eager) -> None:
    """Reject and Ignore pass through untouched (states REJECTED, IGNORED); no outcome."""
    @eager.app.task(shared=False)
    @guarded("api", scope="s")
    def pay(kind: str) -> None:
        if kind == "reject":
            raise Reject("bad message", requeue=False)
        raise Ignore()

    assert pay.apply(args=("reject",)).state == "REJECTED"
    assert pay.apply(args=("ignore",)).state == "IGNORED"
    eager.settle()
    assert eager.outcomes() == []


def test_on_open_raise_skip_and_eager_retry_never_enter_the_body(eager: Eager) -> None:
    """Open circuit: 'raise' fails, 'skip' returns None, eager 'retry' raises; no body runs."""
    entered: list[str] = []
    tasks = {}
    for mode in ("raise", "skip", "retry"):
        def body(mode: str = mode) -> str:
            entered.append(mode)
            return "ran"

        body.__name__ = f"pay_{mode}"
        wrapped = guarded("api", "s", on_open=mode)(body)
        tasks[mode] = eager.app.task(name=f"pay_{mode}", shared=False)(wrapped)
    eager.client.open("api", scope="s", expiry_ms=30_000, wait=True)
    runtime = runtime_for_app(eager.app)
    deadline = time.monotonic() + 5
    while runtime.view.state("api", "s") != "open":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    raised = tasks["raise"].apply()
    assert raised.state == "FAILURE" and isinstance(raised.result, CircuitOpenError)
    assert raised.result.state == "open" and 25_000 < raised.result.retry_after_ms <= 30_000
    skipped = tasks["skip"].apply()
    assert skipped.state == "SUCCESS" and skipped.result is None
    retried = tasks["retry"].apply()
    assert isinstance(retried.result, CircuitOpenError)
    assert entered == []


def test_guarded_task_base_class_takes_its_options_from_the_task(eager: Eager) -> None:
    """base=GuardedTask takes brama_* task options; a bad option fails when the task is made."""
    entered: list[int] = []

    @eager.app.task(base=GuardedTask, brama_connection="api", brama_scope="s",
                    brama_on_open="skip", brama_record=(TimeoutError,), lazy=False,
                    shared=False)
    def pay(n: int) -> int:
        entered.append(n)
        return n

    assert pay.delay(1).get() == 1
    eager.client.open("api", scope="s", expiry_ms=None, wait=True)
    runtime = runtime_for_app(eager.app)
    deadline = time.monotonic() + 5
    while runtime.view.state("api", "s") != "open":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert pay.delay(2).get() is None
    assert entered == [1]

    def bad() -> None:
        return None

    with pytest.raises(ValueError, match="on_open"):
        eager.app.task(base=GuardedTask, brama_connection="api", brama_on_open="later",
                       lazy=False, shared=False, name="bad")(bad)


def test_guarded_refuses_to_wrap_a_task_and_checks_names_early() -> None:
    """``@guarded`` goes below ``@app.task``, and bad names fail at decoration time."""
    app = Celery("order", broker="memory://", set_as_current=False)

    def body() -> None:
        return None

    task = app.task(lazy=False, shared=False, name="t")(body)
    with pytest.raises(TypeError, match=r"below @app\.task"):
        guarded("api")(task)
    with pytest.raises(InvalidNameError):
        guarded("bad\nname")
    with pytest.raises(ValueError, match="on_open"):
        guarded("api", on_open="wait")


# ------------------------------------------------------------------ a real worker


@pytest.fixture
def worker_app(
    broker_url: str, amqp_transport: AmqpTransport, broker_registry: brokers.Registry
) -> Iterator[tuple[Celery, Brama]]:
    """An app on RabbitMQ (own queue) guarded through a real owner on the same broker."""
    prefix = amqp_transport.topology.prefix
    queue = f"{prefix}-tasks"
    broker_registry.track(prefix, broker_url, queues=[queue], exchanges=[queue])
    owner = run_owner(amqp_transport)
    client = Brama(transport=amqp_transport)
    app = Celery(f"live-{prefix}", broker=broker_url, set_as_current=False)
    app.conf.update(
        brama_broker_url=broker_url, brama_prefix=prefix, task_default_queue=queue,
        task_ignore_result=True, broker_connection_retry_on_startup=True,
        broker_heartbeat=0,  # the in-process test worker stops in 1 s instead of 10
    )
    try:
        yield app, client
    finally:
        shutdown_runtimes()
        client.disconnect()
        owner.stop(wait=10)


@pytest.mark.broker
@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_deferral_does_not_use_the_task_retry_budget(
    worker_app: tuple[Celery, Brama], pool: str
) -> None:
    """Deferral while open keeps request.retries, so a max_retries=0 task still runs once."""
    app, client = worker_app
    runs: list[int] = []
    deferred: list[str] = []
    done = threading.Event()

    @app.task(bind=True, max_retries=0, name="live.pay", shared=False)
    @guarded("api", scope="s", on_open="retry")
    def pay(self: Any) -> str:
        runs.append(self.request.retries)
        done.set()
        return "paid"

    def on_retry(sender: Any = None, reason: Any = None, **_: Any) -> None:
        if getattr(sender, "name", None) == "live.pay":
            deferred.append(str(reason))

    task_retry.connect(on_retry, weak=False)
    client.register("api", scope="s", wait=True, expiry_ms=1_500, half_open_permits=1)
    client.open("api", scope="s", wait=True)
    try:
        with start_worker(app, pool=pool, concurrency=2, perform_ping_check=False,
                          shutdown_timeout=20):
            pay.delay()
            assert done.wait(20), f"never ran; deferrals: {deferred}"
    finally:
        task_retry.disconnect(on_retry)
    assert runs == [0]
    assert deferred and all("is open" in r or "is half_open" in r for r in deferred)
    assert client.status("api", scope="s")["state"] == "closed"
