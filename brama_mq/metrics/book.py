"""What the metrics exporters keep between scrapes: each circuit's state and count."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from brama_mq.core.events import CLOSED, HALF_OPEN, OPEN

__all__ = ["ACTIVE_WINDOW_S", "STATES", "CircuitBook"]

STATES = (CLOSED, OPEN, HALF_OPEN)
#: An owner counts as active while it received a delivery this recently. Under
#: single-active-consumer only the active owner gets deliveries; the owner probe
#: (:class:`~brama_mq.metrics.probe.OwnerProbe`) sends one every 10 s so an idle
#: active owner still gets some.
ACTIVE_WINDOW_S = 30.0
_REMOVED = ("connection_removed",)


class CircuitBook:
    """Circuits seen in the owner's events (seeded from its engine at start)."""

    def __init__(self, active_window: float = ACTIVE_WINDOW_S) -> None:
        self._lock = threading.Lock()
        self.circuits: dict[tuple[str, str], tuple[str, int]] = {}
        self.active_window = active_window
        self.last_delivery: float | None = None
        self.running = False

    @staticmethod
    def scope_label(scope: str | None) -> str:
        """Prometheus label of a scope: unscoped connections have scope ``""``."""
        return "" if scope is None else scope

    def seed(self, rows: list[Mapping[str, Any]]) -> None:
        """Take every connection's state from an engine's ``statuses()``."""
        with self._lock:
            for row in rows:
                key = (self.scope_label(row.get("scope")), str(row["connection"]))
                self.circuits[key] = (str(row["state"]), int(row.get("failure_count") or 0))

    def apply(self, event: Any) -> None:
        """Follow one event (its ``data`` carries the current state and failure count)."""
        key = (self.scope_label(event.scope), event.connection)
        with self._lock:
            if event.event in _REMOVED:
                self.circuits.pop(key, None)
                return
            data = event.data
            state = data.get("state") or data.get("new_state")
            if state is None:
                return
            self.circuits[key] = (str(state), int(data.get("failure_count") or 0))

    def saw_deliveries(self) -> None:
        self.last_delivery = time.monotonic()

    @property
    def active(self) -> bool:
        """Whether this owner received a delivery within the active window."""
        last = self.last_delivery
        return self.running and last is not None and time.monotonic() - last < self.active_window

    def rows(self) -> list[tuple[str, str, str, int]]:
        """``(scope, connection, state, failure_count)`` for every circuit."""
        with self._lock:
            return [(s, c, state, n) for (s, c), (state, n) in sorted(self.circuits.items())]
