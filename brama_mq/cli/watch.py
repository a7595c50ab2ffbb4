"""``brama-mq watch``: the events a filter selects, live, with the current state of each
connection; or, with ``--json``, one event per line for scripts (``jq``, log shippers).

It is an ordinary transient subscription (so it costs the owner nothing when nobody
watches), plus one snapshot request to the owner at start so the states table is right
before the first event arrives; without an answering owner the table fills from events.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from brama_mq.core.events import CLOSED, EVENT_TYPES, HALF_OPEN, OPEN, REASON_MODE
from brama_mq.core.matcher import topic_matches
from brama_mq.core.routing import routing_key
from brama_mq.errors import BramaError, RequestTimeoutError, breaker_name
from brama_mq.protocol import Event

__all__ = ["WatchView", "run_watch"]

_STYLE = {CLOSED: "green", OPEN: "bold red", HALF_OPEN: "yellow"}


@dataclass(slots=True)
class _Row:
    scope: str | None
    connection: str
    state: str
    failure_count: int | None
    last_event: str
    at_ms: int | None
    mode: str = "normal"

    @property
    def shown_state(self) -> str:
        """The state, with the mode when it is not normal: ``closed (disabled)``."""
        return self.state if self.mode == "normal" else f"{self.state} ({self.mode})"


class WatchView:
    """Current states and the latest events, rendered as two rich tables."""

    def __init__(self, bindings: Sequence[str], recent: int = 15) -> None:
        self.bindings = list(bindings)
        self.rows: dict[tuple[str | None, str], _Row] = {}
        self.recent: deque[Event] = deque(maxlen=recent)
        self.count = 0
        self.note_line = ""

    def wanted(self, scope: str | None, connection: str) -> bool:
        """Whether the filter selects any event of this connection (for snapshot rows)."""
        keys = [routing_key(scope, connection, e) for e in EVENT_TYPES]
        return any(topic_matches(b, k) for b in self.bindings for k in keys)

    def seed(self, statuses: Sequence[dict[str, Any]]) -> None:
        """Start from the owner's snapshot (status objects)."""
        for s in statuses:
            scope, connection = s.get("scope"), s.get("connection")
            if not isinstance(connection, str) or not self.wanted(scope, connection):
                continue
            self.rows[(scope, connection)] = _Row(
                scope, connection, str(s.get("state", "?")), s.get("failure_count"),
                "(snapshot)", None, str(s.get("mode") or "normal"),
            )

    def note(self, event: Event) -> None:
        """One event: it joins the recent list and updates its connection's row."""
        self.count += 1
        self.recent.append(event)
        key = (event.scope, event.connection)
        if event.event == "connection_removed":
            self.rows.pop(key, None)
            return
        row = self.rows.get(key)
        state = event.state or (row.state if row else "?")
        self.rows[key] = _Row(event.scope, event.connection, state, event.failure_count,
                              event.event, event.timestamp, event.mode)

    def render(self, now_ms: int | None = None) -> Group:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        states = Table(title="connections", expand=True)
        for column in ("scope", "connection", "state", "failures", "last event", "ago"):
            states.add_column(column)
        for row in sorted(self.rows.values(), key=lambda r: (r.scope or "", r.connection)):
            ago = "" if row.at_ms is None else f"{max(0, now_ms - row.at_ms) / 1000:.1f}s"
            states.add_row(
                row.scope or "-", row.connection,
                Text(row.shown_state, style=_STYLE.get(row.state, "")),
                "" if row.failure_count is None else str(row.failure_count),
                row.last_event, ago,
            )
        events = Table(title=f"latest events ({self.count} seen)", expand=True)
        for column in ("time", "scope", "connection", "event", "seq", "detail"):
            events.add_column(column)
        for e in reversed(self.recent):
            events.add_row(
                time.strftime("%H:%M:%S", time.localtime(e.timestamp / 1000)),
                e.scope or "-", e.connection, e.event, str(e.seq), _detail(e),
            )
        parts: list[Any] = [states, events]
        if self.note_line:
            parts.append(Text(self.note_line, style="dim"))
        return Group(*parts)


def _detail(event: Event) -> str:
    """What an event says, in a line: a transition with its reason (a rate opening's
    sentence, ``data.detail``, after the reason word; a change of mode with both modes),
    a reported failure's reason (``slow`` marked), else the state."""
    if event.new_state is not None:
        why = event.reason
        if why == REASON_MODE:
            why = f"mode {event.data.get('previous_mode', '?')} -> {event.mode}"
        elif why and event.detail:
            why = f"{why}: {event.detail}"
        reason = f" ({why})" if why else ""
        return f"{event.previous_state} -> {event.new_state}{reason}"
    slow = " [slow]" if event.slow else ""
    if event.reason:
        return event.reason + slow
    return ("" if event.state is None else event.state) + slow


def _line(event: Event) -> str:
    detail = _detail(event)
    name = breaker_name(event.scope, event.connection)
    return f"{event.event:<24} {name} seq={event.seq}" + (f"  {detail}" if detail else "")


def run_watch(
    *,
    broker_url: str | None = None,
    prefix: str | None = None,
    scope: Sequence[str] = (),
    connection: Sequence[str] = (),
    events: Sequence[str] = (),
    patterns: Sequence[str] = (),
    as_json: bool = False,
    count: int | None = None,
    seconds: float | None = None,
    live: bool | None = None,
    console: Console | None = None,
    out: IO[str] | None = None,
    transport: Any = None,
    on_ready: Callable[[list[str]], object] | None = None,
) -> int:
    """Watch until ``count`` events, ``seconds``, or Ctrl-C; returns how many were shown.

    ``on_ready(bindings)`` is called once the queue is bound (events from then on are
    shown). Raises FilterError for a bad filter and BramaError when the broker is away.
    """
    from brama_mq.client.brama import Brama
    from brama_mq.subscribe import subscribe

    sub = subscribe(
        events=list(events) or None,
        connection=list(connection) or None,
        scope=list(scope) or None,
        patterns=list(patterns) or None,
        broker_url=broker_url,
        prefix=prefix,
        transport=transport,
    )
    if on_ready is not None:
        on_ready(sub.bindings)
    end = None if seconds is None else time.monotonic() + seconds
    shown = 0
    try:
        if as_json:
            import sys

            stream = out or sys.stdout
            while count is None or shown < count:
                event = sub.receive(_slice(end))
                if event is None:
                    if end is not None and time.monotonic() >= end:
                        break
                    continue
                stream.write(event.model_dump_json() + "\n")
                stream.flush()
                shown += 1
            return shown
        console = console or Console()
        view = WatchView(sub.bindings)
        live = console.is_terminal if live is None else live

        def seed() -> None:
            client = Brama(transport=sub._hub.transport, request_timeout=2.0)
            try:
                view.seed(client.snapshot())
            except RequestTimeoutError:
                view.note_line = (
                    "no owner answered (is `brama-mq worker` running on this prefix?); "
                    "states fill in as events arrive"
                )
            except BramaError as exc:
                view.note_line = f"no snapshot ({exc}); states fill in as events arrive"
            finally:
                client.link.close()
            if view.note_line and not live:
                console.print(view.note_line, style="dim", highlight=False, soft_wrap=True)
            if not live:
                for row in view.rows.values():
                    console.print(f"{'state':<24} {row.connection} {row.shown_state}",
                                  highlight=False, soft_wrap=True)

        seed()
        reconnects = _reconnects(sub)
        with Live(view.render(), console=console, refresh_per_second=4,
                  auto_refresh=False) if live else _NoLive() as screen:
            while count is None or shown < count:
                now_reconnects = _reconnects(sub)
                if now_reconnects != reconnects:
                    # A transient queue misses what was published while it was away:
                    # read the states again rather than show stale ones.
                    reconnects = now_reconnects
                    view.note_line = "reconnected: states read again from the owner"
                    if not live:
                        console.print(view.note_line, highlight=False, soft_wrap=True)
                    seed()
                event = sub.receive(_slice(end))
                if event is not None:
                    view.note(event)
                    shown += 1
                    if not live:
                        console.print(_line(event), highlight=False, soft_wrap=True)
                elif end is not None and time.monotonic() >= end:
                    break
                if live:
                    screen.update(view.render(), refresh=True)
        return shown
    except KeyboardInterrupt:
        return shown
    finally:
        sub.close()


def _reconnects(sub: Any) -> int:
    """How often the subscription's connection was replaced so far."""
    pump = sub._source_pump()
    if pump is None:
        return 0
    return int(pump.source.stats().get("reconnects", 0))


def _slice(end: float | None) -> float:
    """How long one receive may wait: short, so the view's ages move and Ctrl-C is quick."""
    if end is None:
        return 0.25
    return max(0.0, min(0.25, end - time.monotonic()))


class _NoLive:
    """Stands in for rich's Live when printing plain lines."""

    def __enter__(self) -> _NoLive:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, renderable: Any, refresh: bool = False) -> None:
        return None
