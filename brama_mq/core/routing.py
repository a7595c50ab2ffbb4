"""Routing keys ``<scope>.<connection>.<event>`` and the bindings subscription filters need.

Section 4 of the wire contract fixes the format. Each name must travel as exactly one
topic word, so the four characters that mean something to a topic exchange or to this
codec are percent-encoded::

    "%" -> "%25"    "." -> "%2E"    "*" -> "%2A"    "#" -> "%23"

A missing scope is the word ``_``; a name that is literally ``_`` is written ``%5F`` so
the two never collide. Nothing else is escaped: names are UTF-8 as they are, which keeps
keys readable in the management UI and lets bindings be plain string comparisons. The
encoding is canonical (one spelling per name), and :func:`decode_word` refuses any other
spelling, because a binding only matches the exact bytes of a word.

Valid names are non-empty ``str`` values that UTF-8 can encode (no lone surrogates) and
contain no control characters. "Control" means Unicode category ``Cc`` (C0, DEL, C1) plus
the line and paragraph separators U+2028 and U+2029 (categories ``Zl``/``Zp``): all of them
break logs, headers and terminals. Format characters (``Cf``) are allowed on purpose: the
zero-width joiner is part of many emoji and of several scripts.

Every event gets a key, so the owner calls :func:`routing_key` for each one. Keys are kept
in a bounded dict keyed by ``(scope, connection, event)``: a repeated key is one dict
lookup. The caches are cleared whole when full, which is simpler than LRU bookkeeping,
safe under threads, and rare with the bound used.
"""

from __future__ import annotations

import unicodedata
import zlib
from collections.abc import Iterable
from typing import Final

from brama_mq.core.events import EVENT_TYPES
from brama_mq.errors import FilterError, InvalidNameError

__all__ = [
    "MAX_KEY_BYTES",
    "NO_SCOPE_WORD",
    "binding_keys",
    "check_names",
    "decode_scope",
    "decode_word",
    "encode_name",
    "encode_scope",
    "parse_routing_key",
    "routing_key",
    "stable_shard",
]

#: AMQP routing and binding keys are short strings: at most 255 bytes.
MAX_KEY_BYTES: Final = 255
#: The word that stands for "no scope".
NO_SCOPE_WORD: Final = "_"

_EVENT_SET: Final = frozenset(EVENT_TYPES)
_LONGEST_EVENT_BYTES: Final = max(len(e.encode("utf-8")) for e in EVENT_TYPES)
_SPECIAL: Final = frozenset("%.*#")
_ESCAPES: Final = str.maketrans({"%": "%25", ".": "%2E", "*": "%2A", "#": "%23"})
_UNESCAPES: Final = {"25": "%", "2E": ".", "2A": "*", "23": "#"}
_FORBIDDEN_CATEGORIES: Final = frozenset({"Cc", "Zl", "Zp"})

_CACHE_LIMIT: Final = 65536
# name -> encoded word (valid names only); shared by scope and connection, whose
# encodings are identical.
_WORDS: dict[str, str] = {}
# (scope, connection, event) -> key
_KEYS: dict[tuple[str | None, str, str], str] = {}
# key -> (scope, connection, event)
_PARSED: dict[str, tuple[str | None, str, str]] = {}


def _problem(value: str) -> str | None:
    """Why ``value`` cannot be a name, or None when it can."""
    if not value:
        return "must not be empty"
    if value.isascii():
        # For ASCII, "not printable" is exactly category Cc (0x00-0x1F and 0x7F).
        if not value.isprintable():
            bad = next(c for c in value if not c.isprintable())
            return f"contains the control character U+{ord(bad):04X}"
        return None
    category = unicodedata.category
    for c in value:
        cat = category(c)
        if cat in _FORBIDDEN_CATEGORIES:
            return f"contains the control character U+{ord(c):04X}"
        if cat == "Cs":
            return f"contains the lone surrogate U+{ord(c):04X}, which UTF-8 cannot encode"
    return None


def encode_name(value: str, field: str = "connection") -> str:
    """One name as one routing-key word; raises :class:`InvalidNameError` naming ``field``."""
    try:
        return _WORDS[value]
    except (KeyError, TypeError):
        pass
    if not isinstance(value, str):
        raise InvalidNameError(field, value, f"must be a str, not {type(value).__name__}")
    problem = _problem(value)
    if problem is not None:
        raise InvalidNameError(field, value, problem)
    if value == "_":
        word = "%5F"
    elif _SPECIAL.isdisjoint(value):
        word = value
    else:
        word = value.translate(_ESCAPES)
    if len(_WORDS) >= _CACHE_LIMIT:
        _WORDS.clear()
    _WORDS[value] = word
    return word


def encode_scope(scope: str | None) -> str:
    """The scope's word; None (no scope) is ``_``."""
    if scope is None:
        return NO_SCOPE_WORD
    return encode_name(scope, "scope")


def decode_word(word: str, field: str = "connection") -> str:
    """Inverse of :func:`encode_name`; refuses words that are not its canonical output."""
    if not isinstance(word, str):
        raise InvalidNameError(field, word, f"must be a str, not {type(word).__name__}")
    if "%" not in word:
        value = word
    elif word == "%5F":
        return "_"
    else:
        parts = word.split("%")
        out = [parts[0]]
        for part in parts[1:]:
            ch = _UNESCAPES.get(part[:2])
            if ch is None:
                raise InvalidNameError(
                    field, word, f"bad escape %{part[:2]!s} (only %25 %2E %2A %23 are used)"
                )
            out.append(ch)
            out.append(part[2:])
        value = "".join(out)
    # Re-encoding catches everything else that is not canonical: a bare "_", a raw "*"
    # or "#", empty words, control characters.
    try:
        canonical = encode_name(value, field)
    except InvalidNameError as exc:
        raise InvalidNameError(field, word, exc.problem) from None
    if canonical != word:
        raise InvalidNameError(field, word, f"not canonical: {value!r} is written {canonical!r}")
    return value


def decode_scope(word: str) -> str | None:
    """Inverse of :func:`encode_scope`: ``_`` is None."""
    if word == NO_SCOPE_WORD:
        return None
    return decode_word(word, "scope")


def _utf8_len(word: str) -> int:
    return len(word) if word.isascii() else len(word.encode("utf-8"))


def _too_long(scope: str | None, connection: str, sw: str, cw: str, total: int) -> InvalidNameError:
    """The error for a key of ``total`` bytes; blames the longer of the two names."""
    sb, cb = _utf8_len(sw), _utf8_len(cw)
    field, value = ("scope", scope) if scope is not None and sb > cb else ("connection", connection)
    return InvalidNameError(
        field,
        value,
        f"the routing key would be {total} UTF-8 bytes, {total - MAX_KEY_BYTES} over the "
        f"{MAX_KEY_BYTES}-byte limit (encoded scope {sb} bytes, encoded connection {cb} bytes)",
    )


def routing_key(scope: str | None, connection: str, event: str) -> str:
    """The key an event is published with; raises :class:`InvalidNameError` if it cannot be."""
    try:
        return _KEYS[(scope, connection, event)]
    except (KeyError, TypeError):
        pass
    sw = encode_scope(scope)
    cw = encode_name(connection)
    if not isinstance(event, str) or event not in _EVENT_SET:
        raise InvalidNameError(
            "event", event, f"unknown event type; valid: {', '.join(EVENT_TYPES)}"
        )
    key = f"{sw}.{cw}.{event}"
    total = _utf8_len(key)
    if total > MAX_KEY_BYTES:
        raise _too_long(scope, connection, sw, cw, total)
    if len(_KEYS) >= _CACHE_LIMIT:
        _KEYS.clear()
    _KEYS[(scope, connection, event)] = key
    return key


def parse_routing_key(key: str) -> tuple[str | None, str, str]:
    """``(scope, connection, event)`` of a key; raises :class:`InvalidNameError`."""
    try:
        return _PARSED[key]
    except (KeyError, TypeError):
        pass
    if not isinstance(key, str):
        raise InvalidNameError("routing key", key, f"must be a str, not {type(key).__name__}")
    words = key.split(".")
    if len(words) != 3:
        raise InvalidNameError("routing key", key, f"has {len(words)} words, expected 3")
    sw, cw, event = words
    if not event:
        raise InvalidNameError("routing key", key, "the event word is empty")
    parsed = (decode_scope(sw), decode_word(cw), event)
    if len(_PARSED) >= _CACHE_LIMIT:
        _PARSED.clear()
    _PARSED[key] = parsed
    return parsed


def check_names(scope: str | None, connection: str) -> None:
    """Refuse names that could not carry every event, before anything is sent.

    Checking against the longest event type means a connection accepted at registration
    can never fail later, half-way through the events of one command.
    """
    sw = encode_scope(scope)
    cw = encode_name(connection)
    total = _utf8_len(sw) + 1 + _utf8_len(cw) + 1 + _LONGEST_EVENT_BYTES
    if total > MAX_KEY_BYTES:
        raise _too_long(scope, connection, sw, cw, total)


def _filter_values(name: str, value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    if not values:
        raise FilterError(f"{name} filter is empty: it would match nothing (use None for any)")
    return values


def _event_word(value: object) -> str:
    name = value[1:] if isinstance(value, str) and value.startswith(":") else value
    if not isinstance(name, str) or name not in _EVENT_SET:
        raise FilterError(f"unknown event {value!r}; valid events: {', '.join(EVENT_TYPES)}")
    return name


def binding_keys(
    events: str | Iterable[str] | None = None,
    connection: str | Iterable[str] | None = None,
    scope: str | Iterable[str] | None = None,
) -> list[str]:
    """The topic bindings that deliver exactly what the filters select.

    An absent filter is ``*``; no filter at all is ``#``. Several values per filter give
    the cross product (scope, then connection, then event order), deduplicated. Filter
    values are names, not patterns: ``"a*"`` selects the connection called ``a*``. There
    is no way to select "unscoped only" here: None means "any scope".
    """
    if events is None and connection is None and scope is None:
        return ["#"]
    scopes = _filter_values("scope", scope)
    conns = _filter_values("connection", connection)
    evs = _filter_values("events", events)
    try:
        s_words = ["*"] if scopes is None else [encode_name(s, "scope") for s in scopes]
        c_words = ["*"] if conns is None else [encode_name(c, "connection") for c in conns]
    except InvalidNameError as exc:
        raise FilterError(str(exc)) from exc
    e_words = ["*"] if evs is None else [_event_word(e) for e in evs]
    keys: dict[str, None] = {}
    for sw in s_words:
        for cw in c_words:
            for ew in e_words:
                key = f"{sw}.{cw}.{ew}"
                if _utf8_len(key) > MAX_KEY_BYTES:
                    raise FilterError(
                        f"binding key {key!r} is {_utf8_len(key)} UTF-8 bytes, over the "
                        f"{MAX_KEY_BYTES}-byte limit"
                    )
                keys[key] = None
    return list(keys)


def stable_shard(scope: str | None, connection: str, shards: int) -> int:
    """The owner shard of a connection, the same in every language.

    ``zlib.crc32(utf8(encode_scope(scope) + "." + encode_name(connection))) % shards``,
    where CRC-32 is the common IEEE 802.3 one (zlib, Java's CRC32, Go's crc32.IEEE) taken
    as an unsigned 32-bit number. E.g. scope None, connection "payment_api" hashes the
    bytes ``_.payment_api``.
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be an int >= 1, not {shards!r}")
    sw = encode_scope(scope)
    cw = encode_name(connection)
    if shards == 1:
        return 0
    return zlib.crc32(f"{sw}.{cw}".encode()) % shards
