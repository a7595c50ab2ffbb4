"""The breaker engine: every connection's state machine, driven by ``(command, now)``.

Sans-I/O on purpose (the h11 way): it never reads a clock, sleeps or talks to a broker.
The owner feeds it commands and the current time and publishes what it returns; tests
drive it directly with made-up times. ``now`` is always epoch milliseconds.

Timers (open-circuit expiry, probe-lease timeouts, inactivity) live in one heap whose
entries are invalidated lazily, so ``advance()`` costs O(1) when nothing is due and a
success never touches the heap.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import operator
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from brama_mq.core import events as ev
from brama_mq.core.events import CLOSED, HALF_OPEN, OPEN, Event
from brama_mq.core.policy import CONSECUTIVE, DEFAULT_POLICY, Policy, check_metadata
from brama_mq.errors import PolicyError

Key = tuple[str | None, str]

# Result statuses.
APPLIED: Final = "applied"
ALREADY_REGISTERED: Final = "already_registered"
NOT_REGISTERED: Final = "not_registered"
INVALID: Final = "invalid"
#: Largest ``count`` of one batched success report.
MAX_SUCCESS_COUNT: Final = 1_000_000

# Timer kinds.
_EXPIRE: Final = 0
_LEASE: Final = 1
_IDLE: Final = 2

_SNAPSHOT_VERSION: Final = 1
_UNSET: Any = object()


class CommandLike(Protocol):
    """What ``Engine.apply`` reads from a command (protocol.Command fits)."""

    @property
    def op(self) -> str: ...
    @property
    def connection(self) -> str | None: ...
    @property
    def scope(self) -> str | None: ...
    @property
    def reason(self) -> str | None: ...
    @property
    def options(self) -> Mapping[str, Any]: ...


@dataclass(slots=True)
class Command:
    """A plain command for driving the engine without the wire models."""

    op: str
    connection: str | None = None
    scope: str | None = None
    reason: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Result:
    """What applying one command did: its events, or why it was refused."""

    status: str
    events: list[Event]
    error: str | None = None
    value: Any = None

    @property
    def ok(self) -> bool:
        return self.status == APPLIED


@dataclass(slots=True)
class Advance:
    """Events that fell due, and when ``advance`` should be called next (None: never)."""

    events: list[Event]
    next_deadline: int | None


@dataclass(slots=True)
class Probe:
    """Answer to ``acquire_probe``: may the caller try the service now?"""

    granted: bool
    state: str
    lease: str | None = None
    lease_expires_at: int | None = None
    retry_after_ms: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "granted": self.granted,
            "state": self.state,
            "lease": self.lease,
            "lease_expires_at": self.lease_expires_at,
            "retry_after_ms": self.retry_after_ms,
        }


class _Conn:
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
        "open_until",
        "opened_at",
        "policy",
        "probe_successes",
        "registered_at",
        "reopen_level",
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
        self.failure_count = 0
        self.window: deque[bool] | None = None
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


class Engine:
    """Runs every breaker of one owner. Not thread-safe: one owner thread drives it."""

    def __init__(self, *, defaults: Policy = DEFAULT_POLICY, lineage: str = "brama") -> None:
        self.defaults = defaults
        self.lineage = lineage
        self._conns: dict[Key, _Conn] = {}
        self._last_seq: dict[Key, int] = {}  # seq of removed connections, so it never restarts
        self._timers: list[tuple[int, int, int, _Conn, int]] = []
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

    def _status(self, c: _Conn, now: int | None) -> dict[str, Any]:
        policy = c.policy
        left = None
        if c.state == OPEN and c.open_until is not None and now is not None:
            left = max(0, c.open_until - now)
        return {
            "scope": c.scope,
            "connection": c.connection,
            "state": c.state,
            "failure_count": c.failure_count,
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
            "epoch": self.epoch,
        }

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
        key = (scope, connection)
        if key in self._conns:
            return Result(ALREADY_REGISTERED, [], f"{_where(key)} is already registered")
        opts = options or {}
        policy = self.defaults.updated(opts) if opts else self.defaults
        metadata = check_metadata(opts.get("metadata"))
        first_seq = self._last_seq.pop(key, 0)
        c = _Conn(key, policy, now, first_seq, self._id_base(key, first_seq))
        c.metadata = metadata
        if policy.strategy != CONSECUTIVE:
            c.window = deque(maxlen=policy.window_size)
        self._conns[key] = c
        if policy.inactive_ms is not None:
            self._push(now + policy.inactive_ms, _IDLE, c, 0)
        data = {"policy": policy.to_options(), "metadata": c.metadata or {}}
        first = self._event(c, ev.REGISTRATION, now, data)
        return Result(APPLIED, [first, self._event(c, ev.CONNECTION_REGISTERED, now, data)])

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
    ) -> Result:
        """``count`` successes in a row (a client's batched report): the same state as
        that many single ones, but one ``success`` event whose data carries ``count``."""
        c = self._conns.get((scope, connection))
        if c is None:
            return _not_registered((scope, connection))
        c.last_activity = now
        c.last_success = now
        state = c.state
        extra = {"count": count} if count != 1 else None
        if state == CLOSED:
            window = c.window
            if window is None:
                c.failure_count = 0
            else:
                maxlen = window.maxlen or count
                for _ in range(min(count, maxlen)):
                    if len(window) == window.maxlen and window[0]:
                        c.failure_count -= 1
                    window.append(False)
            return Result(APPLIED, [self._event(c, ev.SUCCESS, now, extra)])
        if state == HALF_OPEN:
            self._release(c, lease)
            for _ in range(min(count, c.policy.half_open_permits) - 1):
                self._release(c, None)
            c.probe_successes += count
            out = [self._event(c, ev.SUCCESS, now, extra)]
            if c.probe_successes >= c.policy.success_threshold:
                self._close(c, now, ev.CIRCUIT_CLOSED, "Success threshold reached", out)
            return Result(APPLIED, out)
        # open: noted, no transition
        return Result(APPLIED, [self._event(c, ev.SUCCESS, now, extra)])

    def failure(
        self,
        scope: str | None,
        connection: str,
        now: int,
        *,
        reason: str | None = None,
        lease: str | None = None,
    ) -> Result:
        c = self._conns.get((scope, connection))
        if c is None:
            return _not_registered((scope, connection))
        c.last_activity = now
        c.last_failure = now
        state = c.state
        extra = {"reason": reason} if reason is not None else None
        if state == CLOSED:
            policy = c.policy
            window = c.window
            if window is None:
                c.failure_count += 1
                trip = c.failure_count >= policy.max_attempts
                why = "Threshold exceeded"
            else:
                if not (len(window) == window.maxlen and window[0]):
                    c.failure_count += 1
                window.append(True)
                calls = len(window)
                rate = 100.0 * c.failure_count / calls
                trip = (
                    calls >= policy.effective_minimum_calls
                    and rate >= policy.failure_rate_threshold
                )
                why = f"Failure rate {rate:.1f}% >= {policy.failure_rate_threshold:g}%"
            out = [self._event(c, ev.FAILURE, now, extra)]
            if trip:
                self._open(c, now, why, c.policy.open_period_ms(c.reopen_level), out)
            return Result(APPLIED, out)
        if state == HALF_OPEN:
            self._release(c, lease)
            c.failure_count += 1
            out = [self._event(c, ev.FAILURE, now, extra)]
            c.reopen_level += 1
            self._open(c, now, "Failure in half-open", c.policy.open_period_ms(c.reopen_level), out)
            return Result(APPLIED, out)
        c.failure_count += 1  # open: a call got through anyway; noted, the open period stays
        return Result(APPLIED, [self._event(c, ev.FAILURE, now, extra)])

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
        out: list[Event] = []
        self._open(c, now, reason or "Opened by hand", period, out)
        return Result(APPLIED, out)

    def close(
        self, scope: str | None, connection: str, now: int, *, reason: str | None = None
    ) -> Result:
        c = self._conns.get((scope, connection))
        if c is None:
            return _not_registered((scope, connection))
        out: list[Event] = []
        self._close(c, now, ev.CIRCUIT_CLOSED, reason or "Closed by hand", out)
        return Result(APPLIED, out)

    def reset(
        self, scope: str | None, connection: str, now: int, *, reason: str | None = None
    ) -> Result:
        c = self._conns.get((scope, connection))
        if c is None:
            return _not_registered((scope, connection))
        out: list[Event] = []
        self._close(c, now, ev.CIRCUIT_RESET, reason or "Reset by hand", out)
        return Result(APPLIED, out)

    def configure(
        self, scope: str | None, connection: str | None, options: Mapping[str, Any]
    ) -> Result:
        """Partial policy update of one connection, or of the defaults (connection None)."""
        if connection is None:
            check_metadata(options.get("metadata"))  # not kept in the defaults, but validated
            self.defaults = self.defaults.updated(options)
            return Result(APPLIED, [], value=self.defaults.to_options())
        c = self._conns.get((scope, connection))
        if c is None:
            return _not_registered((scope, connection))
        policy = c.policy.updated(options)
        if "metadata" in options:
            c.metadata = check_metadata(options["metadata"])
        if policy.strategy != c.policy.strategy or policy.window_size != c.policy.window_size:
            c.window = None if policy.strategy == CONSECUTIVE else deque(maxlen=policy.window_size)
            c.failure_count = 0
        old_idle = c.policy.inactive_ms
        c.policy = policy
        if policy.inactive_ms is not None and (old_idle is None or policy.inactive_ms < old_idle):
            # The pending check may be later than the new period allows: add an earlier one.
            self._push(c.last_activity + policy.inactive_ms, _IDLE, c, 0)
        return Result(APPLIED, [], value=self._status(c, None))

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

    def _check_idle(self, c: _Conn, now: int, out: list[Event]) -> None:
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
        self, c: _Conn, now: int, reason: str, period: int | None, out: list[Event]
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
        if period is not None:
            self._push(now + period, _EXPIRE, c, c.timer_gen)
        data = {
            "previous_state": previous,
            "new_state": OPEN,
            "reason": reason,
            "open_until": c.open_until,
            "expiry_ms": period,
        }
        out.append(self._event(c, ev.CIRCUIT_OPENED, now, data))
        if previous != OPEN:
            out.append(self._event(c, ev.STATE_CHANGE, now, data))

    def _half_open(self, c: _Conn, now: int, out: list[Event]) -> None:
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

    def _close(self, c: _Conn, now: int, kind: str, reason: str, out: list[Event]) -> None:
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
        data = {"previous_state": previous, "new_state": CLOSED, "reason": reason}
        out.append(self._event(c, kind, now, data))
        if previous != CLOSED:
            out.append(self._event(c, ev.STATE_CHANGE, now, data))

    def _remove(self, c: _Conn, now: int, kind: str, reason: str) -> list[Event]:
        data = {"reason": reason}
        first = self._event(c, kind, now, data)
        second = self._event(c, ev.CONNECTION_REMOVED, now, data)
        del self._conns[c.key]
        self._last_seq[c.key] = c.seq
        return [first, second]

    def _release(self, c: _Conn, lease: str | None) -> None:
        leases = c.leases
        if not leases:
            return
        if lease is not None and lease in leases:
            del leases[lease]
        else:  # an outcome without (or with an unknown) lease answers the oldest probe
            del leases[next(iter(leases))]

    # ------------------------------------------------------------------ plumbing
    def _event(
        self, c: _Conn, kind: str, now: int, extra: dict[str, Any] | None = None
    ) -> Event:
        seq = c.seq = c.seq + 1
        data: dict[str, Any] = {"state": c.state, "failure_count": c.failure_count}
        if extra:
            data.update(extra)
        return Event(
            kind, now, c.connection, c.scope, f"{c.id_base}{seq:08x}", seq, data, self.epoch
        )

    def _push(self, when: int, kind: int, c: _Conn, gen: int) -> None:
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
        return self.success(cmd.scope, _name(cmd), now, lease=options.get("lease"), count=count)

    def _cmd_failure(self, cmd: CommandLike, now: int) -> Result:
        lease = cmd.options.get("lease") if cmd.options else None
        return self.failure(cmd.scope, _name(cmd), now, reason=cmd.reason, lease=lease)

    def _cmd_open(self, cmd: CommandLike, now: int) -> Result:
        opts = cmd.options or {}
        expiry = opts.get("expiry_ms", _UNSET)
        return self.open(cmd.scope, _name(cmd), now, expiry_ms=expiry, reason=cmd.reason)

    def _cmd_close(self, cmd: CommandLike, now: int) -> Result:
        return self.close(cmd.scope, _name(cmd), now, reason=cmd.reason)

    def _cmd_reset(self, cmd: CommandLike, now: int) -> Result:
        return self.reset(cmd.scope, _name(cmd), now, reason=cmd.reason)

    def _cmd_configure(self, cmd: CommandLike, now: int) -> Result:
        return self.configure(cmd.scope, cmd.connection, cmd.options or {})

    # ------------------------------------------------------------------ snapshot
    def snapshot(self, scope: Any = _UNSET) -> dict[str, Any]:
        """A JSON-ready copy of the registry (all of it, or one scope's connections)."""
        conns = [
            _dump(c) for c in self._conns.values() if scope is _UNSET or c.scope == scope
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
            part.append(_dump(c))
            if len(part) >= size:
                yield part
                part = []
        if part:
            yield part

    @classmethod
    def restore(cls, snapshot: Mapping[str, Any]) -> Engine:
        """Rebuild an engine equal to the one ``snapshot()`` was taken of (timers included)."""
        if snapshot.get("v") != _SNAPSHOT_VERSION:
            raise ValueError(f"unsupported snapshot version {snapshot.get('v')!r}")
        engine = cls(
            defaults=DEFAULT_POLICY.updated(snapshot["defaults"]), lineage=snapshot["lineage"]
        )
        policies: dict[Any, Policy] = {}  # connections share a few policies
        for item in snapshot["connections"]:
            c = _load(item, policies)
            engine._conns[c.key] = c
            engine._arm(c)
        for scope, connection, seq in snapshot.get("removed_seq", []):
            engine._last_seq[(scope, connection)] = seq
        engine._next_lease = snapshot.get("next_lease", 1)
        engine.epoch = int(snapshot.get("epoch", 0))
        return engine

    def _arm(self, c: _Conn) -> None:
        if c.state == OPEN and c.open_until is not None:
            self._push(c.open_until, _EXPIRE, c, c.timer_gen)
        if c.leases:
            for expires in c.leases.values():
                self._push(expires, _LEASE, c, c.timer_gen)
        if c.policy.inactive_ms is not None:
            self._push(c.last_activity + c.policy.inactive_ms, _IDLE, c, 0)


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


def _dump(c: _Conn) -> dict[str, Any]:
    out = {name: getattr(c, name) for name in _DUMPED_FIELDS}
    out["scope"] = c.scope
    out["connection"] = c.connection
    out["policy"] = c.policy.to_options()
    out["leases"] = dict(c.leases) if c.leases else {}
    out["window"] = None if c.window is None else [bool(x) for x in c.window]
    return out


def _load(item: Mapping[str, Any], policies: dict[Any, Policy]) -> _Conn:
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
    c = _Conn((item["scope"], item["connection"]), policy, item["registered_at"], 0, "")
    (  # the order of _DUMPED_FIELDS; one itemgetter call instead of 15 setattr calls
        c.state, c.failure_count, c.probe_successes, c.reopen_level, c.opened_at,
        c.open_until, c.held, c.registered_at, c.last_activity, c.last_success,
        c.last_failure, c.metadata, c.seq, c.timer_gen, c.id_base,
    ) = _GET_DUMPED(item)
    c.leases = dict(item["leases"]) or None
    if item["window"] is not None:
        c.window = deque(item["window"], maxlen=policy.window_size)
    return c


def _check_expiry(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PolicyError("expiry_ms", value, "must be a positive integer or null")
    return value


def _name(cmd: CommandLike) -> str:
    assert cmd.connection is not None  # checked in apply()
    return cmd.connection


def _where(key: Key) -> str:
    return key[1] if key[0] is None else f"{key[0]}/{key[1]}"


def _not_registered(key: Key) -> Result:
    return Result(NOT_REGISTERED, [], f"{_where(key)} is not registered")
