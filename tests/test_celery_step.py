"""``brama_mq.celery.install``: brama_mq events received inside real Celery workers.

Each worker is a real ``celery worker`` subprocess (tests/celery_proc.py) running
tests/celery_step_app.py, whose handler appends each event it gets, with the pid
and thread that handled it, to a file of the test. The owner runs in this process on
the test broker; the workers get the test's prefix only as the Celery setting
``brama_prefix`` and no broker setting of brama_mq's own (it defaults to Celery's).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import amqp
import pytest
from celery import Celery, bootsteps
from celery.bootsteps import StartStopStep
from kombu import Connection

from brama_mq.celery import EventsStep, install
from brama_mq.client import Brama
from brama_mq.errors import FilterError
from brama_mq.transport import MemoryTransport, Topology, Transport
from tests import brokers
from tests.celery_proc import CeleryWorker
from tests.worker_proc import ROOT

APP = "tests.celery_step_app"
STARTED = re.compile(r"brama events \S+: started in pid (\d+): queue (\S+), bindings (\S+),"
                     r" prefix (\S+)")


def poll(what: str, predicate: Callable[[], Any], timeout: float = 15.0,
         info: Callable[[], str] = lambda: "") -> Any:
    """``predicate()`` once it is truthy; fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s\n{info()}")
        time.sleep(0.05)


def received(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def queue_exists(url: str, name: str) -> bool:
    """Whether queue ``name`` exists (an exclusive one of another connection counts)."""
    with Connection(url) as conn:
        try:
            conn.default_channel.queue_declare(name, passive=True)
        except amqp.exceptions.NotFound:
            return False
        except amqp.exceptions.ResourceLocked:
            return True
        return True


@pytest.fixture
def brama(amqp_transport: Transport) -> Iterator[Brama]:
    """An owner in this process on the test broker and prefix, and a client of it."""
    from brama_mq.owner import run_owner

    amqp_transport.declare()
    owner = run_owner(amqp_transport)
    client = Brama(transport=amqp_transport)
    try:
        yield client
    finally:
        client.disconnect()
        owner.stop(wait=10)


class Workers:
    """Celery workers of tests.celery_step_app started by one test."""

    def __init__(self, broker_url: str, prefix: str, tmp_path: Path,
                 registry: brokers.Registry) -> None:
        self.broker_url, self.prefix, self.tmp_path = broker_url, prefix, tmp_path
        self.queue = f"{prefix}-step"
        registry.track(prefix, broker_url, queues=[self.queue], exchanges=[self.queue])
        self.started: list[CeleryWorker] = []

    def start(self, label: str, *, pool: str, concurrency: int = 1,
              name: str | None = None, app: str = APP,
              env: dict[str, str] | None = None) -> tuple[CeleryWorker, Path]:
        out = self.tmp_path / f"{label}.jsonl"
        settings = {"CELERY_BROKER_URL": self.broker_url, "STEP_PREFIX": self.prefix,
                    "STEP_QUEUE": self.queue, "STEP_OUT": str(out), **(env or {})}
        if name:
            settings["STEP_NAME"] = name
        worker = CeleryWorker(self.tmp_path / f"{label}.log", settings, pool=pool,
                              concurrency=concurrency, app=app)
        self.started.append(worker)
        return worker, out

    def close(self) -> None:
        for worker in self.started:
            worker.close()


@pytest.fixture
def workers(broker_url: str, prefix: str, tmp_path: Path,
            broker_registry: brokers.Registry) -> Iterator[Workers]:
    """Starts Celery workers for the test; stops them all at teardown."""
    w = Workers(broker_url, prefix, tmp_path, broker_registry)
    try:
        yield w
    finally:
        w.close()


def stop(worker: CeleryWorker) -> str:
    """Warm shutdown; it must exit 0 without a traceback. Returns its log."""
    worker.close()
    out = worker.output()
    assert worker.proc.returncode == 0 and "Traceback" not in out, out
    return out


def started(worker: CeleryWorker) -> re.Match[str]:
    """The step's start line, once the worker is ready (the step starts before that)."""
    out = worker.wait_for_log(" ready.", timeout=30)
    match = STARTED.search(out)
    assert match, f"the brama events step did not start:\n{out}"
    return match


def test_install_checks_its_arguments_and_adds_a_consumer_step() -> None:
    """install() fails at once on a bad filter, name, option or handler (before any
    worker starts) and returns the StartStopStep it added to the consumer blueprint."""
    app = Celery("install-check", broker="memory://", set_as_current=False)
    with pytest.raises(FilterError, match="circuit_opend"):
        install(app, handler=print, events="circuit_opend")
    with pytest.raises(ValueError, match="subscription name"):
        install(app, handler=print, name="no spaces please")
    with pytest.raises(ValueError, match="max_deliveries"):
        install(app, handler=print, max_deliveries=0)
    with pytest.raises(TypeError, match="handler"):
        install(app, handler=42)  # type: ignore[arg-type]
    assert not app.steps["consumer"]

    step = install(app, handler=print, events=iter(["circuit_opened"]), scope="payments",
                   name="alerts")
    assert issubclass(step, EventsStep) and issubclass(step, StartStopStep)
    assert app.steps["consumer"] == {step}
    assert step.requires == ("celery.worker.consumer.connection:Connection",)
    assert step.brama_subscribe["events"] == ["circuit_opened"]  # an iterator, read once
    with pytest.raises(ValueError, match="already installed"):
        install(app, handler=print, name="alerts")
    other = install(app, handler=print)
    assert other.name != step.name and app.steps["consumer"] == {step, other}


def test_step_keeps_its_subscription_across_consumer_restarts_and_closes_on_stop(
    memory_transport: MemoryTransport, caplog: pytest.LogCaptureFixture
) -> None:
    """The step (driven as Celery's consumer blueprint drives it) opens one subscription
    on start; a stop while the blueprint still runs (a consumer restart) keeps it and
    the next start reuses it; a real stop closes it; a start replaces a dead one; a
    failing first start raises, a failing later one is logged."""
    from brama_mq.owner import run_owner

    owner = run_owner(memory_transport)
    client = Brama(transport=memory_transport)
    got: list[tuple[str, str]] = []
    app = Celery("lifecycle", broker="memory://", set_as_current=False)
    app.conf.brama_client = client
    step_cls = install(app, handler=lambda e: got.append(
        (e.event, threading.current_thread().name)), events="circuit_opened")
    consumer = SimpleNamespace(app=app, blueprint=SimpleNamespace(state=bootsteps.RUN))
    step = step_cls(consumer)
    try:
        client.register("api", scope="s", wait=True)
        step.start(consumer)
        sub = step.subscription
        assert sub is not None and not sub.closed
        client.open("api", scope="s", expiry_ms=None, wait=True)
        poll("the event", lambda: got)
        assert got[0][0] == "circuit_opened" and got[0][1].startswith("brama-handler-")

        step.stop(consumer)  # a consumer restart: Celery's blueprint is still RUN
        step.start(consumer)
        assert step.subscription is sub and not sub.closed
        sub.close()  # as when its transport gives up
        step.start(consumer)
        assert step.subscription is not sub and not step.subscription.closed
        sub = step.subscription

        consumer.blueprint.state = bootsteps.CLOSE  # the worker stops
        step.stop(consumer)
        assert sub.closed and step.subscription is None
        step.shutdown(consumer)  # then Celery's shutdown: nothing left to do

        app.conf.brama_client = None  # memory:// without a client cannot subscribe
        with pytest.raises(ValueError, match="brama_client"):
            step_cls(consumer).start(consumer)
        step.start(consumer)  # not its first start: logged, the worker goes on
        assert step.subscription is None and "could not reopen" in caplog.text
    finally:
        step.close_subscription()
        client.disconnect()
        owner.stop(wait=5)


@pytest.mark.broker
def test_prefork_worker_receives_exactly_the_filtered_events_and_closes_on_stop(
    brama: Brama, workers: Workers, broker_url: str, prefix: str
) -> None:
    """A prefork worker's main process gets circuit_opened of scope payments only, on
    the prefix of its brama_prefix setting, in the brama-handler thread; a warm shutdown
    closes the subscription and its exclusive queue goes."""
    worker, out = workers.start("prefork", pool="prefork", concurrency=2)
    match = started(worker)
    pid, queue, bindings, used_prefix = match.groups()
    assert int(pid) == worker.pid, "the step runs in the worker's main process"
    assert used_prefix == prefix and bindings == "payments.*.circuit_opened"
    assert queue_exists(broker_url, queue)

    for scope in ("payments", "other"):
        brama.register("payment_api", scope=scope, wait=True, expiry_ms=60_000)
    brama.open("payment_api", scope="other", expiry_ms=None, wait=True)
    brama.open("payment_api", scope="payments", expiry_ms=None, reason="first", wait=True)
    poll("the first event", lambda: received(out), info=worker.output)
    brama.close("payment_api", scope="payments", wait=True)
    # The owner publishes in order: once the second payments event is in, every event
    # before it (the other scope's, the state changes) has been filtered out already.
    brama.open("payment_api", scope="payments", expiry_ms=None, reason="second", wait=True)
    got = poll("the second event", lambda: len(received(out)) >= 2 and received(out),
               info=worker.output)
    assert [(e["event"], e["scope"], e["connection"]) for e in got] == [
        ("circuit_opened", "payments", "payment_api")] * 2
    assert {e["pid"] for e in got} == {worker.pid}
    assert all(e["thread"].startswith("brama-handler-transient") for e in got)

    out_log = stop(worker)
    assert re.search(r"brama events \S+: closed in pid", out_log), out_log
    poll("the transient queue disappearing", lambda: not queue_exists(broker_url, queue))


@pytest.mark.broker
def test_workers_sharing_a_name_split_the_events_each_handled_once(
    brama: Brama, workers: Workers, broker_registry: brokers.Registry, broker_url: str,
    prefix: str
) -> None:
    """Two workers (solo and threads pools) installing name="alerts" share its durable
    queue: every event is handled exactly once in all, by one of them; the queue stays
    after they stop."""
    topology = Topology(prefix)
    queue = topology.subscription_queue("alerts")
    broker_registry.track(prefix, broker_url,
                          queues=[queue, topology.subscription_dead_queue("alerts")])
    solo, out_a = workers.start("solo", pool="solo", name="alerts")
    threads, out_b = workers.start("threads", pool="threads", concurrency=2, name="alerts")
    for worker in (solo, threads):
        assert started(worker).group(2) == queue

    connections = [f"api{i}" for i in range(12)]
    for name in connections:
        brama.register(name, scope="payments", wait=True)
    brama.register("api0", scope="other", wait=True)
    brama.open("api0", scope="other", expiry_ms=None, wait=True)
    for name in connections:
        brama.open(name, scope="payments", expiry_ms=None, wait=True)

    def handled() -> list[dict[str, Any]]:
        return received(out_a) + received(out_b)

    poll("every event handled", lambda: len(handled()) >= len(connections),
         info=lambda: solo.output()[-3000:] + threads.output()[-3000:])
    a, b = received(out_a), received(out_b)
    assert sorted(e["connection"] for e in a + b) == sorted(connections)  # once each
    assert {(e["event"], e["scope"]) for e in a + b} == {("circuit_opened", "payments")}
    assert a and b, f"one worker got everything: {len(a)} / {len(b)}"
    assert {e["pid"] for e in a} == {solo.pid} and {e["pid"] for e in b} == {threads.pid}
    assert all(e["thread"] == "brama-handler-alerts" for e in a + b)

    for worker in (solo, threads):
        stop(worker)
    assert queue_exists(broker_url, queue), "a named subscription's queue outlives workers"


def readme_events_app() -> str:
    """The README's Celery example followed by its "Receiving events in the worker" one."""
    section = (ROOT / "README.md").read_text().split("\n## Celery\n", 1)[1].split("\n## ", 1)[0]
    (guarded_app,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    (events,) = re.findall(r"```py\n(.*?)```", section, flags=re.S)
    return guarded_app + "\n" + events


@pytest.mark.broker
def test_readme_worker_events_example_runs_in_a_real_worker(
    brama: Brama, workers: Workers, broker_registry: brokers.Registry, broker_url: str,
    prefix: str, tmp_path: Path
) -> None:
    """The README's install() example, in a worker given only BRAMA_PREFIX, logs an
    alert for a payments circuit that opens."""
    topology = Topology(prefix)
    name = "payment-alerts"
    broker_registry.track(prefix, broker_url, queues=[
        topology.subscription_queue(name), topology.subscription_dead_queue(name)])
    source = readme_events_app().replace("amqp://guest:guest@127.0.0.1:5672//", broker_url)
    source += "\napp.conf.broker_heartbeat = 0  # the test's: stop in 0.1 s, not 10\n"
    (tmp_path / "readme_app.py").write_text(source)
    worker, _ = workers.start("readme", pool="solo", app="readme_app", env={
        "BRAMA_PREFIX": prefix, "PYTHONPATH": f"{tmp_path}:{ROOT}"})
    assert started(worker).group(4) == prefix
    brama.register("payment_api", scope="payments", wait=True)
    brama.open("payment_api", scope="payments", expiry_ms=None, reason="maintenance",
               wait=True)
    worker.wait_for_log("circuit opened: payments/payment_api (maintenance)", timeout=15)
    stop(worker)
