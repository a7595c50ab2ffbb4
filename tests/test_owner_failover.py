"""Failover rules without a broker: which journal records a replica accepts, how it
finds its place after a snapshot, and a standby owner taking over on the in-memory
transport (the embedded default keeps a journal too)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from brama_mq.client import Brama
from brama_mq.core.engine import Command, Engine
from brama_mq.owner import Owner, run_owner
from brama_mq.owner.journal import (
    TAKEOVER,
    AppliedIds,
    Follower,
    JournalBatch,
    JournalWriter,
    Snapshot,
    SnapshotMismatch,
    encode_snapshot,
)
from brama_mq.transport import MemoryTransport


def _cmd(op: str, name: str, cid: str, **options: Any) -> bytes:
    doc = {"v": 1, "op": op, "connection": name, "scope": "s", "id": cid, "ts": 1,
           "options": options}
    return json.dumps(doc).encode()


class Writer:
    """Writes records the way an owner does (one JournalWriter per lineage)."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.jw = JournalWriter("t")

    def batch(self, n: int, *commands: bytes, now: int = 1_000, acked: int = 0) -> bytes:
        for body in commands:
            self.jw.command(now, body)
        return self.jw.take(n, self.owner, acked)

    def takeover(self) -> bytes:
        return self.jw.takeover(self.owner)


def test_writer_records_decode_as_journal_batches() -> None:
    """The owner's byte-built records are the documented JSON (commands embedded as sent)."""
    w = Writer("a")
    w.jw.advance(5)
    w.jw.probe(6, "s", "x")
    w.jw.release("s", "x", "lease-1")
    record = JournalBatch.decode(w.batch(7, _cmd("register", "x", "id1"), now=8, acked=3))
    assert (record.n, record.owner, record.acked, record.kind) == (7, "a", 3, "batch")
    assert record.entries[:3] == [["a", 5], ["p", 6, "s", "x"], ["r", "s", "x", "lease-1"]]
    assert record.entries[3][:2] == ["c", 8] and record.entries[3][2]["id"] == "id1"
    takeover = JournalBatch.decode(w.takeover())
    assert (takeover.kind, takeover.owner, takeover.entries) == (TAKEOVER, "a", [])


def test_follower_ignores_a_superseded_owner() -> None:
    """After B's takeover record, A's late records are ignored, even numbered right;
    B's batches continue the numbering; commands are applied once."""
    a, b = Writer("a"), Writer("b")
    f = Follower(Engine(lineage="t"))
    f.feed(a.takeover())
    f.feed(a.batch(1, _cmd("register", "x", "r1", max_attempts=100)))
    f.feed(a.batch(2, _cmd("failure", "x", "f1")))
    f.feed(b.takeover())
    f.feed(a.batch(3, _cmd("failure", "x", "stale")))  # republished by A after a reconnect
    f.feed(b.batch(4, _cmd("failure", "x", "f2")))  # wrong number: B continues at 3
    f.feed(b.batch(3, _cmd("failure", "x", "f3")))
    assert f.engine.status("s", "x")["failure_count"] == 2
    assert (f.owner, f.n, f.ignored) == ("b", 3, 2)
    assert "f1" in f.applied and "f3" in f.applied and "stale" not in f.applied


def test_follower_keeps_every_unconfirmed_event_for_a_new_owner() -> None:
    """Every event of batches after the last acked one (transient ones too, so a takeover
    leaves no false seq gap) is handed to a new owner, with the ids and seqs the old owner
    published them with."""
    a = Writer("a")
    owner = Engine(lineage="t")
    f = Follower(Engine(lineage="t"))
    f.feed(a.takeover())
    reg = _cmd("register", "x", "r1", max_attempts=1)
    fail = _cmd("failure", "x", "f1")
    published = owner.apply(Command("register", "x", "s", None, {"max_attempts": 1}), 1_000)
    published = owner.apply(Command("failure", "x", "s"), 1_000)
    f.feed(a.batch(1, reg, acked=0))
    f.feed(a.batch(2, fail, acked=1))
    again = f.unconfirmed_events()
    assert any(not e.critical for e in published.events)
    assert [(e.id, e.seq, e.event) for e in again] == [
        (e.id, e.seq, e.event) for e in published.events
    ]
    f.feed(a.batch(3, acked=2))
    assert f.unconfirmed_events() == []


def test_a_takeover_record_starts_the_epoch_its_offset_names() -> None:
    """Events after a takeover record at stream offset k carry epoch k + 1 (the owner's
    epoch); a later takeover starts a newer one; the snapshot carries the epoch, so a
    restored replica stamps the same."""
    a, b = Writer("a"), Writer("b")
    f = Follower(Engine(lineage="t"))
    f.feed(a.takeover(), offset=0)
    f.feed(a.batch(1, _cmd("register", "x", "r1", max_attempts=100)), offset=1)
    assert f.engine.epoch == 1
    assert {e.epoch for e in f.unconfirmed_events()} == {1}
    f.feed(b.takeover(), offset=2)
    f.feed(b.batch(2, _cmd("failure", "x", "f1")), offset=3)
    assert f.engine.epoch == 3
    event = f.engine.apply(Command("failure", "x", "s"), 2_000).events[0]
    assert event.epoch == 3
    assert Engine.restore(f.engine.snapshot()).epoch == 3


def _snapshot_after(f: Follower, kind: str = "batch") -> Snapshot:
    body = encode_snapshot(f.engine, f.applied, owner=str(f.owner), n=f.n, kind=kind, ts=0)
    return Snapshot.decode(body)


def test_follower_seeks_the_record_its_snapshot_follows() -> None:
    """Restored from a snapshot taken after batch 2 and reading from before it, a
    replica skips up to batch 2 and applies only what follows."""
    a = Writer("a")
    records = [a.takeover(), a.batch(1, _cmd("register", "x", "r1", max_attempts=100)),
               a.batch(2, _cmd("failure", "x", "f1")), a.batch(3, _cmd("failure", "x", "f2"))]
    full = Follower(Engine(lineage="t"))
    for r in records[:3]:
        full.feed(r)
    snap = _snapshot_after(full)
    for r in records[3:]:
        full.feed(r)
    restored = Follower(Engine(lineage="t"), seek=snap)
    for r in records:
        restored.feed(r)
    assert not restored.seeking
    assert restored.engine.snapshot() == full.engine.snapshot()
    assert restored.engine.status("s", "x")["failure_count"] == 2


def test_a_snapshot_of_ignored_records_is_refused() -> None:
    """A snapshot that follows records written after another owner took over (they were
    never accepted) is refused, so the replica starts from the journal's beginning."""
    a, b = Writer("a"), Writer("b")
    f = Follower(Engine(lineage="t"))
    f.feed(a.takeover())
    f.feed(a.batch(1, _cmd("register", "x", "r1")))
    f.feed(a.batch(2, _cmd("failure", "x", "f1")))
    snap = _snapshot_after(f)
    seeking = Follower(Engine(lineage="t"), seek=snap)
    seeking.feed(a.batch(1, _cmd("register", "x", "r1")))
    seeking.feed(b.takeover())
    with pytest.raises(SnapshotMismatch):
        seeking.feed(a.batch(2, _cmd("failure", "x", "f1")))


def test_applied_ids_dump_keeps_the_newest() -> None:
    """A snapshot keeps only the newest ids of the dedup window."""
    ids = AppliedIds()
    ids.load(str(i) for i in range(10))
    assert ids.dump(3) == ["7", "8", "9"] and ids.dump(0) == []


def _wait(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_memory_standby_takes_over_and_a_restart_restores(
    memory_transport: MemoryTransport,
) -> None:
    """On the embedded transport: the standby owner replays the journal, takes the queue
    when the active one dies (its link closed without a goodbye), and knows every
    connection; timers fire on the active owner only; later a fresh owner restores it all
    from the snapshot plus journal."""
    first = run_owner(memory_transport)
    client = Brama(transport=memory_transport)
    try:
        client.register("x", scope="s", wait=True, max_attempts=100)
        _wait(lambda: first.active)
        second = run_owner(memory_transport)
        for _ in range(30):
            client.failure("x", scope="s")
        _wait(lambda: second.engine.status("s", "x")["failure_count"] == 30)
        client.register("short", scope="s", wait=True)
        client.open("short", scope="s", expiry_ms=50, wait=True)
        _wait(lambda: client.status("short", scope="s")["state"] == "half_open")
        _wait(lambda: second.engine.status("s", "short")["state"] == "half_open")
        # The standby replays the expiry the active owner journaled; it publishes nothing.
        assert not second.active and second.stats.commands == 0
        assert second.stats.events == 0 and first.stats.events > 0
        assert first._link is not None
        first._link.close()  # a crash: unacked commands go back to the queue
        for _ in range(5):
            client.failure("x", scope="s")
        assert client.status("x", scope="s")["failure_count"] == 35
        assert second.active and second.stats.takeovers == 1
        second.stop(wait=10)
        third = run_owner(memory_transport)
        assert client.status("x", scope="s")["failure_count"] == 35
        third.stop(wait=10)
        assert third.stats.takeovers == 1
    finally:
        client.disconnect()
        first.stop(wait=5)


def test_owner_without_journal_keeps_the_old_behaviour(memory_transport: MemoryTransport
                                                       ) -> None:
    """journal=False: no streams written, the owner serves at once."""
    owner = Owner(memory_transport, journal=False)
    import threading

    threading.Thread(target=owner.run, daemon=True).start()
    assert owner.ready.wait(10)
    with Brama(transport=memory_transport) as client:
        client.register("y", wait=True)
        assert client.status("y")["state"] == "closed"
    owner.stop(wait=10)
    assert len(memory_transport.broker.streams[memory_transport.topology.journal_stream()]) == 0


def test_memory_streams_drop_their_oldest_records_past_their_size() -> None:
    """The embedded journal is bounded like a RabbitMQ stream; offsets keep counting."""
    from brama_mq.transport.memory import MemoryStream

    stream = MemoryStream(max_bytes=10)
    for i in range(8):
        stream.append(i, b"abcd")
    assert (stream.first, stream.end, stream.size) == (6, 8, 8)
    assert stream.read_from(0) == [(6, b"abcd"), (7, b"abcd")]
    assert stream.offset_at(7) == 7 and stream.offset_at(99) == 8


def test_a_takeover_record_that_never_comes_back_is_retried_not_fatal(
    memory_transport: MemoryTransport, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If the journal sends nothing while the owner waits for its takeover record, the
    owner steps down and takes over again with the deliveries it held (never raises
    out of run()); the commands are applied once."""
    from brama_mq.owner import takeover
    from brama_mq.transport.memory import MemoryOwnerLink

    monkeypatch.setattr(takeover, "_CATCH_UP_TIMEOUT_S", 0.3)
    monkeypatch.setattr(takeover, "_RETRY_TAKEOVER_S", 0.05)
    real_append = MemoryOwnerLink.append
    dropped: list[bytes] = []

    def lossy_append(self: Any, stream: str, body: bytes) -> None:
        if b'"t":"takeover"' in body and not dropped:
            dropped.append(body)  # lost on the way: the owner waits in vain
            return
        real_append(self, stream, body)

    monkeypatch.setattr(MemoryOwnerLink, "append", lossy_append)
    owner = run_owner(memory_transport)
    client = Brama(transport=memory_transport)
    try:
        client.register("x", scope="s", wait=True)
        client.failure("x", scope="s")
        assert client.status("x", scope="s")["failure_count"] == 1
        assert dropped and owner.active and not owner.done.is_set()
        assert owner.stats.takeovers == 1 and owner.stats.duplicates == 0
    finally:
        client.disconnect()
        owner.stop(wait=10)


def test_a_snapshot_is_due_once_enough_journal_was_written(
    memory_transport: MemoryTransport, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """However long the interval, the owner snapshots once the journal since the last
    snapshot reaches its budget, so retention never drops records no snapshot covers."""
    from brama_mq.owner import snapshots

    monkeypatch.setattr(snapshots, "_JOURNAL_BYTES_PER_SNAPSHOT", 2_000)
    owner = run_owner(memory_transport, snapshot_interval=3_600.0)
    client = Brama(transport=memory_transport)
    try:
        client.register("x", scope="s", wait=True, max_attempts=1_000)
        before = owner.stats.snapshots
        for i in range(40):
            client.failure("x", scope="s", wait=True, reason=f"r{i:04d}" * 5)
        _wait(lambda: owner.stats.snapshots > before)
        assert owner._journal_bytes < 2_000 + 1_000
    finally:
        client.disconnect()
        owner.stop(wait=10)
