"""``GuardedTask`` and ``@guarded``: Celery tasks behind a brama_mq circuit breaker.

Before the body runs, the task's circuit is checked in this process's local view:

* closed: the body runs;
* open: ``on_open="retry"`` sends the task again with a countdown equal to the time left
  until half-open (plus jitter), keeping ``request.retries`` as it was, so the deferral
  does not use up the task's own retry budget; ``"raise"`` raises
  :class:`~brama_mq.errors.CircuitOpenError` (connection, state, time left); ``"skip"``
  drops the task: its state becomes :data:`SKIPPED` (meta: connection, scope,
  circuit_state, retry_after_ms, reason) and it raises ``Ignore``, so that state stays in
  the result backend (unless results are ignored) and nothing downstream runs (see
  "Canvas" below); a worker sending task events (``-E``) also sends ``task-skipped``
  with the same fields, which Flower shows as SKIPPED. The body is not entered;
* half-open: the owner is asked for a probe permit; with one the body runs, without one
  the task is treated as if the circuit were open.

After the body: a success, or an exception in ``record`` (reason ``"<type>: <message>"``),
is reported to the owner through the process's outbox (never raising into the task, and
buffered while the broker is away) with the body's ``duration_ms`` (timed in the worker
process with ``time.monotonic()``, the measurement the call-duration histogram gets too)
and the process's reporter (``brama_reporter``, see :mod:`brama_mq.celery.runtime`); an
exception in ``ignore`` reports nothing.
Celery's own control-flow exceptions keep their meaning and are re-raised untouched:
``Retry`` reports the exception it carries (``self.retry(exc=...)`` and
``autoretry_for`` are failures of the service) and nothing when it carries none;
``Reject`` and ``Ignore`` report nothing. A probe permit whose call reports nothing is
given back.

When the task is called directly or eagerly (``task_always_eager``), a refusal with
``on_open="retry"`` raises CircuitOpenError instead: there is no queue to defer to, and
an eager retry would loop; ``"skip"`` returns None (there is no task state to set).

Canvas (chain, group, chord) while the circuit is open, per ``on_open``:

* ``"retry"``: the deferred task keeps its place (Celery's retry message: same id,
  chain, callbacks, group and chord), so the chain goes on, the group completes and the
  chord's callback fires once the task ran after the circuit closed;
* ``"raise"``: the task fails with CircuitOpenError: a chain stops there (its errbacks
  run; Celery marks the rest failed, unrun), a group's result holds that failure next
  to the others' results, a chord's callback fails with ``ChordError`` naming it
  (Celery's chord error semantics);
* ``"skip"``: SKIPPED is not a ready state, so what waits for the task waits for ever:
  the rest of a chain is never sent, a chord's callback never fires (its result stays
  PENDING), ``.get()`` on the task or its group times out; the other members of a group
  or a chord header run as usual. Use "skip" for tasks nothing waits on.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar, cast

from celery import Task
from celery._state import get_current_app, get_current_task
from celery.exceptions import Ignore, Reject, Retry

from brama_mq.celery.runtime import _GUARDS_DEFINED, TASK_EVENTS, runtime_for_app
from brama_mq.client.guard import (
    ADMIT_CLOSED,
    Admission,
    Guard,
    GuardRuntime,
    defer_seconds,
    exception_types,
)
from brama_mq.client.local_view import view_key
from brama_mq.errors import CircuitOpenError
from brama_mq.metrics.guard import GUARD_CHECKS

__all__ = ["ON_OPEN", "SKIPPED", "GuardSpec", "GuardedTask", "guarded"]

log = logging.getLogger("brama_mq.celery")

F = TypeVar("F", bound=Callable[..., Any])
ON_OPEN: Final = ("retry", "raise", "skip")
#: The Celery task state of a task dropped by ``on_open="skip"`` (result backends, Flower).
SKIPPED: Final = "SKIPPED"


class GuardSpec:
    """What a guarded task guards, and how: shared by GuardedTask and ``@guarded``."""

    __slots__ = ("_guard", "_runtime", "connection", "ignore", "key", "on_open", "record",
                 "scope")

    def __init__(
        self,
        connection: str,
        scope: str | None = None,
        on_open: str = "retry",
        record: Any = (Exception,),
        ignore: Any = (),
    ) -> None:
        if on_open not in ON_OPEN:
            raise ValueError(f"on_open must be one of {ON_OPEN}, not {on_open!r}")
        self.connection = connection
        self.scope = scope
        self.on_open = on_open
        self.key = view_key(scope, connection)  # validates the names now
        self.record = exception_types(record, "record")
        self.ignore = exception_types(ignore, "ignore")
        self._runtime: GuardRuntime | None = None
        self._guard: Guard | None = None
        _GUARDS_DEFINED.set()

    def __repr__(self) -> str:
        return f"GuardSpec({self.connection!r}, scope={self.scope!r}, on_open={self.on_open!r})"

    def guard(self, runtime: GuardRuntime) -> Guard:
        """The Guard for this process's runtime (cached)."""
        guard = self._guard
        if guard is None or self._runtime is not runtime:
            guard = Guard(runtime.client, self.connection, self.scope, record=self.record,
                          ignore=self.ignore)
            self._guard, self._runtime = guard, runtime
        return guard

    def run(self, task: Any, app: Any, body: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        """Check, run ``body(*args, **kwargs)``, report: the whole guarded execution."""
        runtime = runtime_for_app(app)
        guard = self._guard if self._runtime is runtime else self.guard(runtime)
        assert guard is not None
        if self.key in runtime.view.closed:
            admission = ADMIT_CLOSED
            if GUARD_CHECKS.on:  # metrics off (the default): this test is all they cost
                GUARD_CHECKS.count(self.connection, "closed", self.scope)
        else:
            admission = runtime.decide(guard)
            if GUARD_CHECKS.on:
                GUARD_CHECKS.count(self.connection, admission.why, self.scope)
            if not admission.allowed:
                return self.refuse(task, guard, admission)
        started = time.monotonic()
        try:
            result = body(*args, **kwargs)
        except Retry as exc:
            cause = exc.exc
            if isinstance(cause, BaseException):
                guard.settle(admission, cause, (time.monotonic() - started) * 1000.0)
            else:
                guard.release(admission)
            raise
        except (Reject, Ignore):
            guard.release(admission)
            raise
        except BaseException as exc:
            elapsed = time.monotonic() - started
            guard.settle(admission, exc, elapsed * 1000.0)
            if GUARD_CHECKS.on:
                GUARD_CHECKS.observe_call(self.connection, False, elapsed, self.scope)
            raise
        elapsed = time.monotonic() - started
        guard.settle(admission, None, elapsed * 1000.0)
        if GUARD_CHECKS.on:
            GUARD_CHECKS.observe_call(self.connection, True, elapsed, self.scope)
        return result

    def refuse(self, task: Any, guard: Guard, admission: Admission) -> Any:
        """Act on a refusal per ``on_open`` (see the module doc)."""
        error = guard.refusal(admission)
        request = getattr(task, "request", None)
        if self.on_open == "skip":
            log.info("brama guard: skipped %s: %s", _name(task), error)
            if request is None or request.called_directly or request.is_eager:
                return None
            _mark_skipped(task, request, error)
            raise Ignore()
        if (
            self.on_open == "raise"
            or request is None
            or request.called_directly
            or request.is_eager
        ):
            raise error
        countdown = defer_seconds(admission.retry_after_ms)
        signature = task.signature_from_request(
            request, None, None, countdown=countdown, retries=request.retries
        )
        try:
            signature.apply_async()
        except Exception as exc:  # as Celery's own retry() does when it cannot publish
            raise Reject(exc, requeue=False) from exc
        log.info("brama guard: deferred %s[%s] by %.2f s: %s", _name(task), request.id,
                 countdown, error)
        raise Retry(f"{error}; deferred {countdown:.2f} s", exc=error, when=countdown,
                    sig=signature)


def _mark_skipped(task: Any, request: Any, error: CircuitOpenError) -> None:
    """State SKIPPED in the result backend, and a ``task-skipped`` event if the worker
    sends task events; neither raises into the task (the skip happens anyway)."""
    info = {
        "connection": error.connection,
        "scope": error.scope,
        "circuit_state": error.state,
        "retry_after_ms": error.retry_after_ms,
        "reason": str(error),
    }
    explicit = vars(request).get("ignore_result")  # the caller's, over the task's default
    if not (task.ignore_result if explicit is None else explicit):
        try:
            task.update_state(task_id=request.id, state=SKIPPED, meta=info)
        except Exception:
            log.exception("brama guard: could not store state SKIPPED of %s[%s]",
                          _name(task), request.id)
    if TASK_EVENTS.is_set() and getattr(task, "send_events", True):
        try:
            task.send_event("task-skipped", retry=False, **info)
        except Exception:
            log.exception("brama guard: could not send task-skipped for %s[%s]",
                          _name(task), request.id)


def _name(task: Any) -> str:
    return str(getattr(task, "name", None) or task)


class GuardedTask(Task):  # type: ignore[misc]  # celery is untyped
    """A Celery task whose body runs behind a circuit breaker.

    Configure it with task options (or class attributes)::

        @app.task(base=GuardedTask, brama_connection="payment_api", brama_scope="payments",
                  brama_on_open="retry")
        def charge(order_id): ...

    ``brama_record`` / ``brama_ignore``: exception classes that are failures / that
    report nothing (default: every Exception is a failure).
    """

    brama_connection: str | None = None
    brama_scope: str | None = None
    brama_on_open: str = "retry"
    brama_record: Any = (Exception,)
    brama_ignore: Any = ()
    _brama_spec: GuardSpec | None = None

    @classmethod
    def on_bound(cls, app: Any) -> None:
        """Validate the guard options when the task is made (not on its first run)."""
        super().on_bound(app)
        if cls.brama_connection is not None:
            cls._brama_spec = cls._make_spec()

    @classmethod
    def _make_spec(cls) -> GuardSpec:
        if cls.brama_connection is None:
            raise TypeError(f"{cls.__name__} needs brama_connection (the guarded connection)")
        return GuardSpec(
            cls.brama_connection,
            cls.brama_scope,
            cls.brama_on_open,
            cls.brama_record,
            cls.brama_ignore,
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        spec = self._brama_spec
        if spec is None:
            spec = type(self)._brama_spec = type(self)._make_spec()
        return spec.run(self, self._get_app(), super().__call__, args, kwargs)


def guarded(
    connection: str,
    scope: str | None = None,
    on_open: str = "retry",
    record: Any = (Exception,),
    ignore: Any = (),
) -> Callable[[F], F]:
    """Guard a task's body; put it *below* ``@app.task``::

        @app.task
        @guarded("payment_api", scope="payments", on_open="retry")
        def charge(order_id): ...

    The task is found at run time (Celery's current task), so it works with any base
    class, ``bind=True`` and ``autoretry_for``. Called outside a task, a refusal raises
    CircuitOpenError (``"skip"`` still returns None).
    """
    spec = GuardSpec(connection, scope, on_open, record, ignore)

    def decorate(fn: F) -> F:
        if isinstance(fn, Task) or not callable(fn) or hasattr(fn, "__wrapped_task__"):
            raise TypeError("@guarded goes below @app.task (it wraps the task's function)")
        if type(fn).__name__ == "PromiseProxy":
            raise TypeError("@guarded goes below @app.task (it wraps the task's function)")

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            task = get_current_task()
            app = task.app if task is not None else get_current_app()
            return spec.run(task, app, fn, args, kwargs)

        wrapper.__brama_guard__ = spec  # type: ignore[attr-defined]
        return cast(F, wrapper)

    return decorate
