"""A bounded outbox of outcome reports, sent by a background thread.

Guards report ``success``/``failure`` here instead of sending inline, so a guarded call
never waits for the broker and never fails because of it. One :class:`Outbox` per
client and process:

* :meth:`Outbox.put` appends a tuple to a deque and, only when the sender sleeps, wakes
  it: no lock, no I/O, no exception on the caller's path;
* the sender thread takes what is queued (up to ``batch``). Successes go out at most
  once per ``linger`` seconds (100 ms by default; the first after a quiet spell at
  once), failures, probe outcomes and permit releases at once. It merges each run of
  lease-less successes of one connection into one ``success`` command with
  ``options.count`` (:func:`coalesce`, straight from the queued tuples: the owner
  applies it as that many successes), encodes each with the protocol's command
  encoder (:func:`~brama_mq.protocol.codec.report_body`) and posts the batch through the
  client's :class:`~brama_mq.client.link.CommandLink` (``post_many``): one write, no
  wait; the link keeps every command until the broker confirmed it and republishes
  after a reconnect (a link that cannot buffer: each sent, confirmed). When the link
  refuses (its buffer is full while the broker is away) or fails, the batch stays at
  the head and is sent again after a pause (exponential, capped at 5 s): reports are
  delivered at least once, and in order per connection, once the broker is back;
* at most ``max_size`` reports wait (plus the batch in flight); when the outbox is full
  a new report is dropped, counted in ``stats()["dropped"]`` and logged (at most one
  WARNING line every 10 s).

Failures and the outcomes of probe calls (which carry a lease) are never merged.
Guarded calls carry their ``duration_ms``: successes merge only with successes whose
duration rounds up to the same whole millisecond (see :func:`coalesce`), so a merged
report is slow for exactly the ``slow_call_ms`` its parts were. Every command carries
the client's ``reporter`` (:attr:`Outbox.reporter`, else the link's).
``release_probe`` requests (a probe permit given back because the call reported
nothing) go through the same queue and are tried once: a lost one only means the
permit comes back when its lease times out.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from time import time_ns
from typing import Any, Final, NamedTuple

from brama_mq.client.link import CommandLink
from brama_mq.errors import BramaError, InvalidNameError, ProtocolError
from brama_mq.protocol.codec import report_body

__all__ = ["DEFAULT_OUTBOX_SIZE", "Outbox", "Report"]

log = logging.getLogger("brama_mq.outbox")

DEFAULT_OUTBOX_SIZE: Final = 10_000
DEFAULT_BATCH: Final = 500
#: Successes go out at most once per this many seconds (a report after a quiet spell goes
#: at once): under load one publish then covers many of them. Each batch costs the
#: worker's process a wake-up of the sender, a write and later the confirm (the kernel's
#: loopback TCP work is most of it), so the number of batches, not of reports, is what
#: a guarded worker pays for. Failures, probe outcomes and permit releases never wait.
DEFAULT_LINGER_S: Final = 0.1
RELEASE: Final = "release_probe"
#: A failure reason longer than this is cut (the command size limit is 64 KiB).
MAX_REASON: Final = 1000
#: Seconds between two log lines about dropped reports.
DROP_LOG_INTERVAL: Final = 10.0


class Report(NamedTuple):
    """One outcome to send: ``op`` is success, failure or release_probe; ``ts_ns`` is
    the wall clock when it was queued (the queue holds plain tuples of these fields);
    ``times``: successes in a row this report stands for (see :func:`coalesce`);
    ``duration_ms``: how long the call took (None: not measured)."""

    op: str
    connection: str
    scope: str | None
    reason: str | None
    lease: str | None
    ts_ns: int
    times: int = 1
    duration_ms: float | None = None


def coalesce(reports: Sequence[tuple[Any, ...]]) -> list[Report]:
    """Merge each run of lease-less successes of one connection into one report with
    ``count``, keeping every connection's order of outcomes (a failure, a probe's
    outcome, a permit release, or a success that may not join the run ends it). The
    owner applies ``count`` successes exactly as that many single ones (one ``success``
    event, with ``data.count``), each with the report's ``duration_ms``.

    Durations: the sent ``duration_ms`` is the measured one rounded to the microsecond,
    and a success joins a run only when its duration rounds *up* to the same whole
    millisecond as the run's, everything up to 1 ms counting as 1 (a success without a
    duration only joins one without). The owner calls a success slow when
    ``duration_ms > slow_call_ms``, an integer >= 1, and for any integer ``t >= 1``,
    ``d > t`` exactly when ``max(1, ceil(d)) > t``: every part of a run is slow for the
    same policies as the merged report, which says the run's longest duration. Guarded
    calls of a fast service (all within a millisecond) still merge as before; calls of
    varied, longer durations mostly go one by one, which costs little next to the calls.

    Takes :class:`Report`\\ s or the outbox's raw tuples (the same fields): the sender
    merges the queue's tuples directly, so a success costs it a dict lookup, not an
    object; only the merged reports are built.
    """
    heads: list[tuple[Any, ...]] = []
    times: list[int] = []
    last_ts: list[int] = []
    durations: list[float | None] = []
    #: (connection, scope) -> (index of its open run in heads, the run's whole ms)
    runs: dict[tuple[str, str | None], tuple[int, int | None]] = {}
    for r in reports:
        duration = r[7]
        if duration is not None:
            duration = round(duration, 3)
        if r[0] == "success" and r[4] is None:
            key = (r[1], r[2])
            whole = None if duration is None else max(1, math.ceil(duration))
            run = runs.get(key)
            if run is not None and run[1] == whole:
                at = run[0]
                times[at] += r[6]
                last_ts[at] = r[5]
                longest = durations[at]
                if duration is not None and (longest is None or duration > longest):
                    durations[at] = duration
                continue
            runs[key] = (len(heads), whole)
        else:
            runs.pop((r[1], r[2]), None)
        heads.append(r)
        times.append(r[6])
        last_ts.append(r[5])
        durations.append(duration)
    return [
        Report(h[0], h[1], h[2], h[3], h[4], last_ts[i], times[i], durations[i])
        for i, h in enumerate(heads)
    ]


#: A queued report as put() appends it: the fields of :class:`Report`.
_Raw = tuple[str, str, str | None, str | None, str | None, int, int, float | None]


class Outbox:
    """Reports waiting for the broker, and the thread that sends them (see module doc)."""

    def __init__(
        self,
        commands: CommandLink,
        *,
        max_size: int = DEFAULT_OUTBOX_SIZE,
        batch: int = DEFAULT_BATCH,
        linger: float = DEFAULT_LINGER_S,
        reporter: str | None = None,
    ) -> None:
        if max_size < 1 or batch < 1:
            raise ValueError("max_size and batch must be >= 1")
        self.commands = commands
        #: The ``reporter`` of every report sent (None: the link's, see CommandLink).
        self.reporter = reporter
        self.max_size = max_size
        self.batch = batch
        self.linger = linger
        self.pid = os.getpid()
        self._queue: deque[_Raw] = deque()
        self._inflight: list[_Raw] = []
        self._wake = threading.Event()
        self._idle = False
        self._holding = False
        self._last_send = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._last_drop_log = 0.0
        self.counters: dict[str, int] = {
            "sent": 0,
            "reports_sent": 0,
            "dropped": 0,
            "retries": 0,
            "released": 0,
            "release_failures": 0,
        }
        _OUTBOXES.add(self)

    # ------------------------------------------------------------------ producer side
    def put(
        self,
        op: str,
        connection: str,
        scope: str | None,
        reason: str | None = None,
        lease: str | None = None,
        duration_ms: float | None = None,
    ) -> bool:
        """Queue a report (``duration_ms``: the call's, measured by the caller); False
        (and counted) when the outbox is full. Never raises."""
        queue = self._queue
        if len(queue) >= self.max_size:
            self._drop(op, connection)
            return False
        queue.append((op, connection, scope, reason, lease, time_ns(), 1, duration_ms))
        if self._idle or (self._holding and (lease is not None or op != "success")):
            self._wake.set()
        elif self._thread is None:
            self.start()
        return True

    def _drop(self, op: str, connection: str) -> None:
        dropped = self.counters["dropped"] = self.counters["dropped"] + 1
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL:
            self._last_drop_log = now
            log.warning(
                "brama outbox (pid %d) is full (%d reports waiting for the broker): "
                "dropped %s for %r (%d dropped so far)",
                self.pid,
                len(self._queue),
                op,
                connection,
                dropped,
            )

    def pending(self) -> int:
        """Reports not yet confirmed by the broker: waiting here, in flight, and in the
        client link's buffer (which also holds the client's own unconfirmed commands)."""
        return len(self._queue) + len(self._inflight) + self.commands.pending()

    def stats(self) -> dict[str, int]:
        """sent, dropped, retries, released, release_failures, pending."""
        out = dict(self.counters)
        out["pending"] = self.pending()
        return out

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the sender thread (idempotent)."""
        with self._start_lock:
            if self._thread is None and not self._stop.is_set():
                thread = threading.Thread(target=self._run, name="brama-outbox", daemon=True)
                self._thread = thread
                thread.start()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is confirmed by the broker (or
        ``timeout``); True if nothing is left."""
        deadline = time.monotonic() + timeout
        while self._queue or self._inflight:
            if self._thread is None or not self._thread.is_alive():
                return False
            self._wake.set()
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        if self.pid != os.getpid():
            return True
        return self.commands.flush(max(0.0, deadline - time.monotonic()))

    def close(self, timeout: float = 5.0) -> None:
        """Flush for up to ``timeout`` seconds, then stop the sender."""
        if self.pid == os.getpid():
            self.flush(timeout)
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # ------------------------------------------------------------------ sender side
    def _take(self, out: list[_Raw] | None = None) -> list[_Raw]:
        queue = self._queue
        out = [] if out is None else out
        room = self.batch - len(out)
        popleft = queue.popleft
        while queue and room > 0:  # popleft per item: put() may append meanwhile
            out.append(popleft())
            room -= 1
        return out

    def _run(self) -> None:
        while True:
            try:
                self._loop()
                return
            except Exception:  # the sender must outlive any surprise
                log.exception("brama outbox (pid %d): sender failed; restarting it", self.pid)
                if self._stop.wait(1.0):
                    return

    def _loop(self) -> None:
        failures = 0
        while True:
            if not self._inflight:
                self._inflight = self._take()
                self._hold()
            if not self._inflight:
                if self._stop.is_set():
                    return
                self._idle = True
                if not self._queue:  # checked after raising the flag: no lost wake-up
                    self._wake.wait(1.0)
                self._idle = False
                self._wake.clear()
                continue
            try:
                self._send(self._inflight)
            except BramaError as exc:
                failures += 1
                self.counters["retries"] += 1
                pause = min(5.0, 0.1 * 2 ** min(failures, 6))
                log.warning(
                    "brama outbox (pid %d): %d reports not sent (%s); retrying in %.1f s "
                    "(%d waiting)",
                    self.pid,
                    len(self._inflight),
                    exc,
                    pause,
                    len(self._queue),
                )
                if self._stop.wait(pause):
                    return
                continue
            except Exception:
                log.exception("brama outbox (pid %d): unexpected error; reports dropped", self.pid)
                self.counters["dropped"] += len(self._inflight)
            if failures:
                log.warning("brama outbox (pid %d): the broker is back, reports sent", self.pid)
            failures = 0
            self._inflight = []
            self._last_send = time.monotonic()

    def _hold(self) -> None:
        """Wait for more successes until ``linger`` after the last send (see
        DEFAULT_LINGER_S); an urgent report (not a plain success) ends the wait."""
        inflight = self._inflight
        if not inflight or len(inflight) >= self.batch or self.linger <= 0:
            return
        wait = self._last_send + self.linger - time.monotonic()
        if wait <= 0:
            return
        self._wake.clear()
        self._holding = True
        try:
            self._take(inflight)  # what arrived before the flag was up
            if not any(r[0] != "success" or r[4] is not None for r in inflight):
                self._wake.wait(wait)
        finally:
            self._holding = False
        self._take(inflight)

    def _send(self, reports: list[_Raw]) -> None:
        """Hand the batch to the client's :class:`CommandLink`: posted (kept until the
        broker confirmed it, republished after a reconnect). Permit releases are RPCs."""
        commands = self.commands
        reporter = commands.reporter if self.reporter is None else self.reporter
        bodies: list[tuple[bytes, str]] = []
        releases: list[Report] = []
        merged = coalesce(reports)
        reported = 0
        for r in merged:
            if r.op == RELEASE:
                releases.append(r)
                continue
            try:
                body = self.encode(r, reporter)
            except (InvalidNameError, ProtocolError) as exc:  # would block the queue
                self.counters["dropped"] += r.times
                log.warning("brama outbox: %s for %r dropped (%s)", r.op, r.connection, exc)
                continue
            bodies.append((body, commands.route(r.scope, r.connection)))
            reported += r.times
        if bodies:
            commands.post_many(bodies)
            self.counters["sent"] += len(bodies)
            self.counters["reports_sent"] += reported
        for r in releases:
            try:
                if r.lease is not None:
                    commands.query("release_probe", r.connection, r.scope, lease=r.lease)
                self.counters["released"] += 1
            except BramaError as exc:
                self.counters["release_failures"] += 1
                log.info("brama outbox: giving back probe permit %s failed (%s)", r.lease, exc)

    @staticmethod
    def encode(r: Report, reporter: str | None = None) -> bytes:
        """The command of a report, by the protocol's encoder (``report_body``, which is
        ``command_body`` with ``options.lease`` or ``options.count``, and
        ``duration_ms`` and ``reporter`` when given). The reason is cut to
        :data:`MAX_REASON` and a lone surrogate in it replaced, so no exception text
        makes the body invalid."""
        reason = r.reason
        if reason is not None:
            if len(reason) > MAX_REASON:
                reason = reason[: MAX_REASON - 3] + "..."
            if not reason.isascii():
                reason = reason.encode("utf-8", "replace").decode("utf-8")
        return report_body(
            r.op, r.connection, r.scope, reason, now_ms=r.ts_ns // 1_000_000, lease=r.lease,
            count=r.times, duration_ms=r.duration_ms, reporter=reporter,
        )


_OUTBOXES: weakref.WeakSet[Outbox] = weakref.WeakSet()


def flush_all(timeout: float = 5.0) -> None:
    """Flush every outbox of this process (each gets up to ``timeout`` seconds)."""
    pid = os.getpid()
    for outbox in list(_OUTBOXES):
        if outbox.pid == pid and outbox.pending() and not outbox.flush(timeout):
            log.warning(
                "brama outbox (pid %d): %d reports not sent before exit",
                pid,
                outbox.pending(),
            )


def _after_fork() -> None:
    # The parent's sender thread does not exist here: never send the parent's reports
    # twice, and never touch its link. The owning client builds a new outbox.
    for outbox in list(_OUTBOXES):
        outbox._stop.set()
        outbox._queue.clear()
        outbox._inflight = []


atexit.register(flush_all, 2.0)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
