"""Not a test module: the Celery app that the worker of tests/test_celery_canvas.py runs
(``celery -A tests.celery_canvas_app worker``); it has no tests of its own.

Guarded tasks, one per ``on_open`` mode, on one circuit (``svc`` in scope ``canvas``),
and plain ones to build chains, groups and chords with. Configured from the environment
by the test: ``CELERY_BROKER_URL``, ``CANVAS_BACKEND`` (a Redis result backend),
``CANVAS_PREFIX`` (``brama_prefix``, and the results' key prefix), ``CANVAS_QUEUE``,
``CANVAS_ERRBACKS`` (a file the errback appends the failed task ids to).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from brama_mq.celery import guarded, runtime_for_app

CONNECTION, SCOPE = "svc", "canvas"
PREFIX = os.environ.get("CANVAS_PREFIX", "brama-canvas-test")

app = Celery(
    "canvas-test",
    broker=os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("CANVAS_BACKEND", "redis://127.0.0.1:6379/11"),
    set_as_current=False,
)
app.conf.update(
    brama_prefix=PREFIX,
    task_default_queue=os.environ.get("CANVAS_QUEUE", "brama-canvas-test"),
    result_backend_transport_options={"global_keyprefix": f"{PREFIX}:"},
    result_expires=900,
    broker_heartbeat=0,  # a warm shutdown takes 0.1 s instead of waiting for the next one
)


@app.task(name="canvas.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="canvas.retry_add")
@guarded(CONNECTION, scope=SCOPE, on_open="retry")
def retry_add(x: int, y: int) -> int:
    return x + y


@app.task(name="canvas.raise_add")
@guarded(CONNECTION, scope=SCOPE, on_open="raise")
def raise_add(x: int, y: int) -> int:
    return x + y


@app.task(name="canvas.skip_add")
@guarded(CONNECTION, scope=SCOPE, on_open="skip")
def skip_add(x: int, y: int) -> int:
    return x + y


@app.task(name="canvas.collect")
def collect(values: list[Any]) -> list[Any]:
    """A chord callback: the header's results, sorted."""
    return sorted(values)


@app.task(name="canvas.errback")
def errback(task_id: str) -> None:
    """A chain's ``link_error``: note which task failed."""
    with open(os.environ.get("CANVAS_ERRBACKS", os.devnull), "a") as f:
        f.write(task_id + "\n")


@app.task(name="canvas.view_state")
def view_state() -> str | None:
    """What this worker process's local view says of the circuit (once bootstrapped)."""
    view = runtime_for_app(app).view
    view.wait_ready(10)
    return view.state(CONNECTION, SCOPE)
