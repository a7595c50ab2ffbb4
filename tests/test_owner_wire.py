"""The owner against the real broker: what reaches the wire, in which order, how fast.

Every row of ARCHITECTURE.md section 6 is observed by a plain kombu queue bound to the
events exchange with a wildcard key, not by brama_mq's own subscriber code.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import kombu
import pytest

from brama_mq.client import Brama
from brama_mq.core.events import CRITICAL_EVENTS
from brama_mq.core.routing import encode_name, encode_scope
from brama_mq.owner import Owner, run_owner
from brama_mq.transport import Transport
from tests.wire import KombuTap

pytestmark = pytest.mark.broker


@dataclass
class Stack:
    transport: Transport
    owner: Owner
    client: Brama
    tap: KombuTap


@pytest.fixture
def stack(amqp_transport: Transport, broker_url: str) -> Iterator[Stack]:
    amqp_transport.declare()
    owner = run_owner(amqp_transport)
    client = Brama(transport=amqp_transport)
    tap = KombuTap(broker_url, amqp_transport.topology.events_exchange, ["#"])
    try:
        yield Stack(amqp_transport, owner, client, tap)
    finally:
        owner.stop(wait=10)
        tap.close()
        client.disconnect()


def _name() -> str:
    return f"c{uuid.uuid4().hex[:8]}"


FAST = {"max_attempts": 2, "expiry_ms": 60_000}


def _open(c: Brama, n: str, expiry_ms: int = 300) -> None:
    c.register(n, scope="s", wait=True, max_attempts=2, expiry_ms=expiry_ms)
    c.failure(n, scope="s", wait=True)
    c.failure(n, scope="s", wait=True)


def _half_open(c: Brama, n: str, tap: KombuTap) -> None:
    _open(c, n)
    tap.wait_for(lambda seen: "circuit_half_opened" in tap.events_of(n), timeout=5)
    c.configure(n, scope="s", expiry_ms=60_000, wait=True)  # a reopen now stays open


# Each row: (name, setup, action, events the action adds on the wire).
Step = Callable[[Brama, str, KombuTap], Any]
ROWS: list[tuple[str, Step, Step, list[str]]] = [
    (
        "register",
        lambda c, n, t: None,
        lambda c, n, t: c.register(n, scope="s", wait=True, **FAST),
        ["registration", "connection_registered"],
    ),
    (
        "success below any transition",
        lambda c, n, t: c.register(n, scope="s", wait=True, **FAST),
        lambda c, n, t: c.success(n, scope="s", wait=True),
        ["success"],
    ),
    (
        "failure below the threshold",
        lambda c, n, t: c.register(n, scope="s", wait=True, **FAST),
        lambda c, n, t: c.failure(n, scope="s", reason="timeout", wait=True),
        ["failure"],
    ),
    (
        "failure reaching the threshold",
        lambda c, n, t: (
            c.register(n, scope="s", wait=True, **FAST),
            c.failure(n, scope="s", wait=True),
        ),
        lambda c, n, t: c.failure(n, scope="s", wait=True),
        ["failure", "circuit_opened", "state_change"],
    ),
    (
        "expiry reached (open -> half_open)",
        lambda c, n, t: None,
        lambda c, n, t: (_open(c, n), time.sleep(0.6)),
        # the action's own register/failure events come first; the row is the tail
        ["expiry", "circuit_half_opened", "state_change"],
    ),
    (
        "success in half_open reaching success_threshold",
        _half_open,
        lambda c, n, t: c.success(n, scope="s", wait=True),
        ["success", "circuit_closed", "state_change"],
    ),
    (
        "failure in half_open (reopen)",
        _half_open,
        lambda c, n, t: c.failure(n, scope="s", wait=True),
        ["failure", "circuit_opened", "state_change"],
    ),
    (
        "manual open",
        lambda c, n, t: c.register(n, scope="s", wait=True, **FAST),
        lambda c, n, t: c.open(n, scope="s", expiry_ms=None, wait=True),
        ["circuit_opened", "state_change"],
    ),
    (
        "manual close",
        lambda c, n, t: (
            c.register(n, scope="s", wait=True, **FAST),
            c.open(n, scope="s", expiry_ms=None, wait=True),
        ),
        lambda c, n, t: c.close(n, scope="s", wait=True),
        ["circuit_closed", "state_change"],
    ),
    (
        "manual reset of an open circuit",
        lambda c, n, t: (
            c.register(n, scope="s", wait=True, **FAST),
            c.open(n, scope="s", wait=True),
        ),
        lambda c, n, t: c.reset(n, scope="s", wait=True),
        ["circuit_reset", "state_change"],
    ),
    (
        "manual reset of a closed circuit (no state change)",
        lambda c, n, t: c.register(n, scope="s", wait=True, **FAST),
        lambda c, n, t: c.reset(n, scope="s", wait=True),
        ["circuit_reset"],
    ),
    (
        "unregister",
        lambda c, n, t: c.register(n, scope="s", wait=True, **FAST),
        lambda c, n, t: c.unregister(n, scope="s", wait=True),
        ["connection_unregistered", "connection_removed"],
    ),
    (
        "cleanup of an inactive connection",
        lambda c, n, t: None,
        lambda c, n, t: (c.register(n, scope="s", wait=True, inactive_ms=300), time.sleep(0.6)),
        ["cleanup", "connection_removed"],
    ),
]


@pytest.mark.parametrize(("row", "setup", "action", "expected"), ROWS, ids=[r[0] for r in ROWS])
def test_section6_row_on_the_wire(
    stack: Stack, row: str, setup: Step, action: Step, expected: list[str]
) -> None:
    """Each trigger of section 6 puts exactly its events on the topic exchange, in order."""
    n = _name()
    setup(stack.client, n, stack.tap)
    stack.tap.drain(0.2)
    before = len(stack.tap.events_of(n))
    action(stack.client, n, stack.tap)
    seen = stack.tap.wait_for(
        lambda s: stack.tap.events_of(n)[before:][-len(expected) :] == expected, timeout=5
    )
    ours = [s for s in seen if s.body.get("connection") == n]
    tail = ours[-len(expected) :]
    assert [s.event for s in tail] == expected
    stack.tap.drain(0.3)
    assert stack.tap.events_of(n)[before:][-len(expected) :] == expected, "extra events followed"
    seqs = [s.body["seq"] for s in ours]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "seq must grow by one"
    for s in ours:
        assert s.routing_key == f"s.{encode_name(n)}.{s.event}"
        assert s.content_type == "application/json"
        assert s.delivery_mode == (2 if s.event in CRITICAL_EVENTS else 1)
        assert {"state", "failure_count"} <= set(s.body["data"])
        if s.event == "state_change":
            assert {"previous_state", "new_state", "reason"} <= set(s.body["data"])
        assert abs(s.body["timestamp"] - time.time() * 1000) < 60_000, "wall-clock ms"


NAMES = [
    ("pay.ments", "api.v2"),
    ("*", "#"),
    ("100%", "a%2Eb"),
    (None, "_"),
    ("_", "plain"),
    ("płatności", "支付-api"),
    ("emoji", "🚀.launch"),
]


def test_routing_of_awkward_names(stack: Stack, broker_url: str) -> None:
    """Names with dots, *, #, %, _ and unicode are one word each and reach exact bindings only."""
    taps = []
    try:
        for scope, conn in NAMES:
            key = f"{encode_scope(scope)}.{encode_name(conn)}.*"
            taps.append(KombuTap(broker_url, stack.transport.topology.events_exchange, [key]))
        for scope, conn in NAMES:
            stack.client.register(conn, scope=scope, wait=True)
        for tap, (scope, conn) in zip(taps, NAMES, strict=True):
            tap.wait_for(lambda seen: len(seen) >= 2, timeout=5)
            tap.drain(0.2)
            assert [(s.body["scope"], s.body["connection"]) for s in tap.seen] == [
                (scope, conn)
            ] * 2
    finally:
        for tap in taps:
            tap.close()


def _raw_publish(broker_url: str, exchange: str, body: bytes | str, **props: Any) -> None:
    with kombu.Connection(broker_url) as conn:
        producer = conn.Producer()
        producer.publish(
            body,
            exchange=exchange,
            routing_key="owner",
            serializer=None,
            content_type=props.pop("content_type", "application/json"),
            content_encoding="binary" if isinstance(body, bytes) else "utf-8",
            delivery_mode=2,
            **props,
        )


def _good(op: str, conn: str, **extra: Any) -> str:
    import json

    return json.dumps(
        {
            "v": 1,
            "op": op,
            "connection": conn,
            "scope": "s",
            "id": uuid.uuid4().hex,
            "ts": int(time.time() * 1000),
            **extra,
        }
    )


BAD: list[tuple[str, bytes | str, dict[str, Any], str]] = [
    ("bad json", b"{not json", {}, "JSON"),
    ("not utf-8", b"\xff\xfe\x00", {}, "UTF-8"),
    ("not an object", b"[1,2,3]", {}, "object"),
    ("unknown op", '{"v":1,"op":"explode","connection":"x","id":"1","ts":1}', {}, "op"),
    ("unknown version", '{"v":9,"op":"success","connection":"x","id":"1","ts":1}', {}, "version"),
    ("missing connection", '{"v":1,"op":"success","id":"1","ts":1}', {}, "connection"),
    ("wrong type", '{"v":1,"op":"success","connection":"x","id":"1","ts":"soon"}', {}, "ts"),
    ("oversize name", _good("register", "x" * 300), {}, "connection"),
    ("control char", _good("register", "a\u0007b"), {}, "connection"),
    ("wrong content type", b"<xml/>", {"content_type": "application/xml"}, "content"),
    ("bad policy", _good("register", "badpolicy", options={"max_attempts": 0}), {}, "max_attempts"),
    ("not registered", _good("success", "ghost"), {}, "not registered"),
    ("negative duration", _good("success", "ghost", options={"duration_ms": -1}), {},
     "duration_ms"),
    ("empty reporter", _good("failure", "ghost", options={"reporter": ""}), {}, "reporter"),
    ("unknown mode", _good("register", "badmode", options={"mode": "paused"}), {}, "mode"),
    ("no reporters", _good("register", "badq", options={"min_reporters": 0}), {},
     "min_reporters"),
]


def test_bad_commands_are_dead_lettered_with_reason(stack: Stack, broker_url: str) -> None:
    """Every kind of bad command is dead-lettered with x-brama-error; good ones around apply."""
    topo = stack.transport.topology
    dead = KombuTap(broker_url, topo.dead_exchange, [""], exchange_type="fanout")
    try:
        good = _name()
        _raw_publish(broker_url, topo.commands_exchange, _good("register", good))
        for _, body, props, _ in BAD:
            _raw_publish(broker_url, topo.commands_exchange, body, **dict(props))
            _raw_publish(broker_url, topo.commands_exchange, _good("failure", good))
        dead.wait_for(lambda seen: len(seen) >= len(BAD), timeout=10)
        dead.drain(0.3)
        assert len(dead.seen) == len(BAD)
        for seen, (label, _, _, word) in zip(dead.seen, BAD, strict=True):
            reason = seen.headers.get("x-brama-error")
            assert reason, f"{label}: no x-brama-error header"
            assert word.lower() in str(reason).lower(), f"{label}: {reason!r} should mention {word}"
        stack.tap.wait_for(lambda s: stack.tap.events_of(good).count("failure") >= 2, timeout=10)
        assert stack.owner.stats.dead_lettered == len(BAD)
        assert stack.client.status(good, scope="s")["state"] == "open"  # the good ones applied
        assert not stack.owner.done.is_set(), "the worker keeps going"
    finally:
        dead.close()


def test_expiry_half_opens_on_time(stack: Stack) -> None:
    """An open circuit half-opens within 50 ms of its expiry, with no fixed sweep interval."""
    n = _name()
    stack.client.register(n, scope="s", max_attempts=1, expiry_ms=400, wait=True)
    stack.client.failure(n, scope="s", wait=True)
    seen = stack.tap.wait_for(lambda s: "circuit_half_opened" in stack.tap.events_of(n), timeout=5)
    opened = next(s for s in seen if s.body.get("connection") == n and s.event == "circuit_opened")
    half = next(
        s for s in seen if s.body.get("connection") == n and s.event == "circuit_half_opened"
    )
    assert opened.body["data"]["open_until"] == opened.body["timestamp"] + 400
    late = half.body["timestamp"] - opened.body["data"]["open_until"]
    assert 0 <= late <= 50, f"half-opened {late} ms after the deadline"


def test_rpc_status_snapshot_and_probes(stack: Stack) -> None:
    """status, snapshot and acquire_probe answer over direct reply-to; permits are rationed."""
    n = _name()
    c = stack.client
    c.register(n, scope="s", max_attempts=1, expiry_ms=200, half_open_permits=2, wait=True)
    assert c.status(n, scope="s")["state"] == "closed"
    assert c.acquire_probe(n, scope="s")["granted"] is True
    c.failure(n, scope="s", wait=True)
    probe = c.acquire_probe(n, scope="s")
    assert probe["granted"] is False and 0 < probe["retry_after_ms"] <= 200
    time.sleep(0.35)
    grants = [c.acquire_probe(n, scope="s") for _ in range(3)]
    assert [g["granted"] for g in grants] == [True, True, False]
    assert c.release_probe(n, grants[0]["lease"], scope="s") is True
    assert c.acquire_probe(n, scope="s")["granted"] is True
    names = {s["connection"] for s in c.snapshot(scope="s")}
    assert n in names
    assert c.available(n, scope="s") is True  # half-open counts as available
