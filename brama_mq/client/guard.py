"""Guarded calls: ask the local view before a call, report its outcome after.

Two pieces, shared by :meth:`Brama.guard`/:meth:`Brama.guarded` and by
:mod:`brama_mq.celery`:

* :class:`GuardRuntime`, one per client and process: the :class:`LocalView` (started on
  first use, the first check waiting up to ``startup_timeout`` for its snapshot) and the
  :class:`~brama_mq.client.outbox.Outbox` that reports outcomes in the background.
* :class:`Guard`, one per guarded dependency ``(connection, scope)`` and its exception
  rules. :meth:`Guard.admit` is the check: for a closed circuit it is one lookup in
  ``view.closed`` (no lock, no clock); anything else takes the slow path, which reads
  the view's entry, computes the time left, asks the owner for a half-open probe permit,
  or applies the fail mode when the view cannot vouch for its data.

Outcome rules (:meth:`Guard.settle`): no exception is a success; an exception in
``ignore`` reports nothing; one in ``record`` is a failure whose reason is
``"<type>: <message>"``; any other exception counts as a success (the call reached the
service and the service answered; pybreaker and Resilience4j count them the same
way); ``BaseException``\\ s that are not ``Exception``\\ s (cancellation, exit) report
nothing. Whenever nothing is reported for a call that held a probe permit, the permit
is given back. Reporting never raises into the caller.

Every guarded call is timed here, in the caller's process (``time.monotonic()`` from
just before the call to just after it; the owner never measures), and its outcome
carries ``duration_ms``, so a policy with ``slow_call_ms`` can count slow calls.

Modes: the owner holds a ``forced_open`` circuit open until closed by hand (no
``open_until``), so every check refuses it with ``retry_after_ms`` None; ``disabled``
and ``metrics_only`` circuits stay closed, so every check admits them. The view keeps
each circuit's mode (:meth:`LocalView.mode`, :attr:`Guard.mode`).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol, TypeVar, cast

from brama_mq.client.link import CommandLink
from brama_mq.client.local_view import (
    _ORPHANS,
    FAIL_CLOSED,
    FAIL_MODES,
    FAIL_OPEN,
    LocalView,
    ViewClient,
    view_key,
)
from brama_mq.client.outbox import DEFAULT_OUTBOX_SIZE, RELEASE, Outbox
from brama_mq.core.events import CLOSED, HALF_OPEN, OPEN
from brama_mq.errors import BramaError, CircuitOpenError, NotRegisteredError, breaker_name
from brama_mq.protocol.clock import wall_clock_ms

__all__ = [
    "ADMIT_CLOSED",
    "Admission",
    "ExceptionTypes",
    "Guard",
    "GuardClient",
    "GuardRuntime",
    "GuardedCall",
    "defer_seconds",
    "describe_exception",
    "exception_types",
    "runtime_for",
    "view_options_from_env",
]

log = logging.getLogger("brama_mq.guard")

_monotonic = time.monotonic

F = TypeVar("F", bound=Callable[..., Any])
ExceptionTypes = tuple[type[BaseException], ...]

#: The state reported when the view cannot vouch for anything (stale, not bootstrapped).
UNKNOWN: Final = "unknown"
#: How long a call refused by the fail mode is told to wait.
STALE_RETRY_MS: Final = 5_000
#: A half-open circuit resolves as soon as its probe reports: a call refused a permit is
#: told to come back within this, not after the owner's lease timeout.
HALF_OPEN_RETRY_CAP_MS: Final = 2_000
#: How long to defer a call on a circuit held open (until closed by hand).
HELD_OPEN_RETRY_MS: Final = 60_000
DEFAULT_MAX_STALENESS: Final = 30.0
DEFAULT_STARTUP_TIMEOUT: Final = 5.0
DEFAULT_PROBE_TIMEOUT: Final = 2.0


class Admission:
    """The answer of a check: may the call run, and what to do with its outcome.

    ``allowed``: run the call. ``state``: the circuit's state as far as the check knows
    (``unknown`` when the view could not vouch for it). ``lease``: the half-open probe
    permit this call holds, if any. ``retry_after_ms``: when refused, how long until a
    call may be tried again (None: open until closed by hand). ``report``: whether the
    outcome goes to the owner. ``why``: closed, probe, fail-open, fail-closed, open,
    no-permit or unregistered.
    """

    __slots__ = ("allowed", "lease", "report", "retry_after_ms", "state", "why")

    def __init__(
        self,
        allowed: bool,
        state: str,
        lease: str | None = None,
        retry_after_ms: int | None = None,
        report: bool = True,
        why: str = "",
    ) -> None:
        self.allowed = allowed
        self.state = state
        self.lease = lease
        self.retry_after_ms = retry_after_ms
        self.report = report
        self.why = why

    @property
    def probe(self) -> bool:
        """Whether this call is a half-open trial call (it holds a permit)."""
        return self.lease is not None

    def __repr__(self) -> str:
        return (
            f"Admission(allowed={self.allowed}, state={self.state!r}, why={self.why!r}, "
            f"lease={self.lease!r}, retry_after_ms={self.retry_after_ms})"
        )


#: What every check of a closed circuit returns (shared, never mutated).
ADMIT_CLOSED: Final = Admission(True, CLOSED, why="closed")


def exception_types(value: Any, name: str) -> ExceptionTypes:
    """``record``/``ignore`` as a tuple of exception classes (one class is accepted)."""
    items = (value,) if isinstance(value, type) else tuple(value or ())
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise TypeError(f"{name} must hold exception classes, not {item!r}")
    return cast(ExceptionTypes, items)


def describe_exception(exc: BaseException) -> str:
    """The failure reason sent to the owner: ``"<type>: <message>"``."""
    message = str(exc)
    name = type(exc).__name__
    return f"{name}: {message}" if message else name


def defer_seconds(retry_after_ms: int | None) -> float:
    """How long to put a refused call off: the time left, plus jitter (10 % of it plus
    up to 50 ms, at most 1 s), so deferred calls do not all come back at once."""
    base = (HELD_OPEN_RETRY_MS if retry_after_ms is None else max(0, retry_after_ms)) / 1000.0
    return base + random.uniform(0.0, min(1.0, 0.1 * base + 0.05))


def view_options_from_env(env: dict[str, str] | None = None) -> dict[str, Any]:
    """``max_staleness`` and ``fail_mode`` from ``BRAMA_VIEW_MAX_STALENESS`` and
    ``BRAMA_FAIL_MODE`` (only those set)."""
    env = dict(os.environ) if env is None else env
    out: dict[str, Any] = {}
    raw = env.get("BRAMA_VIEW_MAX_STALENESS")
    if raw:
        try:
            out["max_staleness"] = float(raw)
        except ValueError:
            raise ValueError(f"BRAMA_VIEW_MAX_STALENESS={raw!r} is not a number") from None
    raw = env.get("BRAMA_FAIL_MODE")
    if raw:
        if raw not in FAIL_MODES:
            raise ValueError(f"BRAMA_FAIL_MODE={raw!r} must be one of {FAIL_MODES}")
        out["fail_mode"] = raw
    return out


class GuardClient(ViewClient, Protocol):
    """What guards need of their client (a :class:`~brama_mq.client.Brama`): a protocol,
    so this module does not import the client, which imports it."""

    #: This process's guard machinery for the client, made by :func:`runtime_for`.
    guard_runtime: GuardRuntime | None

    @property
    def commands(self) -> CommandLink:
        """The client's way to the owner; the outbox sends through it."""
        ...

    def acquire_probe(
        self, connection: str, *, scope: str | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Ask the owner for a half-open trial call."""
        ...

    def disconnect(self) -> None:
        """Close the client (its runtime, link and, if it made it, transport)."""
        ...


class GuardRuntime:
    """A client's guard machinery in one process: the local view and the outbox."""

    def __init__(
        self,
        client: GuardClient,
        *,
        view: LocalView | None = None,
        max_staleness: float = DEFAULT_MAX_STALENESS,
        fail_mode: str = FAIL_OPEN,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
        probe_timeout: float = DEFAULT_PROBE_TIMEOUT,
        outbox_size: int = DEFAULT_OUTBOX_SIZE,
        reporter: str | None = None,
    ) -> None:
        """``reporter``: the name the outbox's reports carry (None: the client's)."""
        self.client = client
        self.pid = os.getpid()
        if view is None:
            view = LocalView(client, max_staleness=max_staleness, fail_mode=fail_mode)
        self.view = view
        self.fail_mode = view.fail_mode
        self.startup_timeout = startup_timeout
        #: Until then, a check that finds the view not bootstrapped yet waits for it.
        self.startup_deadline = time.monotonic() + startup_timeout
        self.probe_timeout = probe_timeout
        self.outbox = Outbox(client.commands, max_size=outbox_size, reporter=reporter)
        #: key -> (entry seq, wall ms): the owner refused a permit; do not ask again
        #: before that time unless the circuit moved (a newer seq) meanwhile.
        self._no_permit: dict[str, tuple[tuple[int, int], int]] = {}
        self._logged: set[tuple[str, str, int]] = set()

    def start(self, wait: bool = True) -> None:
        """Start the view (and with ``wait``, block up to ``startup_timeout`` for it)."""
        self.startup_deadline = time.monotonic() + self.startup_timeout
        self.view.start(wait=self.startup_timeout if wait else None)
        self.outbox.start()

    def close(self, timeout: float = 5.0) -> None:
        """Flush the outbox (up to ``timeout``), stop the view."""
        self.outbox.close(timeout)
        self.view.stop(timeout)

    def _log_once(self, guard: Guard, why: str, message: str, *args: Any) -> None:
        spell = self.view.counters["stale_spells"]
        mark = (guard.key, why, spell)
        if mark not in self._logged:
            if len(self._logged) > 10_000:
                self._logged.clear()
            self._logged.add(mark)
            log.warning(message, *args)

    def decide(self, guard: Guard) -> Admission:
        """The slow path of :meth:`Guard.admit` (anything but a usable, closed entry)."""
        view = self.view
        key = guard.key
        if key in view.closed:
            return ADMIT_CLOSED
        if not view.ready:  # just started: wait (once, bounded) for the first snapshot
            left = self.startup_deadline - time.monotonic()
            if left > 0 and view.wait_ready(left) and key in view.closed:
                return ADMIT_CLOSED
        if not view.usable:
            return self._fail(guard, "the local view is " + ("stale" if view.ready else
                                                               "not bootstrapped yet"))
        entry = view.lookup(key)
        if entry is None:
            self._log_once(
                guard,
                "unregistered",
                "brama guard: %s is not registered with the owner; calls run unguarded "
                "and report nothing until it is",
                guard.where,
            )
            return Admission(True, UNKNOWN, report=False, why="unregistered")
        state = entry.state
        if state == CLOSED:
            return ADMIT_CLOSED
        now = wall_clock_ms()
        if state == OPEN:
            if entry.open_until is None:
                return Admission(False, OPEN, retry_after_ms=None, report=False, why="open")
            left = entry.open_until - now
            if left > 0:
                return Admission(False, OPEN, retry_after_ms=left, report=False, why="open")
        # Half-open, or open past its deadline (the owner's timer may not have fired
        # yet): the owner rations the trial calls.
        memo = self._no_permit.get(key)
        if memo is not None and memo[0] == (entry.epoch, entry.seq) and memo[1] > now:
            return Admission(False, state, retry_after_ms=memo[1] - now, report=False,
                             why="no-permit")
        try:
            probe = self.client.acquire_probe(
                guard.connection, scope=guard.scope, timeout=self.probe_timeout
            )
        except NotRegisteredError:
            return Admission(True, UNKNOWN, report=False, why="unregistered")
        except BramaError as exc:
            return self._fail(guard, f"no probe permit could be asked for ({exc})")
        answered = str(probe.get("state") or state)
        if probe.get("granted"):
            lease = probe.get("lease")
            return Admission(True, answered, lease=lease if isinstance(lease, str) else None,
                             why="probe" if lease else "closed")
        retry = probe.get("retry_after_ms")
        retry_ms = int(retry) if isinstance(retry, int) else None
        if answered == HALF_OPEN:
            retry_ms = HALF_OPEN_RETRY_CAP_MS if retry_ms is None else min(
                retry_ms, HALF_OPEN_RETRY_CAP_MS
            )
        if retry_ms is not None:
            self._no_permit[key] = ((entry.epoch, entry.seq), now + retry_ms)
        return Admission(False, answered, retry_after_ms=retry_ms, report=False,
                         why="no-permit" if answered == HALF_OPEN else "open")

    def _fail(self, guard: Guard, what: str) -> Admission:
        if self.fail_mode == FAIL_CLOSED:
            self._log_once(
                guard, "fail-closed",
                "brama guard: %s; fail mode 'closed': calls to %s are refused", what,
                guard.where,
            )
            return Admission(False, UNKNOWN, retry_after_ms=STALE_RETRY_MS, report=False,
                             why="fail-closed")
        self._log_once(
            guard, "fail-open",
            "brama guard: %s; fail mode 'open': calls to %s run (outcomes are buffered)",
            what, guard.where,
        )
        return Admission(True, UNKNOWN, why="fail-open")


_runtime_lock = threading.RLock()
_CLIENTS: weakref.WeakSet[GuardClient] = weakref.WeakSet()


def runtime_for(client: GuardClient, *, wait: bool = True, **options: Any) -> GuardRuntime:
    """The client's :class:`GuardRuntime` in this process, made and started on first use.

    ``options`` (``max_staleness``, ``fail_mode``, ``startup_timeout``,
    ``probe_timeout``, ``outbox_size``, ``reporter``) apply when it is made; by default
    they come from ``BRAMA_VIEW_MAX_STALENESS`` and ``BRAMA_FAIL_MODE``. A view the
    client already has (``LocalView.attach``) is used as is.
    """
    runtime = client.guard_runtime
    if runtime is not None and runtime.pid == os.getpid():
        return runtime
    with _runtime_lock:
        runtime = client.guard_runtime
        if runtime is None or runtime.pid != os.getpid():
            opts = {**view_options_from_env(), **options}
            view = client.local_view
            if not isinstance(view, LocalView) or view.pid != os.getpid() or view._dead:
                view = LocalView(
                    client,
                    max_staleness=opts.pop("max_staleness", DEFAULT_MAX_STALENESS),
                    fail_mode=opts.pop("fail_mode", FAIL_OPEN),
                )
            else:
                opts.pop("max_staleness", None)
                opts.pop("fail_mode", None)
            runtime = GuardRuntime(client, view=view, **opts)
            client.guard_runtime = runtime
            client.local_view = view
            _CLIENTS.add(client)
            runtime.start(wait=False)
    if wait:
        runtime.view.wait_ready(runtime.startup_timeout)
    return runtime


def _after_fork() -> None:
    # The parent's view and outbox belong to the parent (their threads do not exist
    # here; their sockets are the parent's). Keep them referenced so they are never
    # collected or closed here, and let the next guard build this process's own. The
    # client's link is dropped by brama_mq.client.link's own fork hook.
    for client in list(_CLIENTS):
        _ORPHANS.append((client.guard_runtime, client.local_view))
        client.guard_runtime = None
        client.local_view = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


class Guard:
    """One guarded dependency of a client: ``(connection, scope)`` and what counts.

    Thread-safe and reusable; :meth:`Brama.guard` and :meth:`Brama.guarded` cache one
    per set of arguments.
    """

    __slots__ = ("__weakref__", "client", "connection", "ignore", "key", "record", "scope",
                 "where")

    def __init__(
        self,
        client: GuardClient,
        connection: str,
        scope: str | None = None,
        *,
        record: Any = (Exception,),
        ignore: Any = (),
    ) -> None:
        self.client = client
        self.connection = connection
        self.scope = scope
        self.key = view_key(scope, connection)  # also validates the names
        self.record = exception_types(record, "record")
        self.ignore = exception_types(ignore, "ignore")
        self.where = breaker_name(scope, connection)

    def __repr__(self) -> str:
        return f"Guard({self.where!r})"

    @property
    def mode(self) -> str | None:
        """The circuit's operating mode as this process's view knows it (``normal``,
        ``disabled``, ``forced_open``, ``metrics_only``); None when the view cannot
        vouch for it (not started, not bootstrapped, stale, unknown connection)."""
        view = self.client.local_view
        return None if view is None else view.mode(self.connection, self.scope)

    # ------------------------------------------------------------------ before
    def admit(self) -> Admission:
        """The check: :data:`ADMIT_CLOSED` from the view for a closed circuit, else the
        slow path (which may ask the owner for a probe permit)."""
        view = self.client.local_view
        if view is not None and self.key in view.closed:
            return ADMIT_CLOSED
        return self.admit_slow()

    def admit_slow(self) -> Admission:
        """The check without the fast path (starts this process's view if needed)."""
        runtime = self.client.guard_runtime
        if runtime is None or runtime.pid != os.getpid():
            runtime = runtime_for(self.client)
        return runtime.decide(self)

    async def admit_async(self) -> Admission:
        """:meth:`admit` for coroutines: the slow path runs in a worker thread."""
        view = self.client.local_view
        if view is not None and self.key in view.closed:
            return ADMIT_CLOSED
        return await asyncio.to_thread(self.admit_slow)

    def refusal(self, admission: Admission) -> CircuitOpenError:
        """The error that says why a call was refused."""
        return CircuitOpenError(
            self.connection, self.scope, admission.state, admission.retry_after_ms
        )

    # ------------------------------------------------------------------ after
    def _outbox(self) -> Outbox:
        # No pid check here: an after-fork hook clears the runtime in a child.
        runtime = self.client.guard_runtime
        if runtime is None:
            runtime = runtime_for(self.client, wait=False)
        return runtime.outbox

    def settle(
        self, admission: Admission, exc: BaseException | None, duration_ms: float | None = None
    ) -> None:
        """Report the outcome of an admitted call (see the module doc), with the call's
        ``duration_ms`` (measured by the caller, >= 0). Never raises."""
        try:
            if not admission.report:
                return
            if exc is None:
                self._outbox().put("success", self.connection, self.scope, None,
                                   admission.lease, duration_ms)
            elif not isinstance(exc, Exception) or isinstance(exc, self.ignore):
                self.release(admission)
            elif isinstance(exc, self.record):
                self._outbox().put(
                    "failure", self.connection, self.scope, describe_exception(exc),
                    admission.lease, duration_ms,
                )
            else:
                self._outbox().put("success", self.connection, self.scope, None,
                                   admission.lease, duration_ms)
        except Exception:
            log.exception("brama guard: reporting the outcome of %s failed", self.where)

    def release(self, admission: Admission) -> None:
        """Give back the probe permit of a call that reports nothing. Never raises."""
        if admission.lease is None:
            return
        try:
            self._outbox().put(RELEASE, self.connection, self.scope, None, admission.lease)
        except Exception:
            log.exception("brama guard: giving back the permit of %s failed", self.where)

    # ------------------------------------------------------------------ forms
    def call(self) -> GuardedCall:
        """A one-use context manager (``with``/``async with``) around one call."""
        return GuardedCall(self)

    def decorate(self, fn: F) -> F:
        """Wrap a plain function or a coroutine function: check, run, report."""
        if inspect.iscoroutinefunction(fn):
            async_fn = cast(Callable[..., Awaitable[Any]], fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                admission = await self.admit_async()
                if not admission.allowed:
                    raise self.refusal(admission)
                started = _monotonic()
                try:
                    result = await async_fn(*args, **kwargs)
                except BaseException as exc:
                    self.settle(admission, exc, (_monotonic() - started) * 1000.0)
                    raise
                self.settle(admission, None, (_monotonic() - started) * 1000.0)
                return result

            async_wrapper.__brama_guard__ = self  # type: ignore[attr-defined]
            return cast(F, async_wrapper)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            admission = self.admit()
            if not admission.allowed:
                raise self.refusal(admission)
            started = _monotonic()
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                self.settle(admission, exc, (_monotonic() - started) * 1000.0)
                raise
            self.settle(admission, None, (_monotonic() - started) * 1000.0)
            return result

        wrapper.__brama_guard__ = self  # type: ignore[attr-defined]
        return cast(F, wrapper)


class GuardedCall:
    """``with client.guard(...) as admission:`` — refuses with CircuitOpenError before
    the block when the circuit is open, reports the block's outcome (and how long the
    block took) after it. The exception (if any) always propagates. Also usable as
    ``async with``."""

    __slots__ = ("admission", "guard", "started")

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.admission: Admission | None = None
        self.started = 0.0

    def __enter__(self) -> Admission:
        admission = self.guard.admit()
        if not admission.allowed:
            raise self.guard.refusal(admission)
        self.admission = admission
        self.started = _monotonic()
        return admission

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        admission = self.admission
        if admission is not None:
            duration_ms = (_monotonic() - self.started) * 1000.0
            self.admission = None
            self.guard.settle(admission, exc, duration_ms)

    async def __aenter__(self) -> Admission:
        admission = await self.guard.admit_async()
        if not admission.allowed:
            raise self.guard.refusal(admission)
        self.admission = admission
        self.started = _monotonic()
        return admission

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self.__exit__(exc_type, exc, tb)
