"""The owner's journal: every input that changed the engine, in order, per batch.

The engine is deterministic: the same calls with the same ``now`` give the same state,
events, ``seq`` and ids. So instead of shipping state, the active owner ships its
*inputs* (decoded commands, ``advance`` times, probe grants) to a RabbitMQ stream; a
standby replays them into its own engine and stays an exact replica, and a restarted
deployment rebuilds from the last snapshot plus the entries after it.

A record is one message, a JSON object:

* a batch ``{"v": 1, "lineage": str, "n": int, "o": owner, "k": acked, "entries": [...]}``
  with entries ``["a", now]`` (advance), ``["c", now, command]`` (apply; the command as
  its JSON object), ``["p", now, scope, connection]`` (acquire_probe that granted a
  lease) and ``["r", scope, connection, lease]`` (release_probe that released one).
  ``n`` numbers batches across owners (each new owner continues at the last accepted
  ``n`` + 1); ``k`` is the last ``n`` whose events were all confirmed (and commands acked)
  when this one was written.
* a takeover ``{"v": 1, "lineage": str, "t": "takeover", "o": owner, "n": 0, "entries": []}``
  written by an owner that has just been given the owner queue.

:class:`Follower` decides which records count: after a takeover record only batches of
that owner, numbered consecutively, are accepted; anything else (a superseded owner's
late republish) is ignored. Every reader applies the same rule to the same stream order,
so every replica agrees with the owner that wrote the accepted records.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import uuid
import zlib
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from brama_mq.core.engine import ALREADY_REGISTERED, APPLIED, Command, Engine
from brama_mq.core.events import Event

log = logging.getLogger("brama_mq.owner.journal")

JOURNAL_VERSION: Final = 1
SNAPSHOT_VERSION: Final = 1
BATCH: Final = "batch"
TAKEOVER: Final = "takeover"
_BOM: Final = b"\xef\xbb\xbf"


@dataclass(slots=True)
class JournalBatch:
    """The inputs of one owner batch, in the order the engine saw them (or a takeover)."""

    lineage: str
    n: int
    entries: list[list[Any]] = field(default_factory=list)
    owner: str = ""
    acked: int = 0
    kind: str = BATCH

    def advance(self, now: int) -> None:
        self.entries.append(["a", now])

    def command(self, now: int, command: Mapping[str, Any]) -> None:
        self.entries.append(["c", now, command])

    def probe(self, now: int, scope: str | None, connection: str) -> None:
        self.entries.append(["p", now, scope, connection])

    def release(self, scope: str | None, connection: str, lease: str) -> None:
        self.entries.append(["r", scope, connection, lease])

    def encode(self) -> bytes:
        doc: dict[str, Any] = {
            "v": JOURNAL_VERSION, "lineage": self.lineage, "n": self.n, "o": self.owner,
            "k": self.acked, "entries": self.entries,
        }
        if self.kind != BATCH:
            doc["t"] = self.kind
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def decode(cls, body: bytes | str) -> JournalBatch:
        doc = json.loads(body)
        if not isinstance(doc, dict) or doc.get("v") != JOURNAL_VERSION:
            raise ValueError(f"unsupported journal record {str(body)[:80]!r}")
        kind = doc.get("t", BATCH)
        if kind not in (BATCH, TAKEOVER):
            raise ValueError(f"unknown journal record type {kind!r}")
        return cls(
            doc["lineage"], int(doc["n"]), list(doc["entries"]), str(doc.get("o", "")),
            int(doc.get("k", 0)), kind,
        )


class JournalWriter:
    """Builds the owner's next batch record as bytes, without re-encoding commands: a
    command's entry embeds the body it arrived with (already validated JSON)."""

    __slots__ = ("_head", "_parts")

    def __init__(self, lineage: str) -> None:
        self._head = b'{"v":1,"lineage":' + json.dumps(lineage, ensure_ascii=False).encode()
        self._parts: list[bytes] = []

    def __bool__(self) -> bool:
        return bool(self._parts)

    def advance(self, now: int) -> None:
        self._parts.append(b'["a",%d]' % now)

    def command(self, now: int, body: bytes) -> None:
        if body[:3] == _BOM:
            body = body[3:]
        self._parts.append(b'["c",%d,%s]' % (now, body))

    def probe(self, now: int, scope: str | None, connection: str) -> None:
        self._parts.append(_entry(["p", now, scope, connection]))

    def release(self, scope: str | None, connection: str, lease: str) -> None:
        self._parts.append(_entry(["r", scope, connection, lease]))

    def take(self, n: int, owner: str, acked: int) -> bytes:
        """The record of everything added since the last take, numbered ``n``."""
        parts, self._parts = self._parts, []
        return b'%s,"n":%d,"o":"%s","k":%d,"entries":[%s]}' % (
            self._head, n, owner.encode(), acked, b",".join(parts)
        )

    def takeover(self, owner: str) -> bytes:
        return b'%s,"t":"takeover","n":0,"o":"%s","k":0,"entries":[]}' % (
            self._head, owner.encode()
        )


def _entry(entry: list[Any]) -> bytes:
    return json.dumps(entry, separators=(",", ":"), ensure_ascii=False).encode()


class AppliedIds:
    """Ids of recently applied commands, so a command redelivered after a takeover is
    recognised and not applied twice. Bounded: only the last unacked window matters."""

    def __init__(self, limit: int = 50_000) -> None:
        self.limit = limit
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, command_id: object) -> bool:
        return command_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, command_id: str) -> None:
        ids = self._ids
        ids[command_id] = None
        if len(ids) > self.limit:
            ids.popitem(last=False)

    def dump(self, last: int | None = None) -> list[str]:
        ids = list(self._ids)
        return ids if last is None else ids[-last:] if last else []

    def load(self, ids: Iterable[str]) -> None:
        for command_id in ids:
            self.add(command_id)


def replay_entries(
    engine: Engine,
    entries: Iterable[list[Any]],
    applied: AppliedIds | None = None,
    out: list[Event] | None = None,
) -> None:
    """Apply journal entries to a replica engine. What applied cleanly goes into
    ``applied``; the events (which the writing owner already published) into ``out``."""
    for entry in entries:
        kind = entry[0]
        if kind == "a":
            events = engine.advance(entry[1]).events
        elif kind == "c":
            doc = entry[2]
            try:
                result = engine.apply(
                    Command(
                        doc["op"],
                        doc.get("connection"),
                        doc.get("scope"),
                        doc.get("reason"),
                        doc.get("options") or {},
                    ),
                    entry[1],
                )
            except Exception:  # the owner dead-lettered it the same way
                log.exception("replaying %r failed", doc.get("op"))
                continue
            events = result.events
            if (
                applied is not None
                and (result.status == APPLIED or result.status == ALREADY_REGISTERED)
                and isinstance(doc.get("id"), str)
            ):
                applied.add(doc["id"])
        elif kind == "p":
            if (entry[2], entry[3]) in engine:
                engine.acquire_probe(entry[2], entry[3], entry[1])
            continue
        elif kind == "r":
            engine.release_probe(entry[1], entry[2], entry[3])
            continue
        else:
            raise ValueError(f"unknown journal entry kind {kind!r}")
        if out is not None:
            out.extend(events)


def replay(engine: Engine, batch: JournalBatch, applied: AppliedIds | None = None) -> None:
    """Apply one journal batch to a replica engine (its events are dropped: the owner
    that wrote the batch already published them)."""
    replay_entries(engine, batch.entries, applied)


# ---------------------------------------------------------------------- snapshots
#: A snapshot is written as parts of this many connections each: a part compresses to
#: well under a megabyte, far below RabbitMQ's ``max_message_size`` (128 MiB default).
SNAPSHOT_PART_CONNECTIONS: Final = 10_000
SNAPSHOT_PART_VERSION: Final = 2
#: A part record: this magic, a one-line JSON header, then zlib-compressed JSON. The
#: header tells a reader which snapshot and part it is without decompressing anything.
PART_MAGIC: Final = b"BSNP2\n"


def encode_snapshot(
    engine: Engine, applied: AppliedIds, *, owner: str, n: int, kind: str, ts: int,
    keep_ids: int = 5_000,
) -> bytes:
    """The registry as ONE record (version 1): what owners wrote before snapshots came in
    parts; still read (:meth:`Snapshot.decode`), no longer written by the owner."""
    doc = {
        "v": SNAPSHOT_VERSION,
        "lineage": engine.lineage,
        "after": {"t": kind, "o": owner, "n": n},
        "ts": ts,
        "engine": engine.snapshot(),
        "applied": applied.dump(keep_ids),
    }
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def _part_record(header: dict[str, Any], payload: dict[str, Any]) -> bytes:
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return PART_MAGIC + head + b"\n" + zlib.compress(body, 6)


def encode_snapshot_parts(
    engine: Engine, applied: AppliedIds, *, owner: str, n: int, kind: str, ts: int,
    keep_ids: int = 5_000, part_size: int = SNAPSHOT_PART_CONNECTIONS,
    snapshot_id: str | None = None,
) -> Iterator[bytes]:
    """The registry as it is right after the record ``(kind, owner, n)`` (whose batches
    are all confirmed), as part records in order (docs/protocol.md, "Snapshots").

    Part 0 carries ``after``, ``applied`` and the engine's fields but its connections;
    the last part's header says ``"last": true``. ``ts`` (epoch ms) tells a reader where
    to look for the parts and the record. Lazy, one part at a time: a big registry is
    never copied whole. The engine must not change until the iterator is done.
    """
    sid = snapshot_id or uuid.uuid4().hex[:16]
    first: dict[str, Any] = {
        "after": {"t": kind, "o": owner, "n": n},
        "applied": applied.dump(keep_ids),
        "engine": engine.snapshot_header(),
    }

    def record(index: int, conns: list[dict[str, Any]], last: bool) -> bytes:
        header = {"v": SNAPSHOT_PART_VERSION, "id": sid, "lineage": engine.lineage,
                  "ts": ts, "i": index, "last": last}
        payload = dict(first) if index == 0 else {}
        payload["connections"] = conns
        return _part_record(header, payload)

    held: list[dict[str, Any]] | None = None
    index = 0
    for conns in engine.dump_connections(max(1, part_size)):
        if held is not None:
            yield record(index, held, False)
            index += 1
        held = conns
    yield record(index, held or [], True)


@dataclass(slots=True)
class SnapshotPart:
    """One part record, its header read and its payload still compressed."""

    id: str
    lineage: str
    ts: int
    index: int
    last: bool
    data: bytes

    @classmethod
    def parse(cls, body: bytes) -> SnapshotPart | None:
        """The part ``body`` is (None if it is not a part record: a version-1 snapshot).
        ValueError if it claims to be a part but its header is broken."""
        if not body.startswith(PART_MAGIC):
            return None
        end = body.find(b"\n", len(PART_MAGIC))
        if end < 0:
            raise ValueError("snapshot part without a header line")
        head = json.loads(body[len(PART_MAGIC):end])
        if not isinstance(head, dict) or head.get("v") != SNAPSHOT_PART_VERSION:
            raise ValueError(f"unsupported snapshot part header {head!r:.80}")
        return cls(str(head["id"]), str(head["lineage"]), int(head["ts"]), int(head["i"]),
                   bool(head["last"]), body[end + 1:])

    def payload(self) -> dict[str, Any]:
        doc = json.loads(zlib.decompress(self.data))
        if not isinstance(doc, dict) or not isinstance(doc.get("connections"), list):
            raise ValueError(f"snapshot {self.id} part {self.index} has no connections")
        return doc


@dataclass(slots=True)
class Snapshot:
    """A decoded snapshot: the engine, its dedup window and the record it follows."""

    engine: Engine
    applied: AppliedIds
    kind: str
    owner: str
    n: int
    ts: int

    @classmethod
    def decode(cls, body: bytes) -> Snapshot:
        """A version-1 (single record) snapshot."""
        with _gc_paused():
            doc = json.loads(body)
            if not isinstance(doc, dict) or doc.get("v") != SNAPSHOT_VERSION:
                raise ValueError("unsupported snapshot version")
            after = doc["after"]
            applied = AppliedIds()
            applied.load(doc.get("applied", []))
            engine = Engine.restore(doc["engine"])
        return cls(engine, applied, str(after["t"]), str(after["o"]), int(after["n"]),
                   int(doc["ts"]))

    @classmethod
    def from_parts(cls, parts: Sequence[SnapshotPart]) -> Snapshot:
        """Assemble a complete snapshot: parts 0..k of one id, the last one marked last.
        The parts are decompressed one at a time while the engine is rebuilt."""
        if not parts or not parts[-1].last or any(
            p.index != i or p.id != parts[0].id for i, p in enumerate(parts)
        ):
            raise ValueError("incomplete snapshot: parts missing or out of order")
        first = parts[0].payload()
        after = first["after"]
        lineage = parts[0].lineage

        def connections() -> Iterator[Any]:
            yield from first.pop("connections")
            for part in parts[1:]:
                yield from part.payload()["connections"]

        header = dict(first["engine"])
        if header.get("lineage") != lineage:
            raise ValueError(f"snapshot {parts[0].id}: engine lineage differs from its header")
        header["connections"] = connections()
        applied = AppliedIds()
        applied.load(first.get("applied", []))
        with _gc_paused():
            engine = Engine.restore(header)
        return cls(engine, applied, str(after["t"]), str(after["o"]), int(after["n"]),
                   parts[0].ts)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """A restore builds millions of objects that all stay alive, and the cyclic
    collector's passes over them were half of its time (300,000 connections: 4.0 s with
    it, 2.1 s without). Nothing a restore builds is garbage, so nothing is missed."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _may_matter(body: bytes, owner: str) -> bool:
    """Cheap pre-check while seeking: could this record be a takeover or a batch of
    ``owner``? (Both encoders put the owner near the start; takeovers are short.)"""
    if len(body) < 1024 and b"takeover" in body:
        return True
    return b'"o":"%s"' % owner.encode() in body[:1024]


class SnapshotMismatch(Exception):
    """The snapshot follows a record that the journal did not accept: read from the start."""


class Follower:
    """A replica: feeds accepted journal records into its engine (see the module doc).

    ``retained`` keeps every event (transient ones too) of the accepted batches after
    ``acked``, so a new owner can publish them again (their confirms may never have
    reached the owner that wrote them): at least once, with the same ids, seqs and epoch,
    and a subscriber's seq gap means a real loss. Batches at or before ``acked`` are
    dropped as they are proven; ``retain`` bounds the events kept beyond that.
    """

    def __init__(
        self, engine: Engine, applied: AppliedIds | None = None, *, retain: int = 20_000,
        seek: Snapshot | None = None,
    ) -> None:
        self.engine = engine
        self.applied = applied if applied is not None else AppliedIds()
        self.owner: str | None = None
        self.previous_owner: str | None = None  # the owner before the last takeover
        self.n = 0
        self.acked = 0
        self.accepted = 0
        self.ignored = 0
        self.retained: deque[tuple[int, list[Event]]] = deque()
        self.retain = retain
        self.retained_events = 0
        self.retained_dropped = 0  # unproven events dropped past ``retain`` (logged)
        self._seek = seek
        self._takeover_seen: str | None = None
        if seek is not None:
            self.engine = seek.engine
            self.applied = seek.applied

    @property
    def seeking(self) -> bool:
        """Still looking for the record the snapshot follows (nothing is applied yet)."""
        return self._seek is not None

    def feed(self, body: bytes, offset: int | None = None) -> JournalBatch | None:
        """Take one record; returns it decoded (None if it is not a journal record, or
        was skipped unread while seeking). A takeover record at stream ``offset`` starts
        epoch ``offset + 1``: the engine stamps it on every event after it."""
        seek = self._seek
        if seek is not None and not _may_matter(body, seek.owner):
            return None  # seeking: neither a takeover nor the snapshot owner's batch
        try:
            record = JournalBatch.decode(body)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a journal record that does not decode: %s", exc)
            self.ignored += 1
            return None
        if record.lineage != self.engine.lineage:
            self.ignored += 1
            return record
        if seek is not None:
            if record.kind == TAKEOVER:
                self._takeover_seen = record.owner
            if record.kind == seek.kind and record.owner == seek.owner and (
                record.kind == TAKEOVER or record.n == seek.n
            ):
                if self._takeover_seen not in (None, seek.owner):
                    raise SnapshotMismatch(
                        f"the snapshot follows a record of owner {seek.owner} written after "
                        f"owner {self._takeover_seen} took over"
                    )
                self._seek = None
                self.owner, self.n, self.acked = seek.owner, seek.n, seek.n
                if record.kind == TAKEOVER and offset is not None:
                    self.engine.epoch = offset + 1
            return record
        if record.kind == TAKEOVER:
            self.previous_owner = self.owner
            self.owner = record.owner
            self.accepted += 1
            if offset is not None:
                self.engine.epoch = offset + 1
            return record
        if record.owner != self.owner or record.n != self.n + 1:
            self.ignored += 1
            return record
        events: list[Event] = []
        replay_entries(self.engine, record.entries, self.applied, events)
        self.n = record.n
        self.acked = record.acked
        self.accepted += 1
        self._retain(record.n, events)
        return record

    def _retain(self, n: int, events: list[Event]) -> None:
        retained = self.retained
        if events:
            retained.append((n, events))
            self.retained_events += len(events)
        while retained and (
            retained[0][0] <= self.acked or self.retained_events > self.retain
        ):
            first, dropped = retained.popleft()
            self.retained_events -= len(dropped)
            if first > self.acked:
                if not self.retained_dropped:
                    log.warning(
                        "more than %d events wait for proof of publication; older ones "
                        "would not be published again at a takeover", self.retain,
                    )
                self.retained_dropped += len(dropped)

    def unconfirmed_events(self, acked: int | None = None) -> list[Event]:
        """Every event of accepted batches after the last one known confirmed
        (``acked``, if the caller knows better than the journal), in publish order."""
        acked = self.acked if acked is None else max(acked, self.acked)
        return [e for n, events in self.retained if n > acked for e in events]
