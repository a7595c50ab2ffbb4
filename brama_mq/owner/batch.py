"""Applying a batch of deliveries: decode each command, answer queries, skip what was
applied already, apply the rest to the engine (journaled first), and hand the events,
dead letters and RPC answers to :mod:`brama_mq.owner.publishing`."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from brama_mq import telemetry
from brama_mq.core.engine import ALREADY_REGISTERED, APPLIED, Advance, Result
from brama_mq.core.events import Event
from brama_mq.errors import ProtocolError
from brama_mq.owner.journal import JournalWriter
from brama_mq.owner.publishing import OwnerPublisher
from brama_mq.owner.queries import answer_query
from brama_mq.protocol import QUERY_OPS, Reply, decode_command, encode_reply
from brama_mq.transport.base import PING_BODY, PING_HEADER, Delivery, OwnerLink

log = logging.getLogger("brama_mq.owner")

#: Publish a batch's events in chunks of about this many as they are made, so the broker
#: routes and writes them while the rest of the batch is applied.
_PUBLISH_CHUNK = 128
_T_BATCH = ("brama", "owner", "batch")


class OwnerBatches(OwnerPublisher):
    """Command application of an owner (see :mod:`brama_mq.owner.state`)."""

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
            elif delivery.reply_to:
                # The caller waits for the answer and gets the refusal with its reason
                # (the CLI's exit 3 for an unknown connection): nothing is lost, so it is
                # not a dead letter. Posted commands nobody answers are dead-lettered.
                stats.refused += 1
            else:
                dead += self._dead_letter(link, delivery, result.status, result.error or "")
            if delivery.reply_to:
                replies.append((delivery, encode_reply(_reply_for(result))))
        self._flush_journal(link)
        self._submit_events(link, events, deliveries[-1].delivery_tag, replies, dead + critical)
        stats.batches += 1
        if ops is not None:
            self._t_batch(ops, len(deliveries), dead, published, time.perf_counter() - started)

    def _advance(self, now: int) -> Advance:
        """``engine.advance``, journaled when a timer is due (otherwise it changes nothing)."""
        engine = self.engine
        deadline = engine.next_deadline
        if deadline is None or deadline > now:
            return Advance([], deadline)
        if self._jw is not None:
            self._jw.advance(now)
        return engine.advance(now)

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


def _reply_for(result: Result) -> Reply:
    return Reply(
        ok=result.status == APPLIED,
        result={"status": result.status, "value": result.value},
        error=result.error,
        events=[e.to_dict() for e in result.events],
    )


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
