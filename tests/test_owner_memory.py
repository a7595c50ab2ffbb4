"""The owner on the embedded MemoryTransport: the same section-6 table and dead letters as
on RabbitMQ (tests/test_owner_wire.py), and the ``brama-mq demo`` command end to end.

The table is imported from the wire tests, so the two transports are held to one spec.
"""

from __future__ import annotations

import itertools
import json
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from brama_mq.client import Brama
from brama_mq.core.events import CRITICAL_EVENTS
from brama_mq.core.routing import encode_name
from brama_mq.owner import Owner, run_owner
from brama_mq.transport.memory import MemoryTransport, _Message
from tests.test_owner_wire import BAD, ROWS, Step, _good
from tests.wire import Seen
from tests.worker_proc import run_cli


class MemoryTap:
    """The memory transport's own event source, bound with ``keys``, with KombuTap's API."""

    def __init__(self, transport: MemoryTransport, keys: Iterable[str] = ("#",)) -> None:
        self.source = transport.event_source()
        self.source.bind(list(keys))
        self.seen: list[Seen] = []

    def _poll(self, timeout: float) -> None:
        deliveries = self.source.get(timeout)
        for d in deliveries:
            self.seen.append(
                Seen(d.routing_key, json.loads(d.body), dict(d.headers),
                     d.properties.get("delivery_mode"), d.content_type)
            )
        if deliveries:
            self.source.ack(deliveries[-1].delivery_tag, multiple=True)

    def drain(self, seconds: float = 0.2) -> list[Seen]:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self._poll(min(left, 0.05))
        return self.seen

    def wait_for(self, predicate: Callable[[list[Seen]], bool], timeout: float = 10.0
                 ) -> list[Seen]:
        end = time.monotonic() + timeout
        while not predicate(self.seen):
            if time.monotonic() > end:
                names = [(s.routing_key, s.event) for s in self.seen]
                raise AssertionError(f"condition not met within {timeout}s; seen {names}")
            self._poll(0.05)
        return self.seen

    def events_of(self, connection: str) -> list[str]:
        return [s.event for s in self.seen if s.body.get("connection") == connection]

    def close(self) -> None:
        self.source.close()


@dataclass
class Stack:
    transport: MemoryTransport
    owner: Owner
    client: Brama
    tap: MemoryTap


@pytest.fixture
def stack(memory_transport: MemoryTransport) -> Iterator[Stack]:
    owner = run_owner(memory_transport)
    client = Brama(transport=memory_transport)
    tap = MemoryTap(memory_transport)
    try:
        yield Stack(memory_transport, owner, client, tap)
    finally:
        owner.stop(wait=10)
        tap.close()
        client.disconnect()
    assert owner.done.is_set(), "the owner did not stop"


@pytest.mark.parametrize(("row", "setup", "action", "expected"), ROWS, ids=[r[0] for r in ROWS])
def test_section6_row_in_memory(
    stack: Stack, row: str, setup: Step, action: Step, expected: list[str]
) -> None:
    """Each trigger of section 6 emits exactly its events, in order, on the memory transport."""
    n = f"c{uuid.uuid4().hex[:8]}"
    setup(stack.client, n, stack.tap)  # type: ignore[arg-type]  # MemoryTap is a KombuTap
    stack.tap.drain(0.1)
    before = len(stack.tap.events_of(n))
    action(stack.client, n, stack.tap)  # type: ignore[arg-type]
    stack.tap.wait_for(
        lambda s: stack.tap.events_of(n)[before:][-len(expected):] == expected, timeout=5
    )
    stack.tap.drain(0.3)
    assert stack.tap.events_of(n)[before:][-len(expected):] == expected, "extra events followed"
    ours = [s for s in stack.tap.seen if s.body.get("connection") == n]
    seqs = [s.body["seq"] for s in ours]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "seq must grow by one"
    for s in ours:
        assert s.routing_key == f"s.{encode_name(n)}.{s.event}"
        assert s.content_type == "application/json"
        assert s.delivery_mode == (2 if s.event in CRITICAL_EVENTS else 1)
        assert {"state", "failure_count"} <= set(s.body["data"])
        if s.event == "state_change":
            assert {"previous_state", "new_state", "reason"} <= set(s.body["data"])
    assert stack.owner.stats.dead_lettered == 0


def _publish(transport: MemoryTransport, body: bytes | str, content_type: str) -> None:
    raw = body.encode("utf-8") if isinstance(body, str) else body
    exchange = transport.topology.commands_exchange
    props = {"content_type": content_type, "delivery_mode": 2, "message_id": uuid.uuid4().hex}
    assert transport.broker.publish(exchange, "owner", _Message(exchange, "owner", raw, props))


def test_bad_commands_are_dead_lettered_in_memory(stack: Stack) -> None:
    """Every kind of bad command lands in the memory dead queue with its reason and its
    original body; the good commands around them apply and the owner keeps going."""
    topo = stack.transport.topology
    good = f"g{uuid.uuid4().hex[:8]}"
    _publish(stack.transport, _good("register", good), "application/json")
    originals: list[bytes] = []
    for _, body, props, _ in BAD:
        _publish(stack.transport, body, dict(props).get("content_type", "application/json"))
        originals.append(body.encode() if isinstance(body, str) else body)
        _publish(stack.transport, _good("failure", good), "application/json")
    broker = stack.transport.broker
    deadline = time.monotonic() + 10
    while len(broker.messages(topo.dead_queue)) < len(BAD):
        assert time.monotonic() < deadline, broker.messages(topo.dead_queue)
        time.sleep(0.02)
    stack.tap.wait_for(lambda s: stack.tap.events_of(good).count("failure") >= len(BAD))
    dead = broker.messages(topo.dead_queue)
    assert len(dead) == len(BAD)
    for (key, body, props), (label, _, _, word), original in zip(
        dead, BAD, originals, strict=True
    ):
        headers: dict[str, Any] = props.get("headers") or {}
        reason = str(headers.get("x-brama-error", ""))
        assert word.lower() in reason.lower(), f"{label}: {reason!r} should mention {word}"
        assert headers.get("x-brama-original-routing-key") == "owner" and key == "owner"
        assert body == original, label
        assert props.get("delivery_mode") == 2
    assert stack.owner.stats.dead_lettered == len(BAD)
    assert stack.client.status(good, scope="s")["state"] == "open"  # the good ones applied
    assert not stack.owner.done.is_set(), "the owner keeps going"


_CHANGE = re.compile(r"^state_change\s+payments/payment_api #\d+ (\w+) -> (\w+) \(.+\)$")


def test_demo_tells_the_whole_story() -> None:
    """``brama-mq demo --seconds 4 --plain`` exits 0 and prints payment_api going
    closed -> open -> half_open -> closed, one line per event."""
    done = run_cli(["demo", "--seconds", "4", "--plain"], {}, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    changes = [m.groups() for line in lines if (m := _CHANGE.match(line))]
    assert changes, done.stdout
    assert changes[0] == ("closed", "open"), changes
    assert changes[-1] == ("half_open", "closed"), changes
    assert ("open", "half_open") in changes, changes
    for (_, new), (previous, _) in itertools.pairwise(changes):
        assert previous == new, f"transitions do not chain: {changes}"
    # every state_change line is whole (nothing wrapped onto the next line)
    ours = [line for line in lines if line.startswith("state_change") and "payment_api" in line]
    assert len(ours) == len(changes), done.stdout
    assert re.search(r"final states: .*'payment_api': 'closed'", done.stdout), done.stdout
    assert "Traceback" not in done.stderr, done.stderr
