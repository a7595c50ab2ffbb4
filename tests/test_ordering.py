"""The ordering rule of events across owners (brama_mq.core.ordering): which event a
reader accepts, drops as a duplicate or as a superseded owner's, and how many it missed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from brama_mq.core.ordering import SEQ_BITS, Order, classify, epoch_of, mark, seq_of

CASES = [
    # (last (epoch, seq) or None, new (epoch, seq), order, missing, why)
    (None, (0, 1), Order.NEXT, 0, "nothing seen: any event is a baseline"),
    (None, (7, 40), Order.NEXT, 0, "no gap without a baseline"),
    ((0, 4), (0, 5), Order.NEXT, 0, "seq + 1 in the same epoch"),
    ((0, 4), (0, 7), Order.GAP, 2, "a jump in one epoch: two events missed"),
    ((0, 4), (0, 4), Order.DUPLICATE, 0, "the same event again (a republish)"),
    ((0, 4), (0, 2), Order.DUPLICATE, 0, "an older event of this epoch (a redelivery)"),
    ((3, 4), (1, 9), Order.STALE, 0, "an older epoch, however high its seq"),
    ((3, 4), (9, 5), Order.NEXT, 0, "a newer epoch carrying on the seq"),
    ((3, 4), (9, 4), Order.NEXT, 0, "a newer epoch reusing a seq the old owner's tail took"),
    ((3, 9), (9, 5), Order.NEXT, 0, "a newer epoch below the old owner's unjournaled tail"),
    ((3, 4), (9, 8), Order.GAP, 3, "a newer epoch that jumps: seqs carry on, so a loss"),
]


@pytest.mark.parametrize(("last", "new", "order", "missing", "why"), CASES,
                         ids=[c[4] for c in CASES])
def test_classify(last: tuple[int, int] | None, new: tuple[int, int], order: Order,
                  missing: int, why: str) -> None:
    """Each row pins one case of the rule in the module docstring."""
    got = classify(None if last is None else mark(*last), mark(*new))
    assert got == (order, missing), why


def _reference(last: tuple[int, int] | None, new: tuple[int, int]) -> tuple[Order, int]:
    """The rule written on tuples, the way docs/protocol.md states it."""
    if last is None:
        return Order.NEXT, 0
    if new[0] < last[0]:
        return Order.STALE, 0
    if new[0] == last[0] and new[1] <= last[1]:
        return Order.DUPLICATE, 0
    missing = max(0, new[1] - last[1] - 1)
    return (Order.GAP, missing) if missing else (Order.NEXT, 0)


marks = st.tuples(st.integers(0, 2**20), st.integers(0, 2**SEQ_BITS - 1))


@given(st.none() | marks, marks)
def test_packed_marks_classify_like_tuples(last: tuple[int, int] | None,
                                           new: tuple[int, int]) -> None:
    """Packing (epoch, seq) into one int changes no verdict, and orders like the tuple."""
    packed_last = None if last is None else mark(*last)
    assert classify(packed_last, mark(*new)) == _reference(last, new)
    if last is not None:
        assert (mark(*new) > mark(*last)) == (new > last)
    assert (epoch_of(mark(*new)), seq_of(mark(*new))) == new


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 30)), max_size=40))
def test_a_reader_never_goes_backwards(stream: list[tuple[int, int]]) -> None:
    """Accepting only NEXT/GAP, a reader's last mark only ever grows, and it never accepts
    an event of an epoch older than one it accepted."""
    last: int | None = None
    newest_epoch = -1
    for epoch, seq in stream:
        order, _ = classify(last, mark(epoch, seq))
        if order in (Order.NEXT, Order.GAP):
            assert last is None or mark(epoch, seq) > last
            assert epoch >= newest_epoch
            last, newest_epoch = mark(epoch, seq), epoch


@pytest.mark.parametrize(("epoch", "seq"), [(0, 2**SEQ_BITS), (0, -1), (-1, 1)])
def test_marks_out_of_range_are_refused(epoch: int, seq: int) -> None:
    """A seq that would bleed into the epoch bits, or a negative part, is a ValueError."""
    with pytest.raises(ValueError, match=r"seq|epoch"):
        mark(epoch, seq)
