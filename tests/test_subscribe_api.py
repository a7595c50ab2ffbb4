"""subscribe()/unsubscribe() on the embedded transport with a real owner, and the pure
parts (filters, coverage, duplicate window). The broker-backed twins are in
test_subscribe_broker.py and test_subscribe_processes.py."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import brama_mq
from brama_mq.core.matcher import topic_matches
from brama_mq.errors import FilterError
from brama_mq.protocol import Event, encode_event
from brama_mq.subscribe import Subscription
from brama_mq.subscribe.filters import covers, filter_keys
from brama_mq.subscribe.window import SeenWindow
from brama_mq.transport import MemoryTransport, Topology
from brama_mq.transport.memory import _Message
from tests.subscribe_helpers import Stack, collect, drain, expected, k, owner_stack, wait_until


@pytest.fixture
def stack(memory_transport: MemoryTransport) -> Iterator[Stack]:
    with owner_stack(memory_transport) as s:
        yield s
    brama_mq.unsubscribe()


def _open(stack: Stack, name: str, scope: str = "payments", max_attempts: int = 2) -> None:
    c = stack.client
    c.register(name, scope=scope, max_attempts=max_attempts, expiry_ms=60_000, wait=True)
    for _ in range(max_attempts):
        c.failure(name, scope=scope, wait=True)


# -- filters ------------------------------------------------------------------------------


def test_filter_keys_are_the_cross_product() -> None:
    """Bindings are scope x connection x event, '*' where absent, '#' with no filter."""
    assert filter_keys() == ["#"]
    assert filter_keys(scope="payments") == ["payments.*.*"]
    assert filter_keys(events=["state_change", "failure"], connection="payment_api") == [
        "*.payment_api.state_change",
        "*.payment_api.failure",
    ]
    assert filter_keys(events="failure", connection=["a", "b"], scope=["s", "t"]) == [
        "s.a.failure", "s.b.failure", "t.a.failure", "t.b.failure",
    ]
    assert filter_keys(connection="a.b") == ["*.a%2Eb.*"]
    assert filter_keys(patterns="payments.#") == ["payments.#"]
    assert filter_keys(scope="s", patterns=["x.#"]) == ["x.#", "s.*.*"]


def test_event_typo_is_an_error_listing_the_valid_names(memory_transport: MemoryTransport
                                                        ) -> None:
    """A misspelt event name fails subscribe() and unsubscribe() and lists the valid ones."""
    with pytest.raises(FilterError) as info:
        brama_mq.subscribe(events=["state_chnage"], transport=memory_transport)
    assert "state_chnage" in str(info.value)
    for name in brama_mq.EVENT_TYPES:
        assert name in str(info.value)
    with pytest.raises(FilterError, match="valid events"):
        brama_mq.unsubscribe(events="circuit_open")
    with pytest.raises(FilterError, match="empty"):
        brama_mq.subscribe(connection=[], transport=memory_transport)


def test_covers_is_exactly_pattern_inclusion() -> None:
    """covers(w, n) holds iff every key n matches is matched by w (all 1-3 word patterns)."""
    words = ["a", "b", "*", "#"]
    patterns = [".".join(p) for n in (1, 2, 3) for p in itertools.product(words, repeat=n)]
    keys = [""] + [".".join(p) for n in range(1, 6) for p in itertools.product("abc", repeat=n)]
    matched = {p: frozenset(key for key in keys if topic_matches(p, key)) for p in patterns}
    for wide in patterns:
        for narrow in patterns:
            assert covers(wide, narrow) == (matched[narrow] <= matched[wide]), (wide, narrow)


def test_seen_window_forgets_the_oldest() -> None:
    """The duplicate window holds the last N keys and forgets older ones first."""
    w = SeenWindow(2)
    for seq in (1, 2, 3):
        w.add(("s", "c", seq))
    assert ("s", "c", 1) not in w and ("s", "c", 2) in w and ("s", "c", 3) in w
    assert len(w) == 2


def test_options_are_checked_before_connecting(memory_transport: MemoryTransport) -> None:
    """Bad options fail at once with the option named, before any broker call."""
    t = memory_transport
    with pytest.raises(ValueError, match="batch_size"):
        brama_mq.subscribe(batch_size=0, transport=t)
    with pytest.raises(ValueError, match="quorum"):
        brama_mq.subscribe(quorum=True, transport=t)
    with pytest.raises(ValueError, match="subscription name"):
        brama_mq.subscribe(name="has space", transport=t)
    with pytest.raises(TypeError, match="handler"):
        brama_mq.subscribe(handler=42, transport=t)  # type: ignore[arg-type]

    async def coro(event: Event) -> None: ...

    with pytest.raises(TypeError, match="subscribe_async"):
        brama_mq.subscribe(handler=coro, transport=t)
    with pytest.raises(ValueError, match="memory://"):
        brama_mq.subscribe(broker_url="memory://")


def test_package_import_first_keeps_subscribe_callable() -> None:
    """Importing brama_mq.subscribe.* before brama_mq.subscribe still leaves it callable."""
    code = (
        "from brama_mq.subscribe.hub import Hub\n"
        "import brama_mq\n"
        "from brama_mq.transport import MemoryTransport\n"
        "sub = brama_mq.subscribe(scope='s', transport=MemoryTransport())\n"
        "from brama_mq import subscribe\n"
        "assert subscribe(scope='t', transport=MemoryTransport()).bindings == ['t.*.*']\n"
        "print(sub.bindings)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['s.*.*']"


# -- delivery ------------------------------------------------------------------------------


def test_iteration_yields_typed_events_with_the_section_5_fields(stack: Stack) -> None:
    """Iterating gives Event objects: event, timestamp, connection, scope, id, seq, data."""
    sub = brama_mq.subscribe(events="state_change", transport=stack.transport)
    _open(stack, "payment_api")
    event = next(iter(sub))
    assert isinstance(event, Event)
    assert (event.event, event.connection, event.scope) == ("state_change", "payment_api",
                                                            "payments")
    assert event.data["previous_state"] == "closed" and event.new_state == "open"
    assert event.data["failure_count"] == 2 and event.reason
    assert event.timestamp > 1_600_000_000_000 and event.seq == 6 and event.id
    sub.close()
    assert sub.closed and list(sub) == []


def test_handler_runs_in_the_caller_thread_until_closed(stack: Stack) -> None:
    """run() calls the handler in the calling thread and returns when the subscription closes."""
    threads: list[str] = []
    seen: list[Event] = []

    def handler(event: Event) -> None:
        threads.append(threading.current_thread().name)
        seen.append(event)
        if event.event == "state_change":
            sub.close()

    sub = brama_mq.subscribe(connection="payment_api", handler=handler, transport=stack.transport)
    runner = threading.Thread(target=sub.run, name="the-caller")
    runner.start()
    _open(stack, "payment_api")
    runner.join(10)
    assert not runner.is_alive()
    assert set(threads) == {"the-caller"}
    assert [e.event for e in seen][-1] == "state_change"


def test_handler_object_and_background_start(stack: Stack) -> None:
    """An object with handle_event runs in the background with start(); with closes it."""

    class Monitor:
        def __init__(self) -> None:
            self.opened: list[str] = []

        def handle_event(self, event: Event) -> None:
            if event.new_state == "open":
                self.opened.append(event.connection)

    monitor = Monitor()
    with brama_mq.subscribe(events=["state_change"], handler=monitor,
                            transport=stack.transport).start() as sub:
        _open(stack, "payment_api")
        wait_until(lambda: monitor.opened == ["payment_api"], 5)
    assert sub.closed


def test_same_handler_and_filter_twice_delivers_each_event_once(stack: Stack) -> None:
    """Subscribing the same handler with the same filter twice: one subscription, one call."""
    calls: list[tuple[Any, ...]] = []
    a = brama_mq.subscribe(connection="payment_api", handler=lambda e: calls.append(k(e)),
                           transport=stack.transport)
    handler = a._options.handler
    b = brama_mq.subscribe(connection="payment_api", handler=handler, transport=stack.transport)
    assert a is b
    it1 = brama_mq.subscribe(connection="payment_api", transport=stack.transport)
    it2 = brama_mq.subscribe(connection="payment_api", transport=stack.transport)
    assert it1 is not it2 and it1.queue == it2.queue == a.queue  # one queue per process
    a.start()
    _open(stack, "payment_api")
    wait_until(lambda: len(calls) >= 6, 5)
    time.sleep(0.1)
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 6
    assert [k(e) for e in collect(it1, 6)] == [k(e) for e in collect(it2, 6)]
    a.close()
    assert not a.closed  # subscribed twice: the first close() only releases one
    a.close()
    assert a.closed


def test_unsubscribe_with_a_filter_removes_exactly_the_covered_bindings(stack: Stack) -> None:
    """unsubscribe(connection=a) removes *.a.* and *.a.failure, keeps the others working."""
    t = stack.transport
    only_a = brama_mq.subscribe(connection="a", transport=t)
    a_or_b = brama_mq.subscribe(connection=["a", "b"], events="failure", transport=t)
    scoped = brama_mq.subscribe(scope="payments", transport=t)
    everything = brama_mq.subscribe(transport=t)
    brama_mq.unsubscribe(connection="a")
    assert only_a.closed and only_a.bindings == []
    assert a_or_b.bindings == ["*.b.failure"] and not a_or_b.closed
    assert scoped.bindings == ["payments.*.*"] and everything.bindings == ["#"]
    stack.client.register("a", scope="payments", wait=True)
    stack.client.register("b", scope="payments", wait=True)
    stack.client.failure("a", scope="payments", wait=True)
    stack.client.failure("b", scope="payments", wait=True)
    got = {name: [(e.connection, e.event) for e in drain(sub)]
           for name, sub in (("a_or_b", a_or_b), ("scoped", scoped), ("all", everything))}
    assert got["a_or_b"] == [("b", "failure")]
    assert len(got["scoped"]) == len(got["all"]) == 6
    brama_mq.unsubscribe(scope="payments", events="failure")  # covers nothing: a no-op
    assert scoped.bindings == ["payments.*.*"]
    brama_mq.unsubscribe()
    assert a_or_b.closed and scoped.closed and everything.closed


def test_stalled_transient_consumer_drops_oldest_and_counts(
    stack: Stack, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stalled transient subscriber keeps the newest max_length events, logs exact drops."""
    import logging

    logger = logging.getLogger("brama_mq.subscribe")
    monkeypatch.setattr(logger, "disabled", False)  # a dictConfig elsewhere may disable it
    caplog.set_level(logging.WARNING, logger="brama_mq.subscribe")
    release = threading.Event()
    handled: list[int] = []

    def slow(event: Event) -> None:
        release.wait(10)
        handled.append(event.seq)

    sub = brama_mq.subscribe(connection="c", handler=slow, max_length=10,
                             transport=stack.transport).start()
    fast = brama_mq.subscribe(connection="c", transport=stack.transport)
    stack.client.register("c", max_attempts=10_000, wait=True)
    total = 2 + stack.send([("failure", "c", None, {})] * 200)
    assert [e.seq for e in collect(fast, total)] == list(range(1, total + 1))
    wait_until(lambda: sub.stats()["received"] == total, 10, lambda: str(sub.stats()))
    stats = sub.stats()
    assert stats["buffered"] == 10
    assert stats["dropped"] == stats["dropped_buffer"] == total - 1 - 10  # 1 in the handler
    release.set()
    wait_until(lambda: len(handled) == 11, 5)
    # the one it was stuck on (whichever came first to the thread), then the newest ten
    assert handled[1:] == list(range(total - 9, total + 1)) and handled[0] < total - 9
    assert "dropped" in caplog.text and "max_length=10" in caplog.text
    sub.close()


def test_batches_of_up_to_batch_size_or_fewer_after_the_timeout(stack: Stack) -> None:
    """batch_size=4 yields lists of 4, and the remainder once batch_timeout has passed."""
    sub = brama_mq.subscribe(connection="c", batch_size=4, batch_timeout=0.3,
                             transport=stack.transport)
    stack.client.register("c", max_attempts=100, wait=True)
    stack.send([("failure", "c", None, {})] * 8)
    sizes = []
    t0 = time.monotonic()
    for batch in sub:
        sizes.append(len(batch))
        if sum(sizes) == 10:
            break
    assert sizes == [4, 4, 2]
    assert time.monotonic() - t0 >= 0.25  # the last one waited for the timeout
    sub.close()


def test_batch_handler_gets_lists(stack: Stack) -> None:
    """With batch_size > 1 a handler object's handle_batch gets lists of events."""
    batches: list[list[int]] = []

    class Batcher:
        def handle_batch(self, events: list[Event]) -> None:
            batches.append([e.seq for e in events])

    with brama_mq.subscribe(connection="c", handler=Batcher(), batch_size=3, batch_timeout=0.2,
                            transport=stack.transport).start():
        stack.client.register("c", max_attempts=100, wait=True)
        stack.send([("failure", "c", None, {})] * 4)
        wait_until(lambda: sum(map(len, batches)) == 6, 5)
    assert [len(b) for b in batches] == [3, 3]
    assert [seq for b in batches for seq in b] == list(range(1, 7))


def test_duplicates_are_dropped_by_scope_connection_seq(stack: Stack) -> None:
    """An event that arrives twice (a republish) is delivered once."""
    sub = brama_mq.subscribe(connection="c", transport=stack.transport)
    stack.client.register("c", wait=True)
    first = collect(sub, 2)
    broker = stack.transport.broker  # type: ignore[attr-defined]
    exchange = stack.transport.topology.events_exchange
    for event in first:  # the owner "republishes" both
        key = f"_.c.{event.event}"
        broker.publish(exchange, key, _Message(exchange, key, encode_event(event),
                                               {"content_type": "application/json"}))
    stack.client.failure("c", wait=True)
    assert [e.event for e in drain(sub)] == ["failure"]
    assert sub.stats()["duplicates"] == 2


def test_events_of_a_superseded_owner_are_dropped_as_stale(stack: Stack) -> None:
    """After an event of epoch 5, a late publish of epoch 3 (an owner that lost its lease)
    is dropped and counted as stale_epoch, even with a higher seq; a newer epoch is
    delivered even when it reuses a seq (duplicates are per epoch); seq gaps count as lost
    within an epoch and across epochs, never for a new baseline or a stale event."""
    sub = brama_mq.subscribe(connection="c", transport=stack.transport)
    stack.client.register("c", wait=True)
    registered = drain(sub)[-1]
    broker = stack.transport.broker  # type: ignore[attr-defined]
    exchange = stack.transport.topology.events_exchange
    template, base, s0 = registered.model_dump(), registered.epoch, registered.seq

    def publish(epoch: int, seq: int, eid: str) -> None:
        body = Event.model_validate(template | {"epoch": base + epoch, "seq": s0 + seq, "id": eid,
                                                "event": "failure"})
        key = "_.c.failure"
        broker.publish(exchange, key, _Message(exchange, key, encode_event(body),
                                               {"content_type": "application/json"}))

    publish(5, 1, "new-owner")
    publish(3, 90, "old-owner-late")
    publish(7, 1, "newer-owner-same-seq")
    got = [(e.epoch - base, e.seq - s0, e.id) for e in collect(sub, 2)]
    assert got == [(5, 1, "new-owner"), (7, 1, "newer-owner-same-seq")]
    assert sub.stats()["stale_epoch"] == 1 and sub.stats()["duplicates"] == 0
    assert sub.stats()["dropped_queue"] == 0  # neither a new epoch nor a stale one is a gap

    publish(7, 4, "two-missed")  # 2 and 3 of this epoch were lost
    publish(8, 5, "next-owner-carries-on")
    publish(8, 7, "one-missed")
    assert len(collect(sub, 3)) == 3
    assert sub.stats()["dropped_queue"] == 3


def test_named_handler_error_is_retried_then_dead_lettered(stack: Stack) -> None:
    """A named subscription retries a raising handler max_deliveries times, then dead-letters."""
    attempts: list[int] = []

    def flaky(event: Event) -> None:
        attempts.append(event.seq)
        if event.event == "connection_registered":
            raise RuntimeError("webhook down")

    t = stack.transport
    sub = brama_mq.subscribe(connection="c", name="alerts", handler=flaky, max_deliveries=3,
                             retry_delay=0.01, transport=t).start()
    stack.client.register("c", wait=True)
    stack.client.failure("c", wait=True)
    wait_until(lambda: sub.stats()["handled"] == 2, 5)
    assert attempts == [1, 2, 2, 2, 3]
    dead = t.event_source(queue=t.topology.subscription_dead_queue("alerts"), durable=True)
    [letter] = dead.get(1)
    assert letter.headers["x-brama-error"].startswith("RuntimeError: webhook down")
    assert letter.headers["x-brama-original-routing-key"] == "_.c.connection_registered"
    dead.close()
    sub.delete()
    assert t.topology.subscription_queue("alerts") not in t.broker.queues  # type: ignore


def test_async_iteration_and_async_handler(stack: Stack) -> None:
    """async for over subscribe_async yields events; an async handler is awaited by run()."""
    t = stack.transport

    async def main() -> tuple[list[str], list[str]]:
        handled: list[str] = []

        async def handler(event: Event) -> None:
            await asyncio.sleep(0)
            handled.append(event.event)

        background = brama_mq.subscribe_async(events="state_change", handler=handler,
                                              transport=t)
        await background.open()
        runner = asyncio.create_task(background.run())
        got: list[str] = []
        async with brama_mq.subscribe_async(connection="c", transport=t) as sub:
            await asyncio.to_thread(_open, stack, "c")
            async for event in sub:
                got.append(event.event)
                if event.event == "state_change":
                    break
            assert await sub.receive(0.05) is None
        for _ in range(100):
            if handled:
                break
            await asyncio.sleep(0.02)
        await background.close()
        await asyncio.wait_for(runner, 5)
        return got, handled

    got, handled = asyncio.run(main())
    assert got == ["registration", "connection_registered", "failure", "failure",
                   "circuit_opened", "state_change"]
    assert handled == ["state_change"]


def test_each_filter_shape_on_the_embedded_transport(stack: Stack) -> None:
    """Each filter shape gets exactly the events the core's matcher selects (memory)."""
    shapes = _shapes()
    subs = {label: brama_mq.subscribe(**kw, transport=stack.transport)
            for label, kw in shapes.items()}
    _traffic(stack)
    events = stack.wait_events(len(_traffic_events(stack)))
    for label, sub in subs.items():
        want = [k(e) for e in expected(events, sub.bindings)]
        assert [k(e) for e in drain(sub, quiet=0.1)] == want, label


def _shapes() -> dict[str, dict[str, Any]]:
    return {
        "everything": {},
        "one event": {"events": "state_change"},
        "events": {"events": ["state_change", "failure"]},
        "one connection": {"connection": "payment_api"},
        "connections": {"connection": ["payment_api", "a.b*c"]},
        "one scope": {"scope": "payments"},
        "scopes": {"scope": ["payments", "_"]},
        "connection and events": {"connection": "payment_api", "events": ["failure"]},
        "scope and connection": {"scope": "payments", "connection": "ledger_db"},
        "all three": {"scope": "payments", "connection": ["payment_api", "ledger_db"],
                      "events": ["circuit_opened", "registration"]},
        "raw patterns": {"patterns": ["payments.#", "*.*.circuit_#"]},  # circuit_# is literal
        "raw pattern and scope": {"patterns": ["#.state_change"], "scope": "_"},
    }


def _traffic(stack: Stack) -> None:
    c = stack.client
    for scope, name in (("payments", "payment_api"), ("payments", "ledger_db"),
                        (None, "payment_api"), ("_", "a.b*c")):
        c.register(name, scope=scope, max_attempts=2, expiry_ms=60_000, wait=True)
        c.failure(name, scope=scope, wait=True)
    c.failure("payment_api", scope="payments", wait=True)  # opens
    c.close("payment_api", scope="payments", wait=True)
    c.success("ledger_db", scope="payments", wait=True)
    c.reset("a.b*c", scope="_", wait=True)
    c.unregister("payment_api", wait=True)


def _traffic_events(stack: Stack) -> list[Event]:
    return stack.events


def test_subscription_repr_and_stats_shape(memory_transport: MemoryTransport) -> None:
    """A subscription says what it is bound to; stats() has the documented counters."""
    sub: Subscription = brama_mq.subscribe(scope="s", transport=memory_transport)
    assert "s.*.*" in repr(sub) and sub.name is None and not sub.durable
    assert set(sub.stats()) >= {"received", "handled", "duplicates", "dropped", "errors",
                                "dead_lettered", "buffered", "reconnects"}
    assert sub.queue_depth() == 0
    sub.close()
    assert "closed" in repr(sub)


def test_prefix_must_match_the_transport() -> None:
    """A prefix that contradicts the transport's topology is refused."""
    with pytest.raises(ValueError, match="prefix"):
        brama_mq.subscribe(transport=MemoryTransport(Topology("one")), prefix="two")


def test_readme_binding_table_is_what_subscribe_binds() -> None:
    """Every row of the README's Subscriptions table lists exactly the bindings made."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("\n## Subscriptions\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `subscribe\((.*?)\)` \| (.*?) \|$", section, re.M)
    assert len(rows) >= 6
    for args, keys in rows:
        call = eval(f"dict({args})")  # the README's own keyword arguments
        assert filter_keys(**call) == re.findall(r"`([^`]*)`", keys), args


_EDGE = '{"event":"failure","timestamp":1,"connection":"c","scope":"s","id":"x","seq":1,"data":%s}'


@pytest.mark.parametrize("body", [
    (_EDGE % '{"state": "closed", "failure_count": 1}').encode(),
    (_EDGE % '{"x": NaN}').encode(), (_EDGE % '{"x": -Infinity}').encode(),
    (_EDGE % '{"x": "NaN"}').encode(), (_EDGE % '{"x": "\\ud800"}').encode(),
    (_EDGE % ('{"a":' * 40 + "1" + "}" * 40)).encode(), (_EDGE % '{"x": [[[[1]]]]}').encode(),
    (_EDGE % "[1]").encode(), b"\xef\xbb\xbf" + (_EDGE % "{}").encode(), b"\xff",
    (_EDGE % "{}").replace('"seq":1', '"seq":1.0').encode(),
    (_EDGE % "{}").replace('"failure"', '"failur"').encode(),
])
def test_fast_decode_accepts_exactly_what_decode_event_accepts(body: bytes) -> None:
    """The subscriber's fast decoder gives decode_event's result, or its error."""
    from brama_mq.errors import ProtocolError
    from brama_mq.protocol import decode_event
    from brama_mq.subscribe.decode import fast_decode_event

    def outcome(decode: Any) -> Any:
        try:
            return decode(body, "application/json").model_dump()
        except ProtocolError as exc:
            return str(exc)

    assert outcome(fast_decode_event) == outcome(decode_event)
