"""When an outcome opens a circuit: slow calls, rates, the quorum of reporters.

Apart from the engine so the rules read in one place and the engine module stays a
state machine: this counts, the engine decides what to emit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from brama_mq.core.events import REASON_FAILURE_RATE, REASON_SLOW_CALL_RATE
from brama_mq.core.policy import Policy, check_duration, check_reporter
from brama_mq.core.record import Conn
from brama_mq.core.window import FAILED, SLOW, Reporters, percent

#: What an automatic opening says: (reason, detail or None, the reporters that counted).
Trip = tuple[str, "str | None", "dict[str | None, int] | None"]
#: ``data.reason`` of an opening by the consecutive rule (Brama's own words).
THRESHOLD_EXCEEDED: Final = "Threshold exceeded"


def is_slow(policy: Policy, duration_ms: float | None) -> bool:
    """Slower than ``slow_call_ms`` (strictly, as Resilience4j); never without both."""
    limit = policy.slow_call_ms
    return limit is not None and duration_ms is not None and duration_ms > limit


def quorum(policy: Policy, book: dict[str | None, int] | None) -> bool:
    """Whether the failures that count came from at least ``min_reporters`` reporters."""
    need = policy.min_reporters
    return need == 1 or (book is not None and len(book) >= need)


def rate_trip(
    policy: Policy, flags: int, calls: int, failures: int, slow: int, reps: Reporters | None
) -> Trip | None:
    """The opening a windowed outcome calls for, if any: a failure is held against the
    failure-rate rule, a slow call against the slow-call rule (a call that raises
    neither rate opens nothing, as a success never did)."""
    if calls < policy.effective_minimum_calls:
        return None
    if flags & FAILED:
        rate = 100.0 * failures / calls
        limit = policy.failure_rate_threshold
        book = None if reps is None else reps.failed
        if rate >= limit and quorum(policy, book):
            return REASON_FAILURE_RATE, f"Failure rate {rate:.1f}% >= {limit:g}%", book
    if flags & SLOW:
        rate = 100.0 * slow / calls
        limit = policy.slow_call_rate_threshold
        book = None if reps is None else reps.slow
        if rate >= limit and quorum(policy, book):
            return REASON_SLOW_CALL_RATE, f"Slow-call rate {rate:.1f}% >= {limit:g}%", book
    return None


def outcome_options(options: Mapping[str, Any]) -> tuple[float | None, str | None]:
    """``duration_ms`` and ``reporter`` of a success/failure, checked (PolicyError)."""
    duration = options.get("duration_ms")
    reporter = options.get("reporter")
    return (
        None if duration is None else check_duration(duration),
        None if reporter is None else check_reporter(reporter),
    )


def count_outcome(c: Conn, now: int, flags: int, n: int, reporter: str | None) -> Trip | None:
    """Count ``n`` calls with ``flags`` (FAILED, SLOW) of closed ``c``; the opening they
    call for, if any (the engine applies the mode)."""
    policy = c.policy
    window = c.window
    reps = c.reporters
    track = reps is not None or reporter is not None or policy.min_reporters > 1
    if window is None:  # consecutive: the failures since the last success count
        if not flags & FAILED:
            c.failure_count = 0
            c.reporters = None
            return None
        c.failure_count += 1
        if track:
            if reps is None:
                reps = c.reporters = Reporters()
            Reporters.note(reps.failed, reporter, c.failure_count)
        book = None if reps is None else reps.failed
        if c.failure_count >= policy.max_attempts and quorum(policy, book):
            return THRESHOLD_EXCEEDED, None, book
        return None
    window.add(now, flags, n)
    c.failure_count = window.failures
    if flags and track:
        if reps is None:
            reps = c.reporters = Reporters()
        position = window.position
        if flags & FAILED:
            Reporters.note(reps.failed, reporter, position)
        if flags & SLOW:
            Reporters.note(reps.slow, reporter, position)
    if reps is not None:
        reps.prune(window.cutoff)
        if reps.empty:
            c.reporters = reps = None
    if not flags:
        return None
    return rate_trip(policy, flags, window.calls, window.failures, window.slow, reps)


def with_rates(c: Conn, extra: dict[str, Any] | None) -> dict[str, Any] | None:
    """``extra`` plus the window's rates (percent; None: no calls, or slow calls not
    measured), for the success and failure events of a connection with a window."""
    window = c.window
    if window is None:
        return extra
    out = dict(extra) if extra else {}
    calls, failures, slow = window.calls, window.failures, window.slow
    out["failure_rate"] = percent(failures, calls)
    out["slow_call_rate"] = None if c.policy.slow_call_ms is None else percent(slow, calls)
    return out
