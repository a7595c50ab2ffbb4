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
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from brama_mq.core.engine import ALREADY_REGISTERED, APPLIED, Engine, Result
from brama_mq.core.events import Event
from brama_mq.core.routing import routing_key
from brama_mq.errors import BramaError, BrokerUnavailableError, ProtocolError, TransportError
from brama_mq.owner.queries import answer_query
from brama_mq.protocol import QUERY_OPS, Reply, decode_command, encode_event, encode_reply
from brama_mq.transport.base import Delivery, Outgoing, OwnerLink, Transport

log = logging.getLogger("brama_mq.owner")

#: Longest the loop blocks in one fetch, so a stop request is noticed promptly.
_MAX_IDLE_S = 0.25
_CONFIRM_TIMEOUT_S = 30.0


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


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
    ) -> None:
        self.transport = transport
        self.engine = engine if engine is not None else Engine(lineage=transport.topology.prefix)
        self.prefetch = prefetch
        self.batch_size = batch_size or prefetch
        self.shard = shard
        self.max_command_bytes = max_command_bytes
        self.clock_ms = clock_ms
        self.on_events = on_events
        self.stats = OwnerStats()
        self._stop = threading.Event()
        self._link: OwnerLink | None = None
        self.ready = threading.Event()
        self.done = threading.Event()

    # ------------------------------------------------------------------ lifecycle
    def stop(self, wait: float | None = None) -> None:
        """Ask the loop to end after the batch in hand; with ``wait``, block until it has."""
        self._stop.set()
        interrupt = getattr(self._link, "interrupt", None)
        if interrupt is not None:  # a reconnect in progress gives up instead of retrying
            interrupt()
        if wait is not None:
            self.done.wait(wait)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> None:
        """Serve until ``stop()``; the batch in hand is finished and acked before returning."""
        self.transport.declare()
        link = self._link = self.transport.owner_link(prefetch=self.prefetch, shard=self.shard)
        self.ready.set()
        log.info("owner serving %s", self.transport.topology.owner_queue(self.shard))
        try:
            while not self._stop.is_set():
                self.step(link)
        except BrokerUnavailableError:
            if not self._stop.is_set():
                raise
            log.warning("stopped while the broker is unreachable; unacked commands are redelivered")
        finally:
            self._link = None
            link.close()
            self.done.set()
            log.info("owner stopped")

    def step(self, link: OwnerLink) -> int:
        """One turn of the loop; returns how many deliveries it handled."""
        now = self.clock_ms()
        due = self.engine.advance(now)
        if due.events:
            self._publish_and_confirm(link, due.events)
        deadline = due.next_deadline
        wait = _MAX_IDLE_S if deadline is None else (deadline - now) / 1000.0
        wait = min(max(wait, 0.0), _MAX_IDLE_S)
        deliveries = link.fetch(self.batch_size, wait)
        if deliveries:
            self.handle_batch(link, deliveries)
        return len(deliveries)

    # ------------------------------------------------------------------ the batch
    def handle_batch(self, link: OwnerLink, deliveries: Sequence[Delivery]) -> None:
        now = self.clock_ms()
        engine = self.engine
        events: list[Event] = list(engine.advance(now).events)
        replies: list[tuple[Delivery, bytes]] = []
        dead = 0
        stats = self.stats
        for delivery in deliveries:
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
                if delivery.reply_to:
                    reply = answer_query(engine, command, now)
                    replies.append((delivery, encode_reply(reply)))
                continue
            try:
                result = engine.apply(command, now)
            except Exception as exc:  # a bug must cost one command, not the worker
                log.exception("applying %s failed", command.op)
                reason = f"internal error: {exc!r}"
                dead += self._dead_letter(link, delivery, "internal", reason)
                if delivery.reply_to:
                    failed = Reply(ok=False, error=reason, result={"status": "internal"})
                    replies.append((delivery, encode_reply(failed)))
                continue
            if result.status == APPLIED or result.status == ALREADY_REGISTERED:
                stats.applied += 1
                events.extend(result.events)
            else:
                dead += self._dead_letter(link, delivery, result.status, result.error or "")
            if delivery.reply_to:
                replies.append((delivery, encode_reply(_reply_for(result))))
        critical = self._publish(link, events) if events else 0
        if critical or dead:
            self._confirm(link)
        link.ack(deliveries[-1].delivery_tag, multiple=True)
        stats.batches += 1
        for delivery, body in replies:
            assert delivery.reply_to is not None
            link.reply(delivery.reply_to, delivery.correlation_id, body)

    def _dead_letter(self, link: OwnerLink, delivery: Delivery, kind: str, reason: str) -> int:
        log.warning("dead-lettering a command (%s): %s", kind, reason)
        link.dead_letter(delivery, reason)
        self.stats.dead_lettered += 1
        self.stats.by_reason[kind] = self.stats.by_reason.get(kind, 0) + 1
        return 1

    def _publish(self, link: OwnerLink, events: Sequence[Event]) -> int:
        outgoing = []
        critical = 0
        for event in events:
            is_critical = event.critical
            critical += is_critical
            key = routing_key(event.scope, event.connection, event.event)
            outgoing.append(Outgoing(key, encode_event(event), is_critical, event.id))
        link.publish(outgoing)
        self.stats.events += len(outgoing)
        self.stats.critical_events += critical
        if self.on_events is not None:
            self.on_events(events)
        return critical

    def _confirm(self, link: OwnerLink) -> None:
        try:
            link.wait_confirms(_CONFIRM_TIMEOUT_S)
        except TransportError:
            log.exception(
                "confirms did not arrive; the batch stays unacked and will be redelivered"
            )
            raise

    def _publish_and_confirm(self, link: OwnerLink, events: Sequence[Event]) -> None:
        if self._publish(link, events):
            self._confirm(link)


def _reply_for(result: Result) -> Reply:
    return Reply(
        ok=result.status == APPLIED,
        result={"status": result.status, "value": result.value},
        error=result.error,
        events=[e.to_dict() for e in result.events],
    )


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
