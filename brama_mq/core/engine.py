"""The breaker engine: every connection's state machine, driven by ``(command, now)``.

Sans-I/O on purpose (the h11 way): it never reads a clock, sleeps or talks to a broker.
The owner feeds it commands and the current time and publishes what it returns; tests
drive it directly with made-up times. ``now`` is always epoch milliseconds.

Timers (open-circuit expiry, probe-lease timeouts, inactivity) live in one heap whose
entries are invalidated lazily, so ``advance()`` costs O(1) when nothing is due and a
success never touches the heap. Windows and reporters are in core/window.py, the
connection record and its snapshot form in core/record.py.

Operating modes sit above the state machine: ``forced_open`` holds the circuit open,
``disabled`` and ``metrics_only`` keep it closed (``metrics_only`` still says, in
``data.would_open``, when a rule would have opened it); every change of mode is one
``state_change`` with reason ``mode``.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

from brama_mq.core import events as ev
from brama_mq.core.events import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    REASON_MODE,
    REASON_SLOW_CALL_RATE,
    Event,
)
from brama_mq.core.policy import (
    DEFAULT_POLICY,
    FAILURE_RATE,
    FORCED_OPEN,
    METRICS_ONLY,
    NORMAL,
    Policy,
    check_metadata,
    check_mode,
)
from brama_mq.core.record import Conn, Key, dump_conn, load_conn, status_row
from brama_mq.core.results import (
    ALREADY_REGISTERED,
    APPLIED,
    INVALID,
    NOT_REGISTERED,
    Advance,
    Command,
    CommandLike,
    Probe,
    Result,
)
from brama_mq.core.rules import count_outcome, is_slow, outcome_options, with_rates
from brama_mq.core.window import (
    FAILED,
    SLOW,
    listed,
    new_window,
    same_window,
)
from brama_mq.errors import PolicyError

__all__ = [
    "ALREADY_REGISTERED",
    "APPLIED",
    "INVALID",
    "MAX_SUCCESS_COUNT",
    "NOT_REGISTERED",
    "Advance",
    "Command",
    "CommandLike",
    "Engine",
    "Key",
    "Probe",
    "Result",
]

#: Largest ``count`` of one batched success report.
MAX_SUCCESS_COUNT: Final = 1_000_000

# Timer kinds.
_EXPIRE: Final = 0
_LEASE: Final = 1
_IDLE: Final = 2

_SNAPSHOT_VERSION: Final = 1
_UNSET: Any = object()


class Engine:
    """Runs every breaker of one owner. Not thread-safe: one owner thread drives it."""

    def __init__(self, *, defaults: Policy = DEFAULT_POLICY, lineage: str = "brama") -> None:
        self.defaults = defaults
        self.lineage = lineage
        self._conns: dict[Key, Conn] = {}
        self._last_seq: dict[Key, int] = {}  # seq of removed connections, so it never restarts
        self._timers: list[tuple[int, int, int, Conn, int]] = []
        self._order = itertools.count()
        self._next_lease = 1  # in snapshots, so a restored engine never reissues a lease id
        #: Stamped on every event; the owner sets it at a takeover (see core/ordering.py).
        self.epoch = 0
        self._ops: dict[str, Callable[[CommandLike, int], Result]] = {
            "register": self._cmd_register,
            "unregister": self._cmd_unregister,
            "success": self._cmd_success,
            "failure": self._cmd_failure,
            "open": self._cmd_open,
            "close": self._cmd_close,
            "reset": self._cmd_reset,
            "configure": self._cmd_configure,
        }

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._conns)

    def __contains__(self, key: object) -> bool:
        return key in self._conns

    def keys(self) -> list[Key]:
        return list(self._conns)

    @property
    def next_deadline(self) -> int | None:
        return self._timers[0][0] if self._timers else None

    def status(self, scope: str | None, connection: str, now: int | None = None) -> dict[str, Any]:
        """Everything known about one connection; raises KeyError when it is not registered."""
        return self._status(self._conns[(scope, connection)], now)

    def statuses(self, scope: Any = _UNSET, now: int | None = None) -> list[dict[str, Any]]:
        """Status of every connection, or of one scope's (``scope=None``: the unscoped ones)."""
        conns = self._conns.values()
        return [self._status(c, now) for c in conns if scope is _UNSET or c.scope == scope]

    def available(self, scope: str | None, connection: str) -> bool:
        """Brama's ``available?``: closed, or half-open (a probe may be granted)."""
        return self._conns[(scope, connection)].state != OPEN

    def _status(self, c: Conn, now: int | None) -> dict[str, Any]:
        return status_row(c, now, self.epoch)

    # ------------------------------------------------------------------ commands
    def apply(self, command: CommandLike, now: int) -> Result:
        """Apply one command; a refused one returns a non-applied Result, never raises."""
        handler = self._ops.get(command.op)
        if handler is None:
            return Result(INVALID, [], f"unknown op {command.op!r}; valid: {', '.join(self._ops)}")
        if command.connection is None and command.op != "configure":
            return Result(INVALID, [], f"op {command.op!r} needs a connection")
        try:
            return handler(command, now)
        except PolicyError as exc:
            return Result(INVALID, [], str(exc))

    def register(
        self,
        scope: str | None,
        connection: str,
        now: int,
        options: Mapping[str, Any] | None = None,
    ) -> Result:
        """Register with policy options, ``metadata`` and ``mode`` (default ``normal``;
        another mode is entered at once, with its ``state_change``)."""
        key = (scope, connection)
        if key in self._conns:
            return Result(ALREADY_REGISTERED, [], f"{_where(key)} is already registered")
        opts = options or {}
        mode = check_mode(opts["mode"]) if "mode" in opts else NORMAL
        policy = self.defaults.updated(opts) if opts else self.defaults
        metadata = check_metadata(opts.get("metadata"))
        first_seq = self._last_seq.pop(key, 0)
        c = Conn(key, policy, now, first_seq, self._id_base(key, first_seq))
        c.metadata = metadata
        c.window = new_window(policy)
        self._conns[key] = c
        if policy.inactive_ms is not None:
            self._push(now + policy.inactive_ms, _IDLE, c, 0)
        data = {"policy": policy.to_options(), "metadata": c.metadata or {}}
        out = [self._event(c, ev.REGISTRATION, now, data)]
        out.append(self._event(c, ev.CONNECTION_REGISTERED, now, data))
        if mode != NORMAL:
            self._set_mode(c, mode, now, out)
        return Result(APPLIED, out)

    def unregister(self, scope: str | None, connection: str, now: int) -> Result:
        c = self._conns.get((scope, connection))
        if c is None:
            return _not_registered((scope, connection))
        return Result(APPLIED, self._remove(c, now, ev.CONNECTION_UNREGISTERED, "Unregistered"))

    def success(
        self,
        scope: str | None,
        connection: str,
        now: int,
        *,
        lease: str | None = None,
        count: int = 1,
        duration_ms: float | None = None,
        reporter: str | None = None,
    ) -> Result:
        """``count`` successes in a row (a client's batched report): the same state as
        that many single ones, but one ``success`` event whose data carries ``count``.
        ``duration_ms`` is each one's duration; over ``slow_call_ms`` they are slow."""
        c = self._conns.get((scope, connection))
        if c is None:
            return _not_registered((scope, connection))
        c.last_activity = now
        c.last_success = now
        policy = c.policy
        slow = is_slow(policy, duration_ms)
        extra: dict[str, Any] | None = None
        if count != 1 or slow:
            extra = {"count": count} if count != 1 else {}
            if slow:
                extra["slow"] = True
        state = c.state
        if state == CLOSED:
            return self._closed_outcome(c, now, ev.SUCCESS, SLOW if slow else 0, count,
                                        reporter, extra)
        out = [self._event(c, ev.SUCCESS, now, with_rates(c, extra))]
        if state == HALF_OPEN:
            self._release(c, lease)
            for _ in range(min(count, policy.half_open_permits) - 1):
                self._release(c, None)
            if slow and policy.strategy == FAILURE_RATE:  # a slow probe: not recovered
                c.reopen_level += 1
                period = policy.open_period_ms(c.reopen_level)
                detail = {"detail": "Slow call in half-open"}
                self._open(c, now, REASON_SLOW_CALL_RATE, period, out, detail)
                return Result(APPLIED, out)
            c.probe_successes += count
            if c.probe_successes >= policy.success_threshold:
                self._close(c, now, ev.CIRCUIT_CLOSED, "Success threshold reached", out)
        return Result(APPLIED, out)  # open: noted, no transition

    def failure(
        self,
        scope: str | None,
        connection: str,
        now: int,
        *,
        reason: str | None = None,
        lease: str | None = None,
        duration_ms: float | None = None,
        reporter: str | None = None,
    ) -> Result:
        c = self._conns.get((scope, connection))
        if c is None:
            return _not_registered((scope, connection))
        c.last_activity = now
        c.last_failure = now
        slow = is_slow(c.policy, duration_ms)
        extra: dict[str, Any] | None = None
        if reason is not None or slow:
            extra = {"reason": reason} if reason is not None else {}
            if slow:
                extra["slow"] = True
        state = c.state
        if state == CLOSED:
            flags = FAILED | SLOW if slow else FAILED
            return self._closed_outcome(c, now, ev.FAILURE, flags, 1, reporter, extra)
        c.failure_count += 1
        out = [self._event(c, ev.FAILURE, now, with_rates(c, extra))]
        if state == HALF_OPEN:
            self._release(c, lease)
            c.reopen_level += 1
            period = c.policy.open_period_ms(c.reopen_level)
            self._open(c, now, "Failure in half-open", period, out)
        # open: a call got through anyway; noted, the open period stays
        return Result(APPLIED, out)

    def _closed_outcome(
        self,
        c: Conn,
        now: int,
        kind: str,
        flags: int,
        n: int,
        reporter: str | None,
        extra: dict[str, Any] | None,
    ) -> Result:
        """An outcome in closed state: count it, and open if a rule says so (in mode
        normal; metrics_only only says it would have, disabled stays silent)."""
        trip = count_outcome(c, now, flags, n, reporter)
        extra = with_rates(c, extra)
        if trip is not None and c.mode != NORMAL:
            if c.mode == METRICS_ONLY:
                extra = {**extra, "would_open": trip[0]} if extra else {"would_open": trip[0]}
            trip = None
        out = [self._event(c, kind, now, extra)]
        if trip is not None:
            reason, detail, book = trip
            data: dict[str, Any] = {} if detail is None else {"detail": detail}
            if book is not None:
                data.update(listed(book))
            self._open(c, now, reason, c.policy.open_period_ms(c.reopen_level), out, data)
        return Result(APPLIED, out)

    def open(
        self,
        scope: str | None,
        connection: str,
        now: int,
        *,
        expiry_ms: Any = _UNSET,
        reason: str | None = None,
    ) -> Result:
        """Open by hand; ``expiry_ms`` absent: the policy's period, None: until closed by hand."""
        c = self._conns.get((scope, connection))
        if c is None:
            return _not_registered((scope, connection))
        if expiry_ms is _UNSET:
            period: int | None = c.policy.expiry_ms
        elif expiry_ms is None:
            period = None
        else:
            period = _check_expiry(expiry_ms)
        if c.mode != NORMAL:
            return _mode_refuses(c, "open")
        out: list[Event] = []
        self._open(c, now, reason or "Opened by hand", period, out)
        return Result(APPLIED, out)

    def close(
        self, scope: str | None, connection: str, now: int, *, reason: str | None = None
    ) -> Result:
        c = self._conns.get((scope, connection))
        if c is None:
            return _not_registered((scope, connection))
        if c.mode == FORCED_OPEN:
            return _mode_refuses(c, "close")
        out: list[Event] = []
        self._close(c, now, ev.CIRCUIT_CLOSED, reason or "Closed by hand", out)
        return Result(APPLIED, out)

    def reset(
        self, scope: str | None, connection: str, now: int, *, reason: str | None = None
    ) -> Result:
        c = self._conns.get((scope, connection))
        if c is None:
            return _not_registered((scope, connection))
        if c.mode == FORCED_OPEN:
            return _mode_refuses(c, "reset")
        out: list[Event] = []
        self._close(c, now, ev.CIRCUIT_RESET, reason or "Reset by hand", out)
        return Result(APPLIED, out)

    def configure(
        self,
        scope: str | None,
        connection: str | None,
        options: Mapping[str, Any],
        now: int | None = None,
    ) -> Result:
        """Partial policy update of one connection, or of the defaults (connection None).
        ``mode`` (one connection only) changes the operating mode; that emits events,
        stamped ``now``."""
        mode = check_mode(options["mode"]) if "mode" in options else None
        if connection is None:
            if mode is not None:
                raise PolicyError("mode", mode, "is set per connection, not in the defaults")
            check_metadata(options.get("metadata"))  # not kept in the defaults, but validated
            self.defaults = self.defaults.updated(options)
            return Result(APPLIED, [], value=self.defaults.to_options())
        c = self._conns.get((scope, connection))
        if c is None:
            return _not_registered((scope, connection))
        policy = c.policy.updated(options)
        if "metadata" in options:
            c.metadata = check_metadata(options["metadata"])
        if not same_window(c.policy, policy):
            c.window = new_window(policy)
            c.reporters = None
            c.failure_count = 0
        old_idle = c.policy.inactive_ms
        c.policy = policy
        if policy.inactive_ms is not None and (old_idle is None or policy.inactive_ms < old_idle):
            # The pending check may be later than the new period allows: add an earlier one.
            self._push(c.last_activity + policy.inactive_ms, _IDLE, c, 0)
        out: list[Event] = []
        if mode is not None and mode != c.mode:
            if now is None:
                raise ValueError("a change of mode emits events: configure needs now")
            self._set_mode(c, mode, now, out)
        return Result(APPLIED, out, value=self._status(c, None))

    def _set_mode(self, c: Conn, mode: str, now: int, out: list[Event]) -> None:
        """Enter ``mode``: forced_open opens (held, no expiry); disabled and metrics_only
        close a circuit that is not closed, and so does leaving forced_open. One
        ``state_change`` (reason ``mode``) either way, after circuit_opened/_closed."""
        previous = c.mode
        c.mode = mode
        data = {"mode": mode, "previous_mode": previous}
        before = len(out)
        if mode == FORCED_OPEN:
            self._open(c, now, REASON_MODE, None, out, data)
        elif c.state != CLOSED and (mode != NORMAL or previous == FORCED_OPEN):
            self._close(c, now, ev.CIRCUIT_CLOSED, REASON_MODE, out, data)
        if not any(e.event == ev.STATE_CHANGE for e in out[before:]):
            change = {"previous_state": c.state, "new_state": c.state, "reason": REASON_MODE}
            out.append(self._event(c, ev.STATE_CHANGE, now, {**change, **data}))

    # ------------------------------------------------------------------ probes
    def acquire_probe(self, scope: str | None, connection: str, now: int) -> Probe:
        """Grant at most ``half_open_permits`` trial calls at once, cluster-wide."""
        c = self._conns[(scope, connection)]
        if c.state == CLOSED:
            return Probe(True, CLOSED)
        if c.state == OPEN:
            left = None if c.open_until is None else max(0, c.open_until - now)
            return Probe(False, OPEN, retry_after_ms=left)
        leases = c.leases
        if leases is None:
            leases = c.leases = {}
        if len(leases) >= c.policy.half_open_permits:
            soonest = min(leases.values())
            return Probe(False, HALF_OPEN, retry_after_ms=max(0, soonest - now))
        number = self._next_lease
        self._next_lease = number + 1
        lease = f"{c.id_base}-{number:x}"
        expires = now + c.policy.probe_timeout_ms
        leases[lease] = expires
        self._push(expires, _LEASE, c, c.timer_gen)
        return Probe(True, HALF_OPEN, lease=lease, lease_expires_at=expires)

    def release_probe(self, scope: str | None, connection: str, lease: str) -> bool:
        """Give a lease back unused (the caller decided not to call after all)."""
        c = self._conns.get((scope, connection))
        if c is None or not c.leases or lease not in c.leases:
            return False
        del c.leases[lease]
        return True

    # ------------------------------------------------------------------ time
    def advance(self, now: int) -> Advance:
        """Fire every timer due at ``now``: half-open expired circuits, return stale leases,
        remove inactive connections."""
        timers = self._timers
        if not timers or timers[0][0] > now:
            return Advance([], timers[0][0] if timers else None)
        out: list[Event] = []
        conns = self._conns
        while timers and timers[0][0] <= now:
            _when, _order, kind, c, gen = heapq.heappop(timers)
            if conns.get(c.key) is not c:
                continue  # removed (or removed and registered again)
            if kind == _EXPIRE:
                if gen == c.timer_gen and c.state == OPEN:
                    self._half_open(c, now, out)
            elif kind == _LEASE:
                if gen == c.timer_gen and c.leases:
                    for lease in [k for k, exp in c.leases.items() if exp <= now]:
                        del c.leases[lease]
            else:
                self._check_idle(c, now, out)
        return Advance(out, timers[0][0] if timers else None)

    def _check_idle(self, c: Conn, now: int, out: list[Event]) -> None:
        inactive = c.policy.inactive_ms
        if inactive is None:
            return  # re-armed by configure if it is turned on again
        due = c.last_activity + inactive
        if due > now or c.state == OPEN:
            # Active since, or open (an open circuit is never cleaned away under a caller).
            self._push(max(due, now + inactive) if c.state == OPEN else due, _IDLE, c, 0)
            return
        out.extend(self._remove(c, now, ev.CLEANUP, "Inactive"))

    # ------------------------------------------------------------------ transitions
    def _open(
        self,
        c: Conn,
        now: int,
        reason: str,
        period: int | None,
        out: list[Event],
        extra: dict[str, Any] | None = None,
    ) -> None:
        previous = c.state
        c.state = OPEN
        c.opened_at = now
        c.last_activity = now  # transitions count as activity for the inactivity cleanup
        c.held = period is None
        c.open_until = None if period is None else now + period
        c.probe_successes = 0
        c.leases = None
        c.timer_gen += 1
        if c.window is not None:
            c.window.clear()
        c.reporters = None
        if period is not None:
            self._push(now + period, _EXPIRE, c, c.timer_gen)
        data = {
            "previous_state": previous,
            "new_state": OPEN,
            "reason": reason,
            "open_until": c.open_until,
            "expiry_ms": period,
        }
        if extra:
            data.update(extra)
        out.append(self._event(c, ev.CIRCUIT_OPENED, now, data))
        if previous != OPEN:
            out.append(self._event(c, ev.STATE_CHANGE, now, data))

    def _half_open(self, c: Conn, now: int, out: list[Event]) -> None:
        c.state = HALF_OPEN
        c.last_activity = now
        c.open_until = None
        c.held = False
        c.probe_successes = 0
        c.leases = None
        c.timer_gen += 1
        data = {"previous_state": OPEN, "new_state": HALF_OPEN, "reason": "Expiry reached"}
        out.append(self._event(c, ev.EXPIRY, now, data))
        out.append(self._event(c, ev.CIRCUIT_HALF_OPENED, now, data))
        out.append(self._event(c, ev.STATE_CHANGE, now, data))

    def _close(
        self,
        c: Conn,
        now: int,
        kind: str,
        reason: str,
        out: list[Event],
        extra: dict[str, Any] | None = None,
    ) -> None:
        previous = c.state
        c.state = CLOSED
        c.last_activity = now
        c.failure_count = 0
        c.reopen_level = 0
        c.opened_at = None
        c.open_until = None
        c.held = False
        c.probe_successes = 0
        c.leases = None
        c.timer_gen += 1
        if c.window is not None:
            c.window.clear()
        c.reporters = None
        data = {"previous_state": previous, "new_state": CLOSED, "reason": reason}
        if extra:
            data.update(extra)
        out.append(self._event(c, kind, now, data))
        if previous != CLOSED:
            out.append(self._event(c, ev.STATE_CHANGE, now, data))

    def _remove(self, c: Conn, now: int, kind: str, reason: str) -> list[Event]:
        data = {"reason": reason}
        first = self._event(c, kind, now, data)
        second = self._event(c, ev.CONNECTION_REMOVED, now, data)
        del self._conns[c.key]
        self._last_seq[c.key] = c.seq
        return [first, second]

    def _release(self, c: Conn, lease: str | None) -> None:
        leases = c.leases
        if not leases:
            return
        if lease is not None and lease in leases:
            del leases[lease]
        else:  # an outcome without (or with an unknown) lease answers the oldest probe
            del leases[next(iter(leases))]

    # ------------------------------------------------------------------ plumbing
    def _event(
        self, c: Conn, kind: str, now: int, extra: dict[str, Any] | None = None
    ) -> Event:
        seq = c.seq = c.seq + 1
        data: dict[str, Any] = {"state": c.state, "failure_count": c.failure_count}
        if c.mode != NORMAL:
            data["mode"] = c.mode
        if extra:
            data.update(extra)
        return Event(
            kind, now, c.connection, c.scope, f"{c.id_base}{seq:08x}", seq, data, self.epoch
        )

    def _push(self, when: int, kind: int, c: Conn, gen: int) -> None:
        heapq.heappush(self._timers, (when, next(self._order), kind, c, gen))

    def _id_base(self, key: Key, first_seq: int) -> str:
        """Deterministic per registration, so a repeated event repeats its id too."""
        raw = f"{self.lineage}\0{key[0]}\0{key[1]}\0{first_seq}".encode("utf-8", "surrogatepass")
        return hashlib.blake2b(raw, digest_size=8).hexdigest()

    # ------------------------------------------------------------------ command adapters
    def _cmd_register(self, cmd: CommandLike, now: int) -> Result:
        return self.register(cmd.scope, _name(cmd), now, cmd.options)

    def _cmd_unregister(self, cmd: CommandLike, now: int) -> Result:
        return self.unregister(cmd.scope, _name(cmd), now)

    def _cmd_success(self, cmd: CommandLike, now: int) -> Result:
        options = cmd.options
        if not options:
            return self.success(cmd.scope, _name(cmd), now)
        count = options.get("count", 1)
        if type(count) is not int or not 1 <= count <= MAX_SUCCESS_COUNT:
            return Result(
                INVALID, [], f"invalid option count={count!r}: an int 1..{MAX_SUCCESS_COUNT}"
            )
        try:
            duration, reporter = outcome_options(options)
        except PolicyError as exc:
            return _invalid_option(exc)
        return self.success(
            cmd.scope, _name(cmd), now, lease=options.get("lease"), count=count,
            duration_ms=duration, reporter=reporter,
        )

    def _cmd_failure(self, cmd: CommandLike, now: int) -> Result:
        options = cmd.options
        if not options:
            return self.failure(cmd.scope, _name(cmd), now, reason=cmd.reason)
        try:
            duration, reporter = outcome_options(options)
        except PolicyError as exc:
            return _invalid_option(exc)
        return self.failure(
            cmd.scope, _name(cmd), now, reason=cmd.reason, lease=options.get("lease"),
            duration_ms=duration, reporter=reporter,
        )

    def _cmd_open(self, cmd: CommandLike, now: int) -> Result:
        opts = cmd.options or {}
        expiry = opts.get("expiry_ms", _UNSET)
        return self.open(cmd.scope, _name(cmd), now, expiry_ms=expiry, reason=cmd.reason)

    def _cmd_close(self, cmd: CommandLike, now: int) -> Result:
        return self.close(cmd.scope, _name(cmd), now, reason=cmd.reason)

    def _cmd_reset(self, cmd: CommandLike, now: int) -> Result:
        return self.reset(cmd.scope, _name(cmd), now, reason=cmd.reason)

    def _cmd_configure(self, cmd: CommandLike, now: int) -> Result:
        return self.configure(cmd.scope, cmd.connection, cmd.options or {}, now)

    # ------------------------------------------------------------------ snapshot
    def snapshot(self, scope: Any = _UNSET) -> dict[str, Any]:
        """A JSON-ready copy of the registry (all of it, or one scope's connections)."""
        conns = [
            dump_conn(c) for c in self._conns.values() if scope is _UNSET or c.scope == scope
        ]
        last_seq = self._removed_seq(scope)
        return {
            "v": _SNAPSHOT_VERSION,
            "lineage": self.lineage,
            "defaults": self.defaults.to_options(),
            "connections": conns,
            "removed_seq": last_seq,
            "next_lease": self._next_lease,
            "epoch": self.epoch,
        }

    def _removed_seq(self, scope: Any) -> list[list[Any]]:
        """``[scope, connection, seq]`` of removed connections, sorted by key: timers due
        at one instant fire in push order, which a restored engine does not share, so the
        removal order across connections may differ while the registry is the same."""
        items = [
            [k[0], k[1], s] for k, s in self._last_seq.items() if scope is _UNSET or k[0] == scope
        ]
        items.sort(key=lambda i: (i[0] is not None, i[0] or "", i[1]))
        return items

    def snapshot_header(self) -> dict[str, Any]:
        """:meth:`snapshot` without its connections (see :meth:`dump_connections`)."""
        return {
            "v": _SNAPSHOT_VERSION,
            "lineage": self.lineage,
            "defaults": self.defaults.to_options(),
            "connections": [],
            "removed_seq": self._removed_seq(_UNSET),
            "next_lease": self._next_lease,
            "epoch": self.epoch,
        }

    def dump_connections(self, size: int) -> Iterator[list[dict[str, Any]]]:
        """The connections as :meth:`snapshot` dumps them, ``size`` at a time: a big
        registry is written in parts without a copy of all of it. Do not change the
        engine while iterating."""
        part: list[dict[str, Any]] = []
        for c in self._conns.values():
            part.append(dump_conn(c))
            if len(part) >= size:
                yield part
                part = []
        if part:
            yield part

    @classmethod
    def restore(cls, snapshot: Mapping[str, Any]) -> Engine:
        """Rebuild an engine equal to the one ``snapshot()`` was taken of (timers included).
        A snapshot of an older version of this code restores too: what it lacks (windows
        of slow calls and seconds, reporters, modes) takes its default."""
        if snapshot.get("v") != _SNAPSHOT_VERSION:
            raise ValueError(f"unsupported snapshot version {snapshot.get('v')!r}")
        engine = cls(
            defaults=DEFAULT_POLICY.updated(snapshot["defaults"]), lineage=snapshot["lineage"]
        )
        policies: dict[Any, Policy] = {}  # connections share a few policies
        for item in snapshot["connections"]:
            c = load_conn(item, policies)
            engine._conns[c.key] = c
            engine._arm(c)
        for scope, connection, seq in snapshot.get("removed_seq", []):
            engine._last_seq[(scope, connection)] = seq
        engine._next_lease = snapshot.get("next_lease", 1)
        engine.epoch = int(snapshot.get("epoch", 0))
        return engine

    def _arm(self, c: Conn) -> None:
        if c.state == OPEN and c.open_until is not None:
            self._push(c.open_until, _EXPIRE, c, c.timer_gen)
        if c.leases:
            for expires in c.leases.values():
                self._push(expires, _LEASE, c, c.timer_gen)
        if c.policy.inactive_ms is not None:
            self._push(c.last_activity + c.policy.inactive_ms, _IDLE, c, 0)


def _check_expiry(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PolicyError("expiry_ms", value, "must be a positive integer or null")
    return value


def _invalid_option(exc: PolicyError) -> Result:
    return Result(INVALID, [], f"invalid option {exc.field}={exc.value!r}: {exc.problem}")


def _mode_refuses(c: Conn, op: str) -> Result:
    """``open`` needs mode normal (the other modes never open or are open already);
    ``close``/``reset`` are refused only in forced_open, which holds until changed."""
    done = {"open": "opened", "close": "closed", "reset": "reset"}[op]
    return Result(
        INVALID,
        [],
        f"refused in mode={c.mode}: {_where(c.key)} cannot be {done} by hand "
        "(configure its mode first)",
    )


def _name(cmd: CommandLike) -> str:
    assert cmd.connection is not None  # checked in apply()
    return cmd.connection


def _where(key: Key) -> str:
    return key[1] if key[0] is None else f"{key[0]}/{key[1]}"


def _not_registered(key: Key) -> Result:
    return Result(NOT_REGISTERED, [], f"{_where(key)} is not registered")
