"""A quorum of reporters (issue 15, part 3): ``reporter`` on outcomes, ``min_reporters``
in the policy, ``data.reporters``/``reporter_count`` of openings, and the bound on the
reporters a connection keeps. One table row per rule."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from brama_mq.core import APPLIED, CLOSED, HALF_OPEN, INVALID, OPEN, Command, Engine, Result
from brama_mq.core.policy import MAX_REPORTERS
from brama_mq.core.window import MAX_LISTED

S = "svc"
C = "api"
T0 = 1_700_000_000_000

CONSECUTIVE: dict[str, Any] = {"max_attempts": 3, "min_reporters": 2, "expiry_ms": 1_000}
RATE: dict[str, Any] = {"strategy": "failure_rate", "window_size": 4, "minimum_calls": 4,
                        "failure_rate_threshold": 50.0, "min_reporters": 3, "expiry_ms": 1_000}


def make(options: dict[str, Any]) -> Engine:
    e = Engine(lineage="rep")
    assert e.register(S, C, T0, options).status == APPLIED
    return e


def call(e: Engine, token: str, now: int) -> Result:
    """``S`` a success, ``F:a`` a failure reported by a, ``F`` one by nobody in
    particular, ``s:a`` a slow success (duration 500), ``f:a`` a slow failure."""
    kind, _, reporter = token.partition(":")
    options: dict[str, Any] = {"reporter": reporter} if reporter else {}
    if kind in ("s", "f"):
        options["duration_ms"] = 500
    op = "success" if kind in ("S", "s") else "failure"
    result = e.apply(Command(op, C, S, options=options), now)
    assert result.status == APPLIED, result.error
    return result


def play(e: Engine, script: str, start: int = T0, step: int = 1) -> list[Result]:
    return [call(e, token, start + i * step) for i, token in enumerate(script.split())]


@dataclass(frozen=True)
class Row:
    rule: str
    options: dict[str, Any]
    script: str
    opened_at: int | None  # index of the call that opened the circuit, None: stays closed
    reporters: list[str] = field(default_factory=list)
    reporter_count: int | None = None
    reason: str | None = None
    step: int = 1  # ms between calls


ROWS = [
    Row("consecutive: one reporter's failures do not open", CONSECUTIVE, "F:a F:a F:a F:a",
        None),
    Row("consecutive: a second reporter completes the quorum", CONSECUTIVE, "F:a F:a F:a F:b",
        3, ["a", "b"], 2, "Threshold exceeded"),
    Row("consecutive: a success ends the run, and its reporters", CONSECUTIVE,
        "F:a F:a S F:b F:b F:a", 5, ["b", "a"], 2, "Threshold exceeded"),
    Row("consecutive: a success right before leaves one reporter", CONSECUTIVE,
        "F:a F:b S F:b F:b F:b", None),
    Row("reports without a reporter count as one reporter", CONSECUTIVE, "F F F F:a", 3,
        ["a"], 2, "Threshold exceeded"),
    Row("rate: two reporters are not three", RATE, "F:a F:b F:a F:b", None),
    Row("rate: the third reporter opens it", RATE, "F:a F:b F:a F:b F:c", 4, ["a", "b", "c"],
        3, "failure_rate"),
    Row("rate: a reporter whose failures left the window does not count", RATE,
        "F:c S S S F:a F:b F:a F:b", None),
    Row("rate: reporters are listed newest last", RATE, "F:c F:a F:b F:c", 3, ["a", "b", "c"],
        3, "failure_rate"),
    Row("rate: successes name no reporter that counts", RATE, "S:x S:y F:a F:b F:a", None),
    Row("slow: slow calls need their own quorum", {**RATE, "failure_rate_threshold": 100.0,
                                                   "slow_call_ms": 100,
                                                   "slow_call_rate_threshold": 50.0},
        "F:a F:b F:c s:a s:a", None),
    Row("slow: three slow reporters open it", {**RATE, "failure_rate_threshold": 100.0,
                                               "slow_call_ms": 100,
                                               "slow_call_rate_threshold": 50.0},
        "s:a s:b S s:c", 3, ["a", "b", "c"], 3, "slow_call_rate"),
    Row("time window: reporters of older seconds do not count",
        {**RATE, "window_type": "time", "window_seconds": 2, "minimum_calls": 2},
        "F:a F:b F:c F:a F:b", None, step=1_000),
    Row("time window: three reporters inside the window open it",
        {**RATE, "window_type": "time", "window_seconds": 3, "minimum_calls": 2},
        "F:a F:b F:c", 2, ["a", "b", "c"], 3, "failure_rate", step=1_000),
    Row("min_reporters 1: openings name the reporters, nothing waits",
        {**CONSECUTIVE, "min_reporters": 1}, "F:a F:a F:b", 2, ["a", "b"], 2,
        "Threshold exceeded"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.rule for r in ROWS])
def test_quorum_rules(row: Row) -> None:
    e = make(row.options)
    results = play(e, row.script, step=row.step)
    for i, result in enumerate(results):
        names = [ev.event for ev in result.events]
        if i == row.opened_at:
            assert names[1:] == ["circuit_opened", "state_change"], (i, names)
            for opened in result.events[1:]:
                assert opened.data["reason"] == row.reason
                assert opened.data["reporters"] == row.reporters
                assert opened.data["reporter_count"] == row.reporter_count
        else:
            assert len(names) == 1, (i, names)
    assert e.status(S, C)["state"] == (CLOSED if row.opened_at is None else OPEN)


def test_no_reporter_no_quorum_no_new_data() -> None:
    """Without reporters and with min_reporters 1 nothing is kept and events are as
    before: no reporters in the opening."""
    e = make({"max_attempts": 2})
    results = play(e, "F F")
    assert "reporters" not in results[-1].events[1].data
    assert e._conns[(S, C)].reporters is None


def test_open_by_hand_is_not_affected() -> None:
    e = make({**CONSECUTIVE, "min_reporters": 5})
    result = e.apply(Command("open", C, S), T0)
    assert [ev.event for ev in result.events] == ["circuit_opened", "state_change"]


def test_a_half_open_failure_reopens_without_a_quorum() -> None:
    """The quorum guards the way in; a failed probe reopens as always."""
    e = make(CONSECUTIVE)
    play(e, "F:a F:a F:b")
    until = int(e.status(S, C)["open_until"])
    e.advance(until)
    assert e.status(S, C)["state"] == HALF_OPEN
    result = call(e, "F:a", until + 1)
    assert [ev.event for ev in result.events] == ["failure", "circuit_opened", "state_change"]
    assert result.events[1].data["reason"] == "Failure in half-open"


def test_reporters_are_forgotten_when_the_circuit_opens_or_closes() -> None:
    """After open -> close the next run needs its own quorum."""
    e = make(CONSECUTIVE)
    play(e, "F:a F:a F:b")
    assert e._conns[(S, C)].reporters is None
    e.apply(Command("close", C, S), T0 + 10)
    results = play(e, "F:a F:a F:a", T0 + 20)
    assert [ev.event for ev in results[-1].events] == ["failure"]


def test_listed_reporters_are_bounded_and_counted() -> None:
    """An opening lists at most MAX_LISTED names (the newest) and counts them all."""
    e = make({"max_attempts": 15, "min_reporters": 15})
    script = " ".join(f"F:r{i:02}" for i in range(15))
    opened = play(e, script)[-1].events[1].data
    assert opened["reporter_count"] == 15
    assert opened["reporters"] == [f"r{i:02}" for i in range(15 - MAX_LISTED, 15)]


def test_a_connection_keeps_at_most_max_reporters_and_stays_exact() -> None:
    """Past MAX_REPORTERS distinct reporters the oldest names go; the newest are kept, so
    a quorum of up to MAX_REPORTERS is still decided exactly."""
    e = make({"strategy": "failure_rate", "window_size": 1_000, "minimum_calls": 1,
              "failure_rate_threshold": 100.0, "min_reporters": MAX_REPORTERS})
    for i in range(MAX_REPORTERS):
        assert e.status(S, C)["state"] == CLOSED
        call(e, f"F:w{i}", T0 + i)
    assert e.status(S, C)["state"] == OPEN  # at the 64th distinct reporter exactly
    e = make({"strategy": "failure_rate", "window_size": 10_000, "minimum_calls": 10_000,
              "min_reporters": 2})
    for i in range(500):
        call(e, f"F:w{i}", T0 + i)
    reps = e._conns[(S, C)].reporters
    assert reps is not None and len(reps.failed) == MAX_REPORTERS
    assert list(reps.failed) == [f"w{i}" for i in range(500 - MAX_REPORTERS, 500)]
    e = make({"strategy": "failure_rate", "window_size": 1_000, "minimum_calls": 1,
              "failure_rate_threshold": 1.0, "min_reporters": 2})
    for i in range(200):
        call(e, "F:same", T0 + i)
    assert e.status(S, C)["state"] == CLOSED  # 200 failures, one reporter: no quorum
    reps = e._conns[(S, C)].reporters
    assert reps is not None and list(reps.failed) == ["same"]


def test_reporters_survive_a_snapshot() -> None:
    e = make(RATE)
    play(e, "F:a F:b F:a")
    restored = Engine.restore(json.loads(json.dumps(e.snapshot())))
    (conn,) = restored.snapshot()["connections"]
    assert conn["reporters"] == {"failed": [["b", 2], ["a", 3]], "slow": []}
    for engine in (e, restored):
        result = call(engine, "F:c", T0 + 50)
        assert result.events[1].data["reporters"] == ["b", "a", "c"]


@pytest.mark.parametrize("bad", [0, -1, MAX_REPORTERS + 1, 1.5, "2", None, True])
def test_bad_min_reporters_is_refused_naming_it(bad: Any) -> None:
    """register or configure with a bad min_reporters: INVALID, naming the option."""
    e = Engine()
    result = e.apply(Command("register", C, S, options={"min_reporters": bad}), 0)
    assert result.status == INVALID and "min_reporters" in (result.error or "")
    assert len(e) == 0
    e.register(S, C, 0)
    for connection in (C, None):
        result = e.apply(Command("configure", connection, S, options={"min_reporters": bad}), 1)
        assert result.status == INVALID and "min_reporters" in (result.error or "")
