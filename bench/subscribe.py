"""Subscriptions on a real broker: what 50 subscribers cost the owner, and how fast one
subscription consumes next to a plain kombu consumer. One run, two parts, each on a fresh
name prefix, everything declared deleted at the end (``BRAMA_BENCH_BROKER_URL``, default
``amqp://guest:guest@127.0.0.1:5672//``).

**fanout_ratio.** ``C`` connections (two scopes) are registered, then ``N`` commands are
pre-published, persistent and confirmed, to the owner queue while no owner runs (95%
failures/successes below the threshold: one transient event each; 5% manual open/close:
two critical events each). A real :class:`~brama_mq.owner.Owner` (in a thread of this
process, which does nothing else meanwhile but sleep) drains them;
``owner_per_s = N / (first command taken .. N applied)``. Conditions, interleaved round
after round (``--rounds``, default 5):

* ``alone``: nothing bound to the events exchange;
* ``brama``: a child process holding 50 transient subscriptions with distinct filters
  (connections, connection lists x event types, scopes, event types, scope x connection:
  one shared queue with 50 bindings, as brama_mq subscribes in one process), handlers
  taking batches; ``fanout_exact`` says whether every subscription got exactly the events
  the core's topic matcher selects for its bindings;
* references, to read the figure on a given machine: ``bound`` (a queue with the same 50
  bindings that nobody consumes: the broker's routing and enqueueing alone) and ``raw``
  (a plain py-amqp no-ack consumer of that queue: the cheapest Python consumer).

``fanout_ratio`` is the median over rounds of ``brama / alone`` within the round (runs
seconds apart, so a neighbour's load hits both alike); ``fanout_ratio_raw_consumer`` and
``fanout_ratio_bindings_only`` likewise; ``fanout_ratio_best`` is best brama / best
alone. On a small machine the subscriber, the owner and the broker share the CPUs, so
the references show what consuming the stream costs there whoever consumes it;
``bound`` is the ceiling of any subscriber (the broker's work alone).
``cpu_ms_per_1k_commands`` gives, per condition, the CPU the bench process (the owner),
the broker (the oldest ``beam.smp``: on a shared broker it includes others' load) and
the subscriber child used during the drains, and ``cpu_busy_cores`` their sum over the
wall time.

**consumer_ratio.** A named subscription's durable queue (bound ``#``) is filled with
``M`` events (real event bodies, published straight to the events exchange, confirmed),
then drained by (a) a plain kombu ``Consumer`` (prefetch ``P``, ``accept=['json']`` so
kombu decodes each body, ``message.ack()`` per message) and (b) ``brama_mq.subscribe(
name=..., handler=...)`` with the same prefetch (decoded and validated ``Event`` objects,
duplicate check, acked after the handler). Rate = ``M`` / (consumer started .. ``M``
handled); refilled between runs, alternating a-b-a-b, best of each.
``consumer_ratio = subscriber / kombu``.

``python -m bench subscribe [--json] [--n N] [--rounds R] [--events M] [--prefetch P]
[--quick]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672//"
TARGETS = {"fanout_ratio": (">=", 0.9), "consumer_ratio": (">=", 0.8)}


@dataclass(frozen=True)
class Params:
    url: str
    n: int
    conns: int
    events: int
    prefetch: int
    rounds: int


def parse(args: list[str]) -> Params:
    parser = argparse.ArgumentParser(prog="python -m bench subscribe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8_000, help="owner commands per run")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds (median of per-round ratios)")
    parser.add_argument("--conns", type=int, default=100, help="connections")
    parser.add_argument("--events", type=int, default=20_000, help="events per consumer run")
    parser.add_argument("--prefetch", type=int, default=100, help="both consumers' prefetch")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    ns = parser.parse_args(args)
    url = os.environ.get("BRAMA_BENCH_BROKER_URL") or DEFAULT_URL
    if ns.quick:
        return Params(url, 2_000, 60, 3_000, ns.prefetch, 1)
    return Params(url, ns.n, ns.conns, ns.events, ns.prefetch, ns.rounds)


# -- the 50 filters ----------------------------------------------------------------------


def filters(conns: list[str], scopes: tuple[str, str]) -> list[dict[str, Any]]:
    """50 distinct filters of every shape over ``conns`` (at least 60 names)."""
    out: list[dict[str, Any]] = [{"connection": conns[i]} for i in range(25)]
    out += [{"connection": [conns[25 + 2 * i], conns[26 + 2 * i]],
             "events": ["failure", "state_change"]} for i in range(10)]
    out += [{"scope": s} for s in scopes]
    out += [{"events": e} for e in ("state_change", "circuit_opened", "circuit_closed",
                                    "success", "failure")]
    out += [{"scope": scopes[i % 2], "connection": conns[45 + i]} for i in range(8)]
    assert len(out) == 50 and len({json.dumps(f, sort_keys=True) for f in out}) == 50
    return out


def raw_child(argv: list[str]) -> int:
    """A reference subscriber: one queue with the same bindings, plain py-amqp, no acks, no
    decoding (``consume=0``: bound but never read). Prints how many it got on SIGTERM."""
    import signal

    import kombu

    url, prefix, keys, consume = argv
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    conn = kombu.Connection(url)
    conn.connect()
    ch = conn.connection.channel()
    queue = ch.queue_declare("", exclusive=True, arguments={"x-max-length": 1_000_000}).queue
    for key in json.loads(keys):
        ch.queue_bind(queue, f"{prefix}.events", key)
    got = [0]

    def count(message: Any) -> None:
        got[0] += 1

    if consume == "1":
        ch.basic_consume(queue, callback=count, no_ack=True)
    print(json.dumps({"ready": True}), flush=True)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            conn.connection.drain_events(timeout=0.2)
    print(json.dumps({"received": got[0]}), flush=True)
    conn.release()
    return 0


def _collector(got: list[tuple[str | None, str, int]]) -> Callable[[list[Any]], None]:
    def handle(events: list[Any]) -> None:
        got.extend((e.scope, e.connection, e.seq) for e in events)

    return handle


def child(argv: list[str]) -> int:
    """The subscriber process: 50 subscriptions, counting; prints their counts on SIGTERM."""
    import signal

    import brama_mq

    url, prefix, spec = argv
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    counts: list[list[tuple[str | None, str, int]]] = []
    subs = []
    for f in json.loads(spec):
        got: list[tuple[str | None, str, int]] = []
        counts.append(got)
        handler = _collector(got)
        subs.append(brama_mq.subscribe(**f, handler=handler, batch_size=500, batch_timeout=0.05,
                                       broker_url=url, prefix=prefix).start())
    print(json.dumps({"ready": True, "bindings": [s.bindings for s in subs]}), flush=True)
    stop.wait()
    report = {"received": [sorted(g) for g in counts],
              "dropped": [s.dropped for s in subs]}
    brama_mq.unsubscribe()
    print(json.dumps(report), flush=True)
    return 0


# -- part 1: the owner with and without subscribers ---------------------------------------


def _commands(names: list[tuple[str, str]], n: int) -> list[bytes]:
    from brama_mq.protocol import encode_command, make_command

    now = int(time.time() * 1000)
    out = []
    for i in range(n):
        scope, name = names[i % len(names)]
        if i % 40 == 0:
            op = "open"
        elif i % 40 == 20:
            op = "close"
        else:
            op = "failure" if i % 2 else "success"
        out.append(encode_command(make_command(op, name, scope, now_ms=now)))
    return out


def _preload(client: Any, bodies: list[bytes], owner_queue: str, url: str) -> None:
    import kombu

    for i in range(0, len(bodies), 500):
        client.link.send_many([(b, "owner") for b in bodies[i : i + 500]])
    with kombu.Connection(url) as conn:
        ch = conn.channel()
        while ch.queue_declare(owner_queue, passive=True).message_count < len(bodies):
            time.sleep(0.02)


def broker_pid() -> int | None:
    """The shared broker's process (the oldest ``beam.smp``), for CPU accounting only."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry}/comm", "rb") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm == b"beam.smp":
            found.append((int(fields[19]), int(entry)))  # start time, pid
    return min(found)[1] if found else None


def cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of ``pid`` so far (0 when unknown or gone)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _drain_rate(transport: Any, engine: Any, n: int, events: list[Any],
                cpu: dict[str, float] | None = None, child_pid: int | None = None) -> float:
    from brama_mq.owner import Owner
    from brama_mq.protocol import Event

    def note(batch: Any) -> None:
        events.extend(Event.from_core(e) for e in batch)

    owner = Owner(transport, engine=engine, on_events=note)
    start: list[float] = []
    thread = threading.Thread(target=owner.run, daemon=True)
    thread.start()
    broker = broker_pid()
    while not owner.stats.commands:
        time.sleep(0.0005)
    start.append(time.perf_counter())
    before = (cpu_s(os.getpid()), cpu_s(broker), cpu_s(child_pid))
    while owner.stats.commands < n:
        time.sleep(0.002)
    elapsed = time.perf_counter() - start[0]
    after = (cpu_s(os.getpid()), cpu_s(broker), cpu_s(child_pid))
    if cpu is not None:
        for key, b, a in zip(("owner", "broker", "subscriber"), before, after, strict=True):
            cpu[key] = cpu.get(key, 0.0) + (a - b)
        cpu["wall"] = cpu.get("wall", 0.0) + elapsed
    owner.stop(wait=30)
    if owner.stats.dead_lettered:  # the figure would time the refusal path (bench scale did)
        raise RuntimeError(f"the owner dead-lettered {owner.stats.dead_lettered} of {n} "
                           "commands: the bench's commands no longer pass the owner's checks")
    return n / elapsed


def fanout(p: Params) -> dict[str, Any]:
    from brama_mq.client import Brama
    from brama_mq.core.engine import Engine
    from brama_mq.core.matcher import topic_matches
    from brama_mq.core.routing import routing_key
    from brama_mq.owner import run_owner
    from brama_mq.subscribe.filters import filter_keys
    from brama_mq.transport import Topology
    from brama_mq.transport.amqp import AmqpTransport

    prefix = f"bench-sub-{uuid.uuid4().hex[:8]}"
    transport = AmqpTransport(p.url, Topology(prefix))
    scopes = ("s0", "s1")
    conns = [f"c{i}" for i in range(max(p.conns, 60))]
    names = [(scopes[i % 2], c) for i, c in enumerate(conns)]
    specs = filters(conns, scopes)
    engine = Engine(lineage=prefix)
    client = Brama(transport=transport)
    proc: subprocess.Popen[str] | None = None
    try:
        transport.declare()
        setup = run_owner(transport, engine=engine)
        for scope, name in names:
            client.register(name, scope=scope, max_attempts=1_000_000, wait=True)
        setup.stop(wait=30)
        owner_queue = transport.topology.owner_queue()

        cpu: dict[str, dict[str, float]] = {}

        def one_run(events: list[Any], label: str, child_pid: int | None = None) -> float:
            _preload(client, _commands(names, p.n), owner_queue, p.url)
            return _drain_rate(transport, engine, p.n, events, cpu.setdefault(label, {}),
                               child_pid)

        keys = json.dumps(sorted({k for f in specs for k in filter_keys(**f)}))
        here = [sys.executable, "-m", "bench.subscribe"]
        children = {
            "alone": None,
            "brama": [*here, "child", p.url, prefix, json.dumps(specs)],
            "bound": [*here, "raw", p.url, prefix, keys, "0"],
            "raw": [*here, "raw", p.url, prefix, keys, "1"],
        }
        runs: dict[str, list[float]] = {label: [] for label in children}
        seen: list[Any] = []
        report: dict[str, Any] = {}
        bindings: list[list[str]] = []
        for _ in range(p.rounds):
            for label, cmd in children.items():
                if cmd is None:
                    runs[label].append(one_run([], label))
                    continue
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
                assert proc.stdout is not None
                ready = json.loads(proc.stdout.readline())
                runs[label].append(one_run(seen if label == "brama" else [], label, proc.pid))
                time.sleep(0.5)  # let the child take the last events
                proc.terminate()
                done = json.loads(proc.stdout.readline())
                proc.wait(30)
                proc = None
                if label == "brama":
                    bindings = ready["bindings"]
                    received = report.setdefault("received", [[] for _ in done["received"]])
                    for i, got in enumerate(done["received"]):
                        received[i].extend(got)
                    report["dropped"] = report.get("dropped", 0) + sum(done["dropped"])
        exact = True
        for subscription, got in zip(bindings, report["received"], strict=True):
            want = sorted(
                [e.scope, e.connection, e.seq] for e in seen
                if any(topic_matches(b, routing_key(e.scope, e.connection, e.event))
                       for b in subscription)
            )
            exact = exact and want == sorted(got)
        best = {label: max(r) for label, r in runs.items()}

        def paired(label: str) -> float:
            return round(statistics.median(
                x / a for x, a in zip(runs[label], runs["alone"], strict=True)), 3)

        return {
            "fanout_ratio": paired("brama"),
            "fanout_ratio_raw_consumer": paired("raw"),
            "fanout_ratio_bindings_only": paired("bound"),
            "fanout_ratio_best": round(best["brama"] / best["alone"], 3),
            "owner_alone_per_s": round(best["alone"]),
            "owner_50_subscribers_per_s": round(best["brama"]),
            "owner_raw_consumer_per_s": round(best["raw"]),
            "owner_bindings_only_per_s": round(best["bound"]),
            "owner_runs": {label: [round(x) for x in r] for label, r in runs.items()},
            "fanout_events": len(seen),
            "fanout_deliveries": sum(len(g) for g in report["received"]),
            "fanout_dropped": report["dropped"],
            "fanout_exact": exact,
            # CPU seconds per 1,000 commands during the drains (all rounds), by process:
            # the bench process (the owner), the broker, the subscriber child; and the
            # share of the machine's cores they used together.
            "cpu_ms_per_1k_commands": {
                label: {k: round(v * 1e6 / (p.n * p.rounds), 1) for k, v in c.items()
                        if k != "wall"}
                for label, c in cpu.items()
            },
            "cpu_busy_cores": {
                label: round((c["owner"] + c["broker"] + c["subscriber"]) / c["wall"], 2)
                for label, c in cpu.items()
            },
        }
    finally:
        if proc is not None:
            proc.kill()
        client.disconnect()
        transport.delete_topology()
        transport.close()


# -- part 2: one subscription vs a plain kombu consumer ----------------------------------


def _fill(url: str, exchange: str, bodies: list[tuple[str, bytes]], queue: str) -> None:
    """Publish events straight to the exchange with streamed confirms; wait for the queue."""
    import amqp
    import kombu

    with kombu.Connection(url) as conn:
        ch = conn.channel()
        ch.confirm_select()
        acked = [0]

        def on_ack(tag: int, multiple: bool) -> None:
            acked[0] = max(acked[0], tag)

        ch.events["basic_ack"].add(on_ack)
        for key, body in bodies:
            ch.basic_publish(amqp.Message(body, content_type="application/json",
                                          delivery_mode=1), exchange, key)
        while acked[0] < len(bodies):
            conn.drain_events(timeout=5)
        while ch.queue_declare(queue, passive=True).message_count < len(bodies):
            time.sleep(0.02)


def _kombu_rate(url: str, queue: str, m: int, prefetch: int) -> float:
    import kombu

    count = [0]
    with kombu.Connection(url) as conn:
        q = kombu.Queue(queue, channel=conn, no_declare=True)

        def on(body: Any, message: Any) -> None:
            count[0] += 1
            message.ack()

        t0 = time.perf_counter()
        with kombu.Consumer(conn, queues=[q], callbacks=[on], accept=["json"],
                            prefetch_count=prefetch):
            while count[0] < m:
                conn.drain_events(timeout=10)
        return m / (time.perf_counter() - t0)


def _subscriber_rate(transport: Any, name: str, m: int, prefetch: int) -> float:
    import brama_mq

    count = [0]
    done = threading.Event()

    def handle(event: Any) -> None:
        count[0] += 1
        if count[0] == m:
            done.set()

    t0 = time.perf_counter()
    sub = brama_mq.subscribe(name=name, handler=handle, prefetch=prefetch,
                             dedup_window=2 * m, transport=transport).start()
    if not done.wait(120):
        raise RuntimeError(f"the subscriber handled {count[0]} of {m}")
    rate = m / (time.perf_counter() - t0)
    sub.close()
    return rate


def consumer(p: Params) -> dict[str, Any]:
    import brama_mq
    from brama_mq.core.routing import routing_key
    from brama_mq.protocol import encode_event
    from brama_mq.transport import Topology
    from brama_mq.transport.amqp import AmqpTransport

    prefix = f"bench-sub-{uuid.uuid4().hex[:8]}"
    transport = AmqpTransport(p.url, Topology(prefix))
    name = "consumer"
    topo = transport.topology
    queue = topo.subscription_queue(name)
    try:
        brama_mq.subscribe(name=name, transport=transport).close()  # declare and bind "#"
        base = 0
        kinds = ("failure", "success", "state_change", "circuit_opened")

        def batch() -> list[tuple[str, bytes]]:
            nonlocal base
            out = []
            for i in range(p.events):
                seq = base + i + 1
                event = {"event": kinds[i % 4], "timestamp": 1_700_000_000_000 + seq,
                         "connection": f"c{i % 50}", "scope": "bench", "id": f"e{seq}",
                         "seq": seq, "data": {"state": "closed", "failure_count": i % 5}}
                out.append((routing_key("bench", event["connection"], event["event"]),
                            encode_event(event)))
            base += p.events
            return out

        kombu_runs, sub_runs = [], []
        for _ in range(2):
            _fill(p.url, topo.events_exchange, batch(), queue)
            kombu_runs.append(_kombu_rate(p.url, queue, p.events, p.prefetch))
            _fill(p.url, topo.events_exchange, batch(), queue)
            sub_runs.append(_subscriber_rate(transport, name, p.events, p.prefetch))
        return {
            "consumer_ratio": round(max(sub_runs) / max(kombu_runs), 3),
            "subscriber_per_s": round(max(sub_runs)),
            "kombu_consumer_per_s": round(max(kombu_runs)),
            "subscriber_runs": [round(r) for r in sub_runs],
            "kombu_runs": [round(r) for r in kombu_runs],
            "consumer_events": p.events,
            "prefetch": p.prefetch,
        }
    finally:
        brama_mq.unsubscribe()
        transport.delete_queues([queue, topo.subscription_dead_queue(name)])
        transport.delete_topology()
        transport.close()


def run(args: list[str]) -> dict[str, Any]:
    p = parse(args)
    out = fanout(p)
    out.update(consumer(p))
    out["targets_met"] = all(
        (out[key] >= bound) if op == ">=" else (out[key] <= bound)
        for key, (op, bound) in TARGETS.items()
    )
    return out


def format_report(result: dict[str, Any]) -> str:
    lines = [
        f"fanout_ratio   {result['fanout_ratio']:.3f}  (target >= 0.9; median of per-round "
        f"ratios, best/best {result['fanout_ratio_best']}): owner at best "
        f"{result['owner_50_subscribers_per_s']}/s with 50 subscribers vs "
        f"{result['owner_alone_per_s']}/s alone; {result['fanout_deliveries']} deliveries "
        f"of {result['fanout_events']} events, exact={result['fanout_exact']}, "
        f"dropped={result['fanout_dropped']}",
        f"  references: a raw py-amqp consumer {result['owner_raw_consumer_per_s']}/s "
        f"(ratio {result['fanout_ratio_raw_consumer']}), the bindings with no consumer "
        f"{result['owner_bindings_only_per_s']}/s (ratio "
        f"{result['fanout_ratio_bindings_only']}); runs {result['owner_runs']}; CPU ms "
        f"per 1,000 commands {result['cpu_ms_per_1k_commands']}",
        f"consumer_ratio {result['consumer_ratio']:.3f}  (target >= 0.8): subscriber "
        f"{result['subscriber_per_s']}/s vs kombu {result['kombu_consumer_per_s']}/s "
        f"({result['consumer_events']} events, prefetch {result['prefetch']}; runs "
        f"{result['subscriber_runs']} vs {result['kombu_runs']})",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        sys.exit(child(sys.argv[2:]))
    if len(sys.argv) > 1 and sys.argv[1] == "raw":
        sys.exit(raw_child(sys.argv[2:]))
    print(json.dumps(run(sys.argv[1:])))
