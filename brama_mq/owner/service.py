"""The state owner: consume commands, apply them to the engine, publish what happened.

One loop, one thread, one engine. Per batch of deliveries it

1. fires due timers (``advance``), so an expiry is ordered before later commands;
2. decodes and applies every command, collecting events, dead letters and RPC replies;
3. publishes the events (transient at once, critical pipelined on the confirm channel);
4. waits for the broker's confirms of the critical ones and of the dead letters;
5. acknowledges the whole batch with ``multiple=True``, then answers the RPCs.

So a command is acked only after every critical event it caused is confirmed: a crash
at any point repeats events (same ``id`` and ``seq``), never loses them. The loop sleeps
in ``fetch`` exactly until the engine's next deadline, so circuits half-open on time.

With a link that can tell how far its confirms have come (:class:`PipelinedLink`, the
AMQP one), step 4 does not stall the loop: a batch whose confirms are outstanding stays
*in flight* while the loop goes on fetching, applying and publishing the next
deliveries, and batches are acked, in order, as soon as the broker has confirmed
everything published up to their end. Events still go out the moment they exist; only
the acks (and the RPC answers) wait, exactly as long as the confirms take. Under a
trickle of commands that takes the confirm round trip off every command's path; under
a flood the prefetch window fills and the loop waits for confirms as before (which
lets the broker's queues go idle and sync at once rather than on their timer).

Failover (docs/architecture.md, "Failover and persistence"): every input that changes
the engine is appended to a journal stream before the critical events it causes, and
the registry to a snapshot stream every ``snapshot_interval``; an owner starts as a hot
standby replaying them (:mod:`brama_mq.owner.failover`) and serves only after a takeover
record of its own came back from the journal.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, cast, runtime_checkable

from brama_mq import telemetry
from brama_mq.core.engine import ALREADY_REGISTERED, APPLIED, Advance, Engine, Result
from brama_mq.core.events import Event
from brama_mq.core.routing import routing_key
from brama_mq.errors import (
    AccessRefusedError,
    BramaError,
    BrokerStartingError,
    BrokerUnavailableError,
    ProtocolError,
    TransportError,
)
from brama_mq.owner.failover import CatchUpStalled, Replica, supports_journal
from brama_mq.owner.journal import (
    BATCH,
    SNAPSHOT_PART_CONNECTIONS,
    TAKEOVER,
    AppliedIds,
    JournalWriter,
    encode_snapshot_parts,
)
from brama_mq.owner.lease import Lease, default_lease
from brama_mq.owner.queries import answer_query
from brama_mq.protocol import QUERY_OPS, Reply, decode_command, encode_event, encode_reply
from brama_mq.protocol.clock import wall_clock_ms as wall_clock_ms  # re-exported
from brama_mq.transport.base import (
    PING_BODY,
    PING_HEADER,
    Delivery,
    JournalLink,
    Outgoing,
    OwnerLink,
    Transport,
)
from brama_mq.transport.topology import JOURNAL_MAX_BYTES

log = logging.getLogger("brama_mq.owner")

#: Longest the loop blocks in one fetch, so a stop request is noticed promptly.
_MAX_IDLE_S = 0.25
#: Publish a batch's events in chunks of about this many as they are made, so the broker
#: routes and writes them while the rest of the batch is applied.
_PUBLISH_CHUNK = 128
_CONFIRM_TIMEOUT_S = 30.0
#: A standby (or an owner that just reconnected) pings its own queue this often: the
#: ping reaches whichever consumer is active, so an owner that receives one knows it
#: has the queue even when no command is flowing.
_PING_EVERY_S = 0.5
#: How long a standby waits for journal records per turn (it also checks the queue).
_STANDBY_POLL_S = 0.05
#: A takeover gives up (and is tried again) once the journal sends nothing this long.
_CATCH_UP_TIMEOUT_S = 60.0
#: After a broker fault that is not an outage (a confirm timeout, a channel error), the
#: owner drops its connection and waits this long before the next round.
_FAULT_PAUSE_S = 0.5
_RETRY_TAKEOVER_S = 1.0
#: Snapshots wait at least this many times as long as the last one took to write.
_SNAPSHOT_DUTY = 5.0
#: A snapshot is due once this much journal was written since the last one, whatever
#: the interval: the journal never drops what the newest snapshot does not cover.
_JOURNAL_BYTES_PER_SNAPSHOT = JOURNAL_MAX_BYTES // 4
_MAX_OUTAGE_PAUSE_S = 5.0
_T_START = ("brama", "owner", "start")
_T_STOP = ("brama", "owner", "stop")
_T_BATCH = ("brama", "owner", "batch")
_T_EVENT = ("brama", "owner", "event")
_T_CONFIRM = ("brama", "owner", "confirm")
_T_DEAD = ("brama", "owner", "dead_letter")
_T_TAKEOVER = ("brama", "owner", "takeover")
_T_STEP_DOWN = ("brama", "owner", "step_down")
_ONE: Mapping[str, int] = MappingProxyType({"count": 1})


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
        """One log line that accounts for every command (in = applied + queries + dead)."""
        reasons = ",".join(f"{k}:{v}" for k, v in sorted(self.by_reason.items())) or "-"
        return (
            f"commands={self.commands} applied={self.applied} queries={self.queries} "
            f"dead_lettered={self.dead_lettered} events={self.events} "
            f"critical_events={self.critical_events} dead_reasons={reasons} "
            f"duplicates={self.duplicates} pings={self.pings} takeovers={self.takeovers}"
        )


class Owner:
    """Runs the breakers of one shard. ``run()`` blocks; ``stop()`` ends it after the batch."""

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

    # ------------------------------------------------------------------ lifecycle
    def stop(self, wait: float | None = None) -> None:
        """Ask the loop to end after the batch in hand; with ``wait``, block until it has."""
        self._stop.set()
        replica = self._replica
        reader = replica.reader if replica is not None else None
        for link in (self._link, reader):
            interrupt = getattr(link, "interrupt", None)
            if interrupt is not None:  # a reconnect in progress gives up instead of retrying
                interrupt()
        if wait is not None:
            self.done.wait(wait)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def active(self) -> bool:
        """Whether this owner has the queue (a standby only replays the journal)."""
        return self._active or not self._journaled

    @property
    def journaled(self) -> bool:
        """Whether this owner keeps a journal, and so knows if it is the active one
        (``active``); without one every owner that gets deliveries serves them."""
        return self._journaled

    def run(self) -> None:
        """Serve until ``stop()``; the batch in hand is finished and acked before returning.

        Connecting the first time must succeed (BrokerUnavailableError otherwise, so a
        wrong URL fails fast), except that a broker still starting is waited for; after
        that an outage never ends the loop: the link retries (each attempt logged, with
        capped backoff) for as long as it takes.
        """
        try:
            link = self._start()
        except BaseException:
            self.done.set()
            raise
        self.ready.set()
        log.info("owner serving %s", self.transport.topology.owner_queue(self.shard))
        started = time.monotonic()
        if telemetry.enabled:
            telemetry.execute(_T_START, {"system_time": time.time()}, self._t_meta())
        try:
            while not self._stop.is_set():
                try:
                    if self._active or not self._journaled:
                        self.step(link)
                    else:
                        self._standby_step(link)
                    self._outages_in_a_row = 0
                except AccessRefusedError:
                    raise  # permissions: configuration, not a fault of the broker
                except BrokerUnavailableError as exc:
                    if self._stop.is_set():
                        raise
                    self._outage(exc)
                except TransportError as exc:
                    if self._stop.is_set():
                        raise
                    self._fault(link, exc)
            self._settle(link, block=True)  # the batches in hand are finished and acked
            if self._active and self._journaled:
                self._snapshot(link)
                link.wait_confirms(_CONFIRM_TIMEOUT_S)
        except TransportError as exc:
            if not self._stop.is_set():
                raise
            log.warning("stopped while the broker is unreachable or failing (%s); unacked "
                        "commands are redelivered", exc)
        finally:
            self._link = None
            self._inflight.clear()  # unacked: the broker redelivers them
            if self._replica is not None:
                self._replica.close()
                self._replica = None
            link.close()
            if telemetry.enabled:
                telemetry.execute(_T_STOP, {"duration": time.monotonic() - started},
                                  self._t_meta())
            self.done.set()
            log.info("owner stopped")

    def _start(self) -> OwnerLink:
        """Declare, open the owner link and (journaled) restore the replica. A node that
        accepts connections but whose queues are not up yet (BrokerStartingError, e.g.
        right after a restart) is retried for one reconnect window."""
        window = float(getattr(self.transport, "reconnect_timeout", 0.0))
        deadline = time.monotonic() + window
        attempt = 0
        while True:
            link: OwnerLink | None = None
            try:
                self.transport.declare()
                link = self._link = self.transport.owner_link(
                    prefetch=self.prefetch, shard=self.shard
                )
                self._journaled = self.journal and supports_journal(self.transport, link)
                pipelined = self._pipelined(link)
                if self._journaled and pipelined is not None:
                    pipelined.republish_on_reconnect = False
                if self._journaled:
                    self._jw = JournalWriter(self.engine.lineage)
                    self._standby(link)
                return link
            except BrokerStartingError as exc:
                if link is not None:
                    link.close()
                if self._stop.is_set() or time.monotonic() >= deadline:
                    raise
                pause = min(2.0, 0.1 * 2**attempt)
                attempt += 1
                log.warning("broker still starting (%s); retrying in %.1f s", exc, pause)
                self._stop.wait(pause)
            except BaseException:
                if link is not None:
                    link.close()
                raise

    # ------------------------------------------------------------------ failover
    def _outage(self, exc: BaseException) -> None:
        """The broker stayed away past the link's reconnect window: keep trying, with
        capped exponential backoff between rounds (a stop ends the wait at once)."""
        self.stats.outages += 1
        n = self._outages_in_a_row = self._outages_in_a_row + 1
        pause = min(_MAX_OUTAGE_PAUSE_S, 0.1 * 2 ** min(n, 10)) * random.uniform(0.5, 1.0)
        log.warning("broker unavailable (%s); still retrying (round %d, next in %.1f s)",
                    exc, n, pause)
        if self._journaled:
            self._step_down("the broker went away")
        self._stop.wait(pause)

    def _fault(self, link: OwnerLink, exc: TransportError) -> None:
        """A broker fault that is not an outage (confirms that never came, a channel the
        broker closed): drop the connection, step down, and start again through the
        failover list. Only bad configuration ends a worker."""
        self.stats.outages += 1
        log.warning("broker fault (%s); dropping the connection and starting again", exc)
        if self._journaled:
            self._step_down(f"broker fault: {exc}")
        pipelined = self._pipelined(link)
        if pipelined is not None:
            pipelined.abandon(f"broker fault: {type(exc).__name__}")
        self._stop.wait(_FAULT_PAUSE_S * random.uniform(0.5, 1.0))

    def _lease_lost(self, link: OwnerLink, pipelined: PipelinedLink, now: float) -> None:
        """No broker round trip within the lease: this owner can no longer show that it
        holds the queue, so it stops applying and publishing, and reconnects (through
        the failover list) as a standby; it serves again only through a new takeover."""
        silent = now - self._lease.proven
        why = f"no broker round trip for {silent:.1f} s (lease {self.lease:.1f} s)"
        if self._active:
            log.warning("owner lease lost: %s; stepping down", why)
        else:
            log.warning("standby lost touch with the broker: %s; reconnecting", why)
        self._step_down(f"lease lost: {why}")
        self._held = []  # deliveries of the connection dropped below: redelivered
        pipelined.abandon(f"lease lost: {why}")
        # Granted again once the link has reconnected (its epoch changes); until then
        # this owner is a standby and acts on nothing.
        self._lease.grant(now)
        self._lease_epoch = -1

    def _check_lease(self, link: OwnerLink) -> bool:
        """Renew the lease if due; False (after stepping down) once it has run out. Only
        for links that track confirms (AMQP); the memory transport cannot lose touch."""
        pipelined = self._pipelined(link)
        if pipelined is None:
            return True
        lease = self._lease
        now = time.monotonic()
        epoch = _jl(link).epoch
        if epoch != self._lease_epoch:  # a fresh connection: its handshake was a round trip
            self._lease_epoch = epoch
            lease.grant(now)
        lease.confirmed(pipelined.proven_mark())
        if lease.expired(now):
            self._lease_lost(link, pipelined, now)
            return False
        if lease.renewal_due(now):
            pipelined.ping(confirmed=True)
            lease.sent(pipelined.confirm_mark(), now)
        return True

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

    def _new_engine(self) -> Engine:
        return Engine(defaults=self.engine.defaults, lineage=self.engine.lineage)

    def _standby(self, link: OwnerLink) -> None:
        """Become a standby: rebuild the registry from the snapshot and the journal."""
        replica = Replica(
            self.transport, journal=self._journal_stream, snapshots=self._snapshot_stream,
            new_engine=self._new_engine,
        )
        self._replica = replica
        try:
            replica.bootstrap()
        except BaseException:
            replica.close()
            self._replica = None
            raise
        self.engine = replica.engine
        self.applied = replica.follower.applied
        # The first ping after one interval: an owner whose queue holds commands learns it
        # is active from them, and leaves no ping behind them (tests count queue depths).
        self._last_ping = time.monotonic()

    def _standby_step(self, link: OwnerLink) -> None:
        """Follow the journal; ping the queue; take over as soon as deliveries come."""
        if self._replica is None:
            self._standby(link)
        replica = self._replica
        assert replica is not None
        held, self._held = self._held, []
        if not held:
            replica.poll(_STANDBY_POLL_S / 2)
            self.engine = replica.engine
            self.applied = replica.follower.applied
            if not self._check_lease(link):
                return
            now = time.monotonic()
            if now - self._last_ping >= _PING_EVERY_S:
                self._last_ping = now
                _jl(link).ping()
            # Not 0: a TLS link reads nothing in a fetch that may not wait at all.
            held = link.fetch(self.batch_size, _STANDBY_POLL_S / 2)
            if not held:
                return
        self._take_over(link, held)

    def _take_over(self, link: OwnerLink, held: list[Delivery]) -> None:
        """The queue is ours: catch up to the journal's end, then serve ``held`` first."""
        t0 = time.monotonic()
        epoch = _jl(link).epoch
        replica = self._replica
        assert replica is not None and self._jw is not None
        token = uuid.uuid4().hex[:16]
        sent = time.monotonic()
        _jl(link).append(self._journal_stream, self._jw.takeover(token))
        try:
            replica.catch_up(token, _CATCH_UP_TIMEOUT_S, self._stop.is_set)
        except CatchUpStalled as exc:
            # The deliveries stay ours, unacked: the next takeover serves them first.
            log.warning("takeover failed (%s); standing by and trying again", exc)
            self._held = held
            self._step_down(str(exc), drop_replica=True)  # its reader went silent
            self._stop.wait(_RETRY_TAKEOVER_S)
            return
        follower = replica.follower
        engine = follower.engine
        if (
            self._initial_engine is not None
            and follower.accepted == 1
            and not replica.from_snapshot
        ):  # an empty journal: the engine given to the constructor is the registry
            engine = self._initial_engine
        engine.epoch = follower.engine.epoch
        self.engine = engine
        self.applied = follower.applied
        # The same process taking the queue back knows what it saw confirmed itself.
        mine = self._acked_n if follower.previous_owner == self._token != "" else None
        again = follower.unconfirmed_events(mine)
        self._n = self._base_n = follower.n
        # Proven only once the events published again are confirmed (their batch in
        # flight carries journal_n = follower.n): a crash before that leaves them to the
        # next owner, which publishes them again too.
        self._acked_n = max(follower.acked, mine or 0) if again else follower.n
        self._token = token
        replica.close()
        self._replica = None
        self._active = True
        self._active_epoch = epoch
        # The record came back through the journal: the broker had it after ``sent``.
        self._lease.grant(sent)
        self._lease_epoch = epoch
        self._last_snapshot = time.monotonic()
        self._snapshot_n = -1
        took = time.monotonic() - t0
        self.stats.takeovers += 1
        self.stats.last_takeover_s = took
        self.stats.republished += len(again)
        log.info(
            "owner active: took over in %.3f s at journal batch %d, epoch %d (%d "
            "connections, %d events published again, %d of them critical)", took, self._n,
            engine.epoch, len(engine), len(again), sum(e.critical for e in again),
        )
        if telemetry.enabled:
            telemetry.execute(_T_TAKEOVER, {"duration": took, "republished": len(again)},
                              self._t_meta())
        if again:
            self._submit_events(link, again, None, [])
            self._inflight[-1].journal_n = follower.n
        if _jl(link).epoch != epoch:
            self._step_down("the connection was replaced during the takeover")
            return
        self._submit(link, held)
        if self._pipelined(link) is None:
            self._settle(link, block=True)

    def _flush_journal(self, link: OwnerLink) -> None:
        """Append the inputs applied since the last flush as the next journal batch:
        before any event they caused is published, on the same channel."""
        jw = self._jw
        if jw:
            self._n += 1
            record = jw.take(self._n, self._token, self._acked_n)
            self._journal_bytes += len(record)
            _jl(link).append(self._journal_stream, record)
            self.stats.journal_batches += 1

    def _advance(self, now: int) -> Advance:
        """``engine.advance``, journaled when a timer is due (otherwise it changes nothing)."""
        engine = self.engine
        deadline = engine.next_deadline
        if deadline is None or deadline > now:
            return Advance([], deadline)
        if self._jw is not None:
            self._jw.advance(now)
        return engine.advance(now)

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

    def step(self, link: OwnerLink) -> int:
        """One turn of the loop; returns how many deliveries it handled."""
        if self._journaled:
            if _jl(link).epoch != self._active_epoch:
                self._step_down("the connection to the broker was replaced")
                return 0
            if not self._check_lease(link):
                return 0
            self._maybe_snapshot(link)
        now = self.clock_ms()
        due = self._advance(now)
        pipelined = self._pipelined(link)
        if due.events:
            self._submit_events(link, due.events, None, [])
            if pipelined is None:
                self._settle(link, block=True)
        deadline = due.next_deadline
        wait = _MAX_IDLE_S if deadline is None else (deadline - now) / 1000.0
        wait = min(max(wait, 0.0), _MAX_IDLE_S)
        if pipelined is None:
            deliveries = link.fetch(self.batch_size, wait)
            if deliveries and self._replaced(link, deliveries):
                return 0
            if deliveries:
                self.handle_batch(link, deliveries)
            return len(deliveries)
        size = self.batch_size
        inflight = self._inflight
        if inflight:
            self._settle(link, block=False)
        if inflight:
            oldest = inflight[0].mark

            def confirmed() -> bool:
                return pipelined.confirmed_mark() >= oldest

            deliveries = pipelined.fetch(size, wait, confirmed)
        else:
            deliveries = pipelined.fetch(size, wait)
        if deliveries and self._replaced(link, deliveries):
            return 0
        if deliveries and self._journaled and self._lease.expired(time.monotonic()):
            # The fetch waited past the lease: apply nothing; the connection is dropped
            # and the broker hands these to whoever holds the queue.
            self._lease_lost(link, pipelined, time.monotonic())
            return 0
        if deliveries:
            self._submit(link, deliveries)
        if inflight:
            self._settle(link, block=False)
        return len(deliveries)

    def _replaced(self, link: OwnerLink, deliveries: list[Delivery]) -> bool:
        """Deliveries from a new connection: step down, then take over with them."""
        if not self._journaled or _jl(link).epoch == self._active_epoch:
            return False
        self._step_down("the connection to the broker was replaced")
        self._held = deliveries
        return True

    # ------------------------------------------------------------------ the batch
    def handle_batch(self, link: OwnerLink, deliveries: Sequence[Delivery]) -> None:
        """Apply, publish, wait for the confirms and ack (this batch and any in flight)."""
        self._submit(link, deliveries)
        self._settle(link, block=True)

    def _submit(self, link: OwnerLink, deliveries: Sequence[Delivery]) -> None:
        """Apply and publish a batch; :meth:`_settle` acks it once it is confirmed."""
        now = self.clock_ms()
        engine = self.engine
        # telemetry: (op, result) -> count for this batch, only while someone listens
        ops: dict[tuple[str, str], int] | None = {} if telemetry.enabled else None
        started = time.perf_counter()
        stats = self.stats
        published = (stats.events, stats.critical_events)
        events: list[Event] = list(self._advance(now).events)
        replies: list[tuple[Delivery, bytes]] = []
        dead = 0
        critical = 0
        jw = self._jw
        applied_ids = self.applied
        for delivery in deliveries:
            if delivery.body == PING_BODY and PING_HEADER in delivery.headers:
                stats.pings += 1
                continue
            stats.commands += 1
            try:
                command = decode_command(
                    delivery.body, delivery.content_type, max_bytes=self.max_command_bytes
                )
            except ProtocolError as exc:
                dead += self._dead_letter(link, delivery, "decode", str(exc))
                if delivery.reply_to:  # the caller waits for an answer: tell it why
                    refused = Reply(ok=False, error=str(exc), result={"status": "invalid"})
                    replies.append((delivery, encode_reply(refused)))
                continue
            if command.op in QUERY_OPS:
                stats.queries += 1
                if ops is not None:
                    ops[(command.op, "query")] = ops.get((command.op, "query"), 0) + 1
                if delivery.reply_to:
                    reply = answer_query(engine, command, now)
                    if jw is not None and reply.ok and command.connection is not None:
                        _journal_probe(jw, command.op, command, reply.result, now)
                    replies.append((delivery, encode_reply(reply)))
                continue
            if command.id in applied_ids:  # redelivered after a takeover or reconnect
                stats.duplicates += 1  # counted as applied too: it was, once, earlier
                stats.applied += 1
                if delivery.reply_to:
                    again = Reply(ok=True, result={"status": APPLIED, "duplicate": True})
                    replies.append((delivery, encode_reply(again)))
                continue
            if jw is not None:
                jw.command(now, delivery.body)
            try:
                result = engine.apply(command, now)
            except Exception as exc:  # a bug must cost one command, not the worker
                log.exception("applying %s failed", command.op)
                if ops is not None:
                    ops[(command.op, "internal")] = ops.get((command.op, "internal"), 0) + 1
                reason = f"internal error: {exc!r}"
                dead += self._dead_letter(link, delivery, "internal", reason)
                if delivery.reply_to:
                    failed = Reply(ok=False, error=reason, result={"status": "internal"})
                    replies.append((delivery, encode_reply(failed)))
                continue
            if ops is not None:
                ops[(command.op, result.status)] = ops.get((command.op, result.status), 0) + 1
            if result.status == APPLIED or result.status == ALREADY_REGISTERED:
                stats.applied += 1
                applied_ids.add(command.id)
                events.extend(result.events)
                if len(events) >= _PUBLISH_CHUNK:
                    critical += self._publish(link, events)
                    events = []
            else:
                dead += self._dead_letter(link, delivery, result.status, result.error or "")
            if delivery.reply_to:
                replies.append((delivery, encode_reply(_reply_for(result))))
        self._flush_journal(link)
        self._submit_events(link, events, deliveries[-1].delivery_tag, replies, dead + critical)
        stats.batches += 1
        if ops is not None:
            self._t_batch(ops, len(deliveries), dead, published, time.perf_counter() - started)

    def _pipelined(self, link: OwnerLink) -> PipelinedLink | None:
        """``link`` if it can keep batches in flight, else None (checked once per link:
        a runtime protocol check costs more than a small batch)."""
        if link is not self._checked_link:
            self._checked_link = link
            self._pipelined_link = link if isinstance(link, PipelinedLink) else None
        return self._pipelined_link

    def _submit_events(
        self,
        link: OwnerLink,
        events: Sequence[Event],
        ack_tag: int | None,
        replies: list[tuple[Delivery, bytes]],
        confirmed: int = 0,
    ) -> None:
        """Publish ``events`` and keep the batch in flight until its confirms are in;
        ``confirmed``: confirmed publishes (dead letters, critical events) it made already."""
        critical = self._publish(link, events) if events else 0
        pipelined = self._pipelined(link)
        mark = pipelined.confirm_mark() if pipelined is not None else 0
        since = time.monotonic()
        confirm = bool(critical or confirmed or self._journaled)
        self._inflight.append(_InFlight(mark, confirm, ack_tag, replies, since, self._n))
        if confirm and pipelined is not None:
            self._lease.sent(mark, since)

    def _settle(self, link: OwnerLink, *, block: bool) -> None:
        """Ack, in order, the batches in flight whose confirms are all in, then answer
        their RPCs. With ``block`` (or a link that cannot tell), wait for every confirm
        first; otherwise only a batch that has waited 30 s for its confirms blocks (and
        raises ConfirmError if they still do not come)."""
        inflight = self._inflight
        if not inflight:
            return
        pipelined = self._pipelined(link)
        if self._journaled and _jl(link).epoch != self._active_epoch:
            # Published on a connection that is gone: nothing of it may be acked or
            # answered as done (the link does not republish it); redelivered instead.
            self._step_down("the connection to the broker was replaced")
            return
        if block or pipelined is None:
            if any(f.confirm for f in inflight):
                timeout = _CONFIRM_TIMEOUT_S
                if self._journaled and pipelined is not None:
                    timeout = min(timeout, max(0.0, self._lease.left(time.monotonic())))
                self._confirm(link, timeout)
                if self._journaled and _jl(link).epoch != self._active_epoch:
                    self._step_down("the connection to the broker was replaced")
                    return
                if pipelined is not None:
                    self._lease.confirmed(pipelined.confirm_mark())
            ready = len(inflight)
        else:
            through = pipelined.confirmed_mark()
            self._lease.confirmed(through)
            ready = 0
            for f in inflight:
                if f.mark > through:
                    break
                ready += 1
            if not ready:
                waited = time.monotonic() - inflight[0].since
                if waited < _CONFIRM_TIMEOUT_S:
                    return
                self._confirm(link, _CONFIRM_TIMEOUT_S - waited)
                ready = len(inflight)
        ack_tag: int | None = None
        replies: list[tuple[Delivery, bytes]] = []
        for _ in range(ready):
            f = inflight.popleft()
            if f.confirm and telemetry.enabled:
                self._t_confirm(f.since)
            if f.ack_tag is not None:
                ack_tag = f.ack_tag
            replies.extend(f.replies)
            if f.journal_n > self._acked_n:
                self._acked_n = f.journal_n
        if ack_tag is not None:
            link.ack(ack_tag, multiple=True)
        for delivery, body in replies:
            assert delivery.reply_to is not None
            link.reply(delivery.reply_to, delivery.correlation_id, body)

    def _dead_letter(self, link: OwnerLink, delivery: Delivery, kind: str, reason: str) -> int:
        log.warning("dead-lettering a command (%s): %s", kind, reason)
        link.dead_letter(delivery, reason)
        self.stats.dead_lettered += 1
        self.stats.by_reason[kind] = self.stats.by_reason.get(kind, 0) + 1
        if telemetry.enabled:
            telemetry.execute(_T_DEAD, {"count": 1},
                              {"shard": self.shard, "reason": kind, "error": reason})
        return 1

    def _publish(self, link: OwnerLink, events: Sequence[Event]) -> int:
        outgoing = []
        critical = 0
        for event in events:
            is_critical = event.critical
            critical += is_critical
            key = routing_key(event.scope, event.connection, event.event)
            outgoing.append(Outgoing(key, encode_event(event), is_critical, event.id))
        if critical and self._jw:
            # The inputs first: a critical event never gets ahead of them (transient
            # ones may; their batch's record follows at its end, before its ack).
            self._flush_journal(link)
        link.publish(outgoing)
        self.stats.events += len(outgoing)
        self.stats.critical_events += critical
        if self.on_events is not None:
            self.on_events(events)
        if telemetry.enabled:
            shard = self.shard
            for event in events:
                telemetry.execute(_T_EVENT, _ONE, {"event": event, "shard": shard})
        return critical

    # ------------------------------------------------------------------ telemetry
    def _t_meta(self) -> dict[str, Any]:
        queue = self.transport.topology.owner_queue(self.shard)
        return {"owner": self, "shard": self.shard, "queue": queue}

    def _t_batch(
        self,
        ops: dict[tuple[str, str], int],
        commands: int,
        dead: int,
        published: tuple[int, int],
        duration: float,
    ) -> None:
        """The batch just submitted, for telemetry (see :mod:`brama_mq.telemetry`)."""
        applied = sum(n for (_, result), n in ops.items()
                      if result in (APPLIED, ALREADY_REGISTERED))
        queries = sum(n for (_, result), n in ops.items() if result == "query")
        events = self.stats.events - published[0]
        critical = self.stats.critical_events - published[1]
        telemetry.execute(
            _T_BATCH,
            {"duration": duration, "commands": commands, "applied": applied,
             "queries": queries, "dead_letters": dead, "events": events,
             "critical_events": critical},
            {"shard": self.shard, "ops": ops},
        )

    def _t_confirm(self, since: float) -> None:
        telemetry.execute(_T_CONFIRM, {"duration": time.monotonic() - since, "batches": 1},
                          {"shard": self.shard, "batches": 1})

    def _confirm(self, link: OwnerLink, timeout: float = _CONFIRM_TIMEOUT_S) -> None:
        try:
            link.wait_confirms(max(0.0, timeout))
        except TransportError:
            log.exception(
                "confirms did not arrive; the batch stays unacked and will be redelivered"
            )
            raise


def _reply_for(result: Result) -> Reply:
    return Reply(
        ok=result.status == APPLIED,
        result={"status": result.status, "value": result.value},
        error=result.error,
        events=[e.to_dict() for e in result.events],
    )


def _jl(link: OwnerLink) -> JournalLink:
    """``link`` as the journal-capable link it is once ``supports_journal`` said so."""
    return cast(JournalLink, link)


def _journal_probe(
    jw: JournalWriter, op: str, command: Any, result: Any, now: int
) -> None:
    """Journal a probe grant or release (they change leases, though no event tells)."""
    if not isinstance(result, dict):
        return
    if op == "acquire_probe" and result.get("lease"):
        jw.probe(now, command.scope, command.connection)
    elif op == "release_probe" and result.get("released"):
        jw.release(command.scope, command.connection, command.options["lease"])


def run_owner(transport: Transport, **kwargs: Any) -> Owner:
    """Start an owner in a daemon thread (the demo and tests); returns once it consumes."""
    owner = Owner(transport, **kwargs)
    thread = threading.Thread(target=_run_logged, args=(owner,), name="brama-owner", daemon=True)
    thread.start()
    if not owner.ready.wait(30):
        raise BramaError("the owner did not start within 30 s")
    return owner


def _run_logged(owner: Owner) -> None:
    try:
        owner.run()
    except Exception:
        log.exception("owner thread died")
        raise
