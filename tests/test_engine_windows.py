"""Windows of the failure-rate strategy (issue 15, parts 1-3): the time window, the
slow-call rate and the quorum of reporters, checked against a brute-force reference
that keeps every call, over random outcome sequences and clocks (backwards included),
with a standby restored from a snapshot part-way that must answer the same; and the
time window's own rules, one table row each; and a takeover through the journal."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from brama_mq.core import APPLIED, CLOSED, OPEN, Command, Engine, Result
from brama_mq.core.window import MAX_LISTED, CountWindow, TimeWindow
from brama_mq.owner.journal import AppliedIds, JournalBatch, replay

S = "svc"
C = "api"
T0 = 1_700_000_000_000  # a second boundary


# ---------------------------------------------------------------------------- reference
@dataclass
class Call:
    second: int
    failed: bool
    slow: bool
    reporter: str | None


@dataclass
class Reference:
    """Every call since the window last emptied; the window is recomputed from them."""

    policy: dict[str, Any]
    calls: list[Call] = field(default_factory=list)
    last: int | None = None  # newest second seen (an earlier ``now`` counts there)

    def clear(self) -> None:
        self.calls.clear()
        self.last = None

    def add(self, now: int, failed: bool, slow: bool, reporter: str | None, n: int) -> None:
        second = now // 1000 if self.last is None else max(now // 1000, self.last)
        self.last = second
        self.calls.extend(Call(second, failed, slow, reporter) for _ in range(n))

    def window(self, now: int | None = None) -> list[Call]:
        p = self.policy
        if p["window_type"] == "count":
            return self.calls[-p["window_size"] :] if p["window_size"] else []
        if self.last is None:
            return []
        newest = self.last if now is None else max(now // 1000, self.last)
        return [c for c in self.calls if newest - c.second < p["window_seconds"]]

    def rates(self, now: int | None = None) -> tuple[float | None, float | None]:
        w = self.window(now)
        if not w:
            return None, None
        fails = sum(c.failed for c in w)
        slows = sum(c.slow for c in w)
        slow_rate = None if self.policy["slow_call_ms"] is None else round(100 * slows / len(w), 2)
        return round(100 * fails / len(w), 2), slow_rate

    @staticmethod
    def reporters(calls: list[Call]) -> list[str | None]:
        """Distinct reporters, ordered by their latest call."""
        order: dict[str | None, int] = {}
        for i, c in enumerate(calls):
            order.pop(c.reporter, None)
            order[c.reporter] = i
        return list(order)

    def trip(self, failed: bool, slow: bool) -> tuple[str, list[str | None]] | None:
        p = self.policy
        w = self.window()
        minimum = p["minimum_calls"] if p["minimum_calls"] is not None else p["window_size"]
        if len(w) < minimum:
            return None
        for kind, hit, limit in (
            ("failure_rate", failed, p["failure_rate_threshold"]),
            ("slow_call_rate", slow, p["slow_call_rate_threshold"]),
        ):
            if not hit:
                continue
            counted = [c for c in w if (c.failed if kind == "failure_rate" else c.slow)]
            if 100.0 * len(counted) / len(w) < limit:
                continue
            who = self.reporters(counted)
            if p["min_reporters"] == 1 or len(who) >= p["min_reporters"]:
                return kind, who
        return None


# ---------------------------------------------------------------------------- hypothesis
policies = st.fixed_dictionaries(
    {
        "strategy": st.just("failure_rate"),
        "window_type": st.sampled_from(["count", "time"]),
        "window_size": st.integers(1, 6),
        "window_seconds": st.integers(1, 4),
        "minimum_calls": st.none() | st.integers(1, 6),
        "failure_rate_threshold": st.sampled_from([20.0, 50.0, 100.0]),
        "slow_call_ms": st.sampled_from([None, 100, 100]),
        "slow_call_rate_threshold": st.sampled_from([34.0, 50.0, 100.0]),
        "min_reporters": st.integers(1, 3),
        "expiry_ms": st.just(60_000),
        "inactive_ms": st.none(),
    }
).map(
    lambda p: {**p, "minimum_calls": None if p["minimum_calls"] is None
               else min(p["minimum_calls"], p["window_size"])}
    if p["window_type"] == "count" else p
)
steps = st.lists(
    st.tuples(
        st.sampled_from([0, 0, 1, 200, 999, 1_000, 1_001, 2_500, 5_000, -300, -1_500]),
        st.booleans(),  # ok
        st.sampled_from([None, 50, 150, 150]),  # duration_ms (slow_call_ms is 100)
        st.sampled_from([None, "a", "b", "c", "d"]),  # reporter
        st.sampled_from([1, 1, 1, 2, 3]),  # count (successes only)
        st.integers(-500, 4_000),  # a status read this long after the call
    ),
    max_size=60,
)


def outcome(e: Engine, now: int, ok: bool, duration: Any, reporter: Any, n: int) -> Result:
    options: dict[str, Any] = {}
    if duration is not None:
        options["duration_ms"] = duration
    if reporter is not None:
        options["reporter"] = reporter
    if ok and n != 1:
        options["count"] = n
    result = e.apply(Command("success" if ok else "failure", C, S, options=options), now)
    assert result.status == APPLIED, result.error
    return result


def observed(result: Result) -> list[dict[str, Any]]:
    return [ev.to_dict() for ev in result.events]


@settings(max_examples=1_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies, steps, st.integers(0, 60))
def test_windows_slow_calls_and_quorum_match_the_reference(
    policy: dict[str, Any], script: list[Any], cut: int
) -> None:
    """After every call: the rates in its event, whether it opened the circuit and why,
    the reporters named, and the status rates at a later ``now`` are the reference's;
    a standby restored from a JSON snapshot at step ``cut`` says exactly the same."""
    e = Engine(lineage="ref")
    assert e.register(S, C, 0, policy).status == APPLIED
    ref = Reference(policy)
    shadow: Engine | None = None
    now = T0
    for i, (dt, ok, duration, reporter, n, later) in enumerate(script):
        if i == cut:
            shadow = Engine.restore(json.loads(json.dumps(e.snapshot())))
        now = max(0, now + dt)
        n = n if ok else 1
        slow = policy["slow_call_ms"] is not None and duration is not None and duration > 100
        ref.add(now, not ok, slow, reporter, n)
        expected = ref.trip(not ok, slow) if (not ok or slow) else None
        result = outcome(e, now, ok, duration, reporter, n)
        if shadow is not None:
            assert observed(outcome(shadow, now, ok, duration, reporter, n)) == observed(result)
        data = result.events[0].data
        assert (data["failure_rate"], data["slow_call_rate"]) == ref.rates()
        assert data.get("slow", False) is slow
        names = [ev.event for ev in result.events]
        if expected is None:
            assert names == [names[0]], (i, ref.window())
        else:
            assert names[1:] == ["circuit_opened", "state_change"], (i, ref.window())
            opened = result.events[1].data
            reason, who = expected
            assert opened["reason"] == reason
            event(f"opened: {reason}, {policy['window_type']}, quorum {policy['min_reporters']}")
            named = [r for r in who if r is not None]
            if named:
                assert opened["reporters"] == named[-MAX_LISTED:]
            if "reporters" in opened:
                assert opened["reporters"] == named[-MAX_LISTED:]
            if policy["min_reporters"] > 1:
                assert opened["reporter_count"] == len(who)
            for engine in (e, shadow):
                if engine is not None:
                    assert engine.apply(Command("close", C, S), now).status == APPLIED
            ref.clear()
            continue
        status = e.status(S, C, now + later)
        assert (status["failure_rate"], status["slow_call_rate"]) == ref.rates(now + later)
        if policy["window_type"] == "time":
            assert status["failure_count"] == sum(c.failed for c in ref.window(now + later))
        assert e.status(S, C)["state"] == CLOSED
    if shadow is not None:
        assert shadow.snapshot() == e.snapshot()


# ---------------------------------------------------------------------------- time window rows
TIME: dict[str, Any] = {
    "strategy": "failure_rate",
    "window_type": "time",
    "window_seconds": 2,
    "minimum_calls": 2,
    "failure_rate_threshold": 50.0,
    "expiry_ms": 1_000,
}


def make(options: dict[str, Any], now: int = T0) -> Engine:
    e = Engine(lineage="win")
    assert e.register(S, C, now, options).status == APPLIED
    return e


def do(e: Engine, op: str, now: int, **options: Any) -> Result:
    result = e.apply(Command(op, C, S, options=options), now)
    assert result.status == APPLIED, result.error
    return result


@dataclass(frozen=True)
class Row:
    rule: str
    calls: list[tuple[int, str]]  # (ms after T0, "S"/"F")
    state: str
    rate: float | None  # failure_rate of the last call's event
    options: dict[str, Any] = field(default_factory=dict)


ROWS = [
    Row("calls of one second add up", [(0, "F"), (999, "F")], OPEN, 100.0),
    Row("the window spans window_seconds seconds", [(0, "F"), (1_999, "F")], OPEN, 100.0),
    Row("a second falls out once window_seconds have passed", [(0, "F"), (2_000, "F")],
        CLOSED, 100.0),
    Row("old failures leave, fresh successes stay", [(0, "F"), (0, "F"), (0, "S"),
                                                     (3_000, "S"), (3_500, "F")], CLOSED, 50.0,
        {"failure_rate_threshold": 60.0, "minimum_calls": 4}),
    Row("the rate is over the calls of the window only", [(0, "S"), (0, "S"), (0, "S"),
                                                          (2_500, "F"), (2_600, "F")],
        OPEN, 100.0),
    Row("minimum_calls may exceed window_size in a time window",
        [(i * 10, "F") for i in range(149)], CLOSED, 100.0,
        {"minimum_calls": 150, "window_size": 100}),
    Row("and counts every call of the window", [(i * 10, "F") for i in range(150)], OPEN, 100.0,
        {"minimum_calls": 150, "window_size": 100}),
    Row("an earlier now counts in the newest second", [(5_000, "F"), (1_000, "F")], OPEN,
        100.0),
    Row("a batch of successes is that many calls",
        [(0, "F"), (0, "S3"), (10, "F")], CLOSED, 40.0),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.rule for r in ROWS])
def test_time_window_rules(row: Row) -> None:
    e = make({**TIME, **row.options})
    result = None
    for at, what in row.calls:
        if what.startswith("S"):
            count = int(what[1:] or 1)
            result = do(e, "success", T0 + at, **({"count": count} if count > 1 else {}))
        else:
            result = do(e, "failure", T0 + at)
    assert result is not None
    assert result.events[0].data["failure_rate"] == row.rate
    assert e.status(S, C)["state"] == row.state


def test_status_reads_a_time_window_at_its_now_without_changing_it() -> None:
    """status(now) ages the seconds out for the answer only: the snapshot is the same."""
    e = make({**TIME, "window_seconds": 3, "minimum_calls": 10})
    do(e, "failure", T0)
    do(e, "success", T0 + 1_000)
    before = e.snapshot()
    assert e.status(S, C, T0 + 1_500)["failure_rate"] == 50.0
    assert e.status(S, C, T0 + 3_000)["failure_rate"] == 0.0  # the failure's second left
    later = e.status(S, C, T0 + 4_000)
    assert (later["failure_rate"], later["failure_count"]) == (None, 0)
    assert e.status(S, C)["failure_rate"] == 50.0  # no now: as of the newest call
    assert e.snapshot() == before


def test_time_window_memory_is_bounded_by_window_seconds() -> None:
    """A call every 100 ms for ten minutes keeps at most window_seconds buckets."""
    e = make({**TIME, "window_seconds": 30, "minimum_calls": 10_000})
    for i in range(6_000):
        do(e, "success" if i % 3 else "failure", T0 + i * 100)
    (conn,) = e.snapshot()["connections"]
    assert len(conn["buckets"]) == 30 and conn["window"] is None and "mode" not in conn
    assert sum(b[1] for b in conn["buckets"]) == 300
    window = e._conns[(S, C)].window
    assert isinstance(window, TimeWindow) and len(window.buckets) == 30


def test_windows_are_allocated_only_for_the_strategy_that_uses_them() -> None:
    """consecutive: no window; failure_rate: a count or a time window, as configured."""
    e = Engine()
    e.register(S, "plain", 0)
    e.register(S, "count", 0, {"strategy": "failure_rate"})
    e.register(S, "time", 0, {"strategy": "failure_rate", "window_type": "time"})
    e.register(S, "unused", 0, {"window_type": "time"})  # consecutive: ignored
    kinds = {c.connection: type(c.window) for c in e._conns.values()}
    assert kinds == {"plain": type(None), "count": CountWindow, "time": TimeWindow,
                     "unused": type(None)}


def test_configure_of_the_window_starts_it_over_and_nothing_else_does() -> None:
    """Changing the window type or size empties the window; another option keeps it."""
    e = make({**TIME, "minimum_calls": 100})
    do(e, "failure", T0)
    do(e, "configure", T0 + 1, failure_rate_threshold=90.0)
    assert e.status(S, C)["failure_count"] == 1
    do(e, "configure", T0 + 2, window_seconds=5)
    assert e.status(S, C)["failure_count"] == 0 and e.status(S, C)["failure_rate"] is None
    do(e, "failure", T0 + 3)
    do(e, "configure", T0 + 4, window_type="count")
    status = e.status(S, C)
    assert status["failure_count"] == 0 and status["policy"]["window_type"] == "count"


def test_time_window_empties_when_the_circuit_opens_and_closes() -> None:
    e = make(TIME)
    do(e, "failure", T0)
    do(e, "failure", T0 + 10)
    assert e.status(S, C)["state"] == OPEN
    (conn,) = e.snapshot()["connections"]
    assert conn["buckets"] == []
    e.advance(T0 + 1_010)
    do(e, "success", T0 + 1_020)
    assert e.status(S, C)["state"] == CLOSED
    assert do(e, "failure", T0 + 1_030).events[0].data["failure_rate"] == 100.0


@pytest.mark.parametrize("bad", [0, -1, 3_601, 1.5, "60", None])
def test_bad_window_seconds_is_refused(bad: Any) -> None:
    e = Engine()
    result = e.apply(Command("register", C, S, options={"window_seconds": bad}), 0)
    assert result.status == "invalid" and "window_seconds" in (result.error or "")


@pytest.mark.parametrize("bad", ["sliding", "", None, 1])
def test_bad_window_type_is_refused(bad: Any) -> None:
    e = Engine()
    result = e.apply(Command("register", C, S, options={"window_type": bad}), 0)
    assert result.status == "invalid" and "window_type" in (result.error or "")


# ---------------------------------------------------------------------------- takeover
def _journaled_run(policy: dict[str, Any]) -> tuple[Engine, list[JournalBatch]]:
    """An owner's run: every command journaled, 4 per batch, with advances between."""
    e = Engine(lineage="jr")
    batches: list[JournalBatch] = []
    now = T0
    commands: list[tuple[int, dict[str, Any]]] = [
        (0, {"op": "register", "connection": C, "scope": S, "options": policy})]
    pattern = "FSFFSSFSSFFFSSSF"
    for i, ch in enumerate(pattern * 3):
        options: dict[str, Any] = {"reporter": f"w{i % 3}", "duration_ms": 40 + 70 * (i % 4)}
        commands.append((317 * (i % 5), {"op": "success" if ch == "S" else "failure",
                                          "connection": C, "scope": S, "options": options}))
    for i, (dt, doc) in enumerate(commands):
        if i % 4 == 0:
            batches.append(JournalBatch("jr", len(batches) + 1))
        now += dt
        doc = {**doc, "id": f"id{i}"}
        e.apply(Command(doc["op"], doc["connection"], doc["scope"], None, doc["options"]), now)
        batches[-1].command(now, doc)
        if i % 7 == 3:
            e.advance(now)
            batches[-1].advance(now)
    return e, batches


@pytest.mark.parametrize("window_type", ["time", "count"])
@pytest.mark.parametrize("cut", [0, 2, 5, 9])
def test_takeover_keeps_the_window_reporters_and_mode(window_type: str, cut: int) -> None:
    """A standby restoring the snapshot taken after batch ``cut`` and replaying the
    journal after it ends equal to the owner: windows (buckets), reporters, mode."""
    policy = {"strategy": "failure_rate", "window_type": window_type, "window_seconds": 3,
              "window_size": 6, "minimum_calls": 5, "failure_rate_threshold": 80.0,
              "slow_call_ms": 100, "slow_call_rate_threshold": 60.0, "min_reporters": 2,
              "expiry_ms": 2_000}
    owner, batches = _journaled_run(policy)
    early = Engine(lineage="jr")
    for batch in batches[:cut]:
        replay(early, JournalBatch.decode(batch.encode()))
    standby = Engine.restore(json.loads(json.dumps(early.snapshot())))
    applied = AppliedIds()
    for batch in batches[cut:]:
        replay(standby, JournalBatch.decode(batch.encode()), applied)
    assert standby.snapshot() == owner.snapshot()
    (conn,) = owner.snapshot()["connections"]
    assert conn["policy"]["window_type"] == window_type
    # and both go on the same from here, the mode too
    for engine in (owner, standby):
        engine.apply(Command("configure", C, S, options={"mode": "metrics_only"}), T0 + 99_000)
    later = [("failure", {"reporter": "x"}), ("success", {"duration_ms": 500}),
             ("failure", {"reporter": "y", "duration_ms": 1})] * 4
    for i, (op, options) in enumerate(later):
        a = owner.apply(Command(op, C, S, options=options), T0 + 99_100 + i)
        b = standby.apply(Command(op, C, S, options=options), T0 + 99_100 + i)
        assert [ev.to_dict() for ev in a.events] == [ev.to_dict() for ev in b.events]
    assert standby.snapshot() == owner.snapshot()
