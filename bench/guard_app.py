"""The Celery app ``python -m bench guard`` runs in a worker: a plain and a guarded task.

Both bodies do the same bookkeeping: count the run's tasks, and when the last of ``n``
is done write ``{"first": t, "last": t}`` (wall-clock seconds of the first and the last
body) to ``$BENCH_DIR/<run>``. The guarded one is ``@guarded`` on a registered, closed
circuit, so it pays for the check and for reporting a success to the owner.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from celery import Celery

from brama_mq.celery import guarded

CONNECTION = "bench_api"
SCOPE = "bench"

app = Celery("bench-guard", broker=os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"))
app.conf.update(
    brama_prefix=os.environ.get("BENCH_PREFIX") or None,
    task_ignore_result=True,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH_MULTIPLIER", "32")),
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

_runs: dict[str, list[Any]] = {}


def _tick(run: str, n: int) -> None:
    counter = _runs.get(run)
    if counter is None:
        counter = _runs[run] = [0, time.time()]
    counter[0] += 1
    if counter[0] == n:
        out = Path(os.environ.get("BENCH_DIR", "/tmp")) / run
        out.write_text(json.dumps({"first": counter[1], "last": time.time(), "n": n}))


@app.task(name="bench.plain")
def plain(run: str, n: int) -> None:
    _tick(run, n)


@app.task(name="bench.guarded")
@guarded(CONNECTION, scope=SCOPE, on_open="raise")
def guarded_task(run: str, n: int) -> None:
    _tick(run, n)
