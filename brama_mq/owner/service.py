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

The owner's parts, one role per module: :mod:`.state` (what it holds), :mod:`.publishing`
(steps 3 to 5), :mod:`.batch` (step 2), :mod:`.snapshots`, :mod:`.takeover` (standby and
failover) and this loop.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from brama_mq import telemetry
from brama_mq.errors import (
    AccessRefusedError,
    BramaError,
    BrokerStartingError,
    BrokerUnavailableError,
    TransportError,
)
from brama_mq.owner.failover import supports_journal
from brama_mq.owner.journal import JournalWriter
from brama_mq.owner.publishing import _CONFIRM_TIMEOUT_S
from brama_mq.owner.snapshots import OwnerSnapshots
from brama_mq.owner.state import OwnerStats as OwnerStats  # re-exported
from brama_mq.owner.state import PipelinedLink as PipelinedLink  # re-exported
from brama_mq.owner.state import _jl
from brama_mq.owner.takeover import OwnerTakeover
from brama_mq.protocol.clock import wall_clock_ms as wall_clock_ms  # re-exported
from brama_mq.transport.base import Delivery, OwnerLink, Transport

log = logging.getLogger("brama_mq.owner")

#: Longest the loop blocks in one fetch, so a stop request is noticed promptly.
_MAX_IDLE_S = 0.25
_T_START = ("brama", "owner", "start")
_T_STOP = ("brama", "owner", "stop")


class Owner(OwnerTakeover, OwnerSnapshots):
    """Runs the breakers of one shard. ``run()`` blocks; ``stop()`` ends it after the batch."""

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
