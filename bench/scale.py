"""Scale out: owner throughput with 1 shard vs 2 shards, and connections per GB of owner.

Needs a broker (``BRAMA_BENCH_BROKER_URL``, default ``amqp://guest:guest@127.0.0.1:5672//``);
every round uses a fresh prefix and deletes what it declared.

**(a) shards.** The same ``C`` register commands (``max_attempts`` at the owner's limit,
1,000,000, so nothing ever opens) and ``N`` success/failure commands over those
connections are pre-published, persistent and confirmed, exactly as the Brama client sends
them: to ``{p}.owner`` for one shard, to ``{p}.owner.<stable_shard(...)>`` for two. Then
one owner process per shard (the real :class:`~brama_mq.owner.Owner` on an
``AmqpTransport``, as ``brama-mq worker --shard k`` builds it, in a child process of its
own) is told to start, all at the same moment. Each stamps ``time.monotonic()``
(system-wide on Linux, so comparable between processes) when its first outcome command
reaches its consumer callback (registrations are outside the clock) and when it acked its
last one. ``*_per_s = N / (last end - first start)``. Each layout is let go only once the
machine is quiet (>= 80% idle over 0.5 s, after at least 1 s, at most 15 s: the
pre-published commands are still being written and the previous layout's queues deleted),
and a round is refused if an owner dead-lettered a command or registered fewer connections
than it was sent (the bench would be timing the refusal path). Rounds alternate which
layout goes first; ``shard_ratio`` is the median over rounds of ``two_shards / one_shard``
measured in the same round (each round's pair ran back to back, under the same load), the
``*_per_s`` figures are the medians. Each round also gives the owners' CPU time per
command (``one_cpu_us``, ``two_cpu_us``: summed over the shard processes), which says how
much of a poor ratio is CPU contention (the same work, less of a core each) rather than
extra work. ``broker_cpu_us`` is the same for the local RabbitMQ node(s) (``beam.smp``),
from GO to the last result.

**(b) connections per GB.** Measured two ways, the larger cost counts:

* ``engine``: a fresh child process registers ``--idle`` connections (default policy)
  in a bare :class:`~brama_mq.core.Engine`; RSS after minus RSS before, per connection
  (RSS includes the allocator's overhead, which tracemalloc does not see; tracemalloc's
  figure is reported too).
* ``owner``: a real owner process on the broker applies ``--owner-conns`` pre-published
  register commands; RSS when it finished (after ``gc.collect()``) minus RSS when it had
  applied its first 1,000, per connection. It includes everything the owner keeps per
  connection and its bounded caches (routing keys), so it overstates the marginal cost.

``connections_per_gb = (1e9 - owner RSS before registering) / max(per-connection bytes)``:
a linear extrapolation, which holds because every per-connection structure is a dict
entry and a small object (no per-connection timers, threads or queues).

``python -m bench scale [--json] [--n N] [--conns C] [--repeat R] [--idle I]
[--owner-conns K] [--quick]``
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672//"
ROOT = Path(__file__).resolve().parent.parent
SCOPE = "bench"
PREFETCH = 500
GB = 1_000_000_000
#: Before each layout starts, wait (at least SETTLE_S, at most SETTLE_MAX_S) until the
#: machine is this idle over a QUIET_WINDOW_S sample: the quorum queues write on after the
#: last confirm, and the previous layout's deleted queues and streams are still being
#: removed. Starting into that work made single rounds swing between 1.0 and 1.7.
SETTLE_S = 1.0
SETTLE_MAX_S = 15.0
QUIET_IDLE = 0.8
QUIET_WINDOW_S = 0.5
#: The policy limit (brama_mq.core.policy); the registers ask for it so nothing opens.
MAX_ATTEMPTS = 1_000_000

TARGETS: dict[str, tuple[str, float]] = {
    "shard_ratio": (">=", 1.3),
    "connections_per_gb": (">=", 1_000_000),
}


@dataclass(frozen=True)
class Params:
    url: str
    n: int
    conns: int
    repeat: int
    idle: int
    owner_conns: int


def parse(args: list[str]) -> Params:
    parser = argparse.ArgumentParser(
        prog="python -m bench scale", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--n", type=int, default=60_000, help="(a) timed outcome commands")
    parser.add_argument("--conns", type=int, default=400, help="(a) connections")
    parser.add_argument("--repeat", type=int, default=5, help="(a) rounds of 1 vs 2 shards")
    parser.add_argument("--idle", type=int, default=300_000, help="(b) engine connections")
    parser.add_argument("--owner-conns", type=int, default=300_000,
                        help="(b) connections registered in a real owner")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    ns = parser.parse_args(args)
    url = os.environ.get("BRAMA_BENCH_BROKER_URL") or DEFAULT_URL
    if ns.quick:
        return Params(url, 4_000, 100, 1, 20_000, 5_000)
    return Params(url, ns.n, ns.conns, max(1, ns.repeat), ns.idle, ns.owner_conns)


def _rss() -> int:
    """Resident set size of this process, in bytes (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# ------------------------------------------------------------------------------ children
class Child:
    """``python -m bench.scale child CONFIG``: prints READY, waits for GO, prints JSON."""

    def __init__(self, config: dict[str, Any]) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.scale", "child", json.dumps(config)],
            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        self.err: list[str] = []
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=10)
            raise RuntimeError(f"child exited ({self.proc.returncode}):\n{''.join(self.err[-30:])}")
        return line.strip()

    def ready(self) -> None:
        line = self._line()
        if line != "READY":
            raise RuntimeError(f"child said {line!r}, not READY")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("GO\n")
        self.proc.stdin.flush()

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self._line())
        self.proc.wait(timeout=30)
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _child_owner(cfg: dict[str, Any]) -> dict[str, Any]:
    """A real Owner for one shard; stamps its first timed delivery and its last ack."""
    from brama_mq.owner import Owner
    from brama_mq.transport import Topology
    from brama_mq.transport.amqp import AmqpOwnerLink, AmqpTransport
    from brama_mq.transport.base import decode_tag

    start_at: int = cfg["start_at"]
    expect: int = cfg["expect"]
    rss_at: int = cfg.get("rss_at", 0)
    stamps: dict[str, float] = {}
    rss: dict[str, int] = {}
    owner: Owner | None = None

    class StampedLink(AmqpOwnerLink):
        seen = 0

        def _on_delivery(self, msg: Any) -> None:
            self._buffer.append(msg)
            self.seen += 1
            if self.seen == start_at:
                stamps["first"] = time.monotonic()
                stamps["cpu_first"] = time.process_time()

        def ack(self, delivery_tag: int, multiple: bool = True) -> None:
            super().ack(delivery_tag, multiple)
            tag = decode_tag(delivery_tag)[1]
            if rss_at and "at" not in rss and tag >= rss_at:
                gc.collect()
                rss["at"] = _rss()
            if "end" not in stamps and tag >= expect:
                stamps["end"] = time.monotonic()
                stamps["cpu_end"] = time.process_time()
                assert owner is not None
                owner.stop()

    class StampedTransport(AmqpTransport):
        def owner_link(self, *, prefetch: int = 500, shard: int | None = None) -> AmqpOwnerLink:
            return self._track(StampedLink(self, prefetch=prefetch, shard=shard))

    transport = StampedTransport(cfg["url"], Topology(cfg["prefix"], cfg["shards"]))
    owner = Owner(transport, prefetch=PREFETCH, shard=cfg["shard"], max_command_bytes=65_536)
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "GO":
        raise SystemExit("no GO")
    rss["start"] = _rss()
    timer = threading.Timer(cfg.get("timeout", 300.0), owner.stop)
    timer.daemon = True
    timer.start()
    owner.run()
    transport.close()
    gc.collect()
    if "end" not in stamps:
        raise RuntimeError(f"owner stopped before acking {expect} deliveries")
    return {
        "first": stamps.get("first"), "end": stamps["end"], "connections": len(owner.engine),
        "dead_lettered": owner.stats.dead_lettered,
        "cpu": stamps["cpu_end"] - stamps.get("cpu_first", stamps["cpu_end"]),
        "rss_start": rss["start"], "rss_at": rss.get("at"), "rss_end": _rss(),
    }


def _child_engine(cfg: dict[str, Any]) -> dict[str, Any]:
    """RSS and tracemalloc cost of idle registered connections in a bare engine."""
    from brama_mq.core import Engine

    print("READY", flush=True)
    sys.stdin.readline()
    now = 1_700_000_000_000
    count: int = cfg["count"]
    gc.collect()
    before = _rss()
    engine = Engine(lineage="bench")
    for i in range(count):
        engine.register(SCOPE, f"idle-{i:07d}", now)
    gc.collect()
    after = _rss()
    del engine
    gc.collect()
    tracemalloc.start()
    t0 = tracemalloc.get_traced_memory()[0]
    engine = Engine(lineage="bench")
    for i in range(count):
        engine.register(SCOPE, f"idle-{i:07d}", now)
    gc.collect()
    traced = tracemalloc.get_traced_memory()[0] - t0
    tracemalloc.stop()
    return {"rss_per_conn": (after - before) / count, "traced_per_conn": traced / count,
            "rss_before": before}


def child_main(config: str) -> None:
    cfg = json.loads(config)
    fn = _child_owner if cfg["role"] == "owner" else _child_engine
    print(json.dumps(fn(cfg)), flush=True)


# ------------------------------------------------------------------------------ (a) shards
def shard_commands(
    prefix: str, shards: int, conns: int, n: int
) -> tuple[list[tuple[str, bytes]], dict[int, tuple[int, int]]]:
    """(routing key, body) of the registers then the outcomes, in publishing order, and
    shard -> (registers, total commands) for the owners' clocks."""
    from bench.owner import command_bodies
    from brama_mq.core.routing import stable_shard
    from brama_mq.transport import Topology

    topo = Topology(prefix, shards)
    names = [f"c{i:05d}" for i in range(conns)]
    shard_of = {nm: 0 if shards == 1 else stable_shard(SCOPE, nm, shards) for nm in names}

    def key(name: str) -> str:
        return topo.owner_key(None if shards == 1 else shard_of[name])

    # The largest max_attempts the owner accepts (a larger one is dead-lettered as invalid,
    # and the bench would time dead-lettering): ~75 failures each never open a circuit.
    regs = command_bodies("register", names, options={"max_attempts": MAX_ATTEMPTS})
    outcome_names = [names[i % conns] for i in range(n)]
    succ = command_bodies("success", outcome_names[0::2])
    fail = command_bodies("failure", outcome_names[1::2], reason="bench")
    outcomes = [b for pair in zip(succ, fail, strict=False) for b in pair]
    if len(succ) > len(fail):
        outcomes.append(succ[-1])
    items = [(key(nm), b) for nm, b in zip(names, regs, strict=True)]
    items += [(key(nm), b) for nm, b in zip(outcome_names, outcomes, strict=True)]
    counts: dict[int, tuple[int, int]] = {}
    for k in range(shards):
        mine = {nm for nm in names if shard_of[nm] == k}
        total = len(mine) + sum(1 for nm in outcome_names if nm in mine)
        counts[k] = (len(mine), total)
    return items, counts


def _prepublish(
    url: str, prefix: str, shards: int, conns: int, n: int
) -> dict[int, tuple[int, int]]:
    """Declare the topology and publish :func:`shard_commands`, confirmed."""
    from bench.owner import publish_confirmed
    from brama_mq.transport import Topology
    from brama_mq.transport.amqp import AmqpTransport

    topo = Topology(prefix, shards)
    admin = AmqpTransport(url, topo)
    admin.declare()
    admin.close()
    items, counts = shard_commands(prefix, shards, conns, n)
    publish_confirmed(url, topo.commands_exchange, items)
    return counts


def _cpu_idle_fraction(window: float) -> float | None:
    """Share of all CPUs idle over ``window`` seconds (/proc/stat), None off Linux."""

    def sample() -> tuple[int, int] | None:
        try:
            fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        except OSError:
            return None
        ticks = [int(f) for f in fields]
        return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, total

    a = sample()
    time.sleep(window)
    b = sample()
    if a is None or b is None or b[1] == a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1])


def _broker_cpu_s() -> float | None:
    """CPU seconds used so far by local RabbitMQ nodes (beam.smp), None if none is local.

    A diagnostic: it shows whether a layout ran out of cores (owners + broker ~ 2 cores)
    or waited on round trips (less than that)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, found = 0, False
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() != "beam.smp":
                continue
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
        found = True
    return total / tick if found else None


def settle() -> float:
    """Wait until the machine is quiet (see SETTLE_S); returns the idle share seen last."""
    time.sleep(SETTLE_S)
    deadline = time.monotonic() + SETTLE_MAX_S
    idle = _cpu_idle_fraction(QUIET_WINDOW_S)
    while idle is not None and idle < QUIET_IDLE and time.monotonic() < deadline:
        idle = _cpu_idle_fraction(QUIET_WINDOW_S)
    return idle if idle is not None else 1.0


def _delete(url: str, prefix: str, shards: int) -> None:
    from brama_mq.transport import Topology
    from brama_mq.transport.amqp import AmqpTransport

    t = AmqpTransport(url, Topology(prefix, shards))
    try:
        t.delete_topology()
    finally:
        t.close()


def shard_round(p: Params, shards: int) -> dict[str, Any]:
    prefix = f"bench-scale-{shards}-{uuid.uuid4().hex[:8]}"
    children: list[Child] = []
    try:
        counts = _prepublish(p.url, prefix, shards, p.conns, p.n)
        for k in range(shards):
            regs, total = counts[k]
            children.append(Child({
                "role": "owner", "url": p.url, "prefix": prefix, "shards": shards,
                "shard": None if shards == 1 else k, "start_at": regs + 1, "expect": total,
            }))
        for c in children:
            c.ready()
        idle = settle()  # after the children's imports, before anything is timed
        broker0 = _broker_cpu_s()
        for c in children:
            c.go()
        results = [c.result() for c in children]
        broker1 = _broker_cpu_s()
    finally:
        for c in children:
            c.kill()
        _delete(p.url, prefix, shards)
    for k, r in enumerate(results):
        # A bench that dead-letters its commands times the wrong path: refuse the figure.
        if r["dead_lettered"] or r["connections"] != counts[k][0]:
            raise RuntimeError(
                f"shard {k}: {r['dead_lettered']} commands dead-lettered, "
                f"{r['connections']} of {counts[k][0]} connections registered"
            )
    start = min(r["first"] for r in results)
    end = max(r["end"] for r in results)
    return {"per_s": p.n / (end - start),
            "per_shard_s": [round(r["end"] - r["first"], 3) for r in results],
            "idle_at_go": round(idle, 2),
            # From GO to the last result: includes the owners' start-up, so an upper bound.
            "broker_cpu_us": None if broker0 is None or broker1 is None
            else round((broker1 - broker0) / p.n * 1e6, 1),
            "cpu_us_per_command": sum(r["cpu"] for r in results) / p.n * 1e6}


# ------------------------------------------------------------------------------ (b) memory
def memory(p: Params) -> dict[str, Any]:
    engine_child = Child({"role": "engine", "count": p.idle})
    engine_child.ready()
    engine_child.go()
    engine = engine_child.result()

    prefix = f"bench-scale-mem-{uuid.uuid4().hex[:8]}"
    from bench.owner import command_bodies, publish_confirmed
    from brama_mq.transport import Topology
    from brama_mq.transport.amqp import AmqpTransport

    topo = Topology(prefix)
    child: Child | None = None
    try:
        admin = AmqpTransport(p.url, topo)
        admin.declare()
        admin.close()
        names = [f"m{i:07d}" for i in range(p.owner_conns)]
        bodies = command_bodies("register", names)
        publish_confirmed(p.url, topo.commands_exchange, [("owner", b) for b in bodies])
        child = Child({"role": "owner", "url": p.url, "prefix": prefix, "shards": 1,
                       "shard": None, "start_at": 1, "expect": p.owner_conns,
                       "rss_at": 1_000})
        child.ready()
        child.go()
        owner = child.result()
    finally:
        if child is not None:
            child.kill()
        _delete(p.url, prefix, 1)
    assert owner["connections"] == p.owner_conns, owner
    owner_per_conn = (owner["rss_end"] - owner["rss_at"]) / (p.owner_conns - 1_000)
    per_conn = max(owner_per_conn, engine["rss_per_conn"], engine["traced_per_conn"])
    return {
        "connections_per_gb": int((GB - owner["rss_at"]) / per_conn),
        "owner_bytes_per_conn": round(owner_per_conn, 1),
        "engine_rss_bytes_per_conn": round(engine["rss_per_conn"], 1),
        "engine_traced_bytes_per_conn": round(engine["traced_per_conn"], 1),
        "owner_base_rss_mb": round(owner["rss_at"] / 1e6, 1),
        "owner_rss_after_mb": round(owner["rss_end"] / 1e6, 1),
    }


def run(args: list[str]) -> dict[str, Any]:
    p = parse(args)
    rounds: list[dict[str, Any]] = []
    for i in range(p.repeat):
        order = (1, 2) if i % 2 == 0 else (2, 1)
        got = {s: shard_round(p, s) for s in order}
        rounds.append({"one": got[1]["per_s"], "two": got[2]["per_s"],
                       "ratio": got[2]["per_s"] / got[1]["per_s"],
                       "two_per_shard_s": got[2]["per_shard_s"],
                       "idle_at_go": [got[1]["idle_at_go"], got[2]["idle_at_go"]],
                       "broker_cpu_us": [got[1]["broker_cpu_us"], got[2]["broker_cpu_us"]],
                       "one_cpu_us": got[1]["cpu_us_per_command"],
                       "two_cpu_us": got[2]["cpu_us_per_command"]})
    mem = memory(p)
    result: dict[str, Any] = {
        "one_shard_per_s": round(statistics.median(r["one"] for r in rounds)),
        "two_shards_per_s": round(statistics.median(r["two"] for r in rounds)),
        "shard_ratio": round(statistics.median(r["ratio"] for r in rounds), 3),
        "connections_per_gb": mem["connections_per_gb"],
        "rounds": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                   for r in rounds],
        "memory": {k: v for k, v in mem.items() if k != "connections_per_gb"},
        "params": {"n": p.n, "conns": p.conns, "repeat": p.repeat, "idle": p.idle,
                   "owner_conns": p.owner_conns, "cpus": os.cpu_count()},
    }
    result["targets"] = {k: f"{op} {v:g}" for k, (op, v) in TARGETS.items()}
    result["meets_targets"] = all(
        (result[k] >= v) if op == ">=" else (result[k] <= v) for k, (op, v) in TARGETS.items()
    )
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "child":
        child_main(sys.argv[2])
    else:
        print("run it as: python -m bench scale [--json]", file=sys.stderr)
        raise SystemExit(2)
