"""Events out, confirms in, batches acked: what an owner publishes for a batch (events,
dead letters, the journal record that must precede critical events) and how a batch in
flight is acked, in order, once the broker has confirmed everything it caused."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from brama_mq import telemetry
from brama_mq.core.events import Event
from brama_mq.core.routing import routing_key
from brama_mq.errors import TransportError
from brama_mq.owner.state import OwnerState, _InFlight, _jl
from brama_mq.protocol import encode_event
from brama_mq.transport.base import Delivery, Outgoing, OwnerLink

log = logging.getLogger("brama_mq.owner")

_CONFIRM_TIMEOUT_S = 30.0
_T_EVENT = ("brama", "owner", "event")
_T_CONFIRM = ("brama", "owner", "confirm")
_T_DEAD = ("brama", "owner", "dead_letter")
_ONE: Mapping[str, int] = MappingProxyType({"count": 1})


class OwnerPublisher(OwnerState):
    """Publishing and confirm handling of an owner (see :mod:`brama_mq.owner.state`)."""

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
