"""Slow calls (issue 15, part 1): ``duration_ms`` on outcomes, ``slow_call_ms`` and
``slow_call_rate_threshold`` in the policy, the reasons ``failure_rate`` and
``slow_call_rate``, and the rates in event data. One table row per rule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from brama_mq.core import APPLIED, CLOSED, HALF_OPEN, INVALID, OPEN, Command, Engine, Result

S = "svc"
C = "api"
#: Tokens of an outcome script, one call each, 1 ms apart.
TOKENS: dict[str, tuple[str, dict[str, Any]]] = {
    "S": ("success", {}),
    "F": ("failure", {}),
    "s": ("success", {"duration_ms": 200}),  # slow: over slow_call_ms = 100
    "f": ("failure", {"duration_ms": 200.5}),
    "e": ("success", {"duration_ms": 100}),  # exactly slow_call_ms: not slow
    "q": ("success", {"duration_ms": 0}),
}
BASE: dict[str, Any] = {
    "strategy": "failure_rate",
    "window_size": 4,
    "minimum_calls": 4,
    "failure_rate_threshold": 100.0,
    "slow_call_ms": 100,
    "slow_call_rate_threshold": 50.0,
    "expiry_ms": 1_000,
}
OPENED = ["circuit_opened", "state_change"]


def make(options: dict[str, Any]) -> Engine:
    e = Engine(lineage="slow")
    assert e.register(S, C, 0, options).status == APPLIED
    return e


def play(e: Engine, script: str, start: int = 1) -> list[Result]:
    out = []
    for i, token in enumerate(script):
        op, options = TOKENS[token]
        result = e.apply(Command(op, C, S, options=options), start + i)
        assert result.status == APPLIED, result.error
        out.append(result)
    return out


@dataclass(frozen=True)
class Row:
    rule: str
    script: str
    last: list[str]  # event names of the last call
    reason: str | None = None  # of the opening, if it opened
    options: dict[str, Any] = field(default_factory=dict)


ROWS = [
    Row("slow successes open at the slow-call rate", "SSss", ["success", *OPENED],
        "slow_call_rate"),
    Row("below the slow-call threshold stays closed", "SSSs", ["success"]),
    Row("a duration equal to slow_call_ms is not slow", "SSee", ["success"]),
    Row("zero duration is a fast call", "qqqq", ["success"]),
    Row("a slow failure is checked against the failure rate first", "SSff",
        ["failure", *OPENED], "failure_rate", {"failure_rate_threshold": 50.0}),
    Row("a slow failure opens by the slow-call rate when the failure rate is low", "SSsf",
        ["failure", *OPENED], "slow_call_rate"),
    Row("minimum_calls holds the slow-call rule back", "sss", ["success"]),
    Row("a fast call reaching minimum_calls opens nothing", "sssS", ["success"]),
    Row("the next slow call after it does", "sssSs", ["success", *OPENED], "slow_call_rate"),
    Row("old slow calls leave the count window", "ssSSSSs", ["success"]),
    Row("a fast failure does not trip the slow-call rule", "sssF", ["failure"],
        None, {"failure_rate_threshold": 90.0}),
    Row("slow_call_ms null: durations change nothing", "ssss", ["success"], None,
        {"slow_call_ms": None}),
    Row("threshold 100 needs every call slow", "ssss", ["success", *OPENED], "slow_call_rate",
        {"slow_call_rate_threshold": 100.0}),
    Row("threshold 100: one fast call in the window keeps it closed", "sssSsss",
        ["success"], None, {"slow_call_rate_threshold": 100.0}),
    Row("consecutive strategy: slow only marks the events", "ffss", ["success"], None,
        {"strategy": "consecutive", "max_attempts": 3}),
    Row("consecutive strategy: failures open as always, slow or not", "fff",
        ["failure", *OPENED], "Threshold exceeded", {"strategy": "consecutive",
                                                     "max_attempts": 3}),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.rule for r in ROWS])
def test_slow_call_rules(row: Row) -> None:
    """Each rule: the last call's events, the state, and the opening's reason."""
    e = make({**BASE, **row.options})
    results = play(e, row.script)
    assert [ev.event for ev in results[-1].events] == row.last
    status = e.status(S, C)
    assert status["state"] == (OPEN if row.reason else CLOSED)
    for result in results[:-1]:
        assert [ev.event for ev in result.events][1:] == []  # nothing opened before
    if row.reason:
        opened = results[-1].events[1]
        assert opened.data["reason"] == row.reason
        assert results[-1].events[2].data["reason"] == row.reason


@pytest.mark.parametrize("row", ROWS, ids=[r.rule for r in ROWS])
def test_slow_flag_and_rates_in_event_data(row: Row) -> None:
    """success/failure data says slow: true exactly for slow calls, and (failure-rate
    strategy) the failure and slow-call rates of the window after the call."""
    options = {**BASE, **row.options}
    e = make(options)
    results = play(e, row.script)
    slow_ms = options["slow_call_ms"]
    window: list[str] = []
    for token, result in zip(row.script, results, strict=True):
        data = result.events[0].data
        duration = TOKENS[token][1].get("duration_ms")
        slow = slow_ms is not None and duration is not None and duration > slow_ms
        assert data.get("slow", False) is slow
        if "slow" in data:
            assert data["slow"] is True
        if options["strategy"] != "failure_rate":
            assert "failure_rate" not in data and "slow_call_rate" not in data
            continue
        window = [*window, token][-options["window_size"] :]
        fails = sum(t in "Ff" for t in window)
        slows = sum(t in "sf" for t in window) if slow_ms is not None else 0
        assert data["failure_rate"] == round(100.0 * fails / len(window), 2)
        expected_slow = None if slow_ms is None else round(100.0 * slows / len(window), 2)
        assert data["slow_call_rate"] == expected_slow


def test_opening_detail_keeps_the_sentence() -> None:
    """reason is the machine word; detail has the sentence the reason used to be."""
    e = make(BASE)
    opened = play(e, "SSss")[-1].events[1].data
    assert opened["reason"] == "slow_call_rate"
    assert opened["detail"] == "Slow-call rate 50.0% >= 50%"
    assert "reporters" not in opened  # no report named a reporter
    e = make({**BASE, "failure_rate_threshold": 60.0, "slow_call_ms": None})
    opened = play(e, "SFFF")[-1].events[1].data
    assert (opened["reason"], opened["detail"]) == ("failure_rate", "Failure rate 75.0% >= 60%")


def test_status_rows_carry_the_rates() -> None:
    """status: failure_rate and slow_call_rate over the window; null without one."""
    e = make(BASE)
    play(e, "SFs")
    status = e.status(S, C)
    assert (status["failure_rate"], status["slow_call_rate"]) == (33.33, 33.33)
    assert status["mode"] == "normal"
    e.register(S, "plain", 0)
    plain = e.status(S, "plain")
    assert (plain["failure_rate"], plain["slow_call_rate"]) == (None, None)
    e.register(S, "empty", 0, {"strategy": "failure_rate"})
    empty = e.status(S, "empty")
    assert (empty["failure_rate"], empty["slow_call_rate"]) == (None, None)
    e.apply(Command("success", "empty", S), 1)
    assert e.status(S, "empty")["failure_rate"] == 0.0
    assert e.status(S, "empty")["slow_call_rate"] is None  # slow calls not measured


def test_batched_slow_successes_count_as_that_many_slow_calls() -> None:
    """success with count and duration_ms: count calls that each took that long."""
    e = make(BASE)
    result = e.apply(Command("success", C, S, options={"count": 4, "duration_ms": 500}), 1)
    assert [ev.event for ev in result.events] == ["success", *OPENED]
    assert result.events[0].data["count"] == 4 and result.events[0].data["slow"] is True
    assert result.events[0].data["slow_call_rate"] == 100.0
    e = make(BASE)
    e.apply(Command("success", C, S, options={"count": 3, "duration_ms": 5}), 1)
    assert e.status(S, C)["slow_call_rate"] == 0.0


def half_opened(e: Engine) -> int:
    play(e, "SSss")
    assert e.status(S, C)["state"] == OPEN
    until = int(e.status(S, C)["open_until"])
    e.advance(until)
    assert e.status(S, C)["state"] == HALF_OPEN
    return until


def test_a_slow_probe_reopens_with_backoff() -> None:
    """In half-open a slow success reopens like a failure: reason slow_call_rate."""
    e = make({**BASE, "backoff": "exponential", "success_threshold": 2})
    t = half_opened(e)
    probe = e.acquire_probe(S, C, t)
    result = e.apply(Command("success", C, S, options={"lease": probe.lease,
                                                       "duration_ms": 300}), t + 1)
    assert [ev.event for ev in result.events] == ["success", *OPENED]
    opened = result.events[1].data
    assert (opened["reason"], opened["detail"]) == ("slow_call_rate", "Slow call in half-open")
    assert opened["previous_state"] == HALF_OPEN and opened["expiry_ms"] == 2_000
    assert e.status(S, C)["reopen_level"] == 1 and e.status(S, C)["permits_in_use"] == 0


def test_a_fast_probe_still_closes() -> None:
    """A success under slow_call_ms in half-open counts toward success_threshold."""
    e = make(BASE)
    t = half_opened(e)
    result = e.apply(Command("success", C, S, options={"duration_ms": 20}), t + 1)
    assert [ev.event for ev in result.events] == ["success", "circuit_closed", "state_change"]


def test_slow_probe_under_the_consecutive_strategy_is_a_success() -> None:
    """The consecutive strategy has no slow-call rule: a slow probe closes as before."""
    e = make({"max_attempts": 1, "expiry_ms": 10, "slow_call_ms": 100})
    e.apply(Command("failure", C, S), 0)
    e.advance(10)
    result = e.apply(Command("success", C, S, options={"duration_ms": 900}), 11)
    assert [ev.event for ev in result.events] == ["success", "circuit_closed", "state_change"]
    assert result.events[0].data["slow"] is True


def test_outcomes_while_open_are_noted_with_their_flag() -> None:
    """Slow outcomes reported while open emit success/failure only, marked slow."""
    e = make(BASE)
    play(e, "SSss")
    result = e.apply(Command("failure", C, S, options={"duration_ms": 999}), 10)
    assert [ev.event for ev in result.events] == ["failure"]
    data = result.events[0].data
    assert data["slow"] is True and data["failure_rate"] is None
    assert e.status(S, C)["state"] == OPEN


BAD_OUTCOME_OPTIONS = [
    ("duration_ms", -1),
    ("duration_ms", -0.5),
    ("duration_ms", "5"),
    ("duration_ms", True),
    ("duration_ms", float("nan")),
    ("duration_ms", float("inf")),
    ("duration_ms", 2**60),
    ("duration_ms", [1]),
    ("reporter", ""),
    ("reporter", "r" * 201),
    ("reporter", 7),
    ("reporter", ["a"]),
    ("reporter", {"name": "x"}),
]


@pytest.mark.parametrize("op", ["success", "failure"])
@pytest.mark.parametrize(("name", "value"), BAD_OUTCOME_OPTIONS,
                         ids=[f"{n}={v!r}"[:40] for n, v in BAD_OUTCOME_OPTIONS])
def test_bad_outcome_option_is_refused_naming_it(op: str, name: str, value: Any) -> None:
    """A bad duration_ms/reporter is INVALID (the owner dead-letters it), names the
    option, changes nothing; also for a connection nobody registered."""
    e = make(BASE)
    before = e.snapshot()
    for connection in (C, "ghost"):
        result = e.apply(Command(op, connection, S, options={name: value}), 5)
        assert result.status == INVALID and result.events == []
        assert result.error and f"invalid option {name}=" in result.error
        assert len(result.error) < 200  # a huge value is cut short in the reason
    assert e.snapshot() == before


@pytest.mark.parametrize(
    ("name", "value"), [("duration_ms", 0), ("duration_ms", 12.75), ("duration_ms", None),
                        ("reporter", "r" * 200), ("reporter", "web-1:42"), ("reporter", None)]
)
def test_good_outcome_options_apply(name: str, value: Any) -> None:
    e = make(BASE)
    for op in ("success", "failure"):
        assert e.apply(Command(op, C, S, options={name: value}), 5).status == APPLIED


def test_unknown_outcome_options_are_still_ignored() -> None:
    """A newer client's extra outcome options do not get its reports refused."""
    e = make(BASE)
    result = e.apply(Command("failure", C, S, options={"trace_id": "x", "duration_ms": 1}), 1)
    assert result.status == APPLIED
