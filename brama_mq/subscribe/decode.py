"""Decoding events on the subscriber's hot path, with :func:`decode_event`'s exact rules.

``Event.model_validate_json`` (pydantic's own JSON parser) is about 2.5 times faster than
``decode_event`` (``json`` + dict validation), which matters when every event of a
subscription queue passes through. It is not the contract's decoder, so it is only a
shortcut: an event it accepts is kept only if it holds no NaN/Infinity and nests no
deeper than ``decode_event`` allows (its parser accepts both); anything else, errors
included, goes through ``decode_event``, which decides and says why.
"""

from __future__ import annotations

import math
from typing import Any, Final

from pydantic import ValidationError

from brama_mq.protocol import CONTENT_TYPE, MAX_BYTES, MAX_DEPTH, Event, decode_event

__all__ = ["fast_decode_event"]

_PLAIN: Final = (str, int, bool, type(None))


def _tame(value: Any, depth: int) -> bool:
    """No non-finite float anywhere in ``value``, and no deeper than MAX_DEPTH."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if depth >= MAX_DEPTH:
        return False
    children = value.values() if isinstance(value, dict) else value
    return all(_tame(child, depth + 1) for child in children)


def _tame_object(obj: dict[str, Any], depth: int) -> bool:
    """:func:`_tame` for an object, with a quick pass over the usual flat str/int values."""
    for value in obj.values():
        kind = type(value)
        if kind is str or kind is int or kind is bool or value is None:
            continue
        if not _tame(value, depth + 1):
            return False
    return True


def fast_decode_event(body: bytes, content_type: str | None) -> Event:
    """Same result as ``decode_event(body, content_type)``, usually faster."""
    if (content_type is None or content_type == CONTENT_TYPE) and len(body) <= MAX_BYTES:
        try:
            event = Event.model_validate_json(body)
        except ValidationError:
            pass  # decode_event raises the ProtocolError (or accepts what jiter refused)
        else:
            if _surely_tame(body):
                return event
            extra = event.model_extra
            if _tame_object(event.data, 2) and (not extra or _tame_object(extra, 1)):
                return event
    return decode_event(body, content_type)


def _surely_tame(body: bytes) -> bool:
    """A byte scan that settles the usual case without walking the object: a body with no
    ``NaN``/``Infinity`` token holds no such float, and one with fewer ``{``/``[`` than
    MAX_DEPTH cannot nest deeper (a ``"NaN"`` inside a string only costs the walk)."""
    return (
        b"NaN" not in body
        and b"Infinity" not in body
        and body.count(b"{") + body.count(b"[") <= MAX_DEPTH
    )
