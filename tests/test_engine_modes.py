"""Operating modes (issue 15, part 4): normal, disabled, forced_open, metrics_only, set
by ``configure`` (or at ``register``); each change is one ``state_change`` with reason
``mode``. One table row per change of mode, then what each mode does to calls."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from brama_mq.core import APPLIED, CLOSED, HALF_OPEN, INVALID, OPEN, Command, Engine, Result

S = "svc"
C = "api"
OPTIONS: dict[str, Any] = {"max_attempts": 2, "expiry_ms": 1_000, "inactive_ms": 50_000}


def make(options: dict[str, Any] | None = None) -> Engine:
    e = Engine(lineage="modes")
    assert e.register(S, C, 0, {**OPTIONS, **(options or {})}).status == APPLIED
    return e


def do(e: Engine, op: str, now: int, reason: str | None = None, **options: Any) -> Result:
    return e.apply(Command(op, C, S, reason, options), now)


def mode(e: Engine, value: str, now: int) -> Result:
    result = do(e, "configure", now, mode=value)
    assert result.status == APPLIED, result.error
    return result


def names(result: Result) -> list[str]:
    return [ev.event for ev in result.events]


def setup(e: Engine, state: str) -> None:
    """Bring the connection to ``state`` (at times 1..1_001)."""
    if state in (OPEN, HALF_OPEN):
        do(e, "failure", 1)
        do(e, "failure", 1)
    if state == HALF_OPEN:
        e.advance(1_001)
    assert e.status(S, C)["state"] == state


@dataclass(frozen=True)
class Row:
    change: str
    state: str  # before, in mode normal unless ``via`` says
    via: str | None  # a mode entered first
    to: str
    events: list[str]
    after: str  # state after


ROWS = [
    Row("normal -> disabled while closed", CLOSED, None, "disabled", ["state_change"], CLOSED),
    Row("normal -> disabled while open", OPEN, None, "disabled",
        ["circuit_closed", "state_change"], CLOSED),
    Row("normal -> metrics_only while half-open", HALF_OPEN, None, "metrics_only",
        ["circuit_closed", "state_change"], CLOSED),
    Row("normal -> forced_open while closed", CLOSED, None, "forced_open",
        ["circuit_opened", "state_change"], OPEN),
    Row("normal -> forced_open while open", OPEN, None, "forced_open",
        ["circuit_opened", "state_change"], OPEN),
    Row("normal -> forced_open while half-open", HALF_OPEN, None, "forced_open",
        ["circuit_opened", "state_change"], OPEN),
    Row("forced_open -> normal", CLOSED, "forced_open", "normal",
        ["circuit_closed", "state_change"], CLOSED),
    Row("forced_open -> disabled", CLOSED, "forced_open", "disabled",
        ["circuit_closed", "state_change"], CLOSED),
    Row("disabled -> metrics_only", CLOSED, "disabled", "metrics_only", ["state_change"],
        CLOSED),
    Row("metrics_only -> normal", CLOSED, "metrics_only", "normal", ["state_change"], CLOSED),
    Row("disabled -> forced_open", CLOSED, "disabled", "forced_open",
        ["circuit_opened", "state_change"], OPEN),
    Row("the same mode again", CLOSED, "disabled", "disabled", [], CLOSED),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.change for r in ROWS])
def test_mode_changes(row: Row) -> None:
    """Each change: its events in order, one state_change with reason mode carrying the
    mode, the state after; and the status row's mode."""
    e = make()
    setup(e, row.state)
    previous = "normal"
    if row.via is not None:
        mode(e, row.via, 1_500)
        previous = row.via
    before = e.status(S, C)["state"]
    result = mode(e, row.to, 2_000)
    assert names(result) == row.events
    status = e.status(S, C)
    assert (status["state"], status["mode"]) == (row.after, row.to)
    assert result.value["mode"] == row.to
    if not row.events:
        return
    change = result.events[-1].data
    assert change["reason"] == "mode"
    assert (change["mode"], change["previous_mode"]) == (row.to, previous)
    assert (change["previous_state"], change["new_state"]) == (before, row.after)
    for ev in result.events:
        assert ev.data["reason"] == "mode" and ev.data["mode"] == row.to
        assert ev.timestamp == 2_000


def test_register_in_a_mode() -> None:
    """register may start a connection in a mode: the mode change follows the
    registration events."""
    e = Engine()
    result = e.apply(Command("register", C, S, options={"mode": "forced_open"}), 5)
    assert names(result) == ["registration", "connection_registered", "circuit_opened",
                             "state_change"]
    assert e.status(S, C)["state"] == OPEN and e.status(S, C)["held_open"]
    e.register(S, "quiet", 5, {"mode": "disabled"})
    assert e.status(S, "quiet")["mode"] == "disabled"


def test_disabled_allows_every_call_and_records_outcomes() -> None:
    """disabled: no rule opens the circuit; outcomes are counted and published."""
    e = make()
    mode(e, "disabled", 1)
    for i in range(10):
        result = do(e, "failure", 10 + i)
        assert names(result) == ["failure"]
        assert result.events[0].data["mode"] == "disabled"
        assert "would_open" not in result.events[0].data
    status = e.status(S, C)
    assert (status["state"], status["failure_count"]) == (CLOSED, 10)
    assert e.acquire_probe(S, C, 30).granted and e.available(S, C)
    result = do(e, "open", 40)
    assert result.status == INVALID and "mode" in (result.error or "")
    assert names(do(e, "reset", 41)) == ["circuit_reset"]  # closed stays closed
    assert e.status(S, C)["failure_count"] == 0


def test_disabled_rate_window_still_counts() -> None:
    e = make({"strategy": "failure_rate", "window_size": 4, "minimum_calls": 2})
    mode(e, "disabled", 1)
    results = [do(e, "failure", 2 + i) for i in range(5)]
    assert all(names(r) == ["failure"] for r in results)
    assert results[-1].events[0].data["failure_rate"] == 100.0
    assert e.status(S, C)["failure_rate"] == 100.0


def test_forced_open_refuses_every_call_until_the_mode_changes() -> None:
    """forced_open: held open with no expiry; outcomes noted; open/close/reset refused."""
    e = make()
    mode(e, "forced_open", 1)
    probe = e.acquire_probe(S, C, 2)
    assert (probe.granted, probe.state, probe.retry_after_ms) == (False, OPEN, None)
    assert not e.available(S, C)
    assert e.next_deadline is None or e.advance(10**12).events == []
    assert e.status(S, C)["state"] == OPEN
    result = do(e, "failure", 10**12 + 1)
    assert names(result) == ["failure"] and result.events[0].data["mode"] == "forced_open"
    assert names(do(e, "success", 10**12 + 2)) == ["success"]
    for op in ("open", "close", "reset"):
        refused = do(e, op, 10**12 + 3)
        assert refused.status == INVALID and refused.events == []
        assert "mode=forced_open" in (refused.error or "")
    assert names(mode(e, "normal", 10**12 + 4)) == ["circuit_closed", "state_change"]
    assert e.acquire_probe(S, C, 10**12 + 5).granted


def test_forced_open_voids_a_running_expiry() -> None:
    e = make()
    setup(e, OPEN)
    mode(e, "forced_open", 2)
    assert e.advance(5_000).events == []
    assert e.status(S, C)["open_until"] is None


def test_forced_open_is_never_cleaned_up_but_disabled_is() -> None:
    """An open circuit is never cleaned away under a caller, forced or not."""
    e = make({"inactive_ms": 1_000})
    mode(e, "forced_open", 0)
    assert e.advance(100_000).events == []
    assert (S, C) in e
    mode(e, "disabled", 100_001)
    assert [ev.event for ev in e.advance(101_001).events] == ["cleanup", "connection_removed"]


@pytest.mark.parametrize(
    ("options", "script", "reason"),
    [
        ({}, "FFF", "Threshold exceeded"),
        ({"strategy": "failure_rate", "window_size": 4, "minimum_calls": 2}, "FF",
         "failure_rate"),
        ({"strategy": "failure_rate", "window_size": 4, "minimum_calls": 2,
          "failure_rate_threshold": 100.0, "slow_call_ms": 10}, "ss", "slow_call_rate"),
    ],
    ids=["consecutive", "failure_rate", "slow_call_rate"],
)
def test_metrics_only_says_when_it_would_have_opened(
    options: dict[str, Any], script: str, reason: str
) -> None:
    """metrics_only: the circuit never opens; the call that would have opened it says
    so in data.would_open (the reason it would have had), and so do later ones."""
    e = make(options)
    mode(e, "metrics_only", 1)
    results = []
    for i, ch in enumerate(script):
        op = "failure" if ch == "F" else "success"
        opts = {"duration_ms": 50} if ch == "s" else {}
        results.append(do(e, op, 10 + i, **opts))
    assert all(len(r.events) == 1 for r in results)
    assert results[-1].events[0].data["would_open"] == reason
    assert "would_open" not in results[0].events[0].data
    assert e.status(S, C)["state"] == CLOSED
    assert e.acquire_probe(S, C, 100).granted
    assert do(e, "open", 101).status == INVALID


def test_metrics_only_respects_the_quorum() -> None:
    e = make({"min_reporters": 2})
    mode(e, "metrics_only", 1)
    for i in range(4):
        result = do(e, "failure", 10 + i, reporter="a")
        assert "would_open" not in result.events[0].data
    result = do(e, "failure", 20, reporter="b")
    assert result.events[0].data["would_open"] == "Threshold exceeded"


def test_events_carry_the_mode_only_when_it_is_not_normal() -> None:
    e = make()
    assert "mode" not in do(e, "success", 1).events[0].data
    mode(e, "metrics_only", 2)
    assert do(e, "success", 3).events[0].data["mode"] == "metrics_only"
    change = mode(e, "normal", 4).events[0].data
    assert change["mode"] == "normal"  # a change of mode always says the new one
    assert "mode" not in do(e, "success", 5).events[0].data


def test_configure_with_mode_and_policy_options_applies_both() -> None:
    e = make()
    result = do(e, "configure", 1, mode="disabled", max_attempts=9)
    assert result.status == APPLIED and names(result) == ["state_change"]
    assert (result.value["mode"], result.value["max_attempts"]) == ("disabled", 9)


@pytest.mark.parametrize("bad", ["paused", "", "NORMAL", None, 1, ["normal"], True])
def test_bad_mode_is_refused_naming_it(bad: Any) -> None:
    """An unknown mode: INVALID, names the option, changes nothing (nor the policy)."""
    e = make()
    before = e.snapshot()
    for op in ("configure", "register"):
        result = e.apply(Command(op, C if op == "configure" else "new", S,
                                 options={"mode": bad, "max_attempts": 3}), 1)
        assert result.status == INVALID and result.events == []
        assert "mode" in (result.error or "")
    assert e.snapshot() == before


def test_mode_of_the_defaults_is_refused() -> None:
    e = make()
    result = e.apply(Command("configure", None, None, options={"mode": "disabled"}), 1)
    assert result.status == INVALID and "mode" in (result.error or "")
    assert e.defaults.max_attempts == 5


def test_mode_survives_a_snapshot() -> None:
    """A restored forced_open connection still refuses and still has no expiry."""
    e = make()
    mode(e, "forced_open", 1)
    e.register(S, "other", 0, {"mode": "metrics_only", "inactive_ms": None})
    restored = Engine.restore(json.loads(json.dumps(e.snapshot())))
    assert restored.snapshot() == e.snapshot()
    assert restored.status(S, C)["mode"] == "forced_open"
    assert restored.status(S, "other")["mode"] == "metrics_only"
    assert not restored.acquire_probe(S, C, 5).granted
    assert restored.advance(10**9).events == []
    assert do(restored, "close", 10**9).status == INVALID


def test_configure_of_the_engine_api_needs_now_for_a_mode_change() -> None:
    """Engine.configure without ``now`` still works for policy options (as before)."""
    e = make()
    assert e.configure(S, C, {"max_attempts": 3}).status == APPLIED
    with pytest.raises(ValueError, match="now"):
        e.configure(S, C, {"mode": "disabled"})
    assert names(e.configure(S, C, {"mode": "disabled"}, 7)) == ["state_change"]
