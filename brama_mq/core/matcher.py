"""Topic-exchange matching with RabbitMQ's rules, for the in-memory transport.

The rules, as RabbitMQ's ``rabbit_exchange_type_topic`` applies them:

* keys and patterns split on ``.``; the empty string has *zero* words, while ``"a."``
  has two (``"a"`` and ``""``), and an empty word is a word like any other;
* in a pattern, a word that is exactly ``*`` matches one word, a word that is exactly
  ``#`` matches zero or more words; ``a*`` or ``#b`` are literal words;
* so ``#`` matches every key, the empty one included, and ``a.#`` matches ``a``.

Both the single-pattern function and the trie run in time bounded by
``len(pattern words) * len(key words)`` states, whatever the ``#`` count: no backtracking.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Final, Generic, TypeVar

__all__ = ["TopicMatcher", "split_words", "topic_matches"]

V = TypeVar("V", bound=Hashable)

_CACHE_LIMIT: Final = 4096


def split_words(key: str) -> list[str]:
    """Words of a key or pattern the way RabbitMQ splits them (``""`` has none)."""
    return key.split(".") if key else []


def topic_matches(pattern: str, key: str) -> bool:
    """Whether a topic binding ``pattern`` matches routing ``key``."""
    if pattern == "#":
        return True
    if "*" not in pattern and "#" not in pattern:
        return pattern == key
    words = split_words(key)
    n = len(words)
    # reach[j]: the pattern words seen so far can consume exactly the first j key words.
    reach = [True] + [False] * n
    for p in split_words(pattern):
        if p == "#":
            seen = False
            for j in range(n + 1):
                seen = seen or reach[j]
                reach[j] = seen
        else:
            star = p == "*"
            for j in range(n, 0, -1):
                reach[j] = reach[j - 1] and (star or words[j - 1] == p)
            reach[0] = False
            if True not in reach:
                return False
    return reach[n]


class _Node(Generic[V]):
    """A trie node: one pattern word per edge, bindings of the pattern ending here."""

    __slots__ = ("children", "values")

    def __init__(self) -> None:
        self.children: dict[str, _Node[V]] = {}
        self.values: set[V] = set()


class TopicMatcher(Generic[V]):
    """Bindings ``pattern -> value`` matched like a topic exchange (a word trie).

    Adding an existing binding or removing a missing one is a no-op, as for AMQP
    bind/unbind. Results of :meth:`match` are cached per key until the bindings change,
    because a transport routes the same few keys over and over.
    """

    def __init__(self) -> None:
        self._root: _Node[V] = _Node()
        self._count = 0
        self._cache: dict[str, frozenset[V]] = {}

    def __len__(self) -> int:
        return self._count

    def __contains__(self, binding: object) -> bool:
        if not isinstance(binding, tuple) or len(binding) != 2:
            return False
        pattern, value = binding
        if not isinstance(pattern, str):
            return False
        node = self._find(pattern)
        return node is not None and value in node.values

    def add(self, pattern: str, value: V) -> bool:
        """Bind ``value`` to ``pattern``; True if the binding is new."""
        node = self._root
        for word in split_words(pattern):
            child = node.children.get(word)
            if child is None:
                child = node.children[word] = _Node()
            node = child
        if value in node.values:
            return False
        node.values.add(value)
        self._count += 1
        self._cache.clear()
        return True

    def remove(self, pattern: str, value: V) -> bool:
        """Unbind ``value`` from ``pattern``; True if it was bound. Prunes empty nodes."""
        path: list[tuple[_Node[V], str]] = []
        node = self._root
        for word in split_words(pattern):
            child = node.children.get(word)
            if child is None:
                return False
            path.append((node, word))
            node = child
        if value not in node.values:
            return False
        node.values.discard(value)
        self._count -= 1
        self._cache.clear()
        for parent, word in reversed(path):
            child = parent.children[word]
            if child.values or child.children:
                break
            del parent.children[word]
        return True

    def remove_value(self, value: V) -> int:
        """Drop every binding of ``value`` (a deleted queue); returns how many."""
        removed = [p for p, v in self.bindings() if v == value]
        for pattern in removed:
            self.remove(pattern, value)
        return len(removed)

    def clear(self) -> None:
        self._root = _Node()
        self._count = 0
        self._cache.clear()

    def bindings(self) -> Iterator[tuple[str, V]]:
        """Every ``(pattern, value)``, in no particular order."""
        stack: list[tuple[_Node[V], list[str]]] = [(self._root, [])]
        while stack:
            node, words = stack.pop()
            pattern = ".".join(words)
            for value in list(node.values):
                yield pattern, value
            for word, child in node.children.items():
                stack.append((child, [*words, word]))

    def match(self, key: str) -> set[V]:
        """Values of every binding whose pattern matches ``key`` (a new set each call)."""
        hit = self._cache.get(key)
        if hit is None:
            hit = self._match(key)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = hit
        return set(hit)

    def _find(self, pattern: str) -> _Node[V] | None:
        node: _Node[V] | None = self._root
        for word in split_words(pattern):
            assert node is not None
            node = node.children.get(word)
            if node is None:
                return None
        return node

    def _match(self, key: str) -> frozenset[V]:
        words = split_words(key)
        n = len(words)
        out: set[V] = set()
        # States (node, i, in_hash): i key words consumed; in_hash when node was reached by
        # a "#" edge, which may swallow further words. Each state is explored once.
        seen: set[tuple[int, int, bool]] = set()
        stack: list[tuple[_Node[V], int, bool]] = [(self._root, 0, False)]
        while stack:
            node, i, in_hash = stack.pop()
            state = (id(node), i, in_hash)
            if state in seen:
                continue
            seen.add(state)
            children = node.children
            if i == n:
                out.update(node.values)
            hash_child = children.get("#")
            if hash_child is not None:
                stack.append((hash_child, i, True))
            if i < n:
                if in_hash:
                    stack.append((node, i + 1, True))
                star = children.get("*")
                if star is not None:
                    stack.append((star, i + 1, False))
                word = words[i]
                if word != "*" and word != "#":
                    child = children.get(word)
                    if child is not None:
                        stack.append((child, i + 1, False))
        return frozenset(out)
