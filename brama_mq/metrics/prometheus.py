"""The owner's Prometheus metrics, served by ``brama-mq worker --metrics-port``.

=====================================================  =====================================
``brama_circuit_state{scope,connection,state}``        1 for the current state, 0 for the
                                                       others (``scope=""``: unscoped)
``brama_circuit_mode{scope,connection,mode}``          1 for the current operating mode
                                                       (``normal``, ``disabled``,
                                                       ``forced_open``, ``metrics_only``)
``brama_failure_count{scope,connection}``              the connection's failure count
``brama_circuitbreaker_calls_total{scope,connection,    outcomes reported to the owner, by
kind}``                                                 Resilience4j's kinds ``successful``,
                                                       ``failed``, ``slow`` (the guards
                                                       count ``not_permitted``)
``brama_circuitbreaker_failure_rate{scope,connection}``  percent failed over the breaker's
                                                       window (window strategies only)
``brama_circuitbreaker_slow_call_rate{scope,            percent slow over the window
connection}``
``brama_events_total{event}``                          events published, by type
``brama_commands_total{op,result}``                    commands consumed, by op and outcome
``brama_dead_letters_total{reason}``                   commands dead-lettered, by reason
``brama_confirm_latency_seconds``                      histogram: publish to ack of a batch
                                                       with critical events
``brama_owner_active``                                 1 on the active owner, 0 on standbys
=====================================================  =====================================

Fed by :mod:`brama_mq.telemetry` handlers; the gauges are computed at scrape time from a
:class:`~brama_mq.metrics.book.CircuitBook`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from brama_mq.metrics.book import MODES, RATES, STATES, CircuitBook
from brama_mq.metrics.probe import OwnerProbe
from brama_mq.metrics.sink import OwnerSink

__all__ = ["OwnerMetrics", "OwnerProbe", "serve_owner_metrics"]

log = logging.getLogger("brama_mq.metrics")

CONFIRM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _require_prometheus() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            "metrics need prometheus_client: pip install 'brama-mq[metrics]'"
        ) from exc


class _BookCollector:
    """Everything but the histogram, read from the book at scrape time."""

    def __init__(self, book: CircuitBook) -> None:
        self.book = book

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        book = self.book
        state = GaugeMetricFamily(
            "brama_circuit_state", "1 for the circuit's current state, 0 for the others",
            labels=["scope", "connection", "state"],
        )
        failures = GaugeMetricFamily(
            "brama_failure_count", "The connection's failure count",
            labels=["scope", "connection"],
        )
        mode = GaugeMetricFamily(
            "brama_circuit_mode", "1 for the circuit's current operating mode, 0 for the others",
            labels=["scope", "connection", "mode"],
        )
        for scope, connection, current, count in book.rows():
            for name in STATES:
                state.add_metric([scope, connection, name], 1.0 if name == current else 0.0)
            failures.add_metric([scope, connection], float(count))
            now_mode = book.mode_of(scope, connection)
            for name in MODES:
                mode.add_metric([scope, connection, name], 1.0 if name == now_mode else 0.0)
        active = GaugeMetricFamily(
            "brama_owner_active", "1 on the active owner (it receives commands), 0 on standbys"
        )
        active.add_metric([], 1.0 if book.active else 0.0)
        events = CounterMetricFamily("brama_events", "Events the owner published, by type",
                                     labels=["event"])
        for name, n in sorted(dict(book.events).items()):
            events.add_metric([name], float(n))
        commands = CounterMetricFamily(
            "brama_commands", "Commands the owner consumed, by op and result",
            labels=["op", "result"],
        )
        for (op, result), n in sorted(dict(book.commands).items()):
            commands.add_metric([op, result], float(n))
        dead = CounterMetricFamily("brama_dead_letters", "Commands dead-lettered, by reason",
                                   labels=["reason"])
        for reason, n in sorted(dict(book.dead_letters).items()):
            dead.add_metric([reason], float(n))
        calls = CounterMetricFamily(
            "brama_circuitbreaker_calls",
            "Outcomes reported to the owner, by breaker and kind (Resilience4j's names)",
            labels=["scope", "connection", "kind"],
        )
        for scope, connection, kind, n in book.call_counts():
            calls.add_metric([scope, connection, kind], float(n))
        rates = {
            name: GaugeMetricFamily(
                f"brama_circuitbreaker_{name}",
                f"Percent of calls {'failed' if name == 'failure_rate' else 'slow'} over "
                "the breaker's window",
                labels=["scope", "connection"],
            )
            for name in RATES
        }
        for scope, connection, name, percent in book.rate_rows():
            rates[name].add_metric([scope, connection], percent)
        yield from (state, mode, failures, active, events, commands, dead, calls, *rates.values())


class OwnerMetrics(OwnerSink):
    """The owner's metrics in a registry of their own, fed by telemetry while attached."""

    def __init__(self, registry: Any = None, *, handler_id: str = "brama-prometheus") -> None:
        _require_prometheus()
        from prometheus_client import CollectorRegistry, Histogram

        super().__init__()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.handler_id = handler_id
        self.registry.register(_BookCollector(self.book))
        self.confirm_latency = Histogram(
            "brama_confirm_latency_seconds",
            "From publishing a batch's critical events to acking the batch",
            buckets=CONFIRM_BUCKETS, registry=self.registry,
        )

    def attach(self) -> OwnerMetrics:
        super().attach()
        return self

    def observe_confirm(self, seconds: float) -> None:
        self.confirm_latency.observe(seconds)


class MetricsServer:
    """What :func:`serve_owner_metrics` started; ``close()`` stops all of it."""

    def __init__(self, metrics: OwnerMetrics, server: Any, thread: Any,
                 probe: OwnerProbe | None) -> None:
        self.metrics = metrics
        self.server = server
        self.thread = thread
        self.probe = probe

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        if self.probe is not None:
            self.probe.stop()
        self.metrics.detach()
        self.server.shutdown()
        self.server.server_close()


def serve_owner_metrics(owner: Any, port: int, addr: str = "0.0.0.0", *,
                        probe_interval: float | None = 10.0) -> MetricsServer:
    """Serve ``owner``'s metrics on ``http://addr:port/metrics`` (port 0: any free one).

    Call it before ``owner.run()``, so the start event seeds the circuit states.
    """
    from prometheus_client import start_http_server

    metrics = OwnerMetrics().attach()
    try:
        server, thread = start_http_server(port, addr=addr, registry=metrics.registry)
    except Exception:
        metrics.detach()
        raise
    probe = OwnerProbe(owner, probe_interval).start() if probe_interval else None
    log.info("metrics on http://%s:%d/metrics", addr, server.server_address[1])
    return MetricsServer(metrics, server, thread, probe)
