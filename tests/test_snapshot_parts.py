"""Snapshots written as several compressed part records, and read back whole."""

from __future__ import annotations

import json
import random

import pytest

from brama_mq.core.engine import Command, Engine
from brama_mq.owner.failover import SnapshotAssembler, latest_snapshot
from brama_mq.owner.journal import (
    PART_MAGIC,
    AppliedIds,
    Snapshot,
    SnapshotPart,
    encode_snapshot,
    encode_snapshot_parts,
)
from brama_mq.transport import MemoryTransport, Topology


def _engine(n: int, lineage: str = "snap", seed: int = 1) -> Engine:
    """``n`` connections in assorted states (some open, some with failures)."""
    rng = random.Random(seed)
    engine = Engine(lineage=lineage)
    for i in range(n):
        scope = rng.choice([None, "a", "b"])
        engine.apply(Command("register", f"c{i}", scope, None,
                             {"max_attempts": rng.randint(1, 3)}), 1_000)
        for _ in range(rng.randint(0, 3)):
            engine.apply(Command("failure", f"c{i}", scope, "boom", {}), 1_000 + i)
    engine.apply(Command("unregister", "c0", None, None, {}), 5_000) if n and (
        (None, "c0") in engine) else None
    return engine


def _parts(engine: Engine, part_size: int, **kw: object) -> list[bytes]:
    applied = AppliedIds()
    applied.load(f"id{i}" for i in range(7))
    return list(encode_snapshot_parts(engine, applied, owner="o1", n=3, kind="batch",
                                      ts=123_456, part_size=part_size, **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize(("n", "part_size"), [(0, 10), (1, 10), (9, 10), (10, 10), (11, 10),
                                               (257, 16), (1_000, 1), (2_500, 1_000)])
def test_parts_round_trip_engines_of_any_size(n: int, part_size: int) -> None:
    """Any registry split into parts of any size comes back equal, with its header
    (the record it follows, ts, applied ids); each part is one compressed record."""
    engine = _engine(n)
    bodies = _parts(engine, part_size)
    assert len(bodies) == max(1, -(-len(engine) // part_size))
    assert all(b.startswith(PART_MAGIC) for b in bodies)
    parts = [SnapshotPart.parse(b) for b in bodies]
    assert all(p is not None for p in parts)
    snap = Snapshot.from_parts([p for p in parts if p is not None])
    assert snap.engine.snapshot() == engine.snapshot()
    assert snap.engine.next_deadline == Engine.restore(engine.snapshot()).next_deadline
    assert (snap.kind, snap.owner, snap.n, snap.ts) == ("batch", "o1", 3, 123_456)
    assert snap.applied.dump() == [f"id{i}" for i in range(7)]


def test_parts_are_much_smaller_than_one_record() -> None:
    """Compressed parts of a big registry total a fraction of the version-1 record."""
    engine = _engine(5_000)
    bodies = _parts(engine, 1_000)
    one = encode_snapshot(engine, AppliedIds(), owner="o1", n=3, kind="batch", ts=1)
    assert sum(map(len, bodies)) * 4 < len(one)
    assert max(map(len, bodies)) * 20 < len(one)


def test_incomplete_or_disordered_parts_are_refused() -> None:
    """from_parts refuses parts with a gap, without the last one, or of two snapshots."""
    engine = _engine(30)
    parts = [p for p in (SnapshotPart.parse(b) for b in _parts(engine, 10)) if p is not None]
    other = [p for p in (SnapshotPart.parse(b) for b in _parts(engine, 10)) if p is not None]
    for bad in (parts[:2], [parts[0], parts[2]], [parts[0], other[1], other[2]], []):
        with pytest.raises(ValueError):
            Snapshot.from_parts(bad)


def test_assembler_skips_an_incomplete_newest_snapshot() -> None:
    """An owner killed mid-snapshot leaves its first parts only: the previous complete
    snapshot is the one restored; other lineages and junk are ignored."""
    old, new = _engine(25, seed=1), _engine(40, seed=2)
    records = _parts(old, 10) + _parts(_engine(5, lineage="other"), 2) + [b"junk"]
    records += _parts(new, 10)[:3]  # of 4
    asm = SnapshotAssembler("snap")
    for offset, body in enumerate(records):
        asm.feed(offset, body)
    snap = asm.result()
    assert snap is not None and snap.engine.snapshot() == old.snapshot()
    assert asm.pending_since() == 123_456


def test_assembler_reads_version_1_records() -> None:
    """A stream written before parts existed still restores (its single record)."""
    engine = _engine(12)
    asm = SnapshotAssembler("snap")
    asm.feed(0, encode_snapshot(engine, AppliedIds(), owner="o", n=2, kind="batch", ts=9))
    snap = asm.result()
    assert snap is not None and snap.engine.snapshot() == engine.snapshot()
    assert (snap.owner, snap.n) == ("o", 2)


def test_latest_snapshot_reads_back_over_many_parts() -> None:
    """From a stream: the newest complete snapshot, even when its parts span more than
    the tail the reader starts with, and when a newer one was cut short."""
    transport = MemoryTransport(Topology("snaps"))
    transport.declare()
    stream = transport.topology.snapshot_stream(None)
    link = transport.owner_link()
    try:
        first, second = _engine(60, seed=3), _engine(90, seed=4)
        for body in _parts(first, 7):
            link.append(stream, body)  # type: ignore[attr-defined]
        snap = latest_snapshot(transport, stream, "snap")
        assert snap is not None and snap.engine.snapshot() == first.snapshot()
        for body in _parts(second, 7)[:5]:  # killed mid-snapshot
            link.append(stream, body)  # type: ignore[attr-defined]
        snap = latest_snapshot(transport, stream, "snap")
        assert snap is not None and snap.engine.snapshot() == first.snapshot()
        for body in _parts(second, 7):
            link.append(stream, body)  # type: ignore[attr-defined]
        snap = latest_snapshot(transport, stream, "snap")
        assert snap is not None and snap.engine.snapshot() == second.snapshot()
        assert latest_snapshot(transport, stream, "nobody") is None
    finally:
        link.close()
        transport.close()


def test_reading_a_snapshot_leaves_the_garbage_collector_as_it_was() -> None:
    """Restoring pauses the cyclic collector (half a big restore's time) and turns it
    back on afterwards, also when the snapshot is refused; a collector that was off
    stays off."""
    import gc

    engine = _engine(50)
    parts = [p for p in (SnapshotPart.parse(b) for b in _parts(engine, 10)) if p is not None]
    one = encode_snapshot(engine, AppliedIds(), owner="o1", n=3, kind="batch", ts=1)
    assert gc.isenabled()
    assert Snapshot.from_parts(parts).engine.snapshot() == engine.snapshot()
    assert Snapshot.decode(one).engine.snapshot() == engine.snapshot()
    assert gc.isenabled()
    doc = json.loads(one)
    del doc["engine"]["connections"]
    with pytest.raises(KeyError):
        Snapshot.decode(json.dumps(doc).encode())
    assert gc.isenabled()
    gc.disable()
    try:
        Snapshot.from_parts(parts)
        assert not gc.isenabled()
    finally:
        gc.enable()
