"""Metrics of brama_mq: Prometheus (the ``metrics`` extra) and OpenTelemetry (``otel``).

Both are fed by :mod:`brama_mq.telemetry`, so the owner's loop knows nothing about
them and pays nothing while they are off:

* :func:`serve_owner_metrics` (``brama-mq worker --metrics-port``): ``/metrics`` with the
  circuit states, failure counts, events, commands, dead letters, confirm latency and
  whether this owner is the active one (:mod:`brama_mq.metrics.prometheus`);
* :class:`~brama_mq.metrics.otel.OtelOwnerMetrics`: the same on an OpenTelemetry meter;
* :mod:`brama_mq.metrics.guard`: ``brama_guard_checks_total`` from Celery workers,
  prefork included (prometheus_client's multiprocess mode), off unless a metrics port
  is configured.

Imports of prometheus_client / opentelemetry happen only when a metric is made.
"""

from brama_mq.metrics.book import CircuitBook
from brama_mq.metrics.guard import GUARD_CHECKS

__all__ = ["GUARD_CHECKS", "CircuitBook", "serve_owner_metrics"]


def __getattr__(name: str) -> object:
    if name == "serve_owner_metrics":
        from brama_mq.metrics.prometheus import serve_owner_metrics

        return serve_owner_metrics
    raise AttributeError(f"module 'brama_mq.metrics' has no attribute {name!r}")
