"""What the owner-metrics exporters keep between scrapes.

Written only by the owner's loop thread (through telemetry handlers), read by scrapes in
other threads. Writes are plain dict operations, so a handler costs about a dict update;
readers copy with ``list(d.items())`` / ``dict(d)``, each one atomic under the GIL.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from brama_mq.core.events import CLOSED, HALF_OPEN, OPEN

__all__ = ["ACTIVE_WINDOW_S", "CALL_KINDS", "MODES", "RATES", "STATES", "CircuitBook"]

STATES = (CLOSED, OPEN, HALF_OPEN)
#: ``kind`` label values of the per-breaker call counter, as Resilience4j names them
#: (``not_permitted`` is counted where calls are refused: the guards, see metrics.guard).
CALL_KINDS = ("successful", "failed", "slow")
#: Rates an event or a status row may carry, in percent over the breaker's window.
RATES = ("failure_rate", "slow_call_rate")
#: Operating modes (``configure`` option ``mode``); a breaker without one is ``normal``.
MODES = ("normal", "disabled", "forced_open", "metrics_only")
#: An owner without a journal (which cannot tell whether it is active: see
#: ``CircuitBook.active``) counts as active while it received a delivery this recently. Under
#: single-active-consumer only the active owner gets deliveries; the owner probe
#: (:class:`~brama_mq.metrics.probe.OwnerProbe`) sends one every 10 s so an idle active
#: owner still gets some.
ACTIVE_WINDOW_S = 30.0


class CircuitBook:
    """Circuit states (seeded from the engine at start, then following the events) and
    cumulative counts of events, commands and dead letters."""

    def __init__(self, active_window: float = ACTIVE_WINDOW_S) -> None:
        self.circuits: dict[tuple[str, str], tuple[str, int]] = {}
        #: (scope, connection, kind) -> outcomes reported to the owner.
        self.calls: dict[tuple[str, str, str], int] = {}
        #: (scope, connection) -> {"failure_rate": %, "slow_call_rate": %}, as last seen
        #: (only breakers whose strategy keeps a window report rates).
        self.rates: dict[tuple[str, str], dict[str, float]] = {}
        #: (scope, connection) -> mode, for breakers not in ``normal`` mode.
        self.modes: dict[tuple[str, str], str] = {}
        self.events: dict[str, int] = {}
        self.commands: dict[tuple[str, str], int] = {}
        self.dead_letters: dict[str, int] = {}
        self.active_window = active_window
        self.last_delivery: float | None = None
        self.running = False
        self._owner: Any = None

    def follow(self, owner: Any) -> None:
        """Read ``active`` from ``owner`` itself when it can tell (a journaled owner
        knows whether it took the queue over); the delivery window is the fallback."""
        self._owner = owner

    @staticmethod
    def scope_label(scope: str | None) -> str:
        """Label of a scope: unscoped connections have scope ``""``."""
        return "" if scope is None else scope

    def seed(self, rows: list[Mapping[str, Any]]) -> None:
        """Take every connection's state from an engine's ``statuses()``."""
        for row in rows:
            key = (self.scope_label(row.get("scope")), str(row["connection"]))
            self.circuits[key] = (str(row["state"]), int(row.get("failure_count") or 0))
            self._note_rates(key, row)
            self._note_mode(key, row.get("mode"))

    def apply(self, event: Any) -> None:
        """Count one event and follow it (its ``data`` has the state and failure count)."""
        name = event.event
        events = self.events
        events[name] = events.get(name, 0) + 1
        scope = event.scope
        key = ("" if scope is None else scope, event.connection)
        if name == "connection_removed":
            self.circuits.pop(key, None)
            self.rates.pop(key, None)
            self.modes.pop(key, None)
            for each in CALL_KINDS:
                self.calls.pop((*key, each), None)
            return
        data = event.data
        if name == "success" or name == "failure":
            calls = self.calls
            n = (data.get("count") or 1) if name == "success" else 1
            outcome = (*key, "successful" if name == "success" else "failed")
            calls[outcome] = calls.get(outcome, 0) + n
            if data.get("slow"):
                slow = (*key, "slow")
                calls[slow] = calls.get(slow, 0) + n
            if "failure_rate" in data:  # window policies carry both rates, always together
                self._note_rates(key, data)
        if "mode" in data:  # every event of a breaker not in normal mode, and mode changes
            self._note_mode(key, data["mode"])
        state = data.get("state") or data.get("new_state")
        if state is not None:
            self.circuits[key] = (state, data.get("failure_count") or 0)

    def _note_rates(self, key: tuple[str, str], values: Mapping[str, Any]) -> None:
        found = {name: float(values[name]) for name in RATES
                 if isinstance(values.get(name), (int, float))}
        if found:
            self.rates[key] = found

    def _note_mode(self, key: tuple[str, str], mode: Any) -> None:
        if isinstance(mode, str) and mode != "normal":
            self.modes[key] = mode
        else:
            self.modes.pop(key, None)

    def mode_of(self, scope: str, connection: str) -> str:
        return self.modes.get((scope, connection), "normal")

    def call_counts(self) -> list[tuple[str, str, str, int]]:
        """``(scope, connection, kind, n)`` for every breaker and outcome seen."""
        return [(s, c, k, n) for (s, c, k), n in sorted(list(self.calls.items()))]

    def rate_rows(self) -> list[tuple[str, str, str, float]]:
        """``(scope, connection, rate name, percent)`` for breakers that keep a window."""
        items = sorted(list(self.rates.items()))
        return [(s, c, name, v) for (s, c), rates in items for name, v in sorted(rates.items())]

    def count_commands(self, ops: Mapping[tuple[str, str], int]) -> None:
        commands = self.commands
        for key, n in ops.items():
            commands[key] = commands.get(key, 0) + n
        self.last_delivery = time.monotonic()

    def count_dead_letter(self, reason: str) -> None:
        self.dead_letters[reason] = self.dead_letters.get(reason, 0) + 1
        if reason == "decode":  # never reached the engine: its op is unknown
            key = ("invalid", "decode")
            self.commands[key] = self.commands.get(key, 0) + 1

    @property
    def active(self) -> bool:
        """Whether this owner is the active one: exact for a journaled owner, otherwise
        whether it received a delivery within the active window."""
        owner = self._owner
        if owner is not None and getattr(owner, "journaled", False):
            return self.running and bool(owner.active)
        last = self.last_delivery
        return self.running and last is not None and time.monotonic() - last < self.active_window

    def rows(self) -> list[tuple[str, str, str, int]]:
        """``(scope, connection, state, failure_count)`` for every circuit."""
        items = list(self.circuits.items())
        return [(s, c, state, int(n)) for (s, c), (state, n) in sorted(items)]
