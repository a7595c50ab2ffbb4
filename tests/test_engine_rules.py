"""The engine's rules beyond the event table: probes, backoff, Brama's bugs not copied,
failure-rate windows, configuration, validation, timers, seq continuity, snapshots."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import pytest

from brama_mq.core import (
    ALREADY_REGISTERED,
    APPLIED,
    CLOSED,
    DEFAULT_POLICY,
    HALF_OPEN,
    INVALID,
    NOT_REGISTERED,
    OPEN,
    Command,
    Engine,
    Event,
    Policy,
    Result,
)
from brama_mq.errors import PolicyError

S = "svc"
C = "api"


def make(options: Mapping[str, Any] | None = None, *, now: int = 0, **engine: Any) -> Engine:
    """An engine with connection (S, C) registered at ``now`` with ``options``."""
    e = Engine(**engine)
    result = e.register(S, C, now, dict(options or {}))
    assert result.status == APPLIED, result.error
    return e


def do(
    e: Engine,
    op: str,
    now: int,
    *,
    connection: str | None = C,
    scope: str | None = S,
    reason: str | None = None,
    **options: Any,
) -> Result:
    return e.apply(Command(op, connection, scope, reason=reason, options=options), now)


def names(result: Result) -> list[str]:
    return [ev.event for ev in result.events]


def state(e: Engine, now: int | None = None) -> dict[str, Any]:
    return e.status(S, C, now)


def trip(e: Engine, now: int) -> None:
    """Fail until the circuit opens."""
    for _ in range(state(e)["max_attempts"]):
        do(e, "failure", now)
    assert state(e)["state"] == OPEN


def half_open(e: Engine, now: int) -> int:
    """Trip at ``now`` and advance to the expiry; returns the time the circuit half-opened."""
    trip(e, now)
    until = state(e)["open_until"]
    assert [ev.event for ev in e.advance(until).events][-1] == "state_change"
    assert state(e)["state"] == HALF_OPEN
    return int(until)


# ---------------------------------------------------------------------------- half-open probes
PROBE = {"max_attempts": 1, "expiry_ms": 1_000, "half_open_permits": 2, "probe_timeout_ms": 500}


def test_acquire_probe_grants_at_most_half_open_permits() -> None:
    """acquire_probe grants at most half_open_permits leases; the next one waits for the oldest."""
    e = make({**PROBE, "success_threshold": 5})
    t = half_open(e, 0)
    first = e.acquire_probe(S, C, t + 10)
    second = e.acquire_probe(S, C, t + 20)
    third = e.acquire_probe(S, C, t + 30)
    assert first.granted and second.granted and not third.granted
    assert first.lease and second.lease and first.lease != second.lease
    assert first.lease_expires_at == t + 10 + 500
    assert third.state == HALF_OPEN and third.lease is None
    assert third.retry_after_ms == (t + 10 + 500) - (t + 30)
    assert state(e)["permits_in_use"] == 2


def test_unanswered_lease_is_returned_by_advance() -> None:
    """A lease not answered within probe_timeout_ms is given back by advance(), silently."""
    e = make({**PROBE, "half_open_permits": 1})
    t = half_open(e, 0)
    probe = e.acquire_probe(S, C, t)
    assert probe.granted and probe.lease_expires_at == t + 500
    assert not e.acquire_probe(S, C, t + 1).granted
    assert e.advance(t + 499).events == []
    assert state(e)["permits_in_use"] == 1
    assert e.advance(t + 500).events == []
    assert state(e)["permits_in_use"] == 0
    assert state(e)["state"] == HALF_OPEN
    assert e.acquire_probe(S, C, t + 501).granted


def test_success_releases_its_lease() -> None:
    """A half-open success below success_threshold gives its lease back."""
    e = make({**PROBE, "success_threshold": 3})
    t = half_open(e, 0)
    a = e.acquire_probe(S, C, t)
    b = e.acquire_probe(S, C, t)
    assert do(e, "success", t + 1, lease=b.lease).ok
    assert state(e)["permits_in_use"] == 1
    assert e.acquire_probe(S, C, t + 2).granted  # b's permit is free again
    assert do(e, "success", t + 3, lease=a.lease).ok
    assert state(e)["permits_in_use"] == 1


def test_outcome_without_lease_answers_the_oldest_probe() -> None:
    """An outcome that names no lease releases the oldest outstanding one."""
    e = make({**PROBE, "success_threshold": 3})
    t = half_open(e, 0)
    a = e.acquire_probe(S, C, t)
    e.acquire_probe(S, C, t + 1)
    do(e, "success", t + 2)
    assert state(e)["permits_in_use"] == 1
    assert not e.release_probe(S, C, a.lease or "")  # a was the one answered


def test_failure_releases_every_lease_by_reopening() -> None:
    """A half-open failure reopens the circuit and voids every outstanding lease."""
    e = make(PROBE)
    t = half_open(e, 0)
    a = e.acquire_probe(S, C, t)
    e.acquire_probe(S, C, t)
    assert names(do(e, "failure", t + 1, lease=a.lease)) == [
        "failure",
        "circuit_opened",
        "state_change",
    ]
    assert state(e)["permits_in_use"] == 0


def test_release_probe_gives_a_lease_back() -> None:
    """release_probe returns an unused lease once; unknown leases are refused."""
    e = make(PROBE)
    t = half_open(e, 0)
    probe = e.acquire_probe(S, C, t)
    assert probe.lease is not None
    assert e.release_probe(S, C, probe.lease)
    assert not e.release_probe(S, C, probe.lease)
    assert not e.release_probe(S, "nobody", probe.lease)
    assert state(e)["permits_in_use"] == 0


def test_closed_probe_is_granted_without_lease() -> None:
    """In closed state every call may go ahead: granted, no lease, nothing counted."""
    e = make(PROBE)
    probe = e.acquire_probe(S, C, 5)
    assert (probe.granted, probe.state, probe.lease, probe.retry_after_ms) == (
        True,
        CLOSED,
        None,
        None,
    )
    assert state(e)["permits_in_use"] == 0


def test_open_probe_is_denied_with_retry_after() -> None:
    """In open state a probe is denied with the ms left until half-open."""
    e = make(PROBE)
    trip(e, 100)
    probe = e.acquire_probe(S, C, 400)
    assert (probe.granted, probe.state, probe.retry_after_ms) == (False, OPEN, 700)
    assert e.available(S, C) is False


def test_held_open_probe_has_no_retry_after() -> None:
    """A circuit held open by hand denies probes with retry_after_ms None."""
    e = make(PROBE)
    do(e, "open", 10, expiry_ms=None)
    probe = e.acquire_probe(S, C, 1_000_000)
    assert (probe.granted, probe.retry_after_ms) == (False, None)


# ---------------------------------------------------------------------------- success threshold
def test_success_threshold_needs_that_many_half_open_successes() -> None:
    """With success_threshold=3 the third half-open success closes, not the first two."""
    e = make({"max_attempts": 1, "expiry_ms": 100, "success_threshold": 3})
    t = half_open(e, 0)
    assert names(do(e, "success", t + 1)) == ["success"]
    assert names(do(e, "success", t + 2)) == ["success"]
    assert state(e)["state"] == HALF_OPEN and state(e)["probe_successes"] == 2
    assert names(do(e, "success", t + 3)) == ["success", "circuit_closed", "state_change"]
    assert state(e)["state"] == CLOSED


def test_half_open_failure_resets_probe_successes() -> None:
    """Successes counted before a half-open failure do not carry over to the next half-open."""
    e = make({"max_attempts": 1, "expiry_ms": 100, "success_threshold": 2})
    t = half_open(e, 0)
    do(e, "success", t + 1)
    do(e, "failure", t + 2)
    t2 = int(state(e)["open_until"])
    e.advance(t2)
    assert names(do(e, "success", t2 + 1)) == ["success"]
    assert state(e)["state"] == HALF_OPEN


# ---------------------------------------------------------------------------- backoff
def reopen_periods(e: Engine, start: int, times: int) -> list[int]:
    """Half-open then fail ``times`` times; the open period of each reopen."""
    periods = []
    now = start
    for _ in range(times):
        now = int(state(e)["open_until"])
        e.advance(now)
        assert state(e)["state"] == HALF_OPEN
        now += 1
        do(e, "failure", now)
        periods.append(int(state(e)["open_until"]) - now)
    return periods


EXPO = {"max_attempts": 1, "expiry_ms": 1_000, "backoff": "exponential", "backoff_factor": 2.0}


def test_exponential_backoff_grows_up_to_max_expiry() -> None:
    """Each reopen from half-open multiplies the open time by backoff_factor, capped."""
    e = make({**EXPO, "max_expiry_ms": 5_000})
    trip(e, 0)
    assert state(e)["open_until"] == 1_000
    assert reopen_periods(e, 0, 5) == [2_000, 4_000, 5_000, 5_000, 5_000]


def test_exponential_backoff_default_cap_is_ten_times_expiry() -> None:
    """Without max_expiry_ms the open time stops growing at ten times expiry_ms (as Brama)."""
    e = make({**EXPO, "backoff_factor": 3.0})
    trip(e, 0)
    assert reopen_periods(e, 0, 4) == [3_000, 9_000, 10_000, 10_000]


def test_brama_progressive_alias_is_exponential() -> None:
    """Brama's spelling backoff='progressive' is accepted as exponential."""
    assert DEFAULT_POLICY.updated({"backoff": "progressive"}).backoff == "exponential"


def test_full_close_resets_backoff() -> None:
    """After a close (half-open successes), the next trip opens for expiry_ms again."""
    e = make({**EXPO, "max_expiry_ms": 60_000})
    trip(e, 0)
    assert reopen_periods(e, 0, 2) == [2_000, 4_000]
    now = int(state(e)["open_until"])
    e.advance(now)
    do(e, "success", now + 1)
    assert state(e)["state"] == CLOSED and state(e)["reopen_level"] == 0
    trip(e, now + 2)
    assert state(e)["open_until"] == now + 2 + 1_000
    assert reopen_periods(e, now + 2, 1) == [2_000]


def test_manual_close_resets_backoff() -> None:
    """A close by hand also resets the backoff level."""
    e = make({**EXPO, "max_expiry_ms": 60_000})
    trip(e, 0)
    reopen_periods(e, 0, 3)
    do(e, "close", 100_000)
    trip(e, 100_001)
    assert state(e)["open_until"] == 100_001 + 1_000


def test_fixed_backoff_keeps_the_open_time() -> None:
    """With fixed backoff every reopen lasts expiry_ms."""
    e = make({"max_attempts": 1, "expiry_ms": 1_000, "backoff": "fixed"})
    trip(e, 0)
    assert reopen_periods(e, 0, 4) == [1_000] * 4


@pytest.mark.parametrize("factor", [2.0, 1000.0])
def test_backoff_survives_thousands_of_reopens(factor: float) -> None:
    """A long outage (thousands of reopens) stays capped at max_expiry_ms, no overflow."""
    policy = DEFAULT_POLICY.updated({**EXPO, "backoff_factor": factor, "max_expiry_ms": 9_000})
    assert policy.open_period_ms(5_000) == 9_000
    e = make({**EXPO, "backoff_factor": factor, "max_expiry_ms": 9_000})
    trip(e, 0)
    assert reopen_periods(e, 0, 1_100)[-3:] == [9_000] * 3


# ---------------------------------------------------------------------------- manual open
def test_open_without_expiry_stays_open_until_closed_by_hand() -> None:
    """open(expiry_ms=None) holds the circuit open: advance() never half-opens it."""
    e = make({"expiry_ms": 1_000, "inactive_ms": None})
    result = do(e, "open", 10, expiry_ms=None)
    assert names(result) == ["circuit_opened", "state_change"]
    assert result.events[0].data["open_until"] is None
    assert state(e)["held_open"] and state(e)["open_until"] is None
    for now in (1_010, 10**6, 10**12):
        assert e.advance(now).events == []
    assert state(e)["state"] == OPEN
    assert names(do(e, "close", 10**12 + 1)) == ["circuit_closed", "state_change"]


def test_open_without_expiry_cancels_a_running_expiry() -> None:
    """Holding an already-open circuit open voids its pending expiry."""
    e = make({"max_attempts": 1, "expiry_ms": 1_000})
    trip(e, 0)
    assert names(do(e, "open", 5, expiry_ms=None)) == ["circuit_opened"]
    assert e.advance(1_000).events == []
    assert state(e)["state"] == OPEN


def test_open_uses_given_or_policy_expiry() -> None:
    """open() with expiry_ms opens for that long; without it, for the policy's expiry_ms."""
    e = make({"expiry_ms": 1_000})
    do(e, "open", 10, expiry_ms=250)
    assert state(e)["open_until"] == 260
    assert e.advance(259).events == []
    assert names_of(e.advance(260))[-1:] == ["state_change"]
    assert state(e)["state"] == HALF_OPEN
    do(e, "close", 300)
    do(e, "open", 400)
    assert state(e)["open_until"] == 1_400


# ---------------------------------------------------------------------------- Brama's bugs
def test_close_resets_the_failure_count() -> None:
    """After a close the next failure does not reopen at once (Brama keeps the count)."""
    e = make({"max_attempts": 3})
    trip(e, 0)
    assert names(do(e, "close", 10)) == ["circuit_closed", "state_change"]
    assert state(e)["failure_count"] == 0
    assert names(do(e, "failure", 11)) == ["failure"]
    assert state(e)["state"] == CLOSED and state(e)["failure_count"] == 1


def test_close_of_a_closed_circuit_resets_the_count_too() -> None:
    """close on a closed circuit with failures clears them (no state_change: no change)."""
    e = make({"max_attempts": 3})
    do(e, "failure", 1)
    do(e, "failure", 2)
    result = do(e, "close", 3)
    assert names(result) == ["circuit_closed"]
    assert result.events[0].data["failure_count"] == 0
    assert names(do(e, "failure", 4)) == ["failure"]


def test_failures_while_open_emit_only_failure_and_keep_the_open_period() -> None:
    """A failure while open emits `failure` only and does not push the expiry back."""
    e = make({"max_attempts": 2, "expiry_ms": 1_000})
    trip(e, 0)
    for now in (100, 500, 999):
        result = do(e, "failure", now)
        assert names(result) == ["failure"]
        assert result.events[0].data["state"] == OPEN
        assert state(e)["open_until"] == 1_000
    assert state(e)["failure_count"] == 5
    assert [ev.event for ev in e.advance(1_000).events] == [
        "expiry",
        "circuit_half_opened",
        "state_change",
    ]


def test_success_while_open_is_noted_without_transition() -> None:
    """A success reported while open emits `success` only; the circuit stays open."""
    e = make({"max_attempts": 1, "expiry_ms": 1_000})
    trip(e, 0)
    assert names(do(e, "success", 10)) == ["success"]
    assert state(e)["state"] == OPEN and state(e)["open_until"] == 1_000


def test_register_duplicate_changes_nothing() -> None:
    """A second register is refused as already_registered, with no events and no change."""
    e = make({"max_attempts": 3})
    do(e, "failure", 5)
    before = e.snapshot()
    result = do(e, "register", 10, max_attempts=9, expiry_ms=5)
    assert result.status == ALREADY_REGISTERED
    assert result.events == []
    assert e.snapshot() == before


def test_unused_connection_is_not_cleaned_before_inactive_ms() -> None:
    """A connection registered but never used lives inactive_ms after its registration."""
    t0 = 1_700_000_000_000
    e = make({"inactive_ms": 5_000}, now=t0)
    assert e.next_deadline == t0 + 5_000
    assert e.advance(t0 + 4_999).events == []
    assert (S, C) in e
    assert [ev.event for ev in e.advance(t0 + 5_000).events] == ["cleanup", "connection_removed"]
    assert (S, C) not in e


def test_activity_postpones_cleanup() -> None:
    """Each success or failure restarts the inactivity period."""
    e = make({"inactive_ms": 1_000})
    do(e, "success", 800)
    assert e.advance(1_000).events == []
    do(e, "failure", 1_500)
    assert e.advance(2_499).events == []
    assert [ev.event for ev in e.advance(2_500).events] == ["cleanup", "connection_removed"]


def test_open_circuits_are_never_cleaned_up() -> None:
    """An open circuit survives any number of inactivity periods."""
    e = make({"inactive_ms": 1_000})
    do(e, "open", 0, expiry_ms=None)
    for now in range(1_000, 50_001, 1_000):
        assert e.advance(now).events == []
    assert state(e)["state"] == OPEN


def test_closing_by_hand_counts_as_activity() -> None:
    """A circuit closed by hand after a long open period gets a full inactivity period."""
    e = make({"inactive_ms": 1_000})
    do(e, "open", 0, expiry_ms=None)
    e.advance(5_000)
    do(e, "close", 5_500)
    assert e.advance(6_499).events == []
    assert [ev.event for ev in e.advance(6_500).events] == ["cleanup", "connection_removed"]


def test_half_open_by_expiry_counts_as_activity() -> None:
    """Leaving open by expiry starts a fresh inactivity period before cleanup."""
    e = make({"inactive_ms": 1_000, "max_attempts": 1, "expiry_ms": 3_000})
    trip(e, 0)
    assert names_of(e.advance(3_000)) == ["expiry", "circuit_half_opened", "state_change"]
    assert e.advance(3_999).events == []
    assert names_of(e.advance(4_000)) == ["cleanup", "connection_removed"]


def test_lowering_inactive_ms_takes_effect_at_once() -> None:
    """configure(inactive_ms=smaller) cleans up at last activity + the new period."""
    e = make({"inactive_ms": 100_000})
    do(e, "success", 10)
    do(e, "configure", 20, inactive_ms=1_000)
    assert e.advance(1_009).events == []
    assert names_of(e.advance(1_010)) == ["cleanup", "connection_removed"]


def test_inactive_ms_none_never_cleans_up() -> None:
    """With inactive_ms None nothing is ever due for an idle connection."""
    e = make({"inactive_ms": None})
    assert e.next_deadline is None
    assert e.advance(10**15).events == []
    assert (S, C) in e


def names_of(advance: Any) -> list[str]:
    return [ev.event for ev in advance.events]


# ---------------------------------------------------------------------------- failure rate
RATE = {"strategy": "failure_rate", "window_size": 10, "minimum_calls": 4}


def outcomes(e: Engine, pattern: str, start: int = 1) -> list[list[str]]:
    """Apply 'F'/'S' outcomes one ms apart; the event names of each."""
    op = {"F": "failure", "S": "success"}
    return [names(do(e, op[ch], start + i)) for i, ch in enumerate(pattern)]


def test_failure_rate_waits_for_minimum_calls() -> None:
    """Below minimum_calls even a 100% failure rate does not open the circuit."""
    e = make({**RATE, "failure_rate_threshold": 50.0})
    assert outcomes(e, "FFF") == [["failure"]] * 3
    assert state(e)["state"] == CLOSED
    assert outcomes(e, "F", 10)[-1] == ["failure", "circuit_opened", "state_change"]


def test_failure_rate_opens_at_the_threshold_not_below() -> None:
    """The circuit opens when the rate reaches failure_rate_threshold (>=), not before."""
    e = make({**RATE, "failure_rate_threshold": 50.0})
    assert outcomes(e, "SSSFF") == [["success"]] * 3 + [["failure"]] * 2  # 2/5 = 40%
    result = do(e, "failure", 10)  # 3/6 = 50%
    assert names(result) == ["failure", "circuit_opened", "state_change"]
    opened = result.events[1].data
    assert opened["reason"] == "failure_rate"  # the machine word; the sentence is in detail
    assert opened["detail"] == "Failure rate 50.0% >= 50%"


def test_failure_rate_ignores_consecutive_count() -> None:
    """Under failure_rate, max_attempts consecutive failures alone do not open it."""
    e = make({**RATE, "window_size": 100, "minimum_calls": 20, "max_attempts": 2})
    outcomes(e, "SSSSSSSSSSSSSSSFFF")
    assert state(e)["state"] == CLOSED


def test_sliding_window_evicts_old_outcomes() -> None:
    """Only the last window_size outcomes count: old failures age out of the rate."""
    e = make({**RATE, "window_size": 4, "minimum_calls": 4, "failure_rate_threshold": 100.0})
    outcomes(e, "FSSS")
    assert state(e)["failure_count"] == 1
    outcomes(e, "S", 10)  # evicts the F
    assert state(e)["failure_count"] == 0
    assert outcomes(e, "FFF", 20) == [["failure"]] * 3  # window S F F F = 75%
    assert outcomes(e, "F", 30)[0] == ["failure", "circuit_opened", "state_change"]


def test_failure_rate_window_starts_empty_after_close() -> None:
    """After open -> half-open -> closed the window starts over."""
    e = make({**RATE, "failure_rate_threshold": 50.0, "expiry_ms": 100})
    outcomes(e, "FFFF")
    assert state(e)["state"] == OPEN
    e.advance(104)
    do(e, "success", 105)
    assert state(e)["state"] == CLOSED and state(e)["failure_count"] == 0
    assert outcomes(e, "FFF", 200) == [["failure"]] * 3


# ---------------------------------------------------------------------------- configure
def test_configure_partial_update_keeps_other_fields() -> None:
    """configure changes only the named options of one connection."""
    e = make({"max_attempts": 7, "expiry_ms": 2_000, "success_threshold": 2})
    before = state(e)["policy"]
    result = do(e, "configure", 5, max_attempts=9)
    assert result.status == APPLIED and result.events == []
    after = state(e)["policy"]
    assert after == {**before, "max_attempts": 9}


def test_configure_metadata_kept_on_the_connection() -> None:
    """configure(metadata=...) replaces the connection's metadata, policy untouched."""
    e = make({"metadata": {"team": "a"}})
    do(e, "configure", 1, metadata={"team": "b"})
    assert state(e)["metadata"] == {"team": "b"}
    assert state(e)["policy"] == DEFAULT_POLICY.to_options()


def test_configure_lower_max_attempts_applies_to_next_failure() -> None:
    """Lowering max_attempts below the current count opens on the next failure."""
    e = make({"max_attempts": 5})
    outcomes(e, "FFF")
    do(e, "configure", 5, max_attempts=2)
    assert names(do(e, "failure", 6)) == ["failure", "circuit_opened", "state_change"]


def test_configure_defaults_changes_later_registrations_only() -> None:
    """configure with no connection changes the defaults for connections registered later."""
    e = make()
    result = do(e, "configure", 1, connection=None, max_attempts=2, expiry_ms=5_000)
    assert result.status == APPLIED and result.events == []
    assert e.defaults.max_attempts == 2 and e.defaults.expiry_ms == 5_000
    assert e.defaults.success_threshold == DEFAULT_POLICY.success_threshold
    assert state(e)["max_attempts"] == DEFAULT_POLICY.max_attempts
    do(e, "register", 2, connection="later")
    assert e.status(S, "later")["max_attempts"] == 2
    assert e.status(S, "later")["expiry_ms"] == 5_000
    do(e, "register", 3, connection="own", max_attempts=4)
    assert e.status(S, "own")["max_attempts"] == 4
    assert e.status(S, "own")["expiry_ms"] == 5_000


# ---------------------------------------------------------------------------- validation
NAN = float("nan")
BAD_VALUES: list[tuple[str, Any]] = [
    ("strategy", "sliding"),
    ("strategy", None),
    ("max_attempts", 0),
    ("max_attempts", -1),
    ("max_attempts", 1.5),
    ("max_attempts", True),
    ("max_attempts", "3"),
    ("max_attempts", None),
    ("max_attempts", 10**7),
    ("expiry_ms", 0),
    ("expiry_ms", -5),
    ("expiry_ms", 1.0),
    ("expiry_ms", None),
    ("expiry_ms", 2**60),
    ("backoff", "linear"),
    ("backoff", 2),
    ("backoff_factor", 0.5),
    ("backoff_factor", NAN),
    ("backoff_factor", math.inf),
    ("backoff_factor", "2"),
    ("backoff_factor", False),
    ("max_expiry_ms", 0),
    ("max_expiry_ms", 10),  # below the default expiry_ms
    ("max_expiry_ms", "x"),
    ("half_open_permits", 0),
    ("half_open_permits", 2.0),
    ("success_threshold", 0),
    ("success_threshold", -3),
    ("probe_timeout_ms", 0),
    ("probe_timeout_ms", None),
    ("inactive_ms", 0),
    ("inactive_ms", -1),
    ("window_size", 0),
    ("window_size", 10**6),
    ("minimum_calls", 0),
    ("minimum_calls", 101),  # above the default window_size
    ("failure_rate_threshold", 0),
    ("failure_rate_threshold", -1),
    ("failure_rate_threshold", 100.5),
    ("failure_rate_threshold", NAN),
    ("failure_rate_threshold", "50"),
    ("no_such_option", 1),
    ("slow_call_ms", 0),
    ("slow_call_ms", -5),
    ("slow_call_ms", 1.5),
    ("slow_call_ms", "100"),
    ("slow_call_rate_threshold", 0),
    ("slow_call_rate_threshold", 101),
    ("slow_call_rate_threshold", None),
    ("window_type", "sliding"),
    ("window_type", None),
    ("window_seconds", 0),
    ("window_seconds", 3_601),
    ("min_reporters", 0),
    ("min_reporters", 65),
    ("min_reporters", "2"),
]
BAD_POLICY_VALUES = list(BAD_VALUES)
BAD_VALUES += [("metadata", [1, 2]), ("metadata", "x"), ("metadata", {1: "x"})]
BAD_VALUES += [("mode", "paused"), ("mode", None), ("mode", 3)]
BAD_IDS = [f"{name}={value!r}" for name, value in BAD_VALUES]


@pytest.mark.parametrize(
    ("name", "value"), BAD_POLICY_VALUES, ids=BAD_IDS[: len(BAD_POLICY_VALUES)]
)
def test_bad_value_refused_by_policy(name: str, value: Any) -> None:
    """Policy.updated raises PolicyError naming the option."""
    with pytest.raises(PolicyError) as info:
        DEFAULT_POLICY.updated({name: value})
    assert info.value.field == name
    assert name in str(info.value)


@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=BAD_IDS)
def test_bad_value_refused_by_register(name: str, value: Any) -> None:
    """register with a bad option is INVALID, names the option, registers nothing."""
    e = Engine()
    result = do(e, "register", 1, **{name: value})
    assert result.status == INVALID and result.events == []
    assert result.error and name in result.error
    assert len(e) == 0
    with pytest.raises(PolicyError):
        e.register(S, C, 1, {name: value})
    assert len(e) == 0


@pytest.mark.parametrize(("name", "value"), BAD_VALUES, ids=BAD_IDS)
def test_bad_value_refused_by_configure(name: str, value: Any) -> None:
    """configure with a bad option is INVALID, names it, and changes nothing."""
    e = make({"metadata": {"k": "v"}})
    before = e.snapshot()
    for connection in (C, None):
        result = do(e, "configure", 1, connection=connection, **{name: value})
        assert result.status == INVALID and result.events == []
        assert result.error and name in result.error
    assert e.snapshot() == before


def test_consistency_error_names_the_option() -> None:
    """A combination that contradicts itself names the offending option."""
    e = make({"expiry_ms": 1_000, "max_expiry_ms": 2_000})
    result = do(e, "configure", 1, expiry_ms=5_000)
    assert result.status == INVALID and result.error and "max_expiry_ms" in result.error
    assert state(e)["expiry_ms"] == 1_000


@pytest.mark.parametrize("value", [0, -1, 1.5, "10", True])
def test_bad_open_expiry_refused(value: Any) -> None:
    """open with an invalid expiry_ms is INVALID, names expiry_ms, and leaves it closed."""
    e = make()
    result = do(e, "open", 1, expiry_ms=value)
    assert result.status == INVALID and result.error and "expiry_ms" in result.error
    assert state(e)["state"] == CLOSED and state(e)["seq"] == 2


def test_unknown_op_is_invalid() -> None:
    """An unknown op is refused as INVALID, naming the op, without events."""
    e = make()
    result = do(e, "explode", 1)
    assert result.status == INVALID and result.events == []
    assert result.error and "explode" in result.error


@pytest.mark.parametrize(
    "op", ["register", "unregister", "success", "failure", "open", "close", "reset"]
)
def test_missing_connection_is_invalid(op: str) -> None:
    """Every op but configure needs a connection: without one it is INVALID."""
    result = do(Engine(), op, 1, connection=None)
    assert result.status == INVALID and result.events == []
    assert result.error and op in result.error


@pytest.mark.parametrize(
    "op", ["unregister", "success", "failure", "open", "close", "reset", "configure"]
)
def test_unknown_connection_is_not_registered(op: str) -> None:
    """Commands on a connection nobody registered are NOT_REGISTERED, without events."""
    e = make()
    result = do(e, op, 1, connection="ghost")
    assert result.status == NOT_REGISTERED and result.events == []
    assert result.error and "ghost" in result.error
    result = do(e, op, 1, scope="other")  # same name, other scope
    assert result.status == NOT_REGISTERED


# ---------------------------------------------------------------------------- advance
def test_advance_returns_next_deadline_and_half_opens_exactly_at_open_until() -> None:
    """advance(open_until - 1) yields nothing; advance(open_until) half-opens."""
    e = Engine()
    assert e.advance(0).next_deadline is None
    e.register(S, C, 0, {"max_attempts": 1, "expiry_ms": 1_000, "inactive_ms": None})
    assert e.advance(1).next_deadline is None
    do(e, "failure", 10)
    early = e.advance(1_009)
    assert early.events == [] and early.next_deadline == 1_010
    assert state(e)["state"] == OPEN
    due = e.advance(1_010)
    assert [ev.event for ev in due.events] == ["expiry", "circuit_half_opened", "state_change"]
    assert due.next_deadline is None
    assert e.advance(1_011).events == []


def test_next_deadline_is_the_earliest_timer() -> None:
    """next_deadline is the soonest of expiries, lease timeouts and inactivity checks."""
    e = Engine()
    e.register(S, "a", 0, {"max_attempts": 1, "expiry_ms": 500, "inactive_ms": 10_000})
    e.register(S, "b", 0, {"max_attempts": 1, "expiry_ms": 300, "inactive_ms": None})
    assert e.next_deadline == 10_000
    do(e, "failure", 0, connection="a")
    assert e.advance(0).next_deadline == 500
    do(e, "failure", 0, connection="b")
    assert e.advance(0).next_deadline == 300
    e.advance(300)
    e.acquire_probe(S, "b", 300)  # lease times out at 300 + 30_000
    assert e.advance(300).next_deadline == 500


def test_late_advance_fires_with_its_own_now() -> None:
    """An advance called late fires what is due, stamped with the time it was called."""
    e = make({"max_attempts": 1, "expiry_ms": 100})
    trip(e, 0)
    events = e.advance(5_000).events
    assert {ev.timestamp for ev in events} == {5_000}


# ---------------------------------------------------------------------------- seq continuity
def test_reregistering_after_unregister_continues_seq() -> None:
    """seq never restarts: a connection registered again carries on from its last seq."""
    e = make()
    do(e, "failure", 1)
    last = do(e, "unregister", 2).events[-1]
    assert last.seq == 5
    again = do(e, "register", 3)
    assert [ev.seq for ev in again.events] == [6, 7]
    assert not {ev.id for ev in again.events} & {last.id}


def test_reregistering_after_cleanup_continues_seq() -> None:
    """After a cleanup, the next registration of the same name continues the seq too."""
    e = make({"inactive_ms": 100})
    removed = e.advance(100).events
    assert [ev.seq for ev in removed] == [3, 4]
    assert [ev.seq for ev in do(e, "register", 200).events] == [5, 6]


def test_seq_is_per_scope_and_connection() -> None:
    """Each (scope, connection) has its own seq, starting at 1."""
    e = make()
    other = do(e, "register", 1, scope="other")
    unscoped = do(e, "register", 1, scope=None)
    assert [ev.seq for ev in other.events] == [1, 2]
    assert [ev.seq for ev in unscoped.events] == [1, 2]
    assert do(e, "success", 2).events[0].seq == 3


# ---------------------------------------------------------------------------- snapshots
def busy_engine() -> tuple[Engine, int]:
    """An engine with connections in every state, leases, windows, held opens and removals."""
    e = Engine(lineage="snap")
    e.apply(Command("configure", None, options={"inactive_ms": 20_000}), 0)
    e.register(S, "closed", 0, {"metadata": {"team": "x"}})
    do(e, "failure", 1, connection="closed")
    e.register(S, "open", 0, {"max_attempts": 1, "expiry_ms": 4_000})
    do(e, "failure", 2, connection="open")
    e.register(None, "held", 0)
    do(e, "open", 3, connection="held", scope=None, expiry_ms=None)
    e.register(S, "half", 0, {**PROBE, "half_open_permits": 3, "success_threshold": 3})
    do(e, "failure", 4, connection="half")
    e.register(S, "rate", 0, {**RATE, "failure_rate_threshold": 60.0})
    outcomes_at(e, "rate", "FSFS", 5)
    e.register(S, "expo", 0, {**EXPO, "max_expiry_ms": 50_000})
    do(e, "failure", 6, connection="expo")
    e.register(S, "gone", 0)
    do(e, "unregister", 7, connection="gone")
    e.advance(1_006)  # half-opens "half" (at 1_004) and "expo" (at 1_006)
    do(e, "failure", 1_007, connection="expo")  # reopens for 2_000 (backoff level 1)
    e.acquire_probe(S, "half", 1_010)
    e.acquire_probe(S, "half", 1_020)
    do(e, "success", 1_030, connection="half")
    return e, 1_100


def outcomes_at(e: Engine, connection: str, pattern: str, start: int) -> None:
    op = {"F": "failure", "S": "success"}
    for i, ch in enumerate(pattern):
        do(e, op[ch], start + i, connection=connection)


def test_snapshot_restore_snapshot_is_equal() -> None:
    """snapshot -> restore -> snapshot gives the same snapshot, also through JSON."""
    e, _ = busy_engine()
    snap = e.snapshot()
    assert {c["connection"] for c in snap["connections"]} == {
        "closed",
        "open",
        "held",
        "half",
        "rate",
        "expo",
    }
    assert Engine.restore(snap).snapshot() == snap
    through_json = json.loads(json.dumps(snap))
    assert Engine.restore(through_json).snapshot() == snap


def test_restore_shares_one_policy_object_per_distinct_policy() -> None:
    """A restore validates each distinct policy once and shares it (restoring a million
    connections was mostly re-validating the same options): equal options give the same
    object, other options their own, and every connection keeps exactly its policy."""
    e = Engine()
    for i in range(30):
        e.register(S, f"c{i}", 0, {"max_attempts": 2 + i % 3})
    restored = Engine.restore(json.loads(json.dumps(e.snapshot())))
    by_attempts: dict[int, set[int]] = defaultdict(set)
    for c in restored._conns.values():
        by_attempts[c.policy.max_attempts].add(id(c.policy))
        assert c.policy.max_attempts == 2 + int(c.connection[1:]) % 3
    assert sorted(by_attempts) == [2, 3, 4]
    assert all(len(ids) == 1 for ids in by_attempts.values())
    assert restored.snapshot() == e.snapshot()


def test_scoped_snapshot_has_only_that_scope() -> None:
    """snapshot(scope) holds that scope's connections; scope None means the unscoped ones."""
    e, _ = busy_engine()
    assert {c["connection"] for c in e.snapshot(None)["connections"]} == {"held"}
    assert "held" not in {c["connection"] for c in e.snapshot(S)["connections"]}


def test_restore_refuses_unknown_version() -> None:
    """A snapshot of another format version is refused with ValueError."""
    e, _ = busy_engine()
    with pytest.raises(ValueError, match="version"):
        Engine.restore({**e.snapshot(), "v": 999})


Script = list[tuple[str, Any, int]]


def by_connection(events: list[Event]) -> dict[tuple[str | None, str], list[dict[str, Any]]]:
    """Events grouped per (scope, connection), in seq order (their contract order)."""
    grouped: dict[tuple[str | None, str], list[dict[str, Any]]] = defaultdict(list)
    for ev in events:
        grouped[(ev.scope, ev.connection)].append(ev.to_dict())
    return dict(grouped)


def play(e: Engine, script: Script) -> list[Any]:
    """Run a script of commands, advances and probes; everything observable it produced."""
    seen: list[Any] = []
    for kind, arg, now in script:
        if kind == "cmd":
            result = e.apply(arg, now)
            seen.append((result.status, by_connection(result.events)))
        elif kind == "advance":
            seen.append(by_connection(e.advance(now).events))
        else:
            seen.append(e.acquire_probe(*arg, now).to_dict())
    return seen


def follow_up_script() -> Script:
    """Commands and timers that touch every connection of busy_engine()."""
    return [
        ("probe", (S, "half"), 1_100),
        ("probe", (S, "half"), 1_101),
        ("probe", (S, "half"), 1_102),
        ("cmd", Command("success", "half", S), 1_103),  # 2 of 3 successes
        ("advance", None, 1_530),  # leases of 1_100.. time out at 1_600
        ("cmd", Command("failure", "closed", S), 1_540),
        ("advance", None, 1_700),
        ("probe", (S, "half"), 1_701),
        ("cmd", Command("failure", "half", S, options={"lease": "nope"}), 1_702),
        ("advance", None, 3_007),  # "expo" half-opens (1_007 + 2_000)
        ("cmd", Command("failure", "expo", S), 3_008),  # reopens for 4_000
        ("advance", None, 4_002),  # "open" half-opens
        ("cmd", Command("close", "held", None), 4_500),
        ("cmd", Command("register", "new", S, options={"max_attempts": 1}), 4_600),
        ("cmd", Command("failure", "new", S), 4_601),
        ("cmd", Command("register", "gone", S), 4_700),
        ("cmd", Command("configure", "rate", S, options={"inactive_ms": 1_000}), 4_800),
        ("advance", None, 7_008),
        ("advance", None, 23_000),
        ("advance", None, 30_000),
        ("advance", None, 80_000),
    ]


def test_restored_engine_behaves_the_same() -> None:
    """A restored engine answers a following script (timers included) exactly as the original."""
    original, _ = busy_engine()
    restored = Engine.restore(json.loads(json.dumps(original.snapshot())))
    script = follow_up_script()
    assert play(restored, script) == play(original, script)
    assert restored.snapshot() == original.snapshot()


def test_restored_engine_does_not_reissue_a_lease_in_use() -> None:
    """Lease ids handed out after a restore differ from the leases restored with it."""
    e = make({**PROBE, "half_open_permits": 2})
    t = half_open(e, 0)
    first = e.acquire_probe(S, C, t)
    restored = Engine.restore(e.snapshot())
    second = restored.acquire_probe(S, C, t + 1)
    assert second.granted and second.lease != first.lease
    assert not restored.acquire_probe(S, C, t + 2).granted
    assert restored.status(S, C)["permits_in_use"] == 2
    assert e.acquire_probe(S, C, t + 1).lease == second.lease


def test_restored_engine_cleans_up_like_the_original() -> None:
    """Inactivity timers survive a restore: cleanup happens at the same advance in both."""
    e = make({"inactive_ms": 1_000})
    do(e, "open", 0, expiry_ms=None)
    e.advance(1_500)  # inactivity check while open
    restored = Engine.restore(e.snapshot())
    for engine in (e, restored):
        do(engine, "close", 1_600)
    for now in (1_700, 2_599, 2_600):
        assert names_of(restored.advance(now)) == names_of(e.advance(now)), now
    assert (S, C) not in e and (S, C) not in restored


def test_policy_objects_are_shared() -> None:
    """Connections registered with the same options share one interned Policy object."""
    e = Engine()
    e.register(S, "a", 0, {"max_attempts": 3})
    e.register(S, "b", 0, {"max_attempts": 3})
    assert e.snapshot()["connections"][0]["policy"] == e.snapshot()["connections"][1]["policy"]
    p1 = DEFAULT_POLICY.updated({"max_attempts": 3})
    assert p1 is DEFAULT_POLICY.updated({"max_attempts": 3})
    assert isinstance(p1, Policy)
