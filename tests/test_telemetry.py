"""Telemetry hooks: attach/detach, and what the owner emits for every batch and event."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from brama_mq import telemetry
from brama_mq.client import Brama
from brama_mq.owner import run_owner
from brama_mq.transport import MemoryTransport

Seen = list[tuple[tuple[str, ...], dict[str, Any], dict[str, Any]]]


@pytest.fixture
def seen() -> Iterator[Seen]:
    """Everything the owner emits, recorded by one handler attached to every event."""
    out: Seen = []

    def record(name: tuple[str, ...], m: Mapping[str, Any], md: Mapping[str, Any]) -> None:
        out.append((name, dict(m), dict(md)))

    telemetry.attach("test-recorder", telemetry.EVENTS, record)
    yield out
    telemetry.detach("test-recorder")
    assert not telemetry.enabled


def test_attach_detach_and_validation() -> None:
    """A handler is called only while attached; ids are unique; bad names are refused."""
    calls: list[Any] = []
    assert not telemetry.enabled
    telemetry.attach("h1", ("app", "x"), lambda n, m, md: calls.append((n, m, md)))
    assert telemetry.enabled and telemetry.list_handlers(("app",)) == [("h1", ("app", "x"))]
    telemetry.execute(("app", "x"), {"count": 1}, {"k": "v"})
    telemetry.execute(("app", "y"), {"count": 1}, {})
    assert calls == [(("app", "x"), {"count": 1}, {"k": "v"})]
    with pytest.raises(ValueError, match="attached already"):
        telemetry.attach("h1", [("app", "y")], print)
    with pytest.raises(TypeError, match="tuple of strings"):
        telemetry.attach("h2", "app.x", print)  # type: ignore[arg-type]
    assert telemetry.detach("h1") is True
    assert telemetry.detach("h1") is False
    telemetry.execute(("app", "x"), {"count": 1}, {})
    assert len(calls) == 1 and not telemetry.enabled


def test_a_failing_handler_is_detached_and_others_still_run() -> None:
    """A handler that raises is detached (like :telemetry), the next handler still runs."""
    calls: list[str] = []

    def broken(*_: Any) -> None:
        raise RuntimeError("boom")

    telemetry.attach("broken", [("app", "x")], broken)
    telemetry.attach("fine", [("app", "x")], lambda *_: calls.append("fine"))
    try:
        telemetry.execute(("app", "x"), {}, {})
        telemetry.execute(("app", "x"), {}, {})
        assert calls == ["fine", "fine"]
        assert [h for h, _ in telemetry.list_handlers()] == ["fine"]
    finally:
        telemetry.detach("fine")


def test_owner_emits_start_batch_event_confirm_dead_letter_stop(
    memory_transport: MemoryTransport, seen: Seen
) -> None:
    """The owner emits start, a batch per batch (with op/result counts and duration), one
    event per published event (the Event as metadata), confirms, dead letters and stop."""
    owner = run_owner(memory_transport)
    client = Brama(transport=memory_transport)
    try:
        client.register("api", scope="pay", max_attempts=2, wait=True)
        client.failure("api", scope="pay", reason="t1", wait=True)
        client.failure("api", scope="pay", reason="t2", wait=True)
        with pytest.raises(Exception, match="not registered"):
            client.success("nope", wait=True)  # answered: not a dead letter
        client.success("nope")  # posted, nobody told: dead-lettered
        client.status("api", scope="pay")
        memory_transport.client_link().send(b"{not json", "owner")
        client.status("api", scope="pay")  # after the bad one: its batch was handled
    finally:
        client.disconnect()
        owner.stop(wait=5)
    names = [n[-1] for n, _, _ in seen]
    assert names[0] == "start" and names[-1] == "stop"
    start = seen[0][2]
    assert start["owner"] is owner and start["queue"].endswith(".owner")

    ops: dict[tuple[str, str], int] = {}
    for name, m, md in seen:
        if name[-1] == "batch":
            assert m["duration"] >= 0 and m["commands"] >= 1
            for key, n in md["ops"].items():
                ops[key] = ops.get(key, 0) + n
    assert ops[("register", "applied")] == 1
    assert ops[("failure", "applied")] == 2
    assert ops[("success", "not_registered")] == 2
    assert ops[("status", "query")] == 2

    events = [md["event"].event for n, _, md in seen if n[-1] == "event"]
    assert events == ["registration", "connection_registered", "failure", "failure",
                      "circuit_opened", "state_change"]
    opened = next(md["event"] for n, _, md in seen
                  if n[-1] == "event" and md["event"].event == "state_change")
    assert opened.data["new_state"] == "open" and opened.data["failure_count"] == 2

    dead = [md for n, _, md in seen if n[-1] == "dead_letter"]
    assert [d["reason"] for d in dead] == ["not_registered", "decode"]
    confirms = [m for n, m, _ in seen if n[-1] == "confirm"]
    assert confirms and all(m["duration"] >= 0 for m in confirms)
    batch_events = sum(m["events"] for n, m, _ in seen if n[-1] == "batch")
    assert batch_events == len(events)
