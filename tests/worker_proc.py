"""``brama-mq worker`` as a real subprocess, for tests that treat it as a black box.

The worker runs ``python -m brama_mq.cli worker`` from this checkout with a clean
``BRAMA_*`` environment (only what the test passes), its stdout and stderr going to one
log file the test can poll and scan.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker_env(settings: Mapping[str, str]) -> dict[str, str]:
    """This environment without any ``BRAMA_*`` variable, plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRAMA_")}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    env.update(settings)
    return env


def run_cli(
    args: Sequence[str], settings: Mapping[str, str], timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run ``brama-mq ARGS`` to completion; stdout and stderr captured separately."""
    return subprocess.run(
        [sys.executable, "-m", "brama_mq.cli", *args],
        env=worker_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class LoggedProcess:
    """A subprocess of this checkout whose stdout and stderr go to one log file that the
    test polls; ``label`` names it in failures."""

    label = "process"

    def __init__(self, log_path: Path, argv: Sequence[str], env: Mapping[str, str],
                 *, new_session: bool = False) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (owned by the Popen until close)
        try:
            self.proc = subprocess.Popen(
                list(argv), env=dict(env), cwd=ROOT, stdout=self._log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=new_session,
            )
        except BaseException:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        """Everything it wrote so far (stdout and stderr, interleaved)."""
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30.0, count: int = 1) -> str:
        """Poll the log until ``text`` occurs ``count`` times; fail if it exits first."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.output()
            if out.count(text) >= count:
                return out
            if not self.alive():
                raise AssertionError(
                    f"{self.label} exited ({self.proc.returncode}) before logging {text!r}:"
                    f"\n{out}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.label} did not log {text!r} within {timeout} s:\n{out}"
                )
            time.sleep(0.02)

    def close_group(self, timeout: float = 15.0) -> None:
        """SIGTERM (a graceful stop), then SIGKILL to its whole process group (it must
        have been started with ``new_session``) if it lingers; closes the log."""
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


class WorkerProcess(LoggedProcess):
    """One ``brama-mq worker`` subprocess; ``close()`` kills it if it still runs."""

    label = "worker"

    def __init__(
        self, log_path: Path, settings: Mapping[str, str], args: Sequence[str] = ()
    ) -> None:
        super().__init__(log_path, [sys.executable, "-m", "brama_mq.cli", "worker", *args],
                         worker_env(settings))

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the owner consumes its queue."""
        self.wait_for_log("owner serving", timeout)

    def wait_active(self, timeout: float = 30.0, count: int = 1) -> None:
        """Until the worker has taken the owner queue ``count`` times (it logs each)."""
        self.wait_for_log("owner active", timeout, count)

    def terminate(self) -> None:
        """SIGTERM: finish and ack the batch in hand, then exit 0."""
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: die at once, acking nothing more."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.alive():
            self.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
        self._log.close()


def kill_and_time_takeover(
    active: WorkerProcess, standby: WorkerProcess, timeout: float = 30.0
) -> float:
    """SIGKILL ``active`` and return the seconds until ``standby`` logs that it took over
    (journal caught up, serving). For tests and benchmarks of failover."""
    before = standby.output().count("owner active")
    t0 = time.monotonic()
    active.kill()
    standby.wait_for_log("owner active", timeout, before + 1)
    return time.monotonic() - t0


def start_worker(
    workers: list[WorkerProcess],
    tmp_path: Path,
    settings: Mapping[str, str],
    *args: str,
    ready: bool = True,
) -> WorkerProcess:
    """Start a worker (added to ``workers``, the fixture that kills them at teardown);
    with ``ready``, wait until it consumes its queue."""
    w = WorkerProcess(tmp_path / f"worker{len(workers)}.log", settings, args)
    workers.append(w)
    if ready:
        w.wait_ready()
    return w
