"""The benches time the path they claim to time.

``bench scale`` once registered its connections with ``max_attempts=1e9``; after the owner
gained its input limits every register was refused, every outcome hit an unknown
connection, and the bench measured dead-lettering (220 µs per command instead of ~60)
for a whole session. These tests run the bench's commands through the owner's own decode
and apply steps, with no broker, so a change to the limits that breaks a bench shows here.
"""

from __future__ import annotations

import pytest

from bench.scale import SCOPE, shard_commands
from brama_mq.core import Engine
from brama_mq.core.routing import stable_shard
from brama_mq.protocol import decode_command

NOW = 1_700_000_000_000


@pytest.mark.parametrize("shards", [1, 2])
def test_every_scale_command_is_applied_and_none_opens(shards: int) -> None:
    """Pins: all of bench scale's registers and outcomes are applied (no refusal that the
    owner would dead-letter), no circuit opens, and each shard's count matches what its
    owner's clock waits for."""
    items, counts = shard_commands("t", shards, conns=40, n=4_000)
    engines = {k: Engine(lineage=f"t{k}") for k in range(shards)}
    seen = dict.fromkeys(range(shards), 0)
    for key, body in items:
        command = decode_command(body, "application/json", max_bytes=65_536)
        assert command.connection is not None
        shard = 0 if shards == 1 else stable_shard(SCOPE, command.connection, shards)
        assert key.endswith("owner" if shards == 1 else f"owner.{shard}"), key
        result = engines[shard].apply(command, NOW)
        assert result.ok, (command.op, result.status, result.error)
        assert not [ev.event for ev in result.events if ev.critical]
        seen[shard] += 1
    assert {k: (len(engines[k]), seen[k]) for k in engines} == counts
