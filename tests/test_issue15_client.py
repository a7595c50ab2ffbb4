"""The client side of issue 15: ``duration_ms`` and ``reporter`` on outcome reports, guards
timing their calls, modes in the guard and the local view.

Hand reports and the outbox are pinned on the in-process transport with a real owner
loop; guard timing and modes run against a real owner on RabbitMQ (``run_owner`` on the
test broker), the commands the owner got read back from the link that sent them.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery

import brama_mq
from brama_mq.celery import GuardedTask, runtime_for_app, shutdown_runtimes
from brama_mq.celery import runtime as celery_runtime
from brama_mq.client import Brama
from brama_mq.client.guard import Guard
from brama_mq.client.link import CommandLink
from brama_mq.client.local_view import LocalView
from brama_mq.client.outbox import Outbox, Report, coalesce
from brama_mq.errors import CircuitOpenError, PolicyError
from brama_mq.owner import Owner, run_owner
from brama_mq.protocol import decode_command
from brama_mq.settings import Settings, SettingsError
from brama_mq.transport import MemoryTransport, Transport
from brama_mq.transport.amqp import AmqpTransport
from brama_mq.transport.base import EventSource

HOST = socket.gethostname()


class Spy:
    """Every command a client's link sends (posted, posted in batches, or asked), decoded."""

    def __init__(self, commands: CommandLink) -> None:
        self.sent: list[dict[str, Any]] = []
        post, post_many, ask = commands.post, commands.post_many, commands.ask

        def spy_post(body: bytes, key: str, ident: str) -> None:
            self.sent.append(json.loads(body))
            post(body, key, ident)

        def spy_post_many(bodies: Any) -> None:
            self.sent.extend(json.loads(body) for body, _ in bodies)
            post_many(bodies)

        def spy_ask(body: bytes, key: str, timeout: float | None = None) -> Any:
            self.sent.append(json.loads(body))
            return ask(body, key, timeout)

        commands.post = spy_post  # type: ignore[method-assign]
        commands.post_many = spy_post_many  # type: ignore[method-assign]
        commands.ask = spy_ask  # type: ignore[method-assign]

    def outcomes(self) -> list[dict[str, Any]]:
        return [c for c in self.sent if c["op"] in ("success", "failure")]


@dataclass
class Stack:
    transport: Transport
    owner: Owner
    client: Brama
    tap: EventSource
    spy: Spy

    def flush(self) -> None:
        """Until the owner applied every report so far (a snapshot queues behind them)."""
        runtime = self.client.guard_runtime
        if runtime is not None:
            assert runtime.outbox.flush(5)
        self.client.snapshot()

    def events(self, kind: str | None = None, wait: float = 0.3) -> list[dict[str, Any]]:
        out = []
        deliveries = self.tap.get(wait)
        for d in deliveries:
            event = json.loads(d.body)
            if kind is None or event["event"] == kind:
                out.append(event)
        if deliveries:
            self.tap.ack(deliveries[-1].delivery_tag, multiple=True)
        return out

    def wait_view(self, what: Callable[[LocalView], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        view = self.client.local_view
        while view is None or not what(view):
            assert time.monotonic() < deadline, view and view.entry("api", "s")
            time.sleep(0.01)
            view = self.client.local_view


def _stack(transport: Transport) -> Iterator[Stack]:
    owner = run_owner(transport)
    client = Brama(transport=transport)
    tap = transport.event_source()
    tap.bind(["#"])
    try:
        yield Stack(transport, owner, client, tap, Spy(client.commands))
    finally:
        client.disconnect()
        tap.close()
        owner.stop(wait=5)


@pytest.fixture
def stack(memory_transport: MemoryTransport) -> Iterator[Stack]:
    """An owner loop, a client and a tap on the in-process transport."""
    yield from _stack(memory_transport)


@pytest.fixture
def broker_stack(amqp_transport: AmqpTransport) -> Iterator[Stack]:
    """The same on RabbitMQ: a real owner (``run_owner``) under this test's prefix."""
    amqp_transport.declare()
    yield from _stack(amqp_transport)


# ---------------------------------------------------------------------------- hand reports


def test_hand_reports_carry_duration_and_the_reporter(stack: Stack) -> None:
    """``success``/``failure`` send ``duration_ms`` when given and ``reporter`` always
    (default ``<host>:<pid>``); the owner counts a success over ``slow_call_ms`` as slow."""
    stack.client.register("api", scope="s", wait=True, strategy="failure_rate",
                          window_size=10, slow_call_ms=100, slow_call_rate_threshold=100.0)
    slow = stack.client.success("api", scope="s", duration_ms=150, wait=True)
    fast = stack.client.failure("api", scope="s", reason="x", duration_ms=5.5, wait=True)
    stack.client.success("api", scope="s")
    stack.client.failure("api", scope="s", lease=None)
    assert slow is not None and fast is not None
    assert slow.events[0].event == "success" and slow.events[0].slow
    assert fast.events[0].event == "failure" and not fast.events[0].slow
    me = f"{HOST}:{os.getpid()}"
    assert stack.client.reporter == me
    assert [c["options"] for c in stack.spy.outcomes()] == [
        {"reporter": me, "duration_ms": 150},
        {"reporter": me, "duration_ms": 5.5},
        {"reporter": me},
        {"reporter": me},
    ]


@pytest.mark.parametrize("bad", [-1, -0.5, "5", True, float("nan"), float("inf"), [1]])
def test_a_bad_duration_is_refused_before_anything_is_sent(stack: Stack, bad: Any) -> None:
    """A negative or non-number ``duration_ms`` raises PolicyError (a ValueError) naming
    it, from the client and from the module-level functions, and nothing is sent."""
    stack.client.register("api", scope="s", wait=True)
    before = len(stack.spy.sent)
    old = brama_mq.set_default_client(stack.client)
    try:
        calls: list[Callable[[], object]] = [
            lambda: stack.client.success("api", scope="s", duration_ms=bad),
            lambda: stack.client.failure("api", scope="s", duration_ms=bad, wait=True),
            lambda: brama_mq.success("api", scope="s", duration_ms=bad),
            lambda: brama_mq.failure("api", scope="s", duration_ms=bad),
        ]
        for call in calls:
            with pytest.raises(ValueError, match="duration_ms") as refused:
                call()
            assert isinstance(refused.value, PolicyError) and refused.value.field == "duration_ms"
    finally:
        brama_mq.set_default_client(old)
    assert len(stack.spy.sent) == before
    status = stack.client.status("api", scope="s")
    assert status["last_success_time"] is None and status["last_failure_time"] is None


def test_reporter_from_the_client_the_environment_or_the_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``Brama(reporter=...)`` over ``BRAMA_REPORTER`` over ``<host>:<pid>``; a bad name
    is refused naming ``reporter`` (PolicyError) or the setting (SettingsError)."""
    transport = MemoryTransport()
    monkeypatch.delenv("BRAMA_REPORTER", raising=False)
    assert Brama(transport=transport).reporter == f"{HOST}:{os.getpid()}"
    assert Brama(transport=transport, reporter="web-1").reporter == "web-1"
    monkeypatch.setenv("BRAMA_REPORTER", "from-env")
    assert Settings.from_env().reporter == "from-env"
    assert Brama(transport=transport).reporter == "from-env"
    assert Brama(transport=transport, reporter="mine").reporter == "mine"
    settings = Settings(reporter="given")
    assert Brama(transport=transport, settings=settings).reporter == "given"
    with pytest.raises(PolicyError, match="reporter"):
        Brama(transport=transport, reporter="")
    with pytest.raises(PolicyError, match="reporter"):
        Brama(transport=transport, reporter="x" * 201)
    monkeypatch.setenv("BRAMA_REPORTER", "x" * 201)
    with pytest.raises(SettingsError, match="reporter"):
        Settings.from_env()


def test_the_default_reporter_is_recomputed_after_fork() -> None:
    """A forked child reports as ``<host>:<its pid>``; a name given to the client stays."""
    default = Brama(transport=MemoryTransport())
    fixed = Brama(transport=MemoryTransport(), reporter="fixed")
    parent = default.reporter
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer and leave without running any cleanup
        try:
            os.write(write, f"{default.reporter}|{fixed.reporter}".encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    assert answer == f"{HOST}:{pid}|fixed"
    assert parent == default.reporter == f"{HOST}:{os.getpid()}" != f"{HOST}:{pid}"


# ---------------------------------------------------------------------------- the outbox


def test_outbox_merges_successes_only_within_one_whole_millisecond() -> None:
    """Successes merge only with successes whose duration rounds up to the same whole ms,
    all within 1 ms together (one without a duration only with one without); any other
    report ends the run; the merged report says the run's longest duration, rounded to
    the microsecond."""
    r = [
        Report("success", "a", None, None, None, 0, duration_ms=0.0001),
        Report("success", "a", None, None, None, 1, duration_ms=0.2),
        Report("success", "a", None, None, None, 2, duration_ms=0.7),
        Report("success", "a", None, None, None, 3),
        Report("success", "a", None, None, None, 4),
        Report("success", "a", None, None, None, 5, duration_ms=0.9),
        Report("success", "b", None, None, None, 6, duration_ms=40.0004),
        Report("success", "a", None, None, None, 7, duration_ms=1.5),
        Report("success", "a", None, None, None, 8, duration_ms=1.2),
        Report("success", "b", None, None, None, 9, duration_ms=39.5),
        Report("failure", "a", None, "x", None, 10, duration_ms=3.0),
        Report("success", "a", None, None, None, 11, duration_ms=2.0),
        Report("success", "a", None, None, "lease", 12, duration_ms=2.0),
    ]
    merged = [(m.op, m.connection, m.times, m.duration_ms, m.ts_ns) for m in coalesce(r)]
    assert merged == [
        ("success", "a", 3, 0.7, 2),
        ("success", "a", 2, None, 4),
        ("success", "a", 1, 0.9, 5),
        ("success", "b", 2, 40.0, 9),
        ("success", "a", 2, 1.5, 8),
        ("failure", "a", 1, 3.0, 10),
        ("success", "a", 1, 2.0, 11),
        ("success", "a", 1, 2.0, 12),
    ]


def test_merging_never_changes_which_successes_are_slow() -> None:
    """For every ``slow_call_ms`` (an integer >= 1), the merged reports stand for exactly
    as many slow successes as the reports they merge (random durations around the
    thresholds); successes within 1 ms all merge."""
    rng = random.Random(15)
    for _ in range(200):
        reports = [
            Report("success", "a", None, None, None, i,
                   duration_ms=rng.choice([rng.uniform(0, 6), float(rng.randint(0, 6)),
                                           rng.randint(0, 6) + 1e-4]))
            for i in range(rng.randint(1, 30))
        ]
        merged = coalesce(reports)
        assert sum(m.times for m in merged) == len(reports)
        for limit in range(1, 7):
            separate = sum(1 for x in reports if round(x.duration_ms or 0, 3) > limit)
            together = sum(m.times for m in merged if (m.duration_ms or 0) > limit)
            assert separate == together, (limit, reports, merged)
    fast = [Report("success", "a", None, None, None, i, duration_ms=rng.uniform(0, 1))
            for i in range(50)]
    assert [m.times for m in coalesce(fast)] == [50]


def test_outbox_commands_carry_the_reporter_and_the_duration() -> None:
    """The outbox's commands carry ``reporter`` (the outbox's own, else the link's) and
    ``duration_ms`` next to ``count`` or ``lease``; without them they are as before."""
    one = decode_command(Outbox.encode(Report("failure", "a", None, "E", None, 0,
                                              duration_ms=12.5), "w-1:7"))
    assert one.options == {"duration_ms": 12.5, "reporter": "w-1:7"}
    counted = decode_command(Outbox.encode(Report("success", "a", "s", None, None, 0, 3, 0.25),
                                           "w-1:7"))
    assert counted.options == {"count": 3, "duration_ms": 0.25, "reporter": "w-1:7"}
    leased = decode_command(Outbox.encode(Report("success", "a", None, None, "l-1", 0), "r"))
    assert leased.options == {"lease": "l-1", "reporter": "r"}
    plain = decode_command(Outbox.encode(Report("success", "a", None, None, None, 0)))
    assert plain.options == {}
    client = Brama(transport=MemoryTransport(), reporter="client-name")
    spy = Spy(client.commands)
    for outbox, expected in ((Outbox(client.commands, linger=0), "client-name"),
                             (Outbox(client.commands, linger=0, reporter="own"), "own")):
        outbox.put("failure", "a", None, "boom", None, 3.25)
        assert outbox.flush(5)
        outbox.close(1)
        assert spy.sent[-1]["options"] == {"duration_ms": 3.25, "reporter": expected}


# ---------------------------------------------------------------------------- guard timing


def test_every_guard_form_reports_how_long_the_call_took(broker_stack: Stack) -> None:
    """Decorated (sync and async) calls and ``with``/``async with`` blocks are timed in the
    client: a call sleeping 80 ms reports ``duration_ms`` >= 80 and the real owner counts
    it slow (``slow_call_ms`` 50), a call that does not sleep reports < 50, not slow;
    failures carry their duration too."""
    s = broker_stack
    s.client.register("api", scope="s", wait=True, strategy="failure_rate", window_size=100,
                      slow_call_ms=50, slow_call_rate_threshold=100.0,
                      failure_rate_threshold=100.0)
    guarded = s.client.guarded("api", scope="s")

    @guarded
    def call(pause: float, fail: bool = False) -> None:
        time.sleep(pause)
        if fail:
            raise TimeoutError("late")

    @guarded
    async def acall(pause: float) -> None:
        await asyncio.sleep(pause)

    def block(pause: float) -> None:
        with s.client.guard("api", scope="s"):
            time.sleep(pause)

    async def ablock(pause: float) -> None:
        async with s.client.guard("api", scope="s"):
            await asyncio.sleep(pause)

    forms: list[tuple[str, Callable[[float], Any]]] = [
        ("decorated", call),
        ("async decorated", lambda p: asyncio.run(acall(p))),
        ("with", block),
        ("async with", lambda p: asyncio.run(ablock(p))),
    ]
    for name, form in forms:
        for pause in (0.08, 0.0):
            s.spy.sent.clear()
            form(pause)
            s.flush()
            (sent,) = s.spy.outcomes()
            duration = sent["options"]["duration_ms"]
            assert sent["op"] == "success", name
            assert sent["options"]["reporter"] == s.client.reporter
            if pause:
                assert duration >= 80, (name, duration)
            else:
                assert 0 <= duration < 50, (name, duration)
            (event,) = s.events("success")
            assert event["data"].get("slow", False) is bool(pause), (name, event)
    s.spy.sent.clear()
    with pytest.raises(TimeoutError):
        call(0.06, fail=True)
    s.flush()
    (sent,) = s.spy.outcomes()
    assert sent["op"] == "failure" and sent["options"]["duration_ms"] >= 60
    (event,) = s.events("failure")
    assert event["data"]["slow"] is True


def test_celery_guarded_tasks_report_the_body_duration(memory_transport: MemoryTransport) -> None:
    """GuardedTask passes the body's duration (its own timing) to the outbox, success or
    failure, with the app's ``brama_reporter``."""
    owner = run_owner(memory_transport)
    client = Brama(transport=memory_transport)
    client.register("api", scope="s", wait=True, max_attempts=10)
    spy = Spy(client.commands)
    app = Celery("issue15", broker="memory://", set_as_current=False)
    app.conf.update(task_always_eager=True, brama_client=client, brama_reporter="celery-host")

    @app.task(base=GuardedTask, brama_connection="api", brama_scope="s", shared=False)
    def work(pause: float, fail: bool = False) -> str:
        time.sleep(pause)
        if fail:
            raise TimeoutError("late")
        return "ok"

    try:
        assert work.delay(0.05).get() == "ok"
        with pytest.raises(TimeoutError):
            work.delay(0.03, fail=True).get()
        assert runtime_for_app(app).outbox.flush(5)
        (ok, failed) = spy.outcomes()
        assert (ok["op"], failed["op"]) == ("success", "failure")
        assert ok["options"]["duration_ms"] >= 50 and failed["options"]["duration_ms"] >= 30
        assert ok["options"]["reporter"] == failed["options"]["reporter"] == "celery-host"
        app.conf.brama_reporter = ""
        with pytest.raises(SettingsError, match="brama_reporter"):
            celery_runtime.app_settings(app)
    finally:
        shutdown_runtimes()
        client.disconnect()
        owner.stop(wait=5)


def test_celery_default_reporter_is_the_worker_name_and_pid(
    broker_url: str, prefix: str, amqp_transport: AmqpTransport,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Inside a worker (its node name noted at worker_init) the runtime's reports say
    ``<node name>:<pid>``; ``BRAMA_REPORTER`` wins over it."""
    amqp_transport.declare()  # the prefix's topology, deleted with it at teardown
    owner = run_owner(amqp_transport)  # answers the views' snapshots (quick shutdowns)
    monkeypatch.delenv("BRAMA_REPORTER", raising=False)
    app = Celery("issue15-worker", broker=broker_url, set_as_current=False)
    app.conf.update(brama_prefix=prefix, brama_view_startup_timeout=0.5)
    node = SimpleNamespace(hostname="celery@web-7", task_events=False, app=app)
    celery_runtime._on_worker_init(sender=node)
    try:
        runtime = runtime_for_app(app, wait=False)
        assert runtime.outbox.reporter == f"celery@web-7:{os.getpid()}"
        shutdown_runtimes()
        monkeypatch.setenv("BRAMA_REPORTER", "host-wide")
        runtime = runtime_for_app(app, wait=False)
        assert runtime.outbox.reporter is None and runtime.client.commands.reporter == "host-wide"
    finally:
        shutdown_runtimes()
        celery_runtime._WORKER_NAME.clear()
        owner.stop(wait=5)
    assert celery_runtime.worker_reporter() is None


# ---------------------------------------------------------------------------- modes


def test_the_view_keeps_each_circuits_mode_from_events_and_snapshots() -> None:
    """``data.mode`` of state changes (a change of mode with the state unchanged too) and
    of registrations, ``mode`` of snapshot rows; absent means normal."""
    view = LocalView(Brama(transport=MemoryTransport()))
    view.apply_event({"event": "connection_registered", "connection": "a", "scope": "s",
                      "seq": 1, "data": {"state": "closed", "mode": "metrics_only"}})
    assert view.entry("a", "s").mode == "metrics_only"  # type: ignore[union-attr]
    assert view.apply_event({
        "event": "state_change", "connection": "a", "scope": "s", "seq": 2,
        "data": {"state": "closed", "previous_state": "closed", "new_state": "closed",
                 "reason": "mode", "mode": "disabled", "previous_mode": "metrics_only"}})
    entry = view.entry("a", "s")
    assert entry is not None and (entry.state, entry.mode, entry.seq) == ("closed", "disabled", 2)
    view.apply_event({"event": "state_change", "connection": "a", "scope": "s", "seq": 3,
                      "data": {"previous_state": "closed", "new_state": "open",
                               "reason": "mode", "previous_mode": "disabled",
                               "mode": "forced_open", "open_until": None}})
    entry = view.entry("a", "s")
    assert entry is not None and (entry.state, entry.mode, entry.open_until) == (
        "open", "forced_open", None)
    view.apply_event({"event": "state_change", "connection": "a", "scope": "s", "seq": 4,
                      "data": {"previous_state": "open", "new_state": "closed",
                               "reason": "mode", "previous_mode": "forced_open",
                               "mode": "normal"}})
    assert view.entry("a", "s").mode == "normal"  # type: ignore[union-attr]
    view.apply_snapshot([
        {"scope": "s", "connection": "a", "state": "closed", "seq": 5, "mode": "disabled"},
        {"scope": None, "connection": "b", "state": "closed", "seq": 1},
    ])
    assert view.entry("a", "s").mode == "disabled"  # type: ignore[union-attr]
    assert view.entry("b").mode == "normal"  # type: ignore[union-attr]
    assert view.mode("a", "s") is None  # not bootstrapped by its own snapshot: no vouching


def test_modes_through_the_guard_with_a_real_owner(broker_stack: Stack) -> None:
    """forced_open refuses every call (CircuitOpenError, no retry time) without running
    it; disabled and metrics_only admit every call even after failures that would open
    the circuit; the view follows each change (also closed -> closed) and a new view
    learns the mode from its snapshot; normal opens again on failures."""
    s = broker_stack
    s.client.register("api", scope="s", wait=True, max_attempts=2, expiry_ms=60_000)
    guard = Guard(s.client, "api", "s")
    assert guard.admit().allowed and guard.mode == "normal"
    ran: list[str] = []

    @s.client.guarded("api", scope="s")
    def call(tag: str, fail: bool = True) -> None:
        ran.append(tag)
        if fail:
            raise TimeoutError(tag)

    s.client.configure("api", scope="s", mode="forced_open", wait=True)
    s.wait_view(lambda v: v.mode("api", "s") == "forced_open")
    assert s.client.local_view is not None and s.client.local_view.state("api", "s") == "open"
    for _ in range(3):
        with pytest.raises(CircuitOpenError) as refused:
            call("forced", fail=False)
        assert (refused.value.state, refused.value.retry_after_ms) == ("open", None)
    assert ran == []

    s.client.configure("api", scope="s", mode="disabled", wait=True)
    s.wait_view(lambda v: v.mode("api", "s") == "disabled" and v.state("api", "s") == "closed")
    for i in range(5):
        with pytest.raises(TimeoutError):
            call(f"disabled-{i}")
    s.flush()
    status = s.client.status("api", scope="s")
    assert (status["state"], status["mode"], status["failure_count"]) == ("closed", "disabled", 5)
    assert guard.admit().allowed

    s.client.configure("api", scope="s", mode="metrics_only", wait=True)
    s.wait_view(lambda v: v.mode("api", "s") == "metrics_only")  # closed -> closed
    for i in range(3):
        with pytest.raises(TimeoutError):
            call(f"metrics-{i}")
    s.flush()
    assert s.client.status("api", scope="s")["state"] == "closed"
    assert len(ran) == 8
    failures = [e for e in s.events("failure", wait=0.5) if e["data"].get("mode")]
    assert any(e["data"].get("would_open") for e in failures), failures

    other = Brama(transport=s.transport)
    try:
        view = LocalView.attach(other, wait=10)
        assert view.mode("api", "s") == "metrics_only"
        view.stop()
    finally:
        other.disconnect()

    s.client.configure("api", scope="s", mode="normal", wait=True)
    s.wait_view(lambda v: v.mode("api", "s") == "normal")
    s.client.reset("api", scope="s", wait=True)
    for i in range(2):
        with pytest.raises(TimeoutError):
            call(f"normal-{i}")
    s.flush()
    s.wait_view(lambda v: v.state("api", "s") == "open")
    with pytest.raises(CircuitOpenError) as refused:
        call("refused")
    assert refused.value.retry_after_ms is not None and refused.value.retry_after_ms > 50_000
