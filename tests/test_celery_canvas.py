"""Guarded tasks in chains, groups and chords while their circuit is open, on a real
prefork worker (tests/celery_canvas_app.py, task events on) with RabbitMQ as the
Celery broker, Redis as the result backend and a real owner in this process.

Each test opens the circuit by hand, waits until the worker's local view says so (a
task that reads it), sends its canvases, and leaves the circuit closed again. Results
live under the module's own key prefix in Redis db ``REDIS_DB`` (deleted at the end).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, chain, chord, group
from celery.events.state import State
from celery.exceptions import ChordError
from celery.result import AsyncResult, GroupResult

from brama_mq.celery import SKIPPED
from brama_mq.client import Brama
from brama_mq.errors import CircuitOpenError
from brama_mq.owner import Owner, run_owner
from brama_mq.transport import Topology
from brama_mq.transport.amqp import AmqpTransport
from tests import brokers
from tests.celery_canvas_app import CONNECTION, SCOPE
from tests.celery_proc import CeleryWorker

pytestmark = pytest.mark.broker

REDIS_DB = 11  # no other test uses Redis; bench/guard.py defaults to db 15
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
APP = "tests.celery_canvas_app"


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


class EventWatch:
    """Celery task events through ``celery.events.state.State``, what Flower uses."""

    def __init__(self, app: Celery) -> None:
        self.state = State()
        self._conn = app.connection_for_read()
        self._receiver = app.events.Receiver(self._conn, handlers={"*": self._on_event})
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="celery-events", daemon=True)
        self._thread.start()

    def _on_event(self, event: dict[str, Any]) -> None:
        self.state.event(event)

    def _run(self) -> None:
        self._receiver.on_consume_ready = lambda *_a, **_k: self._ready.set()
        self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def wait_ready(self) -> None:
        assert self._ready.wait(10), "the event receiver did not start"

    def task_state(self, task_id: str) -> str | None:
        task = self.state.tasks.get(task_id)
        return None if task is None else str(task.state)

    def close(self) -> None:
        self._receiver.should_stop = True
        self._thread.join(5)
        self._conn.release()


@dataclass
class Canvas:
    sender: Celery
    client: Brama
    worker: CeleryWorker
    events: EventWatch
    errbacks: Path
    queue: str
    opened: list[str] = field(default_factory=list)

    def sig(self, name: str, *args: Any) -> Any:
        return self.sender.signature(f"canvas.{name}", args=args, queue=self.queue)

    def view(self) -> str | None:
        return self.sig("view_state").delay().get(timeout=15)

    def open(self, expiry_ms: int | None) -> None:
        """Open the circuit; returns once the worker's view has it open."""
        self.client.open(CONNECTION, scope=SCOPE, expiry_ms=expiry_ms, wait=True)
        poll("the worker's view seeing the circuit open", lambda: self.view() == "open")

    def close(self) -> None:
        self.client.close(CONNECTION, scope=SCOPE, wait=True)
        poll("the worker's view seeing the circuit closed", lambda: self.view() == "closed")

    def barrier(self) -> None:
        """A plain task sent now has run: what the worker was handed before is done."""
        assert self.sig("add", 0, 0).delay().get(timeout=15) == 0

    def never_received(self, *results: AsyncResult, state: str = "PENDING") -> None:
        """These tasks were never sent to the worker (after a barrier), and their
        results say ``state``."""
        self.barrier()
        log = self.worker.output()
        for r in results:
            assert r.state == state, (r.id, r.state)
            assert f"[{r.id}] received" not in log, f"task {r.id} was sent"

    def wait_state(self, result: AsyncResult, state: str) -> None:
        poll(f"task {result.id} becoming {state}", lambda: result.state == state,
             info=lambda: f"state {result.state}\n{self.worker.output()[-4000:]}")


@pytest.fixture(scope="module")
def canvas(
    broker_url: str, broker_registry: brokers.Registry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Canvas]:
    """Owner, a prefork worker (one child: one local view) with events on, a sender app
    and an event watcher, under a prefix of this module's own."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    queue = f"{prefix}-canvas"
    broker_registry.track(prefix, broker_url, queues=[queue], exchanges=[queue])
    store = redis.Redis.from_url(REDIS_URL)
    try:
        store.ping()
    except redis.RedisError as exc:
        pytest.fail(f"no Redis at {REDIS_URL} for the result backend: {exc}", pytrace=False)
    tmp = tmp_path_factory.mktemp("canvas")
    transport = AmqpTransport(broker_url, Topology(prefix), reconnect_timeout=20)
    broker_registry.track_transport(prefix, transport)
    transport.declare()
    owner: Owner = run_owner(transport)
    client = Brama(transport=transport)
    sender = Celery("canvas-sender", broker=broker_url, backend=REDIS_URL, set_as_current=False)
    sender.conf.update(result_backend_transport_options={"global_keyprefix": f"{prefix}:"},
                       task_default_queue=queue)
    events = EventWatch(sender)
    worker: CeleryWorker | None = None
    try:
        client.register(CONNECTION, scope=SCOPE, wait=True, max_attempts=3,
                        expiry_ms=60_000, half_open_permits=1)
        events.wait_ready()
        worker = CeleryWorker(tmp / "celery.log", {
            "CELERY_BROKER_URL": broker_url, "CANVAS_BACKEND": REDIS_URL,
            "CANVAS_PREFIX": prefix, "CANVAS_QUEUE": queue,
            "CANVAS_ERRBACKS": str(tmp / "errbacks"),
        }, pool="prefork", concurrency=1, app=APP, extra=["-E"])
        worker.wait_for_log(" ready.", timeout=30)
        c = Canvas(sender, client, worker, events, tmp / "errbacks", queue)
        assert c.view() == "closed"
        yield c
    finally:
        if worker is not None:
            worker.close()
        events.close()
        sender.close()
        client.disconnect()
        owner.stop(wait=10)
        transport.close()
        for key in store.scan_iter(f"{prefix}:*"):
            store.delete(key)
        store.close()
        errors = broker_registry.sweep(prefix, [broker_url])
        assert not errors, errors


@pytest.fixture
def c(canvas: Canvas) -> Iterator[Canvas]:
    """The module's deployment; the circuit is closed again after the test."""
    yield canvas
    canvas.close()


def test_raise_fails_the_chain_the_group_member_and_the_chord_callback(c: Canvas) -> None:
    """on_open="raise": a chain stops at the guarded task (FAILURE, CircuitOpenError,
    errback called; the rest never sent, marked FAILURE by Celery); in a group only that
    member fails; a chord's callback fails with ChordError naming CircuitOpenError."""
    c.open(expiry_ms=None)
    ch = chain(c.sig("add", 1, 1), c.sig("raise_add", 10), c.sig("add", 100))
    ch.link_error(c.sender.signature("canvas.errback", queue=c.queue))
    last = ch.apply_async()
    guarded, first = last.parent, last.parent.parent
    gr: GroupResult = group(c.sig("raise_add", 1, 1), c.sig("add", 2, 2)).apply_async()
    cb: AsyncResult = chord([c.sig("raise_add", 1, 1), c.sig("add", 2, 2)])(c.sig("collect"))

    assert first.get(timeout=15) == 2
    c.wait_state(guarded, "FAILURE")
    assert "CircuitOpenError" in str(guarded.traceback) and "is open" in str(guarded.result)
    # JSON results rebuild the class itself, with its fields
    assert isinstance(guarded.result, CircuitOpenError), type(guarded.result)
    assert (guarded.result.connection, guarded.result.scope) == (CONNECTION, SCOPE)
    poll("the errback", lambda: c.errbacks.exists() and c.errbacks.read_text().split())
    assert c.errbacks.read_text().split() == [guarded.id]

    failed, four = gr.join(timeout=15, propagate=False)
    assert isinstance(failed, CircuitOpenError) and four == 4
    assert [r.state for r in gr.results] == ["FAILURE", "SUCCESS"]

    error = cb.get(timeout=15, propagate=False)
    assert cb.state == "FAILURE" and isinstance(error, ChordError)
    assert "CircuitOpenError" in str(error)
    # Celery marks the rest of a failed chain failed too, with the same error, unrun.
    c.never_received(last, state="FAILURE")
    assert "CircuitOpenError" in str(last.traceback)


def test_skip_is_skipped_for_backend_and_events_and_stops_what_waits_for_it(
    c: Canvas,
) -> None:
    """on_open="skip": the task's state is SKIPPED in the result backend (meta: why) and
    in the task events Flower reads, never SUCCESS; the rest of a chain is never sent, a
    group's other members run, a chord's header runs but its callback never fires."""
    c.open(expiry_ms=None)
    last = chain(c.sig("add", 1, 1), c.sig("skip_add", 10), c.sig("add", 100)).apply_async()
    skipped = last.parent
    gr: GroupResult = group(c.sig("skip_add", 1, 1), c.sig("add", 2, 2)).apply_async()
    cb: AsyncResult = chord([c.sig("skip_add", 1, 1), c.sig("add", 2, 2)])(c.sig("collect"))
    header = cb.parent

    c.wait_state(skipped, SKIPPED)
    info = skipped.info
    assert info["connection"] == CONNECTION and info["scope"] == SCOPE
    assert info["circuit_state"] == "open" and info["retry_after_ms"] is None
    assert "is open" in info["reason"] and not skipped.ready()
    poll("task-skipped reaching the event state", lambda: c.events.task_state(skipped.id)
         == SKIPPED, info=lambda: str(c.events.task_state(skipped.id)))

    c.wait_state(gr.results[0], SKIPPED)
    assert gr.results[1].get(timeout=15) == 4
    c.wait_state(header.results[0], SKIPPED)
    assert header.results[1].get(timeout=15) == 4
    c.never_received(last, cb)
    assert [r.state for r in gr.results] == [SKIPPED, "SUCCESS"]
    assert c.events.task_state(gr.results[0].id) == SKIPPED


def test_retry_defers_canvas_members_until_the_circuit_is_closed_by_hand(c: Canvas) -> None:
    """on_open="retry": deferred members keep their place in the canvas; once the
    circuit is closed by hand they run, and the chain, the group and the chord complete
    with every result (the chord callback fires once)."""
    c.open(expiry_ms=3_000)
    before = c.worker.output().count("brama guard: deferred")
    last = chain(c.sig("add", 1, 1), c.sig("retry_add", 10), c.sig("add", 100)).apply_async()
    gr: GroupResult = group(c.sig("retry_add", 1, 1), c.sig("retry_add", 2, 2),
                            c.sig("add", 3, 3)).apply_async()
    cb: AsyncResult = chord([c.sig("retry_add", 1, 1), c.sig("add", 2, 2)])(c.sig("collect"))
    c.worker.wait_for_log("brama guard: deferred", timeout=15, count=before + 4)
    c.wait_state(last.parent, "RETRY")
    assert cb.state == "PENDING"
    c.close()

    assert last.get(timeout=20) == 112
    assert gr.join(timeout=20) == [2, 4, 6]
    assert cb.get(timeout=20) == [2, 4]
    assert c.worker.output().count(f"[{cb.id}] received") == 1
