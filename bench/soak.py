"""Soak: mixed load for minutes while the active owner is SIGKILLed every few seconds.

What it drives, on a fresh name prefix of the broker ``BRAMA_BENCH_BROKER_URL`` (default
``amqp://guest:guest@127.0.0.1:5672//``), everything it declared deleted at the end:

* two ``brama-mq worker`` processes (``python -m brama_mq.cli worker``): the first to
  consume is the active owner (single active consumer), the other a hot standby. Every
  ``--kill-every`` seconds the active one (the oldest alive: SAC hands the queue on in
  consumer order) is SIGKILLed and a fresh standby is started, so there are always two;
* a :class:`brama_mq.client.Brama` sending ``--rate`` commands/s over ``--connections``
  connections (``max_attempts=3``, an hour's expiry so no timer fires), each cycling
  through ``success, failure, failure, failure (opens), close``: every cycle has four
  critical events (``circuit_opened``, ``state_change``, ``circuit_closed``,
  ``state_change``) and every command's effect depends on the state the previous ones
  left, so a takeover that lost state or ``seq`` shows up as wrong or missing events;
* a durable queue bound to every critical event, declared before the load, consumed
  and acked by a plain py-amqp consumer in its own thread.

Figures (``--json`` keys):

* ``takeover_s``: the worst, over the kills, of SIGKILL -> the first reply to a
  ``status`` query sent right after it (the query waits behind the commands already
  queued, so it is "service restored", not only "consumer switched"); every kill is in
  ``counts.takeovers_s``;
* ``commands_per_s``: commands sent / the load's duration (every one of them is applied
  by the end: the run waits for the owner queue to drain);
* ``memory_growth_ratio``: the active owner's RSS (sampled every second, whichever
  process holds the role) over the last fifth of the run, median, against the median of
  the second fifth (the first fifth is warm-up);
* ``lost_events``: critical events ``(scope, connection, seq, event)`` that replaying the
  same commands through a local :class:`brama_mq.core.Engine` produces but the durable
  queue never received; ``counts.unexpected_events`` are received ones the replay does
  not produce (a takeover that lost state), ``counts.duplicate_events`` repeats.

``python -m bench soak [--json] [--minutes N | --seconds S] [--kill-every S]
[--rate R] [--connections C]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672//"
ROOT = Path(__file__).resolve().parent.parent
SCOPE = "soak"
CRITICAL = ("state_change", "circuit_opened", "circuit_closed", "circuit_half_opened",
            "circuit_reset")
CYCLE = ("success", "failure", "failure", "failure", "close")
POLICY = {"max_attempts": 3, "expiry_ms": 3_600_000}


class Worker:
    """One ``brama-mq worker`` process; its output goes to a log file."""

    def __init__(self, log_path: Path, env: dict[str, str]) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (owned by the Popen)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "brama_mq.cli", "worker"],
            env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.started = time.monotonic()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_bytes(self) -> int | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def wait_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while "owner serving" not in self.log_path.read_text(errors="replace"):
            if not self.alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"worker did not start:\n{self.log_path.read_text(errors='replace')[-2000:]}"
                )
            time.sleep(0.05)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


class Sink:
    """A durable queue bound to every critical event, drained in a thread."""

    def __init__(self, url: str, exchange: str, queue: str) -> None:
        from urllib.parse import unquote, urlparse

        import amqp

        u = urlparse(url)
        self.conn = amqp.Connection(
            f"{u.hostname or '127.0.0.1'}:{u.port or 5672}",
            userid=unquote(u.username or "guest"), password=unquote(u.password or "guest"),
            virtual_host=unquote(u.path[1:]) or "/",
        )
        self.conn.connect()
        self.ch = self.conn.channel()
        self.queue = queue
        self.ch.queue_declare(queue, durable=True, auto_delete=False)
        for event in CRITICAL:
            self.ch.queue_bind(queue, exchange, f"*.*.{event}")
        self.ch.basic_qos(0, 2000, False)
        self.seen: list[tuple[Any, ...]] = []
        self._stop = threading.Event()
        self.last = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="soak-sink", daemon=True)

    def start(self) -> None:
        self.ch.basic_consume(self.queue, callback=self._on_message)
        self._thread.start()

    def _on_message(self, msg: Any) -> None:
        import json

        body = json.loads(msg.body)
        self.seen.append((body.get("scope"), body["connection"], body["seq"], body["event"],
                          body["id"]))
        self.last = time.monotonic()
        self.ch.basic_ack(msg.delivery_tag)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                self.conn.drain_events(timeout=0.2)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self.ch.queue_delete(self.queue)
        with contextlib.suppress(Exception):
            self.conn.close()


def _expected(names: list[str], sent: dict[str, int]) -> set[tuple[Any, ...]]:
    """Critical events the same commands produce on a local engine, in order per name."""
    from brama_mq.core import Engine
    from brama_mq.protocol import make_command

    engine = Engine()
    out: set[tuple[Any, ...]] = set()
    now = 1
    for name in names:
        ops = ["register"] + [CYCLE[i % len(CYCLE)] for i in range(sent[name])]
        for op in ops:
            options = POLICY if op == "register" else None
            result = engine.apply(make_command(op, name, SCOPE, options=options, now_ms=now), now)
            now += 1
            for ev in result.events:
                if ev.event in CRITICAL:
                    out.add((ev.scope, ev.connection, ev.seq, ev.event))
    return out


def _rss_series(samples: list[tuple[float, int]], start: float, end: float) -> tuple[int, int]:
    """Median RSS of the second fifth and of the last fifth of [start, end]."""
    span = end - start

    def window(lo: float, hi: float) -> list[int]:
        return [rss for t, rss in samples if start + lo * span <= t <= start + hi * span]

    early, late = window(0.2, 0.4), window(0.8, 1.0)
    if not early or not late:
        raise RuntimeError("too few memory samples: run longer")
    return int(statistics.median(early)), int(statistics.median(late))


def run(args: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench soak")
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--kill-every", type=float, default=15.0)
    parser.add_argument("--rate", type=float, default=800.0)
    parser.add_argument("--connections", type=int, default=200)
    opts = parser.parse_args(args)
    seconds = opts.seconds if opts.seconds is not None else 60.0 * (opts.minutes or 1.0)
    url = os.environ.get("BRAMA_BENCH_BROKER_URL", DEFAULT_URL)
    prefix = f"soak-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="brama-soak-") as tmp:
        return _soak(url, prefix, Path(tmp), seconds, opts.kill_every, opts.rate,
                     opts.connections)


def _soak(url: str, prefix: str, tmp: Path, seconds: float, kill_every: float, rate: float,
          connections: int) -> dict[str, Any]:
    from brama_mq.client import Brama
    from brama_mq.errors import NotRegisteredError
    from brama_mq.transport import Topology
    from brama_mq.transport.amqp import AmqpTransport

    topo = Topology(prefix)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRAMA_")}
    env.update(BRAMA_BROKER_URL=url, BRAMA_PREFIX=prefix, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p))
    workers: list[Worker] = []
    logs: list[Path] = []

    def spawn() -> Worker:
        w = Worker(tmp / f"worker{len(logs)}.log", env)
        logs.append(w.log_path)
        workers.append(w)
        return w

    sink: Sink | None = None
    client: Brama | None = None
    try:
        spawn().wait_serving()
        spawn().wait_serving()
        sink = Sink(url, topo.events_exchange, f"{prefix}.soak-sink")
        sink.start()
        client = Brama(url, prefix=prefix, request_timeout=30)
        names = [f"c{i}" for i in range(connections)]
        for name in names:
            client.register(name, scope=SCOPE, **POLICY)
        sent = dict.fromkeys(names, 0)
        memory: list[tuple[float, int]] = []
        takeovers: list[float] = []
        kill_lock = threading.Lock()
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(1.0):
                with kill_lock:
                    active = workers[0] if workers else None
                rss = active.rss_bytes() if active is not None else None
                if rss:
                    memory.append((time.monotonic(), rss))

        sampler = threading.Thread(target=sample, name="soak-rss", daemon=True)
        sampler.start()
        start = time.monotonic()
        next_kill = start + kill_every
        count = 0
        interval = 1.0 / rate
        pending_probe: float | None = None
        while True:
            now = time.monotonic()
            if now - start >= seconds:
                break
            if now >= next_kill:
                workers[1].wait_serving()  # the standby is up (started a period ago)
                with kill_lock:
                    victim = workers.pop(0)
                    victim.kill()
                    killed_at = time.monotonic()
                pending_probe = killed_at
                spawn()  # the next standby, checked before the next kill
                next_kill = now + kill_every
            name = names[count % connections]
            op = CYCLE[sent[name] % len(CYCLE)]
            getattr(client, op)(name, scope=SCOPE)
            sent[name] += 1
            count += 1
            if pending_probe is not None:
                with contextlib.suppress(NotRegisteredError):  # still an answer
                    client.status(names[0], scope=SCOPE)  # from the new active owner
                takeovers.append(time.monotonic() - pending_probe)
                pending_probe = None
            lag = start + count * interval - time.monotonic()
            if lag > 0:
                time.sleep(lag)
        load_s = time.monotonic() - start
        stop.set()
        sampler.join(5)
        with contextlib.suppress(NotRegisteredError):
            client.status(names[0], scope=SCOPE)  # every command before it is applied
        expected = _expected(names, sent)
        deadline = time.monotonic() + 30  # the stragglers of the last batches
        while time.monotonic() < deadline:
            got = {s[:4] for s in sink.seen}
            if expected <= got and time.monotonic() - sink.last > 1.0:
                break
            time.sleep(0.2)
        seen = list(sink.seen)
        got = {s[:4] for s in seen}
        dupes = sum(n - 1 for n in Counter(s[:4] for s in seen).values() if n > 1)
        same_id = all(
            len({s[4] for s in seen if s[:4] == key}) == 1
            for key, n in Counter(s[:4] for s in seen).items() if n > 1
        )
        early, late = _rss_series(memory, start, start + load_s)
        return {
            "takeover_s": round(max(takeovers), 3) if takeovers else None,
            "commands_per_s": round(count / load_s, 1),
            "memory_growth_ratio": round(late / early, 3),
            "lost_events": len(expected - got),
            "counts": {
                "seconds": round(load_s, 1),
                "commands": count + connections,
                "kills": len(takeovers),
                "takeovers_s": [round(t, 3) for t in takeovers],
                "critical_expected": len(expected),
                "critical_received": len(seen),
                "duplicate_events": dupes,
                "duplicates_share_id": same_id,
                "unexpected_events": len(got - expected),
                "rss_early_mb": round(early / 2**20, 1),
                "rss_late_mb": round(late / 2**20, 1),
                "rate_target": rate,
                "connections": connections,
            },
        }
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.disconnect()
        if sink is not None:
            sink.close()
        for w in workers:
            w.stop()
        with contextlib.suppress(Exception):
            t = AmqpTransport(url, topo)
            t.delete_topology()
            t.close()


def format_report(result: dict[str, Any]) -> str:
    c = result["counts"]
    return "\n".join([
        f"soak: {c['seconds']} s, {c['commands']} commands, {c['kills']} owner kills",
        f"  takeover_s (worst)    {result['takeover_s']}   all: {c['takeovers_s']}",
        f"  commands_per_s        {result['commands_per_s']} (target rate {c['rate_target']})",
        f"  memory_growth_ratio   {result['memory_growth_ratio']} "
        f"({c['rss_early_mb']} MB -> {c['rss_late_mb']} MB, active owner RSS)",
        f"  lost_events           {result['lost_events']} of {c['critical_expected']} critical"
        f" (received {c['critical_received']}, duplicates {c['duplicate_events']}, "
        f"unexpected {c['unexpected_events']})",
    ])
