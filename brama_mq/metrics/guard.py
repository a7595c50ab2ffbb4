"""Guard metrics of guarded Celery tasks, in every pool process, summed by the main one.

=============================================================  ==============================
``brama_guard_checks_total{scope,connection,result}``           every check, by outcome
``brama_circuitbreaker_calls_total{scope,connection,kind}``    ``kind="not_permitted"``: calls
                                                               the guard refused (the owner
                                                               counts the other kinds)
``brama_circuitbreaker_calls_seconds{scope,connection,kind}``  histogram of guarded calls'
                                                               durations, ``kind`` successful
                                                               or failed (Resilience4j's)
=============================================================  ==============================

Off by default: the guarded task's hot path tests :attr:`GuardCounter.on` (one attribute
of a module-level object) and nothing else. ``enable()`` is called in the Celery main
process before the pool forks (see :mod:`brama_mq.celery.runtime`), so every prefork
child inherits the switch and the counter; prometheus_client's multiprocess mode gives
each child its own file in ``PROMETHEUS_MULTIPROC_DIR``, and the main process serves the
sum of them. ``result`` is the check's outcome: ``closed``, ``probe``, ``open``,
``no-permit``, ``fail-open``, ``fail-closed`` or ``unregistered``; ``scope`` is ``""``
for unscoped connections.
"""

from __future__ import annotations

import glob
import logging
import os
import tempfile
from typing import Any

__all__ = ["CALL_BUCKETS", "GUARD_CHECKS", "NOT_PERMITTED", "GuardCounter"]

#: Check results that refuse the call: counted as Resilience4j's ``not_permitted`` calls.
NOT_PERMITTED = frozenset({"open", "no-permit", "fail-closed"})
#: Call-duration buckets (seconds): from a fast remote call to a slow task.
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

log = logging.getLogger("brama_mq.metrics")


class GuardCounter:
    """The switch and the counter (made by :meth:`enable`)."""

    __slots__ = ("_calls", "_counter", "_durations", "_labels", "on", "server")

    def __init__(self) -> None:
        self.on = False
        self._counter: Any = None
        self._calls: Any = None
        self._durations: Any = None
        self._labels: dict[tuple[str, str, str, str], Any] = {}
        self.server: Any = None

    def count(self, connection: str, result: str, scope: str | None = None) -> None:
        """One check of ``connection`` ended in ``result`` (call only when ``on``)."""
        key = ("check", "" if scope is None else scope, connection, result)
        child = self._labels.get(key)
        if child is None:
            child = self._labels[key] = self._counter.labels(*key[1:])
        child.inc()
        if result in NOT_PERMITTED:
            refused = ("refused", key[1], connection, "not_permitted")
            child = self._labels.get(refused)
            if child is None:
                child = self._labels[refused] = self._calls.labels(*refused[1:])
            child.inc()

    def observe_call(self, connection: str, ok: bool, seconds: float,
                     scope: str | None = None) -> None:
        """A guarded call of ``connection`` took ``seconds`` (call only when ``on``)."""
        key = ("duration", "" if scope is None else scope, connection,
               "successful" if ok else "failed")
        child = self._labels.get(key)
        if child is None:
            child = self._labels[key] = self._durations.labels(*key[1:])
        child.observe(seconds)

    def enable(self, port: int, addr: str = "0.0.0.0") -> None:
        """Make the counter and serve ``/metrics`` (all processes summed) on ``port``.

        Call it in the process that forks the pool, before it forks. Without
        ``PROMETHEUS_MULTIPROC_DIR`` a fresh temporary directory is used; files left in
        it by an earlier run are removed (prometheus_client's advice).
        """
        if self.on:
            return
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not directory:
            directory = tempfile.mkdtemp(prefix="brama-prom-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        os.makedirs(directory, exist_ok=True)
        for stale in glob.glob(os.path.join(directory, "*.db")):
            os.remove(stale)
        try:
            from prometheus_client import (
                CollectorRegistry,
                Counter,
                Histogram,
                multiprocess,
                start_http_server,
                values,
            )
        except ImportError as exc:
            raise RuntimeError(
                "guard metrics need prometheus_client: pip install 'brama-mq[metrics]'"
            ) from exc
        # prometheus_client picks its value class at import: if it was imported before
        # the directory was set, pick again (metrics made from now on use the new one)
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
        self._counter = Counter(
            "brama_guard_checks", "Guard checks of guarded tasks, by breaker and outcome",
            ["scope", "connection", "result"],
        )
        self._calls = Counter(
            "brama_circuitbreaker_calls", "Calls the guard refused (kind=not_permitted)",
            ["scope", "connection", "kind"],
        )
        self._durations = Histogram(
            "brama_circuitbreaker_calls_seconds", "Guarded calls' durations, by outcome",
            ["scope", "connection", "kind"], buckets=CALL_BUCKETS,
        )
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        self.server = start_http_server(port, addr=addr, registry=registry)
        self.on = True
        log.info("brama guard metrics on :%d/metrics (multiprocess dir %s)", port, directory)

    def process_dead(self, pid: int) -> None:
        """A pool child exited (its counts stay in the sum)."""
        if self.on:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


GUARD_CHECKS = GuardCounter()
