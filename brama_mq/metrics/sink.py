"""The part every owner-metrics exporter shares: the owner's telemetry into a book."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from brama_mq import telemetry
from brama_mq.metrics.book import CircuitBook

__all__ = ["OwnerSink"]


class OwnerSink:
    """Follows the owner's telemetry into a :class:`CircuitBook`; exporters read the book
    when they are collected and say where the confirm latencies go."""

    handler_id = "brama-metrics"

    def __init__(self) -> None:
        self.book = CircuitBook()

    def _handlers(self) -> dict[str, telemetry.Handler]:
        return {
            "event": self._on_event,
            "batch": self._on_batch,
            "dead_letter": self._on_dead_letter,
            "confirm": self._on_confirm,
            "start": self._on_start,
            "stop": self._on_stop,
            "takeover": self._on_takeover,
        }

    def attach(self) -> Any:
        """One handler per event name (no dispatch on the owner's per-event path)."""
        for kind, handler in self._handlers().items():
            telemetry.attach(f"{self.handler_id}:{kind}", ("brama", "owner", kind), handler)
        return self

    def detach(self) -> None:
        for kind in self._handlers():
            telemetry.detach(f"{self.handler_id}:{kind}")

    def _on_event(self, _: telemetry.EventName, __: Mapping[str, Any],
                  metadata: Mapping[str, Any]) -> None:
        self.book.apply(metadata["event"])

    def _on_batch(self, _: telemetry.EventName, __: Mapping[str, Any],
                  metadata: Mapping[str, Any]) -> None:
        self.book.count_commands(metadata["ops"])

    def _on_dead_letter(self, _: telemetry.EventName, __: Mapping[str, Any],
                        metadata: Mapping[str, Any]) -> None:
        self.book.count_dead_letter(metadata["reason"])

    def _on_confirm(self, _: telemetry.EventName, measurements: Mapping[str, Any],
                    __: Mapping[str, Any]) -> None:
        self.observe_confirm(measurements["duration"])

    def _on_start(self, _: telemetry.EventName, __: Mapping[str, Any],
                  metadata: Mapping[str, Any]) -> None:
        self.book.follow(metadata["owner"])
        self.book.seed(metadata["owner"].engine.statuses())
        self.book.running = True

    def _on_takeover(self, _: telemetry.EventName, __: Mapping[str, Any],
                     metadata: Mapping[str, Any]) -> None:
        # The registry is the one rebuilt from the journal, not the one seeded at start.
        self.book.circuits.clear()
        self.book.seed(metadata["owner"].engine.statuses())

    def _on_stop(self, *_: Any) -> None:
        self.book.running = False

    def observe_confirm(self, seconds: float) -> None:
        """One batch's publish-to-ack latency."""
        raise NotImplementedError
