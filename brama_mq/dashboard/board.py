"""What the dashboard knows: one row per breaker, the latest events, failures per bucket.

A :class:`Board` is plain data, no I/O and no event loop: the server feeds it the
owner's snapshot (:meth:`Board.seed`) and then every event of its transient
subscription (:meth:`Board.apply`), always from one thread (the event loop's), and turns
it into the JSON the page renders (:meth:`Board.view`, :meth:`Board.snapshot`).

A row only moves forward: an event or snapshot row older, by ``(epoch, seq)``, than what
the row already shows (an event published while the snapshot was gathered) leaves it
as it is, so the order in which the two arrive does not matter.

Failures and calls are counted per ``bucket_ms`` bucket of the event's timestamp for
the last ``buckets`` buckets (the chart). The failure *rate* shown is the owner's when
its status rows carry one; otherwise it is what this dashboard saw itself: failures /
(failures + successes) among the events of the last ``rate_window_ms`` (``source``
``"seen"``; the page says so).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from brama_mq.core.events import (
    CIRCUIT_OPENED,
    CONNECTION_REMOVED,
    FAILURE,
    OPEN,
    REGISTRATION,
    SUCCESS,
)
from brama_mq.core.ordering import SEQ_BITS, Order, classify, mark
from brama_mq.protocol import Event

__all__ = ["DEFAULT_MODE", "Board", "Key", "feed_item"]

Key = tuple[str | None, str]

#: What the mode column shows for rows that do not carry one.
DEFAULT_MODE: Final = "normal"
_SEQ_MASK: Final = (1 << SEQ_BITS) - 1
#: Where an event or a snapshot row stands when it is not newer than what a row shows.
_BEHIND: Final = (Order.DUPLICATE, Order.STALE)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _rate(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _mode(value: Any) -> str:
    return value if isinstance(value, str) and value else DEFAULT_MODE


def _detail(event: Event) -> str:
    if event.new_state is not None:
        # a mode change names the mode; a rate opening its sentence (data.detail)
        why = f"mode {event.mode}" if event.reason == "mode" else event.detail or event.reason
        reason = f" ({why})" if why else ""
        return f"{event.previous_state} -> {event.new_state}{reason}"
    if event.reason:
        return event.reason
    return "" if event.state is None else event.state


def feed_item(event: Event) -> dict[str, Any]:
    """One line of the event feed, JSON-ready."""
    return {
        "event": event.event,
        "scope": event.scope,
        "connection": event.connection,
        "seq": event.seq,
        "epoch": event.epoch,
        "timestamp": event.timestamp,
        "state": event.state,
        "detail": _detail(event),
    }


class _Series:
    """Failures and calls of one connection per bucket index (timestamp // bucket_ms)."""

    __slots__ = ("calls", "failures")

    def __init__(self) -> None:
        self.failures: dict[int, int] = {}
        self.calls: dict[int, int] = {}

    def add(self, index: int, failures: int, calls: int) -> None:
        if failures:
            self.failures[index] = self.failures.get(index, 0) + failures
        self.calls[index] = self.calls.get(index, 0) + calls

    def prune(self, oldest: int) -> None:
        for counts in (self.failures, self.calls):
            for index in [i for i in counts if i < oldest]:
                del counts[index]

    def sums(self, since: int) -> tuple[int, int]:
        failures = sum(n for i, n in self.failures.items() if i >= since)
        calls = sum(n for i, n in self.calls.items() if i >= since)
        return failures, calls


class Board:
    """Rows, recent events and per-bucket counts; see the module docstring."""

    def __init__(
        self,
        *,
        bucket_ms: int = 10_000,
        buckets: int = 30,
        rate_window_ms: int = 60_000,
        recent: int = 100,
        clock: Callable[[], int] = _now_ms,
    ) -> None:
        if bucket_ms <= 0 or buckets <= 0 or rate_window_ms <= 0 or recent <= 0:
            raise ValueError("bucket_ms, buckets, rate_window_ms and recent must be > 0")
        self.bucket_ms = bucket_ms
        self.buckets = buckets
        self.rate_window_ms = rate_window_ms
        self.clock = clock
        self.rows: dict[Key, dict[str, Any]] = {}
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self.events_seen = 0
        self._marks: dict[Key, int] = {}
        self._touched: dict[Key, int] = {}  # key -> version of its last change
        self._series: dict[Key, _Series] = {}
        self.version = 0  # grows by one per applied event (seed() uses it)

    # ------------------------------------------------------------------ input
    def seed(self, statuses: Iterable[Mapping[str, Any]], *, since: int | None = None) -> None:
        """Take the owner's status rows (a full snapshot).

        ``since``: :attr:`version` when the snapshot was asked for; rows the snapshot
        lacks and that no event changed since then are gone (unregistered while this
        dashboard was not listening) and are dropped. None keeps them.
        """
        present: set[Key] = set()
        for status in statuses:
            connection = status.get("connection")
            scope = status.get("scope")
            if not isinstance(connection, str) or not (scope is None or isinstance(scope, str)):
                continue
            key = (scope, connection)
            present.add(key)
            seq, epoch = _int(status.get("seq")), _int(status.get("epoch"))
            if seq is not None and epoch is not None and 0 <= seq <= _SEQ_MASK and epoch >= 0:
                new = mark(epoch, seq)
                old = self._marks.get(key)
                if old is not None and old != new and classify(old, new)[0] in _BEHIND:
                    continue  # an event newer than this snapshot row is in already
                self._marks[key] = new
            self.rows[key] = self._row_from_status(key, status, self.rows.get(key))
        if since is not None:
            for key in [k for k in self.rows if k not in present]:
                if self._touched.get(key, 0) <= since:
                    self._drop(key)

    def apply(self, event: Event) -> dict[str, Any]:
        """One event: the feed, the counts and (unless it is older than the row) the row.

        Returns the change to send to the pages: ``{"event": feed item, "row": view or
        None, "removed": [scope, connection] or None}``.
        """
        self.version += 1
        self.events_seen += 1
        key: Key = (event.scope, event.connection)
        item = feed_item(event)
        self.recent.append(item)
        if event.event in (FAILURE, SUCCESS):
            count = _int(event.data.get("count")) or 1
            failures = 1 if event.event == FAILURE else 0
            series = self._series.setdefault(key, _Series())
            series.add(event.timestamp // self.bucket_ms, failures, max(1, count))
        change: dict[str, Any] = {"event": item, "row": None, "removed": None}
        if event.event == CONNECTION_REMOVED:
            self._drop(key)
            self._touched[key] = self.version
            change["removed"] = [event.scope, event.connection]
            return change
        new = mark(event.epoch, event.seq)
        old = self._marks.get(key)
        if old is None or classify(old, new)[0] not in _BEHIND:
            self._marks[key] = new
            self.rows[key] = self._row_from_event(key, event, self.rows.get(key))
            self._touched[key] = self.version
        if key in self.rows:
            change["row"] = self.view(key)
        return change

    def _drop(self, key: Key) -> None:
        self.rows.pop(key, None)
        self._series.pop(key, None)
        # the mark stays: seq carries on across a re-registration, so it still orders

    @staticmethod
    def _base(key: Key, previous: dict[str, Any] | None) -> dict[str, Any]:
        if previous is not None:
            return dict(previous)
        return {
            "scope": key[0], "connection": key[1], "state": "?", "failure_count": None,
            "max_attempts": None, "open_until": None, "held_open": False,
            "mode": DEFAULT_MODE, "strategy": None, "expiry_ms": None,
            "owner_rate": None, "last_event": None, "last_at": None,
        }

    def _row_from_status(
        self, key: Key, status: Mapping[str, Any], previous: dict[str, Any] | None
    ) -> dict[str, Any]:
        row = self._base(key, previous)
        policy = status.get("policy")
        policy = policy if isinstance(policy, Mapping) else {}
        state = status.get("state")
        row.update(
            state=state if isinstance(state, str) else "?",
            failure_count=_int(status.get("failure_count")),
            max_attempts=_int(status.get("max_attempts")),
            open_until=_int(status.get("open_until")),
            held_open=bool(status.get("held_open", False)),
            mode=_mode(status.get("mode")),
            strategy=policy.get("strategy") if isinstance(policy.get("strategy"), str) else None,
            expiry_ms=_int(status.get("expiry_ms")),
            owner_rate=_rate(status.get("failure_rate")),
        )
        if row["last_event"] is None:
            row["last_event"] = "(snapshot)"
        return row

    def _row_from_event(
        self, key: Key, event: Event, previous: dict[str, Any] | None
    ) -> dict[str, Any]:
        row = self._base(key, previous)
        data = event.data
        state = event.new_state or event.state
        if state is not None:
            row["state"] = state
        count = event.failure_count
        if count is not None:
            row["failure_count"] = count
        if event.event == CIRCUIT_OPENED:
            row["open_until"] = _int(data.get("open_until"))
            row["held_open"] = row["open_until"] is None
        elif row["state"] != OPEN:
            row["open_until"] = None
            row["held_open"] = False
        if event.event == REGISTRATION:
            policy = data.get("policy")
            if isinstance(policy, Mapping):
                row["max_attempts"] = _int(policy.get("max_attempts"))
                row["expiry_ms"] = _int(policy.get("expiry_ms"))
                strategy = policy.get("strategy")
                row["strategy"] = strategy if isinstance(strategy, str) else None
        if "mode" in data:
            row["mode"] = _mode(data["mode"])
        if "failure_rate" in data:  # the owner's window (None: no calls in it)
            row["owner_rate"] = _rate(data["failure_rate"])
        elif event.new_state is not None:  # a transition clears the owner's window
            row["owner_rate"] = None
        row["last_event"] = event.event
        row["last_at"] = event.timestamp
        return row

    # ------------------------------------------------------------------ output
    def _oldest_bucket(self, now: int) -> int:
        return now // self.bucket_ms - self.buckets + 1

    def seen_rate(self, key: Key, now: int | None = None) -> tuple[float | None, int]:
        """Failure rate in percent among the calls seen in the last ``rate_window_ms``
        (None when none was seen), and how many calls that was."""
        now = self.clock() if now is None else now
        series = self._series.get(key)
        if series is None:
            return None, 0
        since = (now - self.rate_window_ms) // self.bucket_ms + 1
        failures, calls = series.sums(since)
        return (100.0 * failures / calls if calls else None), calls

    def view(self, key: Key, now: int | None = None) -> dict[str, Any]:
        """One row as the page gets it: the row, its rate and its chart counts."""
        now = self.clock() if now is None else now
        row = dict(self.rows[key])
        series = self._series.get(key)
        if series is not None:
            series.prune(self._oldest_bucket(now))
        owner_rate = row.pop("owner_rate")
        if owner_rate is not None:
            row["rate"] = {"value": owner_rate, "source": "owner", "calls": None}
        else:
            value, calls = self.seen_rate(key, now)
            row["rate"] = {"value": value, "source": "seen", "calls": calls}
        row["failures"] = {str(i): n for i, n in sorted((series.failures if series else {})
                                                          .items())}
        row["calls"] = {str(i): n for i, n in sorted((series.calls if series else {}).items())}
        return row

    def snapshot(self, now: int | None = None) -> dict[str, Any]:
        """Everything a page needs to start from: rows, recent events, chart geometry."""
        now = self.clock() if now is None else now
        rows = [self.view(k, now) for k in sorted(self.rows, key=lambda k: (k[0] or "", k[1]))]
        return {
            "now": now,
            "rows": rows,
            "events": list(self.recent),
            "events_seen": self.events_seen,
            "bucket_ms": self.bucket_ms,
            "buckets": self.buckets,
            "rate_window_ms": self.rate_window_ms,
        }
