"""The owner's lease: how long it may go on acting without hearing from the broker.

AMQP 0.9.1 never tells a single-active-consumer that the broker gave its queue to
another consumer. RabbitMQ does that only when the consumer's channel closes or when
the queue's leader deems the consumer's node gone: the node was frozen, partitioned,
or crashed. In each of those cases the owner's node also stops confirming publishes to
replicated queues (a quorum queue or stream confirms once a majority has the message).

So an owner counts as the active one only while it has a *proof*: a confirm of a
publish it sent less than ``length`` seconds ago. The lease is shorter than the time
the broker needs to hand the queue on (the heartbeat timeout for a silent connection,
``net_ticktime`` for a silent node), so by the time a standby can be active, the old
owner has stopped applying and publishing. Time is a monotonic clock of the caller's,
passed in (this module reads no clock).
"""

from __future__ import annotations

from collections import deque

__all__ = ["Lease", "default_lease"]

#: Without a heartbeat setting to derive it from.
DEFAULT_LEASE_S = 5.0
_MIN_LEASE_S = 1.0


def default_lease(heartbeat: float) -> float:
    """Half the heartbeat (the broker drops a silent connection after about one), at
    least a second; 5 s when heartbeats are off."""
    if heartbeat <= 0:
        return DEFAULT_LEASE_S
    return max(_MIN_LEASE_S, heartbeat / 2)


class Lease:
    """Probes (a confirm mark and when its publish was sent) and the newest proof."""

    __slots__ = ("_probes", "last_sent", "length", "proven")

    def __init__(self, length: float, now: float) -> None:
        if not length > 0:
            raise ValueError(f"lease must be > 0 s, not {length!r}")
        self.length = length
        self.proven = now
        self.last_sent = now
        self._probes: deque[tuple[int, float]] = deque()

    def grant(self, now: float) -> None:
        """A round trip just completed by other means (a takeover record came back, a
        fresh connection opened): start over from ``now``."""
        self.proven = now
        self.last_sent = now
        self._probes.clear()

    def sent(self, mark: int, now: float) -> None:
        """A confirmed publish went out; ``mark`` is the link's confirm mark after it."""
        probes = self._probes
        if probes and probes[-1][0] == mark:
            return  # nothing new went out since the last probe
        probes.append((mark, now))
        self.last_sent = now

    def confirmed(self, through: int) -> None:
        """Every publish up to confirm mark ``through`` is confirmed."""
        probes = self._probes
        while probes and probes[0][0] <= through:
            self.proven = max(self.proven, probes.popleft()[1])

    def left(self, now: float) -> float:
        """Seconds the lease still runs (negative once it has run out)."""
        return self.proven + self.length - now

    def expired(self, now: float) -> bool:
        return now - self.proven > self.length

    def renewal_due(self, now: float) -> bool:
        """Nothing confirmed went out for a quarter of the lease: send a probe."""
        return now - self.last_sent >= self.length / 4
