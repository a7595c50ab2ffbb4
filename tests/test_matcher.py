"""Topic matching with RabbitMQ's rules, single pattern and trie."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from brama_mq.core.matcher import TopicMatcher, split_words, topic_matches


def reference_matches(pattern: str, key: str) -> bool:
    """Independent reference: a regex built word by word (fine for short inputs)."""
    p_words = pattern.split(".") if pattern else []
    # Match against "." + key so that every word, the first included, starts with a dot.
    parts: list[str] = []
    for w in p_words:
        if w == "#":
            parts.append(r"(?:\.[^.]*)*")
        elif w == "*":
            parts.append(r"\.[^.]*")
        else:
            parts.append(re.escape("." + w))
    subject = "." + key if key else ""
    return re.fullmatch("".join(parts), subject) is not None


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("#", "", True),
        ("#", "a", True),
        ("#", "a.b.c", True),
        ("", "", True),
        ("", "a", False),
        ("*", "", False),
        ("*", "a", True),
        ("*", "a.b", False),
        ("a.#", "a", True),
        ("a.#", "a.b.c", True),
        ("a.#", "b", False),
        ("#.a", "a", True),
        ("#.a", "x.y.a", True),
        ("#.a", "a.x", False),
        ("a.#.b", "a.b", True),
        ("a.#.b", "a.x.y.b", True),
        ("a.#.b", "a.x.y", False),
        ("a.*.b", "a.b", False),
        ("a.*.b", "a.x.b", True),
        ("*.*", "a.", True),
        ("*", ".", False),
        ("a.", "a.", True),
        ("a.*", "a.", True),
        ("#.#", "", True),
        ("#.*", "", False),
        ("#.*.#", "a", True),
        ("a*", "ab", False),
        ("a*", "a*", True),
        ("#b", "x.#b", False),
        ("*.payment_api.*", "payments.payment_api.state_change", True),
        ("payments.*.*", "payments.payment_api.state_change", True),
        ("payments.*.*", "other.payment_api.state_change", False),
        ("#.circuit_opened", "_.api.circuit_opened", True),
        ("a.b.c", "a.b.c", True),
        ("a.b.c", "a.b", False),
    ],
)
def test_rabbitmq_cases(pattern: str, key: str, expected: bool) -> None:
    """Known RabbitMQ outcomes, including ``#`` matching zero words and literal ``a*``."""
    assert topic_matches(pattern, key) is expected
    assert reference_matches(pattern, key) is expected


def test_split_words_like_rabbitmq() -> None:
    """The empty string has no words; a trailing dot makes an empty word."""
    assert split_words("") == []
    assert split_words("a.") == ["a", ""]
    assert split_words(".") == ["", ""]


def test_many_hashes_do_not_blow_up() -> None:
    """Patterns with many ``#`` stay polynomial (a backtracking matcher would not)."""
    pattern = ".".join(["#"] * 30 + ["z"])
    key = ".".join(["a"] * 200)
    assert topic_matches(pattern, key) is False
    matcher: TopicMatcher[str] = TopicMatcher()
    matcher.add(pattern, "q")
    assert matcher.match(key) == set()


WORDS = ["a", "b", ""]
PATTERN_WORDS = [*WORDS, "*", "#"]
keys = st.lists(st.sampled_from(WORDS), max_size=5).map(".".join)
patterns = st.lists(st.sampled_from(PATTERN_WORDS), max_size=5).map(".".join)


@given(patterns, keys)
def test_agrees_with_reference(pattern: str, key: str) -> None:
    """topic_matches agrees with the regex reference on random patterns and keys."""
    assert topic_matches(pattern, key) == reference_matches(pattern, key)


def test_matcher_basics() -> None:
    """add/remove are idempotent like bind/unbind; match returns the bound values."""
    m: TopicMatcher[str] = TopicMatcher()
    assert m.add("payments.*.*", "q1") is True
    assert m.add("payments.*.*", "q1") is False
    assert m.add("#", "q2") is True
    assert m.add("*.api.state_change", "q3") is True
    assert len(m) == 3
    assert m.match("payments.api.state_change") == {"q1", "q2", "q3"}
    assert m.match("other.api.failure") == {"q2"}
    assert ("#", "q2") in m
    assert m.remove("#", "q2") is True
    assert m.remove("#", "q2") is False
    assert m.remove("no.such", "q2") is False
    assert m.match("other.api.failure") == set()
    assert sorted(m.bindings()) == [("*.api.state_change", "q3"), ("payments.*.*", "q1")]


def test_match_result_is_a_fresh_set() -> None:
    """Mutating a result cannot corrupt the cache."""
    m: TopicMatcher[str] = TopicMatcher()
    m.add("a", "q")
    m.match("a").clear()
    assert m.match("a") == {"q"}


def test_remove_value_drops_every_binding_of_a_queue() -> None:
    """remove_value unbinds a value from all its patterns and prunes the trie."""
    m: TopicMatcher[str] = TopicMatcher()
    for p in ["a.b", "a.#", "*"]:
        m.add(p, "q")
    m.add("a.b", "other")
    assert m.remove_value("q") == 3
    assert list(m.bindings()) == [("a.b", "other")]
    assert m.match("a.b") == {"other"}


ops = st.lists(st.tuples(st.booleans(), patterns, st.sampled_from(["q1", "q2", "q3"])), max_size=30)


@given(ops, st.lists(keys, min_size=1, max_size=8))
def test_matcher_agrees_with_brute_force(
    operations: list[tuple[bool, str, str]], probe_keys: list[str]
) -> None:
    """After random add/remove sequences, match equals brute force over topic_matches."""
    m: TopicMatcher[str] = TopicMatcher()
    bound: set[tuple[str, str]] = set()
    for add, pattern, value in operations:
        if add:
            assert m.add(pattern, value) == ((pattern, value) not in bound)
            bound.add((pattern, value))
        else:
            assert m.remove(pattern, value) == ((pattern, value) in bound)
            bound.discard((pattern, value))
        for key in probe_keys:
            expected = {v for p, v in bound if topic_matches(p, key)}
            assert m.match(key) == expected
    assert len(m) == len(bound)
    assert set(m.bindings()) == bound
