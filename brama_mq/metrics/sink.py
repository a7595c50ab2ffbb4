"""The part every owner-metrics exporter shares: telemetry in, a few calls out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from brama_mq import telemetry
from brama_mq.metrics.book import CircuitBook

__all__ = ["OwnerSink"]


class OwnerSink:
    """Follows the owner's telemetry; subclasses say where the numbers go."""

    handler_id = "brama-metrics"

    def __init__(self) -> None:
        self.book = CircuitBook()

    def attach(self) -> Any:
        telemetry.attach(self.handler_id, telemetry.EVENTS, self.handle)
        return self

    def detach(self) -> None:
        telemetry.detach(self.handler_id)

    def handle(self, name: telemetry.EventName, measurements: Mapping[str, Any],
               metadata: Mapping[str, Any]) -> None:
        kind = name[-1]
        if kind == "event":
            event = metadata["event"]
            self.count_event(event.event)
            self.book.apply(event)
        elif kind == "batch":
            self.book.saw_deliveries()
            for (op, result), n in metadata["ops"].items():
                self.count_commands(op, result, n)
        elif kind == "dead_letter":
            reason = metadata["reason"]
            self.count_dead_letter(reason)
            if reason == "decode":  # never reached the engine: its op is unknown
                self.count_commands("invalid", "decode", 1)
        elif kind == "confirm":
            self.observe_confirm(measurements["duration"])
        elif kind == "start":
            self.book.seed(metadata["owner"].engine.statuses())
            self.book.running = True
        elif kind == "stop":
            self.book.running = False

    def count_event(self, event: str) -> None:
        raise NotImplementedError

    def count_commands(self, op: str, result: str, n: int) -> None:
        raise NotImplementedError

    def count_dead_letter(self, reason: str) -> None:
        raise NotImplementedError

    def observe_confirm(self, seconds: float) -> None:
        raise NotImplementedError
