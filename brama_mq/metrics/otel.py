"""The owner's metrics on an OpenTelemetry meter (``pip install 'brama-mq[otel]'``).

The same figures as :mod:`brama_mq.metrics.prometheus`, named the same without the
``_total``/``_seconds`` suffixes (OpenTelemetry carries kind and unit itself):
counters ``brama_events{event}``, ``brama_commands{op,result}``,
``brama_dead_letters{reason}``; histogram ``brama_confirm_latency`` (unit ``s``);
observable gauges ``brama_circuit_state{scope,connection,state}``,
``brama_failure_count{scope,connection}``, ``brama_owner_active``. Export them with
whatever reader/exporter the application configured on its ``MeterProvider``::

    from brama_mq.metrics.otel import OtelOwnerMetrics
    OtelOwnerMetrics().attach()          # the global meter provider
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from brama_mq import telemetry
from brama_mq.metrics.book import STATES, CircuitBook

__all__ = ["OtelOwnerMetrics"]


class OtelOwnerMetrics:
    """Instruments on a meter of ``meter_provider`` (default: the global one)."""

    def __init__(self, meter_provider: Any = None, *,
                 handler_id: str = "brama-opentelemetry") -> None:
        try:
            from opentelemetry import metrics
            from opentelemetry.metrics import CallbackOptions, Observation
        except ImportError as exc:
            raise RuntimeError(
                "OpenTelemetry metrics need opentelemetry-api: pip install 'brama-mq[otel]'"
            ) from exc
        from brama_mq import __version__

        self._observation = Observation
        self.handler_id = handler_id
        self.book = CircuitBook()
        meter = metrics.get_meter("brama_mq", __version__, meter_provider=meter_provider)
        self.events = meter.create_counter("brama_events", description="Events published")
        self.commands = meter.create_counter("brama_commands", description="Commands consumed")
        self.dead_letters = meter.create_counter("brama_dead_letters",
                                                 description="Commands dead-lettered")
        self.confirm_latency = meter.create_histogram(
            "brama_confirm_latency", unit="s",
            description="From publishing a batch's critical events to acking the batch",
        )

        def states(_: CallbackOptions) -> Iterable[Observation]:
            for scope, connection, current, _count in self.book.rows():
                for name in STATES:
                    yield Observation(1 if name == current else 0,
                                      {"scope": scope, "connection": connection, "state": name})

        def failures(_: CallbackOptions) -> Iterable[Observation]:
            for scope, connection, _state, count in self.book.rows():
                yield Observation(count, {"scope": scope, "connection": connection})

        def active(_: CallbackOptions) -> Iterable[Observation]:
            yield Observation(1 if self.book.active else 0)

        meter.create_observable_gauge("brama_circuit_state", [states],
                                      description="1 for the current state, 0 for the others")
        meter.create_observable_gauge("brama_failure_count", [failures],
                                      description="The connection's failure count")
        meter.create_observable_gauge("brama_owner_active", [active],
                                      description="1 on the active owner, 0 on standbys")

    def attach(self) -> OtelOwnerMetrics:
        telemetry.attach(self.handler_id, telemetry.EVENTS, self.handle)
        return self

    def detach(self) -> None:
        telemetry.detach(self.handler_id)

    def handle(self, name: telemetry.EventName, measurements: Mapping[str, Any],
               metadata: Mapping[str, Any]) -> None:
        kind = name[-1]
        if kind == "event":
            event = metadata["event"]
            self.events.add(1, {"event": event.event})
            self.book.apply(event)
        elif kind == "batch":
            self.book.saw_deliveries()
            for (op, result), n in metadata["ops"].items():
                self.commands.add(n, {"op": op, "result": result})
        elif kind == "dead_letter":
            reason = metadata["reason"]
            self.dead_letters.add(1, {"reason": reason})
            if reason == "decode":
                self.commands.add(1, {"op": "invalid", "result": "decode"})
        elif kind == "confirm":
            self.confirm_latency.record(measurements["duration"])
        elif kind == "start":
            self.book.seed(metadata["owner"].engine.statuses())
            self.book.running = True
        elif kind == "stop":
            self.book.running = False
