"""Celery integration: guarded tasks with a per-process local view and outcome reporting.

This is the only brama_mq package that imports Celery (the ``celery`` extra)::

    from brama_mq.celery import GuardedTask, guarded

    @app.task(bind=True)
    @guarded("payment_api", scope="payments", on_open="retry")
    def charge(self, order_id): ...

and, to receive brama_mq events in every worker's main process (a consumer bootstep)::

    from brama_mq.celery import install

    install(app, handler=on_open, events="circuit_opened", scope="payments")

Settings come from the Celery app's configuration (``brama_broker_url``, default the
Celery broker; ``brama_prefix``; ``brama_fail_mode``; ``brama_view_max_staleness``; see
:mod:`brama_mq.celery.runtime`). Semantics: :mod:`brama_mq.celery.task` (guarded tasks,
canvas, the ``SKIPPED`` state) and :mod:`brama_mq.celery.step` (events in the worker).
"""

from brama_mq.celery.runtime import app_settings, runtime_for_app, shutdown_runtimes
from brama_mq.celery.step import EventsStep, install
from brama_mq.celery.task import ON_OPEN, SKIPPED, GuardedTask, GuardSpec, guarded
from brama_mq.errors import CircuitOpenError

__all__ = [
    "ON_OPEN",
    "SKIPPED",
    "CircuitOpenError",
    "EventsStep",
    "GuardSpec",
    "GuardedTask",
    "app_settings",
    "guarded",
    "install",
    "runtime_for_app",
    "shutdown_runtimes",
]
