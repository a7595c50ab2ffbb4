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
from collections.abc import Callable
from typing import Any

from brama_mq.core.engine import Engine
from brama_mq.errors import BramaError, BrokerUnavailableError
from brama_mq.owner.journal import TAKEOVER, Follower, Snapshot, SnapshotMismatch
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


def supports_journal(transport: Any, link: Any) -> bool:
    """Whether ``transport`` and its owner ``link`` can keep a journal."""
    return callable(getattr(transport, "stream_reader", None)) and callable(
        getattr(link, "append", None)
    ) and callable(getattr(link, "ping", None))


def latest_snapshot(transport: Any, stream: str, lineage: str) -> Snapshot | None:
    """The newest decodable snapshot of ``lineage`` in ``stream`` (None if there is none)."""
    reader: StreamReader = transport.stream_reader(stream, offset="last")
    try:
        # A reader that can tell it is at the end of an empty stream saves the wait.
        empty = getattr(reader, "exhausted", False)
        records = reader.read(0.0 if empty else _SNAPSHOT_FIRST_WAIT_S)
        while records and (more := reader.read(_SNAPSHOT_MORE_WAIT_S)):
            records.extend(more)
    finally:
        reader.close()
    for offset, body in reversed(records):
        try:
            snap = Snapshot.decode(body)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring snapshot at offset %d of %s: %s", offset, stream, exc)
            continue
        if snap.engine.lineage == lineage:
            return snap
    return None


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
        for _, body in records:
            try:
                self.follower.feed(body)
            except SnapshotMismatch as exc:
                self._from_start(str(exc))
                return len(records)
        return len(records)

    def catch_up(
        self, token: str, timeout: float, stopping: Callable[[], bool] = lambda: False
    ) -> None:
        """Read until the takeover record of ``token`` (appended by the caller) arrives;
        every record before it is applied. BramaError if it does not come in time,
        BrokerUnavailableError if ``stopping()`` turns true first."""
        assert self.reader is not None
        deadline = time.monotonic() + timeout
        while True:
            if stopping():
                raise BrokerUnavailableError("stopped while catching up with the journal")
            restarted = False
            for _, body in self.reader.read(0.2):
                try:
                    record = self.follower.feed(body)
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
            if time.monotonic() > deadline:
                raise BramaError(
                    f"takeover record {token} did not come back from {self.journal} "
                    f"within {timeout} s"
                )

    def close(self) -> None:
        reader, self.reader = self.reader, None
        if reader is not None:
            try:
                reader.close()
            except Exception:  # closing a reader on a dead connection may fail any way
                log.debug("ignoring error while closing the journal reader", exc_info=True)
