"""One connection's record in the engine, and its snapshot form.

Apart from the engine (core/engine.py) so the state machine reads without the
bookkeeping of what a snapshot holds. Snapshots written before slow calls, time
windows, reporters and modes restore: a field they lack takes its default.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any, Final

from brama_mq.core.events import CLOSED, OPEN
from brama_mq.core.policy import COUNT, DEFAULT_POLICY, MODES, NORMAL, TIME, Policy
from brama_mq.core.window import (
    CountWindow,
    Reporters,
    TimeWindow,
    Window,
    new_window,
    percent,
)

Key = tuple[str | None, str]


class Conn:
    """One registered connection. Slots keep an idle one to a few hundred bytes."""

    __slots__ = (
        "connection",
        "failure_count",
        "held",
        "id_base",
        "key",
        "last_activity",
        "last_failure",
        "last_success",
        "leases",
        "metadata",
        "mode",
        "open_until",
        "opened_at",
        "policy",
        "probe_successes",
        "registered_at",
        "reopen_level",
        "reporters",
        "scope",
        "seq",
        "state",
        "timer_gen",
        "window",
    )

    def __init__(self, key: Key, policy: Policy, now: int, seq: int, id_base: str) -> None:
        self.key = key
        self.scope, self.connection = key
        self.policy = policy
        self.state = CLOSED
        self.mode = NORMAL
        self.failure_count = 0
        self.window: Window | None = None
        #: Who reported the failures that count; None until a report names a reporter
        #: (or the policy asks for a quorum), so most connections never allocate one.
        self.reporters: Reporters | None = None
        self.probe_successes = 0
        self.reopen_level = 0
        self.opened_at: int | None = None
        self.open_until: int | None = None
        self.held = False
        self.leases: dict[str, int] | None = None
        self.registered_at = now
        self.last_activity = now
        self.last_success: int | None = None
        self.last_failure: int | None = None
        self.metadata: dict[str, Any] | None = None
        self.seq = seq
        self.timer_gen = 0
        self.id_base = id_base


def status_row(c: Conn, now: int | None, epoch: int) -> dict[str, Any]:
    """One connection's status row (``Engine.status``): ``now`` None reads a time window
    as of its newest call."""
    policy = c.policy
    left = None
    if c.state == OPEN and c.open_until is not None and now is not None:
        left = max(0, c.open_until - now)
    failure_count = c.failure_count
    failure_rate = slow_rate = None
    window = c.window
    if window is not None:
        calls, failures, slow = window.totals(now)
        failure_rate = percent(failures, calls)
        if policy.slow_call_ms is not None:
            slow_rate = percent(slow, calls)
        if c.state == CLOSED and isinstance(window, TimeWindow):
            failure_count = failures  # as of ``now``: older seconds have left
    return {
        "scope": c.scope,
        "connection": c.connection,
        "state": c.state,
        "mode": c.mode,
        "failure_count": failure_count,
        "failure_rate": failure_rate,
        "slow_call_rate": slow_rate,
        "max_attempts": policy.max_attempts,
        "expiry_ms": policy.expiry_ms,
        "opened_at": c.opened_at,
        "open_until": c.open_until,
        "open_ms_left": left,
        "held_open": c.held,
        "reopen_level": c.reopen_level,
        "probe_successes": c.probe_successes,
        "permits_in_use": len(c.leases) if c.leases else 0,
        "registered_at": c.registered_at,
        "last_activity": c.last_activity,
        "last_success_time": c.last_success,
        "last_failure_time": c.last_failure,
        "metadata": c.metadata or {},
        "policy": policy.to_options(),
        "seq": c.seq,
        "epoch": epoch,
    }


_DUMPED_FIELDS: Final = (
    "state",
    "failure_count",
    "probe_successes",
    "reopen_level",
    "opened_at",
    "open_until",
    "held",
    "registered_at",
    "last_activity",
    "last_success",
    "last_failure",
    "metadata",
    "seq",
    "timer_gen",
    "id_base",
)


_GET_DUMPED: Final = operator.itemgetter(*_DUMPED_FIELDS)


def dump_conn(c: Conn) -> dict[str, Any]:
    """The JSON-ready form of one connection (``Engine.snapshot``'s ``connections``)."""
    out = {name: getattr(c, name) for name in _DUMPED_FIELDS}
    out["scope"] = c.scope
    out["connection"] = c.connection
    out["policy"] = c.policy.to_options()
    out["leases"] = dict(c.leases) if c.leases else {}
    # "window": a count window's calls (0 success, 1 failed, +2 slow), as before. The
    # newer fields are written only when they differ from what their absence means, so
    # a registry that does not use them snapshots as it did (a snapshot part holds at
    # most so many bytes): "window_pos" (a count window's position for reporters, when
    # not its length), "buckets" (a time window's seconds), "reporters", "mode".
    window = c.window
    if isinstance(window, CountWindow):
        out["window"] = window.dump()
        if window.total != len(window.entries):
            out["window_pos"] = window.total
    else:
        out["window"] = None
        if isinstance(window, TimeWindow):
            out["buckets"] = window.dump()
    if c.reporters is not None:
        out["reporters"] = c.reporters.dump()
    if c.mode != NORMAL:
        out["mode"] = c.mode
    return out


def load_conn(item: Mapping[str, Any], policies: dict[Any, Policy]) -> Conn:
    """A connection from :func:`dump_conn`'s form (or an older one: missing = default)."""
    options = item["policy"]
    try:  # validating the options is 80% of a restore: once per distinct policy
        key: Any = tuple(sorted(options.items()))
        policy = policies.get(key)
    except TypeError:  # an unhashable option value: no sharing for this one
        key, policy = None, None
    if policy is None:
        policy = DEFAULT_POLICY.updated(options)
        if key is not None and len(policies) < 10_000:
            policies[key] = policy
    c = Conn((item["scope"], item["connection"]), policy, item["registered_at"], 0, "")
    (  # the order of _DUMPED_FIELDS; one itemgetter call instead of 15 setattr calls
        c.state, c.failure_count, c.probe_successes, c.reopen_level, c.opened_at,
        c.open_until, c.held, c.registered_at, c.last_activity, c.last_success,
        c.last_failure, c.metadata, c.seq, c.timer_gen, c.id_base,
    ) = _GET_DUMPED(item)
    c.leases = dict(item["leases"]) or None
    entries = item.get("window")
    buckets = item.get("buckets")
    if entries is not None and policy.window_type == COUNT:
        c.window = CountWindow(policy.window_size, entries, item.get("window_pos"))
    elif buckets is not None and policy.window_type == TIME:
        c.window = TimeWindow(policy.window_seconds, buckets)
    else:
        c.window = new_window(policy)
    c.reporters = Reporters.load(item.get("reporters"))
    mode = item.get("mode", NORMAL)
    c.mode = MODES[MODES.index(mode)]  # the interned constant
    return c
