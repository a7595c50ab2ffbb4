"""How events of one ``(scope, connection)`` are ordered when owners change: by ``(epoch, seq)``.

``seq`` grows by one per event of a connection and carries on across takeovers (the new
owner replays the journal, so it knows the last one). ``epoch`` names the owner that
published: its takeover record's journal offset + 1. Two owners can overlap for at most
one lease (see :mod:`brama_mq.owner.lease`); what the old one publishes then has the
older epoch, and its ``seq`` may repeat one the new owner uses for a different event.
The rule that keeps readers right:

* an event of an **older epoch** than one already seen is **stale**: dropped;
* in the **same epoch**, a ``seq`` not above the last one is a **duplicate** (the owner
  republishes what it cannot prove was published) and one more than the last is next;
* a **newer epoch** starts a new baseline: accepted even when its ``seq`` is not above
  the last (the old owner's unjournaled tail never happened as far as the journal knows);
* in both accepted cases a ``seq`` that jumps forward means events were missed: seqs
  continue across epochs, and the new owner republishes every event of the crash window,
  so a gap is a real loss (a queue's length limit, a transient queue lost with its
  connection).

Marks are packed into one int (``epoch << 40 | seq``) so readers compare and store them
as cheaply as the bare ``seq`` they replaced; ``seq`` stays below 2**40 (a million events
a second for 12 days per connection) in any registry this package has run.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["SEQ_BITS", "Order", "classify", "epoch_of", "mark", "seq_of"]

SEQ_BITS: Final = 40
_SEQ_MASK: Final = (1 << SEQ_BITS) - 1


class Order(enum.Enum):
    """Where an event stands against the last one a reader accepted."""

    NEXT = "next"  #: accepted, nothing missed before it
    GAP = "gap"  #: accepted, some events before it were missed
    DUPLICATE = "duplicate"  #: this epoch, not newer: seen already
    STALE = "stale"  #: an older epoch than one already seen: a superseded owner's


def mark(epoch: int, seq: int) -> int:
    """``(epoch, seq)`` as one int that orders the same way."""
    if not 0 <= seq <= _SEQ_MASK:
        raise ValueError(f"seq must be in 0..2**{SEQ_BITS}-1, not {seq}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, not {epoch}")
    return (epoch << SEQ_BITS) | seq


def epoch_of(m: int) -> int:
    return m >> SEQ_BITS


def seq_of(m: int) -> int:
    return m & _SEQ_MASK


def classify(last: int | None, new: int) -> tuple[Order, int]:
    """``new``'s standing against ``last`` (``None``: nothing seen), and how many events
    are missing before it (only non-zero for :attr:`Order.GAP`)."""
    if last is None or new == last + 1:
        return Order.NEXT, 0
    last_epoch, new_epoch = last >> SEQ_BITS, new >> SEQ_BITS
    if new_epoch < last_epoch:
        return Order.STALE, 0
    last_seq, new_seq = last & _SEQ_MASK, new & _SEQ_MASK
    if new_epoch == last_epoch and new_seq <= last_seq:
        return Order.DUPLICATE, 0
    missing = new_seq - last_seq - 1
    return (Order.GAP, missing) if missing > 0 else (Order.NEXT, 0)
