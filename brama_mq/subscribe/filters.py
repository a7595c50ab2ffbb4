"""Subscription filters as topic bindings, and which bindings an unsubscribe filter covers.

Pure functions (no I/O), so the rules can be tested against the core's topic matcher:

* :func:`filter_keys` is :func:`~brama_mq.core.routing.binding_keys` (cross product of
  scope x connection x event, ``*`` for an absent filter, ``#`` for none) plus raw topic
  patterns for callers that need them (``brama-mq watch --pattern``).
* :func:`covers` decides whether every routing key one pattern matches is also matched by
  another. ``unsubscribe(connection="a")`` removes exactly the bindings its own keys cover:
  ``*.a.*`` and ``*.a.failure`` go, ``payments.*.*`` and ``#`` stay (a topic exchange has no
  negative bindings, so a wider binding can only be kept or removed whole).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from itertools import product
from typing import Final

from brama_mq.core.matcher import split_words, topic_matches
from brama_mq.core.routing import MAX_KEY_BYTES, binding_keys
from brama_mq.errors import FilterError

__all__ = ["FilterValues", "check_pattern", "covers", "filter_keys"]

FilterValues = str | Iterable[str] | None

_FORBIDDEN: Final = frozenset(chr(c) for c in range(32)) | {"\x7f"}


def check_pattern(pattern: object) -> str:
    """A raw topic binding key, checked: a non-empty str of at most 255 UTF-8 bytes."""
    if not isinstance(pattern, str) or not pattern:
        raise FilterError(f"a pattern must be a non-empty str, not {pattern!r}")
    if not _FORBIDDEN.isdisjoint(pattern):
        raise FilterError(f"pattern {pattern!r} contains a control character")
    try:
        size = len(pattern.encode("utf-8"))
    except UnicodeEncodeError:
        raise FilterError(f"pattern {pattern!r} is not valid UTF-8") from None
    if size > MAX_KEY_BYTES:
        raise FilterError(f"pattern {pattern!r} is {size} UTF-8 bytes, over {MAX_KEY_BYTES}")
    return pattern


def filter_keys(
    events: FilterValues = None,
    connection: FilterValues = None,
    scope: FilterValues = None,
    patterns: FilterValues = None,
) -> list[str]:
    """The bindings a filter stands for, deduplicated, in a stable order.

    Raw ``patterns`` are added as they are; with patterns and no other filter the result is
    just the patterns (not ``#``). Event names are checked (a typo lists the valid names).
    """
    keys: dict[str, None] = {}
    if patterns is not None:
        raw = [patterns] if isinstance(patterns, str) else list(patterns)
        if not raw:
            raise FilterError("patterns filter is empty: it would match nothing")
        keys.update((check_pattern(p), None) for p in raw)
        if events is None and connection is None and scope is None:
            return list(keys)
    keys.update((k, None) for k in binding_keys(events, connection, scope))
    return list(keys)


#: Expansions of the narrow pattern's "#" words tried at most; beyond it covers() answers
#: only the obvious cases (a pathological pattern cannot make unsubscribe slow).
_MAX_EXPANSIONS: Final = 4096


@lru_cache(maxsize=4096)
def covers(wide: str, narrow: str) -> bool:
    """Whether topic pattern ``wide`` matches every routing key that ``narrow`` matches.

    Exact, by testing representative keys: each ``*`` of ``narrow`` becomes a word no
    literal of ``wide`` can match (the hardest case: only ``*`` and ``#`` match it), each
    ``#`` a run of 0 to ``len(wide) + 1`` such words (a longer run is matched iff one of
    that length is, because some ``#`` of ``wide`` must then absorb a word and can absorb
    more). E.g. ``#`` covers everything, ``*.a.*`` covers ``*.a.failure``, ``*.*.*`` does
    not cover ``#``, and ``#.*.a`` covers ``a.#.a``.
    """
    if wide == narrow or wide == "#":
        return True
    w = split_words(wide)
    fresh = "\x00fresh"
    while fresh in w:
        fresh += "_"
    words: list[str] = []
    for word in split_words(narrow):
        if not (word == "#" and words and words[-1] == "#"):  # "#.#" is the same as "#"
            words.append(word)
    hashes = [i for i, word in enumerate(words) if word == "#"]
    runs = range(len(w) + 2)
    if len(runs) ** len(hashes) > _MAX_EXPANSIONS:
        return False
    base = [fresh if word == "*" else word for word in words]
    for lengths in product(runs, repeat=len(hashes)):
        key: list[str] = []
        expand = dict(zip(hashes, lengths, strict=True))
        for i, word in enumerate(base):
            key.extend([fresh] * expand[i] if i in expand else [word])
        if not topic_matches(wide, ".".join(key)):
            return False
    return True
