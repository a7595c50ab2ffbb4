"""Not a test module: the Celery app that the workers of tests/test_celery_step.py run
(``celery -A tests.celery_step_app worker``); it has no tests of its own.

Configured from the environment by the test: ``CELERY_BROKER_URL``, ``STEP_PREFIX``
(given to the app as ``brama_prefix``: the workers get no ``BRAMA_*`` variable),
``STEP_QUEUE`` (the Celery queue), ``STEP_NAME`` (a named subscription, else transient),
``STEP_OUT`` (the file the handler appends a JSON line to per event: the event, and the
pid and thread that handled it).
"""

from __future__ import annotations

import json
import os
import threading

from celery import Celery

from brama_mq.celery import install
from brama_mq.protocol import Event

app = Celery(
    "step-test",
    broker=os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    set_as_current=False,
)
app.conf.update(
    brama_prefix=os.environ.get("STEP_PREFIX"),
    task_default_queue=os.environ.get("STEP_QUEUE", "brama-step-test"),
    broker_heartbeat=0,  # a warm shutdown takes 0.1 s instead of waiting for the next one
)
OUT = os.environ.get("STEP_OUT", os.devnull)
_write = threading.Lock()


def record(event: Event) -> None:
    """Append what arrived, and where it was handled, to ``STEP_OUT``."""
    line = json.dumps({
        "event": event.event, "scope": event.scope, "connection": event.connection,
        "pid": os.getpid(), "thread": threading.current_thread().name,
    })
    with _write, open(OUT, "a") as f:
        f.write(line + "\n")


STEP = install(app, handler=record, events="circuit_opened", scope="payments",
               name=os.environ.get("STEP_NAME") or None)
