"""Standby and takeover: a journaled owner follows the journal as a hot standby, takes
the queue over (catching up to its own takeover record) once deliveries reach it, and
steps down again when it loses the broker, meets a fault or lets its lease run out."""

from __future__ import annotations

import logging
import random
import time
import uuid

from brama_mq import telemetry
from brama_mq.core.engine import Engine
from brama_mq.errors import TransportError
from brama_mq.owner.batch import OwnerBatches
from brama_mq.owner.failover import CatchUpStalled, Replica
from brama_mq.owner.state import PipelinedLink, _jl
from brama_mq.transport.base import Delivery, OwnerLink

log = logging.getLogger("brama_mq.owner")

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
_MAX_OUTAGE_PAUSE_S = 5.0
_T_TAKEOVER = ("brama", "owner", "takeover")


class OwnerTakeover(OwnerBatches):
    """Failover of an owner: standby, takeover, lease, outages (see :mod:`.state`)."""

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
