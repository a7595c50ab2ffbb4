"""``brama_guard_checks_total{connection,result}`` for guarded Celery tasks.

Off by default: the guarded task's hot path tests :attr:`GuardCounter.on` (one attribute
of a module-level object) and nothing else. ``enable()`` is called in the Celery main
process before the pool forks (see :mod:`brama_mq.celery.runtime`), so every prefork
child inherits the switch and the counter; prometheus_client's multiprocess mode gives
each child its own file in ``PROMETHEUS_MULTIPROC_DIR``, and the main process serves the
sum of them. ``result`` is the check's outcome: ``closed``, ``probe``, ``open``,
``no-permit``, ``fail-open``, ``fail-closed`` or ``unregistered``.
"""

from __future__ import annotations

import glob
import logging
import os
import tempfile
from typing import Any

__all__ = ["GUARD_CHECKS", "GuardCounter"]

log = logging.getLogger("brama_mq.metrics")


class GuardCounter:
    """The switch and the counter (made by :meth:`enable`)."""

    __slots__ = ("_counter", "_labels", "on", "server")

    def __init__(self) -> None:
        self.on = False
        self._counter: Any = None
        self._labels: dict[tuple[str, str], Any] = {}
        self.server: Any = None

    def count(self, connection: str, result: str) -> None:
        """One check of ``connection`` ended in ``result`` (call only when ``on``)."""
        child = self._labels.get((connection, result))
        if child is None:
            child = self._labels[(connection, result)] = self._counter.labels(connection, result)
        child.inc()

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
            "brama_guard_checks", "Guard checks of guarded tasks, by connection and outcome",
            ["connection", "result"],
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
