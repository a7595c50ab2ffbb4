"""When and how an active owner writes the registry to its snapshot stream: often
enough that the journal never drops records no snapshot covers, rarely enough that
writing snapshots takes a small share of the owner's time."""

from __future__ import annotations

import logging
import time

from brama_mq.owner.journal import BATCH, TAKEOVER, encode_snapshot_parts
from brama_mq.owner.publishing import OwnerPublisher
from brama_mq.owner.state import _jl
from brama_mq.protocol.clock import wall_clock_ms
from brama_mq.transport.base import OwnerLink
from brama_mq.transport.topology import JOURNAL_MAX_BYTES

log = logging.getLogger("brama_mq.owner")

#: Snapshots wait at least this many times as long as the last one took to write.
_SNAPSHOT_DUTY = 5.0
#: A snapshot is due once this much journal was written since the last one, whatever
#: the interval: the journal never drops what the newest snapshot does not cover.
_JOURNAL_BYTES_PER_SNAPSHOT = JOURNAL_MAX_BYTES // 4


class OwnerSnapshots(OwnerPublisher):
    """Snapshots of an active owner (see :mod:`brama_mq.owner.state`)."""

    def _maybe_snapshot(self, link: OwnerLink) -> None:
        """Snapshot every ``snapshot_interval``, but no more often than keeps writing
        snapshots under a sixth of the owner's time (a big registry takes seconds), and
        sooner once the journal since the last one nears a quarter of its retention."""
        if self._n == self._snapshot_n:
            return
        age = time.monotonic() - self._last_snapshot
        interval = max(self.snapshot_interval, _SNAPSHOT_DUTY * self._snapshot_took)
        if age < interval and self._journal_bytes < _JOURNAL_BYTES_PER_SNAPSHOT:
            return
        if self._inflight:
            if age < 3 * interval and self._journal_bytes < 2 * _JOURNAL_BYTES_PER_SNAPSHOT:
                return  # wait for a moment with every batch confirmed
            self._settle(link, block=True)
            if _jl(link).epoch != self._active_epoch:
                return  # reconnected meanwhile: step() steps down first
        self._snapshot(link)

    def _snapshot(self, link: OwnerLink) -> None:
        """Append the registry to the snapshot stream, in parts (every batch so far is
        confirmed; the engine does not change until the last part is handed over)."""
        kind = BATCH if self._n > self._base_n else TAKEOVER
        started = time.monotonic()
        parts = 0
        for body in encode_snapshot_parts(
            self.engine, self.applied, owner=self._token, n=self._n, kind=kind,
            ts=wall_clock_ms(), part_size=self.snapshot_part_size,
        ):
            _jl(link).append(self._snapshot_stream, body)
            parts += 1
        self._last_snapshot = time.monotonic()
        self._snapshot_took = self._last_snapshot - started
        self._journal_bytes = 0
        self._snapshot_n = self._n
        self.stats.snapshots += 1
        log.debug("snapshot of %d connections in %d parts after journal batch %d (%.3f s)",
                  len(self.engine), parts, self._n, self._last_snapshot - started)
