"""What an owner holds between turns: its settings, the engine, counters, the batches
in flight and the link it serves through, and the one transition every part of the
loop may make (stepping down to standby).

The owner is one class (:class:`~brama_mq.owner.service.Owner`) built from one base per
role, lowest first: this state, :mod:`.publishing` (events out, confirms in, acks),
:mod:`.snapshots` and :mod:`.batch` (commands applied) on it, :mod:`.takeover` (standby,
takeover, lease, outages) on that, and the loop itself in :mod:`.service`. The bases add
methods only; every attribute is set here, so each role sees the same typed state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast, runtime_checkable

from brama_mq import telemetry
from brama_mq.core.engine import Engine
from brama_mq.core.events import Event
from brama_mq.owner.failover import Replica
from brama_mq.owner.journal import SNAPSHOT_PART_CONNECTIONS, AppliedIds, JournalWriter
from brama_mq.owner.lease import Lease, default_lease
from brama_mq.protocol.clock import wall_clock_ms
from brama_mq.transport.base import Delivery, JournalLink, OwnerLink, Transport

log = logging.getLogger("brama_mq.owner")

_T_STEP_DOWN = ("brama", "owner", "step_down")


@runtime_checkable
class PipelinedLink(Protocol):
    """What an owner link offers (beyond :class:`OwnerLink`) to keep batches in flight."""

    def confirm_mark(self) -> int:
        """A number covering every critical publish and dead letter handed over so far."""
        ...

    def confirmed_mark(self) -> int:
        """The highest mark all of whose publishes are confirmed (never blocks)."""
        ...

    def proven_mark(self) -> int:
        """At least :meth:`confirmed_mark`; also the newest confirmed ping's mark."""
        ...

    def fetch(
        self, max_messages: int, timeout: float, until: Callable[[], bool] | None = None
    ) -> list[Delivery]:
        """:meth:`OwnerLink.fetch` that also returns (maybe empty) once ``until()``."""
        ...

    #: Whether a reconnect publishes again what was unconfirmed (a journaled owner says
    #: no: whoever takes over republishes from the journal).
    republish_on_reconnect: bool

    def ping(self, confirmed: bool = False) -> None:
        """A ping to the owner queue; ``confirmed``: tracked by :meth:`confirm_mark`."""
        ...

    def abandon(self, reason: str) -> None:
        """Drop the connection now (no handshake); the next call reconnects elsewhere."""
        ...


@dataclass(slots=True)
class _InFlight:
    """A handled batch (or timer events) waiting for its confirms before it is acked."""

    mark: int  # the link's confirm mark after its publishes (pipelined links)
    confirm: bool  # it published critical events or dead letters
    ack_tag: int | None  # its last delivery tag; None for timer events
    replies: list[tuple[Delivery, bytes]]
    since: float  # time.monotonic() when it was published
    journal_n: int = 0  # the last journal batch written for it


@dataclass(slots=True)
class OwnerStats:
    """Counters of what the owner did, for tests, benchmarks and metrics."""

    commands: int = 0
    applied: int = 0
    queries: int = 0
    dead_lettered: int = 0
    #: refused commands whose sender waited and was told why (not dead-lettered)
    refused: int = 0
    events: int = 0
    critical_events: int = 0
    batches: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0  # already applied (in ``applied`` too), not applied again
    pings: int = 0
    takeovers: int = 0
    last_takeover_s: float | None = None
    republished: int = 0  # events (of every kind) published again at a takeover
    snapshots: int = 0
    journal_batches: int = 0
    outages: int = 0

    def summary(self) -> str:
        """One log line that accounts for every command (in = applied + queries + refused +
        dead)."""
        reasons = ",".join(f"{k}:{v}" for k, v in sorted(self.by_reason.items())) or "-"
        return (
            f"commands={self.commands} applied={self.applied} queries={self.queries} "
            f"dead_lettered={self.dead_lettered} refused={self.refused} events={self.events} "
            f"critical_events={self.critical_events} dead_reasons={reasons} "
            f"duplicates={self.duplicates} pings={self.pings} takeovers={self.takeovers}"
        )


class OwnerState:
    """The owner's settings and state; the roles' bases add what it does with them."""

    def __init__(
        self,
        transport: Transport,
        *,
        engine: Engine | None = None,
        prefetch: int = 500,
        batch_size: int | None = None,
        shard: int | None = None,
        max_command_bytes: int = 65_536,
        clock_ms: Callable[[], int] = wall_clock_ms,
        on_events: Callable[[Sequence[Event]], None] | None = None,
        journal: bool = True,
        snapshot_interval: float = 10.0,
        snapshot_part_size: int = SNAPSHOT_PART_CONNECTIONS,
        lease: float | None = None,
    ) -> None:
        self.transport = transport
        self._initial_engine = engine
        self.engine = engine if engine is not None else Engine(lineage=transport.topology.prefix)
        #: Keep a journal and snapshots (when the transport can): hot standbys and
        #: restarts keep the registry. Off: the pre-failover owner, state in memory only.
        self.journal = journal
        self.snapshot_interval = snapshot_interval
        #: Connections per snapshot record (a snapshot is several records).
        self.snapshot_part_size = snapshot_part_size
        self.applied = AppliedIds()
        self._journaled = False
        self._active = False
        self._active_epoch = -1
        self._replica: Replica | None = None
        self._held: list[Delivery] = []
        self._jw: JournalWriter | None = None
        self._token = ""
        self._n = 0  # the last journal batch number written (or accepted)
        self._base_n = 0  # self._n when this owner took over
        self._acked_n = 0  # the last journal batch whose events are all confirmed
        self._last_ping = 0.0
        self._outages_in_a_row = 0
        self._last_snapshot = time.monotonic()
        self._snapshot_n = -1
        self._snapshot_took = 0.0  # how long the last snapshot took to write
        self._journal_bytes = 0  # journal written since the last snapshot
        #: Seconds this owner may act without a broker round trip (see
        #: :mod:`brama_mq.owner.lease`); by default half the transport's heartbeat.
        self.lease = lease if lease is not None else default_lease(
            float(getattr(transport, "heartbeat", 0) or 0)
        )
        self._lease = Lease(self.lease, time.monotonic())
        self._lease_epoch = -1  # the link epoch the lease was last granted for
        self._journal_stream = transport.topology.journal_stream(shard)
        self._snapshot_stream = transport.topology.snapshot_stream(shard)
        self.prefetch = prefetch
        self.batch_size = batch_size or prefetch
        self.shard = shard
        self.max_command_bytes = max_command_bytes
        self.clock_ms = clock_ms
        self.on_events = on_events
        self.stats = OwnerStats()
        self._stop = threading.Event()
        self._link: OwnerLink | None = None
        self._inflight: deque[_InFlight] = deque()
        self._checked_link: OwnerLink | None = None
        self._pipelined_link: PipelinedLink | None = None
        self.ready = threading.Event()
        self.done = threading.Event()

    def _pipelined(self, link: OwnerLink) -> PipelinedLink | None:
        """``link`` if it can keep batches in flight, else None (checked once per link:
        a runtime protocol check costs more than a small batch)."""
        if link is not self._checked_link:
            self._checked_link = link
            self._pipelined_link = link if isinstance(link, PipelinedLink) else None
        return self._pipelined_link

    def _t_meta(self) -> dict[str, Any]:
        queue = self.transport.topology.owner_queue(self.shard)
        return {"owner": self, "shard": self.shard, "queue": queue}

    def _step_down(self, why: str, *, drop_replica: bool = False) -> None:
        """Stop acting as the active owner: another may have the queue by now, so the
        registry is rebuilt from the journal before this process serves again.

        A standby keeps its replica (unless ``drop_replica``): its engine holds only what
        it read from the journal, and its reader resumes after the last record it
        returned, so a reconnect of the owner link costs no snapshot read. That matters on
        a cluster, where the snapshot stream may have no running replica for a while after
        its leader's node froze or died (measured: each attempt blocked about 7 s)."""
        was_active = self._active
        if was_active:
            log.warning("owner stepping down to standby: %s", why)
        self._active = False
        if was_active and telemetry.enabled:
            telemetry.execute(_T_STEP_DOWN, {"count": 1}, {**self._t_meta(), "reason": why})
        self._inflight.clear()  # their acks are stale: the broker redelivers them
        if self._replica is not None and (was_active or drop_replica):
            self._replica.close()
            self._replica = None


def _jl(link: OwnerLink) -> JournalLink:
    """``link`` as the journal-capable link it is once ``supports_journal`` said so."""
    return cast(JournalLink, link)
