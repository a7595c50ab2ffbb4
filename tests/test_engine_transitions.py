"""Which events each trigger emits, in order: one table row per row of ARCHITECTURE.md section 6.

Every row names a setup (commands and ``advance`` calls at made-up times), the step under
test, the exact list of event names it must return, and the state it must leave. Each row
is checked for the data fields, the seq numbering, the timestamps and the event ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from brama_mq.core import APPLIED, CLOSED, HALF_OPEN, OPEN, Command, Engine, Event

SCOPE = "payments"
CONN = "payment_api"
KEY = (SCOPE, CONN)

#: Small numbers so every row reads at a glance.
OPTIONS: dict[str, Any] = {
    "max_attempts": 3,
    "expiry_ms": 1_000,
    "backoff": "exponential",
    "backoff_factor": 2.0,
    "max_expiry_ms": 8_000,
    "success_threshold": 1,
    "inactive_ms": 50_000,
}

TRANSITION_EVENTS = frozenset(
    {"circuit_opened", "circuit_closed", "circuit_reset", "circuit_half_opened", "expiry"}
)


@dataclass(frozen=True)
class Advance:
    """A setup or test step that moves the engine's time forward."""

    now: int


@dataclass(frozen=True)
class At:
    """A command applied at a given time."""

    now: int
    op: str
    options: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None


Step = At | Advance


def reg(now: int = 0) -> At:
    return At(now, "register", dict(OPTIONS))


def fail(now: int) -> At:
    return At(now, "failure", reason="timeout")


def tripped(now: int = 10) -> list[Step]:
    """Register at 0, then enough failures at ``now`` to open the circuit."""
    return [reg(), fail(now), fail(now), fail(now)]


def half_opened(now: int = 10) -> list[Step]:
    return [*tripped(now), Advance(now + OPTIONS["expiry_ms"])]


#: A failure-rate policy whose second slow call in a row opens the circuit.
SLOW_OPTIONS: dict[str, Any] = {
    **OPTIONS,
    "strategy": "failure_rate",
    "window_size": 2,
    "slow_call_ms": 100,
}


def slow(now: int) -> At:
    return At(now, "success", {"duration_ms": 250})


@dataclass(frozen=True)
class Row:
    """One row of section 6: setup, step under test, expected events and final state."""

    trigger: str
    setup: Sequence[Step]
    step: Step
    events: Sequence[str]
    state: str
    failure_count: int
    transition: tuple[str, str] | None = None  # (previous_state, new_state)
    reason: str | None = None
    removed: bool = False


ROWS = [
    Row("register", [], reg(5), ["registration", "connection_registered"], CLOSED, 0),
    Row("success below any transition", [reg(), fail(1)], At(2, "success"), ["success"], CLOSED, 0),
    Row("failure below the threshold", [reg(), fail(1)], fail(2), ["failure"], CLOSED, 2),
    Row(
        "failure reaching the threshold",
        [reg(), fail(1), fail(2)],
        fail(3),
        ["failure", "circuit_opened", "state_change"],
        OPEN,
        3,
        (CLOSED, OPEN),
        "Threshold exceeded",
    ),
    Row(
        "expiry reached (open -> half_open)",
        tripped(10),
        Advance(1_010),
        ["expiry", "circuit_half_opened", "state_change"],
        HALF_OPEN,
        3,
        (OPEN, HALF_OPEN),
        "Expiry reached",
    ),
    Row(
        "half-open success reaching success_threshold",
        half_opened(10),
        At(1_020, "success"),
        ["success", "circuit_closed", "state_change"],
        CLOSED,
        0,
        (HALF_OPEN, CLOSED),
        "Success threshold reached",
    ),
    Row(
        "half-open failure reopening with backoff",
        half_opened(10),
        fail(1_020),
        ["failure", "circuit_opened", "state_change"],
        OPEN,
        4,
        (HALF_OPEN, OPEN),
        "Failure in half-open",
    ),
    Row(
        "manual open",
        [reg(), fail(1)],
        At(2, "open", reason="maintenance"),
        ["circuit_opened", "state_change"],
        OPEN,
        1,
        (CLOSED, OPEN),
        "maintenance",
    ),
    Row(
        "manual close",
        tripped(10),
        At(20, "close", reason="fixed"),
        ["circuit_closed", "state_change"],
        CLOSED,
        0,
        (OPEN, CLOSED),
        "fixed",
    ),
    Row(
        "manual reset with a state change",
        tripped(10),
        At(20, "reset"),
        ["circuit_reset", "state_change"],
        CLOSED,
        0,
        (OPEN, CLOSED),
        "Reset by hand",
    ),
    Row(
        "manual reset without a state change",
        [reg(), fail(1), fail(2)],
        At(3, "reset"),
        ["circuit_reset"],
        CLOSED,
        0,
        (CLOSED, CLOSED),
        "Reset by hand",
    ),
    Row(
        "unregister",
        [reg(), fail(1)],
        At(2, "unregister"),
        ["connection_unregistered", "connection_removed"],
        CLOSED,
        1,
        removed=True,
    ),
    Row(
        "cleanup of an inactive connection",
        [reg(), At(7, "success")],
        Advance(7 + OPTIONS["inactive_ms"]),
        ["cleanup", "connection_removed"],
        CLOSED,
        0,
        removed=True,
    ),
    # Issue 15: slow calls and modes.
    Row(
        "slow success reaching the slow-call rate",
        [At(0, "register", SLOW_OPTIONS), slow(1)],
        slow(2),
        ["success", "circuit_opened", "state_change"],
        OPEN,
        0,
        (CLOSED, OPEN),
        "slow_call_rate",
    ),
    Row(
        "slow success in half-open",
        [At(0, "register", SLOW_OPTIONS), slow(1), slow(2), Advance(1_002)],
        slow(1_010),
        ["success", "circuit_opened", "state_change"],
        OPEN,
        0,
        (HALF_OPEN, OPEN),
        "slow_call_rate",
    ),
    Row(
        "mode forced_open",
        [reg(), fail(1)],
        At(2, "configure", {"mode": "forced_open"}),
        ["circuit_opened", "state_change"],
        OPEN,
        1,
        (CLOSED, OPEN),
        "mode",
    ),
    Row(
        "mode change in the same state",
        [reg(), fail(1)],
        At(2, "configure", {"mode": "disabled"}),
        ["state_change"],
        CLOSED,
        1,
        (CLOSED, CLOSED),
        "mode",
    ),
]


def run(engine: Engine, step: Step) -> list[Event]:
    """Apply one step and return its events (a command must be applied)."""
    if isinstance(step, Advance):
        return engine.advance(step.now).events
    result = engine.apply(
        Command(step.op, CONN, SCOPE, reason=step.reason, options=step.options), step.now
    )
    assert result.status == APPLIED, result.error
    return result.events


def play(row: Row, lineage: str = "test") -> tuple[Engine, list[Event], list[Event]]:
    """Run a row; return the engine, the setup's events and the step's events."""
    engine = Engine(lineage=lineage)
    history: list[Event] = []
    for step in row.setup:
        history.extend(run(engine, step))
    return engine, history, run(engine, row.step)


@pytest.mark.parametrize("row", ROWS, ids=[r.trigger for r in ROWS])
def test_event_names_in_order(row: Row) -> None:
    """Each trigger of section 6 emits exactly its listed events, in order."""
    _, _, events = play(row)
    assert [e.event for e in events] == list(row.events)


@pytest.mark.parametrize("row", ROWS, ids=[r.trigger for r in ROWS])
def test_final_state(row: Row) -> None:
    """After the trigger the connection is in the row's state (or gone, for removals)."""
    engine, _, _ = play(row)
    if row.removed:
        assert KEY not in engine
    else:
        status = engine.status(SCOPE, CONN)
        assert (status["state"], status["failure_count"]) == (row.state, row.failure_count)


@pytest.mark.parametrize("row", ROWS, ids=[r.trigger for r in ROWS])
def test_data_always_has_state_and_failure_count(row: Row) -> None:
    """Every event's data carries state and failure_count; the last one shows the outcome."""
    _, _, events = play(row)
    for e in events:
        assert e.data["state"] in (CLOSED, OPEN, HALF_OPEN)
        assert isinstance(e.data["failure_count"], int)
        assert e.data["failure_count"] >= 0
    assert events[-1].data["state"] == row.state
    assert events[-1].data["failure_count"] == row.failure_count


@pytest.mark.parametrize("row", [r for r in ROWS if r.transition], ids=lambda r: r.trigger)
def test_transition_fields(row: Row) -> None:
    """Transition events carry previous_state, new_state and reason (state_change included)."""
    _, _, events = play(row)
    assert row.transition is not None
    previous, new = row.transition
    carrying = [e for e in events if e.event in TRANSITION_EVENTS or e.event == "state_change"]
    assert carrying, "a transition row must emit transition events"
    for e in carrying:
        assert e.data["previous_state"] == previous, e
        assert e.data["new_state"] == new, e
        assert e.data["reason"] == row.reason, e
        assert e.data["state"] == new, e
    changes = [e for e in events if e.event == "state_change"]
    # a change of mode is one state_change even when the state stays the same
    assert len(changes) == (1 if previous != new or row.reason == "mode" else 0)


@pytest.mark.parametrize("row", ROWS, ids=[r.trigger for r in ROWS])
def test_seq_continues_by_one(row: Row) -> None:
    """seq of the step's events continues the connection's numbering, one by one."""
    _, history, events = play(row)
    seqs = [e.seq for e in history + events]
    assert seqs == list(range(1, len(seqs) + 1))


@pytest.mark.parametrize("row", ROWS, ids=[r.trigger for r in ROWS])
def test_timestamp_is_now(row: Row) -> None:
    """Every event's timestamp is the ``now`` the step was given (the engine has no clock)."""
    _, _, events = play(row)
    assert {e.timestamp for e in events} == {row.step.now}
    assert all((e.scope, e.connection) == KEY for e in events)


@pytest.mark.parametrize("row", ROWS, ids=[r.trigger for r in ROWS])
def test_ids_unique_and_deterministic(row: Row) -> None:
    """Ids are unique; the same lineage and history give the same ids, another lineage not."""
    _, history, events = play(row, lineage="owner-a")
    ids = [e.id for e in history + events]
    assert len(set(ids)) == len(ids)
    _, history2, events2 = play(row, lineage="owner-a")
    assert [e.to_dict() for e in history2 + events2] == [e.to_dict() for e in history + events]
    _, history3, events3 = play(row, lineage="owner-b")
    assert not set(ids) & {e.id for e in history3 + events3}


def test_reopen_with_backoff_doubles_open_time() -> None:
    """The half-open failure row reopens for expiry_ms * backoff_factor (exponential policy)."""
    row = next(r for r in ROWS if r.trigger == "half-open failure reopening with backoff")
    engine, _, events = play(row)
    opened = next(e for e in events if e.event == "circuit_opened")
    assert opened.data["expiry_ms"] == 2 * OPTIONS["expiry_ms"]
    assert opened.data["open_until"] == row.step.now + 2 * OPTIONS["expiry_ms"]
    assert engine.status(SCOPE, CONN)["open_until"] == row.step.now + 2 * OPTIONS["expiry_ms"]


def test_table_covers_every_row_of_section_6() -> None:
    """The table has one row per trigger of section 6 (reset split by state change),
    and the four of issue 15 (slow calls, modes)."""
    assert len(ROWS) == 13 + 4
    assert len({r.trigger for r in ROWS}) == len(ROWS)
