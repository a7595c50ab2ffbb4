"""Engine throughput, idle memory and ``advance()`` cost, with a same-run baseline.

* ``success_per_s``: success commands on closed circuits through ``Engine.apply``, from a
  prebuilt list of ``Command`` objects spread over many connections.
* ``failure_per_s``: failures that stay below the threshold.
* ``transition_per_s``: commands that each cause a transition (a failure that opens,
  then a close, alternately).
* ``bytes_per_idle_connection``: tracemalloc's count of what an engine holding
  ``--idle`` registered, never-used connections (default policy) allocated, after
  ``gc.collect()``, divided by their number. ``bytes_per_idle_connection_gc`` cross-checks it
  by walking the engine's object graph with ``gc.get_referents`` and summing
  ``sys.getsizeof`` of every object reached.
* ``advance_idle_us``: mean µs of ``advance(now)`` on that engine with nothing due.
* ``baseline_per_s``: a plain ``counts[key] += 1`` loop over as many items, same run, so
  the figures read as ratios on a noisy shared machine.

Every timing is the best of ``--repeat`` runs (default 3) with ``time.perf_counter``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tracemalloc
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from time import perf_counter
from types import BuiltinFunctionType, FunctionType, MethodType, ModuleType
from typing import Any

from brama_mq.core import CLOSED, Command, Engine

NOW = 1_700_000_000_000  # epoch ms; the engine never reads a clock
SCOPE = "bench"

TARGETS: dict[str, tuple[str, float]] = {
    "success_per_s": (">=", 150_000),
    "bytes_per_idle_connection": ("<=", 1024),
    "advance_idle_us": ("<=", 50),
}


@dataclass(frozen=True)
class Params:
    ops: int
    connections: int
    idle: int
    advance_calls: int
    repeat: int


def parse(args: list[str]) -> Params:
    parser = argparse.ArgumentParser(prog="python -m bench core", description=__doc__)
    parser.add_argument("--ops", type=int, default=300_000, help="commands per timed run")
    parser.add_argument("--connections", type=int, default=10_000, help="busy connections")
    parser.add_argument("--idle", type=int, default=100_000, help="idle connections")
    parser.add_argument("--advance-calls", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    ns = parser.parse_args(args)
    if ns.quick:
        return Params(20_000, 1_000, 10_000, 10_000, 1)
    return Params(ns.ops, ns.connections, ns.idle, ns.advance_calls, ns.repeat)


def names(count: int) -> list[str]:
    return [f"conn-{i:06d}" for i in range(count)]


def best_of(repeat: int, run: Callable[[], float]) -> float:
    """Smallest of ``repeat`` timings (seconds): the run least disturbed by neighbours."""
    return min(run() for _ in range(repeat))


def time_commands(engine: Engine, commands: list[Command], now: int) -> float:
    apply = engine.apply
    start = perf_counter()
    for command in commands:
        apply(command, now)
    return perf_counter() - start


def busy_engine(conns: list[str], options: dict[str, Any]) -> Engine:
    engine = Engine(lineage="bench")
    for name in conns:
        engine.register(SCOPE, name, NOW, options)
    return engine


def measure_baseline(p: Params) -> float:
    keys = [f"conn-{i % p.connections:06d}" for i in range(p.ops)]

    def run() -> float:
        counts = dict.fromkeys(keys, 0)
        start = perf_counter()
        for key in keys:
            counts[key] += 1
        return perf_counter() - start

    return p.ops / best_of(p.repeat, run)


def measure_success(p: Params) -> float:
    conns = names(p.connections)
    engine = busy_engine(conns, {})
    commands = [Command("success", conns[i % len(conns)], SCOPE) for i in range(p.ops)]
    seconds = best_of(p.repeat, lambda: time_commands(engine, commands, NOW + 1))
    assert all(s["state"] == CLOSED for s in engine.statuses())
    return p.ops / seconds


def measure_failure(p: Params) -> float:
    conns = names(p.connections)
    engine = busy_engine(conns, {"max_attempts": 1_000_000})
    commands = [
        Command("failure", conns[i % len(conns)], SCOPE, reason="timeout") for i in range(p.ops)
    ]
    seconds = best_of(p.repeat, lambda: time_commands(engine, commands, NOW + 1))
    assert all(s["state"] == CLOSED for s in engine.statuses())
    return p.ops / seconds


def measure_transition(p: Params) -> float:
    conns = names(p.connections)
    commands: list[Command] = []
    for i in range(p.ops // 2):
        name = conns[i % len(conns)]
        commands.append(Command("failure", name, SCOPE))  # max_attempts 1: opens
        commands.append(Command("close", name, SCOPE))

    def run() -> float:
        engine = busy_engine(conns, {"max_attempts": 1})
        seconds = time_commands(engine, commands, NOW + 1)
        assert all(s["state"] == CLOSED for s in engine.statuses())
        return seconds

    return len(commands) / best_of(p.repeat, run)


def deep_size(root: object) -> int:
    """Bytes of every object reachable from ``root`` (code, classes and modules not entered)."""
    opaque = (type, ModuleType, FunctionType, BuiltinFunctionType)
    seen: set[int] = set()
    stack: list[object] = [root]
    total = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, opaque):
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        referents: Iterable[object] = gc.get_referents(obj)
        if isinstance(obj, MethodType):
            referents = [obj.__self__]
        stack.extend(referents)
    return total


def measure_idle(p: Params) -> tuple[float, float, float]:
    """(bytes per idle connection by tracemalloc, by gc walk, mean µs of an idle advance)."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    engine = Engine(lineage="bench")
    for i in range(p.idle):
        engine.register(SCOPE, f"idle-{i:06d}", NOW)
    gc.collect()
    traced = (tracemalloc.get_traced_memory()[0] - before) / p.idle
    tracemalloc.stop()
    empty = deep_size(Engine(lineage="bench"))
    walked = (deep_size(engine) - empty) / p.idle

    now = NOW + 1
    assert engine.next_deadline is not None and engine.next_deadline > now
    advance = engine.advance
    calls = range(p.advance_calls)

    def run() -> float:
        start = perf_counter()
        for _ in calls:
            advance(now)
        return perf_counter() - start

    mean_us = best_of(p.repeat, run) / p.advance_calls * 1e6
    assert len(engine) == p.idle
    return traced, walked, mean_us


def run(args: list[str]) -> dict[str, Any]:
    p = parse(args)
    baseline = measure_baseline(p)
    success = measure_success(p)
    failure = measure_failure(p)
    transition = measure_transition(p)
    traced, walked, advance_us = measure_idle(p)
    result: dict[str, Any] = {
        "success_per_s": round(success),
        "failure_per_s": round(failure),
        "transition_per_s": round(transition),
        "bytes_per_idle_connection": round(traced, 1),
        "advance_idle_us": round(advance_us, 3),
        "baseline_per_s": round(baseline),
        "success_vs_baseline": round(success / baseline, 4),
        "failure_vs_baseline": round(failure / baseline, 4),
        "transition_vs_baseline": round(transition / baseline, 4),
        "bytes_per_idle_connection_gc": round(walked, 1),
        "params": {
            "ops": p.ops,
            "connections": p.connections,
            "idle_connections": p.idle,
            "advance_calls": p.advance_calls,
            "repeat": p.repeat,
        },
    }
    result["targets"] = {key: f"{op} {limit:g}" for key, (op, limit) in TARGETS.items()}
    result["meets_targets"] = all(_meets(result[key], key) for key in TARGETS)
    return result


def _meets(value: float, key: str) -> bool:
    op, limit = TARGETS[key]
    return value >= limit if op == ">=" else value <= limit


def format_report(result: dict[str, Any]) -> str:
    p = result["params"]
    base = result["baseline_per_s"]
    rows = [
        ("success_per_s", f"{result['success_per_s']:,}/s", f"{result['success_vs_baseline']:.3f}"),
        ("failure_per_s", f"{result['failure_per_s']:,}/s", f"{result['failure_vs_baseline']:.3f}"),
        (
            "transition_per_s",
            f"{result['transition_per_s']:,}/s",
            f"{result['transition_vs_baseline']:.3f}",
        ),
        ("bytes_per_idle_connection", f"{result['bytes_per_idle_connection']:,.0f} B", ""),
        ("  (gc object walk)", f"{result['bytes_per_idle_connection_gc']:,.0f} B", ""),
        ("advance_idle_us", f"{result['advance_idle_us']:.2f} µs", ""),
        ("baseline_per_s (dict +=1)", f"{base:,}/s", "1.000"),
    ]
    lines = [
        f"brama_mq core engine — {p['ops']:,} commands over {p['connections']:,} connections, "
        f"{p['idle_connections']:,} idle, best of {p['repeat']}",
        f"{'figure':<28}{'value':>16}  {'vs baseline':>11}  target",
    ]
    for key, value, ratio in rows:
        target = ""
        if key in TARGETS:
            op, limit = TARGETS[key]
            target = f"{op} {limit:,g}  {'ok' if _meets(result[key], key) else 'MISSED'}"
        lines.append(f"{key:<28}{value:>16}  {ratio:>11}  {target}")
    lines.append("all targets met" if result["meets_targets"] else "SOME TARGETS MISSED")
    return "\n".join(lines)
