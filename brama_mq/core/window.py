"""The failure-rate strategy's windows and the reporters of the failures in them.

A window answers "how many calls, failures and slow calls lately", for the last N calls
(:class:`CountWindow`) or the last N seconds (:class:`TimeWindow`); the time window is
driven by the ``now`` the engine is given, never a clock, so a replay or a standby that
took over computes exactly what the owner did. :class:`Reporters` remembers who reported
the failures and slow calls that still count, for ``min_reporters``.

Memory bounds (per connection, and only for connections that use the structure):

* CountWindow: one small int per call (8 bytes), at most ``window_size`` of them.
* TimeWindow: one bucket ``[second, calls, failures, slow]`` per second that saw calls,
  at most ``window_seconds`` of them (about 160 bytes each).
* Reporters: at most :data:`~brama_mq.core.policy.MAX_REPORTERS` names per kind (failed,
  slow), the most recent ones; an older name is forgotten first. Because a connection
  keeps the most recent ones, "at least ``min_reporters`` distinct reporters inside the
  window" is decided exactly for any ``min_reporters`` up to that bound.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any, Final

from brama_mq.core.policy import COUNT, FAILURE_RATE, MAX_REPORTERS, Policy

#: Flags of one call in a count window.
FAILED: Final = 1
SLOW: Final = 2
#: How many reporter names an event lists (``data.reporters``; ``reporter_count`` has all).
MAX_LISTED: Final = 10


class CountWindow:
    """The last ``size`` calls, as flags, with running totals (O(1) per call)."""

    __slots__ = ("entries", "failures", "slow", "total")

    def __init__(self, size: int, entries: Iterable[int] = (), total: int | None = None) -> None:
        self.entries: deque[int] = deque(maxlen=size)
        self.failures = 0
        self.slow = 0
        for flags in entries:
            self.entries.append(int(flags))
            self.failures += flags & FAILED
            self.slow += (flags & SLOW) >> 1
        #: Calls added since the window was made or cleared: reporters' positions.
        self.total = len(self.entries) if total is None else total

    @property
    def calls(self) -> int:
        return len(self.entries)

    def add(self, now: int, flags: int, n: int = 1) -> None:
        """``n`` calls with ``flags``; ``now`` is unused (the time window's signature)."""
        entries = self.entries
        size = entries.maxlen or 1
        if n >= size:  # a batch that pushes out everything
            entries.clear()
            entries.extend([flags] * size)
            self.failures = size * (flags & FAILED)
            self.slow = size * ((flags & SLOW) >> 1)
            self.total += size
            return
        for _ in range(n):
            if len(entries) == size:
                old = entries[0]
                self.failures -= old & FAILED
                self.slow -= (old & SLOW) >> 1
            entries.append(flags)
        self.failures += n * (flags & FAILED)
        self.slow += n * ((flags & SLOW) >> 1)
        self.total += n

    def clear(self) -> None:
        self.entries.clear()
        self.failures = self.slow = self.total = 0

    @property
    def position(self) -> int:
        """Where the newest call stands, for :class:`Reporters`."""
        return self.total

    @property
    def cutoff(self) -> int:
        """Positions at or below this have left the window."""
        return self.total - len(self.entries)

    def totals(self, now: int | None = None) -> tuple[int, int, int]:
        return len(self.entries), self.failures, self.slow

    def dump(self) -> list[int]:
        return list(self.entries)


class TimeWindow:
    """Calls of the last ``seconds`` seconds, in per-second buckets of the calls seen.

    A call at ``now`` falls in second ``now // 1000``; at ``now`` the window holds the
    seconds ``s`` with ``now // 1000 - s < seconds``. An earlier ``now`` than one already
    seen (another owner's clock after a takeover) counts in the newest second, so the
    buckets stay in order.
    """

    __slots__ = ("buckets", "calls", "failures", "seconds", "slow")

    def __init__(self, seconds: int, buckets: Iterable[Iterable[int]] = ()) -> None:
        self.seconds = seconds
        self.buckets: deque[list[int]] = deque()
        self.calls = self.failures = self.slow = 0
        for bucket in buckets:
            second, calls, failures, slow = (int(x) for x in bucket)
            self.buckets.append([second, calls, failures, slow])
            self.calls += calls
            self.failures += failures
            self.slow += slow

    def _expire(self, second: int) -> None:
        buckets = self.buckets
        oldest = second - self.seconds
        while buckets and buckets[0][0] <= oldest:
            _, calls, failures, slow = buckets.popleft()
            self.calls -= calls
            self.failures -= failures
            self.slow -= slow

    def add(self, now: int, flags: int, n: int = 1) -> None:
        buckets = self.buckets
        second = now // 1000
        if buckets and buckets[-1][0] >= second:
            second = buckets[-1][0]
        self._expire(second)
        failed = n * (flags & FAILED)
        slow = n * ((flags & SLOW) >> 1)
        if buckets and buckets[-1][0] == second:
            bucket = buckets[-1]
            bucket[1] += n
            bucket[2] += failed
            bucket[3] += slow
        else:
            buckets.append([second, n, failed, slow])
        self.calls += n
        self.failures += failed
        self.slow += slow

    def clear(self) -> None:
        self.buckets.clear()
        self.calls = self.failures = self.slow = 0

    @property
    def position(self) -> int:
        return self.buckets[-1][0] if self.buckets else 0

    @property
    def cutoff(self) -> int:
        return self.position - self.seconds

    def totals(self, now: int | None = None) -> tuple[int, int, int]:
        """``(calls, failures, slow)`` in the window at ``now`` (None: at the newest call),
        without changing the window (status reads must not)."""
        buckets = self.buckets
        if now is None or not buckets or now // 1000 <= buckets[-1][0]:
            return self.calls, self.failures, self.slow
        oldest = now // 1000 - self.seconds
        if buckets[0][0] > oldest:
            return self.calls, self.failures, self.slow
        calls = failures = slow = 0
        for second, c, f, s in reversed(buckets):
            if second <= oldest:
                break
            calls += c
            failures += f
            slow += s
        return calls, failures, slow

    def dump(self) -> list[list[int]]:
        return [list(b) for b in self.buckets]


Window = CountWindow | TimeWindow


def new_window(policy: Policy) -> Window | None:
    """The empty window ``policy`` calls for (None: the consecutive strategy has none)."""
    if policy.strategy != FAILURE_RATE:
        return None
    if policy.window_type == COUNT:
        return CountWindow(policy.window_size)
    return TimeWindow(policy.window_seconds)


def same_window(old: Policy, new: Policy) -> bool:
    """Whether a window kept under ``old`` is still the right one under ``new``."""
    return (
        old.strategy == new.strategy
        and old.window_type == new.window_type
        and old.window_size == new.window_size
        and old.window_seconds == new.window_seconds
    )


def percent(part: int, calls: int) -> float | None:
    """A rate as events and status rows show it (two decimals; None for no calls)."""
    return None if calls == 0 else round(100.0 * part / calls, 2)


class Reporters:
    """Who reported the failures and slow calls that still count, most recent last.

    Each map goes ``reporter -> position of its latest such call`` (a window position,
    see ``CountWindow.position``/``TimeWindow.position``, or the failure count for the
    consecutive strategy), in order of that position. ``None`` is the one reporter of
    every report that named none.
    """

    __slots__ = ("failed", "slow")

    def __init__(self) -> None:
        self.failed: dict[str | None, int] = {}
        self.slow: dict[str | None, int] = {}

    @staticmethod
    def note(book: dict[str | None, int], reporter: str | None, position: int) -> None:
        if book.pop(reporter, None) is None and len(book) >= MAX_REPORTERS:
            del book[next(iter(book))]  # the one whose latest call is the oldest
        book[reporter] = position

    def prune(self, cutoff: int) -> None:
        """Forget reporters whose latest call has left the window."""
        for book in (self.failed, self.slow):
            while book:
                first = next(iter(book))
                if book[first] > cutoff:
                    break
                del book[first]

    @property
    def empty(self) -> bool:
        return not self.failed and not self.slow

    def dump(self) -> dict[str, list[list[Any]]]:
        return {
            "failed": [[k, v] for k, v in self.failed.items()],
            "slow": [[k, v] for k, v in self.slow.items()],
        }

    @classmethod
    def load(cls, doc: Any) -> Reporters | None:
        if not doc:
            return None
        out = cls()
        out.failed = {k: int(v) for k, v in doc.get("failed", ())}
        out.slow = {k: int(v) for k, v in doc.get("slow", ())}
        return None if out.empty else out


def listed(book: dict[str | None, int]) -> dict[str, Any]:
    """``reporters`` (the newest named ones, at most MAX_LISTED) and ``reporter_count``
    (all distinct ones, the unnamed one included) for an opening's event data."""
    names = [name for name in book if name is not None]
    return {"reporters": names[-MAX_LISTED:], "reporter_count": len(book)}
