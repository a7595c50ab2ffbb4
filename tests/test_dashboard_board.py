"""The dashboard's model (brama_mq.dashboard.board) and fan-out (feed), without a broker:
rows from the snapshot and from events in either order, removal, failure buckets and the
seen rate, the mode column's default, and dropping a page that does not keep up."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from brama_mq.dashboard.board import Board
from brama_mq.dashboard.feed import Broadcast, sse
from brama_mq.protocol import Event

NOW = 1_700_000_000_000


def event(kind: str, seq: int, *, ts: int = NOW, epoch: int = 1, scope: str | None = "payments",
          connection: str = "payment_api", **data: Any) -> Event:
    data.setdefault("state", "closed")
    data.setdefault("failure_count", 0)
    return Event(event=kind, timestamp=ts, scope=scope, connection=connection,
                 id=f"id{epoch}-{seq}", seq=seq, epoch=epoch, data=data)


def status(seq: int, state: str = "closed", **extra: Any) -> dict[str, Any]:
    row = {"scope": "payments", "connection": "payment_api", "state": state,
           "failure_count": 0, "max_attempts": 3, "expiry_ms": 30_000, "open_until": None,
           "held_open": False, "policy": {"strategy": "consecutive"}, "seq": seq, "epoch": 1}
    row.update(extra)
    return row


def board() -> Board:
    return Board(clock=lambda: NOW)


def test_seed_then_events_move_a_row_forward_only() -> None:
    """A snapshot row is the start; a newer event changes it, an older one (published
    while the snapshot was gathered) changes the feed but not the row."""
    b = board()
    b.seed([status(5, failure_count=2)])
    change = b.apply(event("failure", 4, failure_count=1))  # older than the snapshot
    assert change["row"]["failure_count"] == 2 and change["event"]["seq"] == 4
    opened = b.apply(event("circuit_opened", 6, state="open", failure_count=3,
                           previous_state="closed", new_state="open",
                           reason="Threshold exceeded", open_until=NOW + 30_000))
    row = opened["row"]
    assert (row["state"], row["failure_count"], row["open_until"]) == ("open", 3, NOW + 30_000)
    assert row["max_attempts"] == 3 and row["mode"] == "normal"
    assert opened["event"]["detail"] == "closed -> open (Threshold exceeded)"


def test_a_snapshot_older_than_the_events_seen_does_not_roll_a_row_back() -> None:
    """Events first, then a snapshot gathered before the latest of them: the row keeps
    the event's state."""
    b = board()
    b.apply(event("circuit_opened", 7, state="open", new_state="open", open_until=NOW + 5))
    b.seed([status(6, state="closed")])
    assert b.rows[("payments", "payment_api")]["state"] == "open"
    b.seed([status(9, state="half_open")])  # a newer one does
    assert b.rows[("payments", "payment_api")]["state"] == "half_open"


def test_removal_and_a_resync_drop_rows() -> None:
    """connection_removed drops the row; a later snapshot drops rows it lacks unless an
    event touched them after the snapshot was asked for."""
    b = board()
    b.seed([status(1), status(1, connection="refunds_api"), status(1, connection="ledger")])
    change = b.apply(event("connection_removed", 2, reason="Unregistered"))
    assert change["removed"] == ["payments", "payment_api"] and change["row"] is None
    since = b.version
    b.apply(event("failure", 2, connection="ledger", failure_count=1))
    b.seed([], since=since)
    assert list(b.rows) == [("payments", "ledger")]


def test_failure_buckets_and_the_seen_rate() -> None:
    """Failures and calls are counted per bucket; the rate is failures / calls among
    the events of the rate window, and says it was seen, not reported."""
    b = Board(bucket_ms=10_000, buckets=6, rate_window_ms=30_000, clock=lambda: NOW)
    b.seed([status(1)])
    seq = 1
    for ts, kind in [(NOW - 50_000, "failure"), (NOW - 5_000, "failure"),
                     (NOW - 4_000, "success"), (NOW - 3_000, "failure")]:
        seq += 1
        b.apply(event(kind, seq, ts=ts))
    b.apply(event("success", seq + 1, ts=NOW - 1_000, count=5))
    view = b.view(("payments", "payment_api"))
    assert sum(view["failures"].values()) == 3 and sum(view["calls"].values()) == 9
    # the rate window holds the last four events: 2 failures in 2 + 1 + 5 calls
    assert view["rate"] == {"value": 25.0, "source": "seen", "calls": 8}
    later = b.view(("payments", "payment_api"), now=NOW + 120_000)  # all of it aged out
    assert later["failures"] == {} and later["rate"]["value"] is None


def test_an_owner_rate_and_mode_are_shown_when_rows_carry_them() -> None:
    """A status row's (or an event's) failure_rate is the owner's rate, until a transition
    clears the owner's window; a row's mode replaces "normal"."""
    b = board()
    b.seed([status(1, failure_rate=42.5, mode="lockdown")])
    view = b.view(("payments", "payment_api"))
    assert view["rate"]["source"] == "owner" and view["rate"]["value"] == 42.5
    assert view["mode"] == "lockdown"
    change = b.apply(event("failure", 2, failure_rate=60.0))  # events carry it too
    assert change["row"]["rate"]["value"] == 60.0
    change = b.apply(event("circuit_opened", 3, state="open", new_state="open"))
    assert change["row"]["rate"]["source"] == "seen"  # the owner's window was cleared
    snap = b.snapshot()
    assert snap["rows"][0]["connection"] == "payment_api" and snap["now"] == NOW
    json.dumps(snap)  # JSON-ready as it is


def test_a_page_that_does_not_keep_up_is_dropped() -> None:
    """The broadcast ends the stream of a page whose queue is full, the others go on."""

    async def scenario() -> None:
        feed = Broadcast(limit=2)
        slow, fast = feed.join(), feed.join()
        for n in range(3):
            feed.publish(sse("change", {"n": n}))
            await fast.queue.get()
        assert slow.dropped and len(feed) == 1
        items = [slow.queue.get_nowait() for _ in range(slow.queue.qsize())]
        assert items[-1] is None and len(items) == 3
        feed.close()
        assert await fast.queue.get() is None

    asyncio.run(scenario())


def test_feed_names_the_mode_and_the_rate_sentence() -> None:
    """A mode change's feed line names the mode; a failure-rate opening shows the
    sentence (data.detail), not only the machine word."""
    from brama_mq.dashboard.board import _detail
    from brama_mq.protocol import Event as WireEvent

    def ev(**data: object) -> WireEvent:
        return WireEvent.model_validate({
            "v": 1, "event": "state_change", "timestamp": 1, "connection": "api",
            "scope": "pay", "id": "x", "seq": 1, "epoch": 1, "data": data})

    assert _detail(ev(previous_state="closed", new_state="closed", reason="mode",
                      mode="metrics_only")) == "closed -> closed (mode metrics_only)"
    assert _detail(ev(previous_state="closed", new_state="open", reason="failure_rate",
                      detail="Failure rate 60.0% >= 50%")).endswith("(Failure rate 60.0% >= 50%)")
