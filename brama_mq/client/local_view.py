"""The local view: this process's copy of breaker states, for checks without a round trip.

A :class:`LocalView` is bootstrapped by a ``snapshot`` request to the owner and kept
current by a subscription to ``state_change`` events (plus ``connection_registered`` and
``connection_removed``, so it learns about connections that appear or go away). Events
carry a per-connection ``seq`` and the publishing owner's ``epoch``; anything not newer
by ``(epoch, seq)`` than what the view holds is dropped (:mod:`brama_mq.core.ordering`),
so duplicates, stragglers and a superseded owner's late publishes never move a circuit
backwards.

The read path is one dictionary lookup: :attr:`LocalView.closed` maps the key of every
circuit that is closed (see :func:`view_key`) to its entry. Nothing on that path takes a
lock or reads a clock; the background threads keep it honest:

* the **pump** thread takes events from an :class:`~brama_mq.transport.EventSource`
  (which reconnects by itself), notes every successful contact with the broker, and
  snapshots again after a reconnect or a stale spell, since events may have been
  missed meanwhile;
* the **watchdog** thread notices when the last contact is older than
  ``max_staleness`` seconds and then swaps :attr:`closed` for an empty dict, so every
  check falls through to the slow path, which applies the fail mode. It logs the
  change both ways.

Each entry also keeps the circuit's operating mode (``data.mode`` of events, absent
meaning ``normal``; ``mode`` of snapshot rows): a change of mode is a ``state_change``
with reason ``mode``, also when the state stays what it was.

One view per process: threads and connections are never shared across ``fork()``
(after a fork the child's copy is emptied and marked dead, see :func:`_after_fork`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, Final, NamedTuple, Protocol

from brama_mq.core.events import (
    CLOSED,
    CONNECTION_REGISTERED,
    CONNECTION_REMOVED,
    OPEN,
    STATE_CHANGE,
    STATES,
)
from brama_mq.core.policy import MODES, NORMAL
from brama_mq.core.routing import encode_name, encode_scope
from brama_mq.errors import BramaError
from brama_mq.transport.base import Delivery, EventSource, Transport

__all__ = [
    "FAIL_CLOSED",
    "FAIL_MODES",
    "FAIL_OPEN",
    "REMOVED",
    "VIEW_BINDINGS",
    "LocalView",
    "ViewClient",
    "ViewEntry",
    "view_key",
]

log = logging.getLogger("brama_mq.view")

#: Fail modes when the view is cut off from the broker: let calls through, or refuse them.
FAIL_OPEN: Final = "open"
FAIL_CLOSED: Final = "closed"
FAIL_MODES: Final = (FAIL_OPEN, FAIL_CLOSED)
#: State of a connection the owner removed (kept as a tombstone for its ``seq``).
REMOVED: Final = "removed"
#: What the view's queue is bound to.
VIEW_BINDINGS: Final = (
    f"*.*.{STATE_CHANGE}",
    f"*.*.{CONNECTION_REGISTERED}",
    f"*.*.{CONNECTION_REMOVED}",
)

_NOTHING: Final[dict[str, ViewEntry]] = {}  # what `closed` points to while unusable


def view_key(scope: str | None, connection: str) -> str:
    """The view's key of a connection: the routing-key words ``<scope>.<connection>``.

    The encoding is one-to-one, so the key is unique; a str key hashes once (str caches
    its hash), which keeps the check a plain dict lookup.
    """
    return f"{encode_scope(scope)}.{encode_name(connection)}"


class ViewClient(Protocol):
    """What a view needs of its client (a :class:`~brama_mq.client.Brama`): a protocol,
    so this module does not import the client, which imports it."""

    #: The client's view, installed by :meth:`LocalView.attach`.
    local_view: LocalView | None

    @property
    def transport(self) -> Transport:
        """Where the view's event source comes from (by default)."""
        ...

    @property
    def request_timeout(self) -> float:
        """Bounds the wait for a snapshot."""
        ...

    def snapshot(
        self, scope: str | None = None, *, timeout: float | None = None
    ) -> list[dict[str, Any]]:
        """Status of every connection, from the owner(s)."""
        ...


class ViewEntry(NamedTuple):
    """What the view knows about one connection."""

    scope: str | None
    connection: str
    state: str
    open_until: int | None
    seq: int
    #: With ``seq``, orders what the view accepts (:mod:`brama_mq.core.ordering`).
    epoch: int = 0
    #: The operating mode: normal, disabled, forced_open or metrics_only.
    mode: str = NORMAL


def _mode(value: Any) -> str:
    """A mode as events and status rows give it (absent or unknown: ``normal``)."""
    return value if isinstance(value, str) and value in MODES else NORMAL


class LocalView:
    """A per-process, event-fed copy of breaker states (see the module docstring).

    ``client`` answers the snapshot requests; ``transport`` (default: the client's)
    provides the event source. ``max_staleness``: seconds without contact with the
    broker after which the view stops vouching for its data; ``fail_mode`` says what
    guards do then (``"open"``: let calls through, ``"closed"``: refuse them).
    """

    def __init__(
        self,
        client: ViewClient,
        *,
        transport: Transport | None = None,
        max_staleness: float = 30.0,
        fail_mode: str = FAIL_OPEN,
        poll_interval: float | None = None,
        snapshot_timeout: float | None = None,
    ) -> None:
        if fail_mode not in FAIL_MODES:
            raise ValueError(f"fail_mode must be one of {FAIL_MODES}, not {fail_mode!r}")
        if not max_staleness > 0:
            raise ValueError(f"max_staleness must be > 0 seconds, not {max_staleness!r}")
        self.client = client
        self.transport = transport if transport is not None else client.transport
        self.max_staleness = float(max_staleness)
        self.fail_mode = fail_mode
        #: How long one wait for events lasts: each return is a contact with the broker,
        #: so it stays well under max_staleness; otherwise 1 s (few wake-ups).
        self.poll_interval = (
            min(1.0, self.max_staleness / 4) if poll_interval is None else poll_interval
        )
        self._source: EventSource | None = None
        self.snapshot_timeout = snapshot_timeout
        self.pid = os.getpid()
        #: The read table: closed circuits only, and only while the view is usable.
        self.closed: dict[str, ViewEntry] = _NOTHING
        self._closed_live: dict[str, ViewEntry] = {}
        self._entries: dict[str, ViewEntry] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._stale = False
        self._dead = False
        self._need_sync = True
        self._next_sync = 0.0
        self._sync_failures = 0
        self._last_contact = time.monotonic()
        self._threads: list[threading.Thread] = []
        self._started = False
        self.counters: dict[str, int] = {
            "events": 0,
            "duplicates": 0,
            "stale_epoch": 0,
            "snapshots": 0,
            "snapshot_failures": 0,
            "reconnects": 0,
            "stale_spells": 0,
        }
        _VIEWS.add(self)

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def attach(
        cls, client: ViewClient, *, wait: float | None = 5.0, **options: Any
    ) -> LocalView:
        """Make a view for ``client``, start it and install it as ``client.local_view``."""
        view = cls(client, **options)
        view.start(wait=wait)
        client.local_view = view
        return view

    def start(self, wait: float | None = None) -> bool:
        """Start the background threads (once); with ``wait``, block up to that many
        seconds for the first snapshot. Returns whether the view is ready."""
        with self._lock:
            if not self._started:
                self._started = True
                self._last_contact = time.monotonic()
                for target, name in ((self._pump, "brama-view"), (self._watch, "brama-view-watch")):
                    thread = threading.Thread(target=target, name=name, daemon=True)
                    self._threads.append(thread)
                    thread.start()
        if wait:
            self._ready.wait(wait)
        return self.ready

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the first snapshot arrived (or ``timeout``); returns readiness."""
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the threads; the pump closes its event source on the way out."""
        self._stop.set()
        with self._lock:
            self.closed = _NOTHING
        wake = getattr(self._source, "wake", None)
        if wake is not None:  # a pump waiting for events returns now
            try:
                wake()
            except Exception:
                log.debug("waking the view's event source failed", exc_info=True)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    # ------------------------------------------------------------------ reading
    @property
    def ready(self) -> bool:
        """Whether a snapshot has been applied at least once."""
        return self._ready.is_set()

    @property
    def stale(self) -> bool:
        """Whether the view has been cut off from the broker for over ``max_staleness``."""
        return self._stale

    @property
    def usable(self) -> bool:
        """Ready, not stale, and running in the process that made it."""
        return self._ready.is_set() and not self._stale and not self._dead

    def staleness(self) -> float:
        """Seconds since the last successful contact with the broker."""
        return time.monotonic() - self._last_contact

    def entry(self, connection: str, scope: str | None = None) -> ViewEntry | None:
        """The view's entry for a connection (None: unknown or removed)."""
        return self.lookup(view_key(scope, connection))

    def lookup(self, key: str) -> ViewEntry | None:
        """:meth:`entry` by :func:`view_key`."""
        entry = self._entries.get(key)
        if entry is None or entry.state == REMOVED:
            return None
        return entry

    def state(self, connection: str, scope: str | None = None) -> str | None:
        """The connection's state, or None when the view cannot vouch for it (unknown
        connection, not bootstrapped yet, stale)."""
        if not self.usable:
            return None
        entry = self.entry(connection, scope)
        return None if entry is None else entry.state

    def mode(self, connection: str, scope: str | None = None) -> str | None:
        """The connection's operating mode, or None when the view cannot vouch for it
        (as :meth:`state`)."""
        if not self.usable:
            return None
        entry = self.entry(connection, scope)
        return None if entry is None else entry.mode

    def entries(self) -> list[ViewEntry]:
        """Every live entry (a copy)."""
        return [e for e in list(self._entries.values()) if e.state != REMOVED]

    def stats(self) -> dict[str, Any]:
        """Counters and flags, for tests, logs and metrics."""
        out: dict[str, Any] = dict(self.counters)
        out.update(
            ready=self.ready,
            stale=self._stale,
            connections=len(self.entries()),
            closed=len(self._closed_live),
            staleness_s=round(self.staleness(), 3),
        )
        return out

    # ------------------------------------------------------------------ writing
    def _set(self, key: str, entry: ViewEntry) -> None:
        self._entries[key] = entry
        if entry.state == CLOSED:
            self._closed_live[key] = entry
        else:
            self._closed_live.pop(key, None)

    def apply_event(self, event: Mapping[str, Any]) -> bool:
        """Apply one decoded event; False when it is not newer than what the view has."""
        connection = event.get("connection")
        seq = event.get("seq")
        epoch = event.get("epoch", 0)
        scope = event.get("scope")
        if not isinstance(connection, str) or not isinstance(seq, int):
            return False
        if not isinstance(epoch, int) or epoch < 0:
            return False
        if scope is not None and not isinstance(scope, str):
            return False
        data = event.get("data")
        data = data if isinstance(data, Mapping) else {}
        kind = event.get("event")
        if kind == STATE_CHANGE:
            state = data.get("new_state")
        elif kind == CONNECTION_REGISTERED:
            state = data.get("state", CLOSED)
        elif kind == CONNECTION_REMOVED:
            state = REMOVED
        else:
            return False
        if state != REMOVED and state not in STATES:
            return False
        try:
            key = view_key(scope, connection)
        except BramaError:
            return False
        with self._lock:
            current = self._entries.get(key)
            if current is not None and (epoch, seq) <= (current.epoch, current.seq):
                # older epoch: a superseded owner's late publish; same epoch: seen already
                self.counters["stale_epoch" if epoch < current.epoch else "duplicates"] += 1
                return False
            open_until = data.get("open_until") if state == OPEN else None
            if not isinstance(open_until, int):
                open_until = None
            self._set(key, ViewEntry(scope, connection, str(state), open_until, seq, epoch,
                                     _mode(data.get("mode"))))
            self.counters["events"] += 1
        return True

    def apply_snapshot(self, statuses: Iterable[Mapping[str, Any]]) -> None:
        """Apply the owner's status list; connections it no longer lists are removed."""
        seen: set[str] = set()
        with self._lock:
            for status in statuses:
                try:
                    scope = status.get("scope")
                    connection = str(status["connection"])
                    key = view_key(scope, connection)
                    state = str(status["state"])
                    seq = int(status.get("seq") or 0)
                    epoch = int(status.get("epoch") or 0)
                except (KeyError, TypeError, ValueError, BramaError):
                    continue
                seen.add(key)
                current = self._entries.get(key)
                if current is not None and (epoch, seq) < (current.epoch, current.seq):
                    continue  # an event newer than the snapshot was applied already
                open_until = status.get("open_until") if state == OPEN else None
                if not isinstance(open_until, int):
                    open_until = None
                self._set(key, ViewEntry(scope, connection, state, open_until, seq, epoch,
                                         _mode(status.get("mode"))))
            for key, entry in list(self._entries.items()):
                if key not in seen and entry.state != REMOVED:
                    self._set(key, entry._replace(state=REMOVED, open_until=None))
            self.counters["snapshots"] += 1

    # ------------------------------------------------------------------ freshness
    def _contact(self) -> None:
        self._last_contact = time.monotonic()
        if self._stale and not self._need_sync:
            self._set_fresh()

    def _set_fresh(self) -> None:
        with self._lock:
            was_stale = self._stale
            self._stale = False
            if self._ready.is_set() and not self._dead and not self._stop.is_set():
                self.closed = self._closed_live
        if was_stale:
            log.warning(
                "brama local view (pid %d) is in contact with the broker again and resynced; "
                "guards follow the circuits again",
                self.pid,
            )

    def _set_stale(self, age: float) -> None:
        with self._lock:
            if self._stale:
                return
            self._stale = True
            self._need_sync = True  # events may be missed: snapshot again before trusting
            self.closed = _NOTHING
            self.counters["stale_spells"] += 1
        verdict = "let through" if self.fail_mode == FAIL_OPEN else "refused"
        log.warning(
            "brama local view (pid %d) has had no contact with the broker for %.1f s "
            "(max staleness %.1f s): fail mode %r, guarded calls are %s until it is back",
            self.pid,
            age,
            self.max_staleness,
            self.fail_mode,
            verdict,
        )

    def check_staleness(self) -> bool:
        """Flip to stale when contact is too old (the watchdog calls this); returns stale."""
        age = time.monotonic() - self._last_contact
        if age > self.max_staleness and not self._stale:
            self._set_stale(age)
        return self._stale

    def _watch(self) -> None:
        interval = max(0.01, min(1.0, self.max_staleness / 4))
        while not self._stop.wait(interval):
            try:
                self.check_staleness()
            except Exception:  # the watchdog must outlive any surprise
                log.exception("brama local view watchdog failed")

    # ------------------------------------------------------------------ the pump
    def _sync(self) -> bool:
        """Snapshot from the owner; on failure try again later (with backoff)."""
        try:
            timeout = self.snapshot_timeout
            if timeout is None:
                timeout = min(self.client.request_timeout, max(0.5, self.max_staleness / 2))
            statuses = self.client.snapshot(timeout=timeout)
        except BramaError as exc:
            self.counters["snapshot_failures"] += 1
            self._sync_failures += 1
            pause = min(5.0, 0.2 * 2 ** min(self._sync_failures, 5))
            self._next_sync = time.monotonic() + pause
            log.warning(
                "brama local view (pid %d): snapshot failed (%s); retrying in %.1f s",
                self.pid,
                exc,
                pause,
            )
            return False
        self.apply_snapshot(statuses)
        self._sync_failures = 0
        self._need_sync = False
        first = not self._ready.is_set()
        self._ready.set()
        if first:
            log.info(
                "brama local view (pid %d) bootstrapped: %d connections",
                self.pid,
                len(self.entries()),
            )
        self._contact()
        with self._lock:
            if not self._stale and not self._dead and not self._stop.is_set():
                self.closed = self._closed_live
        return True

    def _open_source(self) -> EventSource:
        source = self.transport.event_source()
        try:
            source.bind(list(VIEW_BINDINGS))
        except BaseException:
            source.close()
            raise
        return source

    def _deliver(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            try:
                event = json.loads(delivery.body)
            except ValueError:
                continue
            if isinstance(event, dict):
                self.apply_event(event)

    def _pump(self) -> None:
        source: EventSource | None = None
        reconnects = 0
        failures = 0
        try:
            while not self._stop.is_set() and not self._dead:
                try:
                    if source is None:
                        source = self._source = self._open_source()
                        reconnects = _reconnects(source)
                        self._need_sync = True
                        self._next_sync = 0.0
                        self._contact()
                    if self._need_sync and time.monotonic() >= self._next_sync:
                        self._sync()
                    deliveries = source.get(self.poll_interval)
                    now_reconnects = _reconnects(source)
                    if now_reconnects != reconnects:
                        reconnects = now_reconnects
                        self.counters["reconnects"] += 1
                        self._need_sync = True
                        self._next_sync = 0.0
                        log.info("brama local view (pid %d) reconnected; resyncing", self.pid)
                    self._contact()
                    if deliveries:
                        self._deliver(deliveries)
                        source.ack(deliveries[-1].delivery_tag, multiple=True)
                    failures = 0
                except BramaError as exc:
                    failures += 1
                    pause = min(5.0, 0.1 * 2 ** min(failures, 6))
                    log.warning(
                        "brama local view (pid %d) cannot reach the broker (%s); retrying in "
                        "%.1f s",
                        self.pid,
                        exc,
                        pause,
                    )
                    self._stop.wait(pause)
                except Exception:
                    log.exception("brama local view (pid %d): unexpected error", self.pid)
                    self._stop.wait(1.0)
        finally:
            if source is not None and not self._dead:
                try:
                    source.close()
                except Exception:
                    log.debug("closing the view's event source failed", exc_info=True)


def _reconnects(source: EventSource) -> int:
    stats = getattr(source, "stats", None)
    if stats is None:
        return 0
    try:
        return int(stats().get("reconnects", 0))
    except Exception:
        return 0


# Every view of this process, so a fork can disarm the child's copies.
_VIEWS: weakref.WeakSet[LocalView] = weakref.WeakSet()
#: Objects inherited across fork() that must never be closed or collected in the child
#: (closing would talk on the parent's sockets).
_ORPHANS: list[Any] = []


def _after_fork() -> None:
    """In a forked child: the parent's views have no threads here; make them refuse to
    vouch for anything (checks fall to the slow path, which builds a fresh view)."""
    for view in list(_VIEWS):
        view._dead = True
        view.closed = _NOTHING
        _ORPHANS.append(view)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)
