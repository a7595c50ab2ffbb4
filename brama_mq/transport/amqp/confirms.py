"""Publisher confirms: which publishes the broker has acked, nacked or not yet
answered, streamed over one confirm-mode channel at a time."""


import logging
from typing import Any

from brama_mq.transport.base import (
    Outgoing,
)

log = logging.getLogger(__name__)

#: kombu's Connection is only partly typed; it is used through ``Any`` like py-amqp's.


class Pending:
    """One confirmed publish, kept until the broker acks it (republished otherwise)."""

    __slots__ = (
        "done", "event", "exchange", "mandatory", "message", "returned", "routing_key", "seq"
    )

    def __init__(self, exchange: str, routing_key: str, message: Any, seq: int) -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        self.message = message
        self.mandatory = True
        self.seq = seq
        self.done = False
        self.returned = False
        #: An owner event framed by the link itself: its py-amqp Message is only built
        #: if it has to be republished (see :meth:`AmqpOwnerLink._message`).
        self.event: Outgoing | None = None


class ConfirmTracker:
    """Streamed publisher confirms for one confirm-mode channel at a time.

    Tags are consecutive from 1 per channel, so a ``multiple`` ack settles the range
    ``[low, tag]``; nacked publishes wait in ``nacked`` to be republished; after a new
    channel :meth:`restart` hands back everything unsettled in publish order.
    """

    def __init__(self) -> None:
        self.next_tag = 1
        self.low = 1
        self.unconfirmed: dict[int, Pending] = {}
        self.nacked: list[Pending] = []
        self.seq = 0
        self.settled_since_wait = 0
        self.confirmed = 0
        self.nacks = 0
        # Whether ``unconfirmed`` (in tag order) is also in seq order, so its first entry
        # is the oldest; a republished nack breaks that until everything has settled.
        self._in_order = True
        self._last_seq = 0

    def new(self, exchange: str, routing_key: str, message: Any) -> Pending:
        self.seq += 1
        return Pending(exchange, routing_key, message, self.seq)

    def register(self, pending: Pending) -> int:
        tag = self.next_tag
        self.next_tag = tag + 1
        if pending.seq < self._last_seq:
            self._in_order = False
        else:
            self._last_seq = pending.seq
        self.unconfirmed[tag] = pending
        return tag

    def settled_through(self) -> int:
        """A seq such that every publish numbered up to it is settled (confirmed, or
        handed back by the client link); publishes count from 1, so 0 means none yet."""
        unconfirmed = self.unconfirmed
        low = self.seq + 1
        if unconfirmed:
            if self._in_order:
                low = next(iter(unconfirmed.values())).seq
            else:
                low = min(p.seq for p in unconfirmed.values())
        elif not self._in_order:
            self._in_order = True
        for p in self.nacked:
            low = min(low, p.seq)
        return low - 1

    def _settle(self, tag: int, multiple: bool) -> list[Pending]:
        if not multiple:
            one = self.unconfirmed.pop(tag, None)
            return [] if one is None else [one]
        out = []
        pop = self.unconfirmed.pop
        for t in range(self.low, tag + 1):
            p = pop(t, None)
            if p is not None:
                out.append(p)
        self.low = max(self.low, tag + 1)
        return out

    def on_ack(self, tag: int, multiple: bool) -> None:
        for p in self._settle(tag, multiple):
            p.done = True
            self.confirmed += 1
            self.settled_since_wait += 1

    def on_nack(self, tag: int, multiple: bool) -> None:
        for p in self._settle(tag, multiple):
            self.nacks += 1
            self.nacked.append(p)

    def defer(self, pending: Pending) -> None:
        """Keep a publish that could not be sent; it goes out with the next (re)send."""
        self.nacked.append(pending)

    def outstanding(self) -> int:
        return len(self.unconfirmed) + len(self.nacked)

    def take_nacked(self) -> list[Pending]:
        out, self.nacked = self.nacked, []
        return out

    def restart(self) -> list[Pending]:
        """Forget tags (a new channel numbers from 1) and return all unsettled, in order."""
        out = sorted([*self.unconfirmed.values(), *self.nacked], key=lambda p: p.seq)
        self.unconfirmed = {}
        self.nacked = []
        self.next_tag = 1
        self.low = 1
        self._in_order = True
        self._last_seq = 0
        return out
