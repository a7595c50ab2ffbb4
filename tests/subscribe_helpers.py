"""Helpers for the subscription tests: an owner + client stack, fast command loading,
collecting from subscriptions, and the expected events of a filter (from the core)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from brama_mq.client import Brama
from brama_mq.core.matcher import topic_matches
from brama_mq.core.routing import routing_key
from brama_mq.owner import Owner, run_owner
from brama_mq.protocol import Event, encode_command, make_command
from brama_mq.subscribe import Subscription
from brama_mq.transport import Transport

NOW = 1_700_000_000_000


@dataclass
class Stack:
    """An owner (in a thread) and a client on one transport; ``events`` is everything the
    owner published, in order (its ``on_events`` hook)."""

    transport: Transport
    owner: Owner
    client: Brama
    events: list[Event] = field(default_factory=list)

    def send(self, commands: Iterable[tuple[str, str, str | None, dict[str, Any]]]) -> int:
        """Send ``(op, connection, scope, options)`` commands pipelined; returns how many."""
        bodies = [
            (encode_command(make_command(op, conn, scope, options=opts, now_ms=NOW)), "owner")
            for op, conn, scope, opts in commands
        ]
        link: Any = self.client.link
        for i in range(0, len(bodies), 500):
            link.send_many(bodies[i : i + 500])
        return len(bodies)

    def wait_events(self, n: int, timeout: float = 30.0) -> list[Event]:
        """Wait until the owner has published at least ``n`` events."""
        wait_until(lambda: len(self.events) >= n, timeout, lambda: f"{len(self.events)} events")
        return list(self.events)


@contextmanager
def owner_stack(transport: Transport) -> Iterator[Stack]:
    """An owner and a client; stopped and disconnected afterwards."""
    from brama_mq.protocol import Event as WireEvent

    transport.declare()
    seen: list[Event] = []
    owner = run_owner(
        transport, on_events=lambda evs: seen.extend(WireEvent.from_core(e) for e in evs)
    )
    client = Brama(transport=transport)
    try:
        yield Stack(transport, owner, client, seen)
    finally:
        owner.stop(wait=10)
        client.disconnect()


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: Callable[[], str] | None = None
) -> None:
    """Poll ``predicate`` every 10 ms; AssertionError (saying ``what()``) on timeout."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"not reached within {timeout} s: {what() if what else ''}")
        time.sleep(0.01)


def drain(sub: Subscription, quiet: float = 0.3, limit: float = 20.0) -> list[Event]:
    """Everything ``sub`` yields until nothing came for ``quiet`` s (flattening batches)."""
    out: list[Event] = []
    end = time.monotonic() + limit
    while time.monotonic() < end:
        got = sub.receive(quiet)
        if got is None:
            break
        out.extend(got if isinstance(got, list) else [got])
    return out


def collect(sub: Subscription, n: int, timeout: float = 20.0) -> list[Event]:
    """Exactly the first ``n`` events (AssertionError if fewer come in time)."""
    out: list[Event] = []
    end = time.monotonic() + timeout
    while len(out) < n:
        remaining = end - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"got {len(out)} of {n} events: {[k(e) for e in out][-5:]}")
        got = sub.receive(remaining)
        if got is not None:
            out.extend(got if isinstance(got, list) else [got])
    return out


def k(event: Event) -> tuple[str | None, str, int]:
    """The identity of an event."""
    return (event.scope, event.connection, event.seq)


def expected(events: Iterable[Event], keys: Iterable[str]) -> list[Event]:
    """The events a subscription bound with ``keys`` must get: the core's matcher decides."""
    keys = list(keys)
    return [
        e for e in events
        if any(topic_matches(b, routing_key(e.scope, e.connection, e.event)) for b in keys)
    ]
