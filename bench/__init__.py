"""brama_mq benchmarks: ``python -m bench`` lists them, ``python -m bench NAME [--json]`` runs one.

Each scenario is a module with ``run(args: list[str]) -> dict`` (``args``: the command-line
words after the scenario name, minus ``--json``) returning its figures, and optionally
``format_report(result: dict) -> str`` for the human-readable output. Registering a new
scenario is one line in ``SCENARIOS``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import NamedTuple


class Scenario(NamedTuple):
    module: str
    description: str


#: name -> (module, one-line description). Add a scenario with one line here.
SCENARIOS: dict[str, Scenario] = {
    "core": Scenario("bench.core", "sans-I/O engine: commands/s, idle bytes, advance() cost"),
    "subscribe": Scenario("bench.subscribe", "50 subscribers vs the owner; subscriber vs kombu"),
    "guard": Scenario("bench.guard", "guard check vs pybreaker (memory, Redis); Celery ratio"),
    "owner": Scenario("bench.owner", "owner on RabbitMQ: vs a kombu relay, confirm storm, latency"),
    "soak": Scenario("bench.soak", "mixed load with periodic owner kills: takeover, memory, loss"),
    "scale": Scenario("bench.scale", "owner throughput 1 vs 2 shards; connections per GB"),
    "cluster": Scenario("bench.cluster", "owner on a 3-node cluster vs one node; fault recovery"),
}


def load(name: str) -> ModuleType:
    """Import a scenario's module (lazily, so listing never imports kombu or a broker)."""
    return importlib.import_module(SCENARIOS[name].module)
