"""One fault on a live deployment on a :class:`~tests.cluster.PrivateCluster`, and what it
did: the scenario of the cluster tests and of ``python -m bench cluster``.

The deployment, as a user would run it on three nodes:

* two ``brama-mq worker`` processes given the failover list, the first starting at c1
  (it declares the topology there, so c1 leads the owner queue and the streams, and it
  becomes the active owner), the second at c2 (a standby);
* a producer (a :class:`brama_mq.Brama` in this process, failover list from c3) streaming
  ``register`` + 3 failures (``max_attempts=3``) for each of N connections, paced; the
  fault is injected once 40 % of the stream is sent;
* an independent observer: a quorum queue on c2, bound ``#`` to the events exchange before
  any load, consumed live by plain py-amqp from c2 (never the faulted node), recording
  every event with the time it arrived.

What is checked afterwards (:meth:`Outcome.problems`): every circuit is open, asked of the
owner; no critical event lost; no ``seq`` gap (every connection's events 1..7 arrived);
never two owners applying in the same epoch (events with one ``(connection, epoch, seq)``
are identical, and the workers' takeover epochs are disjoint); both workers alive.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import amqp

from brama_mq.client import Brama
from brama_mq.transport import Topology
from brama_mq.transport.amqp import AmqpTransport
from tests.brokers import delete_names
from tests.cluster import NET_TICKTIME, PrivateCluster
from tests.worker_proc import WorkerProcess

#: The workers' heartbeat: a silent connection is noticed after ~2 of them (8 s, the
#: tests' net_ticktime) and the owner's lease is half of one (2 s).
HEARTBEAT_S = 4
#: Events per connection: registration, connection_registered, 3 failures,
#: circuit_opened, state_change.
EVENTS_PER_CONNECTION = 7
CRITICAL = ("circuit_opened", "state_change")
_EPOCH_RE = re.compile(r"owner active:.*?epoch (\d+)")


@dataclass
class Arrival:
    """One event as the observer got it."""

    at: float  # time.monotonic() when it arrived
    body: dict[str, Any]


class Observer:
    """A quorum queue bound ``#`` to the events exchange, read live from one node."""

    def __init__(self, url_port: int, topology: Topology) -> None:
        self.queue = f"{topology.prefix}.observer"
        self._port = url_port
        self._exchange = topology.events_exchange
        self.arrivals: list[Arrival] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.errors: list[str] = []
        conn = self._connect()
        ch = conn.channel()
        ch.exchange_declare(self._exchange, "topic", durable=True, auto_delete=False)
        ch.queue_declare(self.queue, durable=True, auto_delete=False,
                         arguments={"x-queue-type": "quorum"})
        ch.queue_bind(self.queue, self._exchange, "#")
        conn.close()
        self._thread = threading.Thread(target=self._run, name="observer", daemon=True)
        self._thread.start()

    def _connect(self) -> amqp.Connection:
        conn = amqp.Connection(f"127.0.0.1:{self._port}", connect_timeout=5, heartbeat=0)
        conn.connect()
        return conn

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn = self._connect()
                ch = conn.channel()
                ch.basic_qos(0, 1000, False)
                ch.basic_consume(self.queue, callback=functools.partial(self._on_message, ch))
                while not self._stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        conn.drain_events(timeout=0.2)
                with contextlib.suppress(Exception):
                    conn.close()
            except Exception as exc:  # the observer rides through too: it reconnects
                self.errors.append(repr(exc))
                self._stop.wait(0.5)

    def _on_message(self, ch: Any, msg: Any) -> None:
        try:
            body = json.loads(msg.body)
        except ValueError:
            body = {"_raw": msg.body}
        with self._lock:
            self.arrivals.append(Arrival(time.monotonic(), body))
        ch.basic_ack(msg.delivery_tag)

    def events(self) -> list[Arrival]:
        with self._lock:
            return list(self.arrivals)

    def wait_for(self, done: Callable[[list[Arrival]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done(self.events()):
                return True
            time.sleep(0.2)
        return done(self.events())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@dataclass
class Outcome:
    """What one scenario did; :meth:`problems` lists every broken promise."""

    fault: str
    connections: int
    fault_at: float  # time.monotonic() when the fault was injected
    recovery_s: float | None  # fault -> first event applied after it, at the observer
    longest_pause_s: float  # longest silence at the observer from the fault on
    states: dict[str, str]
    arrivals: list[Arrival]
    worker_epochs: list[list[int]]
    workers_alive: list[bool]
    worker_logs: list[str]
    producer_error: str | None = None
    sent_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def by_connection(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for a in self.arrivals:
            if "connection" in a.body:
                out[str(a.body["connection"])].append(a.body)
        return out

    def problems(self) -> list[str]:
        out: list[str] = []
        if self.producer_error:
            out.append(f"producer failed: {self.producer_error}")
        not_open = sorted(c for c, s in self.states.items() if s != "open")
        missing = self.connections - len(self.states)
        if not_open or missing:
            out.append(f"{len(not_open)} circuits not open ({not_open[:5]}), "
                       f"{missing} unknown to the owner")
        seen = self.by_connection()
        lost, gaps, forks = [], [], []
        for name in (f"c{i:04d}" for i in range(self.connections)):
            events = seen.get(name, [])
            kinds = {e["event"] for e in events}
            lost += [f"{name}:{k}" for k in CRITICAL if k not in kinds]
            seqs = {int(e["seq"]) for e in events}
            want = set(range(1, EVENTS_PER_CONNECTION + 1))
            if seqs != want:
                gaps.append(f"{name}: missing seq {sorted(want - seqs)}, extra "
                            f"{sorted(seqs - want)}")
            copies: dict[tuple[int, int], set[str]] = defaultdict(set)
            for e in events:
                same = json.dumps([e["event"], e["timestamp"], e["data"]], sort_keys=True)
                copies[(int(e.get("epoch", 0)), int(e["seq"]))].add(same)
            forks += [f"{name} epoch {k[0]} seq {k[1]}" for k, v in copies.items() if len(v) > 1]
        if lost:
            out.append(f"{len(lost)} critical events lost: {lost[:6]}")
        if gaps:
            out.append(f"{len(gaps)} connections with seq gaps: {gaps[:4]}")
        if forks:
            out.append(f"two different events in one epoch and seq: {forks[:4]}")
        mine = [set(e) for e in self.worker_epochs]
        if len(mine) == 2 and mine[0] & mine[1]:
            out.append(f"both workers took over in epochs {sorted(mine[0] & mine[1])}")
        if not all(self.workers_alive):
            out.append(f"workers alive: {self.workers_alive}")
        return out

    def report(self) -> str:
        """A failure message: the problems and the workers' last words."""
        logs = "\n".join(f"--- worker {i}\n{log[-6000:]}" for i, log in enumerate(self.worker_logs))
        return (f"{self.fault}: " + "; ".join(self.problems())
                + f"\nrecovery {self.recovery_s} s, pause {self.longest_pause_s:.2f} s, "
                f"notes {self.notes}\n{logs}")


Fault = Callable[[PrivateCluster], None]


def run_scenario(
    cluster: PrivateCluster,
    tmp_path: Path,
    prefix: str,
    fault_name: str,
    fault: Fault,
    *,
    connections: int = 200,
    rate: float = 60.0,
    settle_timeout: float = 120.0,
    after_fault: Fault | None = None,
    hold_s: float = 0.0,
) -> Outcome:
    """Deploy under ``prefix``, stream the commands, inject ``fault`` at 40 %; after
    ``hold_s`` seconds run ``after_fault`` (thaw, heal); collect the outcome."""
    topology = Topology(prefix)
    settings = {"BRAMA_PREFIX": prefix, "BRAMA_HEARTBEAT": str(HEARTBEAT_S),
                "BRAMA_LOG_LEVEL": "INFO"}
    workers: list[WorkerProcess] = []
    observer: Observer | None = None
    client: Brama | None = None
    transport: AmqpTransport | None = None
    try:
        first = WorkerProcess(tmp_path / f"{prefix}-w0.log",
                              {**settings, "BRAMA_BROKER_URL": cluster.url_from(0)})
        workers.append(first)
        first.wait_active(60)
        second = WorkerProcess(tmp_path / f"{prefix}-w1.log",
                               {**settings, "BRAMA_BROKER_URL": cluster.url_from(1)})
        workers.append(second)
        second.wait_ready(60)
        observer = Observer(cluster.nodes[1].port, topology)
        transport = AmqpTransport(cluster.url_from(2), topology, heartbeat=HEARTBEAT_S,
                                  connect_timeout=3, reconnect_timeout=120)
        client = Brama(transport=transport, request_timeout=30)
        commands: list[tuple[str, str]] = []
        for i in range(connections):
            name = f"c{i:04d}"
            commands += [("register", name)] + [("failure", name)] * 3
        started = threading.Event()
        fault_at: list[float] = []
        error: list[str] = []
        t_sent: list[float] = []
        brama = client

        def produce() -> None:
            t0 = time.monotonic()
            try:
                for k, (op, name) in enumerate(commands):
                    if k == int(len(commands) * 0.4):
                        started.set()
                    if op == "register":
                        brama.register(name, max_attempts=3, expiry_ms=3_600_000)
                    else:
                        brama.failure(name, reason="timeout")
                    delay = t0 + (k + 1) / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                brama.flush(120)
            except Exception as exc:
                error.append(repr(exc))
            finally:
                started.set()
                t_sent.append(time.monotonic() - t0)

        producer = threading.Thread(target=produce, name="producer", daemon=True)
        producer.start()
        started.wait(120)
        fault_at.append(time.monotonic())
        fault(cluster)
        if after_fault is not None:
            time.sleep(hold_s)
            after_fault(cluster)
        producer.join(settle_timeout)
        want = connections * EVENTS_PER_CONNECTION
        observer.wait_for(lambda a: _distinct(a) >= want, settle_timeout)
        time.sleep(1.0)  # stragglers (duplicates) land too
        try:
            states = {str(s["connection"]): str(s["state"]) for s in brama.snapshot()}
        except Exception as exc:
            states = {}
            error.append(f"snapshot: {exc!r}")
        arrivals = observer.events()
        recovery, pause = _recovery(arrivals, fault_at[0])
        logs = [w.output() for w in workers]
        return Outcome(
            fault=fault_name, connections=connections, fault_at=fault_at[0],
            recovery_s=recovery, longest_pause_s=pause, states=states, arrivals=arrivals,
            worker_epochs=[[int(m) for m in _EPOCH_RE.findall(log)] for log in logs],
            workers_alive=[w.alive() for w in workers], worker_logs=logs,
            producer_error="; ".join(error) or None, sent_s=t_sent[0] if t_sent else 0.0,
            notes=observer.errors[:3],
        )
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.disconnect()
        if transport is not None:
            transport.close()
        if observer is not None:
            observer.close()
        for w in workers:
            w.close()


def _distinct(arrivals: list[Arrival]) -> int:
    return len({(a.body.get("connection"), a.body.get("seq")) for a in arrivals})


def _recovery(arrivals: list[Arrival], fault_at: float) -> tuple[float | None, float]:
    """Seconds from the fault to the first event *applied* after it reaching the
    observer (events already under way do not count), and the longest silence at the
    observer from the fault until the last event."""
    wall_fault_ms = (time.time() - (time.monotonic() - fault_at)) * 1000
    recovery = None
    for a in arrivals:
        if a.at >= fault_at and a.body.get("timestamp", 0) > wall_fault_ms + 50:
            recovery = a.at - fault_at
            break
    times = [fault_at] + [a.at for a in arrivals if a.at >= fault_at]
    pause = max((b - a for a, b in itertools.pairwise(times)), default=0.0)
    return recovery, pause


def restore(cluster: PrivateCluster) -> None:
    """Undo every fault: thaw, heal, restart killed nodes; wait until all three run.

    A node frozen or cut off past net_ticktime may come back still seeing only itself
    (the others wrote it off, pause_minority un-paused it alone): such a node is killed
    and started again from its data, which is how an operator resolves it too."""
    cluster.heal_all()
    for i, node in enumerate(cluster.nodes):
        cluster.thaw(i)
        if not node.running():
            cluster.restart(i)
    everyone = len(cluster.nodes)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        views = [_view(cluster, i) for i in range(everyone)]
        if all(len(v) == everyone for v in views):
            return
        time.sleep(1)
    for i in range(everyone):
        if len(_view(cluster, i)) < everyone:
            cluster.kill(i)
            cluster.restart(i)
    cluster.wait_members(everyone, timeout=90)


def delete_deployment(cluster: PrivateCluster, prefix: str) -> None:
    """Delete every queue, stream and exchange a scenario under ``prefix`` declared (the
    observer's queue too), from a node that is up; a cluster that keeps the leftovers of
    earlier runs re-elects more leaders after each fault, which slows the next one."""
    topology = Topology(prefix)
    delete_names(
        cluster.urls[1],
        [*topology.queue_names(), f"{prefix}.observer"],
        [name for name, _ in topology.exchanges()],
    )


def _view(cluster: PrivateCluster, i: int) -> list[str]:
    """The running members node ``i`` sees (none if it does not answer)."""
    try:
        return cluster.running_members(i)
    except Exception:
        return []


#: The frozen node's freeze lasts this long (issue 14: 30 s).
FREEZE_S = 30.0
#: A partition lasts this long: well past net_ticktime, so the minority pauses.
PARTITION_S = 3 * NET_TICKTIME
