"""The cost of a guard, against pybreaker, and guarded Celery task throughput, in one run.

* ``check_us``: one check of a closed circuit, ``Guard.admit()``, the call every guarded
  task and ``client.guard`` block makes first (a lookup in this process's local view;
  here a real view on RabbitMQ, fed by a real owner).
* ``guarded_call_us``: a whole ``@client.guarded`` call of a no-op function on a closed
  circuit: check, call, and queueing the success report (sent later by the outbox thread).
* ``pybreaker_memory_us``: ``CircuitBreaker.call(noop)`` of pybreaker in memory, closed.
* ``pybreaker_redis_us``: the same with ``CircuitRedisStorage`` on the local Redis.
* ``vs_pybreaker_memory`` / ``vs_pybreaker_redis``: pybreaker's µs per call divided by
  ``check_us`` (how many times faster the check is); ``*_call`` variants divide by
  ``guarded_call_us``.
* ``celery_ratio``: guarded over unguarded task throughput on the same Celery worker
  (solo pool, prefetch multiplier 32, no result backend), each round draining a queue
  filled beforehand with ``--tasks`` no-op tasks. Plain and guarded rounds alternate;
  the figure is the median, over the ``--rounds`` pairs, of guarded/plain of the two
  rounds of a pair (adjacent in time, so they share the machine's load: on a shared
  machine single rounds vary by 2x). ``celery_ratio_best``: best guarded round over
  best plain round; ``celery_ratio_cpu``: plain over guarded worker CPU per task.
  The guarded rounds report every success to a ``brama-mq worker`` owner subprocess
  running on the same machine, and the run fails unless the owner saw them all (a
  ``success`` event tap sums ``data.count``). ``celery_worker_cpu_us_per_task``: the
  worker's CPU time per task (``/proc``), best round of each kind.

Micro timings are the best of ``--repeat`` runs of ``--calls`` calls (``time.perf_counter``).
Needs RabbitMQ (``--broker`` / ``BRAMA_TEST_BROKER_URL``, default the local one) and
Redis (``--redis``, default ``redis://127.0.0.1:6379/15``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BROKER = os.environ.get("BRAMA_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")

TARGETS: dict[str, tuple[str, float]] = {
    "check_us": ("<=", 1.0),
    "vs_pybreaker_memory": (">=", 1.0),
    "vs_pybreaker_redis": (">=", 100.0),
    "celery_ratio": (">=", 0.95),
}


@dataclass(frozen=True)
class Params:
    broker: str
    redis: str
    calls: int
    redis_calls: int
    repeat: int
    tasks: int
    rounds: int
    celery: bool


def parse(args: list[str]) -> Params:
    parser = argparse.ArgumentParser(prog="python -m bench guard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default=DEFAULT_BROKER)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/15")
    parser.add_argument("--calls", type=int, default=300_000, help="calls per micro timing")
    parser.add_argument("--redis-calls", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=5, help="best of N micro timings")
    parser.add_argument("--tasks", type=int, default=2_000, help="tasks per Celery round")
    parser.add_argument("--rounds", type=int, default=11, help="pairs of rounds")
    parser.add_argument("--no-celery", action="store_true", help="skip the throughput part")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    ns = parser.parse_args(args)
    if ns.quick:
        return Params(ns.broker, ns.redis, 20_000, 200, 2, 300, 1, not ns.no_celery)
    return Params(ns.broker, ns.redis, ns.calls, ns.redis_calls, ns.repeat, ns.tasks,
                  ns.rounds, not ns.no_celery)


def per_call_us(fn: Callable[[], Any], calls: int, repeat: int) -> float:
    """Best of ``repeat`` runs of ``calls`` calls, in µs per call."""
    best = float("inf")
    for _ in range(repeat):
        start = perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, perf_counter() - start)
    return best / calls * 1e6


def noop() -> None:
    return None


# ---------------------------------------------------------------------------- micro


def measure_brama(p: Params, prefix: str) -> dict[str, float]:
    """check_us and guarded_call_us with a view on RabbitMQ fed by the owner subprocess."""
    from brama_mq.client import Brama
    from brama_mq.transport import Topology
    from brama_mq.transport.amqp import AmqpTransport

    transport = AmqpTransport(p.broker, Topology(prefix))
    client = Brama(transport=transport)
    try:
        client.register("bench_api", scope="bench", wait=True)
        guard = client._guard_for("bench_api", "bench", (Exception,), ())
        first = guard.admit()  # starts the view, waits for its snapshot
        if not (first.allowed and first.why == "closed" and guard.key in client.local_view.closed):
            raise RuntimeError(f"the circuit is not closed in the view: {first!r}")
        runtime = client.guard_runtime
        assert runtime is not None
        check = per_call_us(guard.admit, p.calls, p.repeat)
        wrapped = client.guarded("bench_api", scope="bench")(noop)
        # Bounded so the outbox never drops during the timing (it sends in the background).
        calls = min(p.calls, runtime.outbox.max_size // 2)
        best = float("inf")
        for _ in range(p.repeat):
            runtime.outbox.flush(60)
            best = min(best, per_call_us(wrapped, calls, 1))
        runtime.outbox.flush(60)
        dropped = runtime.outbox.counters["dropped"]
        return {"check_us": check, "guarded_call_us": best, "outbox_dropped": dropped}
    finally:
        client.disconnect()
        transport.close()


def measure_pybreaker(p: Params) -> dict[str, float]:
    import pybreaker
    import redis

    memory = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)
    mem_us = per_call_us(lambda: memory.call(noop), p.calls, p.repeat)
    conn = redis.Redis.from_url(p.redis)
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    try:
        storage = pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, conn, namespace=namespace)
        shared = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60, state_storage=storage)
        redis_us = per_call_us(lambda: shared.call(noop), p.redis_calls, max(1, p.repeat // 2))
    finally:
        for key in conn.scan_iter(f"{namespace}*"):
            conn.delete(key)
        conn.close()
    return {"pybreaker_memory_us": mem_us, "pybreaker_redis_us": redis_us}


# ---------------------------------------------------------------------------- celery


class _Proc:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 (owned by the Popen until close)
        self.proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=self._out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=20)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            self._out.close()


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRAMA_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; 0.0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_file(path: Path, timeout: float, proc: _Proc) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            with contextlib.suppress(ValueError):
                data: dict[str, Any] = json.loads(path.read_text())
                return data
        if proc.proc.poll() is not None:
            raise RuntimeError(f"the Celery worker exited:\n{proc.log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"round not done within {timeout} s:\n"
                               f"{proc.log.read_text()[-4000:]}")
        time.sleep(0.02)


def start_owner(p: Params, prefix: str, workdir: Path) -> _Proc:
    """A ``brama-mq worker`` subprocess for ``prefix``; returns once it answers."""
    from brama_mq.client import Brama
    from brama_mq.transport import Topology
    from brama_mq.transport.amqp import AmqpTransport

    env = _env({"BRAMA_PREFIX": prefix, "BRAMA_BROKER_URL": p.broker})
    owner = _Proc([sys.executable, "-m", "brama_mq.cli", "worker", "--log-level", "WARNING"],
                  env, workdir / "owner.log")
    transport = AmqpTransport(p.broker, Topology(prefix))
    client = Brama(transport=transport)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client.snapshot(timeout=1.0)
                return owner
            except Exception:
                if time.monotonic() > deadline or owner.proc.poll() is not None:
                    owner.close()
                    raise RuntimeError(f"no owner:\n{owner.log.read_text()[-4000:]}") from None
                time.sleep(0.2)
    finally:
        client.disconnect()
        transport.close()


def measure_celery(p: Params, prefix: str, workdir: Path) -> dict[str, Any]:
    """Throughput of plain and guarded no-op tasks on one solo worker (see module doc)."""
    from celery import Celery

    from brama_mq.client import Brama
    from brama_mq.transport import Topology
    from brama_mq.transport.amqp import AmqpTransport

    node = f"bench-{uuid.uuid4().hex[:8]}@localhost"
    env = _env({"BENCH_BROKER_URL": p.broker, "BENCH_PREFIX": prefix,
                "BENCH_DIR": str(workdir), "BRAMA_PREFIX": prefix,
                "BRAMA_BROKER_URL": p.broker})
    transport = AmqpTransport(p.broker, Topology(prefix))
    client = Brama(transport=transport)
    sender = Celery("bench-sender", broker=p.broker)
    sender.conf.task_ignore_result = True
    idle_queue = f"{prefix}-idle"
    queues: list[str] = [idle_queue]
    worker: _Proc | None = None
    tap: _SuccessTap | None = None
    try:
        client.register("bench_api", scope="bench", wait=True)
        tap = _SuccessTap(p.broker, transport.topology.events_exchange, "bench.bench_api.success")
        worker = _Proc(
            [sys.executable, "-m", "celery", "-A", "bench.guard_app", "worker", "--pool", "solo",
             "--loglevel", "WARNING", "-n", node, "-Q", idle_queue, "--without-gossip",
             "--without-mingle", "--without-heartbeat"],
            env, workdir / "celery.log",
        )
        deadline = time.monotonic() + 60
        while not sender.control.ping(destination=[node], timeout=0.5):
            if time.monotonic() > deadline or worker.proc.poll() is not None:
                raise RuntimeError(f"no Celery worker:\n{worker.log.read_text()[-4000:]}")

        cpu: dict[str, list[float]] = {"plain": [], "guarded": []}

        def one_round(kind: str, n: int) -> float:
            run = f"{kind}-{uuid.uuid4().hex[:8]}"
            queue = f"{prefix}-{run}"
            queues.append(queue)
            with sender.producer_or_acquire() as producer:
                for _ in range(n):
                    sender.send_task(f"bench.{kind}", args=(run, n), queue=queue,
                                     producer=producer)
            cpu_before = _cpu_seconds(worker.proc.pid)
            sender.control.add_consumer(queue, destination=[node], reply=True, timeout=5)
            try:
                done = _wait_file(workdir / run, 300, worker)
            finally:
                sender.control.cancel_consumer(queue, destination=[node], reply=True,
                                               timeout=5)
            cpu[kind].append((_cpu_seconds(worker.proc.pid) - cpu_before) / n * 1e6)
            return (n - 1) / (done["last"] - done["first"])

        warm = max(50, p.tasks // 10)
        one_round("plain", warm)
        one_round("guarded", warm)  # starts the worker's view and outbox
        plain: list[float] = []
        guarded: list[float] = []
        for _ in range(p.rounds):
            plain.append(one_round("plain", p.tasks))
            guarded.append(one_round("guarded", p.tasks))
        reported = client.status("bench_api", scope="bench")
        expected = warm + p.tasks * p.rounds
        seen = tap.wait(expected, timeout=60)
        if seen != expected:
            raise RuntimeError(f"the owner saw {seen} successes of {expected} guarded tasks")
        pairs = sorted(g / q for q, g in zip(plain, guarded, strict=True))
        mid = len(pairs) // 2
        median = pairs[mid] if len(pairs) % 2 else (pairs[mid - 1] + pairs[mid]) / 2
        return {
            "celery_ratio": median,
            "celery_ratio_best": round(max(guarded) / max(plain), 4),
            "celery_ratio_cpu": round(min(cpu["plain"]) / min(cpu["guarded"]), 4),
            "celery_successes_reported": seen,
            "celery_plain_per_s": max(plain),
            "celery_guarded_per_s": max(guarded),
            "celery_rounds": {"plain": [round(x) for x in plain],
                              "guarded": [round(x) for x in guarded]},
            "celery_state_after": reported["state"],
            "celery_worker_cpu_us_per_task": {k: round(min(v), 1) for k, v in cpu.items() if v},
        }
    finally:
        if worker is not None:
            worker.close()
        if tap is not None:
            tap.close()
        client.disconnect()
        with contextlib.suppress(Exception):
            _delete(p.broker, queues)
        transport.close()
        sender.close()


class _SuccessTap:
    """A plain kombu queue on the events exchange summing ``success`` events' counts, to
    check that every guarded task's success reached the owner (a batched report counts
    ``data.count`` successes)."""

    def __init__(self, url: str, exchange: str, key: str) -> None:
        import kombu

        self.total = 0
        self.conn = kombu.Connection(url)
        channel = self.conn.channel()
        ex = kombu.Exchange(exchange, type="topic", durable=True, passive=True)
        queue = kombu.Queue(f"bench-tap-{uuid.uuid4().hex[:8]}", exchange=ex, routing_key=key,
                            exclusive=True, auto_delete=True, channel=channel)
        queue.declare()
        self.consumer = kombu.Consumer(channel, [queue], on_message=self._on, accept=None)
        self.consumer.consume()

    def _on(self, message: Any) -> None:
        body = json.loads(message.body)
        self.total += int(body.get("data", {}).get("count", 1))
        message.ack()

    def wait(self, expected: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self.total < expected and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError, OSError):
                self.conn.drain_events(timeout=0.2)
        return self.total

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.release()


def _delete(url: str, names: list[str]) -> None:
    """Delete the bench's Celery queues and their exchanges (same names)."""
    from kombu import Connection

    with Connection(url, connect_timeout=5) as conn:
        channel = conn.channel()
        for name in names:
            with contextlib.suppress(Exception):
                channel.queue_delete(name)
            with contextlib.suppress(Exception):
                channel.exchange_delete(name)


def _delete_topology(url: str, prefix: str) -> None:
    from brama_mq.transport import Topology
    from brama_mq.transport.amqp import AmqpTransport

    transport = AmqpTransport(url, Topology(prefix))
    try:
        transport.delete_topology()
    except Exception:
        pass
    finally:
        transport.close()


# ---------------------------------------------------------------------------- main


def run(args: list[str]) -> dict[str, Any]:
    p = parse(args)
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    workdir = Path(tempfile.mkdtemp(prefix="bench-guard-"))
    plain_us = per_call_us(noop, p.calls, p.repeat)
    owner = start_owner(p, prefix, workdir)
    try:
        brama = measure_brama(p, prefix)
        pyb = measure_pybreaker(p)
        celery = measure_celery(p, prefix, workdir) if p.celery else None
    finally:
        owner.close()
        _delete_topology(p.broker, prefix)
    result: dict[str, Any] = {
        "check_us": round(brama["check_us"], 4),
        "pybreaker_memory_us": round(pyb["pybreaker_memory_us"], 4),
        "pybreaker_redis_us": round(pyb["pybreaker_redis_us"], 2),
        "vs_pybreaker_memory": round(pyb["pybreaker_memory_us"] / brama["check_us"], 2),
        "vs_pybreaker_redis": round(pyb["pybreaker_redis_us"] / brama["check_us"], 1),
        "celery_ratio": None,
        "guarded_call_us": round(brama["guarded_call_us"], 4),
        "vs_pybreaker_memory_call": round(
            pyb["pybreaker_memory_us"] / brama["guarded_call_us"], 2),
        "vs_pybreaker_redis_call": round(pyb["pybreaker_redis_us"] / brama["guarded_call_us"], 1),
        "plain_call_us": round(plain_us, 4),
        "outbox_dropped": brama["outbox_dropped"],
    }
    if celery is not None:
        result["celery_ratio"] = round(celery.pop("celery_ratio"), 4)
        result["celery_plain_per_s"] = round(celery.pop("celery_plain_per_s"))
        result["celery_guarded_per_s"] = round(celery.pop("celery_guarded_per_s"))
        result.update(celery)
    try:  # the shared machine's load when the run ended: the ratio's noise follows it
        result["loadavg_1m"] = float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        result["loadavg_1m"] = None
    result["params"] = {"calls": p.calls, "redis_calls": p.redis_calls, "repeat": p.repeat,
                        "tasks": p.tasks, "rounds": p.rounds}
    return result


def _meets(result: dict[str, Any], key: str) -> bool | None:
    value = result.get(key)
    if value is None:
        return None
    op, limit = TARGETS[key]
    return bool(value <= limit) if op == "<=" else bool(value >= limit)


def format_report(result: dict[str, Any]) -> str:
    rows = [
        ("check_us", f"{result['check_us']:.3f} µs"),
        ("guarded_call_us", f"{result['guarded_call_us']:.3f} µs"),
        ("plain_call_us", f"{result['plain_call_us']:.3f} µs"),
        ("pybreaker_memory_us", f"{result['pybreaker_memory_us']:.3f} µs"),
        ("pybreaker_redis_us", f"{result['pybreaker_redis_us']:.1f} µs"),
        ("vs_pybreaker_memory", f"{result['vs_pybreaker_memory']:.1f} x"),
        ("vs_pybreaker_redis", f"{result['vs_pybreaker_redis']:,.0f} x"),
        ("vs_pybreaker_memory_call", f"{result['vs_pybreaker_memory_call']:.1f} x"),
        ("vs_pybreaker_redis_call", f"{result['vs_pybreaker_redis_call']:,.0f} x"),
    ]
    if result.get("celery_ratio") is not None:
        rows += [
            ("celery_plain_per_s", f"{result['celery_plain_per_s']:,}/s"),
            ("celery_guarded_per_s", f"{result['celery_guarded_per_s']:,}/s"),
            ("celery_ratio", f"{result['celery_ratio']:.3f}"),
            ("celery_ratio_best", f"{result['celery_ratio_best']:.3f}"),
            ("celery_ratio_cpu", f"{result['celery_ratio_cpu']:.3f}"),
        ]
    lines = ["brama_mq guard — a check on a closed circuit vs pybreaker; Celery throughput",
             f"{'figure':<26}{'value':>16}  target"]
    for key, value in rows:
        target = ""
        if key in TARGETS:
            op, limit = TARGETS[key]
            met = _meets(result, key)
            target = f"{op} {limit:g}  {'ok' if met else 'MISSED'}"
        lines.append(f"{key:<26}{value:>16}  {target}")
    if "celery_rounds" in result:
        lines.append(f"rounds (tasks/s): {result['celery_rounds']}")
        lines.append("worker CPU µs per task (best round): "
                     f"{result['celery_worker_cpu_us_per_task']}")
    return "\n".join(lines)
