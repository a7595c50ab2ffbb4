"""The owner's metrics on an OpenTelemetry meter (``pip install 'brama-mq[otel]'``).

The same figures as :mod:`brama_mq.metrics.prometheus`, named the same without the
``_total``/``_seconds`` suffixes (OpenTelemetry carries kind and unit itself):
counters ``brama_events{event}``, ``brama_commands{op,result}``,
``brama_dead_letters{reason}``; histogram ``brama_confirm_latency`` (unit ``s``);
observable gauges ``brama_circuit_state{scope,connection,state}``,
``brama_circuit_mode{scope,connection,mode}``,
``brama_failure_count{scope,connection}``, ``brama_owner_active``,
``brama_circuitbreaker_failure_rate`` and ``brama_circuitbreaker_slow_call_rate``
``{scope,connection}``; counter ``brama_circuitbreaker_calls{scope,connection,kind}``.
Export them with whatever reader/exporter the application configured on its ``MeterProvider``::

    from brama_mq.metrics.otel import OtelOwnerMetrics
    OtelOwnerMetrics().attach()          # the global meter provider

``brama_owner_active`` is exact for a journaled owner once it took the queue over, which
happens on its first delivery; in an idle deployment start
:class:`~brama_mq.metrics.probe.OwnerProbe` beside it (the Prometheus endpoint of
``brama-mq worker --metrics-port`` does), which also keeps the delivery-window guess of
an owner without a journal right.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from brama_mq.metrics.book import MODES, RATES, STATES
from brama_mq.metrics.sink import OwnerSink

__all__ = ["OtelOwnerMetrics"]


class OtelOwnerMetrics(OwnerSink):
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

        super().__init__()
        self.handler_id = handler_id
        meter = metrics.get_meter("brama_mq", __version__, meter_provider=meter_provider)
        self.confirm_latency = meter.create_histogram(
            "brama_confirm_latency", unit="s",
            description="From publishing a batch's critical events to acking the batch",
        )
        book = self.book

        def states(_: CallbackOptions) -> Iterable[Observation]:
            for scope, connection, current, _count in book.rows():
                for name in STATES:
                    yield Observation(1 if name == current else 0,
                                      {"scope": scope, "connection": connection, "state": name})

        def modes(_: CallbackOptions) -> Iterable[Observation]:
            for scope, connection, _state, _count in book.rows():
                current = book.mode_of(scope, connection)
                for name in MODES:
                    yield Observation(1 if name == current else 0,
                                      {"scope": scope, "connection": connection, "mode": name})

        def failures(_: CallbackOptions) -> Iterable[Observation]:
            for scope, connection, _state, count in book.rows():
                yield Observation(count, {"scope": scope, "connection": connection})

        def active(_: CallbackOptions) -> Iterable[Observation]:
            yield Observation(1 if book.active else 0)

        def events(_: CallbackOptions) -> Iterable[Observation]:
            for name, n in dict(book.events).items():
                yield Observation(n, {"event": name})

        def commands(_: CallbackOptions) -> Iterable[Observation]:
            for (op, result), n in dict(book.commands).items():
                yield Observation(n, {"op": op, "result": result})

        def dead_letters(_: CallbackOptions) -> Iterable[Observation]:
            for reason, n in dict(book.dead_letters).items():
                yield Observation(n, {"reason": reason})

        def calls(_: CallbackOptions) -> Iterable[Observation]:
            for scope, connection, kind, n in book.call_counts():
                yield Observation(n, {"scope": scope, "connection": connection, "kind": kind})

        def rate(which: str) -> Any:
            def observe(_: CallbackOptions) -> Iterable[Observation]:
                for scope, connection, name, percent in book.rate_rows():
                    if name == which:
                        yield Observation(percent, {"scope": scope, "connection": connection})
            return observe

        meter.create_observable_counter("brama_circuitbreaker_calls", [calls],
                                        description="Outcomes reported, by breaker and kind")
        for name in RATES:
            meter.create_observable_gauge(f"brama_circuitbreaker_{name}", [rate(name)],
                                          unit="%", description=f"{name} over the window")
        meter.create_observable_gauge("brama_circuit_state", [states],
                                      description="1 for the current state, 0 for the others")
        meter.create_observable_gauge("brama_circuit_mode", [modes],
                                      description="1 for the current mode, 0 for the others")
        meter.create_observable_gauge("brama_failure_count", [failures],
                                      description="The connection's failure count")
        meter.create_observable_gauge("brama_owner_active", [active],
                                      description="1 on the active owner, 0 on standbys")
        meter.create_observable_counter("brama_events", [events],
                                        description="Events published")
        meter.create_observable_counter("brama_commands", [commands],
                                        description="Commands consumed")
        meter.create_observable_counter("brama_dead_letters", [dead_letters],
                                        description="Commands dead-lettered")

    def attach(self) -> OtelOwnerMetrics:
        super().attach()
        return self

    def observe_confirm(self, seconds: float) -> None:
        self.confirm_latency.record(seconds)


class OtelAttachment:
    """What :func:`attach_to_owner` started; ``close()`` detaches it."""

    def __init__(self, metrics: OtelOwnerMetrics, probe: Any) -> None:
        self.metrics = metrics
        self.probe = probe

    def close(self) -> None:
        if self.probe is not None:
            self.probe.stop()
        self.metrics.detach()


def attach_to_owner(owner: Any, meter_provider: Any = None, *,
                    probe: bool = True) -> OtelAttachment:
    """``brama-mq worker --otel``: the meter, attached, plus the owner activity probe."""
    from brama_mq.metrics.probe import OwnerProbe

    metrics = OtelOwnerMetrics(meter_provider).attach()
    return OtelAttachment(metrics, OwnerProbe(owner).start() if probe else None)
