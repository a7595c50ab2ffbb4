"""A real ``celery worker`` subprocess running ``workers.celery_app``, for end-to-end tests.

Each test gets its own brama prefix, Celery queue and fake-service directory through the
environment, so workers of different tests never see each other's tasks or circuits.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.worker_proc import LoggedProcess, worker_env


class CeleryWorker(LoggedProcess):
    """``python -m celery -A workers.celery_app worker ...`` in its own process group."""

    label = "celery worker"

    def __init__(
        self,
        log_path: Path,
        settings: Mapping[str, str],
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        app: str = "workers.celery_app",
        extra: Sequence[str] = (),
    ) -> None:
        self.nodename = f"brama-test-{uuid.uuid4().hex[:8]}@%h"
        args = [
            sys.executable, "-m", "celery", "-A", app, "worker",
            "--pool", pool, "--concurrency", str(concurrency),
            "--loglevel", "INFO", "-n", self.nodename,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            *extra,
        ]
        super().__init__(log_path, args, worker_env(settings), new_session=True)

    def close(self, timeout: float = 15.0) -> None:
        """Warm shutdown (SIGTERM); the whole process group is killed if it lingers."""
        self.close_group(timeout)
