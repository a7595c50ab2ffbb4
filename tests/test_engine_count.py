"""The engine's batched success report: ``success`` with ``options.count``."""

from __future__ import annotations

from typing import Any

import pytest

from brama_mq.core import APPLIED, CLOSED, HALF_OPEN, INVALID, OPEN, Command, Engine, Result

S = "svc"
C = "api"


def make(**options: Any) -> Engine:
    e = Engine()
    assert e.register(S, C, 0, options).status == APPLIED
    return e


def do(e: Engine, op: str, now: int, **options: Any) -> Result:
    return e.apply(Command(op, C, S, options=options), now)


def test_count_resets_consecutive_failures_with_one_event_saying_how_many() -> None:
    """count=5 after failures: failure count back to 0, one success event with count 5."""
    e = make(max_attempts=3)
    do(e, "failure", 1)
    do(e, "failure", 2)
    result = do(e, "success", 3, count=5)
    assert [ev.event for ev in result.events] == ["success"]
    assert result.events[0].data["count"] == 5
    assert e.status(S, C)["failure_count"] == 0


def test_a_single_success_carries_no_count() -> None:
    """count=1 (or none) is the unbatched success, byte for byte."""
    e = make()
    assert "count" not in do(e, "success", 1, count=1).events[0].data
    assert "count" not in do(e, "success", 2).events[0].data


def test_count_fills_the_failure_rate_window_like_that_many_successes() -> None:
    """In a failure-rate window, count successes push out as many old entries."""
    window = {"strategy": "failure_rate", "window_size": 4, "minimum_calls": 4,
              "failure_rate_threshold": 75.0}
    batched, single = make(**window), make(**window)
    for e in (batched, single):
        do(e, "failure", 1)
        do(e, "failure", 2)
    do(batched, "success", 3, count=2)
    for _ in range(2):
        do(single, "success", 3)
    for e in (batched, single):
        assert e.status(S, C)["failure_count"] == 2
        do(e, "failure", 4)  # window [F, S, S, F]: 50 % < 75 %: stays closed
        assert e.status(S, C)["state"] == CLOSED
    do(batched, "success", 5, count=100)
    assert batched.status(S, C)["failure_count"] == 0


def test_count_in_half_open_counts_toward_the_success_threshold() -> None:
    """In half-open, count successes are count probe successes (and free as many permits)."""
    e = make(max_attempts=1, expiry_ms=10, half_open_permits=2, success_threshold=3)
    do(e, "failure", 0)
    e.advance(10)
    assert e.status(S, C)["state"] == HALF_OPEN
    assert e.acquire_probe(S, C, 11).granted and e.acquire_probe(S, C, 11).granted
    result = do(e, "success", 12, count=3)
    assert [ev.event for ev in result.events] == ["success", "circuit_closed", "state_change"]
    assert e.status(S, C)["state"] == CLOSED and e.status(S, C)["permits_in_use"] == 0


def test_count_while_open_is_noted_without_a_transition() -> None:
    """Successes reported while open change nothing but are published once."""
    e = make(max_attempts=1, expiry_ms=60_000)
    do(e, "failure", 0)
    result = do(e, "success", 1, count=7)
    assert [ev.event for ev in result.events] == ["success"]
    assert e.status(S, C)["state"] == OPEN


@pytest.mark.parametrize("bad", [0, -1, True, "3", 2.0, 1_000_001, None])
def test_invalid_count_is_refused_naming_the_option(bad: Any) -> None:
    """A count that is not an int in 1..1,000,000 is refused, and changes nothing."""
    e = make()
    do(e, "failure", 1)
    result = do(e, "success", 2, count=bad)
    assert result.status == INVALID and "count" in (result.error or "")
    assert e.status(S, C)["failure_count"] == 1
