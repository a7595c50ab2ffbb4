"""A standby's replica of the registry, kept from the journal; and the takeover.

Every owner process starts as a standby: it restores the newest snapshot, then tails
the journal from a little before it (:class:`Replica`). When the owner queue's single
active consumer starts giving it deliveries it takes over: it appends a takeover record
to the journal and reads until that record comes back, so its engine holds every batch
the previous owner got into the journal, and from then on only its own batches count
(see :class:`~brama_mq.owner.journal.Follower`).
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable
from typing import Any

from brama_mq.core.engine import Engine
from brama_mq.errors import BramaError, BrokerUnavailableError
from brama_mq.owner.journal import (
    TAKEOVER,
    Follower,
    Snapshot,
    SnapshotMismatch,
    SnapshotPart,
)
from brama_mq.transport.base import StreamReader, Transport

log = logging.getLogger("brama_mq.owner")

#: Snapshots name the wall-clock time they were taken; the journal is read from this
#: much earlier (stream timestamps are the broker's, per chunk, in whole seconds; the
#: owner's clock may differ a little), then skipped up to the record the snapshot
#: follows. If that record is not found the replica reads from the journal's start.
SEEK_MARGIN_MS = 15_000
#: How long a reader waits for the newest snapshot (the last chunk of a stream arrives
#: at once; an empty stream sends nothing, so this is what a first start costs).
_SNAPSHOT_FIRST_WAIT_S = 0.5
_SNAPSHOT_MORE_WAIT_S = 0.1
#: Reading back over a snapshot's parts: the broker may pause between big records.
_SNAPSHOT_SCAN_WAIT_S = 0.5


def supports_journal(transport: Any, link: Any) -> bool:
    """Whether ``transport`` and its owner ``link`` can keep a journal."""
    return callable(getattr(transport, "stream_reader", None)) and callable(
        getattr(link, "append", None)
    ) and callable(getattr(link, "ping", None))


class SnapshotAssembler:
    """Takes snapshot records in stream order and keeps the newest *complete* snapshots
    of one lineage: parts 0..k of one id, the last marked last, in order (an owner killed
    mid-snapshot leaves an incomplete one, ignored). Version-1 single records count as
    complete. Memory: the two newest complete ones, still compressed, and two pending."""

    def __init__(self, lineage: str, stream: str = "") -> None:
        self.lineage = lineage
        self.stream = stream
        self.complete: list[list[SnapshotPart] | bytes] = []
        self.pending: dict[str, list[SnapshotPart]] = {}
        self.records = 0
        self.last_ts: int | None = None  # the start of the last part's snapshot

    def feed(self, offset: int, body: bytes) -> None:
        self.records += 1
        try:
            part = SnapshotPart.parse(body)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring snapshot record %d of %s: %s", offset, self.stream, exc)
            return
        if part is None:  # version 1: one record; its lineage is checked when decoded
            if body.lstrip()[:1] == b"{":
                self._done(body)
            else:
                log.warning("ignoring snapshot record %d of %s: not a snapshot", offset,
                            self.stream)
            return
        if part.lineage != self.lineage:
            return
        self.last_ts = part.ts
        group = self.pending.get(part.id)
        if group is None:
            if part.index != 0:
                return  # its first parts were dropped by retention, or never written
            group = self.pending[part.id] = []
            while len(self.pending) > 2:  # left behind by an owner killed mid-snapshot
                self.pending.pop(next(iter(self.pending)))
        if part.index != len(group):
            log.warning("snapshot %s in %s lacks part %d; ignored", part.id, self.stream,
                        len(group))
            del self.pending[part.id]
            return
        group.append(part)
        if part.last:
            del self.pending[part.id]
            self._done(group)

    def _done(self, snapshot: list[SnapshotPart] | bytes) -> None:
        self.complete.append(snapshot)
        del self.complete[:-2]

    def pending_since(self) -> int | None:
        """When the oldest incomplete snapshot seen began (epoch ms), if any."""
        return min((g[0].ts for g in self.pending.values()), default=None)

    def result(self) -> Snapshot | None:
        """The newest complete snapshot that decodes and belongs to the lineage."""
        for candidate in reversed(self.complete):
            try:
                if isinstance(candidate, bytes):
                    snap = Snapshot.decode(candidate)
                else:
                    snap = Snapshot.from_parts(candidate)
            except (ValueError, KeyError, TypeError, zlib.error) as exc:
                log.warning("ignoring a snapshot in %s that does not decode: %s",
                            self.stream, exc)
                continue
            if snap.engine.lineage == self.lineage:
                return snap
        return None


def _scan(reader: StreamReader, assembler: SnapshotAssembler, first_wait: float,
          more_wait: float) -> None:
    """Feed ``assembler`` every record from the reader's start to the stream's end."""
    try:
        # A reader that can tell it is at the end of an empty stream saves the wait.
        empty = getattr(reader, "exhausted", False)
        records = reader.read(0.0 if empty else first_wait)
        while records:
            for offset, body in records:
                assembler.feed(offset, body)
            records = reader.read(more_wait)
    finally:
        reader.close()


def latest_snapshot(transport: Any, stream: str, lineage: str) -> Snapshot | None:
    """The newest complete, decodable snapshot of ``lineage`` in ``stream`` (None if
    there is none). Reads the stream's last chunk; if that holds only the end of a
    snapshot, reads again from a little before that snapshot began; if that finds
    nothing complete either (the newest was cut short), reads the whole stream."""
    tail = SnapshotAssembler(lineage, stream)
    _scan(transport.stream_reader(stream, offset="last"), tail,
          _SNAPSHOT_FIRST_WAIT_S, _SNAPSHOT_MORE_WAIT_S)
    if tail.records == 0:
        return None
    snap = tail.result()
    if snap is not None:
        return snap
    since = tail.pending_since()
    if since is None:  # the tail holds no part 0: look for it by the parts' timestamp
        since = tail.last_ts
    if since is not None:
        back = SnapshotAssembler(lineage, stream)
        _scan(transport.stream_reader(stream, since_ms=max(0, since - SEEK_MARGIN_MS)),
              back, _SNAPSHOT_FIRST_WAIT_S, _SNAPSHOT_SCAN_WAIT_S)
        snap = back.result()
        if snap is not None:
            return snap
    log.info("no complete snapshot near the end of %s; reading all of it", stream)
    whole = SnapshotAssembler(lineage, stream)
    _scan(transport.stream_reader(stream, offset="first"), whole,
          _SNAPSHOT_FIRST_WAIT_S, _SNAPSHOT_SCAN_WAIT_S)
    return whole.result()


#: How often a long catch-up logs how far it got.
_PROGRESS_EVERY_S = 5.0


class CatchUpStalled(BramaError):
    """The journal stopped sending records before this owner's takeover record came
    back: the owner steps down and tries again (it never stops on its own)."""


class Replica:
    """The registry as the journal says it is, for one shard."""

    def __init__(
        self,
        transport: Transport,
        *,
        journal: str,
        snapshots: str,
        new_engine: Callable[[], Engine],
    ) -> None:
        self.transport: Any = transport
        self.journal = journal
        self.snapshots = snapshots
        self.new_engine = new_engine
        self.follower = Follower(new_engine())
        self.reader: StreamReader | None = None
        self.from_snapshot = False

    @property
    def engine(self) -> Engine:
        return self.follower.engine

    def bootstrap(self) -> None:
        """Restore the newest snapshot and start tailing the journal after it."""
        lineage = self.follower.engine.lineage
        snap = latest_snapshot(self.transport, self.snapshots, lineage)
        if snap is None:
            self._from_start("no snapshot yet")
            return
        self.follower = Follower(snap.engine, seek=snap)
        self.from_snapshot = True
        self._open(since_ms=max(0, snap.ts - SEEK_MARGIN_MS))
        log.info(
            "replica restored a snapshot of %d connections (after %s %s/%d); tailing %s",
            len(snap.engine), snap.kind, snap.owner, snap.n, self.journal,
        )

    def _from_start(self, why: str) -> None:
        self.follower = Follower(self.new_engine())
        self.from_snapshot = False
        self._open(offset="first")
        log.info("replica reads %s from its first record (%s)", self.journal, why)

    def _open(self, *, offset: str = "first", since_ms: int | None = None) -> None:
        self.close()
        self.reader = self.transport.stream_reader(self.journal, offset=offset,
                                                   since_ms=since_ms)

    def poll(self, timeout: float) -> int:
        """Apply what the journal has (waiting up to ``timeout`` s); returns records read."""
        assert self.reader is not None
        records = self.reader.read(timeout)
        for offset, body in records:
            try:
                self.follower.feed(body, offset)
            except SnapshotMismatch as exc:
                self._from_start(str(exc))
                return len(records)
        return len(records)

    def catch_up(
        self, token: str, timeout: float, stopping: Callable[[], bool] = lambda: False
    ) -> None:
        """Read until the takeover record of ``token`` (appended by the caller) arrives;
        every record before it is applied. A long journal takes as long as it takes
        (progress is logged); CatchUpStalled if no record at all comes for ``timeout`` s,
        BrokerUnavailableError if ``stopping()`` turns true first."""
        assert self.reader is not None
        started = last_record = last_log = time.monotonic()
        records = 0
        while True:
            if stopping():
                raise BrokerUnavailableError("stopped while catching up with the journal")
            restarted = False
            batch = self.reader.read(0.2)
            now = time.monotonic()
            if batch:
                last_record = now
                records += len(batch)
            for offset, body in batch:
                try:
                    record = self.follower.feed(body, offset)
                except SnapshotMismatch as exc:
                    self._from_start(str(exc))
                    restarted = True
                    break
                if record is not None and record.kind == TAKEOVER and record.owner == token:
                    if self.follower.seeking:  # the snapshot's record was never found
                        self._from_start("the record the snapshot follows is not in the journal")
                        restarted = True
                        break
                    return
            if restarted:
                continue
            if now - last_log >= _PROGRESS_EVERY_S:
                last_log = now
                log.info("catching up with %s: %d records in %.0f s (%d connections), "
                         "waiting for takeover record %s", self.journal, records,
                         now - started, len(self.follower.engine), token)
            if now - last_record > timeout:
                raise CatchUpStalled(
                    f"takeover record {token} did not come back from {self.journal}: "
                    f"no record for {timeout} s ({records} read in {now - started:.0f} s)"
                )

    def close(self) -> None:
        reader, self.reader = self.reader, None
        if reader is not None:
            try:
                reader.close()
            except Exception:  # closing a reader on a dead connection may fail any way
                log.debug("ignoring error while closing the journal reader", exc_info=True)
