"""A real ``celery worker`` subprocess running ``workers.celery_app``, for end-to-end tests.

Each test gets its own brama prefix, Celery queue and fake-service directory through the
environment, so workers of different tests never see each other's tasks or circuits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.worker_proc import ROOT, worker_env


class CeleryWorker:
    """``python -m celery -A workers.celery_app worker ...`` in its own process group."""

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
        self.log_path = log_path
        self.nodename = f"brama-test-{uuid.uuid4().hex[:8]}@%h"
        self._log = open(log_path, "wb")  # noqa: SIM115 (owned by the Popen until close)
        args = [
            sys.executable, "-m", "celery", "-A", app, "worker",
            "--pool", pool, "--concurrency", str(concurrency),
            "--loglevel", "INFO", "-n", self.nodename,
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            *extra,
        ]
        try:
            self.proc = subprocess.Popen(
                args, env=worker_env(settings), cwd=ROOT, stdout=self._log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        except BaseException:
            self._log.close()
            raise

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30.0, count: int = 1) -> str:
        """Poll the log until ``text`` occurs ``count`` times; fail if the worker exits."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.output()
            if out.count(text) >= count:
                return out
            if not self.alive():
                raise AssertionError(f"celery worker exited ({self.proc.returncode}):\n{out}")
            if time.monotonic() > deadline:
                raise AssertionError(f"celery worker did not log {text!r} in {timeout} s:\n{out}")
            time.sleep(0.05)

    def close(self, timeout: float = 15.0) -> None:
        """Warm shutdown (SIGTERM); the whole process group is killed if it lingers."""
        try:
            if self.alive():
                self.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            self._log.close()
