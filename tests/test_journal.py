"""The journal makes a replica exact: replaying an owner's inputs into a fresh engine (or
into one restored from a snapshot taken part-way) gives the same registry."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from brama_mq.core.engine import Command, Engine
from brama_mq.owner.journal import AppliedIds, JournalBatch, replay

NAMES = [("s", "a"), ("s", "b"), (None, "c")]
OPS = ["register", "success", "failure", "open", "close", "reset", "unregister", "configure"]

step = st.one_of(
    st.tuples(st.just("cmd"), st.sampled_from(OPS), st.sampled_from(NAMES), st.integers(0, 3000)),
    st.tuples(st.just("adv"), st.just(""), st.just(("", "")), st.integers(0, 3000)),
    st.tuples(st.just("probe"), st.just(""), st.sampled_from(NAMES), st.integers(0, 3000)),
)

OPTIONS: dict[str, dict[str, Any]] = {
    "register": {
        "max_attempts": 2,
        "expiry_ms": 500,
        "half_open_permits": 2,
        "probe_timeout_ms": 300,
        "inactive_ms": 5000,
        "backoff": "exponential",
    },
    "configure": {"expiry_ms": 700},
}


APPLIED_BY_OWNER: list[str] = []


def drive(steps: list[tuple[str, str, tuple[Any, Any], int]]) -> tuple[Engine, list[JournalBatch]]:
    """Run steps on an engine the way the owner does, journaling each input, 3 per batch."""
    APPLIED_BY_OWNER.clear()
    engine = Engine(lineage="t")
    batches: list[JournalBatch] = []
    now = 1_000
    for i, (kind, op, (scope, conn), dt) in enumerate(steps):
        if i % 3 == 0:
            batches.append(JournalBatch("t", len(batches) + 1))
        batch = batches[-1]
        now += dt
        if kind == "adv":
            engine.advance(now)
            batch.advance(now)
        elif kind == "probe":
            if (scope, conn) in engine:
                engine.acquire_probe(scope, conn, now)
                batch.probe(now, scope, conn)
        else:
            doc = {
                "op": op,
                "connection": conn,
                "scope": scope,
                "id": f"id{i}",
                "options": OPTIONS.get(op, {}),
            }
            result = engine.apply(Command(op, conn, scope, None, doc["options"]), now)
            batch.command(now, doc)
            if result.status in ("applied", "already_registered"):
                APPLIED_BY_OWNER.append(doc["id"])
    return engine, batches


def roundtrip(batch: JournalBatch) -> JournalBatch:
    return JournalBatch.decode(batch.encode())


@settings(max_examples=150, deadline=None)
@given(st.lists(step, max_size=40))
def test_replay_from_empty_gives_the_same_registry(steps: list[Any]) -> None:
    """A standby replaying every batch from the start ends equal to the owner, and knows
    the ids of exactly the commands the owner applied (refused ones may come again)."""
    owner, batches = drive(steps)
    replica = Engine(lineage="t")
    applied = AppliedIds()
    for batch in batches:
        replay(replica, roundtrip(batch), applied)
    assert replica.snapshot() == owner.snapshot()
    assert applied.dump() == APPLIED_BY_OWNER


@settings(max_examples=150, deadline=None)
@given(st.lists(step, max_size=40), st.integers(0, 20))
def test_snapshot_plus_later_batches_gives_the_same_registry(steps: list[Any], cut: int) -> None:
    """A restart restores the last snapshot and replays only the batches after it."""
    owner, batches = drive(steps)
    cut = min(cut, len(batches))
    early = Engine(lineage="t")
    for batch in batches[:cut]:
        replay(early, batch)
    restored = Engine.restore(json.loads(json.dumps(early.snapshot())))
    for batch in batches[cut:]:
        replay(restored, roundtrip(batch))
    assert restored.snapshot() == owner.snapshot()


def test_applied_ids_are_bounded() -> None:
    """Only the newest ids are kept; the oldest fall out first."""
    ids = AppliedIds(limit=3)
    for i in range(5):
        ids.add(str(i))
    assert ids.dump() == ["2", "3", "4"] and "0" not in ids and "4" in ids
