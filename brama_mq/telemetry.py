"""Telemetry hooks in the spirit of Elixir's ``:telemetry``.

Code that does something worth measuring *executes* a named event with measurements
(numbers: durations in seconds, counts) and metadata (what it was about); whoever wants
to know *attaches* a handler to event names. Nothing is measured or built while nobody
listens: emitters check :data:`enabled` (one module attribute) first.

::

    from brama_mq import telemetry

    def log_batch(event, measurements, metadata):
        print(event, measurements["commands"], measurements["duration"])

    telemetry.attach("my-logger", [("brama", "owner", "batch")], log_batch)
    ...
    telemetry.detach("my-logger")

Events of the owner (``brama-mq worker``), all emitted in the owner's loop thread
(event name: measurements; metadata):

* ``("brama", "owner", "start")``: ``system_time`` (epoch s); ``owner``, ``shard``, ``queue``
* ``("brama", "owner", "stop")``: ``duration`` (s served); ``owner``, ``shard``, ``queue``
* ``("brama", "owner", "batch")``, per batch of commands: ``duration`` (s to apply and
  publish), ``commands``, ``applied``, ``queries``, ``dead_letters``, ``events``,
  ``critical_events``; ``shard``, ``ops`` (``{(op, result): count}``, result being the
  engine's status such as ``applied`` or ``not_registered``, or ``query``/``internal``)
* ``("brama", "owner", "event")``, per event published: ``count`` (1); ``event`` (the
  :class:`~brama_mq.core.events.Event`), ``shard``
* ``("brama", "owner", "confirm")``, per batch whose confirms came in and which was
  acked: ``duration`` (s from its publish to its ack), ``batches`` (1); ``shard``
* ``("brama", "owner", "dead_letter")``, per command dead-lettered: ``count`` (1);
  ``shard``, ``reason`` (``decode``, ``internal`` or the engine's status), ``error``
* ``("brama", "owner", "takeover")``, when this owner (journaled) becomes the active
  one: ``duration`` (s to rebuild the registry and take over), ``republished`` (critical
  events published again); ``owner``, ``shard``, ``queue``
* ``("brama", "owner", "step_down")``, when the active owner becomes a standby (its
  connection was lost or replaced): ``count`` (1); ``owner``, ``shard``, ``queue``,
  ``reason``

A handler that raises is detached (logged once), as ``:telemetry`` does, so a broken
handler can never take the owner down.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = [
    "EVENTS",
    "EventName",
    "Handler",
    "attach",
    "detach",
    "enabled",
    "execute",
    "list_handlers",
]

log = logging.getLogger("brama_mq.telemetry")

EventName = tuple[str, ...]
Handler = Callable[[EventName, Mapping[str, Any], Mapping[str, Any]], None]

#: The events brama_mq emits (see the module doc).
EVENTS: tuple[EventName, ...] = (
    ("brama", "owner", "start"),
    ("brama", "owner", "stop"),
    ("brama", "owner", "batch"),
    ("brama", "owner", "event"),
    ("brama", "owner", "confirm"),
    ("brama", "owner", "dead_letter"),
    ("brama", "owner", "takeover"),
    ("brama", "owner", "step_down"),
)

#: True while at least one handler is attached: emitters test it before measuring.
enabled: bool = False

_lock = threading.Lock()
#: handler id -> (event names, handler)
_by_id: dict[str, tuple[tuple[EventName, ...], Handler]] = {}
#: event name -> [(handler id, handler)], rebuilt on attach/detach (copy-on-write, so
#: execute() reads it without a lock)
_table: dict[EventName, tuple[tuple[str, Handler], ...]] = {}


def _event_name(name: Any) -> EventName:
    if isinstance(name, str):
        raise TypeError(f"an event name is a tuple of strings like ('brama', 'owner', 'batch'),"
                        f" not the string {name!r}")
    out = tuple(name)
    if not out or not all(isinstance(part, str) and part for part in out):
        raise TypeError(f"an event name is a non-empty tuple of non-empty strings, not {name!r}")
    return out


def _rebuild() -> None:
    global _table, enabled
    table: dict[EventName, list[tuple[str, Handler]]] = {}
    for handler_id, (names, handler) in _by_id.items():
        for name in names:
            table.setdefault(name, []).append((handler_id, handler))
    _table = {name: tuple(entries) for name, entries in table.items()}
    enabled = bool(_table)


def attach(
    handler_id: str, event_names: EventName | Iterable[EventName], handler: Handler
) -> None:
    """Call ``handler(event_name, measurements, metadata)`` for each of ``event_names``.

    ``event_names`` is one name (a tuple of strings) or several. ``handler_id`` must be
    unique (ValueError otherwise): it is what :func:`detach` takes.
    """
    if not isinstance(handler_id, str) or not handler_id:
        raise TypeError(f"handler_id must be a non-empty string, not {handler_id!r}")
    if not callable(handler):
        raise TypeError(f"handler must be callable, not {handler!r}")
    if isinstance(event_names, str):
        _event_name(event_names)  # raises, saying what a name looks like
    items: list[Any] = list(event_names)
    if items and all(isinstance(part, str) for part in items):
        names: tuple[EventName, ...] = (_event_name(items),)  # one name given
    else:
        names = tuple(_event_name(name) for name in items)
    if not names:
        raise ValueError("attach needs at least one event name")
    with _lock:
        if handler_id in _by_id:
            raise ValueError(f"a telemetry handler {handler_id!r} is attached already; "
                             "detach it first or pick another id")
        _by_id[handler_id] = (names, handler)
        _rebuild()


def detach(handler_id: str) -> bool:
    """Remove a handler; False if no handler had that id."""
    with _lock:
        if _by_id.pop(handler_id, None) is None:
            return False
        _rebuild()
        return True


def list_handlers(prefix: EventName = ()) -> list[tuple[str, EventName]]:
    """``(handler id, event name)`` for every attachment whose name starts with ``prefix``."""
    prefix = tuple(prefix)
    with _lock:
        return [
            (handler_id, name)
            for handler_id, (names, _) in _by_id.items()
            for name in names
            if name[: len(prefix)] == prefix
        ]


def execute(
    event_name: EventName, measurements: Mapping[str, Any], metadata: Mapping[str, Any]
) -> None:
    """Call every handler attached to ``event_name``; one that raises is detached."""
    entries = _table.get(event_name)
    if not entries:
        return
    for handler_id, handler in entries:
        try:
            handler(event_name, measurements, metadata)
        except Exception:
            log.exception("telemetry handler %r failed on %s; detaching it", handler_id,
                          event_name)
            detach(handler_id)
