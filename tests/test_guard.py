"""``client.guard`` / ``client.guarded`` and the local view, on the in-process transport
with a real owner loop (``run_owner``), plus the outbox and the view's bookkeeping."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from brama_mq.client import Brama
from brama_mq.client.guard import ADMIT_CLOSED, Guard, runtime_for
from brama_mq.client.local_view import FAIL_CLOSED, LocalView, ViewEntry, view_key
from brama_mq.client.outbox import Outbox, Report, coalesce
from brama_mq.errors import CircuitOpenError
from brama_mq.owner import Owner, run_owner
from brama_mq.protocol import decode_command
from brama_mq.transport import MemoryTransport
from brama_mq.transport.base import EventSource


@dataclass
class Stack:
    transport: MemoryTransport
    owner: Owner
    client: Brama
    tap: EventSource

    def flush(self) -> None:
        """Until the owner has applied every report sent so far (a status request queues
        behind them on the owner queue)."""
        runtime = self.client.guard_runtime
        assert runtime is not None
        assert runtime.outbox.flush(5)
        self.client.snapshot()

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        out = []
        for d in self.tap.get(0.2):
            event = json.loads(d.body)
            if kind is None or event["event"] == kind:
                out.append(event)
        return out

    def wait_state(self, state: str, connection: str = "api", timeout: float = 5.0) -> None:
        view = self.client.local_view
        deadline = time.monotonic() + timeout
        while view.state(connection, "s") != state:
            assert time.monotonic() < deadline, (state, view.entry(connection, "s"))
            time.sleep(0.01)


@pytest.fixture
def stack(memory_transport: MemoryTransport) -> Iterator[Stack]:
    owner = run_owner(memory_transport)
    client = Brama(transport=memory_transport)
    tap = memory_transport.event_source()
    tap.bind(["#"])
    try:
        yield Stack(memory_transport, owner, client, tap)
    finally:
        client.disconnect()
        owner.stop(wait=5)


def _register(stack: Stack, **policy: Any) -> None:
    options = {"max_attempts": 2, "expiry_ms": 60_000, **policy}
    stack.client.register("api", scope="s", wait=True, **options)


def test_closed_circuit_runs_the_block_and_reports_a_success(stack: Stack) -> None:
    """With the circuit closed the block runs, and its success reaches the owner."""
    _register(stack)
    with stack.client.guard("api", scope="s") as admission:
        ran = True
    assert ran and admission.allowed and admission.state == "closed"
    stack.flush()
    assert stack.client.status("api", scope="s")["last_success_time"] is not None


def test_closed_check_is_one_lookup_returning_the_shared_admission(stack: Stack) -> None:
    """A check of a closed circuit is a lookup in view.closed answering ADMIT_CLOSED."""
    _register(stack)
    guard = Guard(stack.client, "api", "s")
    assert guard.admit() is ADMIT_CLOSED  # the first check starts the view
    assert view_key("s", "api") in stack.client.local_view.closed
    assert guard.admit() is ADMIT_CLOSED


def test_recorded_failures_open_the_circuit_and_keep_the_body_out(stack: Stack) -> None:
    """Recorded failures open the circuit; then calls fail fast with the time left, unrun."""
    _register(stack)
    entered: list[int] = []

    @stack.client.guarded("api", scope="s", record=(TimeoutError,))
    def call(n: int) -> int:
        entered.append(n)
        raise TimeoutError("slow")

    for n in range(2):
        with pytest.raises(TimeoutError):
            call(n)
    stack.flush()
    stack.wait_state("open")
    with pytest.raises(CircuitOpenError) as refused:
        call(99)
    assert entered == [0, 1]
    err = refused.value
    assert (err.connection, err.scope, err.state) == ("api", "s", "open")
    assert err.retry_after_ms is not None and 50_000 < err.retry_after_ms <= 60_000
    failures = [e for e in stack.events("failure")]
    assert [e["data"]["reason"] for e in failures] == ["TimeoutError: slow"] * 2


def test_ignored_exceptions_report_nothing(stack: Stack) -> None:
    """An exception listed in ``ignore`` propagates and is neither a failure nor a success."""
    _register(stack)

    @stack.client.guarded("api", scope="s", ignore=(KeyError,))
    def call() -> None:
        raise KeyError("missing")

    for _ in range(3):
        with pytest.raises(KeyError):
            call()
    stack.flush()
    status = stack.client.status("api", scope="s")
    assert status["state"] == "closed"
    assert status["last_failure_time"] is None and status["last_success_time"] is None


def test_exceptions_outside_record_count_as_success(stack: Stack) -> None:
    """With ``record`` narrowed, any other exception is the service answering: a success."""
    _register(stack)
    stack.client.failure("api", scope="s", wait=True)

    @stack.client.guarded("api", scope="s", record=(TimeoutError,))
    def call() -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        call()
    stack.flush()
    status = stack.client.status("api", scope="s")
    assert status["failure_count"] == 0 and status["last_success_time"] is not None


def test_half_open_permits_are_rationed_across_callers(stack: Stack) -> None:
    """Half-open admits only permit holders; others are refused; the probe's success closes."""
    _register(stack, expiry_ms=200, half_open_permits=1)
    stack.client.open("api", scope="s", wait=True)
    runtime_for(stack.client)
    stack.wait_state("half_open")
    inside = threading.Event()
    release = threading.Event()
    result: dict[str, Any] = {}

    def probe() -> None:
        with stack.client.guard("api", scope="s") as admission:
            result["probe"] = admission
            inside.set()
            release.wait(5)

    thread = threading.Thread(target=probe)
    thread.start()
    assert inside.wait(5)
    with pytest.raises(CircuitOpenError) as refused, stack.client.guard("api", scope="s"):
        pytest.fail("a second caller entered while the only permit was held")
    assert refused.value.state == "half_open"
    assert refused.value.retry_after_ms is not None and refused.value.retry_after_ms <= 2_000
    release.set()
    thread.join(5)
    assert result["probe"].probe and result["probe"].why == "probe"
    stack.flush()
    stack.wait_state("closed")


def test_probe_permit_is_given_back_when_nothing_is_reported(stack: Stack) -> None:
    """A probe whose exception is ignored gives its permit back at once."""
    _register(stack, expiry_ms=200, half_open_permits=1, probe_timeout_ms=60_000)
    stack.client.open("api", scope="s", wait=True)
    runtime_for(stack.client)
    stack.wait_state("half_open")
    with pytest.raises(KeyError), stack.client.guard("api", scope="s", ignore=(KeyError,)) as a:
        assert a.probe
        assert stack.client.status("api", scope="s")["permits_in_use"] == 1
        raise KeyError("not a failure")
    stack.flush()
    assert stack.client.status("api", scope="s")["permits_in_use"] == 0


def test_async_functions_and_async_with_are_guarded(stack: Stack) -> None:
    """Coroutine functions and ``async with`` are checked, run and reported like sync ones."""
    _register(stack)

    @stack.client.guarded("api", scope="s", record=(TimeoutError,))
    async def call(fail: bool) -> str:
        await asyncio.sleep(0)
        if fail:
            raise TimeoutError("slow")
        return "ok"

    async def scenario() -> list[str]:
        seen = [await call(False)]
        async with stack.client.guard("api", scope="s") as admission:
            seen.append(admission.state)
        for _ in range(2):
            with pytest.raises(TimeoutError):
                await call(True)
        await asyncio.to_thread(stack.flush)
        await asyncio.to_thread(stack.wait_state, "open")
        with pytest.raises(CircuitOpenError):
            await call(False)
        with pytest.raises(CircuitOpenError):
            async with stack.client.guard("api", scope="s"):
                pytest.fail("entered an open circuit")
        return seen

    assert asyncio.run(scenario()) == ["ok", "closed"]


def test_unregistered_connection_runs_unguarded_and_reports_nothing(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    """An unregistered connection runs unguarded, logs once and sends (dead-letters) nothing."""
    _register(stack)
    caplog.set_level(logging.WARNING, logger="brama_mq.guard")
    for _ in range(2):
        with stack.client.guard("nobody", scope="s") as admission:
            assert admission.why == "unregistered" and not admission.report
    stack.flush()
    dead = stack.transport.broker.inspect(stack.transport.topology.dead_queue)
    assert dead["messages"] == 0
    assert sum("is not registered" in r.message for r in caplog.records) == 1


def test_fail_mode_applies_when_the_view_has_no_data(
    memory_transport: MemoryTransport, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a snapshot, fail mode 'open' runs calls and 'closed' refuses them, both logged."""
    caplog.set_level(logging.WARNING, logger="brama_mq.guard")
    clients = [Brama(transport=memory_transport) for _ in range(2)]
    try:
        open_mode, closed_mode = clients
        for client, mode in ((open_mode, "open"), (closed_mode, FAIL_CLOSED)):
            client.request_timeout = 0.2
            LocalView.attach(client, wait=None, fail_mode=mode, max_staleness=5.0)
            runtime_for(client, startup_timeout=0.3)
        with open_mode.guard("api", scope="s") as admission:
            assert admission.why == "fail-open"
        with pytest.raises(CircuitOpenError) as refused, closed_mode.guard("api", scope="s"):
            pytest.fail("fail mode 'closed' let a call through")
        assert refused.value.state == "unknown"
        text = caplog.text
        assert "fail mode 'open'" in text and "fail mode 'closed'" in text
    finally:
        for client in clients:
            client.disconnect()


def test_view_drops_stale_and_duplicate_events_by_seq() -> None:
    """The view ignores events not newer (by seq), and tombstones removals against stragglers."""
    view = LocalView(Brama(transport=MemoryTransport()))
    ev = {"event": "state_change", "connection": "api", "scope": "s", "seq": 5,
          "data": {"new_state": "open", "open_until": 123}}
    assert view.apply_event(ev)
    assert not view.apply_event({**ev, "seq": 4, "data": {"new_state": "closed"}})
    assert not view.apply_event(ev)
    assert view.entry("api", "s") == ViewEntry("s", "api", "open", 123, 5)
    assert view.apply_event({"event": "connection_removed", "connection": "api", "scope": "s",
                             "seq": 7, "data": {}})
    assert view.entry("api", "s") is None
    assert not view.apply_event({**ev, "seq": 6})
    assert view.apply_event({"event": "connection_registered", "connection": "api",
                             "scope": "s", "seq": 9, "data": {"state": "closed"}})
    assert view.entry("api", "s") is not None and view_key("s", "api") in view._closed_live


def test_view_orders_by_epoch_then_seq() -> None:
    """An event of an older epoch (a superseded owner's late publish) never moves the view,
    whatever its seq, and is counted as stale_epoch; a newer epoch wins even with a lower
    seq; a snapshot of an older epoch does not overwrite a newer event."""
    view = LocalView(Brama(transport=MemoryTransport()))
    ev = {"event": "state_change", "connection": "api", "scope": "s", "seq": 5, "epoch": 4,
          "data": {"new_state": "open", "open_until": 123}}
    assert view.apply_event(ev)
    assert not view.apply_event({**ev, "epoch": 2, "seq": 50, "data": {"new_state": "closed"}})
    assert view.counters["stale_epoch"] == 1
    assert view.entry("api", "s") == ViewEntry("s", "api", "open", 123, 5, 4)
    assert view.apply_event({**ev, "epoch": 9, "seq": 3, "data": {"new_state": "half_open"}})
    view.apply_snapshot([{"connection": "api", "scope": "s", "state": "closed", "seq": 8,
                          "epoch": 4}])
    entry = view.entry("api", "s")
    assert entry is not None and (entry.state, entry.epoch, entry.seq) == ("half_open", 9, 3)


def test_snapshot_removes_what_the_owner_no_longer_has_and_keeps_newer_events() -> None:
    """A snapshot drops unlisted connections but never overwrites a newer event."""
    view = LocalView(Brama(transport=MemoryTransport()))
    view.apply_event({"event": "state_change", "connection": "a", "scope": None, "seq": 9,
                      "data": {"new_state": "half_open"}})
    view.apply_event({"event": "connection_registered", "connection": "gone", "scope": None,
                      "seq": 1, "data": {"state": "closed"}})
    view.apply_snapshot([
        {"scope": None, "connection": "a", "state": "open", "open_until": 1, "seq": 8},
        {"scope": None, "connection": "b", "state": "closed", "open_until": None, "seq": 3},
    ])
    assert view.entry("a").state == "half_open"  # type: ignore[union-attr]
    assert view.entry("b").state == "closed"  # type: ignore[union-attr]
    assert view.entry("gone") is None


def test_successes_in_a_row_are_merged_but_order_per_connection_is_kept() -> None:
    """Runs of plain successes merge into counted reports; per-connection order is kept."""
    r = [
        Report("success", "a", None, None, None, 1),
        Report("success", "b", None, None, None, 2),
        Report("success", "a", None, None, None, 3),
        Report("failure", "a", None, "x", None, 4),
        Report("success", "a", None, None, None, 5),
        Report("success", "a", None, None, "lease-1", 6),
        Report("success", "b", None, None, None, 7),
    ]
    merged = coalesce(r)
    assert [(m.op, m.connection, m.times, m.ts_ns) for m in merged] == [
        ("success", "a", 2, 3),
        ("success", "b", 2, 7),
        ("failure", "a", 1, 4),
        ("success", "a", 1, 5),
        ("success", "a", 1, 6),
    ]


def test_outbox_commands_are_valid_protocol_commands() -> None:
    """Outbox bodies decode as protocol commands (escaped reason, count and lease options)."""
    outbox = Outbox(Brama(transport=MemoryTransport()).commands)
    report = Report("failure", "pay.api", 's"1', "Boom: \udc80 \u2028", None, 5_000_000_000)
    body = outbox.encode(report)
    command = decode_command(body, "application/json")
    assert (command.op, command.connection, command.scope) == ("failure", "pay.api", 's"1')
    assert command.reason is not None and command.reason.startswith("Boom: ")
    assert command.ts == 5000
    many = decode_command(outbox.encode(Report("success", "a", None, None, None, 1, 7)),
                          "application/json")
    assert many.options == {"count": 7}


def test_count_of_a_batched_success_is_applied_and_published(stack: Stack) -> None:
    """The owner applies ``count`` successes as that many and says so in the event."""
    _register(stack, strategy="failure_rate", window_size=4, minimum_calls=4,
              failure_rate_threshold=50.0)
    guard = Guard(stack.client, "api", "s")
    for _ in range(2):
        stack.client.failure("api", scope="s", wait=True)
    runtime = runtime_for(stack.client)
    for _ in range(3):
        runtime.outbox.put("success", "api", "s")
    stack.flush()
    assert guard.admit() is ADMIT_CLOSED
    successes = stack.events("success")
    assert sum(e["data"].get("count", 1) for e in successes) == 3
    # window [F, F, S, S] then S: 1 failure in 4 -> still closed after another failure
    stack.client.failure("api", scope="s", wait=True)
    assert stack.client.status("api", scope="s")["state"] == "closed"


def test_full_outbox_drops_and_counts_then_delivers_in_order_when_the_owner_is_back(
    memory_transport: MemoryTransport,
) -> None:
    """A full outbox drops and counts; what it kept arrives in order once commands route."""
    owner = run_owner(memory_transport)
    client = Brama(transport=memory_transport)
    client.register("api", scope="s", wait=True, max_attempts=100)
    owner.stop(wait=5)
    topology = memory_transport.topology
    memory_transport.broker.delete_queue(topology.owner_queue())  # commands are unroutable
    outbox = Outbox(client.commands, max_size=3, linger=0)
    try:
        outbox.put("failure", "api", "s", "first")
        deadline = time.monotonic() + 5
        while outbox.counters["retries"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for n in range(10):
            outbox.put("failure", "api", "s", f"r{n}")
        assert outbox.stats()["dropped"] == 7 and outbox.pending() == 4
        tap = memory_transport.event_source()
        tap.bind(["*.*.failure"])
        memory_transport.declare()
        owner = run_owner(memory_transport, engine=owner.engine)  # same breakers as before
        try:
            assert outbox.flush(10)
            client.snapshot()  # queued behind the reports: they are applied when it answers
            reasons = [json.loads(d.body)["data"]["reason"] for d in tap.get(1.0)]
        finally:
            owner.stop(wait=5)
        assert reasons == ["first", "r0", "r1", "r2"]
    finally:
        outbox.close(1)
        client.disconnect()


def test_module_level_guard_uses_the_default_client(stack: Stack) -> None:
    """``brama_mq.guard`` / ``brama_mq.guarded`` guard through the default client."""
    import brama_mq

    _register(stack)
    old = brama_mq.set_default_client(stack.client)
    try:

        @brama_mq.guarded("api", scope="s")
        def call() -> str:
            return "ok"

        assert call() == "ok"
        with brama_mq.guard("api", scope="s") as admission:
            assert admission.state == "closed"
    finally:
        brama_mq.set_default_client(old)
