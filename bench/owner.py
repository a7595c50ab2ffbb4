"""The state owner against a real broker: throughput vs a kombu relay, a confirm storm, latency.

One run, three parts, each on its own fresh name prefix, everything it declared deleted
at the end (``BRAMA_BENCH_BROKER_URL``, default ``amqp://guest:guest@127.0.0.1:5672//``).
The machine is shared and noisy, so (a) and (b) run ``--repeat`` rounds (default 2) and
report the best round of each figure, every round listed in ``counts``.

**(a) relay baseline vs owner.** The same ``C`` register commands and ``N`` success/failure
commands (failures below the threshold, so every event is transient) are pre-published,
persistent and confirmed, exactly as the Brama client sends them, to two quorum queues
with the owner queue's arguments, before anything consumes. Then, one after the other
(who goes first alternates between rounds), each queue is drained by

* ``relay``: a plain kombu consumer (prefetch 500, the callback only collects), publishing
  one transient message per command with ``Producer.publish`` to a topic exchange and
  acking each drained batch with ``multiple=True``;
* ``owner``: the real :class:`brama_mq.owner.Owner` on an ``AmqpTransport``, built as
  ``brama-mq worker`` builds it (prefetch 500).

Both run alone in a child process of their own, like ``brama-mq worker`` (a thread would
share the bench's GIL; the worker command itself cannot report timestamps). The child is
started only after the queue holds every command, so its start-up is outside the clock.
Each child stamps ``perf_counter`` when the ``C+1``-th delivery reaches its consumer
callback (the first timed command) and again right after it acked the last delivery
(the owner acks only after publishing, and confirming, what the batch caused);
``*_per_s = N / (end - start)``. The instrumentation is a counter in each consumer
callback and the check of the acked tag, the same for both. Nothing is bound to either
topic exchange, so both pay the same (no) routing cost. ``relay_ratio = owner / relay``.

**(b) storm.** ``S`` connections (``max_attempts=1``) are registered and each sent the
one failure that opens it, all pre-published; a durable queue is bound to the events
exchange with ``#.state_change`` and ``#.circuit_opened``, so every critical event is
written to disk before the broker confirms it. ``storm_per_s`` = ``2*S`` critical events
/ (first failure delivered .. the owner acked the last one, i.e. after its confirms);
the durable queue's message count per round is reported (``storm_sink_counts``). In the
same round ``sync_confirm_per_s`` is kombu ``Producer.publish`` of persistent messages
with ``transport_options={'confirm_publish': True}`` (each publish waits for its confirm)
to another durable queue on the same exchange. ``storm_ratio = storm / sync``.

**(c) latency.** An owner child serves; a subscriber child (plain kombu consumer, own
connection and process) binds ``*.*.state_change`` and stamps ``time.time_ns()`` on
arrival; ``L = rate * seconds`` connections with ``max_attempts=1`` are registered first.
Then a :class:`brama_mq.client.Brama` on its own ``AmqpTransport`` calls
``failure(name)`` for each, paced at ``rate``/s from a few sender threads (``failure()``
returns after the broker confirmed the command, so one thread alone could not keep the
pace); every failure opens its connection, so every one produces one ``state_change``.
Latency = arrival - the wall-clock time just before ``failure()`` was called, matched by
connection name. ``counts.latency`` splits it: client call -> owner's consumer callback
(``to_owner``), callback -> events written (``in_owner``), written -> subscriber, plus
the owner process's scheduler figures (ns on CPU, ns runnable but waiting for a CPU,
timeslices) and the client's CPU per call, which show how much of it is the machine.

``python -m bench owner [--json] [--n N] [--storm S] [--rate R] [--seconds T]
[--senders K] [--repeat R] [--quick]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672//"
SCOPE = "bench"
PREFETCH = 500
JSON_CT = "application/json"

TARGETS: dict[str, tuple[str, float]] = {
    "relay_ratio": (">=", 0.8),
    "storm_ratio": (">=", 5.0),
    "latency_p99_ms": ("<=", 10.0),
}

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Params:
    url: str
    n: int  # (a) timed commands
    conns: int  # (a) connections they are spread over (registered first, untimed)
    storm: int  # (b) connections opening at once
    sync_n: int  # (b) kombu confirm_publish messages
    rate: float  # (c) failure() calls per second
    seconds: float  # (c) how long
    senders: int  # (c) sender threads
    repeat: int  # (a), (b): rounds; the best of each figure counts


def parse(args: list[str]) -> Params:
    parser = argparse.ArgumentParser(
        prog="python -m bench owner",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--n", type=int, default=20_000, help="(a) timed commands")
    parser.add_argument("--conns", type=int, default=200, help="(a) connections")
    parser.add_argument("--storm", type=int, default=5_000, help="(b) connections opening")
    parser.add_argument("--sync-n", type=int, default=1_000, help="(b) confirm_publish msgs")
    parser.add_argument("--rate", type=float, default=500.0, help="(c) failure() per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="(c) duration")
    parser.add_argument("--senders", type=int, default=4, help="(c) sender threads")
    parser.add_argument(
        "--repeat", type=int, default=2, help="(a), (b): rounds, best of each figure counts"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    ns = parser.parse_args(args)
    url = os.environ.get("BRAMA_BENCH_BROKER_URL") or DEFAULT_URL
    if ns.quick:
        return Params(url, 2_000, 50, 500, 200, 200.0, 1.0, 4, 1)
    return Params(
        url, ns.n, ns.conns, ns.storm, ns.sync_n, ns.rate, ns.seconds, ns.senders, max(1, ns.repeat)
    )


def fresh_prefix(part: str) -> str:
    return f"bench-owner-{part}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------- broker plumbing
def raw_connection(url: str) -> tuple[Any, Any]:
    """(kombu connection, its py-amqp connection): kombu parses the URL, py-amqp works."""
    from kombu import Connection

    kconn = Connection(url)
    kconn.connect()
    return kconn, kconn.connection


class Admin:
    """One py-amqp channel for declaring, counting and deleting; remembers what it made."""

    def __init__(self, url: str) -> None:
        self.kconn, self.conn = raw_connection(url)
        self.ch = self.conn.channel()
        self.queues: list[str] = []
        self.exchanges: list[str] = []

    def exchange(self, name: str, kind: str) -> None:
        self.ch.exchange_declare(name, kind, durable=True, auto_delete=False)
        self.exchanges.append(name)

    def queue(
        self,
        name: str,
        *,
        bind: Iterable[tuple[str, str]] = (),
        arguments: dict[str, Any] | None = None,
    ) -> None:
        self.ch.queue_declare(name, durable=True, auto_delete=False, arguments=arguments or {})
        self.queues.append(name)
        for exchange, key in bind:
            self.ch.queue_bind(name, exchange, key)

    def topology(self, topo: Any) -> None:
        """Everything ``brama-mq worker`` declares for ``topo``, as the transport declares
        it (so the bench never drifts from the real arguments); all deleted at cleanup."""
        from brama_mq.transport.topology import declare_topology

        declare_topology(self.ch, topo)
        self.exchanges += [name for name, _ in topo.exchanges()]
        self.queues += topo.queue_names()

    def count(self, name: str) -> int:
        return int(self.ch.queue_declare(name, passive=True).message_count)

    def wait_count(self, name: str, expected: int, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            n = self.count(name)
            if n >= expected or time.monotonic() > deadline:
                return n
            time.sleep(0.05)

    def cleanup(self) -> None:
        for name in self.queues:
            self.ch.queue_delete(name)
        for name in self.exchanges:
            self.ch.exchange_delete(name)
        self.kconn.release()


def publish_confirmed(
    url: str, exchange: str, items: Sequence[tuple[str, bytes]], *, delivery_mode: int = 2
) -> float:
    """Publish ``(routing_key, body)`` pairs fast: py-amqp, pipelined streamed confirms.

    Returns the seconds it took; raises if anything is nacked or left unconfirmed.
    """
    from amqp import spec
    from amqp.basic_message import Message

    kconn, conn = raw_connection(url)
    try:
        ch = conn.channel()
        ch.confirm_select()
        state = {"acked": 0, "nacked": 0, "low": 1}
        unsettled: set[int] = set()

        def settle(tag: int, multiple: bool, key: str) -> None:
            if multiple:
                for t in range(state["low"], tag + 1):
                    if t in unsettled:
                        unsettled.discard(t)
                        state[key] += 1
                state["low"] = max(state["low"], tag + 1)
            elif tag in unsettled:
                unsettled.discard(tag)
                state[key] += 1

        ch.events["basic_ack"].add(lambda tag, multiple: settle(tag, multiple, "acked"))
        ch.events["basic_nack"].add(lambda tag, multiple: settle(tag, multiple, "nacked"))
        start = perf_counter()
        for tag, (key, body) in enumerate(items, 1):
            # As the Brama client sends a command (no content_encoding).
            msg = Message(
                body, delivery_mode=delivery_mode, content_type=JSON_CT, message_id=uuid.uuid4().hex
            )
            unsettled.add(tag)
            ch.send_method(spec.Basic.Publish, "Bssbb", (0, exchange, key, False, False), msg)
            if tag % 500 == 0:  # let acks in, keep the window bounded
                while len(unsettled) > 5_000:
                    conn.drain_events(timeout=5)
        deadline = time.monotonic() + 60
        while unsettled and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=1)
        if unsettled or state["nacked"]:
            raise RuntimeError(
                f"pre-publish: {len(unsettled)} unconfirmed, {state['nacked']} nacked"
            )
        return perf_counter() - start
    finally:
        kconn.release()


def command_bodies(op: str, names: Sequence[str], **kw: Any) -> list[bytes]:
    """Wire bodies exactly as the Brama client encodes them."""
    from brama_mq.protocol import encode_command, make_command
    from brama_mq.protocol.clock import wall_clock_ms

    now = wall_clock_ms()
    options = kw.pop("options", None)
    return [
        encode_command(make_command(op, name, SCOPE, options=options, now_ms=now, **kw))
        for name in names
    ]


# ---------------------------------------------------------------------------- child processes
class Child:
    """A ``python -m bench.owner child ROLE CONFIG`` process; READY and a JSON last line."""

    def __init__(self, role: str, config: dict[str, Any]) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.owner", "child", role, json.dumps(config)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.role = role
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def _fail(self, why: str) -> RuntimeError:
        self.proc.kill()
        tail = "".join(self.stderr[-30:])
        return RuntimeError(f"{self.role} child: {why}\n{tail}")

    def wait_ready(self, timeout: float = 60.0) -> None:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise self._fail("not ready in time") from None
        if line != "READY":
            raise self._fail(f"expected READY, got {line!r}")

    def result(self, timeout: float = 120.0) -> dict[str, Any]:
        last: str | None = None
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise self._fail("no result in time") from None
            if line is None:
                break
            last = line
        self.proc.wait(timeout=10)
        if self.proc.returncode != 0 or not last:
            raise self._fail(f"exit code {self.proc.returncode}")
        out: dict[str, Any] = json.loads(last)
        return out

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)


def _schedstat() -> tuple[int, int, int]:
    """(ns on CPU, ns runnable but waiting for a CPU, timeslices) of this process's
    threads so far, from /proc (zeros where it is not available)."""
    total = [0, 0, 0]
    try:
        for task in Path("/proc/self/task").iterdir():
            values = (task / "schedstat").read_text().split()
            for i in range(3):
                total[i] += int(values[i])
    except (OSError, ValueError, IndexError):
        pass
    return total[0], total[1], total[2]


def _child_owner(cfg: dict[str, Any]) -> dict[str, Any]:
    """The real Owner, as ``brama-mq worker`` builds it, plus two timestamps."""
    from brama_mq.owner import Owner
    from brama_mq.transport import Topology
    from brama_mq.transport.amqp import AmqpOwnerLink, AmqpTransport
    from brama_mq.transport.base import decode_tag

    start_at: int = cfg["start_at"]  # 1-based delivery that starts the clock
    expect: int | None = cfg.get("expect")  # stop once the expect-th delivery is acked
    owner: Owner | None = None
    trace: dict[str, int] | None = {} if cfg.get("trace") else None  # connection -> arrival
    traced_out: dict[str, int] = {}  # connection -> when its state_change was written

    class StampedLink(AmqpOwnerLink):
        def __init__(self, transport: AmqpTransport, *, prefetch: int, shard: int | None) -> None:
            self.seen = 0
            self.t_first: float | None = None
            self.cpu_first: float | None = None
            self.t_end: float | None = None
            self.cpu_end: float | None = None
            super().__init__(transport, prefetch=prefetch, shard=shard)

        def publish(self, events: Any) -> None:
            super().publish(events)
            if trace is not None:
                now = time.time_ns()
                for ev in events:
                    if ev.routing_key.endswith(".state_change"):
                        traced_out.setdefault(ev.routing_key.split(".")[1], now)

        def ack(self, delivery_tag: int, multiple: bool = True) -> None:
            super().ack(delivery_tag, multiple)
            # Broker tags count deliveries from 1 on the channel (no redeliveries here).
            if expect is not None and self.t_end is None and decode_tag(delivery_tag)[1] >= expect:
                self.t_end = perf_counter()
                self.cpu_end = time.process_time()
                assert owner is not None
                owner.stop()

        def _on_delivery(self, msg: Any) -> None:
            self._buffer.append(msg)
            self.seen += 1
            if self.seen == start_at:
                self.t_first = perf_counter()
                self.cpu_first = time.process_time()
            if trace is not None:
                now = time.time_ns()
                command = json.loads(msg.body)
                if command.get("op") == "failure":
                    trace.setdefault(command["connection"], now)

    class StampedTransport(AmqpTransport):
        def owner_link(self, *, prefetch: int = 500, shard: int | None = None) -> AmqpOwnerLink:
            return self._track(StampedLink(self, prefetch=prefetch, shard=shard))

    transport = StampedTransport(cfg["url"], Topology(cfg["prefix"]))
    owner = Owner(transport, prefetch=PREFETCH, max_command_bytes=65_536)
    signal.signal(signal.SIGTERM, lambda *_: owner.stop())
    links: list[StampedLink] = []
    orig = transport.owner_link

    def keep(**kw: Any) -> AmqpOwnerLink:
        link = orig(**kw)
        assert isinstance(link, StampedLink)
        links.append(link)
        return link

    transport.owner_link = keep  # type: ignore[method-assign]
    watchdog = threading.Timer(cfg.get("timeout", 120.0), owner.stop)
    watchdog.daemon = True
    watchdog.start()
    sched_end: list[int] = []

    def serve() -> None:
        try:
            owner.run()
        finally:
            sched_end.extend(_schedstat())  # before this thread is gone from /proc

    thread = threading.Thread(target=serve, name="owner")
    thread.start()
    if not owner.ready.wait(60):
        raise RuntimeError("owner did not start")
    print("READY", flush=True)
    sched0 = _schedstat()
    while thread.is_alive():
        thread.join(0.5)
    sched1 = sched_end or list(sched0)
    watchdog.cancel()
    link = links[0]
    stats = owner.stats
    out = {
        "t_first": link.t_first,
        "t_end": link.t_end,
        "cpu_s": None
        if link.cpu_end is None or link.cpu_first is None
        else link.cpu_end - link.cpu_first,
        "seen": link.seen,
        "stats": {
            "commands": stats.commands,
            "applied": stats.applied,
            "dead_lettered": stats.dead_lettered,
            "events": stats.events,
            "critical_events": stats.critical_events,
            "batches": stats.batches,
        },
        "link": link.stats(),
        "trace": trace,
        "traced_out": traced_out,
        "sched": [b - a for a, b in zip(sched0, sched1, strict=True)],
    }
    transport.close()
    return out


def _child_relay(cfg: dict[str, Any]) -> dict[str, Any]:
    """The baseline: kombu consumer -> one transient publish per command -> batched acks."""
    from kombu import Connection, Consumer, Exchange, Producer, Queue

    start_at: int = cfg["start_at"]
    expect: int = cfg["expect"]
    key = "relay.command.event"
    conn = Connection(cfg["url"])
    conn.connect()
    producer = Producer(
        conn.channel(),
        exchange=Exchange(cfg["exchange"], "topic", durable=True),
        auto_declare=False,
    )
    batch: list[Any] = []
    seen = 0
    t_first: float | None = None
    cpu_first = 0.0

    def on_message(message: Any) -> None:
        nonlocal seen, t_first, cpu_first
        batch.append(message)
        seen += 1
        if seen == start_at:
            t_first = perf_counter()
            cpu_first = time.process_time()

    consumer = Consumer(
        conn.channel(),
        queues=[Queue(cfg["queue"], no_declare=True)],
        on_message=on_message,
        prefetch_count=PREFETCH,
        auto_declare=False,
    )
    consumer.consume()
    print("READY", flush=True)
    handled = published = 0
    deadline = time.monotonic() + cfg.get("timeout", 120.0)
    publish = producer.publish
    while handled < expect and time.monotonic() < deadline:
        if not batch:
            try:
                conn.drain_events(timeout=1)
            except TimeoutError:
                continue
        while len(batch) < PREFETCH:  # whatever else has arrived, without waiting
            try:
                conn.drain_events(timeout=0)
            except TimeoutError:
                break
        todo = batch[:]
        batch.clear()
        for message in todo:
            publish(
                message.body,
                routing_key=key,
                delivery_mode=1,
                content_type=JSON_CT,
                content_encoding="utf-8",
                retry=False,
            )
        published += len(todo)
        todo[-1].ack(multiple=True)
        handled += len(todo)
    t_end = perf_counter()
    cpu_s = time.process_time() - cpu_first
    conn.release()
    return {
        "t_first": t_first,
        "t_end": t_end,
        "cpu_s": cpu_s,
        "seen": seen,
        "handled": handled,
        "published": published,
    }


def _child_subscriber(cfg: dict[str, Any]) -> dict[str, Any]:
    """Plain kombu consumer bound to ``*.*.state_change``; stamps arrivals (wall clock ns)."""
    from kombu import Connection, Consumer, Exchange, Queue

    expect: int = cfg["expect"]
    conn = Connection(cfg["url"])
    conn.connect()
    ch = conn.channel()
    exchange = Exchange(cfg["exchange"], "topic", durable=True, no_declare=True)
    q = Queue(
        f"{cfg['prefix']}.latency-sub",
        exchange,
        routing_key="*.*.state_change",
        exclusive=True,
        auto_delete=True,
        durable=False,
    )
    arrivals: dict[str, int] = {}
    extra = 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def on_message(message: Any) -> None:
        nonlocal extra
        now = time.time_ns()
        conn_word = message.delivery_info["routing_key"].split(".")[1]
        if conn_word in arrivals:
            extra += 1
        else:
            arrivals[conn_word] = now

    # Auto-ack: the stamp is all this consumer does, so it costs the machine little.
    consumer = Consumer(ch, queues=[q], on_message=on_message, no_ack=True)
    consumer.declare()
    consumer.consume()
    print("READY", flush=True)
    deadline = time.monotonic() + cfg.get("timeout", 120.0)
    while len(arrivals) < expect and not stop.is_set() and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.2)
    conn.release()
    return {"arrivals": arrivals, "duplicates": extra}


def child_main(argv: list[str]) -> int:
    role, cfg = argv[0], json.loads(argv[1])
    fn: Callable[[dict[str, Any]], dict[str, Any]] = {
        "owner": _child_owner,
        "relay": _child_relay,
        "subscriber": _child_subscriber,
    }[role]
    out = fn(cfg)
    print(json.dumps(out), flush=True)
    return 0


# ---------------------------------------------------------------------------- the parts
def _rate(count: int, child: dict[str, Any]) -> float:
    t0, t1 = child["t_first"], child["t_end"]
    if t0 is None or t1 is None or t1 <= t0:
        raise RuntimeError(f"bad timestamps from a child: {child}")
    dead = child.get("stats", {}).get("dead_lettered")
    if dead:  # the figure would time the refusal path (bench scale once did)
        raise RuntimeError(f"the owner dead-lettered {dead} commands: the bench's commands "
                           "no longer pass the owner's checks")
    return count / (t1 - t0)


def part_relay(p: Params) -> dict[str, Any]:
    from brama_mq.transport import Topology

    prefix = fresh_prefix("a")
    topo = Topology(prefix)
    admin = Admin(p.url)
    relay_queue, relay_exchange = f"{prefix}.relay", f"{prefix}.relay-events"
    try:
        admin.topology(topo)
        admin.exchange(relay_exchange, "topic")
        admin.queue(relay_queue, bind=[(topo.commands_exchange, "relay")],
                    arguments=topo.owner_queue_arguments())

        names = [f"a{i:05d}" for i in range(p.conns)]
        relays: list[dict[str, Any]] = []
        owners: list[dict[str, Any]] = []
        for rnd in range(p.repeat):
            # Fresh command ids each round; the same bodies go to both queues.
            bodies = command_bodies("register", names, options={"max_attempts": 1_000_000})
            # Rounds over every connection, alternately all successes and all failures.
            ops = [("success", "failure")[(i // p.conns) % 2] for i in range(p.n)]
            succ = iter(
                command_bodies(
                    "success", [names[i % p.conns] for i in range(p.n) if ops[i] == "success"]
                )
            )
            fail = iter(
                command_bodies(
                    "failure",
                    [names[i % p.conns] for i in range(p.n) if ops[i] == "failure"],
                    reason="timeout",
                )
            )
            bodies += [next(succ) if op == "success" else next(fail) for op in ops]
            total = len(bodies)
            items = [(k, b) for b in bodies for k in ("owner", "relay")]
            publish_confirmed(p.url, topo.commands_exchange, items)
            for q in (topo.owner_queue(), relay_queue):
                got = admin.wait_count(q, total)
                if got != total:
                    raise RuntimeError(f"{q} holds {got} commands, expected {total}")
            relay_cfg = {
                "url": p.url,
                "queue": relay_queue,
                "exchange": relay_exchange,
                "start_at": p.conns + 1,
                "expect": total,
            }
            owner_cfg = {"url": p.url, "prefix": prefix, "start_at": p.conns + 1, "expect": total}
            order = [("relay", relay_cfg), ("owner", owner_cfg)]
            for role, cfg in order if rnd % 2 == 0 else order[::-1]:  # alternate who goes first
                child = Child(role, cfg)
                child.wait_ready()
                (relays if role == "relay" else owners).append(child.result())
        relay_rates = [_rate(p.n, r) for r in relays]
        owner_rates = [_rate(p.n, o) for o in owners]
        relay_per_s, owner_per_s = max(relay_rates), max(owner_rates)
        r = relays[relay_rates.index(relay_per_s)]
        o = owners[owner_rates.index(owner_per_s)]
        left = {q: admin.count(q) for q in (topo.owner_queue(), relay_queue)}
        return {
            "relay_per_s": round(relay_per_s),
            "owner_per_s": round(owner_per_s),
            "relay_ratio": round(owner_per_s / relay_per_s, 3),
            "relay_counts": {
                "commands_timed": p.n,
                "registered_untimed": p.conns,
                "relay_runs_per_s": [round(x) for x in relay_rates],
                "owner_runs_per_s": [round(x) for x in owner_rates],
                "relay_published": r["published"],
                "relay_cpu_us_per_command": round(r["cpu_s"] / p.n * 1e6, 1),
                "owner_cpu_us_per_command": round(o["cpu_s"] / p.n * 1e6, 1),
                "owner_commands": o["stats"]["commands"],
                "owner_applied": o["stats"]["applied"],
                "owner_events": o["stats"]["events"],
                "owner_critical": o["stats"]["critical_events"],
                "owner_dead_lettered": o["stats"]["dead_lettered"],
                "owner_batches": o["stats"]["batches"],
                "left_in_queues": left,
            },
        }
    finally:
        admin.cleanup()


def sync_confirm(p: Params, exchange: str, key: str) -> float:
    """kombu's confirm_publish: every persistent publish waits for its confirm."""
    from kombu import Connection, Exchange, Producer

    body = json.dumps(
        {
            "event": "state_change",
            "timestamp": int(time.time() * 1000),
            "connection": "sync",
            "scope": SCOPE,
            "id": uuid.uuid4().hex[:16],
            "seq": 1,
            "data": {
                "state": "open",
                "failure_count": 1,
                "previous_state": "closed",
                "new_state": "open",
                "reason": "Threshold exceeded",
            },
        }
    ).encode()
    conn = Connection(p.url, transport_options={"confirm_publish": True})
    try:
        producer = Producer(
            conn.channel(), exchange=Exchange(exchange, "topic", durable=True), auto_declare=False
        )
        for _ in range(20):  # warm up
            producer.publish(
                body,
                routing_key=key,
                delivery_mode=2,
                content_type=JSON_CT,
                content_encoding="utf-8",
                retry=False,
            )
        start = perf_counter()
        for _ in range(p.sync_n):
            producer.publish(
                body,
                routing_key=key,
                delivery_mode=2,
                content_type=JSON_CT,
                content_encoding="utf-8",
                retry=False,
            )
        return p.sync_n / (perf_counter() - start)
    finally:
        conn.release()


def part_storm(p: Params) -> dict[str, Any]:
    from brama_mq.transport import Topology

    prefix = fresh_prefix("b")
    topo = Topology(prefix)
    admin = Admin(p.url)
    sink, sync_sink = f"{prefix}.critical-sink", f"{prefix}.sync-sink"
    try:
        admin.topology(topo)
        ev = topo.events_exchange
        admin.queue(sink, bind=[(ev, "#.state_change"), (ev, "#.circuit_opened")])
        admin.queue(sync_sink, bind=[(ev, "sync.baseline.confirm")])

        critical = 2 * p.storm
        syncs: list[float] = []
        storms: list[float] = []
        owners: list[dict[str, Any]] = []
        sink_counts: list[int] = []
        for rnd in range(p.repeat):
            syncs.append(sync_confirm(p, ev, "sync.baseline.confirm"))
            # New connections each round (a fresh owner registers them, untimed).
            names = [f"s{rnd}-{i:05d}" for i in range(p.storm)]
            bodies = command_bodies("register", names, options={"max_attempts": 1})
            bodies += command_bodies("failure", names, reason="boom")
            publish_confirmed(p.url, topo.commands_exchange, [("owner", b) for b in bodies])
            got = admin.wait_count(topo.owner_queue(), len(bodies))
            if got != len(bodies):
                raise RuntimeError(f"owner queue holds {got} commands, expected {len(bodies)}")
            before = admin.count(sink)
            owner = Child(
                "owner",
                {"url": p.url, "prefix": prefix, "start_at": p.storm + 1, "expect": 2 * p.storm},
            )
            owner.wait_ready()
            o = owner.result()
            owners.append(o)
            storms.append(_rate(critical, o))
            sink_counts.append(admin.wait_count(sink, before + critical, timeout=5) - before)
        storm_per_s, sync_per_s = max(storms), max(syncs)
        o = owners[storms.index(storm_per_s)]
        return {
            "storm_per_s": round(storm_per_s),
            "sync_confirm_per_s": round(sync_per_s),
            "storm_ratio": round(storm_per_s / sync_per_s, 3),
            "storm_counts": {
                "connections": p.storm,
                "critical_expected": critical,
                "storm_runs_per_s": [round(x) for x in storms],
                "sync_runs_per_s": [round(x) for x in syncs],
                "storm_sink_counts": sink_counts,
                "owner_critical": o["stats"]["critical_events"],
                "owner_confirmed": o["link"]["confirmed"],
                "owner_nacked": o["link"]["nacked"],
                "owner_batches": o["stats"]["batches"],
                "owner_dead_lettered": o["stats"]["dead_lettered"],
                "owner_cpu_us_per_command": round(o["cpu_s"] / p.storm * 1e6, 1),
                "owner_seconds": round(o["t_end"] - o["t_first"], 3),
                "sync_messages_per_run": p.sync_n,
                "sync_sink_count": admin.count(sync_sink),
            },
        }
    finally:
        admin.cleanup()


def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def part_latency(p: Params) -> dict[str, Any]:
    from brama_mq.client import Brama
    from brama_mq.errors import NotRegisteredError
    from brama_mq.transport import Topology
    from brama_mq.transport.amqp import AmqpTransport

    prefix = fresh_prefix("c")
    topo = Topology(prefix)
    admin = Admin(p.url)
    count = max(1, round(p.rate * p.seconds))
    names = [f"l{i:05d}" for i in range(count)]
    owner: Child | None = None
    sub: Child | None = None
    client: Brama | None = None
    transport: AmqpTransport | None = None
    try:
        admin.topology(topo)
        sub = Child(
            "subscriber",
            {
                "url": p.url,
                "prefix": prefix,
                "exchange": topo.events_exchange,
                "expect": count,
                "timeout": p.seconds + 60,
            },
        )
        sub.wait_ready()
        owner = Child(
            "owner",
            {
                "url": p.url,
                "prefix": prefix,
                "start_at": 1,
                "timeout": p.seconds + 90,
                "trace": True,
            },
        )
        owner.wait_ready()

        publish_confirmed(
            p.url,
            topo.commands_exchange,
            [("owner", b) for b in command_bodies("register", names, options={"max_attempts": 1})],
        )
        transport = AmqpTransport(p.url, topo)
        client = Brama(transport=transport, request_timeout=30.0)
        try:  # answered after every register before it: the owner applies in order
            client.status(names[-1], scope=SCOPE)
        except NotRegisteredError as exc:
            raise RuntimeError("registrations did not reach the owner") from exc
        client.register("l-warm-up", scope=SCOPE)  # first send on the confirm channel, untimed

        sent: dict[str, int] = {}
        late: list[float] = []
        errors: list[BaseException] = []
        t0 = perf_counter() + 0.05
        interval = 1.0 / p.rate
        c = client

        def sender(k: int) -> None:
            try:
                for i in range(k, count, p.senders):
                    target = t0 + i * interval
                    delay = target - perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    late.append(perf_counter() - target)
                    sent[names[i]] = time.time_ns()
                    c.failure(names[i], scope=SCOPE)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=sender, args=(k,)) for k in range(p.senders)]
        client_cpu = time.process_time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = perf_counter() - t0
        client_cpu = time.process_time() - client_cpu
        if errors:
            raise RuntimeError(f"sender failed: {errors[0]!r}")
        s = sub.result(timeout=p.seconds + 60)
        owner.terminate()
        o = owner.result()
        arrivals: dict[str, int] = s["arrivals"]
        lat = sorted((arrivals[n] - sent[n]) / 1e6 for n in names if n in arrivals)
        # Where the time goes: client call -> owner's consumer callback -> subscriber.
        seen_by_owner: dict[str, int] = o["trace"]
        to_owner = sorted((seen_by_owner[n] - sent[n]) / 1e6 for n in names if n in seen_by_owner)
        through_owner = sorted(
            (arrivals[n] - seen_by_owner[n]) / 1e6
            for n in names
            if n in seen_by_owner and n in arrivals
        )
        written: dict[str, int] = o["traced_out"]
        in_owner = sorted(
            (written[n] - seen_by_owner[n]) / 1e6
            for n in names
            if n in seen_by_owner and n in written
        )
        to_subscriber = sorted(
            (arrivals[n] - written[n]) / 1e6 for n in names if n in written and n in arrivals
        )
        late.sort()
        return {
            "latency_p50_ms": round(_percentile(lat, 0.50), 3),
            "latency_p99_ms": round(_percentile(lat, 0.99), 3),
            "latency_counts": {
                "sent": len(sent),
                "state_changes_received": len(lat),
                "duplicates": s["duplicates"],
                "send_rate_per_s": round(len(sent) / elapsed, 1),
                "send_late_p99_ms": round(_percentile(late, 0.99) * 1000, 3),
                "client_cpu_us_per_command": round(client_cpu / max(1, len(sent)) * 1e6, 1),
                "latency_max_ms": round(lat[-1], 3) if lat else None,
                "latency_mean_ms": round(statistics.fmean(lat), 3) if lat else None,
                "to_owner_p50_ms": round(_percentile(to_owner, 0.5), 3),
                "to_owner_p99_ms": round(_percentile(to_owner, 0.99), 3),
                "owner_to_subscriber_p50_ms": round(_percentile(through_owner, 0.5), 3),
                "owner_to_subscriber_p99_ms": round(_percentile(through_owner, 0.99), 3),
                "owner_sched_run_wait_slices": o["sched"],
                "in_owner_p50_ms": round(_percentile(in_owner, 0.5), 3),
                "in_owner_p99_ms": round(_percentile(in_owner, 0.99), 3),
                "written_to_subscriber_p50_ms": round(_percentile(to_subscriber, 0.5), 3),
                "written_to_subscriber_p99_ms": round(_percentile(to_subscriber, 0.99), 3),
                "owner_batches": o["stats"]["batches"],
                "owner_commands": o["stats"]["commands"],
                "owner_dead_lettered": o["stats"]["dead_lettered"],
                # The machine's 1-minute load average when the part ended (2 cores,
                # shared): p99 here follows the neighbours' load more than anything.
                "loadavg_1m": _loadavg(),
            },
        }
    finally:
        if client is not None:
            client.disconnect()
        if transport is not None:
            transport.close()
        for child in (owner, sub):
            if child is not None and child.proc.poll() is None:
                child.terminate()
                try:
                    child.proc.wait(10)
                except subprocess.TimeoutExpired:
                    child.proc.kill()
        admin.cleanup()


# ---------------------------------------------------------------------------- entry points
def _meets(value: float, key: str) -> bool:
    op, limit = TARGETS[key]
    return value >= limit if op == ">=" else value <= limit


def run(args: list[str]) -> dict[str, Any]:
    p = parse(args)
    start = perf_counter()
    a = part_relay(p)
    b = part_storm(p)
    c = part_latency(p)
    result: dict[str, Any] = {
        "relay_per_s": a["relay_per_s"],
        "owner_per_s": a["owner_per_s"],
        "relay_ratio": a["relay_ratio"],
        "storm_per_s": b["storm_per_s"],
        "sync_confirm_per_s": b["sync_confirm_per_s"],
        "storm_ratio": b["storm_ratio"],
        "latency_p50_ms": c["latency_p50_ms"],
        "latency_p99_ms": c["latency_p99_ms"],
        "counts": {
            "relay": a["relay_counts"],
            "storm": b["storm_counts"],
            "latency": c["latency_counts"],
        },
        "params": {
            "n": p.n,
            "conns": p.conns,
            "storm": p.storm,
            "sync_n": p.sync_n,
            "rate": p.rate,
            "seconds": p.seconds,
            "senders": p.senders,
            "repeat": p.repeat,
            "prefetch": PREFETCH,
        },
        "targets": {key: f"{op} {limit:g}" for key, (op, limit) in TARGETS.items()},
        "bench_seconds": round(perf_counter() - start, 1),
    }
    result["meets_targets"] = all(_meets(result[key], key) for key in TARGETS)
    return result


def format_report(result: dict[str, Any]) -> str:
    p = result["params"]
    cnt = result["counts"]
    rows = [
        ("(a) relay_per_s (kombu relay)", f"{result['relay_per_s']:,}/s", None),
        ("(a) owner_per_s", f"{result['owner_per_s']:,}/s", None),
        ("(a) relay_ratio", f"{result['relay_ratio']:.3f}", "relay_ratio"),
        ("(b) storm_per_s (critical)", f"{result['storm_per_s']:,}/s", None),
        ("(b) sync_confirm_per_s", f"{result['sync_confirm_per_s']:,}/s", None),
        ("(b) storm_ratio", f"{result['storm_ratio']:.2f}", "storm_ratio"),
        ("(c) latency_p50_ms", f"{result['latency_p50_ms']:.2f} ms", None),
        ("(c) latency_p99_ms", f"{result['latency_p99_ms']:.2f} ms", "latency_p99_ms"),
    ]
    lines = [
        f"brama_mq owner vs broker — (a) {p['n']:,} commands over {p['conns']} connections, "
        f"(b) {p['storm']:,} circuits opening, (c) {p['rate']:g}/s for {p['seconds']:g} s",
        f"{'figure':<32}{'value':>14}  target",
    ]
    for label, value, key in rows:
        target = ""
        if key is not None:
            op, limit = TARGETS[key]
            target = f"{op} {limit:g}  {'ok' if _meets(result[key], key) else 'MISSED'}"
        lines.append(f"{label:<32}{value:>14}  {target}")
    lines.append("counts: " + json.dumps(cnt))
    lines.append(f"bench took {result['bench_seconds']} s")
    lines.append("all targets met" if result["meets_targets"] else "SOME TARGETS MISSED")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "child":
        raise SystemExit(child_main(sys.argv[2:]))
    from bench.__main__ import main

    raise SystemExit(main(["owner", *sys.argv[1:]]))
